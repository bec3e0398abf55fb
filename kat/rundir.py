"""The run folder (`output_dir`): what a run writes there, and what is checked before any model loads.

- A new run refuses an output_dir that already holds a run (`check_output_dir`), naming what it
  holds and the ways out; with `overwrite_output_dir` only what a run writes (`RUN_FILES`,
  `RUN_DIRS`, checkpoint folders) is removed, any other file stays.
- A checkpoint folder is one the run wrote: its name is exactly ``checkpoint-NNNNNN`` (six digits)
  and it holds ``progress.json`` (`is_checkpoint`). Nothing else is ever pruned or resumed from.
- Resume refuses a config that differs from the checkpoint's in a field that defines the run
  (`check_resume`); the fields that may change are `RESUMABLE`.
- Rows that logs gained after the resumed checkpoint are dropped (`trim_logs`), so each step is
  logged once.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from kat.config import ConfigError

CHECKPOINT_NAME = re.compile(r"checkpoint-\d{6}")  # what save_checkpoint writes: checkpoint-{step:06d}
PROGRESS = "progress.json"  # written last into a checkpoint: its marker
RUN_FILES = ("config.yaml", "metrics.jsonl", "traces.jsonl", "results.json", "kl_traces.png", "curves.png",
             PROGRESS)  # top-level progress.json: what kat.py writes
RUN_DIRS = ("student", "adapter")

# Fields that may differ between a checkpoint's config and the config that resumes it. They change
# what is evaluated, logged, saved or where, or how much memory a step takes, never the sequence of
# updates: the batches, sampling seeds, loss, terminator, optimiser and schedule come from the other
# fields, and a resumed run must continue the same run. micro_batch_size, gradient_checkpointing
# and teacher_cache_mb split, recompute or cache the same step (equal up to float rounding), so a
# run that no longer fits in memory can go on. (With lora_dropout > 0 the dropout masks come from
# the global RNG, which an evaluation reseeds, so a changed eval cadence changes them.) A field not
# listed here defines the run: a new field is refused on resume until it is shown to leave the
# updates alone and added here.
RESUMABLE = frozenset({
    "eval_data", "eval_split", "eval_every", "eval_k", "eval_limit", "eval_temperature", "eval_top_p",
    "eval_max_new_tokens", "grader", "save_every", "keep_last", "output_dir", "resume", "overwrite_output_dir",
    "log_with", "project_name", "n_traces", "plot", "max_bad_steps", "micro_batch_size", "gradient_checkpointing",
    "teacher_cache_mb",
})


def is_checkpoint(path: str) -> bool:
    """A checkpoint this project wrote: named checkpoint-NNNNNN, a folder, holding progress.json."""
    name = os.path.basename(os.path.normpath(path))
    return bool(CHECKPOINT_NAME.fullmatch(name)) and os.path.isfile(os.path.join(path, PROGRESS))


def run_contents(output_dir: str) -> list[str]:
    """The names in `output_dir` that a run writes (files, student/, checkpoint folders), sorted."""
    if not os.path.isdir(output_dir):
        return []
    held = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        stem = name[:-4] if name.endswith(".tmp") else name  # a save interrupted half-way
        if ((name in RUN_FILES and os.path.isfile(path)) or (name in RUN_DIRS and os.path.isdir(path))
                or (CHECKPOINT_NAME.fullmatch(stem) and os.path.isdir(path))):
            held.append(name)
    return held


def _check_writable(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"output_dir: cannot create {out!r} ({err.strerror or err}); give a folder you can "
                          "write to") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: {out!r} is not writable; give a folder you can write to")


def check_output_dir(cfg) -> list[str]:
    """Raise ConfigError when `cfg.output_dir` cannot take this run; returns what overwrite_output_dir
    will remove (`clear_run`, on the main process). Called on every process before any model loads."""
    out = cfg.output_dir
    if not out.strip():
        raise ConfigError("output_dir: empty; give the folder the run writes to, e.g. --output_dir runs/my-run")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"output_dir: {out!r} is a file, not a folder; give another --output_dir")
    _check_writable(out)
    if cfg.resume:
        return []
    held = run_contents(out)
    if held and not cfg.overwrite_output_dir:
        shown = ", ".join(held[:6]) + (f" and {len(held) - 6} more" if len(held) > 6 else "")
        raise ConfigError(f"output_dir: {out!r} already holds a run ({shown}), which a new run would overwrite; "
                          "give another --output_dir, continue it with --resume latest, or pass "
                          "--overwrite_output_dir true to remove those (other files stay)")
    return held


def clear_run(output_dir: str, names: list[str]) -> None:
    """Remove what `check_output_dir` listed (main process only)."""
    for name in names:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def check_resume(cfg, ckpt: str, progress: dict) -> None:
    """Refuse a checkpoint past cfg.steps, or one whose run is defined differently (see RESUMABLE)."""
    if progress["step"] > cfg.steps:
        raise ConfigError(f"resume: {ckpt!r} is at step {progress['step']}, past steps={cfg.steps}; resume it "
                          "with the steps it was started with, or start a new run")
    old, new = progress["config"], cfg.to_dict()
    changed = [f"{k}: {old[k]!r} -> {v!r}" for k, v in new.items() if k not in RESUMABLE and k in old and old[k] != v]
    allowed = [f"{k}: {old[k]!r} -> {v!r}" for k, v in new.items()
               if k in RESUMABLE and k != "resume" and k in old and old[k] != v]
    if allowed and not changed and os.environ.get("RANK", "0") == "0":  # said once, where the user looks
        print(f"resume: changed since {ckpt}: {'; '.join(allowed)}")
    if changed:
        raise ConfigError(f"resume: the config differs from the run in {ckpt!r} in fields that define the run: "
                          f"{'; '.join(changed)}. Resume with the run's own values (its config.yaml), or start a "
                          "new run in another --output_dir (only evaluation, logging and saving fields may change)")


def check_tracker(name: str) -> None:
    """Accelerate skips a tracker whose package is missing without a word; say so instead."""
    from accelerate.tracking import get_available_trackers

    if name and name != "all" and name not in {str(t) for t in get_available_trackers()}:
        package = {"comet_ml": "comet-ml"}.get(name, name)
        raise ConfigError(f"log_with: {name!r} needs its package, which is not installed; pip install {package}, "
                          "or leave log_with empty")


def _keep(row: dict, step: int, traces: bool) -> bool:
    """Rows written up to the checkpoint of `step`: the final evaluation of `step` comes after its save."""
    s = row.get("step")
    if not isinstance(s, int):
        return False
    return s < step or (s == step and (traces or row.get("eval") != "after"))


def trim_logs(output_dir: str, step: int) -> int:
    """Drop the rows of metrics.jsonl and traces.jsonl written after the checkpoint of `step` (and a
    line cut off half-way); returns how many rows were dropped. Main process only."""
    dropped = 0
    for name, traces in (("metrics.jsonl", False), ("traces.jsonl", True)):
        path = os.path.join(output_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path) as fh:
            lines = fh.readlines()
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and line.endswith("\n") and _keep(row, step, traces):
                kept.append(line)
        dropped += sum(1 for line in lines if line.strip()) - len(kept)
        if len(kept) != len(lines):
            with open(path + ".tmp", "w") as fh:
                fh.writelines(kept)
            os.replace(path + ".tmp", path)
    return dropped
