"""Smoke test of ``benchmarks/cusa_vs_infonce.py`` on the embedded ``coco-sample`` split.

The whole pipeline runs for real at toy scale: extraction into a fresh store (MobileNetV2 and
all-MiniLM-L6-v2 as the student's towers, efficientnet-lite0 as the image teacher, MiniLM again
as a fast stand-in text teacher), the held-out schedule choice, a few steps of every variant,
evaluation, aggregation and the plot.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.cusa_config import VARIANTS, ExperimentConfig, Schedule, loss_config
from benchmarks.cusa_features import load_split
from benchmarks.cusa_training import build_model
from benchmarks.cusa_vs_infonce import run_experiment
from benchmarks.cusa_vs_infonce_report import plot_rsum
from cusa.errors import ConfigError
from cusa_train.config.loss import LossConfig

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

TINY = ExperimentConfig(
    train="coco-sample",
    eval="coco-sample",
    train_split="train",
    eval_split="val",
    text_teacher="all-MiniLM-L6-v2",  # fast stand-in for all-mpnet-base-v2
    seeds=(0, 1),
    schedule=Schedule(epochs=2, batch_size=8, warmup_steps=1),
    tune=True,
    tune_lrs=(1e-3,),
    tune_epochs=(1, 2),
    holdout_fraction=0.25,
    adapter_hidden=64,
    embed_dim=32,
)


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory) -> tuple[dict, str]:
    store = str(tmp_path_factory.mktemp("cvi") / "store")
    return run_experiment(TINY, store), store


def test_variant_losses_are_the_official_cusa_yaml() -> None:
    golden = json.loads((FIXTURES / "cusa_loss_golden.json").read_text())
    official = LossConfig.from_official(golden["cusa.yaml:mean"]["config"])
    assert loss_config("cusa") == official
    for variant, (csa, usa) in VARIANTS.items():
        cfg = loss_config(variant)
        assert (cfg.itr.enabled, cfg.csa.enabled, cfg.usa.enabled) == (True, csa, usa)
        assert (cfg.csa.weight, cfg.usa.weight) == (0.1, 0.5)
        assert cfg.itr.tau == official.itr.tau and cfg.csa.tau == official.csa.tau


def test_bad_experiment_config_is_refused() -> None:
    with pytest.raises(ConfigError, match="variants .* unknown"):
        replace(TINY, variants=("infonce", "clip"))
    with pytest.raises(ConfigError, match="adapter='deep'"):
        replace(TINY, adapter="deep")


@pytest.mark.benchmark
def test_whole_experiment_runs_on_real_stored_features(tiny_results) -> None:
    results, _ = tiny_results
    json.dumps(results)  # the results file must be plain JSON
    assert set(results["runs"]) == set(VARIANTS)
    assert results["data"]["train"]["images"] == 24 and results["data"]["eval"]["images"] == 8
    # The schedule was chosen on held-out *train* images, never on the eval split.
    assert results["tuning"]["holdout_images"] == 6 and results["tuning"]["fit_images"] == 18
    assert results["config"]["schedule"]["epochs"] == results["tuning"]["chosen"]["epochs"]
    for variant, by_seed in results["runs"].items():
        assert set(by_seed) == {"0", "1"}
        for run in by_seed.values():
            m = run["metrics"]
            assert 0.0 <= m["rsum"] <= 600.0 and math.isfinite(m["rsum"])
            assert m["rsum"] == pytest.approx(sum(m[k] for k in m if k[:4] in ("i2t_", "t2i_")))
            assert 0.0 <= m["t2t_r1"] <= 100.0 and 0.0 <= m["t2t_uni_map_at_r"] <= 100.0
            assert run["steps"] > 0 and run["train_s"] > 0
            # Terms that are off contribute exactly nothing.
            csa, usa = VARIANTS[variant]
            assert (run["final_losses"]["csa"] != 0.0) == csa
            assert (run["final_losses"]["usa"] != 0.0) == usa
    # Paired deltas: the mean of per-seed differences.
    d = results["deltas_vs_infonce"]["cusa"]["rsum"]["mean"]
    runs = results["runs"]
    expected = np.mean(
        [runs["cusa"][s]["metrics"]["rsum"] - runs["infonce"][s]["metrics"]["rsum"] for s in "01"]
    )
    assert d == pytest.approx(expected, abs=1e-3)
    ref = results["reference_t2t_untrained"]["all-MiniLM-L6-v2"]
    assert 0.0 < ref["t2t_map_at_r"] <= 100.0


@pytest.mark.benchmark
def test_same_seed_gives_every_variant_the_same_start(tiny_results) -> None:
    _, store = tiny_results
    data = load_split(TINY, store, "coco-sample", "train")
    models = {v: build_model(TINY, v, data, seed=3) for v in VARIANTS}
    ref = models["infonce"].state_dict()
    for variant, model in models.items():
        state = model.state_dict()
        for key in (
            "student.image_adapter.1.weight",
            "cross_image_head.proj.weight",
            "cross_text_head.proj.weight",
        ):
            assert torch.equal(state[key], ref[key]), (variant, key)
        assert (model.uni_text_head is not None) == VARIANTS[variant][1]


@pytest.mark.benchmark
def test_plot_is_written(tiny_results, tmp_path) -> None:
    results, _ = tiny_results
    path = tmp_path / "rsum.png"
    plot_rsum(results, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
