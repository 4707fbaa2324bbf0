"""Every docstring example in FPDenoiseLib runs and gives what it shows (scikit-image style: an example per
function); the illustrative ones that need files a user would have are marked ``# doctest: +SKIP``."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import FPDenoiseLib

MODULES = sorted(m.name for m in pkgutil.walk_packages(FPDenoiseLib.__path__, "FPDenoiseLib.")
                 if not m.name.endswith("__main__"))  # importing it would run the command line


def test_the_library_has_examples_to_run():
    found = sum(len([e for t in doctest.DocTestFinder().find(importlib.import_module(n)) for e in t.examples])
                for n in MODULES)
    assert len(MODULES) > 15 and found > 60, (len(MODULES), found)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    res = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, verbose=False)
    assert res.failed == 0, f"{name}: {res.failed} of {res.attempted} examples failed"
