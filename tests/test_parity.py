"""kat.py (the single-file tutorial) and kat/ (the package) must compute the same things.

kat.py is loaded by path; every comparison is exact (torch.equal) unless a tolerance is stated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import kat
from kat import config as pkg_config
from kat.terminators import NoTerminator, TrapDetector
from kat.learner import completion_logits, opd_loss
from kat.sampler import sample

from conftest import ROOT, tiny_models


def as_dict(rollout) -> dict:
    return {f.name: getattr(rollout, f.name) for f in dataclasses.fields(rollout)}


# ------------------------------------------------------------------------------------------------
# Config

def test_config_fields_and_defaults_match(single_file):
    pkg = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
           for f in dataclasses.fields(pkg_config.Config)}
    for f in dataclasses.fields(single_file.Config):
        assert f.name in pkg, f"kat.py field {f.name} is missing from kat/config.py"
        if f.name == "chat_template_kwargs":  # kat.py holds the mapping as YAML text
            assert yaml.safe_load(f.default or "{}") == pkg[f.name]
        elif f.name != "output_dir":
            assert f.default == pkg[f.name], f"default of {f.name} differs"
    # every package field is kat.py's or named by it as the package's alone (a config file using it then
    # runs in both, kat.py saying what it skips), and kat.py defines none of those itself
    ours = {f.name for f in dataclasses.fields(single_file.Config)}
    assert set(pkg) - ours - set(single_file.PACKAGE_ONLY) == set(), "add the new field to kat.py or its PACKAGE_ONLY"
    assert not ours & set(single_file.PACKAGE_ONLY)
    # kat.py names the rollout engine's fields ahead of kat/config.py; any other name must be a package field
    assert set(single_file.PACKAGE_ONLY) - set(pkg) <= {"rollout_slots", "decode"}


def test_the_drift_gate_and_the_controls_are_the_packages_alone(single_file, tmp_path, capsys):
    """kat.py runs the paper's rule; the drift gate, the controls and the normalisation control stay in kat/,
    and kat.py refuses them in one line instead of running another method than the one asked for."""
    for argv, message in ((["--gate", "drift"], "gate: 'drift': it is a setting of `python -m kat train`"),
                          (["--termination", "random"], "termination: 'random' is not one of .*kat/ has more"),
                          (["--termination", "drift"], "termination: 'drift' is not one of"),
                          (["--norm_from", "m.jsonl"], "norm_from: 'm.jsonl': it is a setting")):
        with pytest.raises(single_file.UserError, match=message):
            single_file.parse_config(argv)
    path = tmp_path / "c.yaml"
    path.write_text("gate: none\ndrift_prob: 0.05\nnorm_from: ''\n")  # the defaults: nothing changes the method
    assert single_file.parse_config(["--config", str(path)]).termination == "kat"
    assert capsys.readouterr().err == "kat.py does not use: drift_prob, gate, norm_from; kat/ does\n"
    doc = " ".join(single_file.__doc__.split())
    assert "the drift gate, the controls" in doc and "python -m kat eval --config" in doc
    assert pkg_config.Config(gate="drift", termination="drift").termination == "drift"


def test_single_file_cli(single_file, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 3\neta: 0.2\n")
    cfg = single_file.parse_config(["--config", str(path), "--eta=0.1", "--shadow", "--loss", "topk"])
    assert (cfg.steps, cfg.eta, cfg.shadow, cfg.loss) == (3, 0.1, True, "topk")
    with pytest.raises(single_file.UserError, match="unknown field 'stepz'"):
        single_file.parse_config(["--stepz", "3"])
    with pytest.raises(single_file.UserError, match="loss: 'kl' is not one of"):
        single_file.parse_config(["--loss", "kl"])
    with pytest.raises(single_file.UserError, match="rule: 'zscore' is not one of .*kat/ has more"):
        single_file.parse_config(["--rule", "zscore"])
    with pytest.raises(single_file.UserError, match="shadow: expected bool, got 'ture'"):
        single_file.parse_config(["--shadow", "ture"])
    with pytest.raises(single_file.UserError, match="config file 'nope.yaml': No such file or directory"):
        single_file.parse_config(["--config", "nope.yaml"])
    assert single_file.parse_config(["--output-dir=runs/a-b", "--system_prompt", ""]).output_dir == "runs/a-b"


def test_single_file_names_the_fields_it_does_not_use(single_file, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 2\nsave_every: 5\nkappa: 2.0\nlog_with: wandb\n")
    cfg = single_file.parse_config(["--config", str(path), "--resume", ""])
    assert cfg.steps == 2 and not hasattr(cfg, "save_every")
    assert capsys.readouterr().err == "kat.py does not use: kappa, log_with, resume, save_every; kat/ does\n"


# ------------------------------------------------------------------------------------------------
# Scoring

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kl_functions_identical(single_file, dtype):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(5, 9, 301, generator=g) * 4).to(dtype)
    t = (torch.randn(5, 9, 301, generator=g) * 4).to(dtype)
    assert torch.equal(single_file.reverse_kl(s, t), kat.reverse_kl(s, t))
    for a, b in zip(single_file.topk_tail(s, t, 7), kat.topk_tail(s, t, 7)):
        assert torch.equal(a, b)
    grads = []
    for fn in (single_file.reverse_kl, kat.reverse_kl):
        x = s.clone().requires_grad_(True)
        fn(x, t).sum().backward()
        grads.append(x.grad)
    assert torch.equal(*grads)


def test_reverse_kl_in_row_chunks_against_float64(single_file, monkeypatch):
    """kat.py's KL and its gradient, taken in chunks of 3 rows, against autograd on the float64 formula."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 5, 50, generator=g, dtype=torch.float64) * 3
    t = torch.randn(4, 5, 50, generator=g, dtype=torch.float64) * 3
    s[0, 0, :10] = float("-inf")  # masked logits: p = 0, a term of 0
    x = s.clone().requires_grad_(True)
    logp, logq = torch.log_softmax(x, -1), torch.log_softmax(t, -1)
    reference = torch.where(logp.exp() > 0, logp.exp() * (logp - logq), 0.0).sum(-1)
    weights = torch.rand(4, 5, generator=g, dtype=torch.float64)
    (reference * weights).sum().backward()
    monkeypatch.setattr(single_file, "chunk_rows", lambda vocab: 3)
    y = s.float().clone().requires_grad_(True)
    ours = single_file.reverse_kl(y, t.float())
    (ours * weights.float()).sum().backward()
    torch.testing.assert_close(ours.double(), reference.detach(), rtol=1e-5, atol=1e-6)
    # autograd on the formula gives NaN through the masked entries of row (0, 0); kat.py gives 0 there
    torch.testing.assert_close(y.grad.double()[1:], x.grad[1:], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(y.grad.double()[0, 1:], x.grad[0, 1:], rtol=1e-4, atol=1e-6)
    assert (y.grad[0, 0, :10] == 0).all()
    kept = s[0, 0, 10:].clone().requires_grad_(True)  # the masked row over its live entries: the same KL
    logp_kept, logq_kept = torch.log_softmax(kept, -1), torch.log_softmax(t[0, 0], -1)[10:]
    (weights[0, 0] * (logp_kept.exp() * (logp_kept - logq_kept)).sum()).backward()
    torch.testing.assert_close(y.grad[0, 0, 10:].double(), kept.grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Terminators

def detector_pair(single_file, **kw):
    """kat.py's detector and the package's with the same settings (the zscore rule is the package's alone)."""
    fields = {"rule": "quantile", "window": 4, "stride": 2, "patience": 2, "exempt": 3, "eta": 0.4,
              "buffer_size": 40, "min_buffer": 8, "warmup_steps": 1, "shadow": False}
    fields.update(kw)
    return single_file.TrapDetector(single_file.Config(**fields)), TrapDetector(**fields)


@pytest.mark.parametrize("kw,chunk", [({}, 3), ({"shadow": True}, 3), ({"stride": 4, "patience": 1}, 3),
                                      ({"exempt": 0}, 5), ({"stride": 4, "patience": 1, "shadow": True}, 1)])
def test_detector_decisions_identical(single_file, kw, chunk):
    """Both detectors on the same chunked streams of d_t, over six batches of a moving threshold."""
    ours, pkg = detector_pair(single_file, **kw)
    g = torch.Generator().manual_seed(1)
    fired_total = 0
    for step in range(6):
        B, T = 12, 40
        # low-KL stretches in some rows, so the rule has something to fire on
        kl = torch.rand(B, T, generator=g) * 2
        kl[: B // 2, 15:] *= 0.05
        lengths = torch.randint(5, T + 1, (B,), generator=g)
        valid = torch.arange(T)[None] < lengths[:, None]
        sa, sb = ours.start(B), pkg.start(B)
        for t0 in range(0, T, chunk):
            part = (kl[:, t0:t0 + chunk], valid[:, t0:t0 + chunk])
            fa, ca = ours.observe(sa, *part)
            fb, cb = pkg.observe(sb, *part)
            assert torch.equal(fa, fb) and torch.equal(ca, cb)
            fired_total += int(fa.sum())
        assert torch.equal(sa.would_cut, sb.would_cut)
        ours.end_batch(sa, step)
        pkg.end_batch(sb, step)
        assert ours.threshold == pkg.threshold and ours.active == pkg.active
    assert fired_total > 0 or kw.get("shadow")
    assert kw.get("shadow") or (sa.would_cut >= 0).any()


def test_termination_none_never_fires_as_the_packages_no_terminator(single_file):
    ours, pkg = single_file.TrapDetector(single_file.Config(termination="none", min_buffer=1, warmup_steps=0)), \
        NoTerminator()
    for step in range(3):
        sa, sb = ours.start(4), pkg.start(4)
        fired, cut = ours.observe(sa, torch.zeros(4, 16), torch.ones(4, 16, dtype=torch.bool))
        assert not fired.any() and (cut == -1).all() and not (sa.would_cut >= 0).any()
        ours.end_batch(sa, step)
        pkg.end_batch(sb, step)
        assert ours.threshold is pkg.threshold is None and ours.active is pkg.active is False


# ------------------------------------------------------------------------------------------------
# Sampling and losses on tiny models

@pytest.fixture(scope="module")
def models(tiny_world):
    return tiny_models(tiny_world, ("37+48-19+25", "5+6", "99-12+1-40+3"), repeat=2)


@pytest.mark.parametrize("termination,loss,chunk", [("kat", "full", 4), ("none", "topk", 8), ("kat", "topk", 3),
                                                    ("none", "full", 8), ("kat", "full", 1)])
def test_sample_and_losses_identical(single_file, models, termination, loss, chunk):
    """kat.py always scores in lockstep; the package, when no terminator needs the KL online, scores after
    decoding or not at all, so here its terminator is told to need the KL (its lockstep path)."""
    student, teacher, ids, mask = models
    cfg = single_file.Config(max_new_tokens=24, chunk=chunk, loss=loss, topk=5, termination=termination,
                             window=4, stride=2, patience=1, exempt=0, eta=0.9, min_buffer=1, warmup_steps=0)
    eos = torch.tensor([2])
    if termination == "kat":
        ta, tb = detector_pair(single_file, window=4, stride=2, patience=1, exempt=0, eta=0.9, min_buffer=1,
                               warmup_steps=0)
        tb.buffer = ta.buffer = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)  # active at once
    else:
        ta, tb = single_file.TrapDetector(cfg), NoTerminator()
    tb.needs_kl = True
    ra, _ = single_file.sample(student, teacher, ids, mask, ta, cfg, eos, 0, torch.Generator().manual_seed(5))
    rb, _ = sample(student, teacher, ids, mask, max_new_tokens=24, eos_token_id=2, pad_token_id=0,
                   chunk=chunk, terminator=tb, topk=5 if loss == "topk" else 0,
                   generator=torch.Generator().manual_seed(5))
    rb = as_dict(rb)
    assert set(ra) <= set(rb)  # the package adds log p(y_t), log q(y_t) and its bookkeeping
    for key, value in ra.items():
        assert (value is None) == (rb[key] is None), key
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, rb[key], rtol=0, atol=0, msg=key)
    if termination != "none":
        assert (rb["stop"] == 2).any(), "the detector should have cut some rows"

    # losses and gradients: equal bits for the exact KL; the top-K loss's log-normaliser is a plain
    # logsumexp in kat.py and the package's fused kernel, equal to float32 rounding
    outs = []
    for loss_fn, logits_fn, r in ((single_file.opd_loss, single_file.completion_logits, ra),
                                  (opd_loss, completion_logits, kat.Rollout(**rb))):
        student.zero_grad()
        logits = logits_fn(student, r)
        with torch.no_grad():
            t_logits = logits_fn(teacher, r) if loss == "full" else None
        total, n = loss_fn(logits, r, loss, t_logits)
        total.backward()
        outs.append((total.detach(), n, [p.grad.clone() for p in student.parameters()]))
    tolerance = dict(rtol=0, atol=0) if loss == "full" else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0][0], outs[1][0], **tolerance)
    assert torch.equal(outs[0][1], outs[1][1])
    for a, b in zip(outs[0][2], outs[1][2]):
        torch.testing.assert_close(a, b, **tolerance)
    student.zero_grad()


# ------------------------------------------------------------------------------------------------
# A short training run: same per-step numbers, same final parameters

def param_checksum(path: str) -> float:
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(path, "model.safetensors"))
    return sum(float(t.double().abs().sum()) for t in tensors.values())


@pytest.mark.parametrize("termination", ["kat", "none"])  # "none": rollouts unscored, KL from the learner
def test_three_step_trajectory_identical(single_file, tiny_world, tmp_path, termination):
    from kat.train import train

    common = dict(termination=termination, teacher=tiny_world["teacher"], student=tiny_world["student"],
                  train_data=tiny_world["train"], steps=3, batch_size=4, samples_per_prompt=2, micro_batch_size=3,
                  max_new_tokens=24, chunk=4, window=4, stride=2, patience=1, exempt=0, eta=0.8,
                  min_buffer=4, warmup_steps=1, lr=3e-3, seed=11)
    rows_a = single_file.main(single_file.Config(output_dir=str(tmp_path / "a"), **common))
    # teacher_cache_mb=0: the package's learner runs the teacher again, as kat.py's does (the kept
    # lockstep logits give the same target to float rounding: tests/test_teacher_cache.py)
    train(pkg_config.Config(output_dir=str(tmp_path / "b"), plot=False, n_traces=0, teacher_cache_mb=0, eval_data="",
                            **common))
    with open(tmp_path / "b" / "metrics.jsonl") as fh:
        rows_b = [json.loads(line) for line in fh]
    assert len(rows_a) == len(rows_b) == 3
    for a, b in zip(rows_a, rows_b):
        for key in ("loss", "kl", "cut_rate", "mean_length", "kept_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
    if termination == "kat":
        assert sum(r["cut_rate"] for r in rows_b) > 0, "the detector should cut within three steps"
    else:  # nothing cut: the loss is the mean KL of the generated tokens. Both are fp32 means of the
        # same d_t from two forwards (the rollout's and the learner's), so they agree to fp32 rounding
        # over a few hundred tokens (1.3e-6 relative has been seen), not to the parity check's 1e-6.
        assert all(r["loss"] == pytest.approx(r["kl"], rel=1e-5) for r in rows_a + rows_b)
    # the two learners sum the same fp32 terms in different orders (losses agree to ~2e-7 above), so
    # after three Adam steps the weights agree to a few 1e-9 of their sum, not bit for bit
    assert param_checksum(str(tmp_path / "a" / "student")) == pytest.approx(
        param_checksum(str(tmp_path / "b" / "student")), rel=1e-8)


def test_accelerate_launch_smoke(tiny_world, tmp_path):
    """`accelerate launch kat.py` end to end with a tiny budget, as a user runs it."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "kat.py"),
           "--teacher", tiny_world["teacher"], "--student", tiny_world["student"],
           "--train_data", tiny_world["train"], "--steps", "2", "--batch_size", "2", "--max_new_tokens", "16",
           "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and all(r["mean_length"] > 0 for r in rows)
    traces = [json.loads(line) for line in open(out / "traces.jsonl")]
    assert len(traces) == 6 and all(t["step"] == 2 and len(t["kl"]) > 0 for t in traces)
    assert (out / "student" / "model.safetensors").is_file()
    assert f"python -m kat eval --config CONFIG --model {out / 'student'}" in proc.stdout
