"""The embedded toy world: chained arithmetic with a checkable answer (``world``), a character
tokenizer (``tokenizer``), the build that trains its teacher and student (``build``), and the
KL statistics that show what the world is for (``stats``).

Shipped files, per world (``rich`` by default, ``plain`` for contrast)::

    kat/toy/<world>/teacher/, student/   HF checkpoints (config, safetensors, tokenizer)
    kat/toy/<world>/data/train.jsonl, test.jsonl   {"prompt", "answer"} rows
    kat/toy/<world>/build.json           recipe, parameter counts and training curves
"""

from __future__ import annotations

from pathlib import Path

TOY_DIR = Path(__file__).resolve().parent
WORLD_NAMES = ("rich", "plain")


def _check_world(world: str) -> None:
    if world not in WORLD_NAMES:
        raise ValueError(f"unknown toy world {world!r}; choose one of {WORLD_NAMES}")


def checkpoint(role: str = "teacher", world: str = "rich") -> Path:
    """Directory of a shipped toy checkpoint (``role`` = teacher | student)."""
    _check_world(world)
    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    return TOY_DIR / world / role


def data_file(split: str = "train", world: str = "rich") -> Path:
    """A shipped prompt file (``split`` = train | test) of ``{"prompt", "answer"}`` rows."""
    _check_world(world)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return TOY_DIR / world / "data" / f"{split}.jsonl"
