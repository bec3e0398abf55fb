"""The drift gate and its contrast inside the sampler and the loop, the normalisation control, and the
mechanism measurement (gradient split of the tokens each rule would cut) against float64 references."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from experiments.mechanism import gradient_split, mechanism_run, mechanism_summary, segment_masks
from experiments.shadow import fixed_threshold_detector, replay_cuts
from kat.config import Config, ConfigError, load_config
from kat.terminators import DriftTerminator
from kat.terminators import TrapDetector
from kat.plot import read_jsonl

from conftest import tiny_models


def tiny_argv(world: dict, **kw) -> list[str]:
    over = dict(teacher=world["teacher"], student=world["student"], train_data=world["train"],
                eval_data=world["test"], eval_limit=3, eval_k=2, steps=2, batch_size=2, samples_per_prompt=2,
                max_new_tokens=16, chunk=4, window=4, stride=2, patience=1, exempt=2, eta=0.5, min_buffer=4,
                warmup_steps=1, lr=3e-3, n_traces=2, plot=False)
    over.update(kw)
    return [x for k, v in over.items() for x in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def models(tiny_world):
    return tiny_models(tiny_world, ("37+48-19+25", "5+6", "99-12+1-40+3", "12+7"), repeat=3)


def draw(models, terminator, chunk=4, max_new_tokens=24, seed=0):
    from kat.sampler import sample

    student, teacher, ids, mask = models
    return sample(student, teacher, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=2, pad_token_id=0,
                  chunk=chunk, terminator=terminator, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# The gate inside the sampler

def test_sampler_feeds_the_gate_the_rollouts_teacher_logp(models):
    """Cuts taken online equal a replay of the finished rollout's d_t and log q(y_t); the drift the
    gate found is the first position >= exempt with q < drift_prob; the cut leaves the loss."""
    cfg = Config(window=4, stride=2, patience=1, exempt=2, chunk=4, drift_prob=0.3)
    online = fixed_threshold_detector(1.0, cfg, gate="drift")
    online.shadow = False  # cutting, so rows stop
    rollout, state = draw(models, online)
    assert state.fired.any() and not state.fired.all()
    logq = rollout.teacher_logp.double()
    for b in range(rollout.stop.numel()):
        n = int(rollout.completion_mask[b].sum())
        drifts = [t for t in range(2, n) if logq[b, t] < math.log(0.3)]
        assert int(state._drift[b]) == (drifts[0] if drifts else -1)
        if state.fired[b]:
            assert int(rollout.cut[b]) > drifts[0] and not rollout.loss_mask[b, int(rollout.cut[b]):].any()
    replay = fixed_threshold_detector(1.0, cfg, gate="drift")
    replay.shadow = False
    st = replay.start(rollout.stop.numel())
    for t0 in range(0, rollout.kl.shape[1], 3):  # another chunking: the same decisions
        replay.observe(st, rollout.kl[:, t0:t0 + 3], rollout.completion_mask[:, t0:t0 + 3],
                       teacher_logp_chunk=rollout.teacher_logp[:, t0:t0 + 3])
    assert torch.equal(st.cut, state.cut)


def test_drift_terminator_in_the_sampler_cuts_after_the_first_unlikely_token(models):
    term = DriftTerminator(exempt=3, drift_prob=0.2, warmup_steps=0)
    rollout, state = draw(models, term, chunk=1)  # C = 1: the row stops right at its cut
    logq = rollout.teacher_logp.double()
    assert state.fired.any()
    for b in range(rollout.stop.numel()):
        n = int(rollout.completion_mask[b].sum())
        drifts = [t for t in range(3, n) if logq[b, t] < math.log(0.2)]
        if drifts:
            assert int(rollout.cut[b]) == drifts[0] + 1 == n  # stopped right after the drift token
            assert rollout.loss_mask[b, drifts[0]] and int(rollout.loss_mask[b].sum()) == drifts[0] + 1
        else:
            assert not state.fired[b]


def test_replay_of_the_paper_rule_equals_the_recorded_shadow_cut(models):
    cfg = Config(window=4, stride=2, patience=2, exempt=2, chunk=4, drift_prob=0.2)
    rollout, state = draw(models, fixed_threshold_detector(0.8, cfg), max_new_tokens=32)
    replayed = replay_cuts(rollout, 0.8, cfg, gates=("none", "drift"))
    assert torch.equal(replayed["cut_none"], rollout.shadow_cut) and (rollout.shadow_cut >= 0).any()
    # the gated rule cuts a subset of the rollouts, never before the drift, never earlier than the paper's
    gated, drift = replayed["cut_gated"], replayed["drift"]
    assert ((gated < 0) | ((drift >= 0) & (gated > drift))).all()
    assert ((gated < 0) | (gated >= rollout.shadow_cut)).all()
    assert torch.equal(replayed["cut_drift"], torch.where(drift >= 0, drift + 1, -1))
    # no threshold yet: only the cut-after-drift rule, which needs none
    assert set(replay_cuts(rollout, None, cfg)) == {"cut_drift", "drift"}
    # other drift thresholds: the config's own equals the default replay; a stricter one drifts later
    swept = replay_cuts(rollout, 0.8, cfg, drift_probs=(0.2, 0.01))
    assert torch.equal(swept["cut_gated@0.2"], gated) and torch.equal(swept["drift@0.2"], drift)
    strict = swept["drift@0.01"]
    assert ((strict < 0) | ((drift >= 0) & (strict >= drift))).all()
    assert ((swept["cut_gated@0.01"] < 0) | (gated >= 0)).all()  # a stricter gate vetoes more, allows no new cut


# ---------------------------------------------------------------------------------------------
# The loop: gate, contrast and normalisation control from the config

def test_config_fields_reach_the_terminators():
    from kat.train import build_terminator

    det = build_terminator(Config(gate="drift", drift_prob=0.05))
    assert isinstance(det, TrapDetector) and det.gate == "drift" and det.drift_prob == 0.05
    term = build_terminator(Config(termination="drift", exempt=4, drift_prob=0.1, warmup_steps=3))
    assert isinstance(term, DriftTerminator) and (term.exempt, term.drift_prob, term.warmup_steps) == (4, 0.1, 3)
    with pytest.raises(ConfigError, match="^gate: "):
        Config(gate="yes")
    with pytest.raises(ConfigError, match="^norm_from: "):
        Config(norm_from="/nonexistent/metrics.jsonl")


@pytest.mark.parametrize("extra", [["--termination", "drift", "--drift_prob", "0.3"],
                                   ["--gate", "drift", "--drift_prob", "0.3", "--eta", "0.9"]])
def test_training_with_the_gate_or_the_contrast_cuts_after_warmup(tiny_world, tmp_path, extra):
    from kat.train import train

    cfg = load_config(tiny_argv(tiny_world, steps=3, eval_data="", output_dir=tmp_path / "run") + extra)
    train(cfg)
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["cut_rate"] for r in rows][0] == 0.0  # warm-up step
    assert any(r["cut_rate"] > 0 for r in rows[1:]) and all(r["kept_length"] <= r["mean_length"] for r in rows)


def test_scaled_backward_divides_the_loss_by_the_matched_count(models):
    from accelerate import Accelerator

    from kat.learner import learn
    from kat.learner import ScaledBackward

    student, teacher = models[0], models[1]
    rollout, _ = draw(models, None)

    class Recorder(torch.optim.SGD):  # keeps the gradient each step applies
        def step(self, closure=None):
            self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]

    steps = []
    for scale in (1.0, 0.37):
        s = copy.deepcopy(student)
        opt = Recorder(s.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        stats = learn(s, rollout, opt, sched, ScaledBackward(Accelerator(cpu=True), scale), kind="full",
                      micro_batch_size=5, teacher=teacher, max_grad_norm=None)
        steps.append((stats, opt.grads))
    (plain, g1), (scaled, g2) = steps
    assert scaled["loss"] == pytest.approx(plain["loss"], rel=1e-6)  # the logged loss is this run's own mean
    assert scaled["grad_norm"] == pytest.approx(0.37 * plain["grad_norm"], rel=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, 0.37 * a, rtol=1e-5, atol=1e-9)


def test_norm_from_own_counts_reproduces_the_run(tiny_world, tmp_path):
    """An OPD run normalised by its own logged kept-token counts is the same run (scale 1), and a
    run normalised by a KAT run's counts logs the scale it used through its gradient norm."""
    from kat.learner import matched_kept_tokens
    from kat.train import train

    base = tiny_argv(tiny_world, steps=3, eval_data="", termination="none")
    train(load_config(base + ["--output_dir", str(tmp_path / "opd")]))
    metrics = str(tmp_path / "opd" / "metrics.jsonl")
    train(load_config(base + ["--output_dir", str(tmp_path / "norm"), "--norm_from", metrics]))
    a = [r for r in read_jsonl(metrics) if "loss" in r]
    b = [r for r in read_jsonl(tmp_path / "norm" / "metrics.jsonl") if "loss" in r]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6) and y["grad_norm"] == pytest.approx(x["grad_norm"],
                                                                                                    rel=1e-5)
    assert matched_kept_tokens(metrics) == {r["step"] - 1: r["kept_length"] for r in a}
    with pytest.raises(ConfigError, match="^norm_from: .* has no step 4"):
        train(load_config(base + ["--steps", "4", "--output_dir", str(tmp_path / "long"), "--norm_from", metrics]))


# ---------------------------------------------------------------------------------------------
# The mechanism: gradient split against float64 autograd

def test_gradient_split_against_float64_reference(models):
    from kat.learner import completion_logits

    cfg = Config(window=4, stride=2, patience=2, exempt=2, chunk=4, drift_prob=0.2)
    student, teacher = models[0], models[1]
    rollout, _ = draw(models, fixed_threshold_detector(0.8, cfg), max_new_tokens=32)
    masks = segment_masks(rollout, replay_cuts(rollout, 0.8, cfg))
    assert all(m.any() for m in masks.values())
    got = gradient_split(student, teacher, rollout, masks, "full", max_grad_norm=1.0)

    s64, t64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    logp = torch.log_softmax(completion_logits(s64, rollout), -1)  # (B, T, V) float64
    with torch.no_grad():
        logq = torch.log_softmax(completion_logits(t64, rollout), -1)
    d = (logp.exp() * (logp - logq)).sum(-1)  # (B, T)  d_t = sum_v p (log p - log q)
    gen = rollout.completion_mask.bool()
    params = list(s64.parameters())

    def grad(mask):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(d[mask].sum(), params, retain_graph=True)])

    g_all, n = grad(gen), int(gen.sum())
    assert got["grad_norm"] == pytest.approx(g_all.norm().item() / n, rel=1e-5)
    for name, m in masks.items():
        g_s, n_s = grad(m), int(m.sum())
        rest = g_all - g_s
        want = {"token_share": n_s / n, "loss_share": (d[m].sum() / d[gen].sum()).item(),
                "grad_share": (g_s.norm() / g_all.norm()).item(),
                "cos_with_without": (g_all @ rest / (g_all.norm() * rest.norm())).item(),
                "cos_segment_rest": (g_s @ rest / (g_s.norm() * rest.norm())).item(),
                "norm_ratio": (rest.norm() / (n - n_s) / (g_all.norm() / n)).item()}
        for key, value in want.items():
            assert got[name][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (name, key)
        assert got[name]["clipped"] == (min(rest.norm().item() / (n - n_s), g_all.norm().item() / n) > 1.0)
    assert all(p.grad is None for p in student.parameters())  # the measurement leaves .grad alone


def test_mechanism_run_trains_exactly_as_a_shadow_run(tiny_world, tmp_path):
    from kat.train import train

    argv = tiny_argv(tiny_world, steps=3, eval_data="", shadow="true", warmup_steps=0, min_buffer=1)
    train(load_config(argv + ["--output_dir", str(tmp_path / "shadow")]))
    run = mechanism_run(load_config(argv + ["--output_dir", str(tmp_path / "mech")]), log=lambda *a: None)
    a = [r for r in read_jsonl(tmp_path / "shadow" / "metrics.jsonl") if "loss" in r]
    b = [r for r in read_jsonl(tmp_path / "mech" / "metrics.jsonl") if "loss" in r]
    keys = ("loss", "kl", "grad_norm", "shadow_rate", "mean_length", "threshold")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    rows = read_jsonl(f"{run}/mechanism.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:  # the split's own total gradient is the one the learner clipped
        assert r["grad_norm"] == pytest.approx(r["logged_grad_norm"], rel=1e-5)
    summary = mechanism_summary(rows, 2)
    assert summary["steps"] == 2
    assert summary["paper"]["token_share"] == pytest.approx((rows[1]["paper"]["token_share"]
                                                             + rows[2]["paper"]["token_share"]) / 2)
    assert json.loads(json.dumps(summary)) == summary  # plain numbers, written to mechanism.json
