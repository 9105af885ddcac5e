"""Smoke test of ``benchmarks/cusa_sensitivity.py`` (and the ``cusa_sensitivity_*`` modules it
runs) on the embedded ``coco-sample`` split.

The whole sweep runs for real at toy scale: extraction into a fresh store (the student's towers,
which are also the teachers here, the control of the study), the held-out schedule choice per
training-set size and student, the official cells, the τ sweep, the (τ, α) grid, the teacher
sweep, the size sweep and the plots; the fine-tuned MiniLM layer and the confirmation's held-out
check run on their own. Kept small (about 30 short runs, one torch thread) so the default suite
stays fast.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from benchmarks.cusa_config import ExperimentConfig, Schedule, loss_config
from benchmarks.cusa_features import load_split
from benchmarks.cusa_sensitivity import run_sweep
from benchmarks.cusa_sensitivity_config import OFFICIAL, Cell, SweepConfig, sweep_loss
from benchmarks.cusa_sensitivity_finetune import (
    MiniLMTail,
    PartialTextTowerStudent,
    with_tokens,
)
from benchmarks.cusa_sensitivity_report import (
    plot_factors,
    plot_heatmaps,
    plot_teachers,
)
from benchmarks.cusa_sensitivity_sweep import Sweep, summarize
from cusa.errors import ConfigError
from cusa_train.config.loss import LossConfig

BASE = ExperimentConfig(
    train="coco-sample",
    eval="coco-sample",
    image_teacher="mobilenetv2",  # the student's own towers as teachers: nothing more to extract
    text_teacher="all-MiniLM-L6-v2",
    schedule=Schedule(epochs=2, batch_size=8, warmup_steps=1),
    tune_lrs=(1e-3,),
    tune_epochs=(1, 2),
    holdout_fraction=0.25,
    adapter_hidden=32,
    embed_dim=16,
)
TINY = SweepConfig(
    base=BASE,
    image_teachers=("mobilenetv2",),
    text_teachers=("all-MiniLM-L6-v2",),
    taus=(1.0, 0.1),
    alphas=(0.1,),
    betas=(0.5,),
    train_sizes=(12, 24),
    seeds=(0, 1, 2),
    confirm_seeds=(),
    finetune=False,  # the fine-tuned student runs on its own below, with one seed
    train_threads=1,  # tiny models: a second thread only waits on a loaded machine
    tau_variants=("cusa",),
    weight_sweep=False,  # α is covered by the grid; β has one value here
    finetune_tune_lrs=(1e-3,),
    finetune_tune_epochs=(1,),
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The toy models are tiny: one torch thread avoids waiting on a descheduled second thread
    on a loaded CI machine (several times faster there), and is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread) -> tuple[dict, str]:
    store = str(tmp_path_factory.mktemp("sens") / "store")
    return run_sweep(TINY, store), store


def test_sweep_loss_changes_only_tau_alpha_beta() -> None:
    for variant in ("csa", "usa", "cusa"):
        assert sweep_loss(variant, **OFFICIAL) == loss_config(variant)
    cfg = sweep_loss("cusa", 0.05, 0.3, 1.0)
    assert (cfg.csa.weight, cfg.usa.weight) == (0.3, 1.0)
    t = cfg.csa.teacher_tau.merged
    assert (t.init, t.learnable) == (0.05, False) and t.min <= 0.05
    assert cfg.usa.teacher_tau == "csa"  # USA shares CSA's soft labels, as cusa.yaml
    assert cfg.csa.tau == loss_config("cusa").csa.tau  # the student's temperatures are untouched
    usa = sweep_loss("usa", 0.2, 0.1, 0.5)
    assert not usa.csa.enabled and usa.usa.teacher_tau.merged.init == 0.2


def test_sharper_soft_labels_preset_is_the_swept_setting() -> None:
    """The documented preset is exactly the sweep's τ = 0.5 CUSA cell; the default stays official."""
    assert LossConfig.sharper_soft_labels() == sweep_loss("cusa", 0.5, 0.1, 0.5)
    assert LossConfig.sharper_soft_labels(1.0) == LossConfig() == loss_config("cusa")
    assert LossConfig.sharper_soft_labels(0.2).csa.teacher_tau.merged.init == 0.2
    with pytest.raises(ConfigError, match="soft-label temperature > 0"):
        LossConfig.sharper_soft_labels(0.0)


def test_bad_sweep_config_is_refused() -> None:
    with pytest.raises(ConfigError, match=">= 3 seeds"):
        replace(TINY, seeds=(0, 1))
    with pytest.raises(ConfigError, match="official tau"):
        replace(TINY, taus=(0.5, 0.1))
    with pytest.raises(ConfigError, match="tau_variants"):
        replace(TINY, tau_variants=("clip",))


def test_summary_is_paired_and_counts_seeds_above() -> None:
    base = {s: {"rsum": 100.0 + s, "t2t_r1": 50.0} for s in range(3)}
    runs = {0: {"rsum": 103.0, "t2t_r1": 51.0}, 1: {"rsum": 102.0, "t2t_r1": 50.0},
            2: {"rsum": 101.0, "t2t_r1": 49.0}}  # fmt: skip
    s = summarize(runs, base)
    assert s["delta_rsum"]["mean"] == pytest.approx(1.0) and s["seeds_above"] == "2/3"
    assert s["frac_above"] == pytest.approx(2 / 3, abs=1e-3) and s["verdict"] == "unclear"
    assert s["delta_t2t_r1"]["mean"] == pytest.approx(0.0)
    runs = {k: {**v, "rsum": v["rsum"] + 5} for k, v in runs.items()}
    assert summarize(runs, base)["verdict"] == "helps"


@pytest.mark.benchmark
def test_whole_sweep_runs_on_real_stored_features(tiny) -> None:
    results, _ = tiny
    json.dumps(results)  # plain JSON
    assert results["data"]["train_images"] == 24 and results["data"]["eval_images"] == 8
    # Schedules: chosen per (size, student) on held-out *train* images, never the eval split.
    assert set(results["schedules"]) == {"n=24|frozen", "n=12|frozen"}
    assert results["schedules"]["n=24|frozen"]["holdout_images"] == 6
    for key, cell in results["cells"].items():
        s = cell["summary"]
        assert set(cell["runs"]) >= {"0", "1", "2"}, key
        for field in ("rsum", "delta_rsum", "t2t_r1", "delta_t2t_r1"):
            assert math.isfinite(s[field]["mean"]) and s[field]["n"] == 3
        assert 0.0 <= s["rsum"]["mean"] <= 600.0 and 0.0 <= s["frac_above"] <= 1.0
        # The paired Δ is the mean of per-seed differences from InfoNCE on the same seeds.
        spec = cell["spec"]
        base = results["baselines"][f"infonce|n={spec['train_size']}|{spec['student']}"]["runs"]
        diffs = [cell["runs"][k]["metrics"]["rsum"] - base[k]["metrics"]["rsum"] for k in "012"]
        assert s["delta_rsum"]["mean"] == pytest.approx(np.mean(diffs), abs=2e-3)
        assert s["seeds_above"] == f"{sum(d > 0 for d in diffs)}/3"
    f = results["factors"]
    assert set(f["official"]) == {"csa", "usa", "cusa"}
    assert set(f["tau"]) == {"cusa"} and set(f["tau"]["cusa"]) == {"1", "0.1"}
    assert "alpha" not in f and set(f["size"]["official"]) == {"12", "24"}
    assert "student" not in f
    assert list(f["teachers"]["1"]) == ["mobilenetv2+all-MiniLM-L6-v2"]  # the control pair
    grid = results["grids"]["default"]
    assert set(grid["delta_rsum"]) == {"1", "0.1"} and set(grid["delta_rsum"]["1"]) == {"0.1"}
    sel = results["selection"]
    assert sel["tau_star"] in TINY.taus and sel["best_setting"]["alpha"] in TINY.alphas
    assert sel["best_pair"] == ["mobilenetv2", "all-MiniLM-L6-v2"]  # no non-control candidate
    assert results["timings_s"]["runs"] > 0 and results["load_average"]["cpu_count"]


@pytest.mark.benchmark
def test_finetuned_student_trains_through_the_sweep(tiny) -> None:
    _, store = tiny
    sweep = Sweep(replace(TINY, finetune=True), store, "coco-sample", "train")
    cell = Cell("cusa", image_teacher="mobilenetv2", text_teacher="all-MiniLM-L6-v2",
                train_size=12, student="finetune")  # fmt: skip
    summary = sweep.cell(cell, seeds=(0,))
    assert summary["rsum"]["n"] == 1 and math.isfinite(summary["delta_rsum"]["mean"])
    assert set(sweep.baselines) == {"infonce|n=12|finetune"}
    assert sweep.timings["tokens_s"] > 0  # MiniLM hidden states of train and val captions


@pytest.mark.benchmark
def test_holdout_check_scores_on_held_out_train_images(tiny) -> None:
    _, store = tiny
    sweep = Sweep(TINY, store, "coco-sample", "train")
    cell = Cell("cusa", tau=0.1, image_teacher="mobilenetv2", text_teacher="all-MiniLM-L6-v2",
                train_size=24)  # fmt: skip
    out = sweep.holdout_check([cell], seeds=(0,))
    assert out[cell.key]["summary"]["delta_rsum"]["n"] == 1
    assert set(out[cell.key]["runs"]) == {0} and out["infonce"]["rsum"]["n"] == 1
    assert 0.0 <= out[cell.key]["runs"][0]["rsum"] <= 600.0


@pytest.mark.benchmark
def test_soft_label_entropy_falls_with_tau(tiny) -> None:
    results, _ = tiny
    for teacher, e in results["entropy"].items():
        per = e["per_tau"]
        assert per["0.1"]["entropy_nats"] < per["1"]["entropy_nats"] <= e["uniform_entropy_nats"]
        assert per["1"]["effective_neighbours"] == pytest.approx(
            math.exp(per["1"]["entropy_nats"]), rel=1e-2
        ), teacher


@pytest.mark.benchmark
def test_finetuned_text_layer_starts_at_the_stored_tower(tiny) -> None:
    _, store = tiny
    towers = replace(BASE, image_teacher="mobilenetv2", text_teacher="all-MiniLM-L6-v2")
    data = load_split(towers, store, "coco-sample", "val")
    tail = MiniLMTail(train_layers=1)
    tok = with_tokens(data, tail, "coco-sample", "val")
    student = PartialTextTowerStudent(tail.layers(), 1280, 384, 8, 8).eval()  # no dropout
    idx = np.arange(len(tok.caption_ids))
    _, texts = tok.gather("towers", idx[:1], idx)
    with torch.no_grad():
        pooled = student.pooled_text(texts)  # (M, 384)
    stored = torch.from_numpy(np.asarray(data.towers.text.gather_rows(data.caption_rows["towers"]),
                                         dtype=np.float32))  # fmt: skip
    assert torch.allclose(pooled, stored, atol=3e-3)  # fp16 storage of both
    assert sum(p.requires_grad for p in student.text_layers.parameters()) > 0


@pytest.mark.benchmark
def test_plots_are_written(tiny, tmp_path) -> None:
    results, _ = tiny
    for fn in (plot_factors, plot_heatmaps, plot_teachers):
        path = tmp_path / f"{fn.__name__}.png"
        fn(results, path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
