"""Controls: the terminators that the experiments compare KAT against.

- `RandomTerminator`: cuts at a random position, with a hazard adapted so that the mean rollout
  length approaches a target (the length-matched baseline the paper's RandomTerm was not).
- `NoTerminator`: never stops anything (plain OPD).
- `DriftTerminator`: cuts right after the first drift token, the contrast to TrapDetector's drift
  gate (does waiting for the teacher to agree matter at all?).

They follow the interface of kat.terminators.base and share its per-batch state. The loss
normalisation control (Config.norm_from) is the learner's: kat.learner.KeptTokenNormaliser.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kat.config import Config, check_random_target, check_value, random_target
from kat.rollout import STOP_RANDOM, STOP_TRAP
from kat.terminators.base import (DEFAULTS, TerminatorState, all_gather_cat, check_chunk, check_logp_chunk,
                                  mark_drift, new_state)


class DriftTerminator:
    """Cut right after the first drift token: the contrast to TrapDetector's drift gate.

    A row drifts at its first position e >= `exempt` with
        log q(y_e) < log(drift_prob)          (q: the teacher at temperature 1)
    and is cut at e + 1: the drift token stays in the loss, everything after it leaves. No KL is
    read and nothing waits for the teacher to agree, so comparing it with the gate tests whether
    waiting for agreement matters at all. Off for the first `warmup_steps` steps (as TrapDetector
    is until its warm-up ends), so both start from the same plain OPD steps. A drift on a row's last
    token fires too (its cut then removes nothing), since a chunk cannot know whether more follows.
    """

    needs_kl = True  # lockstep: the teacher must score each chunk while the student decodes
    needs_teacher_logp = True
    stop_code = STOP_TRAP
    threshold = None

    def __init__(self, exempt: int = DEFAULTS["exempt"], drift_prob: float = DEFAULTS["drift_prob"],
                 warmup_steps: int = DEFAULTS["warmup_steps"], shadow: bool = DEFAULTS["shadow"]):
        self.exempt = int(check_value("exempt", exempt))
        self.drift_prob = float(check_value("drift_prob", drift_prob))
        self.warmup_steps = int(check_value("warmup_steps", warmup_steps))
        self.shadow = bool(shadow)
        self.steps_done = 0

    @classmethod
    def from_config(cls, cfg: Config, rank: int = 0) -> DriftTerminator:
        """The terminator of a `termination: drift` run (the same on every process: `rank` is not read)."""
        return cls(exempt=cfg.exempt, drift_prob=cfg.drift_prob, warmup_steps=cfg.warmup_steps, shadow=cfg.shadow)

    @property
    def active(self) -> bool:
        return self.steps_done >= self.warmup_steps

    def start(self, batch_size: int, device: torch.device | str | None = None) -> TerminatorState:
        state = new_state(batch_size, device)
        state.active = self.active
        state._drift = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        return state

    def observe(self, state: TerminatorState, kl_chunk: Tensor, valid_chunk: Tensor,
                teacher_logp_chunk: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Fire rows whose first drift token falls in this chunk; cut = drift position + 1."""
        check_chunk(state, kl_chunk, valid_chunk)
        check_logp_chunk("DriftTerminator", teacher_logp_chunk, kl_chunk)
        log_drift = math.log(self.drift_prob)
        fired_now = torch.zeros_like(state.fired)
        for j in range(kl_chunk.shape[1]):
            t = state.pos
            before = state._drift.clone()
            mark_drift(state, valid_chunk[:, j] & ~state.fired, teacher_logp_chunk[:, j].double(), t,
                        self.exempt, log_drift)
            state.pos += 1
            if not state.active:
                continue
            fire = (before < 0) & (state._drift == t)  # (B,) drifted here
            state.would_cut = torch.where(fire, t + 1, state.would_cut)
            if not self.shadow:
                state.fired |= fire
                state.cut = torch.where(fire, t + 1, state.cut)
                fired_now |= fire
        return fired_now, state.cut

    def end_batch(self, state: TerminatorState, step: int) -> None:
        self.steps_done = step + 1

    def summary(self, state: TerminatorState) -> dict[str, float]:
        return {"cut_rate": state.fired.float().mean().item(),
                "would_cut_rate": (state.would_cut >= 0).float().mean().item(), "active": float(state.active)}

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, d: dict) -> None:
        self.steps_done = int(d["steps_done"])


class RandomTerminator:
    """Cut each rollout at a random position >= `exempt`, calibrated to a target mean length.

    The length-matched baseline: it shortens rollouts as much as KAT does, but blindly. Each row's
    cut position is drawn once per batch, cut = exempt + G with G geometric on {0, 1, ...}:
        P(G >= g) = (1 - h)^g        (a constant per-token hazard h)
    A row whose natural end comes first is not cut. The length of a row is its cut if cut, else the
    number of tokens it generated (the tokens that reach the loss). After each batch the hazard
    moves toward the value that gives the target mean length: for a pure geometric tail the mean
    excess over `exempt` is about 1/h, so
        h <- h * ((mean_length - exempt) / (target_length - exempt)) ** gain
    (ratio clamped to [1/4, 4] per step; rows that end naturally make the true response flatter, so
    the update undershoots and approaches the target from one side). The initial hazard solves the
    truncated-geometric mean exactly when `max_new_tokens` is given.

    With `target_cut_rate` the share of cut rows is matched too: each row is eligible for a cut with
    probability p, drawn once per batch with its position, and after each batch
        p <- p * (target_cut_rate / cut_rate) ** gain          (ratio clamped to [1/4, 4], p <= 1)
    beside the hazard update, which then matches the kept length of the cut and uncut rows together.

    With several processes, lengths are gathered so every process holds the same hazard; give each
    process its own `seed` (e.g. seed + rank) so their cut positions are independent.
    """

    needs_kl = False
    stop_code = STOP_RANDOM
    shadow = False
    threshold = None
    active = True

    def __init__(self, target_length: float, exempt: int = 0, max_new_tokens: int | None = None,
                 seed: int = 0, gain: float = 0.5, min_hazard: float = 1e-6, target_cut_rate: float | None = None):
        exempt = check_value("exempt", exempt)
        if max_new_tokens is not None:
            max_new_tokens = check_value("max_new_tokens", max_new_tokens)
        check_random_target(target_length, exempt, max_new_tokens)
        if not 0.0 < gain <= 1.0:
            raise ValueError(f"gain must lie in (0, 1], got {gain!r}")
        self.target_length, self.exempt, self.max_new_tokens = float(target_length), int(exempt), max_new_tokens
        self.gain, self.min_hazard = float(gain), float(min_hazard)
        self.generator = torch.Generator().manual_seed(seed)
        self.hazard = self._initial_hazard()
        if target_cut_rate is not None and not 0.0 < target_cut_rate < 1.0:
            raise ValueError(f"target_cut_rate must lie in (0, 1), got {target_cut_rate!r}")
        self.target_cut_rate = target_cut_rate
        self.p_cut = 1.0 if target_cut_rate is None else float(target_cut_rate)
        self.steps_done = 0

    @classmethod
    def from_config(cls, cfg: Config, rank: int = 0) -> RandomTerminator:
        """The length-matched control of a `termination: random` run; each process (`rank`) draws its
        own cut positions."""
        return cls(target_length=random_target(cfg), exempt=cfg.exempt, max_new_tokens=cfg.max_new_tokens,
                   target_cut_rate=cfg.random_target_cut_rate or None, seed=cfg.seed + rank)

    def _initial_hazard(self) -> float:
        excess = self.target_length - self.exempt
        if self.max_new_tokens is None:
            return 1.0 / (excess + 1.0)  # E[G] = (1 - h) / h
        span = self.max_new_tokens - self.exempt

        def mean_excess(h: float) -> float:  # E[min(G, L)] = sum_{g=1..L} (1-h)^g
            return (1.0 - h) * (1.0 - (1.0 - h) ** span) / h

        lo, hi = self.min_hazard, 1.0  # mean_excess decreases in h
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if mean_excess(mid) > excess else (lo, mid)
        return 0.5 * (lo + hi)

    def start(self, batch_size: int, device: torch.device | str | None = None) -> TerminatorState:
        """Fresh state for a batch; draws every row's cut position from the terminator's generator."""
        state = new_state(batch_size, device)
        state.active = True
        u = 1.0 - torch.rand(batch_size, generator=self.generator, dtype=torch.float64)  # (B,) in (0, 1]
        g = torch.floor(torch.log(u) / math.log1p(-min(self.hazard, 1.0 - 1e-12)))  # G = floor(log U / log(1-h))
        planned = self.exempt + g.clamp(max=2**40)
        if self.target_cut_rate is not None:  # ineligible rows: planned past any length
            eligible = torch.rand(batch_size, generator=self.generator, dtype=torch.float64) < self.p_cut
            planned = torch.where(eligible, planned, torch.full_like(planned, 2.0**40))
        state._planned = planned.long().to(device)  # (B,)
        state._length = torch.zeros(batch_size, dtype=torch.long, device=device)
        return state

    def observe(self, state: TerminatorState, kl_chunk: Tensor, valid_chunk: Tensor) -> tuple[Tensor, Tensor]:
        """Fire rows whose planned cut falls in this chunk at a position they generated."""
        check_chunk(state, kl_chunk, valid_chunk)
        width = valid_chunk.shape[1]
        offset = state._planned - state.pos  # (B,) column of the planned cut in this chunk
        in_chunk = (offset >= 0) & (offset < width)
        generated = valid_chunk.gather(1, offset.clamp(0, width - 1)[:, None]).squeeze(1)
        fire = in_chunk & generated & ~state.fired  # (B,)
        state._length += (valid_chunk & ~state.fired[:, None]).sum(dim=1)
        state.fired |= fire
        state.cut = torch.where(fire, state._planned, state.cut)
        state.would_cut = state.cut
        state.pos += width
        return fire, state.cut

    def lengths(self, state: TerminatorState) -> Tensor:
        """(B,) tokens that reach the loss: the cut where cut, else the generated length."""
        return torch.where(state.fired, state.cut, state._length)

    def end_batch(self, state: TerminatorState, step: int) -> None:
        """Move the hazard toward the target mean length, from all processes' lengths."""
        mean_length = all_gather_cat(self.lengths(state).double()).mean().item()
        ratio = (mean_length - self.exempt) / (self.target_length - self.exempt)
        ratio = min(max(ratio, 0.25), 4.0)
        self.hazard = min(max(self.hazard * ratio**self.gain, self.min_hazard), 1.0)
        if self.target_cut_rate is not None:
            rate = all_gather_cat(state.fired.double()).mean().item()
            ratio = min(max(self.target_cut_rate / max(rate, 1e-12), 0.25), 4.0)
            self.p_cut = min(max(self.p_cut * ratio**self.gain, 1e-6), 1.0)
        self.steps_done = step + 1

    def summary(self, state: TerminatorState) -> dict[str, float]:
        return {"cut_rate": state.fired.float().mean().item(),
                "mean_length": self.lengths(state).float().mean().item(), "hazard": self.hazard}

    def state_dict(self) -> dict:
        return {"hazard": self.hazard, "steps_done": self.steps_done, "p_cut": self.p_cut,
                "generator": self.generator.get_state()}

    def load_state_dict(self, d: dict) -> None:
        self.hazard, self.steps_done = float(d["hazard"]), int(d["steps_done"])
        self.p_cut = float(d.get("p_cut", self.p_cut))
        self.generator.set_state(d["generator"])


class NoTerminator:
    """Never stops a rollout: plain on-policy distillation. ``stop_code`` is never written."""

    needs_kl = False
    stop_code = None
    shadow = False
    threshold = None
    active = False

    @classmethod
    def from_config(cls, cfg: Config, rank: int = 0) -> NoTerminator:
        return cls()

    def start(self, batch_size: int, device: torch.device | str | None = None) -> TerminatorState:
        return new_state(batch_size, device)

    def observe(self, state: TerminatorState, kl_chunk: Tensor, valid_chunk: Tensor) -> tuple[Tensor, Tensor]:
        check_chunk(state, kl_chunk, valid_chunk)
        state.pos += kl_chunk.shape[1]
        return torch.zeros_like(state.fired), state.cut

    def end_batch(self, state: TerminatorState, step: int) -> None:
        pass

    def summary(self, state: TerminatorState) -> dict[str, float]:
        return {"cut_rate": 0.0}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass
