"""Summaries and tables: runs of an arm reduced over seeds, shadow rollouts reduced to rates, and
their markdown."""

from __future__ import annotations

import json
import os
import statistics

from kat.config import Config
from experiments.arms import LABELS, LENGTH_MATCHED, ROW_ORDER, describe_overrides
from experiments.runs import eval_specs

TRAIN_COLUMNS = ("mean_length", "kept_length", "cut_rate", "tokens", "train_s", "wall_s")


def write_report(out: str, name: str, result: dict, md: list[str], log) -> None:
    """An experiment's two outputs: out/NAME.json (the numbers) and out/NAME.md (the tables)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    with open(os.path.join(out, f"{name}.md"), "w") as fh:
        fh.write("\n".join(md))
    log(f"wrote {os.path.join(out, name + '.md')} and {name}.json")


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1) over seeds; std is None for a single seed."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": list(values)}


def table_rows(summaries: dict[str, list[dict]], teacher: list[dict]) -> list[dict]:
    """Rows of the table: teacher, student before (from each seed's first run), then the arms.

    Each statistic is the mean and std over seeds; train_s_vs_opd is the ratio of an arm's training
    time to OPD's in the same seed.
    """
    rows = []
    if teacher:
        rows.append({"arm": "teacher", "seeds": len(teacher),
                     "stats": {k: mean_std([t[k] for t in teacher]) for k in teacher[0]}})
    firsts = [runs[0] for runs in zip(*summaries.values())] if summaries else []
    if firsts and firsts[0]["before"]:
        rows.append({"arm": "before", "seeds": len(firsts), "runs": [s["run_dir"] for s in firsts],
                     "stats": {k: mean_std([s["before"][k] for s in firsts]) for k in firsts[0]["before"]}})
    for arm in sorted(summaries, key=ROW_ORDER.index):
        runs = summaries[arm]
        stats = {k: mean_std([s["after"][k] for s in runs]) for k in runs[0]["after"]}
        stats.update({k: mean_std([s[k] for s in runs]) for k in TRAIN_COLUMNS})
        if "opd" in summaries:  # the machine's load drifts between seeds; within a seed arms run back to back
            stats["train_s_vs_opd"] = mean_std([s["train_s"] / o["train_s"] for s, o in zip(runs, summaries["opd"])])
        rows.append({"arm": arm, "seeds": len(runs), "runs": [s["run_dir"] for s in runs], "stats": stats})
    for row in rows:
        row["label"] = LABELS.get(row["arm"], row["arm"])
    return rows


def fmt(stat: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    """'mean ± std' of a mean_std dict ('-' when missing, the mean alone for one seed)."""
    if stat is None:
        return "-"
    text = f"{scale * stat['mean']:.{digits}f}"
    return text if stat["std"] is None else f"{text} ± {scale * stat['std']:.{digits}f}"


def markdown_table(rows: list[dict], ks: dict[str, int] | None = None) -> str:
    """avg@k, pass@k and the eval length per evaluation set (`ks`: each set's k), then the training columns."""
    sets = sorted({key.split("/")[0] for r in rows for key in r["stats"] if key.endswith("/avg@k")})
    k = {s: (ks or {}).get(s, "k") for s in sets}
    head = [f"{s} {m}@{k[s]}" for s in sets for m in ("avg", "pass")] + [f"{s} eval length" for s in sets]
    head += ["gen. length", "kept length", "cut rate", "tokens generated", "train s", "train time / OPD", "wall s"]
    lines = ["| arm | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for r in rows:
        st = r["stats"].get
        cells = [fmt(st(f"{s}/{m}@k"), 100) for s in sets for m in ("avg", "pass")]
        cells += [fmt(st(f"{s}/mean_length")) for s in sets]
        cells += [fmt(st("mean_length")), fmt(st("kept_length")), fmt(st("cut_rate"), 100),
                  fmt(st("tokens"), digits=0), fmt(st("train_s"), digits=0), fmt(st("train_s_vs_opd"), digits=2),
                  fmt(st("wall_s"), digits=0)]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(rows: list[dict], ks: dict[str, int] | None = None) -> str:
    """Per seed, avg@k of each arm minus OPD's in the same seed (points), and the mean and std of
    those differences: the paired comparison, free of the spread that seeds share."""
    runs = {r["arm"]: r for r in rows if r["arm"] not in ("teacher", "before")}
    opd = runs["opd"]["stats"]
    sets = sorted(key.split("/")[0] for key in opd if key.endswith("/avg@k"))
    seeds = [run.rstrip("/").rsplit("seed", 1)[-1] for run in runs["opd"]["runs"]]
    head = [f"{s} avg@{(ks or {}).get(s, 'k')} - OPD, seed {seed}" for s in sets for seed in seeds]
    lines = ["| arm | " + " | ".join(head + ["mean ± std"] * len(sets)) + " |",
             "|---" * (len(head) + len(sets) + 1) + "|"]
    for arm, r in runs.items():
        if arm == "opd":
            continue
        cells, means = [], []
        for s in sets:
            diffs = [100 * (a - o) for a, o in zip(r["stats"][f"{s}/avg@k"]["values"], opd[f"{s}/avg@k"]["values"])]
            cells += [f"{d:+.1f}" for d in diffs]
            means.append(fmt(mean_std(diffs)))
        lines.append(f"| {r['label']} | " + " | ".join(cells + means) + " |")
    return "\n".join(lines)


def matching_line(matching: dict) -> str:
    """What each seed's length-matched arms were set to, from its KAT run."""
    return "Length matching per seed: " + "; ".join(
        f"seed {s}: KAT generated {m['kat_mean_length']:.1f} / kept {m['kat_kept_length']:.1f} tokens per "
        "rollout" + "".join(f", {a} {describe_overrides(o)}" for a, o in m.items() if a in LENGTH_MATCHED)
        for s, m in matching.items())


def eval_sets_text(cfg: Config) -> str:
    return ", ".join(f"{s.name} ({s.limit or 'all'} problems x k={s.k})" for s in eval_specs(cfg))


def setup_line(cfg: Config) -> str:
    det = (f"quantile eta={cfg.eta}" if cfg.rule == "quantile" else f"zscore kappa={cfg.kappa}")
    return (f"{cfg.steps} steps x {cfg.batch_size} prompts x {cfg.samples_per_prompt} samples, "
            f"max_new_tokens {cfg.max_new_tokens}, loss {cfg.loss}, lr {cfg.lr}; detector W={cfg.window} "
            f"stride={cfg.stride} patience={cfg.patience} exempt={cfg.exempt} {det}; evaluation: "
            + eval_sets_text(cfg) + f" at temperature {cfg.eval_temperature}, every {cfg.eval_every} steps")


def plan_line(name: str, order: list[str], seeds: int | list[int], cfg: Config, label: str) -> str:
    """What an experiment will run, printed before it starts."""
    evals = (cfg.steps - 1) // cfg.eval_every + 2  # before, periodic ones, after
    n = len(seeds) if isinstance(seeds, (list, tuple)) else seeds
    return (f"[{name}] world {label}: {len(order)} arms x {n} seeds = {len(order) * n} runs of {cfg.steps} "
            f"steps x {cfg.batch_size * cfg.samples_per_prompt} rollouts (<= {cfg.max_new_tokens} tokens), "
            f"{evals} evaluations per run on {eval_sets_text(cfg) or 'no set'}; arms: {', '.join(order)}")


# ---------------------------------------------------------------------------------------------
# Shadow diagnostics

def share(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def cut_rate_gap(records: list[dict], n_boot: int = 10000, seed: int = 0) -> dict | None:
    """cut_rate_wrong - cut_rate_correct (`records` carry `cut` and `correct`) with a 95% percentile
    interval from a bootstrap over prompts: the samples of one prompt (same seed, step and prompt
    text) are drawn together, since they share the prompt's difficulty. None unless both outcomes
    occur. A rule that tells failing rollouts from healthy ones has an interval above 0."""
    import numpy as np

    groups: dict = {}
    for r in records:
        groups.setdefault((r.get("seed"), r.get("step"), r.get("prompt")), []).append(r)
    # per prompt: wrong rollouts, wrong ones cut, correct rollouts, correct ones cut
    counts = np.array([[sum(not r["correct"] for r in g), sum(not r["correct"] and r["cut"] for r in g),
                        sum(r["correct"] for r in g), sum(r["correct"] and r["cut"] for r in g)]
                       for g in groups.values()], dtype=float)
    if not counts[:, 0].sum() or not counts[:, 2].sum():
        return None

    def gap(c):  # c: (..., 4) sums over prompts
        return c[..., 1] / c[..., 0] - c[..., 3] / c[..., 2]

    k = len(counts)
    draws = np.random.default_rng(seed).integers(0, k, size=(n_boot, k))
    weights = np.stack([np.bincount(d, minlength=k) for d in draws]).astype(float)
    boot = weights @ counts  # (n_boot, 4)
    ok = (boot[:, 0] > 0) & (boot[:, 2] > 0)  # resamples holding both outcomes
    lo, hi = np.percentile(gap(boot[ok]), [2.5, 97.5])
    return {"gap": float(gap(counts.sum(0))), "ci": [float(lo), float(hi)], "prompts": k}


def shadow_summary(records: list[dict], cut_key: str = "shadow_cut") -> dict:
    """What the shadow detector would have cut, split by how the rollouts end.

    correct_given_cut: of the rollouts it would cut, the share that still end correct (cuts of
    recoverable rollouts). cut_rate_wrong vs cut_rate_correct: the separation the method rests on.
    With toy positions: of cut wrong rollouts, the share cut at or after their first error; of cut
    repeating rollouts, the share cut inside the repetition. `cut_key`: the record field holding
    the cuts of the rule to summarise (shadow_cut: the recorded detector's; cut_gated, cut_drift:
    replayed rules, experiments.shadow.replay_cuts).
    """
    records = [{**r, "shadow_cut": r.get(cut_key)} for r in records]
    cut = [r["shadow_cut"] is not None for r in records]
    right = [r["correct"] for r in records]
    out = {
        "n": len(records),
        "accuracy": share(right),
        "cut_rate": share(cut),
        "correct_given_cut": share([ok for ok, c in zip(right, cut) if c]),
        "cut_rate_correct": share([c for ok, c in zip(right, cut) if ok]),
        "cut_rate_wrong": share([c for ok, c in zip(right, cut) if not ok]),
        "cut_positions": sorted(r["shadow_cut"] for r in records if r["shadow_cut"] is not None),
        "threshold": pooled_threshold(records),
    }
    gap = cut_rate_gap([{**r, "cut": c} for r, c in zip(records, cut)])
    out["cut_rate_gap"] = None if gap is None else gap["gap"]
    out["cut_rate_gap_ci"] = None if gap is None else gap["ci"]
    pos = out["cut_positions"]
    out["cut_position_mean"] = statistics.fmean(pos) if pos else None
    out["cut_position_median"] = statistics.median(pos) if pos else None
    if records and "repeat_start" in records[0]:
        out.update(toy_summary(records))
    if records and "drift" in records[0]:
        out.update(drift_summary(records))
    return out


def drift_summary(records: list[dict]) -> dict:
    """How often rollouts hold a drift token (teacher probability < drift_prob at or after exempt),
    by outcome, and (toy) where the first one sits relative to the first error."""
    drift = [r["drift"] is not None for r in records]
    out = {"drift_rate_correct": share([d for d, r in zip(drift, records) if r["correct"]]),
           "drift_rate_wrong": share([d for d, r in zip(drift, records) if not r["correct"]])}
    if "repeat_start" in records[0]:
        out["drift_rate_repeating"] = share([d for d, r in zip(drift, records) if r["repeat_start"] is not None])
        lags = [r["drift"] - r["first_error"] for r in records
                if not r["correct"] and r["drift"] is not None and r.get("first_error") is not None]
        if "first_error" in records[0]:
            out["drift_lag_median"] = statistics.median(lags) if lags else None
    return out


def toy_summary(records: list[dict]) -> dict:
    """Where the cuts fall relative to the first repetition (the toy world's repeated step, or a
    loop found in a real model's tokens) and, in the toy world, the first error."""
    wrong_cut = [r for r in records if not r["correct"] and r["shadow_cut"] is not None]
    rep = [r for r in records if r.get("repeat_start") is not None]
    out = {
        "repeat_rate": share([r.get("repeat_start") is not None for r in records]),
        "cut_rate_repeating": share([r["shadow_cut"] is not None for r in rep]),
        "cut_rate_wrong_no_repeat": share([r["shadow_cut"] is not None for r in records
                                           if not r["correct"] and r.get("repeat_start") is None]),
        "repeat_cut_inside_repeat": share([r["shadow_cut"] >= r["repeat_start"] for r in rep
                                           if r["shadow_cut"] is not None]),
        "cuts_inside_repeat": share([r.get("repeat_start") is not None and r["shadow_cut"] >= r["repeat_start"]
                                     for r in records if r["shadow_cut"] is not None]),
    }
    if "first_error" in records[0]:
        out["wrong_cut_at_or_after_error"] = share([r["first_error"] is not None and r["shadow_cut"] >= r["first_error"]
                                                    for r in wrong_cut])
    return out


def pooled_threshold(records: list[dict]) -> float | list[float] | None:
    """The records' detector threshold; for records pooled from runs calibrated apart, the distinct
    thresholds in the order they first appear."""
    found = list(dict.fromkeys(r["threshold"] for r in records))
    return None if not found else found[0] if len(found) == 1 else found


SHADOW_ROWS = (
    ("n", "rollouts", None), ("accuracy", "accuracy", 100), ("threshold", "threshold s", 1),
    ("cut_rate", "would-be cut (all)", 100), ("correct_given_cut", "cut rollouts that still end correct", 100),
    ("cut_rate_correct", "cut rate, rollouts ending correct", 100),
    ("cut_rate_wrong", "cut rate, rollouts ending wrong", 100),
    ("cut_rate_gap", "cut rate wrong - correct [95% CI over prompts]", "points"),
    ("repeat_rate", "rollouts repeating a step", 100),
    ("cut_rate_repeating", "cut rate, repeating rollouts", 100),
    ("cut_rate_wrong_no_repeat", "cut rate, wrong without repetition", 100),
    ("wrong_cut_at_or_after_error", "cut wrong rollouts cut at/after their first error", 100),
    ("repeat_cut_inside_repeat", "cut repeating rollouts cut inside the repetition", 100),
    ("cuts_inside_repeat", "cuts that fall inside a repetition (all cuts)", 100),
    ("cut_position_median", "median cut position", 1),
    ("drift_rate_correct", "rollouts with a drift token, ending correct", 100),
    ("drift_rate_wrong", "rollouts with a drift token, ending wrong", 100),
    ("drift_rate_repeating", "rollouts with a drift token, repeating", 100),
    ("drift_lag_median", "median first drift - first error (wrong rollouts)", 1),
)


def shadow_markdown(summary: dict[str, dict], prefix: str = "student ") -> str:
    """One column per point (before / after training; or any labelled summaries, with `prefix` ""),
    one row per statistic (percentages)."""
    points = list(summary)
    suffix = " training" if prefix else ""
    lines = ["| | " + " | ".join(f"{prefix}{p}{suffix}" for p in points) + " |", "|---" * (len(points) + 1) + "|"]
    for key, name, scale in SHADOW_ROWS:
        if not any(key in summary[p] for p in points):
            continue
        cells = []
        for p in points:
            v = summary[p].get(key)
            if scale == "points":  # a difference of two rates, in percentage points, with its interval
                ci = summary[p].get(f"{key}_ci")
                cells.append("-" if v is None else f"{100 * v:+.1f}" +
                             ("" if ci is None else f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"))
                continue
            cells.append("-" if v is None else str(v) if scale is None else
                         " / ".join(f"{x:.3g}" for x in v) if isinstance(v, list) else
                         f"{scale * v:.1f}%" if scale == 100 else f"{v:.3g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
