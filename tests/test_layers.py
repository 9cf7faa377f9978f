"""The folders import one another in one direction only: a declared floor order, no cycle.

Every product .py file is parsed (no import runs); each `import` / `from ... import` naming a
`flowact` module, at module level or inside a function, is an edge from the file's folder to the
imported module's folder. `python -m tests.test_layers` prints the scan (folder -> folders it imports).
"""

from __future__ import annotations

import ast
import os
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Folders, lowest floor first: folder -> the folders it may import (only folders above it in this dict).
ALLOWED: dict[str, set[str]] = {
    "flowact": set(),  # core root files: contract, presets, specs, media, ...
    "flowact/models": {"flowact"},  # the networks, and flowact/networks.py that builds / loads their family
    "flowact/runtime": {"flowact", "flowact/models"},
    "flowact (engine)": {"flowact", "flowact/models", "flowact/runtime"},  # root files on the runtime: ROOT_FLOORS
    "flowact/train": {"flowact", "flowact/models", "flowact/runtime", "flowact (engine)"},
    "export": {"flowact", "flowact/models", "flowact/runtime", "flowact (engine)"},
    "client": {"flowact", "flowact (engine)"},  # flowact.snapshot.peek_preset, on an error path
    "model_repository": {"flowact", "flowact/models", "flowact/runtime", "flowact (engine)", "export", "client"},
    "web": {"flowact", "client", "model_repository"},
    "integrations": {"flowact", "client", "web"},
    "benchmarks": {"flowact", "flowact/models", "flowact/runtime", "flowact (engine)", "flowact/train", "export",
                   "client", "model_repository", "web", "integrations"},
    "flowact/cli.py": {"flowact", "export", "client", "model_repository", "web", "benchmarks",
                       "flowact (engine)"},  # the top entry point: wires every command
}
# flowact/<name>.py files not on the "flowact" floor: the stream engine stands on the runtime,
# networks.py (the family's builder and checkpoints) is the models' floor, cli.py the top.
ROOT_FLOORS = {"engine": "flowact (engine)", "snapshot": "flowact (engine)",
               "generate": "flowact (engine)", "networks": "flowact/models", "cli": "flowact/cli.py"}
# import name -> folder (pyproject.toml's package-dir)
PACKAGES = {"flowact.export": "export", "flowact.serving": "model_repository", "flowact.client": "client",
            "flowact.web": "web", "flowact.integrations": "integrations", "flowact.benchmarks": "benchmarks"}
# subfolders of flowact/ -> floor (samples/: the shipped inputs and the script that made them)
SUBFOLDERS = {"models": "flowact/models", "runtime": "flowact/runtime", "train": "flowact/train", "samples": "flowact"}


def folder(module: str) -> str | None:
    """The floor of an imported module (`flowact...`), None for a module outside the project."""
    parts = module.split(".")
    if parts[0] != "flowact":
        return None
    for package, path in PACKAGES.items():
        if module == package or module.startswith(package + "."):
            return path
    if len(parts) == 1:
        return "flowact"
    if parts[1] in SUBFOLDERS:
        return SUBFOLDERS[parts[1]]
    return ROOT_FLOORS.get(parts[1], "flowact")


def product_files() -> dict[str, list[Path]]:
    """floor -> its .py files (the model.py files of model_repository/<model>/1/ included)."""
    files = defaultdict(list)
    for path in sorted((ROOT / "flowact").rglob("*.py")):
        rel = path.relative_to(ROOT / "flowact").parts
        if len(rel) == 1:
            files[ROOT_FLOORS.get(path.stem, "flowact")].append(path)
        elif rel[0] in SUBFOLDERS:
            files[SUBFOLDERS[rel[0]]].append(path)
        else:
            raise AssertionError(f"flowact/{rel[0]}/ has no floor: add it to tests/test_layers.py's SUBFOLDERS")
    for path_name in PACKAGES.values():
        files[path_name] = sorted((ROOT / path_name).rglob("*.py"))
    return files


def imported_modules(path: Path) -> set[str]:
    """Every flowact module a file imports, wherever the import statement is; for the dispatcher
    flowact/cli.py also the modules named in its COMMANDS (imported with importlib)."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == "flowact":  # `from flowact import cli`
            found.update(f"flowact.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "COMMANDS" for t in node.targets):
            found.update(ast.literal_eval(node.value).values())
    return {m for m in found if m.split(".")[0] == "flowact"}


def scan(files: dict[str, list[Path]] | None = None) -> dict[str, dict[str, set[str]]]:
    """floor -> {imported floor -> the files (relative paths) that import it}."""
    graph: dict[str, dict[str, set[str]]] = {}
    for floor, paths in (files or product_files()).items():
        edges = graph.setdefault(floor, defaultdict(set))
        for path in paths:
            for module in imported_modules(path):
                target = folder(module)
                if target is not None and target != floor:
                    edges[target].add(os.path.relpath(path, ROOT))
    return graph


def report(graph) -> str:
    return "\n".join(f"{floor} -> {', '.join(sorted(graph[floor])) or '(nothing)'}" for floor in ALLOWED if floor in graph)


def cycle(graph) -> list[str] | None:
    """A cycle of floors in the import graph, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in graph.get(node, {}):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in graph:
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_allowed_is_a_floor_order():
    floors = list(ALLOWED)
    for i, floor in enumerate(floors):
        above = ALLOWED[floor] - set(floors[:i])
        assert not above, f"{floor} may import {sorted(above)}, which are not below it in ALLOWED"


def test_every_import_goes_down_and_no_cycle():
    graph = scan()
    assert set(graph) <= set(ALLOWED), f"floors missing from ALLOWED: {sorted(set(graph) - set(ALLOWED))}"
    upward = [f"{floor} -> {target} ({', '.join(sorted(files))})"
              for floor, edges in graph.items() for target, files in edges.items() if target not in ALLOWED[floor]]
    found = cycle(graph)
    assert not upward and found is None, (
        "imports against the floor order:\n  " + "\n  ".join(upward)
        + (f"\ncycle: {' -> '.join(found)}" if found else "") + f"\n\nthe scan (floor -> floors it imports):\n{report(graph)}")


def test_an_upward_import_is_caught(tmp_path):
    """The scan sees a function-level import that goes up a floor (the runtime importing the exporter)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from flowact.export.onnx import export_onnx\n")
    files = product_files()
    files["flowact/runtime"].append(bad)
    graph = scan(files)
    assert "export" in graph["flowact/runtime"] and "export" not in ALLOWED["flowact/runtime"]
    assert cycle(graph) is not None  # export imports the runtime


if __name__ == "__main__":
    print(report(scan()))
