"""The curated public API: ``from cusa_train import ...`` gives the submodules' objects."""

from __future__ import annotations

import importlib

import pytest

import cusa_train


@pytest.mark.parametrize("name", cusa_train.__all__)
def test_every_public_name_is_the_submodule_object(name):
    module = importlib.import_module(cusa_train._EXPORTS[name])
    assert getattr(cusa_train, name) is getattr(module, name)


def test_unknown_names_fail_like_a_module():
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        cusa_train.Nope  # noqa: B018
