"""kat.py (the single-file tutorial) and kat/ (the package) must compute the same things.

kat.py is loaded by path; every comparison is exact (torch.equal) unless a tolerance is stated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

import kat
from kat import config as pkg_config
from kat.terminators import NoTerminator, RandomTerminator, TrapDetector
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


def test_drift_gate_in_both_normalisation_control_the_packages_alone(single_file, tmp_path, capsys):
    """kat.py reads the drift gate's fields; the normalisation control (norm_from) and the cut-after-drift
    control (termination: drift) stay in kat/, and kat.py says so."""
    path = tmp_path / "c.yaml"
    path.write_text("gate: drift\ndrift_prob: 0.05\nnorm_from: ''\n")
    cfg = single_file.parse_config(["--config", str(path)])
    assert (cfg.gate, cfg.drift_prob) == ("drift", 0.05) and not hasattr(cfg, "norm_from")
    assert capsys.readouterr().err == "kat.py does not use: norm_from; `python -m kat train` does\n"
    assert single_file.parse_config(["--gate", "none"]).gate == "none"
    with pytest.raises(SystemExit, match="gate: 'drfit' is not one of \\('none', 'drift'\\)"):
        single_file.parse_config(["--gate", "drfit"])
    with pytest.raises(SystemExit, match="termination: 'drift' is not one of .*`python -m kat train` has more"):
        single_file.parse_config(["--termination", "drift"])
    doc = " ".join(single_file.__doc__.split())
    assert "`--gate drift`" in doc and "(`termination: drift`, `norm_from`)" in doc
    assert pkg_config.Config(gate="drift", termination="drift").termination == "drift"


def test_single_file_cli(single_file, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 3\neta: 0.2\n")
    cfg = single_file.parse_config(["--config", str(path), "--eta=0.1", "--shadow", "--loss", "topk"])
    assert (cfg.steps, cfg.eta, cfg.shadow, cfg.loss) == (3, 0.1, True, "topk")
    with pytest.raises(SystemExit, match="unknown field 'stepz'"):
        single_file.parse_config(["--stepz", "3"])
    with pytest.raises(SystemExit, match="loss: 'kl' is not one of"):
        single_file.parse_config(["--loss", "kl"])
    with pytest.raises(SystemExit, match="rule: 'zscore' is not one of .*`python -m kat train` has more"):
        single_file.parse_config(["--rule", "zscore"])
    with pytest.raises(SystemExit, match="shadow: expected bool, got 'ture'"):
        single_file.parse_config(["--shadow", "ture"])
    with pytest.raises(SystemExit, match="config file 'nope.yaml' does not exist"):
        single_file.parse_config(["--config", "nope.yaml"])
    assert single_file.parse_config(["--output-dir=runs/a-b", "--system_prompt", ""]).output_dir == "runs/a-b"


def test_single_file_names_the_fields_it_does_not_use(single_file, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 2\nsave_every: 5\nkappa: 2.0\nlog_with: wandb\n")
    cfg = single_file.parse_config(["--config", str(path), "--resume", ""])
    assert cfg.steps == 2 and not hasattr(cfg, "save_every")
    assert capsys.readouterr().err == ("kat.py does not use: kappa, log_with, resume, save_every; "
                                       "`python -m kat train` does\n")


# ------------------------------------------------------------------------------------------------
# Scoring

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kl_functions_identical(single_file, dtype):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(5, 9, 301, generator=g) * 4).to(dtype)
    t = (torch.randn(5, 9, 301, generator=g) * 4).to(dtype)
    ids = torch.randint(0, 301, (5, 9), generator=g)
    assert torch.equal(single_file.reverse_kl(s, t), kat.reverse_kl(s, t))
    assert torch.equal(single_file.token_logp(s, ids), kat.token_logp(s, ids))
    for a, b in zip(single_file.topk_tail(s, t, 7), kat.topk_tail(s, t, 7)):
        assert torch.equal(a, b)
    grads = []
    for fn in (single_file.reverse_kl, kat.reverse_kl):
        x = s.clone().requires_grad_(True)
        fn(x, t).sum().backward()
        grads.append(x.grad)
    assert torch.equal(*grads)


# ------------------------------------------------------------------------------------------------
# Terminators

def detector_pair(single_file, **kw):
    """kat.py's detector and the package's with the same settings (the zscore rule is the package's alone)."""
    fields = {"rule": "quantile", "window": 4, "stride": 2, "patience": 2, "exempt": 3, "eta": 0.4,
              "buffer_size": 40, "min_buffer": 8, "warmup_steps": 1, "shadow": False}
    fields.update(kw)
    return single_file.TrapDetector(single_file.Config(**fields)), TrapDetector(**fields)


@pytest.mark.parametrize("kw,chunk", [({}, 3), ({"shadow": True}, 3), ({"stride": 4, "patience": 1}, 3),
                                      ({"gate": "drift"}, 3), ({"gate": "drift", "shadow": True}, 5),
                                      ({"gate": "drift", "stride": 4, "patience": 1, "drift_prob": 0.05}, 1)])
def test_detector_decisions_identical(single_file, kw, chunk):
    """Both detectors on the same chunked streams of d_t and log q(y_t) (kat.py's sampler passes log q to
    every terminator; the package's passes it to the gated detector only)."""
    ours, pkg = detector_pair(single_file, **kw)
    g = torch.Generator().manual_seed(1)
    fired_total, gated, log_drift = 0, kw.get("gate") == "drift", math.log(kw.get("drift_prob", 0.02))
    for step in range(6):
        B, T = 12, 40
        # low-KL stretches in some rows, so both rules have something to fire on
        kl = torch.rand(B, T, generator=g) * 2
        kl[: B // 2, 15:] *= 0.05
        lengths = torch.randint(5, T + 1, (B,), generator=g)
        valid = torch.arange(T)[None] < lengths[:, None]
        # teacher log-probs of the sampled tokens: mostly likely tokens, one unlikely (drift) token in
        # two rows of three, anywhere from before `exempt` to past the low stretch
        logq = torch.log(0.1 + 0.9 * torch.rand(B, T, generator=g))
        where = torch.randint(0, T, (B,), generator=g)
        logq[torch.arange(B), where] = torch.where(torch.arange(B) % 3 > 0, math.log(0.01), 0.0)
        sa, sb = ours.start(B), pkg.start(B)
        for t0 in range(0, T, chunk):
            part = (kl[:, t0:t0 + chunk], valid[:, t0:t0 + chunk])
            fa, ca = ours.observe(sa, *part, logq[:, t0:t0 + chunk])
            fb, cb = pkg.observe(sb, *part, teacher_logp_chunk=logq[:, t0:t0 + chunk] if gated else None)
            assert torch.equal(fa, fb) and torch.equal(ca, cb)
            fired_total += int(fa.sum())
        assert torch.equal(sa.would_cut, sb.would_cut)
        if gated:  # every decision lands after the row's first drift token at or past exempt, on the stream itself
            for b in (sa.would_cut >= 0).nonzero().squeeze(-1).tolist():
                drifts = [t for t in range(pkg.exempt, int(lengths[b])) if logq[b, t] < log_drift]
                assert drifts and int(sa.would_cut[b]) > drifts[0], (step, b)
        ours.end_batch(sa, step)
        pkg.end_batch(sb, step)
        assert ours.threshold == pkg.threshold and ours.active == pkg.active
    assert fired_total > 0 or kw.get("shadow")


def test_random_terminator_identical(single_file):
    cfg = single_file.Config(exempt=4, max_new_tokens=40, random_target_length=15.0)
    ours, pkg = single_file.RandomTerminator(cfg, seed=3), RandomTerminator(15.0, exempt=4, max_new_tokens=40, seed=3)
    for step in range(4):
        sa, sb = ours.start(10), pkg.start(10)
        valid = torch.ones(10, 8, dtype=torch.bool)
        for _ in range(5):
            assert all(torch.equal(a, b) for a, b in zip(ours.observe(sa, torch.zeros(10, 8), valid),
                                                          pkg.observe(sb, torch.zeros(10, 8), valid)))
        ours.end_batch(sa, step)
        pkg.end_batch(sb, step)
        assert ours.hazard == pkg.hazard


# ------------------------------------------------------------------------------------------------
# Sampling and losses on tiny models

@pytest.fixture(scope="module")
def models(tiny_world):
    return tiny_models(tiny_world, ("37+48-19+25", "5+6", "99-12+1-40+3"), repeat=2)


@pytest.mark.parametrize("termination,loss,chunk", [("kat", "full", 4), ("none", "topk", 8), ("random", "topk", 3),
                                                    ("none", "full", 8), ("random", "full", 3),
                                                    ("kat_gated", "topk", 3)])
def test_sample_and_losses_identical(single_file, models, termination, loss, chunk):
    """kat.py always scores in lockstep; the package, when no terminator needs the KL online, scores after
    decoding or not at all, so here its terminator is told to need the KL (its lockstep path)."""
    student, teacher, ids, mask = models
    gate = dict(gate="drift", drift_prob=0.036) if termination == "kat_gated" else {}
    termination = termination.removesuffix("_gated")
    cfg = single_file.Config(max_new_tokens=24, chunk=chunk, loss=loss, topk=5, termination=termination,
                             window=4, stride=2, patience=1, exempt=0, eta=0.9, min_buffer=1, warmup_steps=0,
                             random_target_length=10.0)
    eos = torch.tensor([2])

    def terminators():
        if termination == "kat":
            a, b = detector_pair(single_file, window=4, stride=2, patience=1, exempt=0, eta=0.9, min_buffer=1,
                                 warmup_steps=0, **gate)
            b.buffer = a.buffer = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)  # active at once
            return a, b
        if termination == "random":
            return single_file.RandomTerminator(cfg, seed=0), RandomTerminator(10.0, 0, 24, seed=0)
        return single_file.NoTerminator(), NoTerminator()

    ta, tb = terminators()
    tb.needs_kl = True
    ra, _ = single_file.sample(student, teacher, ids, mask, ta, cfg, eos, 0, torch.Generator().manual_seed(5))
    rb, _ = sample(student, teacher, ids, mask, max_new_tokens=24, eos_token_id=2, pad_token_id=0,
                   chunk=chunk, terminator=tb, topk=5 if loss == "topk" else 0,
                   generator=torch.Generator().manual_seed(5))
    rb = as_dict(rb)
    assert set(ra) == set(rb) and ra["scored"] is rb["scored"] is True
    for key, value in rb.items():
        assert (value is None) == (ra[key] is None), key
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(ra[key], value, rtol=0, atol=0, msg=key)
    if termination != "none":
        assert (rb["stop"] >= 2).any(), "the terminator should have cut some rows"
    if gate:  # every cut lands after the row's first drift token (exempt 0 here), read off the rollout
        for b in (rb["stop"] == 2).nonzero().squeeze(-1).tolist():
            drift = ((rb["teacher_logp"][b] < math.log(0.036)) & rb["completion_mask"][b]).nonzero()
            assert drift.numel() and int(rb["cut"][b]) > int(drift[0]), b

    # losses and gradients
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
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][2], outs[1][2]))
    student.zero_grad()


# ------------------------------------------------------------------------------------------------
# A short training run: same per-step numbers, same final parameters

def param_checksum(path: str) -> float:
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(path, "model.safetensors"))
    return sum(float(t.double().abs().sum()) for t in tensors.values())


@pytest.mark.parametrize("termination", ["kat", "none", "kat_gated"])  # "none": rollouts unscored, KL from the learner
def test_three_step_trajectory_identical(single_file, tiny_world, tmp_path, termination):
    from kat.train import train

    gate = dict(gate="drift", drift_prob=0.036) if termination == "kat_gated" else {}
    termination = termination.removesuffix("_gated")
    common = dict(termination=termination, teacher=tiny_world["teacher"], student=tiny_world["student"], **gate,
                  train_data=tiny_world["train"],
                  eval_data="", steps=3, batch_size=4, samples_per_prompt=2, micro_batch_size=3,
                  max_new_tokens=24, chunk=4, window=4, stride=2, patience=1, exempt=0, eta=0.8,
                  min_buffer=4, warmup_steps=1, lr=3e-3, seed=11)
    rows_a = single_file.main(single_file.Config(output_dir=str(tmp_path / "a"), **common))
    # teacher_cache_mb=0: the package's learner runs the teacher again, as kat.py's does (the kept
    # lockstep logits give the same target to float rounding: tests/test_teacher_cache.py)
    train(pkg_config.Config(output_dir=str(tmp_path / "b"), plot=False, n_traces=0, teacher_cache_mb=0, **common))
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
           "--train_data", tiny_world["train"], "--eval_data", tiny_world["test"], "--eval_limit", "4",
           "--eval_k", "2", "--steps", "2", "--batch_size", "2", "--max_new_tokens", "16",
           "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["mean_length"] > 0 for r in steps)
    assert [(r["step"], r["eval"]) for r in rows if "eval" in r] == [(0, "before"), (2, "after")]
    assert all(0 <= r["test/avg@k"] <= r["test/pass@k"] <= 1 for r in rows if "eval" in r)
    assert (out / "student" / "model.safetensors").is_file() and (out / "kl_traces.png").stat().st_size > 1000
    assert "before:" in proc.stdout and "after:" in proc.stdout
