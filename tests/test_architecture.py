"""The layering of docs/architecture.md, checked on the source: imports point one way.

Every module's imports are parsed (``ast``, no import runs). The rules:
- ``store`` imports nothing from ``extract``, ``cusa_train``, ``viz`` or the CLI;
- ``extract`` imports nothing from ``cusa_train``, ``viz`` or the CLI;
- ``cusa_train`` imports ``extract`` only through its public packages ``cusa.readers`` and
  ``cusa.extract.teachers`` (plus the import-free ``cusa.teacher_defaults``);
- the shared leaves (``errors``, ``paths``, ``registry``, ``sizes``) import none of the packages;
- no ``cusa``/``cusa_train`` module is imported inside a function, except where a lazy import is
  the point (the CLI's per-command imports for a fast ``cusa --help``, in ``cli.py`` and the
  ``commands/`` it registers, and the teacher registry, which loads a teacher's module only when
  that teacher is used).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {
    "store": "cusa.store",
    "extract": "cusa.extract",
    "viz": "cusa.viz",
    "commands": "cusa.commands",
}
LEAVES = {
    "errors.py": "cusa.errors",
    "paths.py": "cusa.paths",
    "registry.py": "cusa.registry",
    "sizes.py": "cusa.sizes",
}
CLI = ("cusa.cli", "cusa.commands")  # cli.py and the commands/ it registers: one layer
LAZY_ALLOWED = {*CLI, "cusa.extract.teachers.builtin"}  # these modules and those under them
PUBLIC_EXTRACT = ("cusa.readers", "cusa.extract.teachers", "cusa.teacher_defaults")


def _modules() -> dict[str, Path]:
    out = {"cusa.cli": REPO / "cli.py"}
    out.update({name: REPO / f for f, name in LEAVES.items()})
    for folder, prefix in (*PACKAGES.items(), ("cusa_train", "cusa_train")):
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([prefix, *parts])] = path
    return out


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(module, inside_a_function)`` for every import of a cusa/cusa_train module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, in_function))
            visit(child, nested)

    visit(tree, False)
    return [(m, f) for m, f in found if m.split(".")[0] in ("cusa", "cusa_train")]


MODULES = _modules()


def _under(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _layer(module: str) -> str:
    if module.startswith("cusa_train"):
        return "cusa_train"
    if _under(module, CLI):
        return "cusa.cli"
    for prefix in ("cusa.store", "cusa.extract", "cusa.viz"):
        if _under(module, (prefix,)):
            return prefix
    return "leaf" if module in LEAVES.values() or module == "cusa" else "other"


FORBIDDEN = {
    "cusa.store": ("cusa.extract", "cusa_train", "cusa.viz", "cusa.cli"),
    "cusa.extract": ("cusa_train", "cusa.viz", "cusa.cli"),
    "cusa_train": ("cusa.viz", "cusa.cli"),
    "cusa.viz": ("cusa.cli",),
    "leaf": ("cusa.store", "cusa.extract", "cusa_train", "cusa.viz", "cusa.cli"),
}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module):
    layer = _layer(module)
    bad = [
        target
        for target, _ in _imports(MODULES[module])
        if any(_layer(target) == f for f in FORBIDDEN.get(layer, ()))
    ]
    assert not bad, f"{module} ({layer}) imports against the layering: {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("cusa_train")))
def test_cusa_train_uses_only_the_public_extract_apis(module):
    private = [
        target
        for target, _ in _imports(MODULES[module])
        if target.startswith("cusa.extract") and target not in PUBLIC_EXTRACT
    ]
    assert not private, f"{module} reaches into extract internals: {private}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not _under(m, LAZY_ALLOWED)))
def test_no_cusa_import_hides_inside_a_function(module):
    hidden = [target for target, inside in _imports(MODULES[module]) if inside]
    assert not hidden, f"{module} imports {hidden} inside a function; import at module level"
