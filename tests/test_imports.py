"""The package's import graph: module-level imports between workbench modules form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "workbench"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, everywhere: bool = False) -> set[str]:
    """The workbench modules ``path`` imports at module level (what runs when it is imported), or anywhere in it."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree) if everywhere else tree.body:
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found.update(c for c in candidates if c.startswith("workbench") and _exists(c))
    return found - {module}


def _exists(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_no_import_cycle():
    graph = {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert len(graph) > 40 and "workbench.release.state" in graph["workbench.release.publish"]


def _readme_layers() -> dict[str, list[str]]:
    """The layers of the README's Design section, bottom last: layer name (column 0) -> its modules (column 15)."""
    text = (ROOT / "README.md").read_text().split("## Design", 1)[1].split("```", 2)[1]
    layers: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line[:15].strip():
            layer = line[:15].strip()
        if len(line) > 15 and line[15] != " ":
            name = line[15:].split()[0].removesuffix(".py").removesuffix("/")
            layers.setdefault(layer, []).append("workbench" if name == "__init__" else name)
    return layers


LAYERS = _readme_layers()
ORDER = list(reversed(LAYERS))  # bottom up


def _place(module: str) -> tuple[int, str]:
    """(layer index, top-level name) of a workbench module."""
    top = module.split(".")[1] if "." in module else "workbench"
    layer = next(n for n, tops in LAYERS.items() if top in tops)
    return ORDER.index(layer), top


def test_modules_import_only_their_layer_or_below():
    graph = {_module(p): _imports(p, everywhere=True) for p in PACKAGE.rglob("*.py")}  # function-level imports too
    wrong = []
    for module, imported in sorted(graph.items()):
        layer, top = _place(module)
        for target in sorted(imported):
            target_layer, target_top = _place(target)
            if target_layer > layer or (ORDER[layer] == "verbs" and target_layer == layer and target_top != top):
                wrong.append(f"{module} ({ORDER[layer]}) imports {target} ({ORDER[target_layer]})")
    assert not wrong, "\n".join(wrong)
    assert ORDER == ["foundation", "core", "verbs", "release", "command line"]


def test_the_readme_places_every_module_once():
    names = [t for tops in LAYERS.values() for t in tops]
    tops = {_module(p).split(".")[1] if "." in _module(p) else "workbench" for p in PACKAGE.rglob("*.py")}
    assert sorted(names) == sorted(tops)


def test_the_command_line_starts_without_torch():
    """`workbench --help` and every option's choices come from modules that import no torch (0.4 s instead of 2.9 s
    here); a verb's heavy imports happen when that verb runs."""
    import subprocess
    import sys

    probe = "import sys, workbench.cli; print(sorted({'torch', 'transformers', 'safetensors'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_every_public_function_and_class_has_a_docstring():
    """A newcomer reads what each module offers from its docstrings: every top-level public function and class
    says what it is, and so does every public method of a top-level class (private classes included)."""
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_") \
                    and not ast.get_docstring(node):
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
            if isinstance(node, ast.ClassDef):
                missing += [f"{path.relative_to(ROOT)}:{m.lineno} {node.name}.{m.name}" for m in node.body
                            if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and not m.name.startswith("_")
                            and not ast.get_docstring(m)]
    assert not missing, "\n".join(missing)
