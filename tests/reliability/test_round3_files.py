"""Round 3 (issue 21): config and weights files under the one rule of cusa.safe_files.

A FIFO, a folder or ``/dev/zero`` given as a config or weights file is named as what it is (it
said "does not exist", or blocked); an empty weights file gives a reason; a config file is
size-capped before it is parsed; YAML aliases cannot expand a config (or a ``--set`` value) into
billions of values. Each case is checked through the CLI (``cusa train --config``) and through the
library call it reaches, in one parametrised test.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from reliability_common import MAX_MESSAGE, deadline
from typer.testing import CliRunner

from cusa.cli import app
from cusa.errors import ConfigError, WeightsError
from cusa.weights import load_state_dict, weights_file
from cusa_train.config.parsing import MAX_CONFIG_VALUES, apply_overrides, load_mapping


def _fifo(tmp: Path, name: str) -> Path:
    path = tmp / name
    os.mkfifo(path)
    return path


def _folder(tmp: Path, name: str) -> Path:
    path = tmp / name
    path.mkdir()
    return path


def _dev_zero(tmp: Path, name: str) -> Path:
    return Path("/dev/zero")


def _empty(tmp: Path, name: str) -> Path:
    path = tmp / name
    path.touch()
    return path


def _huge_config(tmp: Path, name: str) -> Path:
    path = tmp / name
    with open(path, "wb") as fh:  # 1 GB, sparse
        fh.truncate(2**30)
    return path


def _laughs(depth: int = 8) -> str:
    text = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for k in range(1, depth + 1):
        text += f"{chr(97 + k)}: &{chr(97 + k)} [" + ", ".join([f"*{chr(96 + k)}"] * 9) + "]\n"
    return text


def _billion_laughs(tmp: Path, name: str) -> Path:
    path = tmp / name
    path.write_text(_laughs() + "data:\n  split: *i\n")
    return path


# name: (make the file, consumer, what the message must say)
_CASES: dict[str, tuple[Callable[[Path, str], Path], str, str]] = {
    "file: config file is a FIFO": (_fifo, "config", "is a FIFO (named pipe)"),
    "file: config file is a folder": (_folder, "config", "is a directory"),
    "file: config file is /dev/zero": (_dev_zero, "config", "is a character device"),
    "file: config file of 1 GB": (_huge_config, "config", "over the limit of"),
    "file: config YAML billion laughs (aliases)": (_billion_laughs, "config", "aliases"),
    "file: weights file is a FIFO": (_fifo, "weights", "is a FIFO (named pipe)"),
    "file: weights file is a folder": (_folder, "weights", "is a directory"),
    "file: weights file is /dev/zero": (_dev_zero, "weights", "is a character device"),
    "file: weights file is empty": (_empty, "weights", "is empty (0 bytes)"),
}


def _library(consumer: str, path: Path) -> str:
    try:
        if consumer == "config":
            load_mapping(path)
        else:
            weights_file(path, "CLIP")
    except (ConfigError, WeightsError) as exc:
        return str(exc)
    return ""


def _cli(consumer: str, path: Path) -> Any:
    if consumer == "config":
        return CliRunner().invoke(app, ["train", "--config", str(path)])
    return None  # weights files are reached through configs; the library call is the check


@pytest.mark.parametrize("case", list(_CASES))
def test_config_and_weights_files_are_named_for_what_they_are(tmp_path, case, reliability_log):
    make, consumer, expected = _CASES[case]
    path = make(tmp_path, "cfg.yaml" if consumer == "config" else "w.pt")
    with deadline(60):
        said = {"library": _library(consumer, path)}
        if consumer == "weights":
            try:
                load_state_dict(path)
                said["load_state_dict"] = ""
            except WeightsError as exc:
                said["load_state_dict"] = str(exc)
        res = _cli(consumer, path)
        if res is not None:
            said["cli"] = res.output if res.exit_code == 2 else f"exit {res.exit_code}"
    ok = all(expected in m and len(m.strip()) <= MAX_MESSAGE + 10 for m in said.values())
    reliability_log.bad_input(
        case,
        "file",
        caught=ok,
        outcome="refused in one line saying what the file is (exit 2), before it is parsed or "
        "hashed; never blocks",
        message=said["library"],
    )
    assert ok, said


def test_a_billion_laughs_set_value_is_refused_fast(reliability_log):
    with deadline(30):
        try:
            apply_overrides({}, ["data.split=" + "{" + _laughs().replace("\n", ", ") + "}"])
            message = ""
        except ConfigError as exc:
            message = str(exc)
    ok = "aliases" in message and f"{MAX_CONFIG_VALUES:,}" in message
    reliability_log.bad_input(
        "cli: --set value with a YAML billion laughs",
        "cli",
        caught=ok,
        outcome="refused in one line before anything is built (no GB of RAM, no 2 min)",
        message=message,
    )
    assert ok, message


def test_a_50mb_path_makes_a_bounded_one_line_message(tmp_path):
    """Every CLI error line is cut to 500 characters in the middle: the start says what is
    wrong, the end keeps the fix (it printed the whole 50 MB path)."""
    huge = str(tmp_path) + "/a" * 25_000_000
    res = CliRunner().invoke(app, ["store", "info", "--store", huge])
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    ok = (
        res.exit_code != 0
        and len(lines) == 1
        and len(lines[0]) <= MAX_MESSAGE + len("error: ")
        and "chars cut" in lines[0]
        and lines[0].rstrip().endswith("readable/writable")
    )
    assert ok, res.output[:1000]
