"""The embedded toy world: chained arithmetic with a checkable answer (``world``), a character
tokenizer (``tokenizer``). The build that trains its teacher and student and the KL statistics
that show what the world is for live in the source checkout: experiments/toy_build.py and
experiments/toy_stats.py (``python -m experiments toy build|stats``).

Shipped files, per world (``rich`` by default, ``plain`` for contrast, ``repeat`` for traps that
persist: the rich world's teacher and a student that repeats more often; ``sticky`` for a teacher
that continues a loop once one is there and a student whose loops escape)::

    kat/toy/<world>/teacher/, student/   HF checkpoints (config, safetensors, tokenizer)
    kat/toy/<world>/data/train.jsonl, test.jsonl   {"prompt", "answer"} rows
    kat/toy/<world>/build.json           recipe, parameter counts and training curves

A world built with ``--teacher-from`` has no teacher/ of its own: its build.json names the teacher
it shares (``{"teacher": {"from": "rich/teacher"}}``, relative to kat/toy).
"""

from __future__ import annotations

import json
from pathlib import Path

TOY_DIR = Path(__file__).resolve().parent
WORLD_NAMES = ("rich", "plain", "repeat", "sticky")


def _check_world(world: str) -> None:
    if world not in WORLD_NAMES:
        raise ValueError(f"unknown toy world {world!r}; choose one of {WORLD_NAMES}")


def teacher_dir(root: str | Path, world: str) -> Path:
    """The teacher of the world under `root`: its own teacher/, or the one its build.json names."""
    own = Path(root) / world / "teacher"
    build = Path(root) / world / "build.json"
    if not own.exists() and build.exists():
        shared = json.loads(build.read_text()).get("teacher", {}).get("from")
        if shared:
            return Path(root) / shared
    return own


def checkpoint(role: str = "teacher", world: str = "rich") -> Path:
    """Directory of a shipped toy checkpoint (``role`` = teacher | student)."""
    _check_world(world)
    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    return teacher_dir(TOY_DIR, world) if role == "teacher" else TOY_DIR / world / role


def data_file(split: str = "train", world: str = "rich") -> Path:
    """A shipped prompt file (``split`` = train | test) of ``{"prompt", "answer"}`` rows."""
    _check_world(world)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return TOY_DIR / world / "data" / f"{split}.jsonl"
