"""Terminators by their config name (``termination``): 'kat' | 'drift' | 'random' | 'none' | 'oracle'.

'oracle' decides nothing while decoding: kat.train cuts its finished rollouts at the toy world's ground
truth (kat.toy.oracle), so online it is the terminator that never stops a row."""

from __future__ import annotations

import inspect

from kat.config import Config
from kat.terminators.controls import DriftTerminator, NoTerminator, RandomTerminator
from kat.terminators.detector import TrapDetector

TERMINATORS = {"kat": TrapDetector, "drift": DriftTerminator, "random": RandomTerminator, "none": NoTerminator,
               "oracle": NoTerminator}


def terminators() -> dict:
    """Config name -> terminator class: 'kat' | 'drift' | 'random' | 'none' | 'oracle'."""
    return dict(TERMINATORS)


def _terminator_class(name: str):
    if name not in TERMINATORS:
        raise ValueError(f"termination must be one of {tuple(TERMINATORS)}, got {name!r}")
    return TERMINATORS[name]


def make_terminator(name: str, **kw):
    """Build a terminator by its config name from keyword settings (the config's defaults for the rest)."""
    cls = _terminator_class(name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(kw) - accepted)
    if unknown:
        raise ValueError(f"termination {name!r} does not take {unknown}; it accepts {sorted(accepted)}")
    return cls(**kw)


def terminator_from_config(cfg: Config, rank: int = 0):
    """The terminator of a run with this config, on process `rank` (cfg.termination names it)."""
    return _terminator_class(cfg.termination).from_config(cfg, rank)
