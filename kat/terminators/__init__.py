"""Terminators: decide online, chunk by chunk, whether a rollout should stop early.

- ``base``: the interface, the per-batch `TerminatorState`, the helpers the terminators share and
  their defaults (the config's).
- ``detector``: `TrapDetector` (KAT) and `window_means`.
- ``controls``: `DriftTerminator`, `RandomTerminator`, `NoTerminator`, the controls KAT is compared
  against.
- ``registry``: the config's names for them, `make_terminator` and `terminator_from_config`.

Each module imports only the ones listed before it (and kat.config, kat.rollout).
"""

from kat.terminators.base import TerminatorState, all_gather_cat
from kat.terminators.controls import DriftTerminator, NoTerminator, RandomTerminator
from kat.terminators.detector import GATES, RULES, TrapDetector, window_means
from kat.terminators.registry import make_terminator, terminator_from_config, terminators

__all__ = ["TerminatorState", "all_gather_cat", "DriftTerminator", "NoTerminator", "RandomTerminator", "GATES",
           "RULES", "TrapDetector", "window_means", "make_terminator", "terminator_from_config", "terminators"]
