"""``python -m experiments <command>``, run from the root of a source checkout.

    python -m experiments table1|shadow|sensitivity|mechanism|lm|power|influence ... the paper's experiments (cli)
    python -m experiments toy build [--world rich|plain|repeat] ...    rebuild the toy world (toy_build)
    python -m experiments toy stats [--world rich|plain|repeat] ...    its KL statistics (toy_stats)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

TOY_COMMANDS = {"build": "experiments.toy_build", "stats": "experiments.toy_stats"}


def main(argv: Sequence[str] | None = None) -> int:
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "toy":
        if len(argv) < 2 or argv[1] not in TOY_COMMANDS:
            print(f"error: python -m experiments toy needs one of {sorted(TOY_COMMANDS)}, e.g. "
                  "`python -m experiments toy build --world rich`", file=sys.stderr)
            return 2
        importlib.import_module(TOY_COMMANDS[argv[1]]).main(argv[2:])
        return 0
    from experiments import cli

    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
