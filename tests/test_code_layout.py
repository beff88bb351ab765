"""The house rules a reader relies on, checked on the source: no import circle between the project's
modules (lazy imports inside functions count too), and no private attribute of another library."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("datasets_io", "emotion_models", "pipelines", "tuning")
# Attributes with a leading underscore that are public API all the same (documented functions).
PUBLIC_UNDERSCORE = {("os", "_exit")}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The project modules ``module`` imports, anywhere in the file (``from a.b import c`` counts ``a.b.c``
    when that is a module, else ``a.b``)."""
    out = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        out |= {name for name in names if name in known and name != module}
    return out


def test_no_import_circle_between_the_projects_modules():
    modules = _modules()
    graph = {m: _imports(p, m, set(modules)) for m, p in modules.items()}
    # A package's __init__ importing its own modules is how registration works (emotion_models): not a circle.
    for m in graph:
        graph[m] = {d for d in graph[m] if not (m in PACKAGES and d.startswith(m + "."))}
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_attribute_of_another_library_outside_tests():
    found = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value.id if isinstance(node.value, ast.Name) else None
                if base in ("self", "cls") or (base, node.attr) in PUBLIC_UNDERSCORE:
                    continue
                found.append(f"{path.relative_to(REPO)}:{node.lineno} .{node.attr}")
    assert not found, found
