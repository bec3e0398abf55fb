"""KAT inside TRL: TRL's DistillationTrainer distils the student, trained on the tokens KAT keeps.

Differences from `trl.DistillationTrainer` (beta = 1: per-token reverse KL on the student's own
completions), all in `kat.integrations.trl.KATDistillationTrainer`:
- after TRL generates a batch, student and teacher score it once more without gradient: d_t;
- `kat.TrapDetector` finds completions whose window-smoothed d_t stays below its adaptive
  threshold and cuts them at the start of the low stretch;
- the cut segment and everything after it leave the loss, which is normalised by the kept tokens;
- the threshold moves once per step, from every process's per-completion minima.
Difference from `kat train`: TRL generates every completion to the end (it can use vLLM), so
KAT chooses the same tokens but saves no generation.

    pip install 'kat[trl]'                      # or: pip install 'trl>=1.16' next to kat
    python examples/trl_kat.py                  # the shipped toy on CPU: about a minute
    python examples/trl_kat.py --max_steps 60 --kat_eta 0.5 --output_dir runs/trl_kat_eta05

Every `trl.DistillationConfig` field is a flag (--learning_rate, --use_vllm true, --bf16 true, ...);
the detector's are --kat_window, --kat_eta, ... (`--help` lists them). A real pair on GPUs, with
`accelerate launch` (not run here):

    accelerate launch --num_processes 8 examples/trl_kat.py --student Qwen/Qwen3-1.7B-Base \\
        --teacher Qwen/Qwen3-8B \\
        --train_data 'BytedTsinghua-SIA/DAPO-Math-17k[prompt=prompt, answer=reward_model.ground_truth, unwrap=dapo]' \\
        --eval_data '' --kat_window 64 --kat_stride 64 --kat_patience 4 --kat_exempt 128 \\
        --kat_min_buffer 512 --kat_warmup_steps 50 --max_completion_length 4096 \\
        --per_device_train_batch_size 8 --instruction $'\\nPut your final answer within \\\\boxed{}.' \\
        --learning_rate 1e-6 --bf16 true --use_vllm true --output_dir runs/trl_kat_qwen3
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, PrinterCallback, TrainerCallback

import kat
from kat import TrapDetector
from kat.data import load_problems
from kat.evaluate import evaluate
from kat.integrations.trl import KATDistillationTrainer  # says how to install TRL if it is missing
from trl import DistillationConfig

TOY = os.path.join(os.path.dirname(os.path.abspath(kat.__file__)), "toy", "rich")


@dataclass
class Args:
    """The models, the data and the detector (the toy's settings, configs/toy.yaml)."""

    student: str = field(default=os.path.join(TOY, "student"), metadata={"help": "student model (path or hub id)"})
    teacher: str = field(default=os.path.join(TOY, "teacher"), metadata={"help": "teacher model (path or hub id)"})
    train_data: str = field(default=os.path.join(TOY, "data", "train.jsonl"),
                            metadata={"help": "training prompts: a kat data spec (local json/jsonl/parquet or hub)"})
    eval_data: str = field(default=os.path.join(TOY, "data", "test.jsonl"),
                           metadata={"help": "problems with answers for avg@k before and after ('' to skip)"})
    instruction: str = field(default="", metadata={"help": "text appended to every question (e.g. an answer format)"})
    eval_limit: int = field(default=64, metadata={"help": "evaluation problems"})
    eval_k: int = field(default=4, metadata={"help": "samples per evaluation problem"})
    kat_rule: str = field(default="quantile", metadata={"help": "threshold rule: quantile | zscore"})
    kat_window: int = field(default=8, metadata={"help": "W: tokens per window mean z_t"})
    kat_stride: int = field(default=4, metadata={"help": "evaluate z_t every `stride` tokens"})
    kat_patience: int = field(default=2, metadata={"help": "consecutive low windows that confirm a trap"})
    kat_exempt: int = field(default=8, metadata={"help": "windows starting before this position never count"})
    kat_eta: float = field(default=0.3, metadata={"help": "threshold = the (1 - eta) quantile of the minima buffer"})
    kat_buffer_size: int = field(default=1024, metadata={"help": "FIFO of per-completion minima"})
    kat_min_buffer: int = field(default=128, metadata={"help": "no cut before the buffer holds this many minima"})
    kat_warmup_steps: int = field(default=5, metadata={"help": "no cut before this many steps"})


class StepLine(TrainerCallback):
    """One line per logged step: loss, KAT's cut rate and threshold, lengths."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "kat/cut_rate" in logs:
            threshold = logs.get("kat/threshold")
            print(f"step {state.global_step:4d}  loss {logs['loss']:.4f}  cut {logs['kat/cut_rate']:.2f}  "
                  f"threshold {'-' if threshold is None else f'{threshold:.4f}'}  "
                  f"length {logs['completions/mean_length']:5.1f}  kept {logs['kat/kept_length']:5.1f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((Args, DistillationConfig))
    # the toy's run (configs/toy.yaml): 30 steps of 64 prompts, 96 tokens, lr 1e-3 with cosine decay
    parser.set_defaults(output_dir="runs/trl_kat", max_steps=30, per_device_train_batch_size=64,
                        max_completion_length=96, learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=1,
                        beta=1.0, temperature=1.0, gradient_checkpointing=False, logging_steps=1, save_strategy="no",
                        report_to="none", disable_tqdm=True, bf16=torch.cuda.is_available(),
                        dataloader_pin_memory=torch.cuda.is_available(), seed=0)
    args, config = parser.parse_args_into_dataclasses(argv)
    if config.beta != 1.0:
        print(f"note: beta={config.beta} trains TRL's generalised JSD; KAT still cuts on reverse KL", file=sys.stderr)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # tiny models gain nothing from more threads on a shared CPU

    from datasets import Dataset

    tokenizer = AutoTokenizer.from_pretrained(args.student, padding_side="left")
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=dtype).eval().requires_grad_(False)
    problems = load_problems(args.train_data)
    # conversational prompts: TRL applies the tokenizer's chat template, as kat's training does
    train = Dataset.from_dict({"prompt": [[{"role": "user", "content": p["prompt"] + args.instruction}]
                                          for p in problems]})
    detector = TrapDetector(rule=args.kat_rule, window=args.kat_window, stride=args.kat_stride,
                            patience=args.kat_patience, exempt=args.kat_exempt, eta=args.kat_eta,
                            buffer_size=args.kat_buffer_size, min_buffer=args.kat_min_buffer,
                            warmup_steps=args.kat_warmup_steps)
    trainer = KATDistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=train,
                                     processing_class=tokenizer, detector=detector, callbacks=[StepLine()])
    trainer.remove_callback(PrinterCallback)  # StepLine prints the compact version

    eval_set = load_problems(args.eval_data, split="test")[: args.eval_limit] if args.eval_data else []

    def accuracy(tag: str) -> None:
        if eval_set and trainer.accelerator.is_main_process:
            res = evaluate(trainer.accelerator.unwrap_model(trainer.model), tokenizer, eval_set, args.eval_k,
                           max_new_tokens=config.max_completion_length, seed=config.seed,
                           instruction=args.instruction)
            print(f"{tag}: avg@{args.eval_k} {100 * res['avg@k']:.1f}%  pass@{args.eval_k} {100 * res['pass@k']:.1f}%"
                  f"  ({len(eval_set)} problems)", flush=True)

    accuracy("before")
    trainer.train()
    accuracy("after")
    trainer.save_model(config.output_dir)
    if trainer.accelerator.is_main_process:
        print(f"student saved to {config.output_dir}")


if __name__ == "__main__":
    main()
