"""`python benchmarks/run.py NAME [args]`: run a benchmark script of this folder by name.

    python benchmarks/run.py kl --quick     # benchmarks/kl.py
    python benchmarks/run.py rollout        # benchmarks/rollout.py
    python benchmarks/run.py                # list them

Benchmarks live in the source checkout, not in the installed package: each prints a table with
ratios against a baseline measured in the same run.
"""

from __future__ import annotations

import os
import runpy
import sys

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
NOT_BENCHMARKS = ("common.py", "run.py")


def available() -> list[str]:
    if not os.path.isdir(BENCH_DIR):
        return []
    return sorted(f[:-3] for f in os.listdir(BENCH_DIR) if f.endswith(".py") and f not in NOT_BENCHMARKS)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("available:", ", ".join(names) if names else "none")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"error: no benchmark {name!r}; choose one of {names}", file=sys.stderr)
        return 2
    sys.argv = [os.path.join(BENCH_DIR, f"{name}.py"), *rest]
    runpy.run_path(sys.argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
