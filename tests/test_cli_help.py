"""Every command and option of the `cusa` app has help text, and the help renders it whole.

The walk covers every command the typer app registers, so a new option without help fails here.
Rendering is checked on the real ``--help`` output: each option's help text must appear in it
(whitespace aside, since lines wrap), bracketed notes such as ``[default: $CUSA_HOME/store]``
included, which rich markup used to swallow.
"""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from cusa.cli import app


def _commands(group, path=()):
    yield path, group
    for name, cmd in sorted(getattr(group, "commands", {}).items()):
        yield from _commands(cmd, (*path, name))


COMMANDS = list(_commands(typer.main.get_command(app)))


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_the_walk_sees_every_command():
    names = {" ".join(p) for p, _ in COMMANDS}
    for expected in (
        "extract", "shard", "train", "eval", "report", "store info", "store verify",
        "store knn", "store export", "teachers list", "teachers fetch", "datasets list",
        "cache info", "cache clean",
    ):  # fmt: skip
        assert expected in names


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) or "cusa" for p, _ in COMMANDS])
def test_every_option_has_help_that_renders(path, cmd):
    assert (cmd.help or "").strip(), f"command {' '.join(path)!r} has no help"
    res = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    shown = _squash(res.output)
    assert _squash(cmd.help.split("\n\n")[0])[:60] in shown
    for param in cmd.params:
        if getattr(param, "hidden", False):
            continue
        text = (getattr(param, "help", None) or "").strip()
        assert text, f"{' '.join(path)} {param.opts[0]} has no help text"
        assert _squash(text) in shown, f"{param.opts[0]}: help not rendered whole:\n{res.output}"
        for note in re.findall(r"\[[^\]]*\]", text):
            assert _squash(note) in shown, f"{param.opts[0]}: {note!r} swallowed"


def test_choices_are_listed_and_checked():
    res = CliRunner().invoke(app, ["extract", "--help"], env={"COLUMNS": "100"})
    assert "float16|float32" in res.output and "auto|local|ray" in res.output
    bad = CliRunner().invoke(app, ["extract", "--dataset", "coco-sample", "--dtype", "float64"])
    assert bad.exit_code == 2 and "float64" in bad.output
    bad = CliRunner().invoke(
        app, ["store", "knn", "--teacher", "t", "--id", "x", "--metric", "cos"]
    )
    assert bad.exit_code == 2 and "cos" in bad.output


def test_the_main_help_documents_the_exit_codes():
    res = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "100"})
    text = " ".join(res.output.split())
    for code in ("0 ok", "1 samples failed", "2 usage error", "130 interrupted"):
        assert code in text
