"""The OPD + KAT training loop on Accelerate, in the order of `main()` in kat.py:

    run = setup(cfg)                      accelerator, models, data, optimiser, terminator
    resume(run)                           state of a checkpoint, when cfg.resume names one
    evaluate before training
    for each step:
        sample_step(run, step)            the student samples, the teacher scores, the terminator cuts
        learn_step(run, step, rollout)    one optimiser step on the kept tokens
        log_step(...)                     one metrics row, sums reduced over processes
        after_step(...)                   periodic evaluation, KL traces, checkpoint
    (hooks, kat.hooks: called after sampling and after learning, to look inside a step)
    finish(run, results)                  evaluate after training, save the student, plot

    python -m kat train --config configs/toy.yaml [--key value ...]
    accelerate launch -m kat train --config configs/qwen3_1.7b.yaml

The maths lives in kat.scorer / sampler / detector / learner; this module only runs it.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from kat.checkpoint import check_start, load_checkpoint, model_card, save_checkpoint, save_student
from kat.config import Config, ConfigError, help_text, load_config, render_kw
from kat.data import DataError, filter_long_prompts, load_eval_sets, load_problems, step_batch, step_generator
from kat.decode_copy import decode_model
from kat.engine import decode_row
from kat.evaluate import run_eval
from kat.hooks import Hook, StepContext, call_hooks
from kat.learner import KeptTokenNormaliser, build_optimizer, learn
from kat.models import (align_vocab, check_positions, check_tokenizers, eos_ids, load_model, load_tokenizer,
                        prepare_student, torch_dtype)
from kat.rollout import STOP_EOS, STOP_LENGTH, Rollout
from kat.rundir import clear_run, trim_logs
from kat.sampler import sample
from kat.terminators import terminator_from_config, window_means


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. too many non-finite steps in a row)."""


@dataclass
class Run:
    """What `setup` builds for one run, and the counters a checkpoint carries."""

    cfg: Config
    accelerator: Accelerator
    tokenizer: Any
    student: Any  # prepared by Accelerate (fp32 master weights)
    teacher: Any  # frozen, in the compute dtype, never prepared
    eos: list[int]
    problems: list[dict]
    eval_sets: dict  # name -> kat.data.EvalSet
    optimizer: Any
    scheduler: Any
    terminator: Any
    normaliser: KeptTokenNormaliser | None = None  # the normalisation control (cfg.norm_from), else None
    start: int = 0  # steps already done (resumed runs)
    counters: dict = field(default_factory=lambda: {"tokens_total": 0.0, "bad_in_a_row": 0})
    command: str = ""  # how the run was started, for the model card
    checkpoint: str = ""  # the checkpoint to resume from (checked against cfg before the models loaded)

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.cfg.output_dir, "metrics.jsonl")

    @property
    def traces_path(self) -> str:
        return os.path.join(self.cfg.output_dir, "traces.jsonl")


# --- Set-up ---------------------------------------------------------------------------------------

def mixed_precision(cfg: Config) -> str:
    """Accelerate's mixed-precision name for the student (fp32 master weights in every case)."""
    if cfg.dtype == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[cfg.dtype]


def build_terminator(cfg: Config, rank: int = 0):
    """The run's terminator (kat.terminators): a random control draws its own cuts on each process."""
    return terminator_from_config(cfg, rank)


def load_models(cfg: Config, device: torch.device):
    """(tokenizer, student, teacher, eos ids): the student in fp32 (master weights; a LoRA student's
    frozen base in the compute dtype), the teacher frozen in the compute dtype, one logit width for
    both, and the student's memory switches (kat.models.prepare_student) on."""
    tokenizer = load_tokenizer(cfg.student, cfg.student_gguf, "student")
    check_tokenizers(tokenizer, load_tokenizer(cfg.teacher, cfg.teacher_gguf, "teacher"))
    compute = torch_dtype(cfg.dtype, device)
    student = load_model(cfg.student, cfg.student_gguf, compute if cfg.lora_r else torch.float32, "student")
    teacher = load_model(cfg.teacher, cfg.teacher_gguf, compute, "teacher")
    teacher = teacher.to(device).eval().requires_grad_(False)
    align_vocab(student, teacher, tokenizer)  # padded embedding rows past the tokenizer trimmed
    eos = eos_ids(tokenizer, student)
    student = prepare_student(student, gradient_checkpointing=cfg.gradient_checkpointing, lora_r=cfg.lora_r,
                              lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              lora_target_modules=cfg.lora_target_modules)
    return tokenizer, student, teacher, eos


@contextmanager
def _field_errors(name: str):
    """Data errors name the config field whose value caused them."""
    try:
        yield
    except DataError as err:
        raise DataError(f"{name}: {err}") from None


def load_data(cfg: Config) -> tuple[list[dict], dict]:
    """(training problems, evaluation sets by name); read before the models, so that a bad path or
    spec is reported before minutes of model loading."""
    with _field_errors("train_data"):
        problems = load_problems(cfg.train_data, split=cfg.train_split, prompt_field=cfg.prompt_field,
                                 answer_field=cfg.answer_field)
    with _field_errors("eval_data"):
        eval_sets = load_eval_sets(cfg.eval_data, split=cfg.eval_split, prompt_field=cfg.prompt_field,
                                   answer_field=cfg.answer_field, k=cfg.eval_k, limit=cfg.eval_limit)
    return problems, eval_sets


def setup(cfg: Config) -> Run:
    overwrite, ckpt = check_start(cfg)  # trackers, the run folder, the checkpoint to resume: before anything loads
    # step_scheduler_with_optimizer=False: Accelerate would otherwise advance the schedule once per
    # process at every step (it assumes each process's batch is a shard of one data loader)
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg), log_with=cfg.log_with or None,
                              project_dir=cfg.output_dir, step_scheduler_with_optimizer=False)
    if cfg.lora_r and accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError("lora_r: a LoRA student is not sharded here (its merged save needs the full weights "
                          "on one process); launch it with DDP, where only the small adapter is trained")
    if overwrite and accelerator.is_main_process:  # every process has checked the folder before this
        clear_run(cfg.output_dir, overwrite)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    normaliser = KeptTokenNormaliser(cfg.norm_from, cfg.steps) if cfg.norm_from else None  # read once
    problems, eval_sets = load_data(cfg)
    tokenizer, student, teacher, eos = load_models(cfg, accelerator.device)
    problems = filter_long_prompts(tokenizer, problems, cfg.max_prompt_length, render_kw=render_kw(cfg),
                                   name="train_data")
    check_positions(tokenizer, problems, eval_sets, cfg, student, teacher)  # prompt + completion fit the models
    optimizer, scheduler = build_optimizer(student, cfg.lr, cfg.steps, cfg.warmup_ratio, cfg.weight_decay)
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    return Run(cfg, accelerator, tokenizer, student, teacher, eos, problems, eval_sets, optimizer, scheduler,
               build_terminator(cfg, accelerator.process_index), normaliser, checkpoint=ckpt)


# --- Checkpoints (kat.checkpoint): atomic, resumable, the last `keep_last` kept --------------------

def resume(run: Run) -> None:
    """Load the checkpoint cfg.resume names (if any): model, optimiser, schedule and RNG states,
    the terminator's statistics, the step and the counters. Log rows written after it are dropped."""
    ckpt = run.checkpoint
    if not ckpt:
        return
    progress = load_checkpoint(run.accelerator, ckpt, run.terminator, run.cfg.output_dir)
    run.start = progress["step"]
    run.counters = {k: progress[k] for k in run.counters}
    if run.accelerator.is_main_process and (dropped := trim_logs(run.cfg.output_dir, run.start)):
        print(f"dropped {dropped} log rows written after step {run.start}")
    run.accelerator.wait_for_everyone()
    run.accelerator.print(f"resumed from {ckpt} at step {run.start}")


@contextmanager
def stop_requests():
    """SIGTERM / Ctrl-C set a flag; the loop checkpoints at the end of the current step and exits."""
    flag = {"stop": False}

    def handler(signum, frame):  # noqa: ARG001
        flag["stop"] = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --- Logs: metrics.jsonl (one row per step and per evaluation), traces.jsonl, trackers ------------

def append_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def open_logs(run: Run) -> None:
    """Start the trackers; a fresh run (not a resumed one) also starts fresh files and saves its config."""
    if run.cfg.log_with:  # trackers take scalars: a mapping field goes as its JSON text
        config = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in run.cfg.to_dict().items()}
        run.accelerator.init_trackers(run.cfg.project_name, config=config)
    if run.accelerator.is_main_process and run.start == 0:
        for p in (run.metrics_path, run.traces_path):
            if os.path.exists(p):
                os.remove(p)
        with open(os.path.join(run.cfg.output_dir, "config.yaml"), "w") as fh:
            import yaml
            yaml.safe_dump(run.cfg.to_dict(), fh, sort_keys=False)


def log_row(run: Run, row: dict) -> None:
    if run.accelerator.is_main_process:
        append_jsonl(run.metrics_path, [row])
    if run.cfg.log_with:
        run.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])


def skip_step(run: Run, step: int, reason: str) -> None:
    """A step with non-finite numbers changes nothing; too many in a row end the run."""
    run.counters["bad_in_a_row"] += 1
    run.accelerator.print(f"warning: {reason}; step skipped")
    log_row(run, {"step": step + 1, "skipped": reason})
    if run.counters["bad_in_a_row"] >= run.cfg.max_bad_steps:
        raise TrainingError(f"{run.counters['bad_in_a_row']} steps in a row met non-finite values (last: step "
                            f"{step + 1}: {reason}). Check the models' weights and dtype, or lower lr")


def rollout_metrics(r: Rollout) -> dict:
    """Per-process sums; the loop reduces them across processes before dividing."""
    gen = r.completion_mask
    cut = (r.stop != STOP_EOS) & (r.stop != STOP_LENGTH)
    out = {
        "rows": float(r.stop.numel()),
        "tokens": float(gen.sum()),
        "loss_tokens": float(r.loss_mask.sum()),
        "kl_sum": float((r.kl * gen).sum()),
        "kl_loss_sum": float((r.kl * r.loss_mask).sum()),
        "cut_rows": float(cut.sum()),
        "eos_rows": float((r.stop == STOP_EOS).sum()),
    }
    if r.shadow_cut is not None:
        out["shadow_rows"] = float((r.shadow_cut >= 0).sum())
    out.update(r.engine or {})  # decode_steps, slot_steps (kat.engine.decode_row)
    return out


def make_traces(r: Rollout, tokenizer, threshold: float | None, cfg: Config, step: int) -> list[dict]:
    """The first cfg.n_traces rows of a rollout as plain lists: tokens, d_t, z_t, and the threshold
    the terminator used for this rollout (taken before its end_batch moved it)."""
    traces = []
    for b in range(min(cfg.n_traces, r.stop.numel())):
        n = int(r.completion_mask[b].sum())
        kl = r.kl[b, :n].float().cpu()
        traces.append({
            "step": step,
            "tokens": [tokenizer.decode([t]) for t in r.completion_ids[b, :n].tolist()],
            "kl": [round(x, 6) for x in kl.tolist()],
            "z": [None if math.isnan(x) else round(x, 6) for x in window_means(kl, cfg.window).tolist()],
            "threshold": threshold,
            "window": cfg.window, "stride": cfg.stride, "exempt": cfg.exempt,
            "cut": int(r.cut[b]) if int(r.cut[b]) < n else None,
            "shadow_cut": int(r.shadow_cut[b]) if r.shadow_cut is not None and int(r.shadow_cut[b]) >= 0 else None,
            "stop": int(r.stop[b]),
        })
    return traces


# --- Evaluation (kat.evaluate.run_eval shards the problems across processes) ----------------------

def eval_and_log(run: Run, step: int, kind: str, tag: str) -> dict:
    """Evaluate the student on every set and log the row {step, eval: kind, NAME/metric ...}."""
    res = run_eval(run.accelerator, run.student, run.tokenizer, run.eval_sets, run.cfg, tag)
    log_row(run, {"step": step, "eval": kind, **res})
    return res


# --- One step -------------------------------------------------------------------------------------

def sample_step(run: Run, step: int) -> tuple[Rollout, float | None, bool] | None:
    """Rollouts of this step's prompts; the terminator then takes in their statistics (end_batch).

    Returns (rollout, the threshold and active flag the terminator used for it), or None when a
    process met non-finite numbers: then every process skips the step together, or their
    parameters and buffers would drift apart.
    """
    cfg, acc, terminator = run.cfg, run.accelerator, run.terminator
    batch_rows, prompt_ids, prompt_mask = step_batch(run.tokenizer, run.problems, step, cfg, acc.process_index,
                                                     acc.num_processes, acc.device)
    rows = prompt_ids.shape[0]
    run.student.eval()
    try:
        # one generator seed per step on every process; each process takes its rows' uniforms
        # (global_rows), so the tokens do not depend on how many processes share the batch.
        # score=False with the `full` loss: unless the terminator reads the KL while decoding,
        # the learner's teacher pass gives it (kat.sampler's unscored mode); when it does, lockstep
        # keeps the teacher's logits for the learner (teacher_cache_mb) so the teacher runs once
        rollout, state = sample(decode_model(run), run.teacher, prompt_ids, prompt_mask,
                                max_new_tokens=cfg.max_new_tokens, eos_token_id=run.eos,
                                pad_token_id=run.tokenizer.pad_token_id, temperature=cfg.temperature,
                                top_p=cfg.top_p, chunk=cfg.chunk, terminator=terminator,
                                topk=cfg.topk if cfg.loss == "topk" else 0,
                                generator=step_generator(cfg.seed, step, acc.device),
                                global_rows=(acc.process_index * rows, acc.num_processes * rows),
                                score=cfg.loss != "full",
                                teacher_cache_mb=cfg.teacher_cache_mb if cfg.loss == "full" else 0.0,
                                slots=cfg.rollout_slots, decode=cfg.decode)
        if cfg.termination == "oracle":  # toy only: the cut at the world's ground truth (kat.toy.oracle)
            from kat.toy.oracle import oracle_rollout
            rollout = oracle_rollout(rollout, [p["prompt"] for p in batch_rows], run.tokenizer)
        problem = None
    except FloatingPointError as err:  # non-finite logits or KL: reported with rows and positions
        problem = f"step {step + 1}, process {acc.process_index}: {err}"
    run.student.train()
    if acc.reduce(torch.tensor(float(problem is not None), device=acc.device), "sum").item() > 0:
        skip_step(run, step, problem or "another process met non-finite values while sampling")
        return None
    # every process pushes its rollouts' minima; all hold the same threshold afterwards
    threshold, active = terminator.threshold, terminator.active
    terminator.end_batch(state, step)
    return rollout, threshold, bool(active)


def learn_step(run: Run, step: int, rollout: Rollout) -> tuple[dict, Rollout] | None:
    """One optimiser step on the loss-masked tokens, globally normalised. Returns the learner's
    stats and the rollout with its KL filled in (an unscored rollout takes the learner's d_t),
    or None when the step was skipped for a non-finite loss."""
    accelerator = run.normaliser.accelerator(run.accelerator, step, rollout) if run.normaliser else run.accelerator
    stats = learn(run.student, rollout, run.optimizer, run.scheduler, accelerator,
                  kind=run.cfg.loss, micro_batch_size=run.cfg.micro_batch_size, teacher=run.teacher,
                  max_grad_norm=run.cfg.max_grad_norm)
    rollout.teacher_logits = None  # the kept teacher logits are spent: not held through the next rollout
    if not stats["finite"]:
        skip_step(run, step, f"step {step + 1}: non-finite loss in rows {stats['bad_rows']} "
                             f"(process {run.accelerator.process_index})")
        return None
    run.counters["bad_in_a_row"] = 0
    if not rollout.scored:
        rollout = rollout.with_kl(stats["token_kl"].to(rollout.kl.device))
    return stats, rollout


def log_step(run: Run, step: int, rollout: Rollout, stats: dict, threshold: float | None, active: bool,
             times: tuple[float, float]) -> dict:
    """The step's metrics row (sums reduced over processes, then divided), logged and returned."""
    sums = rollout_metrics(rollout)
    keys = sorted(sums)
    total = run.accelerator.reduce(torch.tensor([sums[k] for k in keys], device=run.accelerator.device), "sum")
    sums = dict(zip(keys, total.tolist()))
    run.counters["tokens_total"] += sums["tokens"]
    row = {
        "step": step + 1,
        "loss": stats["loss"],
        "kl": sums["kl_sum"] / max(sums["tokens"], 1.0),
        "kl_kept": sums["kl_loss_sum"] / max(sums["loss_tokens"], 1.0),
        "threshold": threshold,
        "active": active,
        "cut_rate": sums["cut_rows"] / sums["rows"],
        "eos_rate": sums["eos_rows"] / sums["rows"],
        "mean_length": sums["tokens"] / sums["rows"],
        "kept_length": sums["loss_tokens"] / sums["rows"],
        "tokens": sums["tokens"],
        "tokens_total": run.counters["tokens_total"],
        "grad_norm": stats["grad_norm"],
        "lr": run.scheduler.get_last_lr()[0],
        "time_rollout": times[0],
        "time_learn": times[1],
    }
    if "shadow_rows" in sums:
        row["shadow_rate"] = sums["shadow_rows"] / sums["rows"]
    row.update(decode_row(sums, run.accelerator.num_processes))
    log_row(run, row)
    return row


def after_step(run: Run, done: int, rollout: Rollout, threshold: float | None, stopping: bool) -> None:
    """Periodic evaluation, KL traces (with the threshold this step used) and the checkpoint."""
    cfg = run.cfg
    periodic = bool(cfg.eval_every) and done % cfg.eval_every == 0
    if periodic and run.eval_sets and done < cfg.steps:
        eval_and_log(run, done, "periodic", f"step {done}")
    if run.accelerator.is_main_process and cfg.n_traces and (done == cfg.steps or periodic):
        append_jsonl(run.traces_path, make_traces(rollout, run.tokenizer, threshold, cfg, done))
    if (cfg.save_every and done % cfg.save_every == 0) or stopping or done == cfg.steps:
        save_checkpoint(run.accelerator, cfg, done, run.terminator, run.counters, run.student, run.tokenizer)


def finish(run: Run, results: dict) -> dict:
    """Evaluate after training, save the student (safetensors, tokenizer, model card; a LoRA student
    merged, its adapter in output_dir/adapter), plot, write results.json."""
    acc, cfg = run.accelerator, run.cfg
    if run.eval_sets:
        results["after"] = eval_and_log(run, cfg.steps, "after", "after")
    card = model_card(cfg, results, run.command or "kat.train.train(cfg)", acc.num_processes)
    save_student(acc, run.student, run.tokenizer, cfg.output_dir, merge=True, card=card)
    acc.wait_for_everyone()
    if acc.is_main_process:
        if cfg.plot:
            from kat.plot import plot_run
            plot_run(cfg.output_dir)
        with open(os.path.join(cfg.output_dir, "results.json"), "w") as fh:
            json.dump(results, fh, indent=1)
    close(run)
    return results


def close(run: Run) -> None:
    """Release the wrapped student, then end trackers and the process group. In this order the DDP
    reducer never holds the last reference to a gloo group: destroyed from the reducer, the group
    joins its worker thread while holding the GIL that the thread needs, and the process hangs at exit."""
    run.student = run.accelerator.free_memory(run.student)[0]
    run.accelerator.end_training()


# --- The loop -------------------------------------------------------------------------------------

def train(cfg: Config, command: str = "", hooks: Sequence[Hook] = ()) -> dict:
    """Run the loop; `command` (how it was launched) goes into the saved student's model card, and
    each of `hooks` is called after sampling and after learning of every step (kat.hooks)."""
    run = setup(cfg)
    run.command = command
    resume(run)
    open_logs(run)
    results = {}
    if run.eval_sets and run.start == 0:
        results["before"] = eval_and_log(run, 0, "before", "before")

    bar = tqdm(range(run.start, cfg.steps), initial=run.start, total=cfg.steps, desc="kat",
               disable=not run.accelerator.is_local_main_process, dynamic_ncols=True)
    with stop_requests() as stop:
        for step in bar:
            t0 = time.perf_counter()
            sampled = sample_step(run, step)  # 1. rollouts: sample, score, cut
            if sampled is None:
                continue
            rollout, threshold, active = sampled
            t1 = time.perf_counter()
            hooked = call_hooks(hooks, StepContext("sampled", run, step, rollout, threshold, active))
            learned = learn_step(run, step, rollout)  # 2. one optimiser step
            t2 = time.perf_counter()
            if learned is None:
                continue
            stats, rollout = learned
            row = log_step(run, step, rollout, stats, threshold, active, (t1 - t0, t2 - t1 - hooked))  # 3. log
            call_hooks(hooks, StepContext("learned", run, step, rollout, threshold, active, stats, row))
            bar.set_postfix(loss=f"{row['loss']:.3f}", kl=f"{row['kl']:.3f}",
                            thr="-" if threshold is None else f"{threshold:.3f}",
                            cut=f"{row['cut_rate']:.2f}", len=f"{row['mean_length']:.0f}")
            after_step(run, step + 1, rollout, threshold, stop["stop"])  # 4. evaluate, traces, save
            if stop["stop"]:
                run.accelerator.print(f"stopped by signal after step {step + 1}; resume with --resume latest")
                close(run)
                return {"stopped_at": step + 1, **results}
    bar.close()
    return finish(run, results)  # 5. final evaluation and the trained student


STOPPED = 128 + signal.SIGTERM  # 143: the shell's status for a process ended by SIGTERM


def main(argv: list[str] | None = None) -> int:
    """`python -m kat train`: 0 when the run is done; a user error prints one line `error: ...` and
    returns 2; a run stopped by SIGTERM or Ctrl-C (checkpoint written) returns 143."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        launcher = f"# on {world} processes (accelerate launch / torchrun)\n" if world > 1 else ""
        result = train(load_config(argv), command=f"{launcher}python -m kat train {shlex.join(argv)}".strip())
    except (ConfigError, DataError, TrainingError) as err:
        if os.environ.get("RANK", "0") == "0":  # one line per launch, not one per process
            print("error: " + " ".join(str(err).split()), file=sys.stderr)  # one line, whatever the message held
        return 2
    return STOPPED if "stopped_at" in result else 0


if __name__ == "__main__":
    sys.exit(main())
