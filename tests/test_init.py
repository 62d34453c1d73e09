"""The front door: ``import devinterp_losskernel`` is light and its top level is the pipeline's nouns."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

import devinterp_losskernel

# what the top level holds, and nothing else (analyses, figures, the explorer and hierarchies
# are imported from their own namespaces)
PUBLIC = {
    # the callback, its option groups and the SLT numbers derived beside it
    "LossKernelCallback", "ProbeOptions", "KernelStorage", "DivergenceGuard", "SnapshotSchedule", "SLTSummary",
    # the result and the accumulator
    "LossKernel", "KernelAccumulator",
    # the runners and the devinterp 2.x twins
    "estimate_loss_kernel", "loss_kernel", "llc", "bif", "susceptibilities",
    "as_devinterp2_dataset", "devinterp2_evaluate",
    # the settings record and the paper's presets
    "SGLDSettings", "preset", "PAPER_PRESETS",
    # the probe protocol
    "ProbeSet", "classification_loss", "lm_sequence_loss", "default_loss_fn",
    # the errors
    "FileIntegrityError", "IdentityMismatchError", "KernelMemoryError",
}
SUBMODULES = ("analysis", "plotting", "explore", "hierarchy")
HEAVY = {"matplotlib", "bokeh", "umap", "nltk", "sklearn", "pandas", "scipy", "xarray", "zarr", "PIL",
         "devinterp"}


def test_all_is_exactly_the_pipelines_nouns():
    assert len(devinterp_losskernel.__all__) == len(set(devinterp_losskernel.__all__))
    assert set(devinterp_losskernel.__all__) == PUBLIC


def test_every_public_name_resolves():
    for name in PUBLIC:
        assert getattr(devinterp_losskernel, name) is not None, name


def test_the_bare_import_loads_no_heavy_module():
    code = ("import devinterp_losskernel, sys; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(HEAVY)!r}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_submodules_are_namespaces_loaded_on_first_use():
    code = ("import sys, devinterp_losskernel as d; "
            "assert not any(f'devinterp_losskernel.{m}' in sys.modules for m in "
            f"{SUBMODULES!r}), 'a namespace was imported by the bare import'; "
            "assert d.analysis.memorization_scores is not None; "
            "assert 'devinterp_losskernel.analysis' in sys.modules; assert 'matplotlib' not in sys.modules; "
            "from devinterp_losskernel import hierarchy; assert hierarchy.Hierarchy is d.hierarchy.Hierarchy; "
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "ok", result.stderr
    import importlib.util

    for name in SUBMODULES:
        if name == "plotting" and importlib.util.find_spec("matplotlib") is None:
            continue  # the [plot] extra is not installed here
        module = getattr(devinterp_losskernel, name)
        assert isinstance(module, types.ModuleType) and module.__name__ == f"devinterp_losskernel.{name}"
        assert name in dir(devinterp_losskernel)


def test_an_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'memorization_scores'"):
        devinterp_losskernel.memorization_scores
    assert not hasattr(devinterp_losskernel, "no_such_thing")


def test_analyses_are_imported_from_one_place():
    from devinterp_losskernel import analysis

    for name in analysis.__all__:
        assert not hasattr(devinterp_losskernel, name) or name in SUBMODULES, name
        obj = getattr(analysis, name)
        assert getattr(obj, "__module__", "devinterp_losskernel.analysis").startswith(
            "devinterp_losskernel.analysis"), name


def test_explore_is_a_plain_function_in_a_plain_module():
    from devinterp_losskernel import explore as module
    from devinterp_losskernel.explore import explore

    assert type(module) is types.ModuleType and not callable(module)
    assert isinstance(explore, types.FunctionType) and explore.__module__ == "devinterp_losskernel.explore"
    import inspect

    parameters = inspect.signature(explore).parameters
    assert list(parameters)[0] == "kernel" and "images" in parameters and "path" in parameters


def test_from_samples_is_defined_on_the_class():
    from devinterp_losskernel import LossKernel

    assert "from_samples" in vars(LossKernel)                     # defined in kernel.py, not attached
    assert isinstance(vars(LossKernel)["from_samples"], classmethod)
    assert LossKernel.from_samples.__func__.__module__ == "devinterp_losskernel.kernel"
