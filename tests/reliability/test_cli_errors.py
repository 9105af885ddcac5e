"""Every failure a user can cause from the CLI is one line on stderr with its own exit code.

The codes (``cusa.cli.EXIT_*``, documented in docs/reliability.md): 0 ok; 1 samples failed or
verify found problems; 2 refused (a CusaError); 3 file system; 4 malformed file; 5 device or
runtime; 6 remote storage; 7 out of memory; 70 internal error; 130 interrupted.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import uuid
from typing import Any

import pyarrow as pa
import pytest
from helpers import IMAGE_T, TEXT_T, extract_args
from typer.testing import CliRunner

from cusa import cli
from cusa.cli import app
from cusa.errors import DeviceError, MalformedFileError
from cusa.store.fs import StoreFS


def _cli(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, list(args), env=env)


def _error_line(result: Any) -> str:
    """The single ``error:`` line of a failed command; nothing else, and no traceback."""
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), repr(result.exception)
    return errors[0]


def _text_extract(store: str, **options: Any) -> list[str]:
    opts = dict(
        split="val",
        modalities="text",
        image_teacher=IMAGE_T,
        text_teacher=TEXT_T,
        runner="local",
        device="cpu",
    )
    return extract_args("coco-sample", store, **{**opts, **options})


# -- real triggers -------------------------------------------------------------------------------


def test_device_banana_is_refused(tmp_path, reliability_log):
    res = _cli(*_text_extract(str(tmp_path / "store"), device="banana"))
    line = _error_line(res)
    ok = res.exit_code == cli.EXIT_REFUSED and "--device 'banana' is invalid" in line
    reliability_log.bad_input(
        "cli: --device banana",
        "cli",
        caught=ok,
        outcome="exit 2: one line listing the valid devices",
        message=line,
    )
    assert ok, res.output
    assert not (tmp_path / "store").exists()


def test_a_cuda_device_that_is_not_there_is_refused(tmp_path, reliability_log):
    import torch

    device = f"cuda:{torch.cuda.device_count()}"  # cuda:0 on a machine without a GPU
    res = _cli(*_text_extract(str(tmp_path / "store"), device=device))
    line = _error_line(res)
    ok = res.exit_code == cli.EXIT_REFUSED and f"--device {device!r} is not available" in line
    reliability_log.bad_input(
        "cli: --device cuda:N that does not exist",
        "cli",
        caught=ok,
        outcome="exit 2 before any model is loaded: says what is visible and to use cpu",
        message=line,
    )
    assert ok, res.output


def test_s3_store_without_credentials(tmp_path, reliability_log):
    pytest.importorskip("s3fs", reason="s3fs is needed for s3:// stores (pip install 'cusa[s3]')")
    env = {
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_SESSION_TOKEN": "",
        "AWS_PROFILE": "",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
    }
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    url = f"s3://cusa-no-creds-{uuid.uuid4().hex[:8]}/store"
    res = _cli("store", "info", url, env=env)
    line = _error_line(res)
    ok = res.exit_code == cli.EXIT_REMOTE and "credentials" in line
    reliability_log.bad_input(
        "cli: --store s3:// without credentials",
        "cli",
        caught=ok,
        outcome="exit 6: one line saying which credentials and endpoint to check",
        message=line,
    )
    assert ok, res.output


def test_export_to_a_file(sample_reference, tmp_path, reliability_log):
    target = tmp_path / "not-a-dir"
    target.write_text("x")
    res = _cli(
        "store", "export", str(sample_reference[0]), "--teacher", IMAGE_T, "--to", str(target)
    )
    line = _error_line(res)
    ok = res.exit_code == cli.EXIT_REFUSED and "is a file, not a directory" in line
    reliability_log.bad_input(
        "cli: store export --to an existing file",
        "cli",
        caught=ok,
        outcome="exit 2: one line naming the file",
        message=line,
    )
    assert ok, res.output
    assert target.read_text() == "x"


def _mount_tmpfs(where) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    cmd = ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)]
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


def test_read_only_store(sample_reference, tmp_path, monkeypatch, reliability_log):
    """A store on a read-only mount (real when we may mount; else EROFS injected): reading
    works, and extracting a new split is refused in one line."""
    mnt = tmp_path / f"ro-{uuid.uuid4().hex[:6]}"
    real = _mount_tmpfs(mnt)
    try:
        store = mnt / "store"
        shutil.copytree(sample_reference[0], store)
        if real:
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        else:

            def read_only(self, rel, data):
                raise OSError(errno.EROFS, "Read-only file system", self.path(rel))

            monkeypatch.setattr(StoreFS, "create_exclusive", read_only)
            monkeypatch.setattr(StoreFS, "write_bytes_atomic", read_only)
        info = _cli("store", "verify", str(store))
        res = _cli(*_text_extract(str(store), split="train"))
        line = _error_line(res)
        ok = (
            info.exit_code == 0
            and res.exit_code == cli.EXIT_REFUSED
            and "Read-only file system" in line
            and "check that the store is writable" in line
        )
        reliability_log.bad_input(
            "cli: read-only store, new split",
            "cli",
            caught=ok,
            outcome="reads work; extract refused in one line (exit 2) saying the store is not writable",
            message=line,
        )
        assert ok, (info.output, res.output)
    finally:
        if real:
            subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


# -- the exit-code contract ----------------------------------------------------------------------


def _no_credentials() -> Exception:
    botocore = pytest.importorskip("botocore.exceptions")
    return botocore.NoCredentialsError()


# Exit codes go by meaning (commands/exit_codes.py): 2-7 only for cusa's own classes and the
# foreign errors of certain meaning the CLI turns into them; any other foreign error is a bug (70).
ERRORS = {
    "MalformedFileError": (lambda: MalformedFileError("bad manifest"), cli.EXIT_MALFORMED),
    "DeviceError": (lambda: DeviceError("CUDA error: an illegal memory access"), cli.EXIT_DEVICE),
    "JSONDecodeError (foreign)": (
        lambda: json.JSONDecodeError("Expecting value", "{", 1),
        cli.EXIT_INTERNAL,
    ),
    "ArrowInvalid (foreign)": (
        lambda: pa.lib.ArrowInvalid("Parquet magic bytes not found"),
        cli.EXIT_INTERNAL,
    ),
    "UnicodeDecodeError (foreign)": (
        lambda: UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        cli.EXIT_INTERNAL,
    ),
    "RecursionError (foreign)": (
        lambda: RecursionError("maximum recursion depth"),
        cli.EXIT_INTERNAL,
    ),
    "FileNotFoundError": (
        lambda: FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/zarr.json"),
        cli.EXIT_FILE,
    ),
    "NotADirectoryError": (
        lambda: NotADirectoryError(errno.ENOTDIR, "Not a directory", "/x/file"),
        cli.EXIT_FILE,
    ),
    "PermissionError": (
        lambda: PermissionError(errno.EACCES, "Permission denied", "/x"),
        cli.EXIT_FILE,
    ),
    "RuntimeError (a torch shape bug)": (
        lambda: RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"),
        cli.EXIT_INTERNAL,
    ),
    "NoCredentialsError": (_no_credentials, cli.EXIT_REMOTE),
    "ConnectionError": (lambda: ConnectionRefusedError("connection refused"), cli.EXIT_REMOTE),
    "MemoryError": (lambda: MemoryError(), cli.EXIT_MEMORY),
    "KeyError (a bug)": (lambda: KeyError("x"), cli.EXIT_INTERNAL),
    "KeyboardInterrupt": (lambda: KeyboardInterrupt(), cli.EXIT_INTERRUPTED),
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_every_error_is_one_line_with_its_exit_code(name, sample_reference, monkeypatch, tmp_path):
    make, code = ERRORS[name]
    exc = make()
    monkeypatch.setenv("CUSA_LOG_DIR", str(tmp_path))  # where exit 70 writes the traceback

    def boom(store):
        raise exc

    monkeypatch.setattr("cusa.store.info.store_info", boom)
    res = _cli("store", "info", str(sample_reference[0]))
    line = _error_line(res)
    assert res.exit_code == code, (name, res.exit_code, res.output)
    assert len(line) < 800


def test_exit_codes_are_distinct_and_documented():
    from pathlib import Path

    codes = {k: v for k, v in vars(cli).items() if k.startswith("EXIT_")}
    assert len(set(codes.values())) == len(codes)
    doc = (Path(__file__).resolve().parents[2] / "docs" / "reliability.md").read_text()
    for name, value in codes.items():
        assert f"| {value} | `{name}` |" in doc, name


def test_a_store_error_keeps_exit_code_2(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    res = _cli("store", "info", str(tmp_path))
    assert res.exit_code == 2 and "is not a cusa store" in _error_line(res)  # NotAStoreError
