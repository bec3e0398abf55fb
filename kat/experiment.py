"""Experiments built on the training loop: the paper's Table 1 with the controls it lacked, shadow-mode
diagnostics of the detector, and a sensitivity sweep.

    python -m kat experiment table1 --config configs/toy.yaml --seeds 3 [--steps N] [--out DIR]
                                    [--only ARMS] [--world rich|plain|rich,plain] [--key value ...]
    python -m kat experiment shadow --config configs/toy.yaml [--seeds 1] [--world ...] [--batches 8]
    python -m kat experiment sensitivity --config configs/toy.yaml [--seeds 1] [--world ...]

Every arm is one `kat.train.train` run, its Config the YAML file + `--key value` overrides + the
arm's own overrides, written to DIR/<world>/<arm>/seed<k>/. A run is a pure function of its config:
a finished run whose config.yaml equals the one wanted is reused, so an interrupted experiment picks
up where it stopped and `sensitivity` reuses `table1`'s OPD and KAT runs in the same DIR. Seeds
change the prompt order, the sampling and the evaluation samples; every seed starts from the same
student.

Table 1 arms (what the learner sees per rollout):
- teacher, student (before): evaluation only, same protocol as the runs' evaluations.
- OPD: no termination; the whole rollout is in the loss.
- KAT: the trap detector cuts; the cut segment is generated but not in the loss.
- RandomTerm: random cuts whose hazard adapts so that the mean *kept* length (tokens in the loss)
  equals KAT's mean kept length in the same seed. The point of the control is that both arms train
  on the same number of tokens per rollout; KAT still generates more, since it confirms a trap
  `patience` windows after the cut it makes.
- FixedPrefix: max_new_tokens capped at KAT's mean generated length, rounded up: the paper's
  control, a blind length limit set where KAT's rollouts end on average.
- Fixed-N: max_new_tokens capped at N = KAT's mean kept length, rounded. A cut at a fixed position N
  that is not an end of sequence (excluded from the loss, as KAT's cut is) gives the learner exactly
  the same tokens and targets as a length cap at N: the OPD loss of position t < N does not depend on
  why the row ended, and nothing is appended at a length stop either. The two differ only in the
  tokens generated past N before the chunk ends, which a cap never generates, so Fixed-N is
  FixedPrefix at the kept-length cap.
Capped arms are evaluated at the config's full max_new_tokens (Config.eval_max_new_tokens).
`eval_every` 0 becomes steps // 4, so each run has several evaluation points for the learning curves.

Shadow diagnostics: a KAT run with `shadow=True` (rollouts run to their end, would-be cuts only
recorded), then fresh batches of training prompts sampled from the student before training and from
the trained student, each rollout graded: of the rollouts KAT would cut, how many still end correct,
and the cut rate on rollouts that end wrong vs right.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import torch
import yaml

from kat.config import TOY_DIR, Config, ConfigError, load_config
from kat.data import DataError
from kat.plot import plot_traces, read_jsonl
from kat.rollout import STOP_NAMES

TOY_ROOT = os.path.dirname(TOY_DIR)  # kat/toy: holds one folder per world
WORLDS = ("rich", "plain")

TABLE1_ARMS = ("opd", "kat", "random", "fixed_prefix", "fixed_n")
LENGTH_MATCHED = ("random", "fixed_prefix", "fixed_n")  # their settings come from the seed's KAT run
SENSITIVITY_ARMS = ("opd", "kat", "kat_q0.1", "kat_q0.5", "kat_zscore", "kat_p3")  # "kat": the config's own rule
STATIC_ARMS = {
    "opd": {"termination": "none"},
    "kat": {"termination": "kat"},
    "kat_q0.1": {"termination": "kat", "rule": "quantile", "eta": 0.1},
    "kat_q0.5": {"termination": "kat", "rule": "quantile", "eta": 0.5},
    "kat_zscore": {"termination": "kat", "rule": "zscore"},
    "kat_p3": {"termination": "kat", "patience": 3},
    "shadow": {"termination": "kat", "shadow": True},
}
LABELS = {
    "teacher": "teacher", "before": "student (before)", "opd": "OPD", "kat": "KAT",
    "random": "RandomTerm (kept length = KAT's)", "fixed_prefix": "FixedPrefix (cap = KAT's generated length)",
    "fixed_n": "Fixed-N (cap = KAT's kept length)", "kat_q0.1": "KAT quantile eta=0.1",
    "kat_q0.5": "KAT quantile eta=0.5", "kat_zscore": "KAT zscore", "kat_p3": "KAT patience 3",
}
ROW_ORDER = ("teacher", "before", "opd", "random", "fixed_prefix", "fixed_n", "kat", "kat_q0.1", "kat_q0.5",
             "kat_zscore", "kat_p3")


# ---------------------------------------------------------------------------------------------
# Configs of the arms

def world_overrides(world: str, root: str = TOY_ROOT) -> dict:
    """Teacher, student and data paths of a toy world (kat/toy/<world>/...)."""
    if world not in WORLDS:
        raise ConfigError(f"--world: unknown world {world!r}; choose from {', '.join(WORLDS)}")
    base = os.path.join(root, world)
    if not os.path.isdir(os.path.join(base, "teacher")):
        raise ConfigError(f"--world {world}: no checkpoints under {base}; build them with "
                          f"`python -m kat toy build --world {world}`")
    return {"teacher": os.path.join(base, "teacher"), "student": os.path.join(base, "student"),
            "train_data": os.path.join(base, "data", "train.jsonl"),
            "eval_data": os.path.join(base, "data", "test.jsonl")}


def world_name(cfg: Config) -> str:
    """The toy world a config's teacher belongs to, or 'custom'."""
    parent = os.path.dirname(os.path.abspath(cfg.teacher))
    name = os.path.basename(parent)
    return name if os.path.dirname(parent) == os.path.abspath(TOY_ROOT) else "custom"


def arm_overrides(arm: str, base: Config, kat: dict | None = None) -> dict:
    """Config overrides of one arm; the length-matched arms take their numbers from `kat`, the
    summary (`summarize_run`) of the same seed's KAT run.

    RandomTerm targets KAT's mean kept length (tokens in the loss per rollout); FixedPrefix caps
    generation at KAT's mean generated length rounded up; Fixed-N caps it at KAT's mean kept length
    rounded. Capped arms are still evaluated at the base max_new_tokens.
    """
    if arm in STATIC_ARMS:
        return dict(STATIC_ARMS[arm])
    if arm not in LENGTH_MATCHED:
        known = ", ".join([*STATIC_ARMS, *LENGTH_MATCHED])
        raise ValueError(f"arm: unknown arm {arm!r}; choose from {known}")
    if kat is None:
        raise ValueError(f"arm {arm!r} is length-matched to KAT: pass the summary of the seed's KAT run as `kat`")
    if arm == "random":
        target = kat["kept_length"]
        if target >= base.max_new_tokens - 0.5:  # KAT cut (almost) nothing: its matched control is OPD
            return {"termination": "none"}
        if target <= base.exempt:
            raise ValueError(f"KAT's mean kept length {target:.1f} is not above exempt={base.exempt}; a random "
                             "cut cannot match it. Lower exempt or check the KAT run")
        return {"termination": "random", "random_target_length": target}
    cap = math.ceil(kat["mean_length"]) if arm == "fixed_prefix" else round(kat["kept_length"])
    # the cap is a training budget: evaluation still runs at the full length, like every other arm
    return {"termination": "none", "max_new_tokens": max(1, min(cap, base.max_new_tokens)),
            "eval_max_new_tokens": base.eval_max_new_tokens or base.max_new_tokens}


def base_config(argv: list[str], world: str | None) -> Config:
    """The YAML file + overrides (+ a world's paths), with eval_every set for learning curves."""
    cfg = load_config(argv, **(world_overrides(world) if world else {}))
    if cfg.eval_every == 0:
        cfg = replace(cfg, eval_every=max(1, cfg.steps // 4))
    return cfg


# ---------------------------------------------------------------------------------------------
# Runs

def _same_config(run_dir: str, cfg: Config) -> bool:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return False
    with open(path) as fh:
        return yaml.safe_load(fh) == cfg.to_dict()


def is_done(run_dir: str, cfg: Config) -> bool:
    """A finished run (results and timing written) of exactly this config."""
    return (os.path.isfile(os.path.join(run_dir, "results.json"))
            and os.path.isfile(os.path.join(run_dir, "arm.json")) and _same_config(run_dir, cfg))


def run_arm(cfg: Config, arm: str, seed: int, log=print) -> str:
    """Train one arm (or reuse its finished run); returns its run directory."""
    from kat.train import train

    if is_done(cfg.output_dir, cfg):
        log(f"  {arm} seed {seed}: reusing {cfg.output_dir}")
        return cfg.output_dir
    log(f"  {arm} seed {seed}: training -> {cfg.output_dir}")
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    with open(os.path.join(cfg.output_dir, "arm.json"), "w") as fh:
        json.dump({"arm": arm, "seed": seed, "wall_s": wall}, fh, indent=1)
    log(f"  {arm} seed {seed}: {wall:.0f} s")
    return cfg.output_dir


def eval_specs(cfg: Config) -> list:
    """The evaluation sets a run of `cfg` uses (kat.data.DataSpec: name, k, limit, ...)."""
    from kat.data import parse_data_specs

    return parse_data_specs(cfg.eval_data, split=cfg.eval_split, prompt_field=cfg.prompt_field,
                            answer_field=cfg.answer_field, k=cfg.eval_k, limit=cfg.eval_limit)


def evaluate_teacher(cfg: Config, log=print) -> str:
    """Evaluate the teacher with the runs' protocol (kat.train.run_eval); results.json in cfg.output_dir."""
    from accelerate import Accelerator

    from kat.data import load_eval_sets
    from kat.models import load_model, load_tokenizer
    from kat.train import run_eval

    out_dir = cfg.output_dir
    path = os.path.join(out_dir, "results.json")
    if os.path.isfile(path) and _same_config(out_dir, cfg):
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.teacher, cfg.teacher_gguf, "teacher")
    teacher = load_model(cfg.teacher, cfg.teacher_gguf, torch.float32, "teacher").eval()
    # the sets exactly as kat.train.train reads them
    sets = load_eval_sets(cfg.eval_data, split=cfg.eval_split, prompt_field=cfg.prompt_field,
                          answer_field=cfg.answer_field, k=cfg.eval_k, limit=cfg.eval_limit)
    res = run_eval(Accelerator(cpu=not torch.cuda.is_available()), teacher, tokenizer, sets, cfg, "teacher")
    with open(path, "w") as fh:
        json.dump({"after": res, "wall_s": time.perf_counter() - t0}, fh, indent=1)
    with open(os.path.join(out_dir, "config.yaml"), "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
    log(f"  teacher seed {cfg.seed}: " + "  ".join(f"{k}={v:.3f}" for k, v in res.items()))
    return out_dir


# ---------------------------------------------------------------------------------------------
# Summaries of finished runs

def eval_metrics(row: dict) -> dict:
    """The `<set>/<metric>` entries of an evaluation row of metrics.jsonl."""
    return {k: v for k, v in row.items() if "/" in k}


def summarize_run(run_dir: str) -> dict:
    """One run's numbers from its metrics.jsonl and arm.json.

    mean_length / kept_length / cut_rate / shadow_rate: means over training steps of the logged values
    (every step has the same number of rollouts, so these are per-rollout means over the run);
    tokens: tokens generated over the run; train_s: rollout + learning time; wall_s: the whole
    train() call, evaluations included; before / after: the evaluation rows; curve: every
    evaluation with the tokens generated up to it.
    """
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    steps = [r for r in rows if "loss" in r]
    if not steps:
        raise ValueError(f"{run_dir}: metrics.jsonl holds no training step; the run did not finish")
    evals = [r for r in rows if "eval" in r]
    tokens_at = {0: 0.0, **{r["step"]: r["tokens_total"] for r in steps}}
    with open(os.path.join(run_dir, "arm.json")) as fh:
        info = json.load(fh)
    return {
        "run_dir": run_dir,
        "mean_length": statistics.fmean(r["mean_length"] for r in steps),
        "kept_length": statistics.fmean(r["kept_length"] for r in steps),
        "cut_rate": statistics.fmean(r["cut_rate"] for r in steps),
        "shadow_rate": statistics.fmean(r.get("shadow_rate", 0.0) for r in steps),
        "tokens": steps[-1]["tokens_total"],
        "train_s": sum(r["time_rollout"] + r["time_learn"] for r in steps),
        "wall_s": info["wall_s"],
        "before": next((eval_metrics(r) for r in evals if r["eval"] == "before"), {}),
        "after": next((eval_metrics(r) for r in reversed(evals) if r["eval"] == "after"), {}),
        "curve": [{"step": r["step"], "tokens": tokens_at.get(r["step"], math.nan), **eval_metrics(r)}
                  for r in evals],
    }


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1) over seeds; std is None for a single seed."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": list(values)}


TRAIN_COLUMNS = ("mean_length", "kept_length", "cut_rate", "tokens", "train_s", "wall_s")


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


def _fmt(stat: dict | None, scale: float = 1.0, digits: int = 1) -> str:
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
        cells = [_fmt(st(f"{s}/{m}@k"), 100) for s in sets for m in ("avg", "pass")]
        cells += [_fmt(st(f"{s}/mean_length")) for s in sets]
        cells += [_fmt(st("mean_length")), _fmt(st("kept_length")), _fmt(st("cut_rate"), 100),
                  _fmt(st("tokens"), digits=0), _fmt(st("train_s"), digits=0), _fmt(st("train_s_vs_opd"), digits=2),
                  _fmt(st("wall_s"), digits=0)]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def setup_line(cfg: Config) -> str:
    det = (f"quantile eta={cfg.eta}" if cfg.rule == "quantile" else f"zscore kappa={cfg.kappa}")
    return (f"{cfg.steps} steps x {cfg.batch_size} prompts x {cfg.samples_per_prompt} samples, "
            f"max_new_tokens {cfg.max_new_tokens}, loss {cfg.loss}, lr {cfg.lr}; detector W={cfg.window} "
            f"stride={cfg.stride} patience={cfg.patience} exempt={cfg.exempt} {det}; evaluation: "
            + ", ".join(f"{s.name} ({s.limit or 'all'} problems x k={s.k})" for s in eval_specs(cfg))
            + f" at temperature {cfg.eval_temperature}, every {cfg.eval_every} steps")


# ---------------------------------------------------------------------------------------------
# Learning curves

def plot_learning_curves(summaries: dict[str, list[dict]], path: str, title: str = "",
                         references: dict[str, float] | None = None) -> str | None:
    """Evaluation avg@k and pass@k (first evaluation set) against step and against tokens generated:
    one line per arm, the mean over seeds with a +-1 std band; `references` as horizontal lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for runs in summaries.values() for s in runs for p in s["curve"] for k in p
                   if k.endswith("/avg@k") or k.endswith("/pass@k")})
    if not keys:
        return None
    keys = [k for k in keys if k.split("/")[0] == keys[0].split("/")[0]]  # first set: avg@k, pass@k
    fig, axes = plt.subplots(len(keys), 2, figsize=(11, 3.4 * len(keys)), squeeze=False)
    for i, arm in enumerate(sorted(summaries, key=ROW_ORDER.index)):
        runs = summaries[arm]
        steps = sorted({p["step"] for p in runs[0]["curve"]})
        for row, key in enumerate(keys):
            ys, xs = [], []
            for step in steps:
                pts = [p for s in runs for p in s["curve"] if p["step"] == step and key in p]
                ys.append([100 * p[key] for p in pts])
                xs.append(statistics.fmean(p["tokens"] for p in pts))
            mean = [statistics.fmean(y) for y in ys]
            std = [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]
            for col, x in enumerate((steps, xs)):
                ax = axes[row, col]
                ax.plot(x, mean, marker="o", ms=3, color=f"C{i}", label=LABELS.get(arm, arm))
                ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=f"C{i}", alpha=0.15, lw=0)
    for row, key in enumerate(keys):
        for col in range(2):
            ax = axes[row, col]
            for name, value in (references or {}).items():
                if key in name:
                    ax.axhline(100 * value, color="0.3", ls="--" if name.startswith("teacher") else ":", lw=1,
                               label=name.rsplit(" ", 1)[0])
            ax.set_ylabel(f"{key} (%)")
            ax.set_xlabel(("step", "tokens generated")[col])
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Table 1 and the sensitivity sweep

def plan_line(name: str, order: list[str], seeds: int, cfg: Config, label: str) -> str:
    """What an experiment will run, printed before it starts."""
    evals = (cfg.steps - 1) // cfg.eval_every + 2  # before, periodic ones, after
    sets = ", ".join(f"{s.name} ({s.limit or 'all'} problems x k={s.k})" for s in eval_specs(cfg))
    return (f"[{name}] world {label}: {len(order)} arms x {seeds} seeds = {len(order) * seeds} runs of {cfg.steps} "
            f"steps x {cfg.batch_size * cfg.samples_per_prompt} rollouts (<= {cfg.max_new_tokens} tokens), "
            f"{evals} evaluations per run on {sets or 'no set'}; arms: {', '.join(order)}")


def run_arms(order: list[str], base: Config, seeds: int, out: str, label: str, teacher: bool,
             log=print) -> tuple[dict[str, list[dict]], list[dict], dict]:
    """Every arm of `order` for every seed, KAT before the arms matched to it.

    Returns (run summaries per arm, the teacher's evaluation per seed, the matching per seed).
    """
    summaries: dict[str, list[dict]] = {a: [] for a in order}
    teacher_evals, matching = [], {}
    for k in range(seeds):
        seed_cfg = replace(base, seed=base.seed + k)
        seed = seed_cfg.seed
        if teacher:
            t_dir = evaluate_teacher(replace(seed_cfg, output_dir=os.path.join(out, label, "teacher", f"seed{seed}")),
                                     log)
            with open(os.path.join(t_dir, "results.json")) as fh:
                teacher_evals.append(json.load(fh)["after"])
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
                    f"{summary['wall_s'] * len(order) * seeds / 60:.0f} min for the {label} world")
    return summaries, teacher_evals, matching


def run_table(name: str, arms: list[str], argv: list[str], seeds: int, out: str, worlds: list[str | None],
              dry_run: bool = False, command: str = "", log=print) -> dict:
    """Run `arms` x `seeds` on each world; write DIR/<name>.md, DIR/<name>.json and the curves.

    `name` table1 also evaluates the teacher. A length-matched arm makes its seed's KAT run first,
    even when KAT itself is not among `arms`.
    """
    unknown = [a for a in arms if a not in STATIC_ARMS and a not in LENGTH_MATCHED]
    if unknown:
        raise ConfigError(f"--only: unknown arm(s) {unknown}; choose from {', '.join(TABLE1_ARMS + SENSITIVITY_ARMS)}")
    needs_kat = "kat" in arms or any(a in LENGTH_MATCHED for a in arms)
    order = (["kat"] if needs_kat else []) + [a for a in arms if a != "kat"]
    result = {"command": command, "commit": git_commit(), "worlds": {}}
    md = [f"# {name}", "", f"`{command}` at commit {result['commit']}", ""]
    for world in worlds:
        base = base_config(argv, world)
        label = world or world_name(base)
        log(plan_line(name, order, seeds, base, label))
        if dry_run:
            continue
        os.makedirs(out, exist_ok=True)
        t0 = time.perf_counter()
        summaries, teacher, matching = run_arms(order, base, seeds, out, label, name == "table1", log)
        summaries = {a: s for a, s in summaries.items() if a in arms}
        rows = table_rows(summaries, teacher)
        refs = {f"{LABELS[r['arm']]} {key}": r["stats"][key]["mean"] for r in rows if r["arm"] in ("teacher", "before")
                for key in r["stats"] if key.endswith("@k")}
        curves = plot_learning_curves(summaries, os.path.join(out, f"{name}_{label}_curves.png"),
                                      f"{name}, {label} world: mean over {seeds} seed(s)", refs)
        result["worlds"][label] = {"config": base.to_dict(), "rows": rows, "matching": matching,
                                   "curves": curves, "minutes": (time.perf_counter() - t0) / 60}
        md += [f"## {label} world ({seeds} seed(s), mean ± std over seeds)", "", setup_line(base), "",
               markdown_table(rows, {s.name: s.k for s in eval_specs(base)}), ""]
        if any(len(m) > 2 for m in matching.values()):
            md += ["Length matching per seed: " + "; ".join(
                f"seed {s}: KAT generated {m['kat_mean_length']:.1f} / kept {m['kat_kept_length']:.1f} tokens per "
                "rollout" + "".join(f", {a} {_describe(o)}" for a, o in m.items() if a in LENGTH_MATCHED)
                for s, m in matching.items()), ""]
        if curves:
            md += [f"![learning curves]({os.path.basename(curves)})", ""]
    if not dry_run:
        with open(os.path.join(out, f"{name}.json"), "w") as fh:
            json.dump(result, fh, indent=1)
        with open(os.path.join(out, f"{name}.md"), "w") as fh:
            fh.write("\n".join(md))
        log(f"wrote {os.path.join(out, name + '.md')} and {name}.json")
    return result


def _describe(over: dict) -> str:
    if over.get("termination") == "random":
        return f"target {over['random_target_length']:.1f}"
    if "max_new_tokens" in over:
        return f"cap {over['max_new_tokens']}"
    return "no cut (KAT cut nothing)"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ---------------------------------------------------------------------------------------------
# Shadow-mode diagnostics

@torch.no_grad()
def shadow_rollouts(student, teacher, tokenizer, problems: list[dict], cfg: Config, detector, *, batches: int,
                    first_step: int = 0, max_calibration: int = 100) -> list[dict]:
    """Sample training batches with a shadow detector; one graded record per rollout.

    The prompts are those training would see at steps first_step, first_step + 1, ... . While the
    detector is not active yet (a fresh detector), batches only calibrate it (`end_batch` fills its
    buffer); then `batches` batches are recorded with the threshold held fixed, so every recorded
    decision uses the same threshold.
    """
    from kat.data import encode_prompts, render_prompt
    from kat.evaluate import grade
    from kat.models import eos_ids
    from kat.sampler import sample
    from kat.data import step_generator, step_prompts
    from kat.detector import window_means

    if not getattr(detector, "shadow", False):
        raise ValueError("detector: shadow_rollouts needs a TrapDetector built with shadow=True")
    eos = eos_ids(tokenizer, student)
    render_kw = {"system_prompt": cfg.system_prompt, "instruction": cfg.instruction}
    records, step, calibrated = [], first_step, 0
    while len(records) < batches * cfg.batch_size * cfg.samples_per_prompt:
        batch = step_prompts(problems, step, cfg.batch_size, 0, 1, cfg.seed)
        rows = [p for p in batch for _ in range(cfg.samples_per_prompt)]
        ids, mask = encode_prompts(tokenizer, [render_prompt(tokenizer, p["prompt"], **render_kw) for p in rows])
        gen = step_generator(cfg.seed, step)
        rollout, state = sample(student, teacher, ids, mask, max_new_tokens=cfg.max_new_tokens, eos_token_id=eos,
                                pad_token_id=tokenizer.pad_token_id, temperature=cfg.temperature, top_p=cfg.top_p,
                                chunk=cfg.chunk, terminator=detector, generator=gen)
        step += 1
        if not state.active:
            if calibrated >= max_calibration:
                raise RuntimeError(f"detector still inactive after {calibrated} calibration batches; check "
                                   "min_buffer and warmup_steps")
            detector.end_batch(state, calibrated)
            calibrated += 1
            continue
        for b, p in enumerate(rows):
            n = int(rollout.completion_mask[b].sum())
            kl = rollout.kl[b, :n].float()
            # decoded as kat.evaluate decodes completions for grading: special tokens dropped
            text = tokenizer.decode(rollout.completion_ids[b, :n].tolist(), skip_special_tokens=True)
            cut = int(rollout.shadow_cut[b])
            records.append({
                "step": step - 1, "prompt": p["prompt"], "answer": str(p["answer"]), "completion": text,
                "length": n, "stop": STOP_NAMES[int(rollout.stop[b])], "shadow_cut": cut if cut >= 0 else None,
                "correct": grade(text, str(p["answer"]), cfg.grader), "threshold": state.threshold,
                "kl": [round(x, 6) for x in kl.tolist()],
                "z": [None if math.isnan(x) else round(x, 6) for x in window_means(kl, cfg.window).tolist()],
                **toy_positions(text, p["prompt"], cfg.grader)})
    return records


def toy_positions(text: str, prompt: str, grader: str) -> dict:
    """First error and first repetition of a toy completion (one character = one token)."""
    if grader != "exact":
        return {}
    from kat.toy.world import parse_prompt, trace

    try:
        tr = trace(text, parse_prompt(prompt))
    except ValueError:  # not a toy prompt
        return {}
    return {"first_error": tr.first_error, "repeat_start": tr.repeat_start}


def _share(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def shadow_summary(records: list[dict]) -> dict:
    """What the shadow detector would have cut, split by how the rollouts end.

    correct_given_cut: of the rollouts it would cut, the share that still end correct (cuts of
    recoverable rollouts). cut_rate_wrong vs cut_rate_correct: the separation the method rests on.
    With toy positions: of cut wrong rollouts, the share cut at or after their first error; of cut
    repeating rollouts, the share cut inside the repetition.
    """
    cut = [r["shadow_cut"] is not None for r in records]
    right = [r["correct"] for r in records]
    out = {
        "n": len(records),
        "accuracy": _share(right),
        "cut_rate": _share(cut),
        "correct_given_cut": _share([ok for ok, c in zip(right, cut) if c]),
        "cut_rate_correct": _share([c for ok, c in zip(right, cut) if ok]),
        "cut_rate_wrong": _share([c for ok, c in zip(right, cut) if not ok]),
        "cut_positions": sorted(r["shadow_cut"] for r in records if r["shadow_cut"] is not None),
        "threshold": records[0]["threshold"] if records else None,
    }
    pos = out["cut_positions"]
    out["cut_position_mean"] = statistics.fmean(pos) if pos else None
    out["cut_position_median"] = statistics.median(pos) if pos else None
    if records and "first_error" in records[0]:
        wrong_cut = [r for r in records if not r["correct"] and r["shadow_cut"] is not None]
        rep = [r for r in records if r.get("repeat_start") is not None]
        out["repeat_rate"] = _share([r.get("repeat_start") is not None for r in records])
        out["cut_rate_repeating"] = _share([r["shadow_cut"] is not None for r in rep])
        out["cut_rate_wrong_no_repeat"] = _share([r["shadow_cut"] is not None for r in records
                                                  if not r["correct"] and r.get("repeat_start") is None])
        out["wrong_cut_at_or_after_error"] = _share([r["first_error"] is not None
                                                     and r["shadow_cut"] >= r["first_error"] for r in wrong_cut])
        out["repeat_cut_inside_repeat"] = _share([r["shadow_cut"] >= r["repeat_start"] for r in rep
                                                  if r["shadow_cut"] is not None])
    return out


def as_traces(records: list[dict], cfg: Config) -> list[dict]:
    """Records in the format of traces.jsonl, for kat.plot.plot_traces."""
    return [{"step": 0, "tokens": [""] * r["length"], "kl": r["kl"], "z": r["z"], "threshold": r["threshold"],
             "window": cfg.window, "stride": cfg.stride, "exempt": cfg.exempt, "cut": None,
             "shadow_cut": r["shadow_cut"], "stop": STOP_NAMES.index(r["stop"])} for r in records]


def pick_examples(records: list[dict], correct: bool, n: int = 4) -> list[dict]:
    """Up to n rollouts of different prompts that end correct (or wrong), would-be-cut ones first."""
    rows = [r for r in records if r["correct"] == correct]
    picked, prompts = [], set()
    for r in [r for r in rows if r["shadow_cut"] is not None] + [r for r in rows if r["shadow_cut"] is None]:
        if r["prompt"] not in prompts and len(picked) < n:
            picked.append(r)
            prompts.add(r["prompt"])
    return picked


def plot_cut_positions(records: dict[str, list[dict]], path: str, title: str = "", bin_width: int = 8) -> str:
    """Histogram of would-be cut positions, rollouts ending correct vs wrong; one panel per point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(records), figsize=(5.5 * len(records), 3.2), squeeze=False)
    for ax, (point, recs) in zip(axes[0], records.items()):
        top = max([r["length"] for r in recs] + [bin_width])
        bins = list(range(0, top + bin_width, bin_width))
        for ok, color in ((True, "C2"), (False, "C3")):
            pos = [r["shadow_cut"] for r in recs if r["correct"] == ok and r["shadow_cut"] is not None]
            n = sum(r["correct"] == ok for r in recs)
            ax.hist(pos, bins=bins, alpha=0.6, color=color,
                    label=f"{'correct' if ok else 'wrong'}: {len(pos)} of {n} cut")
        errors = [r["first_error"] for r in recs if not r["correct"] and r.get("first_error") is not None]
        if errors:
            ax.hist(errors, bins=bins, histtype="step", color="k", lw=1, label="first error (wrong rollouts)")
        ax.set_title(point, fontsize=9)
        ax.set_xlabel("completion position")
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("rollouts")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def diagnose(run_dir: str, cfg: Config, point: str, teacher, tokenizer, problems: list[dict], batches: int,
             log=print) -> list[dict]:
    """Graded shadow rollouts of the student before (`point` 'before') or after ('after') a shadow run.

    Before: the initial student, a fresh detector calibrated on its own rollouts. After: the run's
    trained student and the detector state of its last checkpoint. Cached in the run directory.
    """
    from kat.models import align_vocab, load_model
    from kat.train import build_terminator

    path = os.path.join(run_dir, "diagnostics", f"rollouts_{point}.jsonl")
    if os.path.isfile(path):
        return read_jsonl(path)
    detector, student_path = build_terminator(cfg), cfg.student
    if point == "after":
        ckpt = os.path.join(run_dir, f"checkpoint-{cfg.steps:06d}", "terminator.pt")
        detector.load_state_dict(torch.load(ckpt, weights_only=False))
        student_path = os.path.join(run_dir, "student")
    student = load_model(student_path, "", torch.float32, "student").eval()
    align_vocab(student, teacher, tokenizer)  # as kat.train.train does: one logit width for both models
    t0 = time.perf_counter()
    records = shadow_rollouts(student, teacher, tokenizer, problems, cfg, detector, batches=batches,
                              first_step=cfg.steps)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    log(f"  shadow seed {cfg.seed} {point}: {len(records)} rollouts in {time.perf_counter() - t0:.0f} s")
    return records


def run_shadow(argv: list[str], seeds: int, out: str, worlds: list[str | None], batches: int = 8,
               dry_run: bool = False, command: str = "", log=print) -> dict:
    """Shadow KAT runs, then graded shadow rollouts of the student before and after training.

    Finished runs and graded rollouts found under `out` are reused (`run_arm`, `diagnose`).
    """
    from kat.data import filter_long_prompts, load_problems
    from kat.models import load_model, load_tokenizer

    result = {"command": command, "commit": git_commit(), "worlds": {}}
    md = ["# Shadow-mode diagnostics", "", f"`{command}` at commit {result['commit']} (runs and graded rollouts "
          "found in the output directory are reused, not redone)", "",
          "A KAT run with shadow=True (nothing cut, would-be cuts recorded). Then, with its settings, batches "
          "of training prompts sampled by the student before training (detector calibrated on that student's "
          "own rollouts first) and by the student after the shadow run (detector state of its last checkpoint), "
          "threshold held fixed, every rollout graded.", ""]
    if not dry_run:
        os.makedirs(out, exist_ok=True)
    for world in worlds:
        base = replace(base_config(argv, world), **STATIC_ARMS["shadow"])
        label = world or world_name(base)
        log(plan_line("shadow", ["shadow"], seeds, base, label) + f"; then {batches} graded batches of "
            f"{base.batch_size * base.samples_per_prompt} rollouts per seed before and after training")
        if dry_run:
            continue
        tokenizer = load_tokenizer(base.student, base.student_gguf)
        teacher = load_model(base.teacher, base.teacher_gguf, torch.float32, "teacher").eval()
        render_kw = {"system_prompt": base.system_prompt, "instruction": base.instruction}
        problems = filter_long_prompts(tokenizer, load_problems(base.train_data, split=base.train_split,
                                       prompt_field=base.prompt_field, answer_field=base.answer_field),
                                       base.max_prompt_length, render_kw=render_kw, name="train_data")
        records: dict[str, list[dict]] = {"before": [], "after": []}
        runs = []
        for k in range(seeds):
            cfg = replace(base, seed=base.seed + k)
            cfg = replace(cfg, output_dir=os.path.join(out, label, "shadow", f"seed{cfg.seed}"))
            runs.append(summarize_run(run_arm(cfg, "shadow", cfg.seed, log)))
            for point in records:
                records[point] += diagnose(cfg.output_dir, cfg, point, teacher, tokenizer, problems, batches, log)
        summary = {p: shadow_summary(r) for p, r in records.items()}
        plots = {"cut_positions": plot_cut_positions(
            records, os.path.join(out, f"shadow_{label}_cut_positions.png"), f"would-be cuts, {label} world")}
        for point, recs in records.items():
            for ok in (True, False):
                name = f"shadow_{label}_{point}_traces_{'correct' if ok else 'wrong'}.png"
                title = (f"{label} world, shadow rollouts of the student {point} training that end "
                         f"{'correct' if ok else 'wrong'} (would-be cuts first)")
                plots[name] = plot_traces(as_traces(pick_examples(recs, ok), base), os.path.join(out, name),
                                          title=title)
        training_rate = statistics.fmean(r["shadow_rate"] for r in runs)
        result["worlds"][label] = {"config": base.to_dict(), "summary": summary, "plots": plots,
                                   "shadow_runs": [r["run_dir"] for r in runs],
                                   "shadow_rate_during_training": training_rate}
        md += [f"## {label} world ({seeds} seed(s); {batches} batches of "
               f"{base.batch_size * base.samples_per_prompt} rollouts per seed and point)", "", setup_line(base), "",
               shadow_markdown(summary), "",
               f"Would-be cut rate over the shadow run's own training rollouts (warm-up included): "
               f"{100 * training_rate:.1f}%.", "",
               f"![cut positions]({os.path.basename(plots['cut_positions'])})", ""]
    if dry_run:
        return result
    with open(os.path.join(out, "shadow.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    with open(os.path.join(out, "shadow.md"), "w") as fh:
        fh.write("\n".join(md))
    log(f"wrote {os.path.join(out, 'shadow.md')} and shadow.json")
    return result


SHADOW_ROWS = (
    ("n", "rollouts", None), ("accuracy", "accuracy", 100), ("threshold", "threshold s", 1),
    ("cut_rate", "would-be cut (all)", 100), ("correct_given_cut", "cut rollouts that still end correct", 100),
    ("cut_rate_correct", "cut rate, rollouts ending correct", 100),
    ("cut_rate_wrong", "cut rate, rollouts ending wrong", 100), ("repeat_rate", "rollouts repeating a step", 100),
    ("cut_rate_repeating", "cut rate, repeating rollouts", 100),
    ("cut_rate_wrong_no_repeat", "cut rate, wrong without repetition", 100),
    ("wrong_cut_at_or_after_error", "cut wrong rollouts cut at/after their first error", 100),
    ("repeat_cut_inside_repeat", "cut repeating rollouts cut inside the repetition", 100),
    ("cut_position_median", "median cut position", 1),
)


def shadow_markdown(summary: dict[str, dict]) -> str:
    """One column per point (before / after training), one row per statistic (percentages)."""
    points = list(summary)
    lines = ["| | " + " | ".join(f"student {p} training" for p in points) + " |", "|---" * (len(points) + 1) + "|"]
    for key, name, scale in SHADOW_ROWS:
        if not any(key in summary[p] for p in points):
            continue
        cells = []
        for p in points:
            v = summary[p].get(key)
            cells.append("-" if v is None else str(v) if scale is None else
                         f"{scale * v:.1f}%" if scale == 100 else f"{v:.3g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kat experiment", description=__doc__.splitlines()[0],
                                allow_abbrev=False, epilog="Other --key value pairs (e.g. --config FILE, --steps N, "
                                "--eval_limit N) are Config overrides applied to every arm.")
    p.add_argument("what", choices=("table1", "shadow", "sensitivity"), help="which experiment")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: 3 for table1, 1 otherwise)")
    p.add_argument("--out", default="runs/experiments", help="output directory (default runs/experiments)")
    p.add_argument("--only", default="", help="comma-separated arms to run (default: all of the experiment's)")
    p.add_argument("--world", default="", help="toy world(s), comma-separated: rich, plain (default: the config's "
                   "own teacher/student/data)")
    p.add_argument("--batches", type=int, default=8, help="shadow: recorded batches per seed and point (default 8)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    worlds = [w.strip() for w in args.world.split(",") if w.strip()] or [None]
    seeds = args.seeds or (3 if args.what == "table1" else 1)
    if seeds < 1:
        print("error: --seeds must be >= 1", file=sys.stderr)
        return 2
    command = "python -m kat experiment " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        if args.what == "shadow":
            run_shadow(rest, seeds, args.out, worlds, args.batches, args.dry_run, command)
        else:
            arms = [a.strip() for a in args.only.split(",") if a.strip()] or list(
                TABLE1_ARMS if args.what == "table1" else SENSITIVITY_ARMS)
            run_table(args.what, arms, rest, seeds, args.out, worlds, args.dry_run, command)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
