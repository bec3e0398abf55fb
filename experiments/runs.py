"""Runs of the experiments: one `kat.train.train` call per arm and seed, cached by its config, and
the numbers read back from the run's own files.

A run is a pure function of its config: a finished run whose config.yaml equals the one wanted is
reused, so an interrupted experiment picks up where it stopped and `sensitivity` reuses `table1`'s
OPD and KAT runs in the same output directory.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import time

import torch
import yaml

from kat.config import Config
from kat.plot import read_jsonl


def git_commit() -> str:
    """Short hash of the checkout this code runs from, '+dirty' with uncommitted changes to tracked
    files; 'unknown' outside a git checkout. KAT_COMMIT overrides it (a copied tree can carry stale
    git metadata)."""
    if os.environ.get("KAT_COMMIT"):
        return os.environ["KAT_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here).stdout.strip()
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "")


def same_config(run_dir: str, cfg: Config) -> bool:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return False
    with open(path) as fh:
        return yaml.safe_load(fh) == cfg.to_dict()


def is_done(run_dir: str, cfg: Config) -> bool:
    """A finished run (results and timing written) of exactly this config."""
    return (os.path.isfile(os.path.join(run_dir, "results.json"))
            and os.path.isfile(os.path.join(run_dir, "arm.json")) and same_config(run_dir, cfg))


def restart(cfg: Config) -> None:
    """An arm's folder belongs to the experiment: a run there that is not done (interrupted, or of
    another config) is removed before the arm trains again (what a run writes only, kat.rundir)."""
    from kat.rundir import clear_run, run_contents

    if not cfg.resume:
        clear_run(cfg.output_dir, run_contents(cfg.output_dir))


def run_arm(cfg: Config, arm: str, seed: int, log=print) -> str:
    """Train one arm into cfg.output_dir (or reuse its finished run); returns that directory."""
    from kat.train import train

    if is_done(cfg.output_dir, cfg):
        log(f"  {arm} seed {seed}: reusing {cfg.output_dir}")
        return cfg.output_dir
    log(f"  {arm} seed {seed}: training -> {cfg.output_dir}")
    restart(cfg)
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
    if os.path.isfile(path) and same_config(out_dir, cfg):
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


def teacher_results(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "results.json")) as fh:
        return json.load(fh)["after"]


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
