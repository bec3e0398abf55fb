"""TRL plain vs TRL + KAT vs `kat train` on the toy: tokens generated, tokens trained, step time.

    python benchmarks/trl_kat.py --threads 1          # 30 steps per run, CPU: a few minutes

Three training runs of the shipped toy student against the toy teacher, in one process, with
configs/toy.yaml's settings: the same prompts in the same order (kat's `step_prompts`: 16
problems x 4 samples per step, through the chat template; the token ids are checked equal),
96 new tokens, sampling at temperature 1 over the whole vocabulary, the exact reverse KL
(TRL ``beta=1.0``; kat ``loss: full``), AdamW at lr 1e-3 with a cosine schedule after 1 warm-up
step, gradient clipping at 1.0, fp32, no gradient checkpointing, the whole batch in one step.

- ``TRL plain``: `trl.DistillationTrainer`, trained on every generated token.
- ``TRL + KAT``: `kat.integrations.trl.KATDistillationTrainer` with the toy's detector (W 8,
  stride 4, patience 2, exempt 8, eta 0.3, buffer 1024, min buffer 128, 5 warm-up steps):
  TRL generates to the end, both models score the batch once more without gradient, cut tokens
  leave the loss.
- ``kat train``: `kat.train.train` on configs/toy.yaml (the same detector): the lockstep sampler
  stops trapped rows while decoding.

Each run draws its own samples (three samplers, three random streams), so the tokens differ a
little between runs. A step is timed from the start of generation to the end of the optimiser
step (TRL: `on_step_begin` to `on_step_end` of a callback; kat train: ``time_rollout +
time_learn`` of metrics.jsonl), in wall time and in CPU time of the training thread (with
``--threads 1`` all of torch's work runs on it; on a shared machine CPU time barely moves with
the load while wall time does; kat train: its `sample` and `learn` calls, which hold all but the
prompt encoding). The table covers the steps where the detector may cut (after its warm-up:
steps 6 onwards), the same step numbers for every run; ``--repeats`` runs the three again in
rotated order.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

TOY = common.ROOT / "kat" / "toy" / "rich"
ROWS_PER_PROMPT = 4


def toy_config(steps: int, output_dir: str):
    from kat.config import load_config

    return load_config(["--config", str(common.ROOT / "configs" / "toy.yaml")], steps=steps, output_dir=output_dir,
                       eval_data="", plot=False, n_traces=0)


def step_texts(cfg, tokenizer) -> list[list[str]]:
    """The rendered prompts of every step, exactly as `kat train` builds them (one process)."""
    from kat.data import load_problems, render_prompt, step_prompts

    problems = load_problems(cfg.train_data, split=cfg.train_split)
    return [[render_prompt(tokenizer, p["prompt"]) for p in step_prompts(problems, step, cfg.batch_size, 0, 1, cfg.seed)
             for _ in range(cfg.samples_per_prompt)] for step in range(cfg.steps)]


def run_trl(cfg, texts: list[list[str]], kat: bool, out: str) -> list[dict]:
    """One TRL run (plain or with KAT) over the steps' prompts; per step: seconds, tokens, kept."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from kat import TrapDetector
    from kat.integrations.trl import KATDistillationTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.cpu = [], []

        def on_step_begin(self, args, state, control, **kw):
            self._start, self._cpu = time.perf_counter(), time.thread_time()

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self._start)
            self.cpu.append(time.thread_time() - self._cpu)

    tokenizer = AutoTokenizer.from_pretrained(cfg.student, padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher, dtype=torch.float32).eval().requires_grad_(False)
    rows = len(texts[0])
    args = DistillationConfig(
        output_dir=out, max_steps=cfg.steps, per_device_train_batch_size=rows, gradient_accumulation_steps=1,
        shuffle_dataset=False,  # the dataset below is already in kat's step order
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
        beta=1.0, learning_rate=cfg.lr, lr_scheduler_type="cosine", warmup_steps=round(cfg.warmup_ratio * cfg.steps),
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, optim="adamw_torch",
        gradient_checkpointing=False, bf16=False, use_cpu=True, seed=cfg.seed, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_pin_memory=False)
    kw = dict(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
              train_dataset=Dataset.from_dict({"prompt": [t for step in texts for t in step]}))
    timer = StepTimer()
    if kat:
        detector = TrapDetector(rule=cfg.rule, window=cfg.window, stride=cfg.stride, patience=cfg.patience,
                                exempt=cfg.exempt, eta=cfg.eta, buffer_size=cfg.buffer_size,
                                min_buffer=cfg.min_buffer, warmup_steps=cfg.warmup_steps)
        trainer = KATDistillationTrainer(**kw, detector=detector, callbacks=[timer])
    else:
        trainer = DistillationTrainer(**kw, callbacks=[timer])
    with contextlib.redirect_stdout(sys.stderr):  # its per-step log lines and end-of-training summary
        trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    assert len(logs) == len(timer.seconds) == cfg.steps
    return [{"seconds": s, "cpu": c, "tokens": h["completions/mean_length"] * rows,
             "kept": h.get("kat/kept_length", h["completions/mean_length"]) * rows,
             "cut_rate": h.get("kat/cut_rate", 0.0)} for s, c, h in zip(timer.seconds, timer.cpu, logs)]


def run_kat(cfg) -> list[dict]:
    """One `kat train` run; per step from its metrics.jsonl, plus the CPU time of its sampling and
    learning calls (wrapped here: the loop has no callbacks)."""
    import kat.train as loop

    cpu: list[float] = []

    def timed(fn, first: bool):
        def wrapper(*args, **kw):
            start = time.thread_time()
            try:
                return fn(*args, **kw)
            finally:
                if first:
                    cpu.append(0.0)
                cpu[-1] += time.thread_time() - start
        return wrapper

    sample, learn = loop.sample, loop.learn
    loop.sample, loop.learn = timed(sample, True), timed(learn, False)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            loop.train(cfg)
    finally:
        loop.sample, loop.learn = sample, learn
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    rows = [r for r in rows if "eval" not in r and "skipped" not in r]
    assert len(rows) == len(cpu) == cfg.steps
    n = cfg.batch_size * cfg.samples_per_prompt
    return [{"seconds": r["time_rollout"] + r["time_learn"], "cpu": c, "tokens": r["tokens"],
             "kept": r["kept_length"] * n, "cut_rate": r["cut_rate"]} for r, c in zip(rows, cpu)]


def same_token_ids(cfg, texts: list[list[str]]) -> bool:
    """TRL tokenises these rendered prompts with the tokenizer's defaults, kat without special
    tokens: the ids must agree for the runs to see the same prompts."""
    from transformers import AutoTokenizer

    from kat.data import encode_prompts

    tokenizer = AutoTokenizer.from_pretrained(cfg.student, padding_side="left")
    ids, mask = encode_prompts(tokenizer, texts[0])
    trl_ids = tokenizer(text=texts[0])["input_ids"]
    return all(ids[i][mask[i]].tolist() == t for i, t in enumerate(trl_ids))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (configs/toy.yaml: 30)")
    parser.add_argument("--repeats", type=int, default=1, help="run the three again, in rotated order")
    parser.add_argument("--threads", type=int, help="torch CPU threads (pass 1 on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    import trl

    print(common.header(torch.device("cpu"), "python benchmarks/trl_kat.py " + " ".join(sys.argv[1:] if argv is None
                                                                                          else argv)))
    print(f"\ntransformers {transformers.__version__}; trl {trl.__version__}; load average at start: "
          f"{os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores")
    runs = ["TRL plain", "TRL + KAT", "kat train"]
    steps: dict[str, list[list[dict]]] = {r: [] for r in runs}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = toy_config(args.steps, os.path.join(tmp, "kat"))
        from transformers import AutoTokenizer

        texts = step_texts(cfg, AutoTokenizer.from_pretrained(cfg.student))
        print(f"\n{len(texts[0])} rows per step ({cfg.batch_size} problems x {cfg.samples_per_prompt}), {cfg.steps} "
              f"steps, max {cfg.max_new_tokens} new tokens; the same prompt token ids in every run: "
              f"{'yes' if same_token_ids(cfg, texts) else 'NO'}")
        for repeat in range(args.repeats):
            order = runs[repeat % 3:] + runs[: repeat % 3]
            for name in order:
                out = os.path.join(tmp, f"{repeat}-{name.replace(' ', '')}")
                start = time.perf_counter()
                if name == "kat train":
                    done = run_kat(toy_config(args.steps, out))
                else:
                    done = run_trl(cfg, texts, kat=name == "TRL + KAT", out=out)
                steps[name].append(done)
                print(f"  repeat {repeat}: {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    first = cfg.warmup_steps  # 0-based index of the first step the detector may cut in
    active = {name: [s for run in v for s in run[first:]] for name, v in steps.items()}
    summary = {name: {"seconds": common.median([s["seconds"] for s in v]), "cpu": common.median([s["cpu"] for s in v]),
                      "tokens": sum(s["tokens"] for s in v) / len(v), "kept": sum(s["kept"] for s in v) / len(v),
                      "cut_rate": sum(s["cut_rate"] for s in v) / len(v)} for name, v in active.items()}
    base = summary["TRL plain"]
    rows = [[name, f"{s['tokens']:.0f}", common.fmt_ratio(s["tokens"] / base["tokens"]), f"{s['kept']:.0f}",
             common.fmt_ratio(s["kept"] / base["kept"]), f"{s['cut_rate']:.2f}", f"{s['cpu'] * 1e3:.0f}",
             common.fmt_ratio(s["cpu"] / base["cpu"]), f"{s['seconds'] * 1e3:.0f}",
             common.fmt_ratio(s["seconds"] / base["seconds"])] for name, s in summary.items()]
    print(f"\nSteps {first + 1}-{cfg.steps} (the detector active), {args.repeats} run(s) each: mean tokens per "
          "step, median step time (CPU time of the training thread, and wall time).\n")
    print(common.markdown_table(["run", "generated tokens / step", "vs TRL plain", "trained tokens / step",
                                 "vs TRL plain", "cut rate", "step CPU ms", "vs TRL plain", "step wall ms",
                                 "vs TRL plain"], rows))
    print(f"\nload average at end: {os.getloadavg()[0]:.1f} (1 min)")


if __name__ == "__main__":
    main()
