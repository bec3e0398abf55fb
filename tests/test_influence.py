"""The one-step influence probe (experiments/influence.py): its token sets, its held-out loss against a
float64 reference, its optimiser step against the fresh-AdamW formula, and its hook."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from experiments import influence as inf
from kat.config import load_config
from kat.plot import read_jsonl
from kat.train import train

from conftest import tiny_args, tiny_models


def _runs(mask_row: np.ndarray) -> list[int]:
    """Lengths of the runs of True in one row."""
    out, n = [], 0
    for v in list(mask_row) + [False]:
        if v:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


class _R:  # the two fields cut_mask reads
    def __init__(self, completion_mask, shadow_cut):
        self.completion_mask, self.shadow_cut = completion_mask, shadow_cut


def test_cut_mask_is_the_tokens_from_shadow_cut_to_the_end():
    gen = torch.zeros(3, 8, dtype=torch.bool)
    gen[0, :8], gen[1, :5], gen[2, :6] = True, True, True
    got = inf.cut_mask(_R(gen, torch.tensor([3, -1, 5])))
    want = torch.zeros(3, 8, dtype=torch.bool)
    want[0, 3:8], want[2, 5] = True, True
    assert torch.equal(got, want)
    assert not inf.cut_mask(_R(gen, None)).any()


@pytest.mark.parametrize("seed", range(5))
def test_random_segments_match_the_cut_segments(seed):
    rng = np.random.default_rng(seed)
    B, T = 12, 30
    lengths = rng.integers(10, T + 1, B)
    gen = torch.from_numpy(np.arange(T)[None, :] < lengths[:, None])
    shadow = torch.full((B,), -1)
    for b in rng.choice(B, 4, replace=False):
        shadow[b] = int(rng.integers(4, lengths[b]))
    cut = inf.cut_mask(_R(gen, shadow))
    c = cut.numpy()
    for avoid in (True, False):
        mask, info = inf.matched_random_mask(cut, gen, np.random.default_rng(seed + 100), avoid_cut=avoid)
        m = mask.numpy()
        assert info == {"segments": 4, "tokens": int(c.sum()), "scattered": 0, "short": 0,
                        "overlap": int((m & c).sum())}
        assert m.sum() == c.sum() and not (m & ~gen.numpy()).any()
        assert not avoid or not (m & c).any()
        # one contiguous span per segment, of the cut segments' lengths, in distinct rollouts
        assert sorted(x for row in m for x in _runs(row)) == sorted(x for row in c for x in _runs(row))
        assert (m.any(1)).sum() == 4


def test_random_segments_scatter_when_no_span_fits_and_keep_the_count():
    gen = torch.ones(3, 6, dtype=torch.bool)
    cut = torch.zeros(3, 6, dtype=torch.bool)
    cut[0, 1:] = True  # a 5-token segment
    gen[1, 3], gen[2, 2] = False, False  # free runs: row 0: 1, row 1: 3 + 2, row 2: 2 + 3
    mask, info = inf.matched_random_mask(cut, gen, np.random.default_rng(0), avoid_cut=True)
    assert info["scattered"] == 1 and info["short"] == 0 and int(mask.sum()) == 5
    assert not (mask & cut).any() and not (mask & ~gen).any()
    empty, info = inf.matched_random_mask(torch.zeros_like(cut), gen, np.random.default_rng(0))
    assert not empty.any() and info["segments"] == 0


@pytest.fixture(scope="module")
def probe_batch(tiny_world):
    """Tiny student and teacher, and a teacher-sampled rollout standing in for clean solutions."""
    from kat.sampler import sample

    student, teacher, ids, mask = tiny_models(tiny_world, ("1+2", "30-4+5", "7+8-9"), 2)
    roll, _ = sample(teacher, teacher, ids, mask, max_new_tokens=12, eos_token_id=[2], pad_token_id=0,
                     generator=torch.Generator().manual_seed(0), score=False)
    roll = replace(roll, loss_mask=roll.completion_mask.clone())
    return student, teacher, roll


def _reference(student, teacher, roll):
    """Per-token mean NLL and reverse KL in float64, by hand."""
    s64, t64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    ids = torch.cat([roll.prompt_ids, roll.completion_ids], 1)
    att = torch.cat([roll.prompt_mask, roll.completion_mask], 1).long()
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    T = roll.completion_ids.shape[1]
    with torch.no_grad():
        ls = torch.log_softmax(s64(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, -T - 1:-1], -1)
        lt = torch.log_softmax(t64(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, -T - 1:-1], -1)
    m = roll.completion_mask.bool()
    nll = -ls.gather(-1, roll.completion_ids[..., None])[..., 0]
    kl = (ls.exp() * (ls - lt)).sum(-1)
    return nll[m].mean().item(), kl[m].mean().item()


def test_heldout_loss_matches_a_float64_reference(probe_batch):
    student, teacher, roll = probe_batch
    got = inf.heldout_loss(student, roll, inf.teacher_logits_of(teacher, roll))
    nll, kl = _reference(student, teacher, roll)
    assert got["nll"] == pytest.approx(nll, rel=1e-5) and got["rkl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert got["nll"] > 1.0  # a random tiny model: the check is not vacuous


def test_one_step_on_an_empty_set_changes_nothing(probe_batch):
    student, teacher, roll = probe_batch
    empty = torch.zeros_like(roll.completion_mask)
    model, info = inf.one_step(student, roll, empty, "full", lr=1e-2, max_grad_norm=1.0,
                               teacher_logits=inf.teacher_logits_of(teacher, roll))
    assert info["tokens"] == 0 and info["grad"] is None
    for p, q in zip(student.parameters(), model.parameters()):
        assert torch.equal(p, q)
    clean_t = inf.teacher_logits_of(teacher, roll)
    assert inf.heldout_loss(model, roll, clean_t) == inf.heldout_loss(student, roll, clean_t)


def test_one_step_is_a_fresh_adamw_step_on_the_segments_mean_loss(probe_batch):
    student, teacher, roll = probe_batch
    seg = roll.completion_mask.clone()
    seg[:, :3] = False  # a segment: positions 3.. of every row
    lr, n = 1e-3, int(seg.sum())
    model, info = inf.one_step(student, roll, seg, "full", lr=lr, max_grad_norm=1.0,
                               teacher_logits=inf.teacher_logits_of(teacher, roll))
    assert info["tokens"] == n
    # float64 reference of the gradient of the segment's mean reverse KL
    s64, t64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    ids = torch.cat([roll.prompt_ids, roll.completion_ids], 1)
    att = torch.cat([roll.prompt_mask, roll.completion_mask], 1).long()
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    T = roll.completion_ids.shape[1]
    ls = torch.log_softmax(s64(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, -T - 1:-1], -1)
    with torch.no_grad():
        lt = torch.log_softmax(t64(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, -T - 1:-1], -1)
    loss = (ls.exp() * (ls - lt)).sum(-1)[seg].sum() / n
    grads = torch.autograd.grad(loss, list(s64.parameters()))
    flat = torch.cat([g.reshape(-1) for g in grads])
    assert info["grad_norm"] == pytest.approx(flat.norm().item(), rel=1e-4)
    # AdamW's first step from a fresh state: theta - lr * g / (|g| + eps) (bias-corrected, no decay);
    # the clip scales g and so leaves it unchanged up to eps
    moved = torch.cat([(q.detach().double() - p.detach().double()).reshape(-1)
                       for p, q in zip(student.parameters(), model.parameters())])
    big = flat.abs() > 1e-5  # coordinates whose sign float32 resolves
    assert big.sum() > 0.5 * flat.numel()
    assert torch.allclose(moved[big], -lr * torch.sign(flat[big]), rtol=0, atol=lr * 1e-3)


def test_first_order_sign_and_unit_values():
    h = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert inf._first_order(torch.tensor([2.0, 0.0], dtype=torch.float64), h) == pytest.approx(-1.0)
    assert inf._first_order(None, h) is None
    rows = {0: [{"cut_tokens": 3, "cut": [{"nll": 0.5}], "random": [{"nll": 0.1}, {"nll": 0.3}],
                 "kept": [{"nll": -1.0}], "all": [{"nll": -2.0}]},
                {"cut_tokens": 0, "cut": [{"nll": 0.0}], "random": [{"nll": 0.0}], "kept": [{"nll": 9.0}],
                 "all": [{"nll": 9.0}]}]}
    units = inf.unit_values(rows, "nll")
    assert units[0]["cut"] == [0.5] and units[0]["random"] == [pytest.approx(0.2)]
    assert units[0]["cut-random"] == [pytest.approx(0.3)] and units[0]["kept"] == [-1.0]  # the empty probe is out


def test_nested_bootstrap_and_readings():
    const = inf.nested_bootstrap([[0.25, 0.25], [0.25]], n_boot=200)
    assert const["mean"] == const["lo"] == const["hi"] == 0.25 and const["units"] == 3
    assert inf.verdict(const) == "harmful" and inf.verdict(const, paired=True) == "worse than random"
    spread = inf.nested_bootstrap([[-1.0, 1.0], [-2.0, 2.0], [0.5, -0.5]], n_boot=2000)
    assert spread["lo"] < 0 < spread["hi"] and spread["mean"] == pytest.approx(0.0)
    assert inf.verdict(spread) == "neutral"
    assert inf.verdict(inf.nested_bootstrap([[-1.0], [-2.0]], n_boot=200)) == "useful"
    assert inf.nested_bootstrap([[], [math.nan]])["mean"] is None


def test_the_probe_hook_records_and_leaves_the_run_unchanged(tiny_world, tmp_path, monkeypatch, one_thread):
    import kat.evaluate

    monkeypatch.setattr(kat.evaluate, "grade", lambda *a, **k: True)  # a random teacher solves nothing
    problems = [{"prompt": "1+2", "answer": "3"}, {"prompt": "4+5-6", "answer": "3"}]
    args = tiny_args(tiny_world, tmp_path / "probed", steps=3, shadow=True, termination="kat")
    prober = inf.Prober(problems, [1, 3], draws=2, heldout_seed=5)
    train(load_config([], **args), hooks=[prober])
    train(load_config([], **{**args, "output_dir": str(tmp_path / "plain")}))

    def metrics(d):
        return [{k: v for k, v in r.items() if not k.startswith("time_")}
                for r in read_jsonl(tmp_path / d / "metrics.jsonl") if "loss" in r]

    assert metrics("probed") == metrics("plain")
    assert [r["step"] for r in prober.rows] == [1, 3] and prober.rows[0]["clean"] == 2
    for r in prober.rows:
        assert [x["tokens"] for x in r["cut"]] == [r["cut_tokens"]]
        assert all(x["tokens"] == r["cut_tokens"] or i["short"] for x, i in zip(r["random"], r["random_match"]))
        assert r["all"][0]["tokens"] == r["tokens"] == r["kept"][0]["tokens"] + r["cut_tokens"]
        if r["cut_tokens"] == 0:  # no step: exactly no change
            assert r["cut"][0]["nll"] == 0.0 and r["random"][0]["nll"] == 0.0
        assert r["all"][0]["nll"] != 0.0


def test_bad_probe_steps_end_in_one_line(capsys):
    from experiments.cli import main

    assert main(["influence", "--config", "configs/toy.yaml", "--probe-steps", "0,40", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--probe-steps" in err[0]
