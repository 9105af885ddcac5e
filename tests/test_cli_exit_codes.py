"""Exit codes by meaning (commands/exit_codes.py, docs/cli.md#exit-codes).

2-7 come only from cusa's own error classes, into which the CLI boundary turns the few foreign
errors whose meaning is certain; any other exception exits 70 and its traceback goes to a log
file that the one-line message names. A command whose optional dependency is missing exits 2
naming the extra to install.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from typer.testing import CliRunner

from cusa import cli
from cusa.cli import app
from cusa.commands.exit_codes import OPTIONAL_MODULES
from cusa.errors import (
    ConfigError,
    DeviceError,
    FileSystemError,
    MalformedFileError,
    OutOfMemoryError,
    RemoteStorageError,
    StoreError,
)

REPO = Path(__file__).resolve().parents[1]


def _error_line(output: str) -> str:
    errors = [ln for ln in output.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in output, output
    return errors[0]


@pytest.fixture
def store(tmp_path) -> str:
    """An empty, real store: ``cusa store info --store`` reaches ``store_info``."""
    from cusa.store import FeatureStore

    path = tmp_path / "store"
    FeatureStore.open(path, create=True)
    return str(path)


def _raise_from_store_info(monkeypatch, exc: BaseException) -> None:
    def boom(store):
        raise exc

    monkeypatch.setattr("cusa.store.info.store_info", boom)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ConfigError("bad value"), cli.EXIT_REFUSED),
        (StoreError("not a store"), cli.EXIT_REFUSED),  # an OSError, but cusa's refusal: 2
        (FileSystemError("gone"), cli.EXIT_FILE),
        (MalformedFileError("bad json"), cli.EXIT_MALFORMED),
        (DeviceError("cuda fault"), cli.EXIT_DEVICE),
        (RemoteStorageError("no creds"), cli.EXIT_REMOTE),
        (OutOfMemoryError("oom"), cli.EXIT_MEMORY),
        # foreign errors of certain meaning
        (PermissionError(errno.EACCES, "Permission denied", "/x"), cli.EXIT_FILE),
        (ConnectionRefusedError("refused"), cli.EXIT_REMOTE),
        (MemoryError(), cli.EXIT_MEMORY),
        # foreign errors sorted by built-in type used to get 4 and 5; they are bugs
        (ValueError("could not broadcast input array"), cli.EXIT_INTERNAL),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), cli.EXIT_INTERNAL),
        (json.JSONDecodeError("Expecting value", "{", 1), cli.EXIT_INTERNAL),
        (OSError("an OSError without an errno"), cli.EXIT_INTERNAL),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_codes_go_by_meaning(exc, code, monkeypatch, tmp_path, store):
    monkeypatch.setenv("CUSA_LOG_DIR", str(tmp_path / "logs"))
    _raise_from_store_info(monkeypatch, exc)
    res = CliRunner().invoke(app, ["store", "info", "--store", store])
    assert res.exit_code == code, res.output
    _error_line(res.output)


def test_torch_out_of_memory_and_accelerator_errors_keep_their_meaning(monkeypatch, store):
    torch = pytest.importorskip("torch")
    _raise_from_store_info(monkeypatch, torch.OutOfMemoryError("CUDA out of memory"))
    res = CliRunner().invoke(app, ["store", "info", "--store", store])
    assert res.exit_code == cli.EXIT_MEMORY, res.output
    if hasattr(torch, "AcceleratorError"):
        _raise_from_store_info(monkeypatch, torch.AcceleratorError("an illegal memory access"))
        res = CliRunner().invoke(app, ["store", "info", "--store", store])
        assert res.exit_code == cli.EXIT_DEVICE, res.output


def test_an_internal_error_names_the_log_file_with_its_traceback(monkeypatch, tmp_path, store):
    logs = tmp_path / "logs"
    monkeypatch.setenv("CUSA_LOG_DIR", str(logs))

    def broken_helper(store):
        return {"groups": []}["layout_version"]  # a real bug: KeyError deep in a call

    monkeypatch.setattr("cusa.store.info.store_info", broken_helper)
    res = CliRunner().invoke(app, ["store", "info", "--store", store])
    line = _error_line(res.output)
    assert res.exit_code == cli.EXIT_INTERNAL == 70
    assert "unexpected internal error (KeyError: 'layout_version')" in line
    named = re.search(r"the traceback is in '([^']+)'", line)
    assert named, line
    log_file = Path(named.group(1))
    assert log_file.parent == logs and log_file.is_file()
    text = log_file.read_text()
    assert "Traceback (most recent call last)" in text and "broken_helper" in text
    assert "KeyError: 'layout_version'" in text


def _run_without(module: str, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``cusa ARGV`` in a fresh interpreter where importing ``module`` fails as if missing."""
    code = (
        "import sys\n"
        f"sys.modules[{module!r}] = None  # import raises ModuleNotFoundError, as when missing\n"
        f"sys.argv = ['cusa', *{argv!r}]\n"
        "from cusa.cli import main\n"
        "main()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


def test_report_without_matplotlib_names_the_extra(tmp_path):
    env = {**os.environ, "CUSA_HOME": str(tmp_path), "CUSA_LOG_DIR": str(tmp_path / "logs")}
    proc = _run_without(
        "matplotlib", ["report", "--store", str(tmp_path / "s"), "--out", "r.html"], env
    )
    line = _error_line(proc.stderr)
    assert proc.returncode == cli.EXIT_REFUSED, proc.stderr
    assert "`cusa report` needs matplotlib" in line and "pip install 'cusa[report]'" in line
    assert "internal error" not in line and not (tmp_path / "logs").exists()


def test_the_optional_modules_table_matches_pyproject_extras():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]

    def names(extra: str) -> set[str]:
        out = set()
        for req in extras[extra]:
            name = re.split(r"[<>=!\[; ]", req, maxsplit=1)[0].lower()
            out.add(name)
            if name == "cusa":  # cusa[a,b]: the extras it includes
                for sub in re.search(r"\[(.*)\]", req).group(1).split(","):
                    out |= names(sub.strip())
        return out

    for module, (dist, extra) in OPTIONAL_MODULES.items():
        assert extra in extras, (module, extra)
        assert dist in names(extra), f"{module}: {dist!r} is not in the {extra!r} extra"
