"""Every example in the library's docstrings runs and prints what it says (einops-style: the docs are tested)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import tokenreduce

MODULES = sorted(info.name for info in pkgutil.walk_packages(tokenreduce.__path__, "tokenreduce."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed (see the output)"


def test_modules_are_found():
    assert {"tokenreduce.core.ops", "tokenreduce.core.precision", "tokenreduce.methods.base"} <= set(MODULES)
