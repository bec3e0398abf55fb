"""The n-gram loop finder of the real-model experiment, and its records, summaries and pictures."""

from __future__ import annotations

import random

import pytest

from experiments.lm import (answer_position, find_loop, marked_text, pair_statistics, pick_lm_examples, rollout_table,
                            text_traces_figure)
from experiments.report import shadow_summary


def brute_force_loop(ids, min_repeats, min_span, max_period):
    """Every segment [s, e) and period p checked against the definition; the earliest repeated
    copy (s + p) wins, then the shorter period."""
    best = None
    for p in range(1, max_period + 1):
        for s in range(len(ids)):
            for e in range(s + max(min_repeats * p, min_span), len(ids) + 1):
                if all(ids[t] == ids[t - p] for t in range(s + p, e)):
                    cand = (s + p, p)
                    if best is None or cand < best:
                        best = cand
    return best


@pytest.mark.parametrize("seed", range(40))
def test_loop_finder_matches_brute_force(seed):
    rng = random.Random(seed)
    alphabet = rng.choice([2, 3, 5])
    ids = [rng.randrange(alphabet) for _ in range(rng.randint(0, 30))]
    if rng.random() < 0.6:  # plant a loop
        unit = [rng.randrange(alphabet) for _ in range(rng.randint(1, 5))]
        at = rng.randint(0, len(ids))
        ids = ids[:at] + unit * rng.randint(2, 6) + ids[at:]
    kw = dict(min_repeats=rng.choice([2, 3]), min_span=rng.choice([1, 4, 8]), max_period=rng.choice([3, 6]))
    assert find_loop(ids, **kw) == brute_force_loop(ids, **kw), (ids, kw)


def test_loop_finder_by_hand():
    text = "I think so. The answer is 4. The answer is 4. The answer is 4."
    ids = [ord(c) for c in text]
    start, period = find_loop(ids)
    # the periodic stretch reaches back to the '.' of "so.", which equals the '.' of "4.": its first
    # copy is ". The answer is 4", and the loop is reported from the second
    assert (start, period) == (27, 17)
    assert text[start - period:start] == text[start:start + period] == ". The answer is 4"
    assert find_loop([ord(c) for c in "no loop in this sentence at all"]) is None
    assert find_loop([7] * 11) is None and find_loop([7] * 12) == (1, 1)  # min_span 12
    assert find_loop([1, 2] * 3, min_span=1) == (2, 2) and find_loop([1, 2] * 2, min_span=1) is None  # 3 copies
    assert find_loop(list(range(100)) * 3, max_period=64) is None  # a unit longer than max_period


def test_loop_finder_agrees_with_the_toy_worlds_repetition():
    from kat.toy.world import WorldSpec, sample_problem, trace, write_solution

    rng = random.Random(0)
    spec = WorldSpec("rich", p_fwd=0.5, p_semicolon=0.5, p_repeat=0.5)
    checked = 0
    for _ in range(300):
        problem = sample_problem(rng)
        text, _ = write_solution(problem, spec, rng)
        tr = trace(text, problem)
        loop = find_loop([ord(c) for c in text], min_repeats=2, min_span=10)
        if tr.repeat_start is not None:
            checked += 1
            # the same period; the token-level start may reach back over characters the repeated step
            # shares with the one before it ("32;32+60=92;..."), never by a whole step
            assert loop is not None and loop[1] == tr.repeat_len, text
            assert tr.repeat_start - tr.repeat_len < loop[0] <= tr.repeat_start, text
        else:
            assert loop is None, text
    assert checked > 100


def rec(correct, cut, gated, loop, length=60):
    return {"correct": correct, "shadow_cut": cut, "cut_gated": gated, "cut_drift": None, "drift": None,
            "repeat_start": loop, "length": length, "answer": "5", "prompt": "How many?", "threshold": 0.2,
            "kl": [0.1] * length, "z": [None] * 15 + [0.1] * (length - 15),
            "tokens": [f"w{i} " for i in range(length)]}


def test_loop_summary_and_examples():
    recs = [rec(False, 30, 30, 20), rec(False, 10, None, 20), rec(True, 12, None, None), rec(True, None, None, None),
            rec(False, None, None, 40)]
    paper, gated = shadow_summary(recs), shadow_summary(recs, "cut_gated")
    assert paper["repeat_rate"] == 3 / 5 and paper["cut_rate_repeating"] == pytest.approx(2 / 3)
    assert paper["cuts_inside_repeat"] == pytest.approx(1 / 3)  # of 3 cuts, one lands inside its loop
    assert paper["cut_rate_correct"] == 0.5 and "wrong_cut_at_or_after_error" not in paper
    assert gated["cut_rate"] == 0.2 and gated["cuts_inside_repeat"] == 1.0 and gated["cut_rate_correct"] == 0.0
    picked = pick_lm_examples(recs)
    # a loop cut, a cut without a loop, one the gate vetoes, and a correct rollout not drawn yet
    assert picked == [recs[0], recs[2], recs[1], recs[3]]
    text = marked_text(recs[0])
    assert "[LOOP]w20" in text and "[CUT][GATED CUT]w30" in text
    fig = text_traces_figure(picked, window=16, title="t")
    lines = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert "paper's would-be cut" in lines and "loop starts repeating" in lines and "threshold s" in lines
    assert "[CUT]" in fig.axes[1].texts[0].get_text()
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_answer_position_pair_statistics_and_rollout_table():
    tokens = ["So", " the", " ans", "wer", " is", " 7", "."]
    assert answer_position(tokens) == 4 and answer_position(tokens[:4]) is None
    a = {**rec(True, None, None, None, length=4), "kl": [0.5, 2.0, 0.0, 1.5], "stop": "eos", "step": 1,
         "tokens": ["The", " answer", " is", " 5"], "loop_period": None}
    b = {**rec(False, 2, None, 1, length=2), "kl": [0.25, 3.0], "stop": "length", "step": 2, "loop_period": 1}
    stats = pair_statistics([a, b])
    assert stats["tokens"] == 6 and stats["mean_kl"] == pytest.approx(7.25 / 6)
    assert stats["share_kl_above_1"] == pytest.approx(3 / 6) and stats["mean_length"] == 3.0
    assert stats["truncated"] == 0.5 and stats["states_answer"] == 0.5
    rows = rollout_table([a, b]).splitlines()
    assert rows[2] == "| 1 | 1 | correct (5) | 4, eos | 2 | - | - | - | - | 1.000 | 2.00 |"
    assert rows[3] == "| 2 | 2 | wrong (5) | 2, length | - | 1 (1) | 2 | - | - | 1.625 | 3.00 |"


def _finished_run(path, seed, records, minutes):
    import json

    path.mkdir()
    (path / "lm_rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "lm.json").write_text(json.dumps({"config": {"seed": seed}, "minutes": minutes}))
    return str(path)


def test_pooled_runs_report_every_rollout_once_tagged_with_its_seed(tmp_path):
    import json

    from experiments.lm import pool_records, run_lm
    from kat.config import ConfigError

    extra = {"stop": "eos", "step": 1, "loop_period": None}
    a = [{**rec(False, 30, 30, 20), **extra, "loop_period": 5}, {**rec(True, 12, None, None), **extra}]
    b = [{**rec(True, None, None, None), **extra, "step": 2, "threshold": 0.1}]  # calibrated apart
    runs = [_finished_run(tmp_path / "s0", 0, a, 10.0), _finished_run(tmp_path / "s1", 1, b, 2.5)]
    records, minutes = pool_records(runs)
    assert [r["seed"] for r in records] == [0, 0, 1] and minutes == 12.5
    assert [{k: v for k, v in r.items() if k != "seed"} for r in records] == a + b
    result = run_lm(["--config", "configs/toy.yaml"], str(tmp_path / "pooled"), pool=runs, log=lambda _: None)
    assert result["summary"][next(iter(result["summary"]))] == shadow_summary(records)
    assert result["pair"]["rollouts"] == 3 and result["minutes"] == 12.5
    md = (tmp_path / "pooled" / "lm.md").read_text()
    assert "| 1 | 0/1 | wrong (5) |" in md and "| 3 | 1/2 | correct (5) |" in md
    assert "| threshold s | 0.2 / 0.1 |" in md  # each run's own threshold, in pool order
    written = [json.loads(x) for x in (tmp_path / "pooled" / "lm_rollouts.jsonl").read_text().splitlines()]
    assert written == records
    with pytest.raises(ConfigError, match="already holds lm_rollouts.jsonl"):  # a pooled report is never overwritten
        run_lm(["--config", "configs/toy.yaml"], str(tmp_path / "pooled"), pool=runs, log=lambda _: None)
    with pytest.raises(ConfigError, match="both seed 0"):
        pool_records([runs[0], _finished_run(tmp_path / "again", 0, b, 1.0)])
    with pytest.raises(ConfigError, match="holds no finished lm run"):
        pool_records([runs[0], str(tmp_path)])
