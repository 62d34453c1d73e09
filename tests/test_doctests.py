"""The docstrings' ``>>>`` examples of every module of the library run as written.

Each module of ``src/devinterp_losskernel`` is imported and its examples run with
:mod:`doctest` in a temporary working directory (an example may write a file). A module whose
optional extra is missing (plotting needs matplotlib, the ``[plot]`` extra) is skipped, not
failed; every other module must import with the default install.
"""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil

import pytest

import devinterp_losskernel

MODULES = ["devinterp_losskernel"] + sorted(
    name for _, name, _ in pkgutil.walk_packages(devinterp_losskernel.__path__, "devinterp_losskernel."))
# a module that imports an optional extra when it is imported (the rest import theirs on use)
NEEDS = {"devinterp_losskernel.plotting": "matplotlib"}
# the public docstrings that must show a runnable example (a reader's first stop)
KEY_EXAMPLES = [
    "devinterp_losskernel.kernel.LossKernel",
    "devinterp_losskernel.accumulator.KernelAccumulator",
    "devinterp_losskernel.samples.loss_kernel",
    "devinterp_losskernel.correlation.correlation_from_covariance",
    "devinterp_losskernel.analysis",
    "devinterp_losskernel.analysis.fluctuation.singular_fluctuation",
    "devinterp_losskernel.analysis.neighbours.top_correlated",
    "devinterp_losskernel.analysis.cka.cka",
]


def test_every_module_is_found():
    assert {"devinterp_losskernel", "devinterp_losskernel.kernel", "devinterp_losskernel.analysis.cka",
            "devinterp_losskernel.explore"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    module = importlib.import_module(name)
    monkeypatch.chdir(tmp_path)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = io.StringIO()
    for test in doctest.DocTestFinder(exclude_empty=True).find(module, name):  # its own objects only
        runner.run(test, out=report.write)
    assert runner.failures == 0, report.getvalue()


@pytest.mark.parametrize("qualified", KEY_EXAMPLES)
def test_key_docstrings_carry_an_example(qualified):
    module_name, _, attribute = qualified.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        target = importlib.import_module(qualified)
    assert ">>>" in (target.__doc__ or ""), f"{qualified}'s docstring has no >>> example"
