"""Experiments built on the training loop (`python -m kat experiment ...`, see ``cli``).

- ``arms``: each arm as Config overrides; the length-matched controls derived from the KAT run.
- ``runs``: one cached `kat.train.train` call per arm and seed; numbers read back from its files.
- ``report``: reductions over seeds and over shadow rollouts, and their markdown tables.
- ``table``: Table 1 and the sensitivity sweep.
- ``shadow``: shadow-mode diagnostics (would-be cuts of graded rollouts before and after training).
- ``cli``: the command line.
Pictures are drawn by kat.plot.
"""
