"""Terminators: decide online, chunk by chunk, whether a rollout should stop early.

Every terminator shares one interface, so the sampler and the training loop never branch on
which one is in use:

    state = t.start(batch_size, device)           # per-row running state for one batch
    fired, cut = t.observe(state, kl, valid)      # (B, C) per-token KL and validity in
    t.end_batch(state, step)                      # update adaptive statistics once per step
    t.state_dict() / t.load_state_dict(d)         # resume
    t.summary(state)                              # plain floats for logging
    T.from_config(cfg, rank)                      # built from a kat.config.Config in one call

and the class attributes ``needs_kl`` (the sampler must score each chunk while decoding),
``stop_code`` (kat.rollout's STOP_* written for the rows it stops), ``shadow``, and the properties
``threshold`` and ``active`` the loop logs. A terminator whose ``needs_teacher_logp`` is True also
reads the teacher's log-probability of each sampled token, ``t.observe(state, kl, valid,
teacher_logp_chunk=...)`` ((B, C), the rollout's ``teacher_logp``); the sampler passes it to such
terminators only.

This module holds what they share: the per-batch state, its checks and the drift marker, the
gather across processes, and the defaults (the config's, `DEFAULTS`). The terminators themselves
are in kat.terminators.detector (KAT's `TrapDetector`) and kat.terminators.controls (the controls),
their names in kat.terminators.registry.

Positions are 0-based completion positions (position t is the t-th generated token). ``cut`` is
the first excluded position: tokens cut, cut+1, ... are dropped from the loss. A cut is not an end
of sequence; nothing here asks the sampler to append EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch import Tensor

from kat.config import Config

# Every terminator's defaults are the config's: one set, whether built from a Config or by hand.
DEFAULTS = {f.name: f.default for f in fields(Config)}


@dataclass
class TerminatorState:
    """Per-batch running state of a terminator; one row per rollout of the batch.

    Public fields (read by the sampler and the loop):
        fired: (B,) bool, rows this terminator stopped.
        cut: (B,) long, first excluded position of fired rows, -1 elsewhere.
        would_cut: (B,) long, where the terminator decided to cut, -1 where it did not; equal to
            ``cut`` except in shadow mode, where rows are never stopped but decisions are recorded.
        pos: completion positions observed so far (the position of the next chunk's first column).
        active: whether decisions are allowed in this batch (fixed at `start`).
        threshold: the threshold used in this batch (fixed at `start`), None when undefined.
    The underscore fields are the terminator's private running sums and counters.
    """

    fired: Tensor
    cut: Tensor
    would_cut: Tensor
    pos: int = 0
    active: bool = False
    threshold: float | None = None
    # TrapDetector: the last `window` values of d per row, as a ring indexed by position % window.
    _ring: Tensor | None = None  # (B, W) float64
    _ring_valid: Tensor | None = None  # (B, W) bool
    _run: Tensor | None = None  # (B,) long: consecutive low windows so far
    _run_start: Tensor | None = None  # (B,) long: start position of the run's first window
    _decided: Tensor | None = None  # (B,) bool: a decision was taken (no further decisions)
    _z_history: list[Tensor] | None = None  # (B,) float64 per evaluation position, NaN where not evaluated
    # Drift gate / DriftTerminator: the first position >= exempt whose sampled token the teacher
    # gave a probability below drift_prob, -1 before the row drifts.
    _drift: Tensor | None = None  # (B,) long
    # RandomTerminator: the pre-drawn cut position and the number of valid positions seen.
    _planned: Tensor | None = None  # (B,) long
    _length: Tensor | None = None  # (B,) long


def new_state(batch_size: int, device: torch.device | str | None) -> TerminatorState:
    """A batch's state with no row fired, cut or decided yet (each terminator adds its own fields)."""
    return TerminatorState(
        fired=torch.zeros(batch_size, dtype=torch.bool, device=device),
        cut=torch.full((batch_size,), -1, dtype=torch.long, device=device),
        would_cut=torch.full((batch_size,), -1, dtype=torch.long, device=device),
    )


def check_chunk(state: TerminatorState, kl_chunk: Tensor, valid_chunk: Tensor) -> None:
    """`observe`'s inputs: (B, C) KL and a bool validity mask of the same shape."""
    batch = state.fired.shape[0]
    if kl_chunk.dim() != 2 or kl_chunk.shape[0] != batch:
        raise ValueError(f"kl_chunk must have shape (batch_size={batch}, C), got {tuple(kl_chunk.shape)}")
    if valid_chunk.shape != kl_chunk.shape or valid_chunk.dtype != torch.bool:
        raise ValueError(f"valid_chunk must be a bool tensor of shape {tuple(kl_chunk.shape)} like kl_chunk, "
                         f"got {valid_chunk.dtype} {tuple(valid_chunk.shape)}")


def check_logp_chunk(who: str, teacher_logp_chunk: Tensor | None, kl_chunk: Tensor) -> None:
    """A terminator that reads log q(y_t) got it, shaped like the KL chunk."""
    if teacher_logp_chunk is None:
        raise ValueError(f"{who} reads the teacher's log-prob of each sampled token: pass teacher_logp_chunk "
                         "(B, C) to observe() (kat.sampler.sample does so when needs_teacher_logp is True)")
    if teacher_logp_chunk.shape != kl_chunk.shape:
        raise ValueError(f"teacher_logp_chunk must have shape {tuple(kl_chunk.shape)} like kl_chunk, "
                         f"got {tuple(teacher_logp_chunk.shape)}")


def mark_drift(state: TerminatorState, live: Tensor, logp: Tensor, t: int, exempt: int, log_drift: float) -> None:
    """Record position t as the row's drift when it is the first live position >= exempt with
    log q(y_t) < log(drift_prob)."""
    if t < exempt:
        return
    first = live & (state._drift < 0) & (logp < log_drift)  # (B,)
    state._drift = torch.where(first, t, state._drift)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate a 1-D tensor of any length from every process, in rank order.

    Without torch.distributed (or with one process) this returns ``x``. The counts differ per
    rank, so they are gathered first and every rank's values are padded to the largest count.
    Returns a CPU tensor in both cases, so callers can treat the result as host statistics.
    """
    if not _distributed():
        return x.cpu()
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    x = x.to(device)
    world = dist.get_world_size()
    count = torch.tensor([x.numel()], dtype=torch.long, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = torch.zeros(max(counts), dtype=x.dtype, device=device)
    padded[: x.numel()] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu()
