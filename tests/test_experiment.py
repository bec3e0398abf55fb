"""Experiments: arm configs derived from the KAT run, tables that equal the per-run metrics files,
shadow-mode summaries."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from experiments.arms import arm_overrides
from experiments.report import markdown_table, shadow_summary
from experiments.runs import summarize_run
from experiments.shadow import as_traces, pick_examples, run_shadow, shadow_rollouts, train_problems
from experiments.table import run_table
from kat.config import Config, load_config
from kat.plot import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def tiny_argv(world: dict) -> list[str]:
    over = dict(teacher=world["teacher"], student=world["student"], train_data=world["train"],
                eval_data=world["test"], eval_limit=3, eval_k=2, eval_every=1, steps=2, batch_size=2,
                samples_per_prompt=2, max_new_tokens=16, chunk=4, window=4, stride=2, patience=1, exempt=2,
                eta=0.5, min_buffer=4, warmup_steps=1, lr=3e-3, n_traces=2, plot=False)
    return [x for k, v in over.items() for x in (f"--{k}", str(v))]


# ---------------------------------------------------------------------------------------------
# Length matching

KAT_RUN = {"mean_length": 41.3, "kept_length": 33.6}


def test_random_term_targets_kats_kept_length():
    base = Config(max_new_tokens=96, exempt=8)
    assert arm_overrides("random", base, KAT_RUN) == {"termination": "random", "random_target_length": 33.6}
    # a KAT run that cut nothing has OPD as its matched control
    assert arm_overrides("random", base, {"mean_length": 96.0, "kept_length": 96.0}) == {"termination": "none"}
    with pytest.raises(ValueError, match="exempt=8"):
        arm_overrides("random", base, {"mean_length": 10.0, "kept_length": 7.5})
    with pytest.raises(ValueError, match="summary of the seed's KAT run"):
        arm_overrides("random", base)
    with pytest.raises(ValueError, match="unknown arm 'fixed'"):
        arm_overrides("fixed", base, KAT_RUN)
    assert arm_overrides("kat_q0.1", base) == {"termination": "kat", "rule": "quantile", "eta": 0.1}


def test_gated_contrast_and_normalisation_arms():
    base = Config(max_new_tokens=96, exempt=8)
    assert arm_overrides("kat_gated", base) == {"termination": "kat", "gate": "drift"}
    assert arm_overrides("drift_cut", base) == {"termination": "drift"}
    kat = {**KAT_RUN, "run_dir": "/runs/rich/kat/seed3"}
    assert arm_overrides("opd_norm", base, kat) == {"termination": "none",
                                                    "norm_from": "/runs/rich/kat/seed3/metrics.jsonl"}
    with pytest.raises(ValueError, match="summary of the seed's KAT run"):
        arm_overrides("opd_norm", base)


def test_seeds_are_a_count_or_a_list():
    from kat.config import ConfigError
    from experiments.arms import seed_list
    from experiments.cli import parse_seeds

    assert parse_seeds("5", "table1") == 5 and parse_seeds(None, "table1") == 3 and parse_seeds(None, "shadow") == 1
    assert parse_seeds("0,1,2,3,4", "table1") == [0, 1, 2, 3, 4] and parse_seeds("7,", "shadow") == [7]
    assert seed_list(Config(seed=10), 3) == [10, 11, 12] and seed_list(Config(seed=10), [4, 2]) == [4, 2]
    for bad, message in (("0", "count >= 1"), ("a,b", "neither a count"), ("1,1", "repeats"), (",", "empty")):
        with pytest.raises(ConfigError, match=f"^--seeds: .*{message}"):
            parse_seeds(bad, "table1")


def test_per_seed_differences_to_opd():
    from experiments.report import per_seed_table

    def row(arm, values):
        return {"arm": arm, "label": arm.upper(), "runs": [f"/o/rich/{arm}/seed{s}" for s in (0, 4)],
                "stats": {"test/avg@k": {"mean": sum(values) / 2, "std": None, "values": values}}}

    table = per_seed_table([{"arm": "before", "label": "b", "runs": ["x/seed0"], "stats": {}},
                            row("opd", [0.50, 0.40]), row("kat", [0.45, 0.43])], {"test": 4})
    lines = table.splitlines()
    assert lines[0] == "| arm | test avg@4 - OPD, seed 0 | test avg@4 - OPD, seed 4 | mean ± std |"
    assert lines[2] == f"| KAT | -5.0 | +3.0 | -1.0 ± {statistics.stdev([-5.0, 3.0]):.1f} |"
    assert len(lines) == 3


def test_fixed_caps_come_from_kats_lengths():
    base = Config(max_new_tokens=96)
    assert arm_overrides("fixed_prefix", base, KAT_RUN) == {"termination": "none", "max_new_tokens": 42,
                                                            "eval_max_new_tokens": 96}
    assert arm_overrides("fixed_n", base, KAT_RUN)["max_new_tokens"] == 34
    assert arm_overrides("fixed_n", base, {"mean_length": 500.0, "kept_length": 400.0})["max_new_tokens"] == 96


# ---------------------------------------------------------------------------------------------
# A whole (tiny) table

def test_table_matches_metrics_files(tiny_world, tmp_path):
    out = tmp_path / "exp"
    res = run_table("table1", ["kat", "random"], tiny_argv(tiny_world), 1, str(out), [None], log=lambda *a: None)
    world = res["worlds"]["custom"]
    rows = {r["arm"]: r for r in world["rows"]}
    assert list(rows) == ["teacher", "before", "random", "kat"]
    assert json.loads((out / "table1.json").read_text())["worlds"]["custom"]["rows"] == world["rows"]

    # every number equals what the run's own files say
    for arm in ("kat", "random"):
        run = out / "custom" / arm / "seed0"
        metrics = read_jsonl(run / "metrics.jsonl")
        steps = [m for m in metrics if "loss" in m]
        after = [m for m in metrics if m.get("eval") == "after"][-1]
        st = rows[arm]["stats"]
        assert st["test/avg@k"] == {"mean": after["test/avg@k"], "std": None, "values": [after["test/avg@k"]]}
        assert st["test/pass@k"]["mean"] == after["test/pass@k"]
        assert st["mean_length"]["mean"] == pytest.approx(sum(m["mean_length"] for m in steps) / 2, rel=1e-12)
        assert st["kept_length"]["mean"] == pytest.approx(sum(m["kept_length"] for m in steps) / 2, rel=1e-12)
        assert st["tokens"]["mean"] == steps[-1]["tokens_total"] == sum(m["tokens"] for m in steps)
        assert st["train_s"]["mean"] == pytest.approx(sum(m["time_rollout"] + m["time_learn"] for m in steps))
        assert st["wall_s"]["mean"] == json.loads((run / "arm.json").read_text())["wall_s"] > st["train_s"]["mean"]
        assert [p["step"] for p in summarize_run(str(run))["curve"]] == [0, 1, 2]  # before, periodic, after
    before = [m for m in read_jsonl(out / "custom" / "kat" / "seed0" / "metrics.jsonl") if m.get("eval") == "before"]
    assert rows["before"]["stats"]["test/avg@k"]["mean"] == before[0]["test/avg@k"]
    teacher = json.loads((out / "custom" / "teacher" / "seed0" / "results.json").read_text())["after"]
    assert rows["teacher"]["stats"]["test/pass@k"]["mean"] == teacher["test/pass@k"]

    # the random arm was length-matched to the KAT run's mean kept length
    kat_kept = rows["kat"]["stats"]["kept_length"]["mean"]
    random_cfg = load_config(["--config", str(out / "custom" / "random" / "seed0" / "config.yaml")])
    if kat_kept < 16 - 0.5:
        assert (random_cfg.termination, random_cfg.random_target_length) == ("random", kat_kept)
    else:
        assert random_cfg.termination == "none"
    assert world["matching"][0]["kat_kept_length"] == kat_kept

    md = (out / "table1.md").read_text()
    kat_line = next(line for line in md.splitlines() if line.startswith("| KAT |"))
    cells = [c.strip() for c in kat_line.strip("|").split("|")]
    header = next(line for line in md.splitlines() if line.startswith("| arm |"))
    assert len(cells) == len(header.strip("|").split("|"))
    assert cells[1] == f"{100 * rows['kat']['stats']['test/avg@k']['mean']:.1f}"
    assert cells[4] == f"{rows['kat']['stats']['mean_length']['mean']:.1f}"
    assert (out / "table1_custom_curves.png").stat().st_size > 5000

    # a second call reuses the finished runs (same configs) and gives the same table
    again = run_table("table1", ["kat", "random"], tiny_argv(tiny_world), 1, str(out), [None], log=lambda *a: None)
    assert again["worlds"]["custom"]["rows"] == world["rows"]


def test_mean_and_std_over_seeds_in_markdown():
    rows = [{"arm": "kat", "label": "KAT", "stats": {
        "test/avg@k": {"mean": 0.25, "std": 0.05, "values": [0.2, 0.3]},
        "mean_length": {"mean": 40.0, "std": statistics.stdev([38.0, 42.0]), "values": [38.0, 42.0]}}}]
    line = markdown_table(rows, {"test": 4}).splitlines()[2]
    assert line.startswith("| KAT | 25.0 ± 5.0 | - | - | 40.0 ± 2.8 |")


# ---------------------------------------------------------------------------------------------
# Shadow diagnostics

def record(correct: bool, cut: int | None, first_error: int | None = None, repeat_start: int | None = None) -> dict:
    return {"correct": correct, "shadow_cut": cut, "threshold": 0.1, "first_error": first_error,
            "repeat_start": repeat_start, "length": 40}


def test_shadow_summary_counts():
    recs = [record(True, None), record(True, 12), record(True, None), record(True, None),
            record(False, 20, first_error=10), record(False, 8, first_error=10),
            record(False, 30, first_error=5, repeat_start=25), record(False, None, first_error=3)]
    s = shadow_summary(recs)
    assert (s["n"], s["accuracy"], s["cut_rate"]) == (8, 0.5, 0.5)
    assert s["correct_given_cut"] == 0.25  # 1 of the 4 cut rollouts ends correct
    assert (s["cut_rate_correct"], s["cut_rate_wrong"]) == (0.25, 0.75)
    assert s["wrong_cut_at_or_after_error"] == pytest.approx(2 / 3)
    assert (s["repeat_rate"], s["cut_rate_repeating"], s["repeat_cut_inside_repeat"]) == (1 / 8, 1.0, 1.0)
    assert s["cut_rate_wrong_no_repeat"] == pytest.approx(2 / 3)
    assert s["cut_positions"] == [8, 12, 20, 30] and s["cut_position_median"] == 16
    assert s["cut_rate_gap"] == pytest.approx(0.5) and s["cut_rate_gap_ci"][0] <= 0.5 <= s["cut_rate_gap_ci"][1]


def gap_records(n_wrong: int, cut_wrong: int, n_right: int, cut_right: int, copies: int = 1) -> list[dict]:
    """One prompt per rollout outcome, each prompt sampled `copies` times with the same outcome."""
    recs = []
    for i in range(n_wrong + n_right):
        wrong = i < n_wrong
        cut = i < cut_wrong if wrong else i - n_wrong < cut_right
        recs += [{"correct": not wrong, "cut": cut, "seed": 0, "step": 1, "prompt": f"p{i}"}] * copies
    return recs


def test_cut_rate_gap_interval_matches_the_normal_approximation():
    from experiments.report import cut_rate_gap

    # 2000 wrong rollouts cut at 30%, 3000 correct ones at 20%: the independent float64 reference is
    # gap +- 1.96 sqrt(p1 q1 / n1 + p2 q2 / n2)
    g = cut_rate_gap(gap_records(2000, 600, 3000, 600))
    half = 1.96 * ((0.3 * 0.7 / 2000 + 0.2 * 0.8 / 3000) ** 0.5)
    assert g["gap"] == pytest.approx(0.1) and g["prompts"] == 5000
    assert g["ci"][0] == pytest.approx(0.1 - half, abs=0.1 * half)
    assert g["ci"][1] == pytest.approx(0.1 + half, abs=0.1 * half)
    assert cut_rate_gap(gap_records(0, 0, 10, 3)) is None  # no wrong rollout: no gap


def test_cut_rate_gap_draws_the_samples_of_one_prompt_together():
    from experiments.report import cut_rate_gap

    single = cut_rate_gap(gap_records(40, 12, 60, 6))
    paired = cut_rate_gap(gap_records(40, 12, 60, 6, copies=2))
    assert paired == {**single, "prompts": 100}  # two identical samples per prompt add no information
    apart = cut_rate_gap([{**r, "prompt": f"{r['prompt']}-{j}"} for j, r in
                          enumerate(gap_records(40, 12, 60, 6, copies=2))])
    assert apart["ci"][1] - apart["ci"][0] < 0.8 * (paired["ci"][1] - paired["ci"][0])  # treated as independent


def test_examples_are_cut_rollouts_of_distinct_prompts_first():
    recs = [{**record(ok, cut), "prompt": p} for ok, cut, p in
            ((False, None, "a"), (False, 5, "b"), (False, 7, "b"), (True, 3, "c"), (False, 9, "c"))]
    picked = pick_examples(recs, False, n=3)
    assert [(r["prompt"], r["shadow_cut"]) for r in picked] == [("b", 5), ("c", 9), ("a", None)]
    assert [r["prompt"] for r in pick_examples(recs, True)] == ["c"]


def test_shadow_rollouts_record_what_the_detector_decides(tiny_world):
    from kat.terminators import TrapDetector
    from kat.evaluate import grade
    from kat.models import load_model
    from kat.toy.world import read_jsonl as toy_rows

    cfg = load_config(tiny_argv(tiny_world))
    tok = tiny_world["tokenizer"]
    student = load_model(cfg.student, "", torch.float32, "student").eval()
    teacher = load_model(cfg.teacher, "", torch.float32, "teacher").eval()
    detector = TrapDetector(window=4, stride=2, patience=1, exempt=2, eta=0.5, buffer_size=64, min_buffer=4,
                            warmup_steps=1, shadow=True)
    recs = shadow_rollouts(student, teacher, tok, toy_rows(cfg.train_data), cfg, detector, batches=2)
    assert len(recs) == 2 * 4 and detector.active
    assert {r["threshold"] for r in recs} == {detector.threshold}  # fixed while recording
    for r in recs:
        assert r["correct"] == grade(r["completion"], r["answer"]) and len(r["kl"]) == len(r["z"]) == r["length"]
        assert r["stop"] in ("eos", "length")  # shadow mode never stops a row
        if r["shadow_cut"] is not None:  # the decision: `patience` window(s) below the threshold
            start = r["shadow_cut"]
            assert start >= 2 and r["z"][start + 3] < r["threshold"]
    assert any(r["shadow_cut"] is not None for r in recs) and all(not math.isnan(x) for r in recs for x in r["kl"])

    # the example pictures draw the threshold each rollout was judged against, and its outcome
    import matplotlib.pyplot as plt

    from kat.plot import traces_figure

    fig = traces_figure(as_traces(recs[:3], cfg))
    for ax, r in zip(fig.axes, recs):
        (thr,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("threshold")]
        assert set(thr.get_ydata()) == {r["threshold"]}
        assert ("answer correct" if r["correct"] else "answer wrong") in ax.get_title("left")
    plt.close(fig)


def test_shadow_batches_are_the_training_loops_batches(tiny_world, tmp_path):
    """At the same step the shadow loop samples the prompts and tokens, and scores the KL, that
    kat.train.train does (its traces hold the step's rollouts, sampled before the update)."""
    from kat.terminators import TrapDetector
    from kat.models import load_model
    from kat.train import train

    cfg = load_config(tiny_argv(tiny_world) + ["--steps", "1", "--eval_data", "", "--n_traces", "4", "--shadow",
                                               "true", "--output_dir", str(tmp_path / "run")])
    train(cfg)
    traces = read_jsonl(tmp_path / "run" / "traces.jsonl")
    tok = tiny_world["tokenizer"]
    student = load_model(cfg.student, "", torch.float32, "student").eval()
    teacher = load_model(cfg.teacher, "", torch.float32, "teacher").eval()
    detector = TrapDetector(window=4, stride=2, patience=1, exempt=2, eta=0.5, min_buffer=1, warmup_steps=0,
                            shadow=True)
    detector.load_state_dict({"rule": "quantile", "buffer": torch.tensor([0.1], dtype=torch.float64),
                              "steps_done": 1, "z_mean": None, "z_var": None})  # armed: no calibration batch
    recs = shadow_rollouts(student, teacher, tok, train_problems(tok, cfg), cfg, detector, batches=1)
    assert len(recs) == len(traces) == 4 and {r["step"] for r in recs} == {0}
    for r, t in zip(recs, traces):
        assert r["completion"] == "".join(x for x in t["tokens"] if x not in tok.all_special_tokens)
        assert r["kl"] == t["kl"] and r["length"] == len(t["tokens"])


@pytest.mark.slow
def test_shadow_experiment_summarises_its_rollout_files(tiny_world, tmp_path):
    out = tmp_path / "shadow"
    res = run_shadow(tiny_argv(tiny_world) + ["--warmup_steps", "0", "--eval_data", ""], 1, str(out), [None],
                     batches=1, log=lambda *a: None)
    run = out / "custom" / "shadow" / "seed0"
    cfg = load_config(["--config", str(run / "config.yaml")])
    assert cfg.shadow and cfg.termination == "kat"
    metrics = [m for m in read_jsonl(run / "metrics.jsonl") if "loss" in m]
    assert all(m["cut_rate"] == 0 for m in metrics)  # shadow mode cuts nothing
    world = res["worlds"]["custom"]
    assert world["shadow_rate_during_training"] == pytest.approx(sum(m["shadow_rate"] for m in metrics) / 2)
    for point in ("before", "after"):
        recs = read_jsonl(run / "diagnostics" / f"rollouts_{point}.jsonl")
        assert len(recs) == 4 and world["summary"][point] == shadow_summary(recs)
    assert json.loads((out / "shadow.json").read_text())["worlds"]["custom"]["summary"] == world["summary"]
    assert "| cut rollouts that still end correct |" in (out / "shadow.md").read_text()


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_world, tmp_path):
    lines = []
    out = tmp_path / "experiments"
    run_shadow(tiny_argv(tiny_world), 2, str(out), [None], batches=3, dry_run=True, log=lines.append)
    run_table("sensitivity", ["kat_p3", "opd"], tiny_argv(tiny_world), 1, str(out), [None], dry_run=True,
              log=lines.append)
    assert not out.exists()
    assert lines[0].startswith("[shadow] world ") and "2 runs of 2 steps" in lines[0] and "3 graded batches" in lines[0]
    assert lines[1].startswith("[sensitivity] world ") and lines[1].endswith("arms: kat_p3, opd")


# ---------------------------------------------------------------------------------------------
# House rules for these modules

def test_git_commit_names_this_checkout():
    import subprocess

    from experiments.runs import git_commit

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    if head.returncode != 0:
        assert git_commit() == "unknown"
    else:
        assert git_commit().removesuffix("+dirty") == head.stdout.strip()


def test_experiment_modules_stay_small():
    """No function over 80 lines and no module over 500 in the experiments, plots and toy stats."""
    import ast

    files = [*sorted((ROOT / "experiments").glob("*.py")), ROOT / "kat" / "plot.py"]
    for path in files:
        text = path.read_text()
        assert len(text.splitlines()) <= 500, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno + 1 <= 80, f"{path.name}: {node.name}"


@pytest.mark.parametrize("argv, new", [
    (["experiment", "table1", "--seeds", "5"], "python -m experiments table1 --seeds 5"),
    (["toy", "build", "--world", "rich"], "python -m experiments toy build --world rich"),
    (["bench", "kl"], "python benchmarks/run.py kl")])
def test_moved_package_commands_name_their_new_command(argv, new, capsys):
    from kat.__main__ import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"`{new}`" in err[0], err


def test_the_installed_package_does_not_import_the_experiments():
    """kat/ is what pip installs; experiments/ and benchmarks/ stay in the source checkout."""
    import ast

    for path in (ROOT / "kat").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not any(n.split(".")[0] in ("experiments", "benchmarks") for n in names), path


def test_experiments_toy_command_needs_build_or_stats(capsys):
    from experiments.__main__ import main

    assert main(["toy", "train"]) == 2
    assert "build" in capsys.readouterr().err
