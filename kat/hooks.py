"""Hooks into the training loop: code that needs to look inside a step without re-running the loop.

    def measure(ctx: StepContext) -> None:
        if ctx.stage == "sampled":   # after sampling, before the optimiser step
            ...ctx.rollout, ctx.threshold, ctx.run.student, ctx.run.teacher...
        else:                        # "learned": after the optimiser step and its metrics row
            ...ctx.stats, ctx.row...

    kat.train.train(cfg, hooks=[measure])

Each hook is called twice per step that is not skipped, in list order. At "sampled" the student
still has the parameters the step starts from and the terminator has taken in the rollout's
statistics (end_batch); at "learned" the row has been logged, and the periodic evaluation, the
traces and the checkpoint of the step (kat.train.after_step) come next. A hook must leave the
models' parameters, the optimiser and the random generators as it found them, or the run no longer
trains as it would without it. The seconds hooks take at "sampled" are left out of time_learn.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kat.rollout import Rollout

STAGES = ("sampled", "learned")


@dataclass
class StepContext:
    """One step as a hook sees it."""

    stage: str  # "sampled" | "learned"
    run: Any  # kat.train.Run: cfg, accelerator, student (prepared), teacher, terminator, counters
    step: int  # 0-based index of the step; its metrics row has "step": step + 1
    rollout: Rollout  # at "learned": with the learner's KL filled in when the rollout was unscored
    threshold: float | None  # the terminator's threshold for this rollout (before end_batch moved it)
    active: bool  # whether the terminator could cut in this rollout
    stats: dict | None = None  # "learned": kat.learner.learn's stats (loss, grad_norm, ...)
    row: dict | None = None  # "learned": the step's metrics row as logged to metrics.jsonl


Hook = Callable[[StepContext], None]


def call_hooks(hooks: Sequence[Hook], ctx: StepContext) -> float:
    """Call every hook with `ctx`; returns the seconds they took."""
    if not hooks:
        return 0.0
    t0 = time.perf_counter()
    for hook in hooks:
        hook(ctx)
    return time.perf_counter() - t0
