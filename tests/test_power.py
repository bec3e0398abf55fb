"""Held-out problems and the paired bootstrap of experiments.power."""

import itertools

import numpy as np
import pytest

from experiments.power import (bootstrap_means, heldout_problems, paired_bootstrap, predicted_se, problem_scores,
                               variance_parts)
from kat.toy.world import parse_prompt, write_jsonl


def test_heldout_problems_are_fresh_and_disjoint(tmp_path):
    from experiments.toy_build import DIFFICULTY
    from kat.toy.world import make_split

    train = make_split(300, seed=1, **DIFFICULTY)
    test = make_split(50, seed=2, **DIFFICULTY)
    write_jsonl(train, tmp_path / "train.jsonl")
    write_jsonl(test, tmp_path / "test.jsonl")
    # the generator with train's own seed: every prompt it draws first is a training prompt, so all must be skipped
    held = heldout_problems([str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl")], 400, seed=1)
    prompts = [r["prompt"] for r in held]
    assert len(set(prompts)) == 400
    assert not set(prompts) & {r["prompt"] for r in train + test}
    for r in held:
        assert str(parse_prompt(r["prompt"]).answer) == r["answer"]
        assert DIFFICULTY["min_ops"] <= len(parse_prompt(r["prompt"]).ops) <= DIFFICULTY["max_ops"]


def test_bootstrap_means_equal_a_direct_loop():
    rng = np.random.default_rng(0)
    diff = rng.normal(size=(3, 5))
    si, pi = rng.integers(0, 3, (20, 3)), rng.integers(0, 5, (20, 5))
    want = [float(np.mean([[diff[s, p] for p in pi[b]] for s in si[b]], dtype=np.float64)) for b in range(20)]
    np.testing.assert_allclose(bootstrap_means(diff, si, pi), want, rtol=0, atol=1e-13)


def test_paired_bootstrap_against_exhaustive_enumeration():
    # 2 seeds x 3 problems: all 2^2 x 3^3 resamples are equally likely; their means' std is the ideal bootstrap SE
    diff = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])
    means = [np.mean(diff[np.ix_(s, p)]) for s in itertools.product(range(2), repeat=2)
             for p in itertools.product(range(3), repeat=3)]
    res = paired_bootstrap(diff, n_boot=200_000, seed=1)
    assert res["mean"] == pytest.approx(diff.mean(), abs=1e-15)
    assert res["se"] == pytest.approx(np.std(means), rel=0.01)
    lo, hi = np.quantile(means, [0.025, 0.975])
    assert res["lo"] == pytest.approx(lo, abs=0.05) and res["hi"] == pytest.approx(hi, abs=0.05)


def test_variance_parts_recover_the_simulated_components():
    rng = np.random.default_rng(3)
    S, P = 200, 400
    diff = rng.normal(0, 2.0, (S, 1)) + rng.normal(0, 5.0, (S, P))  # seed sd 2, within sd 5
    parts = variance_parts(diff)
    assert parts["v_seed"] == pytest.approx(4.0, rel=0.25)
    assert parts["v_within"] == pytest.approx(25.0, rel=0.02)
    assert predicted_se(parts, 4, 100) == pytest.approx(np.sqrt(parts["v_seed"] / 4 + parts["v_within"] / 400))


def test_problem_scores_agree_with_the_evaluator():
    from kat.evaluate import avg_at_k, mean_pass_at_k

    rng = np.random.default_rng(5)
    table = rng.random((40, 4)) < np.linspace(0, 1, 40)[:, None]  # some problems never, some always solved
    avg, pas = problem_scores([int(r.sum()) for r in table], 4)
    assert avg.mean() == pytest.approx(avg_at_k(table.tolist()), abs=1e-15)
    assert pas.mean() == pytest.approx(mean_pass_at_k(table.tolist(), 4), abs=1e-15)
    assert set(pas.tolist()) == {0.0, 1.0} and pas.sum() == sum(bool(r.any()) for r in table)
