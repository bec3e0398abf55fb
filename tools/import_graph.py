"""The package's import graph: every `import` in kat/ (top-level and inside functions), its circles
and its arrows that point up, from the product to the lab or from the core to what sits on it.

    python tools/import_graph.py [--root DIR] [--edges]

An arrow points up when a module imports one it should not depend on:
- anything in kat/ importing the lab (experiments, benchmarks, tests, tools);
- a core module (not kat.toy, kat.integrations or the command line kat.__main__) importing the
  toy world or an integration, which are built on the core.
Exit status 1 when there is a circle or an upward arrow, so the same call serves as a check.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

LAB = ("experiments", "benchmarks", "tests", "tools")
ON_TOP = ("kat.toy", "kat.integrations", "kat.__main__")  # built on the core; may import it freely
# Upward arrows kept on purpose, each with its reason; printed, never hidden.
ALLOWED = {
    ("kat.train", "kat.toy.oracle"): "termination: oracle cuts at the toy world's ground truth, which only "
                                     "the toy world knows (imported only when that arm runs)",
}


def module_name(root: str, path: str) -> str:
    rel = os.path.relpath(path, root)[: -len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def package_modules(root: str, package: str = "kat") -> dict[str, str]:
    """Module name -> file, for every .py file under root/package."""
    found = {}
    for folder, _, files in os.walk(os.path.join(root, package)):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                found[module_name(root, path)] = path
    return found


def imported_names(path: str, module: str) -> set[str]:
    """Every module name `path` imports, relative imports resolved, `from a import b` as a.b and a."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    is_package = path.endswith("__init__.py")
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                keep = len(parts) - node.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: str) -> dict[str, set[str]]:
    """Module -> the modules of kat/ and of the lab it imports (names that are not modules are dropped)."""
    modules = package_modules(root)
    lab = {name for name in LAB if os.path.isdir(os.path.join(root, name))}
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(path, module):
            if name in modules and name != module:
                targets.add(name)
            elif name.split(".")[0] in lab:
                targets.add(name.split(".")[0])
        graph[module] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def upward_arrows(graph: dict[str, set[str]], allowed=ALLOWED) -> list[tuple[str, str]]:
    """Arrows from the product to the lab or from the core to what is built on it, less `allowed`."""
    arrows = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            if target in LAB:
                arrows.append((source, target))
            elif not _within(source, ON_TOP) and _within(target, ("kat.toy", "kat.integrations")):
                arrows.append((source, target))
    return [arrow for arrow in arrows if arrow not in allowed]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        help="the repository root holding kat/ (default: this checkout)")
    parser.add_argument("--edges", action="store_true", help="also print every arrow")
    args = parser.parse_args(argv)
    graph = import_graph(args.root)
    if args.edges:
        for source, targets in sorted(graph.items()):
            print(f"{source} -> {', '.join(sorted(targets)) or '-'}")
    found, arrows = circles(graph), upward_arrows(graph)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} arrows")
    print(f"circles: {len(found)}")
    for component in found:
        print("  " + " <-> ".join(component))
    print(f"upward arrows: {len(arrows)}")
    for source, target in arrows:
        print(f"  {source} -> {target}")
    kept = [arrow for arrow in ALLOWED if arrow[1] in graph.get(arrow[0], ())]
    print(f"upward arrows kept on purpose: {len(kept)}")
    for source, target in kept:
        print(f"  {source} -> {target}: {ALLOWED[(source, target)]}")
    return 1 if found or arrows else 0


if __name__ == "__main__":
    sys.exit(main())
