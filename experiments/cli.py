"""Experiments on the training loop: Table 1 with length-matched controls, shadow diagnostics, sensitivity.

The paper's Table 1 with the controls it lacked (and the drift-gated rule, its cut-after-drift
contrast and a normalisation control), shadow-mode diagnostics of the detectors, a sensitivity
sweep of the detector's settings, and the gradient mechanism of cutting.

    python -m experiments table1 --config configs/toy.yaml --seeds 5 [--steps N] [--out DIR]
                                 [--arms ARMS] [--world rich|plain|rich,plain] [--key value ...]
    python -m experiments shadow --config configs/toy.yaml [--seeds 1] [--world ...] [--batches 8]
    python -m experiments sensitivity --config configs/toy.yaml [--seeds 1] [--world ...]
    python -m experiments mechanism --config configs/toy.yaml [--seeds 1] [--world ...]
    python -m experiments power --config configs/toy.yaml --world rich --seeds 0,1,2 --heldout 1024 [--arms ...]
    python -m experiments influence --config configs/toy.yaml --world rich --seeds 3 [--probe-steps 6,12,18,24,30]
    python -m experiments lm --config configs/smollm2_shadow.yaml [--batches 8] [--student-layers 28]

--seeds takes a count (seeds seed, seed+1, ... of the config) or a list (--seeds 0,1,2,3,4).
Every arm is one `kat.train.train` run, its Config the YAML file + `--key value` overrides + the
arm's own overrides (experiments.arms), written to DIR/<world>/<arm>/seed<k>/ and reused when
its config is unchanged (experiments.runs). Seeds change the prompt order, the sampling and the
evaluation samples; every seed starts from the same student.
"""

from __future__ import annotations

import argparse
import sys

import torch

from kat.config import ConfigError
from kat.data import DataError
from experiments.arms import SENSITIVITY_ARMS, TABLE1_ARMS, check_arms

DEFAULT_SEEDS = {"table1": 3}  # other experiments: 1


def parse_seeds(text: str | None, what: str) -> int | list[int]:
    """--seeds: a count ('5') or a comma-separated list of seeds ('0,1,2,3,4')."""
    if not text:
        return DEFAULT_SEEDS.get(what, 1)
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: {text!r} is neither a count nor a comma-separated list of integers; "
                          "write e.g. --seeds 5 or --seeds 0,1,2,3,4") from None
    if not values:
        raise ConfigError("--seeds: empty; write e.g. --seeds 5 or --seeds 0,1,2,3,4")
    if "," not in text:
        if values[0] < 1:
            raise ConfigError(f"--seeds: {values[0]} seeds; give a count >= 1 or a list such as 0,1,2")
        return values[0]
    if len(set(values)) != len(values):
        raise ConfigError(f"--seeds: {text!r} repeats a seed; list each seed once")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments", description=__doc__.splitlines()[0],
                                allow_abbrev=False, epilog="Other --key value pairs (e.g. --config FILE, --steps N, "
                                "--eval_limit N) are Config overrides applied to every arm.")
    p.add_argument("what", choices=("table1", "shadow", "sensitivity", "mechanism", "lm", "power",
                                        "influence"),
                   help="which experiment")
    p.add_argument("--seeds", default=None, help="a count of seeds (from the config's seed on) or a comma-separated "
                   "list, e.g. 0,1,2,3,4 (default: 3 for table1, 1 otherwise)")
    p.add_argument("--out", default="runs/experiments", help="output directory (default runs/experiments)")
    p.add_argument("--arms", "--only", dest="arms", default="", help="comma-separated arms to run (default: all of "
                   "the experiment's)")
    p.add_argument("--world", default="", help="toy world(s), comma-separated: rich, plain (default: the config's "
                   "own teacher/student/data)")
    p.add_argument("--batches", type=int, default=8, help="shadow, lm: recorded batches (per seed and point) "
                   "(default 8)")
    p.add_argument("--student-layers", type=int, default=28, help="lm: decoder layers the student keeps when it "
                   "is made from the teacher (default 28)")
    p.add_argument("--pool", default="", help="lm: comma-separated directories of finished lm runs (other "
                   "seeds) to report together, sampling nothing")
    p.add_argument("--heldout", type=int, default=1024, help="power, influence: fresh held-out problems (default 1024)")
    p.add_argument("--probe-steps", default="6,12,18,24,30", help="influence: the steps (1-based) probed "
                   "(default 6,12,18,24,30)")
    p.add_argument("--draws", type=int, default=4, help="influence: matched random draws per probe (default 4)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    from experiments.lm import run_lm
    from experiments.mechanism import run_mechanism
    from experiments.shadow import run_shadow
    from experiments.table import run_table

    argv = sys.argv[1:] if argv is None else argv
    args, rest = build_parser().parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    worlds = [w.strip() for w in args.world.split(",") if w.strip()] or [None]
    command = "python -m experiments " + " ".join(argv)
    try:
        seeds = parse_seeds(args.seeds, args.what)
        if args.what == "shadow":
            run_shadow(rest, seeds, args.out, worlds, args.batches, args.dry_run, command)
        elif args.what == "mechanism":
            run_mechanism(rest, seeds, args.out, worlds, args.dry_run, command)
        elif args.what == "power":
            from experiments.power import POWER_ARMS, run_power
            arms = [a.strip() for a in args.arms.split(",") if a.strip()] or list(POWER_ARMS)
            check_arms(arms)
            for world in worlds:
                run_power(rest, seeds, args.out, world, arms, args.heldout, dry_run=args.dry_run, command=command)
        elif args.what == "influence":
            from experiments.influence import run_influence
            for world in worlds:
                run_influence(rest, seeds, args.out, world, args.heldout, args.probe_steps, args.draws,
                              dry_run=args.dry_run, command=command)
        elif args.what == "lm":
            pool = [d.strip() for d in args.pool.split(",") if d.strip()]
            run_lm(rest, args.out, args.batches, args.student_layers, args.dry_run, command, pool=pool or None)
        else:
            arms = [a.strip() for a in args.arms.split(",") if a.strip()] or list(
                TABLE1_ARMS if args.what == "table1" else SENSITIVITY_ARMS)
            run_table(args.what, arms, rest, seeds, args.out, worlds, args.dry_run, command)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
