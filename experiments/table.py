"""Table 1 and the sensitivity sweep: every arm x seed trained (or reused), then one table per world
with mean +- std over seeds, and the learning curves."""

from __future__ import annotations

import os
import time
from dataclasses import replace

from kat.config import Config
from experiments.arms import (LABELS, LENGTH_MATCHED, ROW_ORDER, arm_overrides, base_config, check_arms, seed_list,
                                  world_name)
from experiments.report import (markdown_table, matching_line, per_seed_table, plan_line, setup_line, table_rows,
                                    write_report)
from experiments.runs import (eval_specs, evaluate_teacher, git_commit, run_arm, summarize_run,
                                  teacher_results)
from kat.plot import plot_learning_curves


def arm_order(arms: list[str]) -> list[str]:
    """KAT first whenever an arm is matched to it (it is trained even when not asked for)."""
    needs_kat = "kat" in arms or any(a in LENGTH_MATCHED for a in arms)
    return (["kat"] if needs_kat else []) + [a for a in arms if a != "kat"]


def run_arms(order: list[str], base: Config, seeds: int | list[int], out: str, label: str, teacher: bool,
             log=print) -> tuple[dict[str, list[dict]], list[dict], dict]:
    """Every arm of `order` for every seed, KAT before the arms matched to it.

    Returns (run summaries per arm, the teacher's evaluation per seed, the matching per seed).
    """
    summaries: dict[str, list[dict]] = {a: [] for a in order}
    teacher_evals, matching = [], {}
    seeds = seed_list(base, seeds)
    for k, seed in enumerate(seeds):
        seed_cfg = replace(base, seed=seed)
        if teacher:
            t_cfg = replace(seed_cfg, output_dir=os.path.join(out, label, "teacher", f"seed{seed}"))
            teacher_evals.append(teacher_results(evaluate_teacher(t_cfg, log)))
        kat = None
        for arm in order:
            over = arm_overrides(arm, seed_cfg, kat)
            cfg = replace(seed_cfg, **over, output_dir=os.path.join(out, label, arm, f"seed{seed}"))
            summary = summarize_run(run_arm(cfg, arm, seed, log))
            summaries[arm].append(summary)
            if arm == "kat":
                kat = summary
                matching[seed] = {"kat_mean_length": kat["mean_length"], "kat_kept_length": kat["kept_length"]}
            elif arm in LENGTH_MATCHED:
                matching[seed][arm] = over
            if k == 0 and arm == order[0]:
                log(f"first run: {summary['wall_s']:.0f} s wall, so about "
                    f"{summary['wall_s'] * len(order) * len(seeds) / 60:.0f} min for the {label} world")
    return summaries, teacher_evals, matching


def table_world(name: str, arms: list[str], base: Config, seeds: int | list[int], out: str, label: str,
                log=print) -> tuple[dict, list[str]]:
    """One world's runs, table and curves: its entry of <name>.json and its markdown lines."""
    t0 = time.perf_counter()
    summaries, teacher, matching = run_arms(arm_order(arms), base, seeds, out, label, name == "table1", log)
    summaries = {a: s for a, s in summaries.items() if a in arms}
    rows = table_rows(summaries, teacher)
    refs = {f"{LABELS[r['arm']]} {key}": r["stats"][key]["mean"] for r in rows if r["arm"] in ("teacher", "before")
            for key in r["stats"] if key.endswith("@k")}
    curves = plot_learning_curves({LABELS.get(a, a): [s["curve"] for s in summaries[a]]
                                   for a in sorted(summaries, key=ROW_ORDER.index)},
                                  os.path.join(out, f"{name}_{label}_curves.png"),
                                  f"{name}, {label} world", refs, keep_data=True)
    entry = {"config": base.to_dict(), "rows": rows, "matching": matching, "curves": curves,
             "minutes": (time.perf_counter() - t0) / 60}
    ks = {s.name: s.k for s in eval_specs(base)}
    md = [f"## {label} world (seeds {', '.join(map(str, seed_list(base, seeds)))}; mean ± std over seeds)", "",
          setup_line(base), "", markdown_table(rows, ks), ""]
    if "opd" in summaries and len(summaries) > 1:
        md += ["Per seed, each arm's avg@k minus OPD's in the same seed (points):", "", per_seed_table(rows, ks), ""]
    if any(len(m) > 2 for m in matching.values()):
        md += [matching_line(matching), ""]
    if curves:
        md += [f"![learning curves]({os.path.basename(curves)})", ""]
    return entry, md


def run_table(name: str, arms: list[str], argv: list[str], seeds: int | list[int], out: str, worlds: list[str | None],
              dry_run: bool = False, command: str = "", log=print) -> dict:
    """Run `arms` x `seeds` on each world; write DIR/<name>.md, DIR/<name>.json and the curves.

    `name` table1 also evaluates the teacher. A length-matched arm makes its seed's KAT run first,
    even when KAT itself is not among `arms`.
    """
    check_arms(arms)
    result = {"command": command, "commit": git_commit(), "worlds": {}}
    md = [f"# {name}", "", f"`{command}` at commit {result['commit']}", ""]
    for world in worlds:
        base = base_config(argv, world)
        label = world or world_name(base)
        log(plan_line(name, arm_order(arms), seeds, base, label))
        if dry_run:
            continue
        os.makedirs(out, exist_ok=True)
        result["worlds"][label], lines = table_world(name, arms, base, seeds, out, label, log)
        md += lines
    if not dry_run:
        write_report(out, name, result, md, log)
    return result
