"""experiments/harm.py: the cross-loss reading of the harm regime, on a made-up run tree."""

import json

import numpy as np

from experiments.harm import report, scores, truncation


def _run(root, loss_dir, arm, seed, correct, eos):
    d = root / loss_dir / "repeat" / arm / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "heldout_4_7.json").write_text(json.dumps({"correct": correct, "k": 4}))
    rows = [{"step": 0, "eval": "before"}] + [{"step": i + 1, "eos_rate": e} for i, e in enumerate(eos)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_scores_truncation_and_the_paired_lines(tmp_path):
    eos = [1.0] * 5 + [0.5] * 5  # truncation 0 over the first 5 steps, 0.5 over the last 5
    for seed in (0, 1):
        _run(tmp_path, "s", "opd", seed, [0, 2, 4, 4], eos)
        _run(tmp_path, "f", "opd", seed, [4, 4, 4, 4], [1.0] * 10)
        _run(tmp_path, "s", "oracle", seed, [4, 2, 4, 4], eos)
        _run(tmp_path, "f", "oracle", seed, [4, 4, 4, 4], [1.0] * 10)
    got = scores(str(tmp_path / "s"), "repeat", "opd", [0, 1])
    np.testing.assert_allclose(got, [[0.0, 50.0, 100.0, 100.0]] * 2)
    assert truncation(str(tmp_path / "s"), "repeat", "opd", [0, 1]) == (0.0, 0.5)
    text = report(str(tmp_path / "s"), str(tmp_path / "f"), "repeat", [0, 1], ["opd", "oracle"])
    assert "| 1 - eos_rate | 0.000 -> 0.500 | 0.000 -> 0.000 |" in text
    assert "| OPD sampled - OPD full | -37.50 [" in text  # mean of (-100, -50, 0, 0)
    assert "| oracle - OPD, sampled | +25.00 [" in text
    assert "| oracle - OPD, full | +0.00 [+0.00, +0.00] | 0.00 |" in text
    assert "| oracle's gain: sampled - full | +25.00 [" in text
