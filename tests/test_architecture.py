"""The layering of docs/architecture.md, checked on the installed packages: imports point one way.

The modules are found the way ``pkgutil.walk_packages`` finds them, from the import system's own
``cusa`` and ``cusa_train`` packages (so a new root module or subpackage is checked the moment it
exists), but without importing them: each module's imports are parsed (``ast``), relative ones
resolved against its package, and ``from package import name`` resolved to the submodule when
``name`` is one. The rules:

- every module belongs to a layer of :data:`LAYERS`, and imports only its own layer and those
  below it (shared leaves -> store -> extract, cache -> cusa_train -> viz -> CLI; benchmarks on top,
  imported by nothing);
- ``cusa_train`` imports nothing of ``cusa.extract`` (what training shares with the teachers lives
  in the shared leaves);
- no import cycle between modules, counting every import: function-level and ``TYPE_CHECKING``
  ones too;
- no private name (``_x``) is imported from another module, and no private module from outside
  its package;
- no ``cusa``/``cusa_train`` module is imported inside a function, except the lazy imports listed
  in :data:`LAZY_IMPORTS` (each one says why).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass
from pathlib import Path

import pytest

#: Layers, bottom first: a module may import its own layer and those before it. A module is in
#: the layer of its longest listed prefix (``cusa`` itself only by exact name).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "shared leaves",
        (
            "cusa",
            "cusa.errors",
            "cusa.paths",
            "cusa.safe_files",
            "cusa.sizes",
            "cusa.registry",
            "cusa.weights",
            "cusa.captions",
            "cusa.image_transforms",
            "cusa.mobilenet",
            "cusa.teacher_defaults",
            "cusa.readers",
        ),
    ),
    ("store", ("cusa.store",)),
    ("extract and cache", ("cusa.extract", "cusa.cache")),
    ("training", ("cusa_train",)),
    ("report", ("cusa.viz",)),
    ("command line", ("cusa.cli", "cusa.commands")),
    ("benchmarks", ("benchmarks",)),
)

#: Imports of cusa modules inside a function that are there on purpose: (importer prefix, target
#: prefix) -> why.
LAZY_IMPORTS: dict[tuple[str, str], str] = {
    ("cusa.cli", "cusa"): "cusa --help imports no command's library (fast start-up)",
    ("cusa.commands", "cusa"): "a command imports its library only when it runs",
    ("cusa.commands", "cusa_train"): "a command imports its library only when it runs",
    ("cusa.extract.teachers.builtin", "cusa"): "a teacher's module loads when that teacher is used",
    ("cusa.extract.runner", "cusa.extract.ray_runner"): "Ray is imported only when asked for",
    ("benchmarks", "cusa"): "benchmark scripts import what one measurement needs, per child",
    ("benchmarks", "cusa_train"): "benchmark scripts import what one measurement needs, per child",
    ("benchmarks", "benchmarks"): "benchmark scripts import what one measurement needs, per child",
}

#: Packages walked; ``benchmarks`` is not installed (run from the repository root) but is walked
#: from the repository so that nothing imports it and it follows the other rules.
INSTALLED = ("cusa", "cusa_train")


@dataclass(frozen=True)
class Import:
    target: str  # the module imported (a walked module, or a foreign one such as ``torch``)
    names: tuple[str, ...]  # the names taken from it (``from target import a, b``)
    in_function: bool
    line: int


def _walk(package: str, path: Path) -> dict[str, Path]:
    """``module name -> file`` for ``package`` (its folder ``path``) and everything under it."""
    found = {package: path / "__init__.py"}
    for info in pkgutil.iter_modules([str(path)], package + "."):
        leaf = info.name.rsplit(".", 1)[1]
        if info.ispkg:
            if package == "cusa" and leaf in ("cusa_train", "benchmarks"):
                continue  # their own top-level names; both refuse cusa.<name> (see the guard test)
            found.update(_walk(info.name, path / leaf))
        else:
            found[info.name] = path / f"{leaf}.py"
    return found


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for package in INSTALLED:
        spec = importlib.util.find_spec(package)  # a top-level name: found, not imported
        assert spec is not None and spec.origin, f"{package} is not installed"
        out.update(_walk(package, Path(spec.origin).parent))
    out.update(_walk("benchmarks", Path(out["cusa"]).parent / "benchmarks"))
    return out


MODULES = _modules()


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str, source: str | None = None) -> list[Import]:
    """Every import of ``module``, relative ones resolved, nested ones (functions, ``if``) too."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8") if source is None else source)
    found: list[Import] = []

    def add(target: str, names: tuple[str, ...], in_function: bool, line: int) -> None:
        subs = [n for n in names if f"{target}.{n}" in MODULES]
        for n in subs:  # ``from pkg import submodule``: an import of that submodule
            found.append(Import(f"{target}.{n}", (), in_function, line))
        rest = tuple(n for n in names if n not in subs)
        if rest or not names:
            found.append(Import(target, rest, in_function, line))

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, (), in_function, child.lineno)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = _package_of(module).split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    target = child.module or ""
                add(target, tuple(a.name for a in child.names), in_function, child.lineno)
            visit(child, nested)

    visit(tree, False)
    return found


IMPORTS = {m: _imports(m) for m in MODULES}


def _known(target: str) -> str | None:
    """The walked module ``target`` names (or lies in), else ``None`` (a foreign library)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _layer(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, layer index)
    for index, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p if p == "cusa" else _under(module, p)) and (
                best is None or len(p) > best[0]
            ):
                best = (len(p), index)
    return None if best is None else best[1]


def _edges(module: str) -> list[tuple[str, Import]]:
    return [(t, imp) for imp in IMPORTS[module] if (t := _known(imp.target)) is not None]


def test_the_parser_sees_every_kind_of_import():
    """What the rules below rely on, on a made-up ``cusa.extract.teachers.base``."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from ...store import spec\n"
        "from . import text\n"
        "if TYPE_CHECKING:\n"
        "    from .text import CaptionNormalization\n"
        "def f():\n"
        "    from ..runner import extract\n"
    )
    got = {
        (i.target, i.names, i.in_function) for i in _imports("cusa.extract.teachers.base", source)
    }
    assert ("cusa.store.spec", (), False) in got  # from a package: the submodule
    assert ("cusa.extract.teachers.text", (), False) in got
    assert ("cusa.extract.teachers.text", ("CaptionNormalization",), False) in got  # TYPE_CHECKING
    assert ("cusa.extract.runner", ("extract",), True) in got  # inside a function


def test_the_walk_finds_every_package_and_root_module():
    assert {"cusa.cache", "cusa.cli", "cusa.store.layout", "cusa.extract.job"} <= set(MODULES)
    assert {"cusa_train.trainer", "cusa_train.config.train", "benchmarks"} <= set(MODULES)
    assert not [m for m in MODULES if {"cusa_train", "benchmarks"} & set(m.split(".")[1:])]


def test_every_walked_package_is_installed_by_pyproject():
    """A subpackage missing from pyproject's list would be missing from wheels and sdists."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(MODULES["cusa"]).parent
    listed = set(
        tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    packages = {
        m
        for m, path in MODULES.items()
        if path.name == "__init__.py" and _layer(m) != len(LAYERS) - 1
    }
    assert packages <= listed, f"packages not listed in pyproject.toml: {sorted(packages - listed)}"


@pytest.mark.parametrize("name", ["cusa.cusa_train", "cusa.benchmarks"])
def test_one_import_name_per_module(name):
    """cusa_train and benchmarks sit inside the cusa folder but are importable only by their own names."""
    with pytest.raises(ImportError, match="import "):
        importlib.import_module(name)


def test_every_module_has_a_layer():
    lost = [m for m in MODULES if _layer(m) is None]
    assert not lost, f"modules in no layer (add them to LAYERS and docs/architecture.md): {lost}"


def test_imports_point_one_way():
    bad = [
        f"{m} ({LAYERS[_layer(m)][0]}) line {imp.line} imports {t} ({LAYERS[_layer(t)][0]})"
        for m in MODULES
        for t, imp in _edges(m)
        if _layer(m) is not None and _layer(t) is not None and _layer(t) > _layer(m)
    ]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_benchmarks_are_imported_by_nothing_installed():
    bad = [
        f"{m} imports {t}"
        for m in MODULES
        if not _under(m, "benchmarks")
        for t, _ in _edges(m)
        if _under(t, "benchmarks")
    ]
    assert not bad


def test_cusa_train_imports_nothing_of_extract():
    bad = [
        f"{m} line {imp.line} imports {t}"
        for m in MODULES
        if _under(m, "cusa_train")
        for t, imp in _edges(m)
        if _under(t, "cusa.extract")
    ]
    assert not bad, "cusa_train reaches into extraction:\n" + "\n".join(bad)


def test_no_import_cycles():
    """Depth-first search over every import edge (function-level and TYPE_CHECKING included)."""
    graph = {m: sorted({t for t, _ in _edges(m) if t != m}) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                cycles.append([*path[path.index(t) :], t])
            elif t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_name_crosses_a_module():
    bad = []
    for m in MODULES:
        for t, imp in _edges(m):
            names = [n for n in imp.names if _private(n)]
            if names:
                bad.append(f"{m} line {imp.line} imports {names} from {t}")
            leaf = t.rpartition(".")[2]
            if _private(leaf) and not _under(m, t.rpartition(".")[0]):
                bad.append(f"{m} line {imp.line} imports the private module {t}")
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_no_module_is_imported_by_a_second_name():
    """``benchmarks`` tests put the repository root on the path, where ``store`` or ``errors``
    would import a second copy of ``cusa.store``/``cusa.errors``: always import them as cusa.*."""
    roots = {m.split(".")[1] for m in MODULES if m.startswith("cusa.")}
    bad = [
        f"{m} line {imp.line} imports {imp.target}; import cusa.{imp.target}"
        for m in MODULES
        for imp in IMPORTS[m]
        if _known(imp.target) is None and imp.target.split(".")[0] in roots
    ]
    assert not bad, "\n".join(bad)


def test_no_cusa_import_hides_inside_a_function():
    bad = [
        f"{m} line {imp.line} imports {t} inside a function"
        for m in MODULES
        for t, imp in _edges(m)
        if imp.in_function
        and not any(_under(m, src) and _under(t, dst) for src, dst in LAZY_IMPORTS)
    ]
    assert not bad, (
        "import at module level, or list the lazy import in LAZY_IMPORTS:\n" + "\n".join(bad)
    )
