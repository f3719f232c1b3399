"""The runnable examples in the public classes' docstrings run, and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

EXAMPLES = [
    "adacs_lightning.methods.adacs",  # AdaCS
    "adacs_lightning.objective",  # BackboneObjective
    "adacs_lightning.refine",  # Refiner
    "adacs_lightning.registration",  # register_pair
]


@pytest.mark.parametrize("module", EXAMPLES)
def test_docstring_examples_run(module, single_thread):
    results = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS, verbose=False)
    assert results.attempted > 0, f"{module} shows no example"
    assert results.failed == 0
