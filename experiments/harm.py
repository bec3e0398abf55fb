"""The harm regime's reading across two losses (docs/results/toy_harm.md): what `python -m experiments
power` cannot pair by itself, because the two losses are two of its runs.

    python -m experiments.harm --sampled runs/harm_sampled --full runs/harm_full --world repeat

For each seed it reads every arm's held-out correct counts (the same problems and evaluation seed in
both runs) and gives, with the crossed bootstrap of experiments.power:
- OPD's truncation rate (1 - eos_rate) over the first and the last 5 training steps, per loss;
- OPD with the sampled-token loss minus OPD with the full loss (criterion 1);
- each arm's gain over OPD under each loss, and the oracle's sampled gain minus its full gain
  (criterion 4, paired by seed and problem).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

from experiments.power import paired_bootstrap, problem_scores


def heldout_avg(run_dir: str) -> np.ndarray:
    """(P,) per-problem avg@k of a run's held-out evaluation (its one heldout_*.json)."""
    files = sorted(glob.glob(os.path.join(run_dir, "heldout_*.json")))
    if len(files) != 1:
        raise FileNotFoundError(f"{run_dir}: expected one heldout_*.json, found {len(files)}")
    with open(files[0]) as fh:
        record = json.load(fh)
    return problem_scores(record["correct"], record["k"])[0]


def scores(out: str, world: str, arm: str, seeds: list[int]) -> np.ndarray:
    """(S, P) per-problem avg@k, in points, of `arm` over `seeds`."""
    return 100.0 * np.stack([heldout_avg(os.path.join(out, world, arm, f"seed{s}")) for s in seeds])


def truncation(out: str, world: str, arm: str, seeds: list[int], n: int = 5) -> tuple[float, float]:
    """Mean 1 - eos_rate of the training rollouts over the first and the last `n` steps, over seeds."""
    first, last = [], []
    for s in seeds:
        with open(os.path.join(out, world, arm, f"seed{s}", "metrics.jsonl")) as fh:
            rows = [r for r in map(json.loads, fh) if "eos_rate" in r]
        first.append(np.mean([1.0 - r["eos_rate"] for r in rows[:n]]))
        last.append(np.mean([1.0 - r["eos_rate"] for r in rows[-n:]]))
    return float(np.mean(first)), float(np.mean(last))


def line(name: str, diff: np.ndarray) -> str:
    b = paired_bootstrap(diff)
    return f"| {name} | {b['mean']:+.2f} [{b['lo']:+.2f}, {b['hi']:+.2f}] | {b['se']:.2f} |"


def report(sampled: str, full: str, world: str, seeds: list[int], arms: list[str]) -> str:
    runs = {"sampled": sampled, "full": full}
    score = {(loss, arm): scores(out, world, arm, seeds) for loss, out in runs.items() for arm in arms}
    out = [f"seeds {seeds}; {score[('sampled', 'opd')].shape[1]} held-out problems", "",
           "| OPD's truncation rate, first 5 -> last 5 steps | sampled | full |", "|---|---|---|"]
    (fs, ls), (ff, lf) = (truncation(runs[loss], world, "opd", seeds) for loss in ("sampled", "full"))
    out += [f"| 1 - eos_rate | {fs:.3f} -> {ls:.3f} | {ff:.3f} -> {lf:.3f} |", "",
            "| paired difference (avg@4 points) | mean [95% CI] | SE |", "|---|---|---|",
            line("OPD sampled - OPD full", score[("sampled", "opd")] - score[("full", "opd")])]
    for arm in arms[1:]:
        for loss in runs:
            out.append(line(f"{arm} - OPD, {loss}", score[(loss, arm)] - score[(loss, "opd")]))
    if "oracle" in arms:
        gain = {loss: score[(loss, "oracle")] - score[(loss, "opd")] for loss in runs}
        out.append(line("oracle's gain: sampled - full", gain["sampled"] - gain["full"]))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sampled", required=True, help="the power run's --out with loss: sampled")
    parser.add_argument("--full", required=True, help="the same run's --out with --loss full")
    parser.add_argument("--world", default="repeat", help="the world folder inside each --out")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--arms", default="opd,oracle,kat,kat_gated,random_matched", help="opd first")
    args = parser.parse_args(argv)
    print(report(args.sampled, args.full, args.world, [int(s) for s in args.seeds.split(",")],
                 args.arms.split(",")))


if __name__ == "__main__":
    main()
