"""Readable sizes: no function in kat/ or experiments/ longer than 80 lines, no module longer than 500.

`python tests/test_layout.py [FILE ...]` lists the offenders of any files (by default every module of kat/ and
experiments/).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted([*(ROOT / "kat").rglob("*.py"), *(ROOT / "experiments").rglob("*.py")])
MAX_FUNCTION, MAX_MODULE = 80, 500


def offenders(path: Path) -> list[str]:
    """'path: module N lines' and 'path:LINE: name N lines' (def line to last line) past the limits."""
    text = path.read_text()
    out = []
    n = len(text.splitlines())
    if n > MAX_MODULE:
        out.append(f"{path}: module {n} lines")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION:
                out.append(f"{path}:{node.lineno}: {node.name} {length} lines")
    return out


def test_package_modules_stay_readable():
    assert len(MODULES) > 20  # the package, its experiments and toy world
    found = [o for path in MODULES for o in offenders(path)]
    assert found == [], "\n".join(found)


def test_offenders_are_measured_from_def_to_last_line(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(79))
    (tmp_path / "a.py").write_text(f"def ok():\n{body}\n\n\ndef long():\n{body}\n    x = 0\n")
    assert offenders(tmp_path / "a.py") == [f"{tmp_path / 'a.py'}:83: long 81 lines"]  # ok() has 80: allowed


if __name__ == "__main__":
    files = [Path(p) for p in sys.argv[1:]] or MODULES
    print("\n".join(o for f in files for o in offenders(f)) or "none")


def conflict_markers(root: Path) -> list[str]:
    """Lines a merge left behind (<<<<<<< / >>>>>>>) in the project's source and text files."""
    found = []
    for path in sorted(root.rglob("*")):
        parts = path.relative_to(root).parts
        if path.suffix not in (".py", ".md", ".yaml", ".txt", ".toml") or parts[0].startswith(".") or "runs" in parts:
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.startswith(("<<<<<<< ", ">>>>>>> ")):
                found.append(f"{path.relative_to(root)}:{number}")
    return found


def test_no_merge_conflict_markers(tmp_path):
    assert conflict_markers(ROOT) == []
    (tmp_path / "a.py").write_text('"""doc\n<<<<<<< HEAD\nx\n=======\ny\n>>>>>>> other\n"""\n')
    assert conflict_markers(tmp_path) == ["a.py:2", "a.py:6"]
