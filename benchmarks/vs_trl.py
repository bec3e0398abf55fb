"""One OPD training step: ours (kat.sampler.sample + kat.learner.learn) vs TRL's DistillationTrainer.

trl is a benchmark-only dependency, kept out of the project's environment. Run this script in a
separate virtual environment that has trl (and kat installed without dependencies):

    python3 -m venv /work/venv-trl
    /work/venv-trl/bin/pip install torch==2.13.0 && /work/venv-trl/bin/pip install trl
    /work/venv-trl/bin/pip install --no-deps -e .
    /work/venv-trl/bin/python benchmarks/vs_trl.py --threads 1

Without trl the TRL rows are skipped (with a message) and only ours are timed.

Both sides train the same student (copies of one initial state) against the same frozen teacher
(the toy models of kat/toy/rich; random ones of the same shapes if they are not built) on the
same batch of prompts (the same token ids, checked), with the same completion cap, sampling at
temperature 1 (no top-p, no top-k), the exact reverse KL over the whole vocabulary
KL(p_student || q_teacher) averaged over all completion tokens of the batch, one AdamW step with
gradient clipping at 1.0, fp32 on CPU, no gradient checkpointing, the whole batch in one
forward/backward.

Two tables:
- Fixed length: no EOS stop on either side (ours: ``eos_token_id=[]``; TRL: ``min_new_tokens``
  = the cap), so both generate and train on exactly the same number of tokens: the machinery alone.
- Toy task: completions end on EOS, as in training. Rows sample different tokens (different random
  streams), so the tokens per step differ a little; the table reports them.

Rows:
- ``TRL``: ``trl.DistillationTrainer`` (on-policy: the student generates with ``model.generate``;
  ``beta=1.0`` selects the reverse KL in its generalised JSD, per the config's documentation and
  its kernel). The exact configuration is printed with the tables.
- ``ours`` / ``ours, no termination``: ``sample(score=False)`` without a terminator (the student
  decodes alone, the teacher does not run), then ``learn(kind="full")`` on an Accelerator, whose
  teacher pass also yields the per-token KL: the teacher runs once per step, as in ``kat.train``.
- ``ours, KAT``: ``sample`` with the toy's TrapDetector (configs/toy.yaml: chunk 8, W 8, stride 4,
  patience 2, exempt 8, eta 0.3) made active by two untimed calibration batches; its buffer keeps
  updating every step, as in training. Cut rows stop early and their cut segment leaves the loss.
  The lockstep teacher's logits of the kept tokens are kept for the ``full`` loss (``teacher_cache_mb``
  at the config's default, far above the toy's needs), so the teacher runs only in the sampler, as
  in ``kat.train``.
- ``ours, KAT, teacher again in learn``: the same with ``teacher_cache_mb=0``: the learner runs the
  teacher a second time for the ``full`` target (what a run whose kept logits exceed the budget does).
- ``..., topk K=V``: the same with ``learn(kind="topk")`` and K = the vocabulary size (23 on the
  toy). With K >= V the top-K + tail loss is the exact reverse KL (same value and gradient as
  ``full``), and the teacher's numbers it needs are captured while sampling, so ``learn`` does not
  run the teacher again. Only sensible for small vocabularies: the rollout holds (B, T, V) of them.

A step is timed from the start of sampling to the end of the optimiser step (TRL: from
``on_step_begin`` to ``on_step_end`` of a callback). Median over ``--steps`` steps after
``--warmup`` untimed ones, in ``--blocks`` alternating blocks (TRL, ours, ours KAT, TRL, ...) so a
load change on a shared machine hits every row alike. "teacher backbone" is the time inside the
teacher's decoder stack (a forward hook on ``teacher.base_model``, which both sides call; the
LM head and the KL are not in it) and the number of its calls per step: TRL runs the teacher once
per step, after generation; so does ours without termination. With KAT, ours runs it in the
sampler (lockstep: the detector needs d_t while decoding) and, for the ``full`` loss, keeps its
logits for ``learn``; only the "teacher again" row runs it in ``learn`` as well.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from rollout import ForwardTimer  # noqa: E402

TOY_DIR = common.ROOT / "kat" / "toy" / "rich"
TOY_SHAPES = {"teacher": dict(layers=6, hidden=128, ffn=384, heads=4),
              "student": dict(layers=2, hidden=64, ffn=256, heads=4)}
KAT_DETECTOR = dict(rule="quantile", window=8, stride=4, patience=2, exempt=8, eta=0.3, buffer_size=1024)
KAT_CHUNK = 8


def trl_version() -> str | None:
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


# ---------------------------------------------------------------------------------------------
# Models, tokenizer, prompts

def toy_world(batch: int, seed: int):
    """(tokenizer, teacher, student, prompt texts, note): the shipped toy models, else random ones
    of the same shapes with the toy tokenizer."""
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    world = common.import_kat("toy.world")
    shipped = all((TOY_DIR / role / "config.json").is_file() for role in ("teacher", "student"))
    if shipped:
        tokenizer = AutoTokenizer.from_pretrained(TOY_DIR / "student")
        teacher, student = (AutoModelForCausalLM.from_pretrained(TOY_DIR / role, dtype=torch.float32)
                            for role in ("teacher", "student"))
        note = "shipped toy models (kat/toy/rich)"
    else:
        tokenizer = common.import_kat("toy.tokenizer").build_tokenizer()
        models = []
        for i, role in enumerate(("teacher", "student")):
            shape = TOY_SHAPES[role]
            torch.manual_seed(seed + i)
            models.append(LlamaForCausalLM(LlamaConfig(
                vocab_size=len(tokenizer), hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                num_key_value_heads=shape["heads"], max_position_embeddings=128, tie_word_embeddings=True,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)))
        teacher, student = models
        note = "kat/toy/rich not built: RANDOM models of the toy shapes with the toy tokenizer"
    tokenizer.padding_side = "left"
    rng = random.Random(seed)
    # prompts rendered by the toy chat template, so both sides see the same text
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": world.sample_problem(rng).prompt}],
                                           tokenize=False, add_generation_prompt=True) for _ in range(batch)]
    n = lambda m: f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M"  # noqa: E731
    label = f"{note}: teacher {n(teacher)}, student {n(student)}"
    return tokenizer, teacher.eval().requires_grad_(False), student, texts, label


def encode(tokenizer, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) left-padded ids and mask, tokenised exactly as TRL tokenises plain-text prompts."""
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].bool().to(device)


# ---------------------------------------------------------------------------------------------
# Ours

def ours_steps(student, teacher, tokenizer, texts: list[str], device: torch.device, *, max_new_tokens: int,
               lr: float, warmup: int, steps: int, seed: int, eos: bool = True, kat: bool = False,
               loss: str = "full", teacher_cache_mb: float | None = None,
               micro_batch_size: int | None = None) -> list[dict]:
    """Time `steps` training steps (after `warmup`): sample + learn + optimiser step.

    eos False: no EOS stops, every row generates `max_new_tokens`. kat: the toy's TrapDetector.
    loss "full": the learner recomputes the teacher's logits, unless lockstep kept them
    (`teacher_cache_mb`, None: the config's default). "topk": K = the whole vocabulary, so the
    loss is the same exact reverse KL, from teacher numbers captured while sampling.
    """
    from accelerate import Accelerator

    if teacher_cache_mb is None:
        teacher_cache_mb = common.import_kat("config").Config.teacher_cache_mb

    sampler, learner, detector = (common.import_kat(m) for m in ("sampler", "learner", "terminators"))
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no")
    optimizer, scheduler = learner.build_optimizer(student, lr, steps=10_000, warmup_ratio=0.0)
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    teacher = teacher.to(accelerator.device)
    prompt_ids, prompt_mask = encode(tokenizer, texts, accelerator.device)
    topk = teacher.get_output_embeddings().weight.shape[0] if loss == "topk" else 0  # K = V
    terminator = chunk = None
    if kat:
        terminator = detector.TrapDetector(**KAT_DETECTOR, min_buffer=len(texts), warmup_steps=1)
        chunk = KAT_CHUNK

    def rollout(step: int):
        student.eval()
        gen = torch.Generator(device=accelerator.device).manual_seed(seed * 1_000_003 + step)
        out, state = sampler.sample(accelerator.unwrap_model(student), teacher, prompt_ids, prompt_mask,
                                    max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id if eos else [],
                                    pad_token_id=tokenizer.pad_token_id, temperature=1.0, top_p=1.0,
                                    chunk=chunk or 8, terminator=terminator, topk=topk, generator=gen,
                                    score=kat or loss != "full",  # as kat.train: the KL from learn()
                                    teacher_cache_mb=teacher_cache_mb if loss == "full" else 0.0)
        student.train()
        if terminator is not None:
            terminator.end_batch(state, step)
        return out

    if kat:  # two untimed batches fill the detector's buffer; it is active from then on
        for step in range(2):
            rollout(-1 - step)
    results = []
    timer = ForwardTimer(teacher.base_model, accelerator.device)
    try:
        for step in range(warmup + steps):
            timer.reset()
            common.synchronize(accelerator.device)
            start = time.perf_counter()
            r = rollout(step)
            stats = learner.learn(student, r, optimizer, scheduler, accelerator, kind=loss,
                                  micro_batch_size=micro_batch_size or len(texts),
                                  teacher=teacher if loss == "full" else None,
                                  max_grad_norm=1.0)
            common.synchronize(accelerator.device)
            seconds = time.perf_counter() - start
            if step >= warmup:
                results.append({"seconds": seconds, "teacher": timer.seconds(), "teacher_calls": timer.calls,
                                "tokens": int(r.completion_mask.sum()), "loss_tokens": int(r.loss_mask.sum()),
                                "loss": stats["loss"], "cut_rows": int((r.cut < r.lengths).sum())})
    finally:
        timer.remove()
    return results


# ---------------------------------------------------------------------------------------------
# TRL

def trl_config(output_dir: str, batch: int, max_new_tokens: int, lr: float, max_steps: int, seed: int,
               cpu: bool, eos: bool = True) -> dict:
    """Every DistillationConfig field we set (the rest keep TRL's defaults).

    eos False: EOS is held back until `max_new_tokens` (``min_new_tokens``), so every row has the
    full length, as ours does with no EOS stop.
    """
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=batch,  # the whole batch in one forward/backward, like ours
        gradient_accumulation_steps=1,
        max_steps=max_steps,
        max_completion_length=max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0,  # plain sampling at temperature 1
        generation_kwargs=None if eos else {"min_new_tokens": max_new_tokens},
        beta=1.0,  # generalised JSD at beta = 1: reverse KL(student || teacher)
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0,
        gradient_checkpointing=False,  # TRL's default is True; ours does not checkpoint
        bf16=False, fp16=False,  # fp32, like ours on CPU (TRL's default is bf16)
        use_cpu=cpu,
        shuffle_dataset=False,
        seed=seed,
        logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_pin_memory=False,
    )


def trl_steps(student, teacher, tokenizer, texts: list[str], device: torch.device, *, max_new_tokens: int,
              lr: float, warmup: int, steps: int, seed: int, eos: bool = True) -> tuple[list[dict], dict]:
    """Time `steps` DistillationTrainer steps (after `warmup`); returns the steps and the config used."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    class StepTimer(TrainerCallback):
        """Wall time of each step, and the mean completion length TRL logged for its batch."""

        def __init__(self):
            self.seconds, self.teacher, self.calls, self.lengths, self.trainer = [], [], [], [], None
            self.forward = ForwardTimer(teacher.base_model, device)  # TRL calls the backbone itself

        def on_step_begin(self, args, state, control, **kw):
            self.forward.reset()
            common.synchronize(device)
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            common.synchronize(device)
            self.seconds.append(time.perf_counter() - self._start)
            self.teacher.append(self.forward.seconds())
            self.calls.append(self.forward.calls)
            self.lengths.append(self.trainer._metrics["train"]["completions/mean_length"][-1])

    with tempfile.TemporaryDirectory() as out:
        config = trl_config(out, len(texts), max_new_tokens, lr, warmup + steps, seed, device.type == "cpu", eos)
        timer = StepTimer()
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig(**config),
                                      train_dataset=Dataset.from_dict({"prompt": texts}),
                                      processing_class=tokenizer, callbacks=[timer])
        timer.trainer = trainer
        try:
            with contextlib.redirect_stdout(sys.stderr):  # its end-of-training summary
                trainer.train()
        finally:
            timer.forward.remove()
    results = [{"seconds": s, "teacher": t, "teacher_calls": c, "tokens": round(n * len(texts)),
                "loss_tokens": round(n * len(texts))}
               for s, t, c, n in zip(*(x[warmup:] for x in (timer.seconds, timer.teacher, timer.calls, timer.lengths)))]
    config.pop("output_dir")
    return results, config


# ---------------------------------------------------------------------------------------------
# Report

@dataclass(frozen=True)
class Run:
    """One row: which table, its label, whose trainer, EOS stops, KAT, our loss estimator, and the
    budget for the lockstep teacher's kept logits (None: the config's default) and the learner's
    micro-batch size (None: the whole batch)."""

    table: str
    name: str
    trainer: str  # "trl" | "ours"
    eos: bool
    kat: bool = False
    loss: str = "full"
    teacher_cache_mb: float | None = None
    micro_batch_size: int | None = None


# The fixed-length table isolates the step's machinery (both sides generate exactly max_new_tokens
# per row); the toy-task table is what training on the toy does. "topk K=V" rows: see ours_steps.
RUNS = [
    Run("fixed", "TRL", "trl", eos=False),
    Run("fixed", "ours", "ours", eos=False),
    Run("fixed", "ours, topk K=V", "ours", eos=False, loss="topk"),
    Run("toy", "TRL", "trl", eos=True),
    Run("toy", "ours, no termination", "ours", eos=True),
    Run("toy", "ours, KAT", "ours", eos=True, kat=True),
    Run("toy", "ours, KAT, teacher again in learn", "ours", eos=True, kat=True, teacher_cache_mb=0.0),
    Run("toy", "ours, no termination, micro-batches of 16", "ours", eos=True, micro_batch_size=16),
    Run("toy", "ours, KAT, micro-batches of 16", "ours", eos=True, kat=True, micro_batch_size=16),
    Run("toy", "ours, no termination, topk K=V", "ours", eos=True, loss="topk"),
    Run("toy", "ours, KAT, topk K=V", "ours", eos=True, kat=True, loss="topk"),
]
TABLES = {"fixed": "Fixed length: no EOS stop on either side, every row generates max_new_tokens",
          "toy": "Toy task: completions end on EOS"}


def summarise(steps: list[dict]) -> dict:
    return {"seconds": common.median([s["seconds"] for s in steps]), "n": len(steps),
            "teacher": common.median([s["teacher"] for s in steps]), "teacher_calls": steps[-1]["teacher_calls"],
            "tokens": sum(s["tokens"] for s in steps) / len(steps),
            "loss_tokens": sum(s["loss_tokens"] for s in steps) / len(steps),
            "cut_rows": sum(s.get("cut_rows", 0) for s in steps) / len(steps)}


def table(summary: dict[str, dict], batch: int) -> str:
    """Markdown table; ratios against TRL where it ran, and each KAT row against the same run
    without termination (same loss): the share of time and of tokens that termination saves."""
    trl = summary.get("TRL")
    rows = []
    for name, s in summary.items():
        plain = (summary.get(name.replace("KAT", "no termination").replace(", teacher again in learn", ""))
                 if "KAT" in name else None)
        rows.append([
            name, f"{s['tokens']:.0f}", f"{s['loss_tokens']:.0f}",
            f"{s['cut_rows']:.1f} / {batch}" if "KAT" in name else "-",
            f"{s['seconds'] * 1e3:.0f}", common.fmt_ratio(s["seconds"] / trl["seconds"]) if trl else "-",
            common.fmt_ratio(s["tokens"] / trl["tokens"]) if trl else "-",
            f"{s['teacher'] * 1e3:.0f} ({s['teacher_calls']})",
            common.fmt_ratio(s["seconds"] / plain["seconds"]) if plain else "-",
            common.fmt_ratio(s["tokens"] / plain["tokens"]) if plain else "-",
            common.fmt_ratio(s["loss_tokens"] / plain["loss_tokens"]) if plain else "-",
        ])
    headers = ["run", "generated tokens / step", "loss tokens / step", "rows cut", "median step ms",
               "time vs TRL", "tokens vs TRL", "teacher backbone ms (calls)", "KAT: time vs no term.",
               "KAT: generated vs no term.", "KAT: loss tokens vs no term."]
    return common.markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64, help="prompts per step (configs/toy.yaml: 16 x 4 samples)")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="completion cap (toy default 96)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each block")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per block")
    parser.add_argument("--blocks", type=int, default=2, help="alternating blocks over every row")
    parser.add_argument("--tables", nargs="+", choices=list(TABLES), default=list(TABLES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (pass 1 on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    import transformers

    version = trl_version()
    print(common.header(device, "python benchmarks/vs_trl.py " + " ".join(sys.argv[1:] if argv is None else argv)))
    print(f"\ntransformers {transformers.__version__}; trl {version or 'not installed'}; "
          f"load average at start: {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores")
    if version is None:
        print("\ntrl is not importable here: TRL rows skipped. Run this script in a venv with trl "
              "(see the docstring) to compare.")

    tokenizer, teacher, student0, texts, note = toy_world(args.batch, args.seed)
    ids, _ = encode(tokenizer, texts, torch.device("cpu"))
    trl_ids = tokenizer(texts)["input_ids"]  # what TRL's trainer feeds to generate (before padding)
    same = all(ids[i, -len(t):].tolist() == t for i, t in enumerate(trl_ids))
    print(f"\n{note}; {args.batch} prompts (identical token ids on both sides: {'yes' if same else 'NO'}), "
          f"max_new_tokens {args.max_new_tokens}, lr {args.lr}")

    kw = dict(max_new_tokens=args.max_new_tokens, lr=args.lr, warmup=args.warmup, steps=args.steps)
    runs = [r for r in RUNS if r.table in args.tables and (r.trainer == "ours" or version is not None)]
    steps = {(r.table, r.name): [] for r in runs}
    configs = {}
    for block in range(args.blocks):
        seed = args.seed + 7919 * block
        for run in runs:
            student = copy.deepcopy(student0)
            if run.trainer == "trl":
                done, configs[run.table] = trl_steps(student, teacher, tokenizer, texts, device, seed=seed,
                                                     eos=run.eos, **kw)
            else:
                done = ours_steps(student, teacher, tokenizer, texts, device, seed=seed, eos=run.eos, kat=run.kat,
                                  loss=run.loss, teacher_cache_mb=run.teacher_cache_mb,
                                  micro_batch_size=run.micro_batch_size, **kw)
            steps[run.table, run.name] += done
            print(f"  block {block}: {run.table} / {run.name}: {[round(s['seconds'], 2) for s in done]}",
                  file=sys.stderr, flush=True)

    for group in args.tables:
        print(f"\n### {TABLES[group]}\n\nMedian of {args.blocks} x {args.steps} steps per row.\n")
        print(table({name: summarise(v) for (g, name), v in steps.items() if g == group and v}, args.batch))
    for group, config in configs.items():
        print(f"\nTRL configuration, {group} table (trl.DistillationConfig; every other field at TRL's default):\n")
        print("    " + ",\n    ".join(f"{k}={v!r}" for k, v in config.items()))
    print(f"\nload average at end: {os.getloadavg()[0]:.1f} (1 min)")


if __name__ == "__main__":
    main()
