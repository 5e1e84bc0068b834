"""No import cycles between gpt2jax's modules, function-level imports included.

Every module of ``gpt2jax`` and ``gpt2jax.convert`` is parsed with ``ast`` (nothing is imported);
each ``import``/``from ... import`` of a package module, wherever it stands in the file, is an
edge. ``from gpt2jax import x`` is an edge to the module ``gpt2jax.x`` when ``x`` is a module, to
the package root ``gpt2jax`` (its ``__init__``, which imports what it re-exports) otherwise. The
implicit import of a parent package that Python performs first is not counted, and neither is the
body of an ``if __name__ == "__main__":`` block: it runs only when the file is run as a program
(``python convert/hf.py``), as the module ``__main__``, never when the module is imported.

The same walk checks that every module's docstring is short and holds no measurements.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Package name -> folder, as pyproject.toml's package-dir maps them.
PACKAGES = {"gpt2jax": ROOT / "gpt2jax", "gpt2jax.convert": ROOT / "convert"}


def modules() -> dict[str, Path]:
    """Every module name -> its file (a package is its ``__init__.py``)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _target(name: str, known: dict[str, Path]) -> str | None:
    """The known module ``name`` is, or the nearest known package above it."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _is_main_block(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":``."""
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        and any(
            isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators
        )
    )


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules that module ``name`` imports, anywhere in its file."""
    is_package = path.stem == "__init__"
    package = name if is_package else name.rpartition(".")[0]
    edges = set()
    tree = ast.parse(path.read_text(), str(path))
    tree.body = [node for node in tree.body if not _is_main_block(node)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [_target(alias.name, known) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else
                _target(source, known)
                for alias in node.names
            ]  # fmt: skip
        else:
            continue
        edges.update(t for t in targets if t is not None and t != name)
    return edges


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """``(modules, one cycle through them)`` for each strongly connected component that has a
    cycle (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)

    found = []
    for component in components:
        start = min(component)
        path, seen = [start], {start}
        # Walk inside the component until a module repeats: that stretch is a cycle.
        while True:
            nxt = min(w for w in edges[path[-1]] if w in component)
            if nxt in seen:
                found.append((sorted(component), path[path.index(nxt) :] + [nxt]))
                break
            path.append(nxt)
            seen.add(nxt)
    return found


def test_graph_sees_function_level_imports():
    edges = graph()
    assert "gpt2jax.config" in edges["gpt2jax.model"]
    assert "gpt2jax.train.loop" in edges["gpt2jax.cli.train"]  # imported inside a function
    assert len(edges) > 30


def test_no_import_cycles():
    edges = graph()
    found = cycles(edges)
    report = [
        f"{len(members)} modules import each other: {', '.join(members)}\n"
        f"    e.g. {' -> '.join(cycle)}"
        for members, cycle in found
    ]
    assert not found, "import cycles:\n  " + "\n  ".join(report)


def test_every_subpackage_is_installed():
    """pyproject.toml lists packages by hand (convert/ is mapped): a new folder must be listed."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {name for name, path in modules().items() if path.stem == "__init__"}
    assert on_disk == listed


#: A module's docstring says what it is and why in a few lines (a file-format layout may take a
#: few more); design detail belongs in the docstring of the function it concerns, structure in
#: ARCHITECTURE.md, measurements in BENCHMARKS.md with the command that produced them.
MAX_MODULE_DOCSTRING_LINES = 12
#: What a measurement or a version note looks like: times, sizes, speeds, "2x faster", "jax 0.10".
MEASUREMENT = re.compile(
    r"\d(\.\d+)?\s?(ms|GB|GiB|MB|MiB|tok/s)\b|\d\.\d+\s?s\b|\d(\.\d+)?x (faster|slower)\b"
    r"|\b(jax|jaxlib|torch|flax|optax|orbax) \d+\.\d+"
)


def docstring_problems(doc: str | None) -> list[str]:
    """What is wrong with a module docstring (literals in double backquotes, such as a command's
    ``--memory 16GB``, are not prose and not checked for measurements)."""
    if not doc:
        return ["no module docstring"]
    problems = []
    lines = doc.strip().splitlines()
    if len(lines) > MAX_MODULE_DOCSTRING_LINES:
        problems.append(f"{len(lines)} lines (at most {MAX_MODULE_DOCSTRING_LINES})")
    found = MEASUREMENT.search(re.sub(r"``.*?``", "", doc, flags=re.S))
    if found:
        problems.append(f"{found.group(0)!r}: measurements belong in BENCHMARKS.md")
    return problems


def test_module_docstrings_are_short_and_hold_no_measurements():
    problems = [
        f"{name}: {problem}"
        for name, path in modules().items()
        for problem in docstring_problems(ast.get_docstring(ast.parse(path.read_text())))
    ]
    assert not problems, "module docstrings:\n  " + "\n  ".join(problems)


def test_docstring_check_can_fail():
    assert docstring_problems(None) == ["no module docstring"]
    assert docstring_problems("A.\n" + "more\n" * MAX_MODULE_DOCSTRING_LINES)
    for note in ("0.88 s vs 1.21 s", "6.2 GB more", "20 ms a row", "2x faster", "jax 0.10"):
        assert docstring_problems(f"What it is.\n\nWhy: {note}."), note
    assert not docstring_problems("Reads ``--memory 16GB``.\n\n8 bytes, 50257 ids, eps 1e-5.")
