"""Evaluation with power: every arm's final student on the same fresh held-out toy problems, and each
arm's paired difference to OPD with a 95% bootstrap interval over seeds and problems.

    python -m experiments power --config configs/toy.yaml --world rich --seeds 0,1,2 \
        --arms opd,oracle,kat,kat_gated,random_matched --heldout 1024 [--key value ...]

Held-out problems are drawn from the world's generator and exclude every prompt of its train.jsonl
and test.jsonl. Each seed's runs are trained by experiments.table.run_arms (cached as there), then each
final student samples k completions per held-out problem with the same evaluation seed in every arm
(common random numbers across arms). The unit of a paired difference is (seed, problem): d[s, p] =
avg@k of the arm minus avg@k of OPD on problem p in seed s.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from experiments.arms import LABELS, base_config, seed_list, world_name
from experiments.report import write_report
from experiments.runs import git_commit
from experiments.table import arm_order, run_arms

POWER_ARMS = ("opd", "oracle", "kat", "kat_gated", "random_matched")


def heldout_problems(data_files: list[str], n: int, seed: int) -> list[dict]:
    """`n` fresh problems of the toy world's difficulty, none of whose prompts is in `data_files`."""
    from experiments.toy_build import DIFFICULTY
    from kat.toy.world import make_split, read_jsonl

    seen = {r["prompt"] for path in data_files for r in read_jsonl(path)}
    return make_split(n, seed, exclude=seen, **DIFFICULTY)


def bootstrap_means(diff: np.ndarray, seed_idx: np.ndarray, prob_idx: np.ndarray) -> np.ndarray:
    """(B,) mean of diff[seed_idx[b]][:, prob_idx[b]] per replicate b, in float64.

    diff: (S, P); seed_idx: (B, S), prob_idx: (B, P) resampled indices. The crossed design: a
    replicate draws seeds and problems independently and takes every (seed, problem) pair of the draw.
    """
    diff = np.asarray(diff, dtype=np.float64)
    S, P = diff.shape
    ws = np.stack([np.bincount(r, minlength=S) for r in seed_idx]).astype(np.float64) / S  # (B, S)
    wp = np.stack([np.bincount(r, minlength=P) for r in prob_idx]).astype(np.float64) / P  # (B, P)
    return np.einsum("bs,sp,bp->b", ws, diff, wp)


def paired_bootstrap(diff: np.ndarray, n_boot: int = 10000, seed: int = 0) -> dict:
    """Mean of the paired differences diff (S seeds x P problems), its bootstrap standard error and
    95% percentile interval, resampling seeds and problems (crossed)."""
    diff = np.asarray(diff, dtype=np.float64)
    S, P = diff.shape
    rng = np.random.default_rng(seed)
    means = bootstrap_means(diff, rng.integers(0, S, (n_boot, S)), rng.integers(0, P, (n_boot, P)))
    lo, hi = np.quantile(means, [0.025, 0.975])
    return {"mean": float(diff.mean()), "se": float(means.std(ddof=1)), "lo": float(lo), "hi": float(hi),
            "seeds": S, "problems": P, "n_boot": n_boot}


def variance_parts(diff: np.ndarray) -> dict:
    """The two sources of the standard error of the mean of diff (S x P), by the method of moments:
    between seeds (var of the seed means, less its problem-noise share) and within (problem x seed).
    se^2 ~= v_seed / S + v_within / (S P); what one more seed or more problems would buy follows."""
    diff = np.asarray(diff, dtype=np.float64)
    S, P = diff.shape
    seed_means = diff.mean(axis=1)
    v_within = float(((diff - seed_means[:, None]) ** 2).sum() / (S * (P - 1)))
    v_seed = max(float(seed_means.var(ddof=1)) - v_within / P, 0.0) if S > 1 else math.nan
    return {"v_seed": v_seed, "v_within": v_within}


def predicted_se(parts: dict, seeds: int, problems: int) -> float:
    return math.sqrt(parts["v_seed"] / seeds + parts["v_within"] / (seeds * problems))


def evaluate_heldout(run_dir: str, problems: list[dict], k: int, max_new_tokens: int, eval_seed: int,
                     tag: str, log=print) -> dict:
    """The run's final student on `problems` (k samples each): per-problem correct counts, cached in
    run_dir/heldout_<tag>.json."""
    import torch

    from kat.evaluate import evaluate
    from kat.models import load_model, load_tokenizer

    path = os.path.join(run_dir, f"heldout_{tag}.json")
    if os.path.isfile(path):
        with open(path) as fh:
            cached = json.load(fh)
        if cached["prompts"] == [p["prompt"] for p in problems] and cached["k"] == k:
            return cached
    t0 = time.perf_counter()
    student_dir = os.path.join(run_dir, "student") if os.path.isdir(os.path.join(run_dir, "student")) else run_dir
    tok = load_tokenizer(student_dir, "", "student")
    model = load_model(student_dir, "", torch.float32, "student").eval()
    res = evaluate(model, tok, problems, k, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0,
                   batch_size=256, seed=eval_seed)
    out = {"prompts": [p["prompt"] for p in problems], "k": k, "eval_seed": eval_seed,
           "correct": [sum(r["correct"]) for r in res["problems"]], "avg@k": res["avg@k"],
           "pass@k": res["pass@k"], "mean_length": res["mean_length"], "wall_s": time.perf_counter() - t0}
    with open(path, "w") as fh:
        json.dump(out, fh)
    log(f"  held-out {run_dir}: avg@{k} {100 * res['avg@k']:.1f} in {out['wall_s']:.0f} s")
    return out


def problem_scores(correct: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per problem avg@k (share of the k samples correct) and pass@k (any sample correct), from the
    correct counts of evaluate_heldout."""
    c = np.asarray(correct, dtype=np.float64)
    return c / k, (c > 0).astype(np.float64)


def run_power(argv: list[str], seeds, out: str, world: str | None, arms: list[str], n_heldout: int,
              heldout_seed: int = 7_000_003, dry_run: bool = False, command: str = "", log=print) -> dict:
    """Train (or reuse) every arm x seed, evaluate all on the same held-out problems, bootstrap."""
    base = base_config(argv, world)
    label = world or world_name(base)
    order = arm_order(arms)
    seeds = seed_list(base, seeds)
    log(f"power, {label}: arms {', '.join(order)} x seeds {seeds}, {n_heldout} held-out problems x k {base.eval_k}")
    if dry_run:
        return {}
    files = [f for f in (base.train_data, base.eval_data) if f and os.path.isfile(f)]
    problems = heldout_problems(files, n_heldout, heldout_seed)
    t0 = time.perf_counter()
    summaries, _, matching = run_arms(order, base, seeds, out, label, teacher=False, log=log)
    t_train = time.perf_counter() - t0
    scores, passes, lengths = {}, {}, {}  # arm -> (S, P) avg@k and pass@k per problem; held-out mean length per seed
    for arm in order:
        rows, prow, lrow = [], [], []
        for seed, summary in zip(seeds, summaries[arm]):
            res = evaluate_heldout(summary["run_dir"], problems, base.eval_k, base.eval_max_new_tokens or
                                   base.max_new_tokens, eval_seed=1_000 + seed, tag=f"{n_heldout}_{heldout_seed}",
                                   log=log)
            avg, pas = problem_scores(res["correct"], base.eval_k)
            rows.append(avg)
            prow.append(pas)
            lrow.append(res["mean_length"])
        scores[arm], passes[arm], lengths[arm] = np.stack(rows), np.stack(prow), lrow
    result = {"command": command, "commit": git_commit(), "world": label, "seeds": seeds,
              "heldout": {"n": n_heldout, "seed": heldout_seed, "excluded": files}, "config": base.to_dict(),
              "train_minutes": t_train / 60, "minutes": (time.perf_counter() - t0) / 60, "arms": {},
              "matching": {str(s): m for s, m in matching.items()}}
    for arm in order:
        s = summaries[arm]
        entry = {"avg@k": 100 * float(scores[arm].mean()), "per_seed": [100 * float(x) for x in scores[arm].mean(1)],
                 "pass@k": 100 * float(passes[arm].mean()), "heldout_length": float(np.mean(lengths[arm])),
                 "kept_length": float(np.mean([x["kept_length"] for x in s])),
                 "mean_length": float(np.mean([x["mean_length"] for x in s])),
                 "cut_rate": float(np.mean([x["cut_rate"] for x in s])),
                 "train_wall_s": float(np.mean([x["wall_s"] for x in s]))}
        if arm != "opd" and "opd" in scores:
            d = 100 * (scores[arm] - scores["opd"])
            entry["vs_opd"] = paired_bootstrap(d)
            parts = variance_parts(d)
            entry["vs_opd"]["parts"] = parts
            entry["vs_opd"]["se_plus_seed"] = predicted_se(parts, len(seeds) + 1, n_heldout)
            entry["vs_opd"]["se_2x_problems"] = predicted_se(parts, len(seeds), 2 * n_heldout)
        result["arms"][arm] = entry
    write_report(out, f"power_{label}", result, power_markdown(result, base.eval_k), log)
    return result


def power_markdown(result: dict, k: int) -> list[str]:
    md = [f"# power, {result['world']} world", "", f"`{result['command']}` at commit {result['commit']}", "",
          f"seeds {result['seeds']}; {result['heldout']['n']} held-out problems x k = {k}; "
          f"{result['minutes']:.1f} min", "",
          f"| arm | avg@{k} | pass@{k} | per seed | held-out length | generated / rollout | kept / rollout | cut rate "
          f"| avg@{k} - OPD [95% CI] | SE | SE +1 seed | SE 2x problems |", "|---" * 12 + "|"]
    for arm, e in result["arms"].items():
        per = ", ".join(f"{x:.1f}" for x in e["per_seed"])
        row = (f"| {LABELS.get(arm, arm)} | {e['avg@k']:.1f} | {e['pass@k']:.1f} | {per} | {e['heldout_length']:.1f} "
               f"| {e['mean_length']:.1f} | {e['kept_length']:.1f} | {e['cut_rate']:.1%} |")
        if "vs_opd" in e:
            v = e["vs_opd"]
            row += (f" {v['mean']:+.2f} [{v['lo']:+.2f}, {v['hi']:+.2f}] | {v['se']:.2f} | {v['se_plus_seed']:.2f} |"
                    f" {v['se_2x_problems']:.2f} |")
        else:
            row += " | | | |"
        md.append(row)
    return md + [""]
