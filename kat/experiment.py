"""Kept for `python -m kat experiment`; the experiments live in kat.experiments."""

from kat.experiments.cli import main  # noqa: F401
