"""Experiments built on the training loop (`python -m experiments ...` from the repository root, see ``cli``).

Not part of the installed package: kat/ never imports this folder.


- ``arms``: each arm as Config overrides; the length-matched controls derived from the KAT run.
- ``runs``: one cached `kat.train.train` call per arm and seed; numbers read back from its files.
- ``report``: reductions over seeds and over shadow rollouts, and their markdown tables.
- ``table``: Table 1 and the sensitivity sweep.
- ``shadow``: shadow-mode diagnostics (would-be cuts of graded rollouts before and after training).
- ``cli``: the command line.
- ``toy_build``: trains the toy world's teacher and student (`python -m experiments toy build`).
- ``toy_stats``: KL statistics of the toy world (`python -m experiments toy stats`).
Pictures are drawn by kat.plot.
"""
