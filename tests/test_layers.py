"""The package's import structure (docs/design.md, "Layers"): read from the source, function-level
imports included, it has no loop, and no module imports from a floor above its own."""

import ast
from pathlib import Path

import ebm_fast

PACKAGE = Path(ebm_fast.__file__).parent

# docs/design.md's floors, top to bottom: a module may import from its own floor and those below.
FLOORS = [
    ("ebm_fast.cli", "ebm_fast.commands"),
    ("ebm_fast.experiments",),
    ("ebm_fast.training",),
    ("ebm_fast",),  # the package's __init__: the public API
    ("ebm_fast.datasets", "ebm_fast.exact2d"),
    ("ebm_fast.samplers",),
    ("ebm_fast.buffer",),
    ("ebm_fast.ops",),
    ("ebm_fast.backends", "ebm_fast.allocator", "ebm_fast.precision"),
    ("ebm_fast.kernels", "ebm_fast._cpp"),
    ("ebm_fast.reference",),
    ("ebm_fast.noise", "ebm_fast.validation"),
]


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("ebm_fast",) + path.relative_to(PACKAGE).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules) -> set[str]:
    """The package's modules that importing ``name`` runs: what it imports anywhere in its file,
    and the packages above those (their __init__ runs first) that ``name`` is not inside."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from package import module` imports the module; `from module import name` not.
            targets.update(
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            )
    found = set()
    for target in targets:
        parts = target.split(".")
        for end in range(2, len(parts) + 1):
            prefix = ".".join(parts[:end])
            if prefix in modules and not (name + ".").startswith(prefix + "."):
                found.add(prefix)
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def floor_of(name: str) -> int:
    """The index in FLOORS of the longest prefix naming ``name`` or a package above it."""
    matches = [
        (len(prefix), floor)
        for floor, prefixes in enumerate(FLOORS)
        for prefix in prefixes
        if name == prefix or name.startswith(prefix + ".")
    ]
    assert matches, f"{name} is on no floor: add it to FLOORS and docs/design.md"
    return max(matches)[1]


def test_no_module_imports_from_a_floor_above_its_own():
    upward = [
        f"{name} (floor {floor_of(name)}) imports {target} (floor {floor_of(target)})"
        for name, targets in import_graph().items()
        for target in sorted(targets)
        if floor_of(target) < floor_of(name)
    ]
    assert not upward, "\n".join(upward)


def test_the_imports_have_no_loop():
    graph = import_graph()
    done, path = set(), []

    def visit(name):  # depth-first; a module met again on the current path closes a loop
        if name in path:
            raise AssertionError("import loop: " + " -> ".join(path[path.index(name) :] + [name]))
        if name in done:
            return
        path.append(name)
        for target in sorted(graph[name]):
            visit(target)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_the_leaves_import_nothing_from_the_package():
    """noise.py (the spec's constants and streams) and validation.py can be read by every layer."""
    graph = import_graph()
    assert graph["ebm_fast.noise"] == set() and graph["ebm_fast.validation"] == set()
