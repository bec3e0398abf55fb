"""``python -m kat <command>``: the project's command line.

    python -m kat train [--config FILE] [--key value ...]         distil a student (kat.train)
    python -m kat eval --model PATH --data SPEC -k 8               avg@k / pass@k of a model or adapter (kat.evaluate)
    python -m kat models prune --model PATH --layers N --out DIR   a layer-pruned copy (kat.models)
    python -m kat export --spec SPEC|--model PATH|--config FILE --out X   local files for kat.py (kat.export)
    python -m kat toy build [--world rich|plain]                   rebuild the toy world's checkpoints
    python -m kat toy stats [--world rich|plain]                   KL statistics of the toy world
    python -m kat experiment table1|shadow|sensitivity ...         the paper's experiments (kat.experiments)
    python -m kat plot ...                                         figures from a run (kat.plot)
    python -m kat bench ...                                        speed/memory benchmarks (kat.bench)

Each command's module is imported only when that command runs, so ``--help`` is instant and one
command's dependencies never slow down another.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Commands that own their whole argument list: everything after the command name is passed on.
_DELEGATED = {
    "train": ("kat.train", "distil a student from a teacher (on-policy distillation with KAT)"),
    "experiment": ("kat.experiments.cli", "paper-style experiments: table1, shadow, sensitivity"),
    "plot": ("kat.plot", "draw figures from a training run"),
    "bench": ("kat.bench", "speed and memory benchmarks"),
    "models": ("kat.models", "model utilities: prune (a layer-pruned copy of a model)"),
    "export": ("kat.export", "datasets and models as the local files kat.py reads"),
}


def _delegate(module: str, argv: list[str]):
    return importlib.import_module(module).main(argv)


def _eval(args: argparse.Namespace, rest: list[str]):
    from kat import evaluate

    return evaluate.main(rest)


def _toy_build(args: argparse.Namespace, rest: list[str]):
    from kat.toy import build

    return build.main(rest)


def _toy_stats(args: argparse.Namespace, rest: list[str]):
    from kat.toy import stats

    return stats.main(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kat", description="On-policy distillation with KL Agreement Trap "
                                     "Termination (KAT).", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run `kat <command> --help` for the options of a command.")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, (module, text) in _DELEGATED.items():
        p = sub.add_parser(name, help=text, add_help=False)  # `kat train --help` is answered by kat.train
        p.set_defaults(handler=lambda args, rest, module=module: _delegate(module, rest))

    p = sub.add_parser("eval", help="avg@k / pass@k of a model (or a LoRA adapter) on evaluation sets", add_help=False)
    p.set_defaults(handler=_eval)

    toy = sub.add_parser("toy", help="the embedded toy world (build, stats)")
    toy_sub = toy.add_subparsers(dest="toy_command", metavar="toy_command", required=True)
    p = toy_sub.add_parser("build", help="generate data and train the toy teacher and student", add_help=False)
    p.set_defaults(handler=_toy_build)
    p = toy_sub.add_parser("stats", help="KL statistics of student rollouts scored by the teacher", add_help=False)
    p.set_defaults(handler=_toy_stats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m kat`` and of the ``kat`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = build_parser().parse_known_args(argv)
    result = args.handler(args, rest)
    # commands return their results (dicts) or a status; the console script exits with ours
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
