"""The README and docs/*.md: every file they link exists, every line anchor names what it points at,
and the README stays a front door.

Links are relative to the page that holds them (README.md: the repository root; docs/x.md: docs/).
A line anchor is written [`TEXT`](path#L123) and line 123 of `path` must contain TEXT (e.g.
`def sample(`). Line anchors into kat.py live in docs/implementation.md only, so that one page is
refreshed when kat.py changes: `python tests/test_readme.py --fix` moves each anchor to the line
where its TEXT now is (the first occurrence in the file).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ANCHOR_PAGE = ROOT / "docs" / "implementation.md"
ANCHOR = re.compile(r"\[`([^`]+)`\]\(([^)#\s]+)#L(\d+)\)")
LINK = re.compile(r"\]\(((?!https?:|#)[^)\s#]+)(?:#([^)]*))?\)")
# Written on another line of work; a link to it is checked once the file exists.
LATER = {ROOT / "docs" / "reliability.md"}
FRONT_DOOR_LINES = 300
FIRST_SCREENS = 120


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def anchors(text: str) -> list[tuple[str, str, int]]:
    return [(m[1], m[2], int(m[3])) for m in ANCHOR.finditer(text)]


def line_of(path: Path, needle: str) -> int | None:
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return i
    return None


def slug(heading: str) -> str:
    """GitHub's id for a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def headings(path: Path) -> set[str]:
    found, fenced = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def broken_links(page: Path, later: set[Path] = LATER) -> list[str]:
    """Each link of `page` whose file is missing, or whose #fragment names no heading of a .md file."""
    broken = []
    for target, fragment in LINK.findall(page.read_text()):
        path = (page.parent / target).resolve()
        if not path.exists():
            if path not in later:
                broken.append(f"{page.name}: {target} does not exist")
        elif fragment and path.suffix == ".md" and not fragment.startswith("L") and fragment not in headings(path):
            broken.append(f"{page.name}: {target}#{fragment} names no heading of {target}")
    return broken


def stale_anchors(page: Path) -> list[str]:
    wrong = []
    for needle, target, n in anchors(page.read_text()):
        path = (page.parent / target).resolve()
        lines = path.read_text().splitlines()
        if 1 <= n <= len(lines) and needle in lines[n - 1]:
            continue
        now = line_of(path, needle)
        where = f"it is at line {now}; run python tests/test_readme.py --fix" if now else \
            f"it is no longer in {target}: edit this anchor by hand"
        wrong.append(f"{page.name}: {target}#L{n} does not hold {needle!r} ({where})")
    return wrong


def test_linked_files_exist():
    assert [b for p in pages() for b in broken_links(p)] == []


def test_line_anchors_name_their_definition():
    assert len(anchors(ANCHOR_PAGE.read_text())) >= 10  # the table of where each part sits in kat.py
    wrong = [w for p in pages() for w in stale_anchors(p)]
    assert wrong == [], "\n".join(wrong)


def test_line_anchors_live_on_one_page():
    elsewhere = [f"{p.name}: {a[1]}#L{a[2]}" for p in pages() if p != ANCHOR_PAGE for a in anchors(p.read_text())]
    assert elsewhere == [], f"move these line anchors to {ANCHOR_PAGE.name}"


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= FRONT_DOOR_LINES
    first = lines[:FIRST_SCREENS]
    assert any(line.startswith("![") for line in first), "the picture belongs in the first screens"
    assert any(line.startswith("| KAT ") for line in first), "the results table belongs in the first screens"
    assert "several GPUs" in " ".join(" ".join(first).split()), "say near the top what has not run"


def test_anchor_finder():
    text = "see [`def f(`](kat.py#L3) and [`class G`](kat/x.py#L10), not [f](kat.py) or [h](a.md#two-words)"
    assert anchors(text) == [("def f(", "kat.py", 3), ("class G", "kat/x.py", 10)]
    assert [t for t, _ in LINK.findall(text)] == ["kat.py", "kat/x.py", "kat.py", "a.md"]
    assert slug(" A real pair: SmolLM2-135M in shadow mode") == "a-real-pair-smollm2-135m-in-shadow-mode"


def test_links_resolve_from_their_page(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "kat.py").write_text("def f():\n    pass\n")
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Two words\n")
    page = tmp_path / "docs" / "b.md"
    page.write_text("[ok](../kat.py) [ok](a.md#two-words) [bad](kat.py) [bad](a.md#three) [later](reliability.md)\n"
                    "[`def f(`](../kat.py#L1) [`pass`](../kat.py#L1) [`def g(`](../kat.py#L2)\n")
    assert broken_links(page, later={tmp_path / "docs" / "reliability.md"}) == [
        "b.md: kat.py does not exist", "b.md: a.md#three names no heading of a.md"]
    # A planned page is skipped only while it is absent.
    assert broken_links(page, later=set())[-1] == "b.md: reliability.md does not exist"
    assert stale_anchors(page) == [
        "b.md: ../kat.py#L1 does not hold 'pass' (it is at line 2; run python tests/test_readme.py --fix)",
        "b.md: ../kat.py#L2 does not hold 'def g(' (it is no longer in ../kat.py: edit this anchor by hand)"]


def moved(page: Path, m: re.Match) -> str:
    """Anchor `m` of `page` pointed at the line where its text now is."""
    n = line_of((page.parent / m[2]).resolve(), m[1])
    if n is None:
        raise SystemExit(f"error: {m[1]!r} is no longer in {m[2]}; edit that anchor in {page.name} by hand")
    return f"[`{m[1]}`]({m[2]}#L{n})"


def fix(root: Path = ROOT) -> int:
    for page in pages(root):
        text = page.read_text()
        new = ANCHOR.sub(lambda m, page=page: moved(page, m), text)
        if new != text:
            page.write_text(new)
    return 0


def test_fix_moves_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "kat.py").write_text("x = 1\ndef f():\n    pass\n")
    (tmp_path / "README.md").write_text("front door\n")
    page = tmp_path / "docs" / "implementation.md"
    page.write_text("| f | [`def f(`](../kat.py#L9) |\n")
    fix(tmp_path)
    assert page.read_text() == "| f | [`def f(`](../kat.py#L2) |\n"


if __name__ == "__main__":
    sys.exit(fix() if "--fix" in sys.argv else 0)
