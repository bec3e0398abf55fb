"""Terminators: decide online, chunk by chunk, whether a rollout should stop early.

Four terminators share one interface, so the sampler and the training loop never branch on
which one is in use:

    state = t.start(batch_size, device)           # per-row running state for one batch
    fired, cut = t.observe(state, kl, valid)      # (B, C) per-token KL and validity in
    t.end_batch(state, step)                      # update adaptive statistics once per step
    t.state_dict() / t.load_state_dict(d)         # resume

A terminator whose ``needs_teacher_logp`` is True also reads the teacher's log-probability of each
sampled token, ``t.observe(state, kl, valid, teacher_logp_chunk=...)`` ((B, C), the rollout's
``teacher_logp``); the sampler passes it to such terminators only.

- `TrapDetector` (KAT): smooths the per-token reverse KL d_t into window means z, and stops a
  rollout when z stays below an adaptive threshold for `patience` consecutive evaluated windows.
  With ``gate="drift"`` a low run counts only after the rollout has drifted (see the class).
- `DriftTerminator`, `RandomTerminator`, `NoTerminator`: the controls (cut right after the first
  drift token; cut at random, length-matched; never cut), in kat.controls and importable from here.

Settings are checked by `kat.config.check_value` and the config's cross-field rules, so a
terminator accepts exactly the values `kat train` accepts, with the same messages.

Positions are 0-based completion positions (position t is the t-th generated token). ``cut`` is
the first excluded position: tokens cut, cut+1, ... are dropped from the loss. A cut is not an end
of sequence; nothing here asks the sampler to append EOS.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from kat.config import allowed, check_min_buffer, check_stride, check_value
from kat.rollout import STOP_TRAP

RULES = allowed("rule")  # ("quantile", "zscore")
GATES = allowed("gate")  # ("none", "drift")


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


def _new_state(batch_size: int, device: torch.device | str | None) -> TerminatorState:
    return TerminatorState(
        fired=torch.zeros(batch_size, dtype=torch.bool, device=device),
        cut=torch.full((batch_size,), -1, dtype=torch.long, device=device),
        would_cut=torch.full((batch_size,), -1, dtype=torch.long, device=device),
    )


def _check_chunk(state: TerminatorState, kl_chunk: Tensor, valid_chunk: Tensor) -> None:
    batch = state.fired.shape[0]
    if kl_chunk.dim() != 2 or kl_chunk.shape[0] != batch:
        raise ValueError(f"kl_chunk must have shape (batch_size={batch}, C), got {tuple(kl_chunk.shape)}")
    if valid_chunk.shape != kl_chunk.shape or valid_chunk.dtype != torch.bool:
        raise ValueError(f"valid_chunk must be a bool tensor of shape {tuple(kl_chunk.shape)} like kl_chunk, "
                         f"got {valid_chunk.dtype} {tuple(valid_chunk.shape)}")


def _check_logp_chunk(who: str, teacher_logp_chunk: Tensor | None, kl_chunk: Tensor) -> None:
    if teacher_logp_chunk is None:
        raise ValueError(f"{who} reads the teacher's log-prob of each sampled token: pass teacher_logp_chunk "
                         "(B, C) to observe() (kat.sampler.sample does so when needs_teacher_logp is True)")
    if teacher_logp_chunk.shape != kl_chunk.shape:
        raise ValueError(f"teacher_logp_chunk must have shape {tuple(kl_chunk.shape)} like kl_chunk, "
                         f"got {tuple(teacher_logp_chunk.shape)}")


def _mark_drift(state: TerminatorState, live: Tensor, logp: Tensor, t: int, exempt: int, log_drift: float) -> None:
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


def window_means(kl: torch.Tensor, window: int) -> torch.Tensor:
    """z_t = (1/W) sum_{i=t-W+1..t} d_i for every t >= W-1 (NaN before), for one row."""
    z = torch.full_like(kl, float("nan"))
    if kl.numel() >= window:
        z[window - 1:] = kl.unfold(0, window, 1).mean(-1)
    return z



class TrapDetector:
    """KAT: stop a rollout when its smoothed reverse KL stays below an adaptive threshold.

    Window mean, evaluated every `stride` positions once a full window exists:
        z_t = (1/W) * sum_{i=t-W+1..t} d_i          when (t+1) % stride == 0 and t+1 >= W
    A window is evaluated for a row only if all its W positions were generated by that row.
    A window takes part in a decision only if it starts at or after `exempt` and the detector is
    active (buffer holds >= `min_buffer` minima and >= `warmup_steps` steps are done; decided at
    `start` and fixed for the batch). `patience` consecutive decision windows with z < s fire;
    a window with z >= s resets the count. The cut goes back to the start of the run's first window.

    Thresholds (recomputed in `end_batch`, fixed during a batch):
    - ``quantile``: s = Q_{1-eta}(buffer), numpy's default linear quantile of a FIFO buffer of the
      last `buffer_size` per-rollout minima m = min_t z_t (all evaluated windows, exempt ones too).
    - ``zscore``: s = mean - kappa * std, where mean and variance of the evaluated z values are
      tracked by an exponential moving average over batches (weight `ema` on the batch's mean and
      population variance; the first batch initialises them). The minima buffer is still filled
      and still gates activation.
    With torch.distributed initialised, minima and z values are gathered from every process, so
    every process holds the same buffer and threshold.

    `shadow=True` takes every decision and records it in ``state.would_cut`` but never stops a
    row, so one can measure what would have been cut (e.g. whether those rollouts still succeed).
    Statistics see every evaluated window of every generated token, so in shadow mode windows after
    a would-be cut also feed the buffer.

    Drift gate (``gate="drift"``, beyond the paper). The paper's story is "the student drifts, then
    the teacher agrees"; the plain rule only sees the second half, so once training has made KL
    uniformly low it cuts healthy rollouts too. With the gate a row has drifted at its first
    position e >= `exempt` whose sampled token the teacher finds unlikely,
        log q(y_e) < log(drift_prob)          (q: the teacher at temperature 1),
    and a window takes part in a decision only if it starts after e (start > e). The cut still goes
    to the start of the run's first low window, so the drift token itself stays in the loss. A row
    that never drifts is never cut, however flat and low its KL. The gate changes decisions only:
    every evaluated window still feeds the statistics, so in shadow mode a gated and an ungated
    detector on the same streams hold the same buffer and threshold (when cutting, each stops
    observing the rows it cut, so their buffers part).
    """

    needs_kl = True
    stop_code = STOP_TRAP

    def __init__(self, rule: str = "quantile", window: int = 64, stride: int = 64, patience: int = 4,
                 exempt: int = 256, eta: float = 0.3, buffer_size: int = 4096, min_buffer: int = 512,
                 warmup_steps: int = 50, kappa: float = 1.0, ema: float = 0.1, shadow: bool = False,
                 gate: str = "none", drift_prob: float = 0.02):
        rule, window, stride, patience, exempt, eta, buffer_size, min_buffer, warmup_steps, kappa, ema, gate, \
            drift_prob = (check_value(name, value) for name, value in (
                ("rule", rule), ("window", window), ("stride", stride), ("patience", patience),
                ("exempt", exempt), ("eta", eta), ("buffer_size", buffer_size), ("min_buffer", min_buffer),
                ("warmup_steps", warmup_steps), ("kappa", kappa), ("ema", ema), ("gate", gate),
                ("drift_prob", drift_prob)))
        check_stride(stride, window)
        check_min_buffer(min_buffer, buffer_size)
        self.rule, self.window, self.stride, self.patience = rule, int(window), int(stride), int(patience)
        self.exempt, self.eta, self.buffer_size = int(exempt), float(eta), int(buffer_size)
        self.min_buffer, self.warmup_steps = int(min_buffer), int(warmup_steps)
        self.kappa, self.ema, self.shadow = float(kappa), float(ema), bool(shadow)
        self.gate, self.drift_prob = gate, float(drift_prob)
        self.buffer = torch.empty(0, dtype=torch.float64)  # FIFO of per-rollout minima, oldest first
        self.steps_done = 0
        self.z_mean: float | None = None  # zscore rule: running mean and variance of z
        self.z_var: float | None = None

    # -- adaptive threshold -------------------------------------------------------------------

    @property
    def threshold(self) -> float | None:
        """The threshold the next batch will use; None until enough statistics exist."""
        if self.rule == "quantile":
            if self.buffer.numel() == 0:
                return None
            # torch.quantile's default 'linear' interpolation is numpy's default method.
            return torch.quantile(self.buffer, 1.0 - self.eta).item()
        if self.z_mean is None:
            return None
        return self.z_mean - self.kappa * math.sqrt(self.z_var)  # s = mean - kappa * std

    @property
    def active(self) -> bool:
        """Whether the next batch may cut (warm-up over and a threshold defined)."""
        return (self.buffer.numel() >= self.min_buffer and self.steps_done >= self.warmup_steps
                and self.threshold is not None)

    @property
    def needs_teacher_logp(self) -> bool:
        """The drift gate reads log q(y_t) of each sampled token; the plain rules read only d_t."""
        return self.gate == "drift"

    # -- per batch ----------------------------------------------------------------------------

    def start(self, batch_size: int, device: torch.device | str | None = None) -> TerminatorState:
        """Fresh state for a batch of `batch_size` rollouts; fixes `active` and the threshold."""
        state = _new_state(batch_size, device)
        state.active, state.threshold = self.active, self.threshold
        state._ring = torch.zeros(batch_size, self.window, dtype=torch.float64, device=device)
        state._ring_valid = torch.zeros(batch_size, self.window, dtype=torch.bool, device=device)
        state._run = torch.zeros(batch_size, dtype=torch.long, device=device)
        state._run_start = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        state._decided = torch.zeros(batch_size, dtype=torch.bool, device=device)
        state._z_history = []
        state._drift = torch.full((batch_size,), -1, dtype=torch.long, device=device)
        return state

    def observe(self, state: TerminatorState, kl_chunk: Tensor, valid_chunk: Tensor,
                teacher_logp_chunk: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Feed the next C positions of every row; returns (fired in this call (B,), cut (B,)).

        kl_chunk (B, C) float: d_t for positions state.pos .. state.pos + C - 1.
        valid_chunk (B, C) bool: whether the row generated that position (False after its EOS,
        or for rows that already ended). A stopped row ignores everything after its decision.
        teacher_logp_chunk (B, C) float: log q(y_t) of the sampled tokens; read (and required) only
        with the drift gate.
        """
        _check_chunk(state, kl_chunk, valid_chunk)
        if self.gate == "drift":
            _check_logp_chunk("TrapDetector(gate='drift')", teacher_logp_chunk, kl_chunk)
            log_drift = math.log(self.drift_prob)
        fired_now = torch.zeros_like(state.fired)
        for j in range(kl_chunk.shape[1]):
            t = state.pos
            live = valid_chunk[:, j] & ~state.fired  # (B,)
            if self.gate == "drift":
                _mark_drift(state, live, teacher_logp_chunk[:, j].double(), t, self.exempt, log_drift)
            slot = t % self.window
            state._ring[:, slot] = torch.where(live, kl_chunk[:, j].double(), 0.0)
            state._ring_valid[:, slot] = live
            state.pos += 1
            if (t + 1) % self.stride == 0 and t + 1 >= self.window:
                fired_now |= self._evaluate_window(state, t)
        return fired_now, state.cut

    def _evaluate_window(self, state: TerminatorState, t: int) -> Tensor:
        """Score the window ending at t for every row; returns the rows that fire (B,) bool."""
        evaluated = state._ring_valid.all(dim=-1)  # (B,) the whole window was generated
        z = state._ring.sum(dim=-1) / self.window  # (B,)  z_t = (1/W) sum_{i=t-W+1..t} d_i
        state._z_history.append(torch.where(evaluated, z, math.nan))  # masked, not indexed: no device sync
        start = t - self.window + 1
        if not state.active or start < self.exempt:
            return torch.zeros_like(evaluated)
        decide = evaluated & ~state._decided  # (B,)
        if self.gate == "drift":  # only windows that start after the row's drift token count
            decide &= (state._drift >= 0) & (state._drift < start)
        low = z < state.threshold  # (B,)
        run = torch.where(low, state._run + 1, 0)
        state._run = torch.where(decide, run, state._run)
        state._run_start = torch.where(decide & low & (run == 1), start, state._run_start)
        fire = decide & (state._run >= self.patience)  # (B,)
        state._decided |= fire
        state.would_cut = torch.where(fire, state._run_start, state.would_cut)
        if self.shadow:
            return torch.zeros_like(fire)
        state.fired |= fire
        state.cut = torch.where(fire, state._run_start, state.cut)
        return fire

    def end_batch(self, state: TerminatorState, step: int) -> None:
        """Push this batch's per-rollout minima (all processes) and update the running statistics."""
        minima = self._row_minima(state)  # (B,)
        minima = all_gather_cat(minima[minima < math.inf])
        self.buffer = torch.cat([self.buffer, minima])[-self.buffer_size :]
        if self.rule == "zscore":
            z = all_gather_cat(self._evaluated_z(state))
            if z.numel() > 0:
                mean, var = z.mean().item(), z.var(unbiased=False).item()
                if self.z_mean is None:
                    self.z_mean, self.z_var = mean, var
                else:  # exponential moving average with weight `ema` on the new batch
                    self.z_mean = (1 - self.ema) * self.z_mean + self.ema * mean
                    self.z_var = (1 - self.ema) * self.z_var + self.ema * var
        self.steps_done = step + 1

    def _z(self, state: TerminatorState) -> Tensor:
        """(windows, B) float64: every evaluation position's z, NaN where a row had no full window."""
        if not state._z_history:
            return state._ring.new_empty(0, state._ring.shape[0])
        return torch.stack(state._z_history)

    def _evaluated_z(self, state: TerminatorState) -> Tensor:
        """Every evaluated window value z of the batch, 1-D float64."""
        z = self._z(state)
        return z[~z.isnan()]

    def _row_minima(self, state: TerminatorState) -> Tensor:
        """(B,) m = min_t z_t over each row's evaluated windows, +inf for a row with none."""
        z = self._z(state)  # (windows, B)
        z = torch.cat([z, z.new_full((1, z.shape[1]), math.inf)])  # the extra +inf: rows with no window
        return torch.where(z.isnan(), math.inf, z).amin(dim=0)

    def summary(self, state: TerminatorState) -> dict[str, float]:
        """Plain floats for logging; keys with no value yet (no window, no threshold) are left out."""
        out = {
            "cut_rate": state.fired.float().mean().item(),
            "would_cut_rate": (state.would_cut >= 0).float().mean().item(),
            "active": float(state.active),
            "buffer": float(self.buffer.numel()),
        }
        if state.threshold is not None:
            out["threshold"] = state.threshold
        z = self._evaluated_z(state)
        if z.numel() > 0:
            out["z_mean"] = z.mean().item()
            minima = self._row_minima(state)
            out["z_min_mean"] = minima[minima < math.inf].mean().item()
        return out

    # -- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The adaptive statistics (not the hyperparameters, which come from the config)."""
        return {"rule": self.rule, "buffer": self.buffer.clone(), "steps_done": self.steps_done,
                "z_mean": self.z_mean, "z_var": self.z_var}

    def load_state_dict(self, d: dict) -> None:
        if d["rule"] != self.rule:
            raise ValueError(f"checkpoint was written by a {d['rule']!r} detector, this one uses rule "
                             f"{self.rule!r}; set rule={d['rule']!r} to resume it")
        # A smaller buffer_size on resume keeps the newest minima.
        self.buffer = d["buffer"].to(torch.float64).cpu()[-self.buffer_size :].clone()
        self.steps_done = int(d["steps_done"])
        self.z_mean, self.z_var = d["z_mean"], d["z_var"]


CONTROLS = ("DriftTerminator", "RandomTerminator", "NoTerminator")  # defined in kat.controls


def __getattr__(name: str):
    """The control terminators live in kat.controls (built on this module); importable from here too."""
    if name in CONTROLS:
        import kat.controls

        return getattr(kat.controls, name)
    raise AttributeError(f"module 'kat.detector' has no attribute {name!r}")


def terminators() -> dict:
    """Config name -> terminator class: 'kat' | 'drift' | 'random' | 'none'."""
    from kat.controls import DriftTerminator, NoTerminator, RandomTerminator

    return {"kat": TrapDetector, "drift": DriftTerminator, "random": RandomTerminator, "none": NoTerminator}


def make_terminator(name: str, **kw):
    """Build a terminator by its config name: 'kat' | 'drift' | 'random' | 'none'."""
    classes = terminators()
    if name not in classes:
        raise ValueError(f"termination must be one of {tuple(classes)}, got {name!r}")
    cls = classes[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(kw) - accepted)
    if unknown:
        raise ValueError(f"termination {name!r} does not take {unknown}; it accepts {sorted(accepted)}")
    return cls(**kw)
