"""What every reader of a group checks before serving it (``info``, ``FeatureLookup``, export,
knn): the same refusals as ``cusa store verify`` for what can be seen from the records alone.

A group is refused (:class:`~cusa.store.group.BrokenGroupError`, naming the file and the fix)
when a file readers use is not a regular file inside the group (a symlink, a FIFO, a folder),
when an array's own ``zarr.json`` disagrees with the spec and the seal or commit records (dtype,
shape, chunking, codecs), or when a commit or seal record is unreadable. Chunk bytes are not
hashed here (``verify`` and ``export`` do that).
"""

from __future__ import annotations

import os
import stat
from typing import Any

from .commits import records_stamp
from .group import FeatureGroup
from .layout import MANIFEST, SEALED

_FIX = "run `cusa store verify`, then restore the file or delete the group folder and re-extract it"


def array_meta_problems(
    meta: Any,
    *,
    shape: tuple[int, ...],
    chunks: tuple[int, ...] | None,
    data_type: str,
    raw_bytes: bool,
) -> list[str]:
    """How an array's ``zarr.json`` differs from what the spec and the records say it holds."""
    if not isinstance(meta, dict):
        return ["it is not a JSON object"]
    problems = []
    if meta.get("node_type") != "array":
        problems.append(f"node_type {meta.get('node_type')!r} != 'array'")
    if meta.get("data_type") != data_type:
        problems.append(f"data_type {meta.get('data_type')!r} != {data_type!r}")
    if meta.get("shape") != list(shape):
        problems.append(f"shape {meta.get('shape')!r} != {list(shape)!r}")
    grid = meta.get("chunk_grid")
    got_chunks = (
        grid.get("configuration", {}).get("chunk_shape") if isinstance(grid, dict) else None
    )
    if chunks is not None and got_chunks != list(chunks):
        problems.append(f"chunk_shape {got_chunks!r} != {list(chunks)!r}")
    keys = meta.get("chunk_key_encoding")
    if not (
        isinstance(keys, dict)
        and keys.get("name") == "default"
        and keys.get("configuration", {}).get("separator", "/") == "/"
    ):
        problems.append(f"chunk_key_encoding {keys!r} is not the default '/' encoding")
    if raw_bytes:
        codecs = meta.get("codecs")
        names = (
            [c.get("name") for c in codecs]
            if isinstance(codecs, list) and all(isinstance(c, dict) for c in codecs)
            else None
        )
        endian = codecs[0].get("configuration", {}).get("endian") if names == ["bytes"] else None
        if names != ["bytes"] or endian not in ("little", None):
            problems.append(
                f"codecs {names!r} are not raw little-endian bytes (no compressor), which "
                "readers memory-map"
            )
    return problems


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _check_regular(group: FeatureGroup, name: str) -> None:
    """``name`` (relative to the group) and every folder on its way are real, not symlinks,
    and it is a regular file. Object stores have no links, so only local stores are checked.

    Raises:
        FileNotFoundError: it is missing (the caller decides: a concurrent seal, or broken).
        BrokenGroupError: a link or a non-regular file.
    """
    if not group.fs.is_local:
        return
    cur = group.fs.local_path(group.rel)
    for part in name.split("/"):
        cur = os.path.join(cur, part)
        st = os.lstat(cur)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(cur)
            raise group._broken(
                f"{name} is reached through a symlink ({cur[-200:]!r} -> {target[:200]!r}), "
                "not a regular file inside the group; readers never follow it",
                _FIX,
            )
    if not stat.S_ISREG(st.st_mode):
        raise group._broken(f"{name} is {_kind(st.st_mode)}, not a regular file", _FIX)


def _array(group: FeatureGroup, folder: str, **expected: Any) -> None:
    meta = group._load_json(f"{folder}/zarr.json")
    problems = array_meta_problems(meta, **expected)
    if problems:
        raise group._broken(
            f"array metadata {folder}/zarr.json does not match the spec and records "
            f"({'; '.join(problems)}); readers would misread its bytes",
            _FIX,
        )


def _check_once(group: FeatureGroup) -> None:
    records_files = ["zarr.json"]
    if group.fs.exists(f"{group.rel}/{SEALED}") or (
        group.fs.is_local and os.path.lexists(group.fs.local_path(f"{group.rel}/{SEALED}"))
    ):
        records_files.append(SEALED)
    for name in records_files:  # before reading them: a FIFO record would block the reader
        _check_regular(group, name)
    sealed = group.sealed  # a malformed seal record raises BrokenGroupError
    records: list[dict[str, Any]] = []
    stamp = sealed.get("commits_stamp") if sealed else None
    # The commit records of a sealed group whose stamp matches are the ones its seal checked
    # (cusa.store.commits.records_stamp): one stat each. Otherwise each is checked and read.
    if stamp is None or records_stamp(group.fs, group.rel) != stamp:
        if group.fs.is_local:  # (object stores have no links: no listing twice there)
            for name in group.fs.ls(f"{group.rel}/commits"):
                if name.endswith(".json"):  # before reading it: a FIFO would block the reader
                    _check_regular(group, f"commits/{name}")
        records = group.commit_records()  # an unreadable commit record raises BrokenGroupError
    files: list[str] = []
    dim, dtype = group.dim, group.spec["dtype"]
    arrays: list[tuple[str, dict[str, Any]]] = []
    if sealed:
        files.append(MANIFEST)
        rows, chunk_rows = int(sealed["rows"]), sealed["chunk_rows"]
        if rows:
            files += ["features/zarr.json", "sample_id/zarr.json"]
            files += [f"features/c/{i}/0" for i in range(len(chunk_rows))]
            arrays += [
                ("features", dict(shape=(rows, dim), chunks=(chunk_rows[0], dim),
                                  data_type=dtype, raw_bytes=True)),
                ("sample_id", dict(shape=(rows,), chunks=None, data_type="string",
                                   raw_bytes=False)),
            ]  # fmt: skip
    else:
        for r in records:
            part = f"parts/{r['part']}"
            files.append(f"{part}/{MANIFEST}")
            if r["rows"]:
                n = r["rows"]
                files += [f"{part}/features/zarr.json", f"{part}/sample_id/zarr.json"]
                files.append(f"{part}/features/c/0/0")
                arrays += [
                    (f"{part}/features", dict(shape=(n, dim), chunks=(n, dim), data_type=dtype,
                                              raw_bytes=True)),
                    (f"{part}/sample_id", dict(shape=(n,), chunks=None, data_type="string",
                                               raw_bytes=False)),
                ]  # fmt: skip
    for name in files:
        _check_regular(group, name)
    for folder, expected in arrays:
        _array(group, folder, **expected)


def check_group(group: FeatureGroup) -> None:
    """Refuse a group that ``verify`` would refuse for its records, links or array metadata.

    Raises:
        BrokenGroupError: naming the file, what is wrong, and the fix.
    """
    for attempt in range(3):
        try:
            _check_once(group)
            return
        except FileNotFoundError as exc:
            # A writer sealing the group removes its parts while we look: check again from the
            # seal. A file missing from a group nobody seals is a broken group.
            if attempt < 2 and group.sealed:
                continue
            what = getattr(exc, "filename", None) or str(exc) or "a file"
            raise group._broken(f"{str(what)[-300:]} is missing", _FIX) from exc
