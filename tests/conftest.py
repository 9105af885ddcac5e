from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COCO_EXAMPLE = SHARED / "data" / "coco-example"
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def coco_example() -> Path:
    """The 801-image real COCO subset in ../shared; skipped with a reason when absent."""
    if not (COCO_EXAMPLE / "new_train.json").exists():
        pytest.skip(f"real COCO example data not found at {COCO_EXAMPLE} (it lives in ../shared)")
    return COCO_EXAMPLE


@pytest.fixture(autouse=True)
def _isolated_cusa_home(tmp_path_factory, monkeypatch):
    """Each test gets its own CUSA_HOME unless the models cache is needed (see models_home)."""
    home = tmp_path_factory.mktemp("cusa_home")
    monkeypatch.setenv("CUSA_HOME", str(home))
    yield home
