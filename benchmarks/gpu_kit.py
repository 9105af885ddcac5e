"""The wheel kit of the GPU check (issue 26): what ``benchmarks.gpu_check`` needs on a bare GPU
machine that its image lacks, as cp312 manylinux wheels in the ignored ``.whl/`` folder, and the
one shell command that runs the check there.

    python -m benchmarks.gpu_kit                 # here, where the registry is reachable
    python -m benchmarks.gpu_kit --plan          # what it would fetch, nothing downloaded

The GPU machine (Python 3.12, its own CUDA torch) reaches no registry and gets the repository plus
at most 64 MiB. What to ship is computed, not guessed:

1. **Imports.** The check runs here with ``--cpu-smoke --no-ray`` under an import tracer that
   records every top-level module that code of ``benchmarks``, ``cusa`` or ``cusa_train`` imports
   (``import`` statements and ``importlib.import_module``), plus every import written in the
   check's own files (``gpu_check*.py``), which holds the CUDA-only and Ray-only branches that do
   not run on a CPU.
2. **Distributions.** Modules map to the distributions of this environment that provide them;
   each one's ``Requires-Dist`` (markers read for CPython 3.12 on Linux x86-64, extras followed)
   adds what it needs, down to what the image has.
3. **The image.** :data:`IMAGE_PACKAGES` is the image's package list as read on the date it
   records. A distribution there is not shipped (nor followed further); :data:`NOT_SHIPPED` names
   those that cannot travel, with the reason that their parts give when they skip.

The rest is downloaded with ``pip download --no-deps --only-binary=:all: --python-version 3.12
--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform
manylinux2014_x86_64`` at the version installed here (the newest cp312 wheel when that version
has none), wheels of other versions are removed from ``.whl/``, ``.whl/kit.json`` records the
plan, and the kit plus the tree that travels (tracked and untracked-not-ignored files) is checked
against the 64 MiB. Exit code 0 and the GPU command on stdout's last line; 1 when over the limit or
a wheel cannot be had.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import importlib
import importlib.metadata as md
import json
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks.common import REPO

KIT = REPO / ".whl"
IMAGE_PACKAGES = Path(__file__).with_name("gpu_image_packages.txt")
TRAVEL_LIMIT = 64 * 2**20  # what one run may bring: the tree that travels plus the kit
OWN = ("benchmarks", "cusa", "cusa_train")
CHECK_FILES = ("gpu_check.py", "gpu_check_context.py", "gpu_check_parts.py")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
#: Where the printed command installs the kit on the GPU machine.
TARGET = "/tmp/cusa-kit"
#: The check stops itself after 285 s (``--budget-s``); this leaves a rerun inside a 15-minute lease.
TIMEOUT_S = 330
#: Markers of the GPU machine's interpreter, for the ``Requires-Dist`` of what is shipped.
GPU_MARKERS = {
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "platform_machine": "x86_64",
    "platform_system": "Linux",
    "sys_platform": "linux",
    "os_name": "posix",
    "python_version": "3.12",
    "python_full_version": "3.12.3",
}
#: Imported by the check but never shipped; the parts that need them skip and say why.
NOT_SHIPPED = {
    "ray": "Ray's cp312 wheel is 72 MB, over the 64 MiB a run can bring: the Ray parts "
    "(pipeline_ray, ray_num_gpus) run only on a full GPU node with the registry",
    "faiss-cpu": "faiss_knn measures faiss-gpu, which is not in the GPU image and whose wheels are "
    "over the 64 MiB a run can bring: it runs only on a full GPU node with the registry",
    "faiss-gpu-cu12": "faiss-gpu's wheels are over the 64 MiB a run can bring",
}


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them (``Typing_Extensions`` -> ``typing-extensions``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


# -- the image -----------------------------------------------------------------------------------


def read_image_packages(
    path: Path = IMAGE_PACKAGES,
) -> tuple[dict[str, str | None], dict[str, str]]:
    """The GPU image's distributions (canonical name -> version, None where none was read) and the
    file's ``# key: value`` header lines (``read``, ``python``)."""
    packages: dict[str, str | None] = {}
    header: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("#"):
            key, sep, value = line[1:].partition(":")
            if sep and re.fullmatch(r"\s*[a-z_]+", key):
                header[key.strip()] = value.strip()
            continue
        if line:
            name, _, version = line.partition("==")
            packages[canonical(name)] = version.strip() or None
    return packages, header


# -- the check's imports --------------------------------------------------------------------------


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _foreign(top: str) -> bool:
    return bool(top) and top not in OWN and top not in sys.stdlib_module_names and top != "__main__"


def static_imports(files: Iterable[Path]) -> dict[str, list[str]]:
    """Top-level third-party modules written in ``files`` (any depth, any branch) -> the files."""
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for top in {_top(n) for n in names} if names else ():
                if _foreign(top):
                    found.setdefault(top, set()).add(path.name)
    return {k: sorted(v) for k, v in sorted(found.items())}


def _trace_check(out: Path) -> int:
    """Run the check (``--cpu-smoke --no-ray``) here, recording what our code imports."""
    seen: dict[str, set[str]] = {}

    def note(name: str, importer: str) -> None:
        top = _top(name)
        if _top(importer) in OWN and _foreign(top):
            seen.setdefault(top, set()).add(importer)

    real_import, real_import_module = builtins.__import__, importlib.import_module

    def traced_import(name, globals=None, locals=None, fromlist=(), level=0):  # noqa: A002
        if level == 0 and globals:
            note(name, str(globals.get("__name__", "")))
        return real_import(name, globals, locals, fromlist, level)

    def traced_import_module(name, package=None):
        if not name.startswith("."):
            note(name, str(sys._getframe(1).f_globals.get("__name__", "")))
        return real_import_module(name, package)

    builtins.__import__, importlib.import_module = traced_import, traced_import_module
    try:
        from benchmarks import gpu_check

        with tempfile.TemporaryDirectory(prefix="cusa-gpu-kit-") as tmp:
            argv = ["--cpu-smoke", "--no-ray", "--out", f"{tmp}/check.json", "--workdir", tmp]
            return gpu_check.main(argv)
    finally:
        builtins.__import__, importlib.import_module = real_import, real_import_module
        out.write_text(json.dumps({k: sorted(v) for k, v in sorted(seen.items())}, indent=1))


def check_imports(log: Path | None = None) -> dict[str, list[str]]:
    """Third-party top-level modules the GPU check imports -> who imports them (traced run of the
    check here, in a child process, plus the check files' written imports)."""
    with tempfile.TemporaryDirectory(prefix="cusa-gpu-kit-trace-") as tmp:
        out = Path(tmp) / "imports.json"
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.gpu_kit", "--trace-into", str(out)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        if log is not None:
            log.write_text(proc.stdout + proc.stderr, encoding="utf-8")
        if proc.returncode != 0:
            print(
                f"warning: the traced check run exited {proc.returncode} (see {log}); "
                "its imports so far are used",
                file=sys.stderr,
            )
        if not out.exists():
            raise RuntimeError(
                f"the traced check run failed (exit {proc.returncode}): {proc.stderr[-1500:]}"
            )
        traced: dict[str, list[str]] = json.loads(out.read_text())
    written = static_imports(Path(__file__).with_name(f) for f in CHECK_FILES)
    merged = {k: set(v) for k, v in traced.items()}
    for top, files in written.items():
        merged.setdefault(top, set()).update(f"benchmarks/{f}" for f in files)
    return {k: sorted(v) for k, v in sorted(merged.items())}


# -- distributions --------------------------------------------------------------------------------


def _installed() -> dict[str, md.Distribution]:
    dists: dict[str, md.Distribution] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            dists.setdefault(canonical(name), dist)
    return dists


def _requirements(dist: md.Distribution | None, extras: set[str]) -> list[tuple[str, set[str]]]:
    """``dist``'s requirements on the GPU machine, with ``extras`` asked for: (name, its extras)."""
    from packaging.requirements import Requirement

    out = []
    for text in (dist.requires or []) if dist is not None else []:
        req = Requirement(text)
        if req.marker is not None and not any(
            req.marker.evaluate({**GPU_MARKERS, "extra": e}) for e in ({""} | extras)
        ):
            continue
        out.append((canonical(req.name), set(req.extras)))
    return out


def plan_kit(
    imports: dict[str, list[str]], image: dict[str, str | None]
) -> dict[str, list[dict[str, Any]]]:
    """What to ship, what the image has, what is left out (with the reason), and unknown modules.

    Args:
        imports: top-level module -> importers (:func:`check_imports`).
        image: the image's distributions (:func:`read_image_packages`).
    """
    installed = _installed()
    by_module = md.packages_distributions()
    plan: dict[str, list[dict[str, Any]]] = {
        "ship": [],
        "image": [],
        "not_shipped": [],
        "unknown": [],
    }
    queue: list[tuple[str, set[str], str]] = []
    for module, importers in imports.items():
        dists = by_module.get(module)
        if not dists and canonical(module) in image:
            dists = [module]  # not installed here (e.g. torchvision beside a CPU torch)
        if not dists:
            plan["unknown"].append({"module": module, "imported_by": importers})
            continue
        for d in dict.fromkeys(canonical(x) for x in dists):
            queue.append((d, set(), f"import {module} ({', '.join(importers[:3])})"))
    seen: dict[str, dict[str, Any]] = {}
    while queue:
        name, extras, why = queue.pop(0)
        if name in seen:
            new = extras - seen[name]["extras"]
            if not new or seen[name]["where"] != "ship":
                continue
            seen[name]["extras"] |= new
        else:
            where = "image" if name in image else "not_shipped" if name in NOT_SHIPPED else "ship"
            dist = installed.get(name)
            seen[name] = {
                "name": name,
                "version": dist.version if dist is not None else None,
                "why": why,
                "where": where,
                "extras": set(extras),
            }
            if where != "ship":
                continue
        for dep, dep_extras in _requirements(installed.get(name), seen[name]["extras"]):
            queue.append((dep, dep_extras, f"required by {name}"))
    for entry in seen.values():
        where = entry.pop("where")
        entry["extras"] = sorted(entry["extras"])
        if where == "image":
            entry["image_version"] = image[entry["name"]]
        if where == "not_shipped":
            entry["reason"] = NOT_SHIPPED[entry["name"]]
        plan[where].append(entry)
    for rows in plan.values():
        rows.sort(key=lambda r: r.get("name") or r.get("module"))
    return plan


# -- wheels, size, command -----------------------------------------------------------------------


def _pip_download(spec: str, dest: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp",
           *(x for p in PLATFORMS for x in ("--platform", p)), "-d", str(dest), spec]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _wheel_name(filename: str) -> tuple[str, str]:
    name, version = filename.split("-")[:2]
    return canonical(name), version


def download(plan: dict[str, list[dict[str, Any]]], kit: Path = KIT) -> list[str]:
    """Fetch each wheel of ``plan["ship"]`` into ``kit`` (one version each) and note its file.

    Returns:
        The problems: a distribution with no cp312 wheel at all.
    """
    kit.mkdir(parents=True, exist_ok=True)
    problems = []
    for entry in plan["ship"]:
        pinned = f"{entry['name']}=={entry['version']}" if entry["version"] else entry["name"]
        with tempfile.TemporaryDirectory(dir=kit, prefix=".dl-") as tmp:
            proc = _pip_download(pinned, Path(tmp))
            if proc.returncode != 0 and entry["version"]:
                entry["note"] = f"no cp312 wheel of {pinned}; took the newest cp312 wheel"
                proc = _pip_download(entry["name"], Path(tmp))
            got = sorted(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or len(got) != 1:
                problems.append(
                    f"{pinned}: no cp312 manylinux wheel ({proc.stderr.strip()[-300:]})"
                )
                continue
            entry["wheel"] = got[0].name
            entry["bytes"] = got[0].stat().st_size
            entry["version"] = _wheel_name(got[0].name)[1]
            got[0].replace(kit / got[0].name)
    wanted = {e["wheel"] for e in plan["ship"] if "wheel" in e}
    for stale in kit.glob("*.whl"):
        if stale.name not in wanted:
            stale.unlink()  # another version, or no longer needed: two versions stop the install
    return problems


def travelling_bytes(repo: Path = REPO) -> int:
    """Bytes of what a run brings besides the kit: tracked and untracked-not-ignored files."""
    listed = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    total = 0
    for rel in dict.fromkeys(p for p in listed if p):
        path = repo / rel.decode()
        if path.is_symlink() or path.is_file():
            total += path.lstat().st_size
    return total


def gpu_command(
    results: str = '"${OUT:-benchmarks/results}"',
    target: str = TARGET,
    timeout_s: int = TIMEOUT_S,
    kit: str = ".whl",
) -> str:
    """The one shell line to run in the repository root on the GPU machine.

    Installs the kit with pip (no index, no dependencies) into ``target``, links the checkout
    there as ``cusa`` (the repository root is the ``cusa`` package), puts both on ``PYTHONPATH``
    and runs the check unbuffered under ``timeout``, writing ``gpu_check.json`` and
    ``gpu_check.md`` into ``results`` (a shell word: quoted or expanded as given).
    """
    t = shlex.quote(target)
    return (
        f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
        f'--target {t} {kit}/*.whl && ln -sfn "$PWD" {t}/cusa && mkdir -p {results} && '
        f'PYTHONPATH={t}:"$PWD" timeout -k 10 {timeout_s} python3 -u -m benchmarks.gpu_check '
        f"--out {results}/gpu_check.json --summary {results}/gpu_check.md"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--plan", action="store_true", help="compute and print the plan; no download")
    ap.add_argument("--kit", type=Path, default=KIT, help="the wheel folder [default: .whl]")
    ap.add_argument("--image", type=Path, default=IMAGE_PACKAGES, help="the image's package list")
    ap.add_argument(
        "--results",
        default='"${OUT:-benchmarks/results}"',
        help="where the GPU command writes gpu_check.json/.md, a shell word "
        "[default: $OUT, else benchmarks/results]",
    )
    ap.add_argument("--target", default=TARGET, help="install folder on the GPU machine")
    ap.add_argument("--timeout-s", type=int, default=TIMEOUT_S, help="the check's time limit there")
    ap.add_argument("--trace-into", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.trace_into:
        return _trace_check(args.trace_into)

    image, header = read_image_packages(args.image)
    print(
        f"GPU image: {len(image)} packages read on {header.get('read', '?')} "
        f"(Python {header.get('python', '?')}); tracing the check's imports (--cpu-smoke run)...",
        file=sys.stderr,
    )
    args.kit.mkdir(parents=True, exist_ok=True)
    imports = check_imports(log=args.kit / "trace.log")
    plan = plan_kit(imports, image)
    problems = [] if args.plan else download(plan, args.kit)
    kit_bytes = sum(p.stat().st_size for p in args.kit.rglob("*") if p.is_file())
    tree_bytes = travelling_bytes()
    command = gpu_command(args.results, args.target, args.timeout_s, kit=".whl")
    record = {
        "image": {"file": str(args.image.relative_to(REPO)), **header, "packages": len(image)},
        "imports": imports,
        **plan,
        "kit_bytes": kit_bytes,
        "tree_bytes": tree_bytes,
        "limit_bytes": TRAVEL_LIMIT,
        "problems": problems,
        "command": command,
    }
    if not args.plan:
        (args.kit / "kit.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    for e in plan["ship"]:
        size = f"{e['bytes'] / 1e6:6.2f} MB" if "bytes" in e else "   (plan)"
        print(f"ship   {e['name']}=={e['version']}  {size}  {e['why']}", file=sys.stderr)
    for e in plan["not_shipped"]:
        print(f"skip   {e['name']}: {e['reason']}", file=sys.stderr)
    for e in plan["unknown"]:
        print(f"?      module {e['module']} has no distribution here", file=sys.stderr)
    total = kit_bytes + tree_bytes
    print(
        f"kit {kit_bytes / 2**20:.2f} MiB + tree {tree_bytes / 2**20:.2f} MiB = "
        f"{total / 2**20:.2f} MiB of {TRAVEL_LIMIT / 2**20:.0f} MiB",
        file=sys.stderr,
    )
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if total >= TRAVEL_LIMIT:
        print("error: the kit and the tree are over what a run can bring", file=sys.stderr)
        return 1
    if problems:
        return 1
    print(command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
