"""Terminator decisions at the exact positions the semantics give, and a float64 reference detector."""

from __future__ import annotations

import io
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kat.terminators import (DriftTerminator, NoTerminator, RandomTerminator, TerminatorState, TrapDetector,
                             all_gather_cat, make_terminator)
from kat.rollout import STOP_RANDOM, STOP_TRAP

# -- helpers ----------------------------------------------------------------------------------


def armed(threshold: float = 0.5, **kw) -> TrapDetector:
    """A detector already past warm-up whose quantile threshold is exactly `threshold`."""
    det = TrapDetector(**{"min_buffer": 1, "warmup_steps": 0, **kw})
    det.load_state_dict({"rule": det.rule, "buffer": torch.full((1,), threshold, dtype=torch.float64),
                         "steps_done": 0, "z_mean": None, "z_var": None})
    return det


def feed(det, kl: torch.Tensor, valid: torch.Tensor, chunk: int | list[int], logp: torch.Tensor | None = None):
    """Run one batch through `det` in chunks; returns (state, index of the call each row fired in).
    `logp` (B, T): the teacher's log-prob of each sampled token, passed as observe() receives it."""
    state = det.start(kl.shape[0])
    fired_in = torch.full((kl.shape[0],), -1)
    sizes = iter(chunk) if isinstance(chunk, list) else None
    pos, call = 0, 0
    while pos < kl.shape[1]:
        c = next(sizes) if sizes is not None else chunk
        extra = {} if logp is None else {"teacher_logp_chunk": logp[:, pos : pos + c]}
        fired, cut = det.observe(state, kl[:, pos : pos + c], valid[:, pos : pos + c], **extra)
        assert torch.equal(cut[fired], state.cut[fired])
        fired_in[fired] = call
        pos, call = pos + c, call + 1
    assert state.pos == kl.shape[1]
    return state, fired_in


def ones_then_zeros(n_ones: int, total: int) -> torch.Tensor:
    return torch.tensor([[1.0] * n_ones + [0.0] * (total - n_ones)])


# -- TrapDetector: exact positions ------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_fires_at_start_of_first_low_window_for_any_chunk_size(chunk):
    # W = stride = 4, patience 2: windows end at 3, 7, 11, ...; d = 1 on 0..15, then 0.
    # Window ending 19 (covers 16..19) is the first low one, window ending 23 the second -> cut 16.
    det = armed(window=4, stride=4, patience=2, exempt=0)
    kl = ones_then_zeros(16, 40)
    state, fired_in = feed(det, kl, torch.ones_like(kl, dtype=torch.bool), chunk)
    assert state.fired.tolist() == [True] and state.cut.tolist() == [16] and state.would_cut.tolist() == [16]
    assert fired_in.item() == 23 // chunk  # returned by the call that observed position 23


def test_identical_decisions_across_chunkings_on_a_batch():
    g = torch.Generator().manual_seed(0)
    kl = torch.where(torch.rand(6, 97, generator=g) < 0.6, 0.05, 1.0) * torch.rand(6, 97, generator=g)
    valid = torch.arange(97)[None] < torch.tensor([[97], [50], [13], [80], [96], [70]])
    results = []
    for chunk in (1, 3, 7, 64, [5, 1, 30, 2, 64]):
        det = armed(threshold=0.3, window=8, stride=4, patience=2, exempt=5)
        state, _ = feed(det, kl, valid, chunk)
        results.append((state.fired.tolist(), state.cut.tolist(), det._row_minima(state).tolist()))
    assert any(results[0][0])  # the stream does trigger something
    assert all(r == results[0] for r in results)


def test_exempt_windows_never_count():
    # d = 0 everywhere; windows starting at 0 and 4 are exempt (exempt = 8): the run starts at 8.
    det = armed(window=4, stride=4, patience=2, exempt=8)
    kl = torch.zeros(1, 32)
    state, _ = feed(det, kl, torch.ones_like(kl, dtype=torch.bool), 5)
    assert state.cut.tolist() == [8]
    # exempt not a multiple of the stride: the first window starting at or after 10 starts at 12.
    det = armed(window=4, stride=4, patience=2, exempt=10)
    state, _ = feed(det, kl, torch.ones_like(kl, dtype=torch.bool), 5)
    assert state.cut.tolist() == [12]


def test_overlapping_windows_stride_below_window():
    # W = 4, stride = 2: windows end at 3, 5, 7, 9, 11, 13; d = 1 on 0..9 then 0.
    # z(ending 9) = 1, z(11) = 0.5 (covers 8..11), z(13) = 0. Threshold 0.6, patience 2:
    # the run starts with the half-low window 8..11 and is confirmed at 13 -> cut 8.
    det = armed(threshold=0.6, window=4, stride=2, patience=2, exempt=0)
    kl = ones_then_zeros(10, 20)
    state, fired_in = feed(det, kl, torch.ones_like(kl, dtype=torch.bool), 1)
    assert state.cut.tolist() == [8] and fired_in.item() == 13


def test_patience_resets_on_a_high_window():
    # W = stride = 2, patience 3; windows: low low HIGH low low low -> fires at the 6th window,
    # cut at the start of the 4th (position 6). z == threshold counts as high (z < s is low).
    det = armed(threshold=0.5, window=2, stride=2, patience=3, exempt=0)
    kl = torch.tensor([[0, 0, 0, 0, 0.5, 0.5, 0, 0, 0, 0, 0, 0, 0, 0]])
    state, fired_in = feed(det, kl, torch.ones_like(kl, dtype=torch.bool), 1)
    assert state.cut.tolist() == [6] and fired_in.item() == 11


def test_row_ending_mid_window_is_not_evaluated():
    # Row 0 stops after 22 tokens: its window 20..23 is incomplete, so only window 16..19 is low.
    # Row 1 generated 24 tokens and fires at 23. Both rows keep the minimum of their windows.
    det = armed(window=4, stride=4, patience=2, exempt=0)
    kl = ones_then_zeros(16, 32).repeat(2, 1)
    valid = torch.arange(32)[None] < torch.tensor([[22], [24]])
    state, _ = feed(det, kl, valid, 3)
    assert state.fired.tolist() == [False, True] and state.cut.tolist() == [-1, 16]
    assert det._row_minima(state).tolist() == [0.0, 0.0]
    assert det._evaluated_z(state).numel() == 6 + 5  # row 0 lacks window 20..23


def test_fired_row_ignores_later_tokens_and_is_done():
    det = armed(window=4, stride=4, patience=2, exempt=0)
    kl = ones_then_zeros(16, 64)
    state, _ = feed(det, kl, torch.ones_like(kl, dtype=torch.bool), 64)  # valid after the fire, too
    assert state.cut.tolist() == [16]
    assert det._evaluated_z(state).numel() == 6  # windows ending 3..23, none after the fire


def test_shadow_records_but_never_fires_and_keeps_statistics():
    det = armed(window=4, stride=4, patience=2, exempt=0, shadow=True)
    kl = ones_then_zeros(16, 40)
    kl[0, 32:] = -1.0  # a lower stretch after the would-be cut still feeds the statistics
    state = det.start(1)
    for pos in range(0, 40, 7):
        fired, cut = det.observe(state, kl[:, pos : pos + 7], torch.ones(1, min(7, 40 - pos), dtype=torch.bool))
        assert not fired.any()
    assert state.fired.tolist() == [False] and state.cut.tolist() == [-1]
    assert state.would_cut.tolist() == [16]
    assert det._row_minima(state).tolist() == [-1.0]
    det.end_batch(state, 0)
    assert det.buffer.tolist() == [0.5, -1.0]


def test_warmup_needs_min_buffer_and_warmup_steps():
    # Each batch contributes one minimum (0.0). min_buffer 3, warmup_steps 2.
    det = TrapDetector(window=4, stride=4, patience=1, exempt=0, min_buffer=3, warmup_steps=2, eta=0.5)
    kl = torch.tensor([[1.0] * 4 + [0.0] * 4])  # windows: z = 1 then z = 0
    valid = torch.ones_like(kl, dtype=torch.bool)
    history = []
    for step in range(5):
        state, _ = feed(det, kl, valid, 8)
        history.append((state.active, det.buffer.numel(), state.fired.item()))
        det.end_batch(state, step)
    # Inactive until the buffer holds 3 minima (after 3 batches). Every minimum is 0.0, so then
    # s = 0 and z = 0 is not below it: no fire even once active.
    assert [h[0] for h in history] == [False, False, False, True, True]
    assert [h[2] for h in history] == [False] * 5
    # With the buffer full and step >= 2, a stream below the threshold fires at once.
    det.buffer = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    state, _ = feed(det, kl, valid, 8)
    assert state.active and state.cut.tolist() == [4]
    # steps_done gates on its own: a full buffer at step 1 is not enough.
    det2 = TrapDetector(window=4, stride=4, patience=1, exempt=0, min_buffer=3, warmup_steps=2)
    det2.load_state_dict({"rule": "quantile", "buffer": torch.full((3,), 0.5, dtype=torch.float64),
                          "steps_done": 1, "z_mean": None, "z_var": None})
    assert not det2.active and not det2.start(1).active
    det2.end_batch(det2.start(1), 1)  # an empty batch still counts as a step
    assert det2.active


def test_threshold_is_numpy_linear_quantile():
    rng = np.random.default_rng(0)
    for eta, n in [(0.3, 4096), (0.1, 7), (0.5, 2), (0.25, 513)]:
        values = rng.standard_normal(n)
        det = TrapDetector(eta=eta, buffer_size=n, min_buffer=0)
        det.buffer = torch.from_numpy(values)
        assert det.threshold == pytest.approx(np.quantile(values, 1 - eta), rel=0, abs=1e-12)


def test_buffer_is_fifo_of_per_row_minima():
    det = TrapDetector(window=2, stride=2, exempt=0, buffer_size=5, min_buffer=5)
    pushed = []
    for step in range(4):
        kl = torch.rand(3, 6, generator=torch.Generator().manual_seed(step))
        valid = torch.ones_like(kl, dtype=torch.bool)
        valid[2, 1:] = False  # row 2 never completes a window: it pushes nothing
        state, _ = feed(det, kl, valid, 4)
        det.end_batch(state, step)
        windows = kl[:2].double().reshape(2, 3, 2).mean(-1)  # (rows 0-1, 3 windows)
        pushed += windows.min(-1).values.tolist()
        assert det.buffer.tolist() == pytest.approx(pushed[-5:], abs=1e-15)
    assert det.buffer.numel() == 5 and det.steps_done == 4


def test_zscore_rule_against_hand_computation():
    det = TrapDetector(rule="zscore", window=2, stride=2, patience=2, exempt=0, min_buffer=1,
                       warmup_steps=0, kappa=0.5, ema=0.25)
    g = torch.Generator().manual_seed(3)
    batches = [torch.rand(4, 8, generator=g) + 1.0 for _ in range(2)]
    mean = var = None
    for step, kl in enumerate(batches):
        valid = torch.ones_like(kl, dtype=torch.bool)
        valid[0, 5:] = False  # row 0 has two complete windows only
        state, _ = feed(det, kl, valid, 3)
        det.end_batch(state, step)
        z = [np.mean(kl[b, i : i + 2].double().numpy()) for b in range(4) for i in range(0, 8, 2)
             if bool(valid[b, i + 1])]
        if mean is None:
            mean, var = np.mean(z), np.var(z)
        else:
            mean, var = 0.75 * mean + 0.25 * np.mean(z), 0.75 * var + 0.25 * np.var(z)
    s = mean - 0.5 * math.sqrt(var)
    assert det.threshold == pytest.approx(s, rel=1e-12)
    assert det.buffer.numel() == 8  # the minima buffer is still filled
    # A stream just below s for two windows fires; just above does not.
    for offset, expect in ((-1e-6, True), (1e-6, False)):
        kl = torch.full((1, 8), s + offset, dtype=torch.float64)
        state, _ = feed(det, kl, torch.ones(1, 8, dtype=torch.bool), 8)
        assert state.fired.item() is expect and state.cut.item() == (0 if expect else -1)


def test_state_dict_round_trip_continues_exactly():
    def make():
        return TrapDetector(window=4, stride=2, patience=2, exempt=2, eta=0.3, buffer_size=7,
                            min_buffer=3, warmup_steps=2)

    g = torch.Generator().manual_seed(5)
    batches = [torch.where(torch.rand(5, 30, generator=g) < 0.5, 0.1, 1.0) * torch.rand(5, 30, generator=g)
               for _ in range(8)]
    valid = torch.ones(5, 30, dtype=torch.bool)

    def run(det, kls, first_step):
        out = []
        for i, kl in enumerate(kls):
            state, _ = feed(det, kl, valid, 4)
            out.append(state.cut.tolist())
            det.end_batch(state, first_step + i)
        return out

    straight = make()
    expected = run(straight, batches, 0)
    first = make()
    got = run(first, batches[:4], 0)
    blob = io.BytesIO()
    torch.save(first.state_dict(), blob)
    blob.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(blob))
    assert resumed.threshold == first.threshold and resumed.active == first.active
    got += run(resumed, batches[4:], 4)
    assert got == expected and any(c >= 0 for cuts in got for c in cuts)
    assert torch.equal(resumed.buffer, straight.buffer) and resumed.steps_done == 8


def test_summary_and_interface():
    det = armed(window=4, stride=4, patience=2, exempt=0)
    kl = ones_then_zeros(16, 24).repeat(2, 1)
    kl[1] = 1.0
    state, _ = feed(det, kl, torch.ones_like(kl, dtype=torch.bool), 8)
    summary = det.summary(state)
    assert summary["cut_rate"] == 0.5 and summary["threshold"] == 0.5 and summary["active"] == 1.0
    assert summary["z_min_mean"] == 0.5 and all(isinstance(v, float) for v in summary.values())
    assert det.needs_kl and det.stop_code == STOP_TRAP and isinstance(state, TerminatorState)


def test_invalid_arguments_name_the_field():
    with pytest.raises(ValueError, match="rule"):
        TrapDetector(rule="median")
    with pytest.raises(ValueError, match="eta"):
        TrapDetector(eta=1.0)
    with pytest.raises(ValueError, match="min_buffer"):
        TrapDetector(buffer_size=10, min_buffer=11)
    with pytest.raises(ValueError, match="termination"):
        make_terminator("trap")
    with pytest.raises(ValueError, match="target_length"):
        make_terminator("none", target_length=3)
    with pytest.raises(ValueError, match="kl_chunk"):
        det = TrapDetector()
        det.observe(det.start(2), torch.zeros(3, 4), torch.ones(3, 4, dtype=torch.bool))


# -- TrapDetector against a float64 reference -------------------------------------------------


class ReferenceDetector:
    """The quantile rule written position by position in plain Python floats; with `drift_prob`
    the drift gate: only windows starting after the first position >= exempt whose teacher
    probability is below drift_prob count."""

    def __init__(self, window, stride, patience, exempt, eta, buffer_size, min_buffer, warmup_steps,
                 drift_prob=None):
        self.w, self.stride, self.patience, self.exempt, self.eta = window, stride, patience, exempt, eta
        self.buffer_size, self.min_buffer, self.warmup_steps = buffer_size, min_buffer, warmup_steps
        self.drift_prob = drift_prob
        self.buffer: list[float] = []
        self.steps_done = 0

    def batch(self, rows: list[list[float]], step: int, probs: list[list[float]] | None = None) -> list[int]:
        """rows: each row's generated d values (probs: the teacher's probability of each sampled
        token); returns each row's cut (-1 if none)."""
        active = len(self.buffer) >= max(self.min_buffer, 1) and self.steps_done >= self.warmup_steps
        s = float(np.quantile(self.buffer, 1 - self.eta)) if self.buffer else None
        cuts = []
        for i, d in enumerate(rows):
            drift = None
            if self.drift_prob is not None:
                drift = next((t for t, q in enumerate(probs[i]) if t >= self.exempt and q < self.drift_prob), math.inf)
            zs, run, run_start, cut = [], 0, -1, -1
            for t in range(len(d)):
                if (t + 1) % self.stride != 0 or t + 1 < self.w:
                    continue
                z = sum(d[t - self.w + 1 : t + 1]) / self.w
                zs.append(z)
                if not active or t - self.w + 1 < self.exempt:
                    continue
                if drift is not None and not t - self.w + 1 > drift:
                    continue
                if z < s:
                    run += 1
                    run_start = t - self.w + 1 if run == 1 else run_start
                    if run >= self.patience:
                        cut = run_start
                        break  # the rollout stops here
                else:
                    run = 0
            cuts.append(cut)
            if zs:
                self.buffer.append(min(zs))
        self.buffer = self.buffer[-self.buffer_size :]
        self.steps_done = step + 1
        return cuts


@pytest.mark.parametrize("seed", range(8))
def test_matches_float64_reference_on_random_streams(seed):
    rng = random.Random(seed)
    cfg = dict(window=rng.choice([2, 4, 6]), patience=rng.choice([1, 2, 3]), exempt=rng.choice([0, 3, 8]),
               eta=rng.choice([0.1, 0.3, 0.6]), buffer_size=rng.choice([4, 9, 50]), warmup_steps=rng.choice([0, 2]))
    cfg["stride"] = rng.choice([1, 2, cfg["window"]])
    cfg["min_buffer"] = rng.randint(1, min(cfg["buffer_size"], 10))
    det, ref = TrapDetector(**cfg), ReferenceDetector(**cfg)
    g = torch.Generator().manual_seed(seed)
    n_cuts = 0
    for step in range(12):
        batch, total = rng.randint(1, 8), rng.randint(1, 40)
        # Some rollouts fall into a low-KL stretch from a random position on, as trapped ones do.
        trap_start = torch.randint(0, 2 * total, (batch, 1), generator=g)
        scale = torch.where(torch.arange(total) >= trap_start, 0.05, 1.0)  # (batch, total)
        kl = torch.rand(batch, total, generator=g) * scale
        lengths = [rng.randint(0, total) for _ in range(batch)]
        valid = torch.arange(total)[None] < torch.tensor(lengths)[:, None]
        sizes = [rng.randint(1, 9) for _ in range(total)]
        state, _ = feed(det, kl, valid, sizes)
        want = ref.batch([kl[b, : lengths[b]].double().tolist() for b in range(batch)], step)
        assert state.cut.tolist() == want, (step, cfg)
        det.end_batch(state, step)
        assert det.buffer.tolist() == pytest.approx(ref.buffer, abs=1e-12)
        n_cuts += sum(c >= 0 for c in want)
    assert n_cuts > 0  # these settings do reach active decisions


# -- the drift gate and the cut-after-drift contrast -------------------------------------------

LOW, HIGH = math.log(0.001), math.log(0.9)  # log q(y_t) of a drift token and of an ordinary one


def teacher_logp(total: int, drifts: list[int]) -> torch.Tensor:
    """(1, total) log-probs: an ordinary token everywhere, a drift token at the `drifts` positions."""
    logp = torch.full((1, total), HIGH)
    logp[0, drifts] = LOW
    return logp


def test_gate_never_cuts_flat_low_kl_without_a_drift():
    kl, valid = torch.zeros(1, 40), torch.ones(1, 40, dtype=torch.bool)
    plain = armed(window=4, stride=4, patience=2, exempt=8)
    gated = armed(window=4, stride=4, patience=2, exempt=8, gate="drift", drift_prob=0.02)
    assert feed(plain, kl, valid, 5)[0].cut.tolist() == [8]  # the paper's rule cuts a healthy flat row
    assert feed(gated, kl, valid, 5, teacher_logp(40, []))[0].cut.tolist() == [-1]
    # a drift at 20: windows start at 0, 4, ...; the first starting after 20 is 24, confirmed at 28
    state, fired_in = feed(gated, kl, valid, 5, teacher_logp(40, [20]))
    assert state.cut.tolist() == [24] and fired_in.item() == 31 // 5
    assert state._drift.tolist() == [20]


def test_gate_drift_before_exempt_does_not_count():
    det = armed(window=4, stride=4, patience=2, exempt=8, gate="drift")
    kl, valid = torch.zeros(1, 40), torch.ones(1, 40, dtype=torch.bool)
    assert feed(det, kl, valid, 3, teacher_logp(40, [5]))[0].cut.tolist() == [-1]
    state, _ = feed(det, kl, valid, 3, teacher_logp(40, [5, 12, 30]))  # the first drift at/after 8 counts
    assert state.cut.tolist() == [16] and state._drift.tolist() == [12]


def test_gate_window_holding_the_drift_token_does_not_count():
    # W = 4, stride 2: windows start at 0, 2, 4, ...; a drift at 17 lies in the window starting at
    # 16, so the first counting window starts at 18: the drift token stays in the loss.
    det = armed(window=4, stride=2, patience=2, exempt=0, gate="drift")
    kl, valid = torch.zeros(1, 30), torch.ones(1, 30, dtype=torch.bool)
    state, _ = feed(det, kl, valid, 1, teacher_logp(30, [17]))
    assert state.cut.tolist() == [18]


def test_gate_cuts_at_the_start_of_the_low_run_not_at_the_drift():
    det = armed(window=4, stride=4, patience=2, exempt=0, gate="drift")
    kl = ones_then_zeros(32, 48)  # high until 31, low from 32
    state, _ = feed(det, kl, torch.ones_like(kl, dtype=torch.bool), 7, teacher_logp(48, [10]))
    assert state.cut.tolist() == [32]


def test_gate_needs_teacher_logp_and_checks_its_shape():
    det = armed(gate="drift")
    assert det.needs_teacher_logp and not armed().needs_teacher_logp
    with pytest.raises(ValueError, match="teacher_logp_chunk"):
        det.observe(det.start(2), torch.zeros(2, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="teacher_logp_chunk"):
        det.observe(det.start(2), torch.zeros(2, 4), torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="gate"):
        TrapDetector(gate="early")
    with pytest.raises(ValueError, match="drift_prob"):
        TrapDetector(gate="drift", drift_prob=0.0)


@pytest.mark.parametrize("seed", range(8))
def test_drift_gate_matches_float64_reference_on_random_streams(seed):
    rng = random.Random(100 + seed)
    cfg = dict(window=rng.choice([2, 4, 6]), patience=rng.choice([1, 2, 3]), exempt=rng.choice([0, 3, 8]),
               eta=rng.choice([0.3, 0.6]), buffer_size=rng.choice([9, 50]), warmup_steps=rng.choice([0, 2]))
    cfg["stride"] = rng.choice([1, 2, cfg["window"]])
    cfg["min_buffer"] = rng.randint(1, 8)
    drift_prob = rng.choice([0.02, 0.1])
    det = TrapDetector(**cfg, gate="drift", drift_prob=drift_prob)
    plain = TrapDetector(**cfg)  # the paper's rule on the same streams, for the vetoed cuts
    shadows = [TrapDetector(**cfg, shadow=True), TrapDetector(**cfg, shadow=True, gate="drift")]
    ref = ReferenceDetector(**cfg, drift_prob=drift_prob)
    g = torch.Generator().manual_seed(seed)
    n_cuts = n_plain_only = 0
    for step in range(16):
        batch, total = rng.randint(1, 8), rng.randint(8, 48)
        trap_start = torch.randint(0, 2 * total, (batch, 1), generator=g)
        scale = torch.where(torch.arange(total) >= trap_start, 0.05, 1.0)  # (batch, total)
        kl = torch.rand(batch, total, generator=g) * scale
        # a drift token is rare, and likelier just before the low stretch, as before a trap
        p_drift = torch.where((torch.arange(total) - trap_start).abs() <= 2, 0.3, 0.03)  # (batch, total)
        u = torch.rand(batch, total, generator=g)
        logp = torch.where(u < p_drift, torch.log(u * 0.01 + 1e-6), torch.log(0.3 + 0.7 * u)).float()
        lengths = [rng.randint(0, total) for _ in range(batch)]
        valid = torch.arange(total)[None] < torch.tensor(lengths)[:, None]
        sizes = [rng.randint(1, 9) for _ in range(total)]
        state, _ = feed(det, kl, valid, sizes, logp)
        plain_state, _ = feed(plain, kl, valid, sizes)
        want = ref.batch([kl[b, : lengths[b]].double().tolist() for b in range(batch)], step,
                         [logp[b, : lengths[b]].double().exp().tolist() for b in range(batch)])
        assert state.cut.tolist() == want, (step, cfg)
        det.end_batch(state, step)
        plain.end_batch(plain_state, step)
        assert det.buffer.tolist() == pytest.approx(ref.buffer, abs=1e-12)
        # in shadow mode the gate changes decisions only: both hold the same buffer and threshold
        shadow_states = [feed(d, kl, valid, sizes, logp if d.gate == "drift" else None)[0] for d in shadows]
        for d, st in zip(shadows, shadow_states):
            d.end_batch(st, step)
        assert torch.equal(shadows[0].buffer, shadows[1].buffer)
        n_cuts += sum(c >= 0 for c in want)
        n_plain_only += sum(c < 0 <= p for c, p in zip(want, plain_state.cut.tolist()))
    assert n_cuts > 0 and n_plain_only > 0  # the gate both allows and vetoes cuts here


@pytest.mark.parametrize("chunk", [1, 3, 16, [2, 7, 1, 30]])
def test_drift_terminator_cuts_right_after_the_first_drift(chunk):
    # row 0 drifts at 9 and 20: cut 10; row 1 drifts only before exempt: never cut; row 2 drifts
    # at its last generated token (11): cut 12, which removes nothing; row 3 never drifts
    logp = torch.full((4, 24), HIGH)
    logp[0, [9, 20]] = LOW
    logp[1, 3] = LOW
    logp[2, 11] = LOW
    valid = torch.arange(24)[None] < torch.tensor([[24], [24], [12], [24]])
    term = DriftTerminator(exempt=5, drift_prob=0.02, warmup_steps=0)
    state, fired_in = feed(term, torch.rand(4, 24), valid, chunk, logp)
    assert state.cut.tolist() == [10, -1, 12, -1] and state.fired.tolist() == [True, False, True, False]
    assert state.would_cut.tolist() == state.cut.tolist()
    if chunk == 3:
        assert fired_in.tolist() == [9 // 3, -1, 11 // 3, -1]
    assert term.needs_kl and term.needs_teacher_logp and term.stop_code == STOP_TRAP and term.threshold is None


def test_drift_terminator_warmup_shadow_and_state():
    logp = teacher_logp(16, [6])
    valid = torch.ones(1, 16, dtype=torch.bool)
    term = make_terminator("drift", exempt=2, drift_prob=0.02, warmup_steps=2)
    assert isinstance(term, DriftTerminator)
    for step in range(3):
        state, _ = feed(term, torch.zeros(1, 16), valid, 4, logp)
        assert state.cut.tolist() == ([-1] if step < 2 else [7]) and state.active is (step >= 2)
        term.end_batch(state, step)
    resumed = DriftTerminator(exempt=2, warmup_steps=2)
    resumed.load_state_dict(term.state_dict())
    assert resumed.active and resumed.steps_done == 3
    shadow = DriftTerminator(exempt=2, warmup_steps=0, shadow=True)
    state, fired_in = feed(shadow, torch.zeros(1, 16), valid, 4, logp)
    assert state.would_cut.tolist() == [7] and state.cut.tolist() == [-1] and fired_in.tolist() == [-1]
    assert shadow.summary(state) == {"cut_rate": 0.0, "would_cut_rate": 1.0, "active": 1.0}
    with pytest.raises(ValueError, match="teacher_logp_chunk"):
        shadow.observe(shadow.start(1), torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool))


# -- RandomTerminator and NoTerminator --------------------------------------------------------


def test_random_terminator_reaches_target_mean_length():
    term = RandomTerminator(target_length=120, exempt=20, max_new_tokens=300, seed=0)
    g = torch.Generator().manual_seed(1)
    means = []
    for step in range(150):
        natural = torch.randint(40, 301, (64,), generator=g)  # rows also end by EOS or the length cap
        valid = torch.arange(300)[None] < natural[:, None]
        state, _ = feed(term, torch.zeros(64, 300), valid, 16)
        assert (state.cut[state.fired] >= 20).all() and (state.cut[state.fired] < natural[state.fired]).all()
        means.append(term.lengths(state).float().mean().item())
        term.end_batch(state, step)
    assert np.mean(means[50:]) == pytest.approx(120, rel=0.03)
    assert term.stop_code == STOP_RANDOM and not term.needs_kl


def test_random_terminator_initial_hazard_matches_truncated_geometric():
    term = RandomTerminator(target_length=60, exempt=10, max_new_tokens=100, seed=0)
    state = term.start(200_000)
    lengths = (state._planned.clamp(max=100)).double()  # rows that always run to max_new_tokens
    assert lengths.mean().item() == pytest.approx(60, rel=0.01)
    assert RandomTerminator(target_length=51, exempt=1).hazard == pytest.approx(1 / 51)


def test_random_terminator_chunking_and_state_dict():
    valid = torch.ones(8, 200, dtype=torch.bool)
    a, b = RandomTerminator(target_length=50, seed=3), RandomTerminator(target_length=50, seed=3)
    for step in range(3):
        cut_a = feed(a, torch.zeros(8, 200), valid, 1)[0].cut
        state_b, _ = feed(b, torch.zeros(8, 200), valid, 33)
        assert torch.equal(cut_a, state_b.cut)
        a.end_batch(feed(a, torch.zeros(8, 200), valid, 200)[0], step)
        b.end_batch(feed(b, torch.zeros(8, 200), valid, 200)[0], step)
    c = RandomTerminator(target_length=50, seed=99)
    c.load_state_dict(a.state_dict())
    assert c.hazard == a.hazard and torch.equal(feed(c, torch.zeros(8, 200), valid, 7)[0].cut,
                                                feed(a, torch.zeros(8, 200), valid, 7)[0].cut)


def test_no_terminator_never_fires():
    term = make_terminator("none")
    assert isinstance(term, NoTerminator)
    state = term.start(3)
    fired, cut = term.observe(state, torch.zeros(3, 5), torch.ones(3, 5, dtype=torch.bool))
    assert not fired.any() and cut.tolist() == [-1, -1, -1] and state.pos == 5
    assert not term.needs_kl and not term.active and term.threshold is None
    assert isinstance(make_terminator("kat", window=8, stride=8), TrapDetector)


# -- several processes ------------------------------------------------------------------------


def _gather_worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    det = TrapDetector(rule="zscore", window=2, stride=2, exempt=0, min_buffer=1, warmup_steps=0)
    kl = torch.arange(4 * (rank + 1) * 2, dtype=torch.float32).reshape(-1, 4) / 10 + rank  # rank r: 2r+2 rows
    valid = torch.ones_like(kl, dtype=torch.bool)
    valid[0, 1:] = False  # one row per rank pushes nothing
    state, _ = feed(det, kl, valid, 3)
    det.end_batch(state, 0)
    out[rank] = (det.buffer.tolist(), det.threshold, all_gather_cat(torch.arange(rank + 1)).tolist())
    dist.destroy_process_group()


def test_buffer_gathered_across_processes():
    port = 29500 + os.getpid() % 1000
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_gather_worker, args=(2, port, out), nprocs=2, start_method="fork")
        out = dict(out)
    # rank 0, row 1: windows 0.45 and 0.65 -> 0.45; rank 1, rows 1..3 (offset +1): 1.45, 1.85, 2.25.
    want = [0.45, 1.45, 1.85, 2.25]
    for rank in (0, 1):
        buffer, threshold, counts = out[rank]
        assert buffer == pytest.approx(want, abs=1e-6)
        assert threshold == out[0][1]
        assert counts == [0, 0, 1]
