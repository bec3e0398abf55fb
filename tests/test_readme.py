"""The README's links: every file it links exists, and every line anchor names what it points at.

A line anchor is written [`TEXT`](path#L123) and line 123 of `path` must contain TEXT (e.g. `def sample(`).
`python tests/test_readme.py --fix` moves each anchor to the line where its TEXT now is (the first
occurrence in the file), after an edit shifted the lines.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ANCHOR = re.compile(r"\[`([^`]+)`\]\(([^)#\s]+)#L(\d+)\)")
LINK = re.compile(r"\]\(((?!https?:|#)[^)\s#]+)(?:#[^)]*)?\)")


def anchors(text: str) -> list[tuple[str, str, int]]:
    return [(m[1], m[2], int(m[3])) for m in ANCHOR.finditer(text)]


def line_of(path: str, needle: str) -> int | None:
    for i, line in enumerate((ROOT / path).read_text().splitlines(), 1):
        if needle in line:
            return i
    return None


def test_linked_files_exist():
    missing = sorted({p for p in LINK.findall(README.read_text()) if not (ROOT / p).exists()})
    assert missing == []


def test_line_anchors_name_their_definition():
    found = anchors(README.read_text())
    assert len(found) >= 10  # the implementation details table
    wrong = []
    for needle, path, n in found:
        lines = (ROOT / path).read_text().splitlines()
        if not (1 <= n <= len(lines) and needle in lines[n - 1]):
            wrong.append(f"{path}#L{n} does not hold {needle!r} (it is at line {line_of(path, needle)}); "
                         "run python tests/test_readme.py --fix")
    assert wrong == [], "\n".join(wrong)


def test_anchor_finder(tmp_path):
    text = "see [`def f(`](kat.py#L3) and [`class G`](kat/x.py#L10), not [f](kat.py)"
    assert anchors(text) == [("def f(", "kat.py", 3), ("class G", "kat/x.py", 10)]
    assert LINK.findall(text) == ["kat.py", "kat/x.py", "kat.py"]


def fix() -> int:
    text = README.read_text()

    def repl(m: re.Match) -> str:
        n = line_of(m[2], m[1])
        if n is None:
            raise SystemExit(f"error: {m[1]!r} is no longer in {m[2]}; edit that anchor in README.md by hand")
        return f"[`{m[1]}`]({m[2]}#L{n})"

    README.write_text(ANCHOR.sub(repl, text))
    return 0


if __name__ == "__main__":
    sys.exit(fix() if "--fix" in sys.argv else 0)
