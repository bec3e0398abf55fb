"""The package's import graph (tools/import_graph.py): no circle, no arrow from the product up to the
lab or from the core up to the toy world and the integrations; and the check itself finds both."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from import_graph import circles, import_graph, upward_arrows  # noqa: E402


def _tree(root, files: dict[str, str]) -> str:
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(textwrap.dedent(text))
    return str(root)


def test_the_package_has_no_circle_and_no_upward_arrow():
    graph = import_graph(ROOT)
    assert "kat.train" in graph and "kat.terminators.detector" in graph
    assert "kat.terminators.base" in graph["kat.terminators.detector"]
    assert circles(graph) == []
    assert upward_arrows(graph) == []
    assert ("kat.train", "kat.toy.oracle") in upward_arrows(graph, allowed={})  # the one kept on purpose


def test_a_circle_and_upward_arrows_are_found(tmp_path):
    root = _tree(tmp_path, {
        "kat/__init__.py": "",
        "kat/a.py": "from kat.b import f\n",
        "kat/b.py": "def f():\n    from . import a\n",  # a lazy, relative import closes the circle
        "kat/c.py": "import experiments.arms\nfrom kat.toy.world import grade\n",
        "kat/toy/__init__.py": "",
        "kat/toy/world.py": "from kat.a import x\n",  # the toy world may use the core
        "experiments/__init__.py": "",
    })
    graph = import_graph(root)
    assert graph["kat.b"] == {"kat", "kat.a"} and graph["kat.a"] == {"kat.b"}  # `from . import a` runs kat too
    assert circles(graph) == [["kat.a", "kat.b"]]
    assert upward_arrows(graph) == [("kat.c", "experiments"), ("kat.c", "kat.toy.world")]


def test_the_command_fails_on_a_bad_tree(tmp_path):
    root = _tree(tmp_path, {"kat/__init__.py": "", "kat/a.py": "import kat.b\n", "kat/b.py": "import kat.a\n"})
    script = os.path.join(ROOT, "tools", "import_graph.py")
    bad = subprocess.run([sys.executable, script, "--root", root], capture_output=True, text=True)
    assert bad.returncode == 1 and "kat.a <-> kat.b" in bad.stdout
    good = subprocess.run([sys.executable, script], capture_output=True, text=True)
    assert good.returncode == 0 and "circles: 0" in good.stdout
