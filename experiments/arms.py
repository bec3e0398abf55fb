"""The arms of the experiments: each one a set of Config overrides on top of the base config.

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

Beyond the paper:
- KAT gated (`kat_gated`): the detector with the drift gate (gate: drift): a low-KL run counts
  only after a token the teacher gives a probability below drift_prob (kat.terminators.TrapDetector).
- Cut after drift (`drift_cut`): the contrast to the gate, cutting right after the first drift
  token without waiting for low KL (kat.terminators.DriftTerminator).
- Oracle (`oracle`, toy worlds only): cuts one past the ground-truth first error or loop start
  (kat.toy.oracle), with KAT's bookkeeping; the upper bound on what a cut can win.
- RandomTerm matched on cut rate too (`random_matched`): random cuts whose share of cut rollouts
  and mean kept length both equal the seed's KAT run's (RandomTerminator's target_cut_rate).
- OPD, KAT's normalisation (`opd_norm`): every token in the loss, but each step's loss divided by
  the kept-token count of the seed's KAT run at that step (Config.norm_from). Dropping tokens
  changes both which tokens teach and the normaliser; this control changes the normaliser only.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

from kat.config import TOY_DIR, Config, ConfigError, load_config

TOY_ROOT = os.path.dirname(TOY_DIR)  # kat/toy: holds one folder per world
WORLDS = ("rich", "plain", "repeat", "sticky")

TABLE1_ARMS = ("opd", "kat", "kat_gated", "drift_cut", "opd_norm", "random", "fixed_prefix", "fixed_n")
# their settings come from the seed's KAT run
LENGTH_MATCHED = ("random", "random_matched", "fixed_prefix", "fixed_n", "opd_norm")
SENSITIVITY_ARMS = ("opd", "kat", "kat_q0.1", "kat_q0.5", "kat_zscore", "kat_p3")  # "kat": the config's own rule
STATIC_ARMS = {
    "opd": {"termination": "none"},
    "kat": {"termination": "kat"},
    "kat_gated": {"termination": "kat", "gate": "drift"},
    "drift_cut": {"termination": "drift"},
    "oracle": {"termination": "oracle"},
    "kat_q0.1": {"termination": "kat", "rule": "quantile", "eta": 0.1},
    "kat_q0.5": {"termination": "kat", "rule": "quantile", "eta": 0.5},
    "kat_zscore": {"termination": "kat", "rule": "zscore"},
    "kat_p3": {"termination": "kat", "patience": 3},
    "shadow": {"termination": "kat", "shadow": True},
}
LABELS = {
    "teacher": "teacher", "before": "student (before)", "opd": "OPD", "kat": "KAT",
    "random": "RandomTerm (kept length = KAT's)", "fixed_prefix": "FixedPrefix (cap = KAT's generated length)",
    "fixed_n": "Fixed-N (cap = KAT's kept length)", "kat_gated": "KAT gated (drift gate)",
    "drift_cut": "cut after drift", "oracle": "oracle cut (ground truth)",
    "random_matched": "RandomTerm (cut rate and kept length = KAT's)", "opd_norm": "OPD, KAT's normalisation",
    "kat_q0.1": "KAT quantile eta=0.1",
    "kat_q0.5": "KAT quantile eta=0.5", "kat_zscore": "KAT zscore", "kat_p3": "KAT patience 3",
}
ROW_ORDER = ("teacher", "before", "opd", "opd_norm", "random", "random_matched", "oracle", "fixed_prefix", "fixed_n",
             "kat", "kat_gated", "drift_cut", "kat_q0.1", "kat_q0.5", "kat_zscore", "kat_p3")


def world_overrides(world: str, root: str = TOY_ROOT) -> dict:
    """Teacher, student and data paths of a toy world (kat/toy/<world>/...)."""
    if world not in WORLDS:
        raise ConfigError(f"--world: unknown world {world!r}; choose from {', '.join(WORLDS)}")
    from kat.toy import teacher_dir

    base = os.path.join(root, world)
    teacher = str(teacher_dir(root, world))
    if not os.path.isdir(teacher) or not os.path.isdir(os.path.join(base, "student")):
        raise ConfigError(f"--world {world}: no checkpoints under {base}; build them with "
                          f"`python -m experiments toy build --world {world}`")
    return {"teacher": teacher, "student": os.path.join(base, "student"),
            "train_data": os.path.join(base, "data", "train.jsonl"),
            "eval_data": os.path.join(base, "data", "test.jsonl")}


def world_name(cfg: Config) -> str:
    """The toy world a config's student belongs to (worlds may share a teacher), or 'custom'."""
    parent = os.path.dirname(os.path.abspath(cfg.student))
    name = os.path.basename(parent)
    return name if os.path.dirname(parent) == os.path.abspath(TOY_ROOT) else "custom"


def base_config(argv: list[str], world: str | None) -> Config:
    """The YAML file + overrides (+ a world's paths); eval_every 0 becomes steps // 4, so each run
    has several evaluation points for the learning curves."""
    cfg = load_config(argv, **(world_overrides(world) if world else {}))
    if cfg.eval_every == 0:
        cfg = replace(cfg, eval_every=max(1, cfg.steps // 4))
    return cfg


def seed_list(base: Config, seeds: int | list[int]) -> list[int]:
    """--seeds as a list: a count n means seeds base.seed .. base.seed + n - 1."""
    return list(seeds) if isinstance(seeds, (list, tuple)) else [base.seed + k for k in range(seeds)]


def check_arms(arms: list[str]) -> None:
    unknown = [a for a in arms if a not in STATIC_ARMS and a not in LENGTH_MATCHED]
    if unknown:
        known = ", ".join(dict.fromkeys(TABLE1_ARMS + SENSITIVITY_ARMS))
        raise ConfigError(f"--arms: unknown arm(s) {unknown}; choose from {known}")


def arm_overrides(arm: str, base: Config, kat: dict | None = None) -> dict:
    """Config overrides of one arm; the length-matched arms take their numbers from `kat`, the
    summary (`experiments.runs.summarize_run`) of the same seed's KAT run.

    RandomTerm targets KAT's mean kept length (tokens in the loss per rollout); FixedPrefix caps
    generation at KAT's mean generated length rounded up; Fixed-N caps it at KAT's mean kept length
    rounded. Capped arms are still evaluated at the base max_new_tokens. The normalisation control
    divides each step's loss by the kept-token count KAT logged at that step (its metrics.jsonl).
    """
    if arm in STATIC_ARMS:
        return dict(STATIC_ARMS[arm])
    if arm not in LENGTH_MATCHED:
        known = ", ".join([*STATIC_ARMS, *LENGTH_MATCHED])
        raise ValueError(f"arm: unknown arm {arm!r}; choose from {known}")
    if kat is None:
        raise ValueError(f"arm {arm!r} is length-matched to KAT: pass the summary of the seed's KAT run as `kat`")
    if arm == "opd_norm":
        return {"termination": "none", "norm_from": os.path.join(kat["run_dir"], "metrics.jsonl")}
    if arm in ("random", "random_matched"):
        target = kat["kept_length"]
        if target >= base.max_new_tokens - 0.5:  # KAT cut (almost) nothing: its matched control is OPD
            return {"termination": "none"}
        if target <= base.exempt:
            raise ValueError(f"KAT's mean kept length {target:.1f} is not above exempt={base.exempt}; a random "
                             "cut cannot match it. Lower exempt or check the KAT run")
        over = {"termination": "random", "random_target_length": target}
        if arm == "random_matched" and kat["cut_rate"] > 0:
            over["random_target_cut_rate"] = min(kat["cut_rate"], 0.999)
        return over
    cap = math.ceil(kat["mean_length"]) if arm == "fixed_prefix" else round(kat["kept_length"])
    # the cap is a training budget: evaluation still runs at the full length, like every other arm
    return {"termination": "none", "max_new_tokens": max(1, min(cap, base.max_new_tokens)),
            "eval_max_new_tokens": base.eval_max_new_tokens or base.max_new_tokens}


def describe_overrides(over: dict) -> str:
    """A length-matched arm's setting in a few words, for the tables' matching line."""
    if over.get("termination") == "random":
        rate = f", cut rate {over['random_target_cut_rate']:.1%}" if "random_target_cut_rate" in over else ""
        return f"target {over['random_target_length']:.1f}{rate}"
    if "max_new_tokens" in over:
        return f"cap {over['max_new_tokens']}"
    if over.get("norm_from"):
        return "loss / KAT's kept tokens per step"
    return "no cut (KAT cut nothing)"
