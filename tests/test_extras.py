"""The optional extras: declared once in pyproject.toml, named by the ImportError of a missing
one, installed by the README's first command and by .ci/run; the pipeline needs none of them.

A missing extra is simulated in a fresh interpreter in which the extra's modules are None in
``sys.modules``: importing one raises ``ModuleNotFoundError`` naming it, and
``importlib.util.find_spec`` answers None, as for a module that is not installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from devinterp_losskernel.extras import EXTRAS, install_hint, missing_extra, require

from conftest import devinterp_major

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {"pillow": "PIL", "scikit-learn": "sklearn"}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _distributions(requirements) -> set:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_pyproject_declares_the_extras_that_extras_py_names():
    optional = _pyproject()["project"]["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        declared = {IMPORT_NAMES.get(d, d) for d in _distributions(optional[extra])}
        assert declared == set(modules), (extra, declared, modules)
    union = set().union(*(_distributions(optional[e]) for e in EXTRAS))
    assert _distributions(optional["all"]) == union
    assert {"pytest", "ruff"} <= _distributions(optional["test"])


def test_the_default_install_is_the_pipeline_and_the_analyses():
    core = _distributions(_pyproject()["project"]["dependencies"])
    assert core == {"torch", "devinterp", "numpy", "tqdm", "umap-learn", "nltk"}
    optional = set().union(*(set(m) for m in EXTRAS.values()))
    assert not core & {d for d in _distributions(_pyproject()["project"]["optional-dependencies"]["all"])}
    assert "torch" not in optional


def _readme_extras() -> set:
    first = re.search(r"```bash\n(.*?)\n", (ROOT / "README.md").read_text()).group(1)
    match = re.search(r'-e "\.\[([\w,]+)\]"', first)
    assert match and "losskernel demo" in first, f"the README's first command changed: {first!r}"
    return set(match.group(1).split(","))


def test_the_readmes_first_command_installs_what_the_demo_needs():
    extras = _readme_extras()
    assert "all" in extras or "demo" in extras


def test_ci_env2_is_the_readmes_install_plus_the_test_tools():
    run = (ROOT / ".ci" / "run").read_text()
    env2 = re.search(r'^make_env "\$ENV2" "[^"]*" "[^"]*" "([\w,]*)"', run, re.M)
    assert env2, "no make_env line for env 2 in .ci/run"
    assert set(env2.group(1).split(",")) == _readme_extras() | {"test"}
    assert re.search(r'"\$ENV2/bin/python" -m ruff check src tests', run)


def test_the_error_names_the_extra():
    error = missing_extra(ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib"), "plot", "X")
    assert str(error) == "X needs matplotlib, which is not installed: pip install 'devinterp-losskernel[plot]'"
    assert error.name == "matplotlib"
    sklearn = missing_extra(ModuleNotFoundError("No module named 'sklearn.datasets'", name="sklearn.datasets"),
                            "demo", "the demo")
    assert "needs scikit-learn" in str(sklearn) and "[demo]" in str(sklearn)
    # a module that is there but breaks on import, or one the extra does not bring: the error itself
    broken = ImportError("cannot import name 'x' from 'matplotlib'", name="matplotlib")
    assert missing_extra(broken, "plot", "X") is broken
    other = ModuleNotFoundError("No module named 'foo'", name="foo")
    assert missing_extra(other, "plot", "X") is other
    assert require("math", "plot", "X").sqrt(4.0) == 2.0
    with pytest.raises(ValueError, match="unknown extra"):
        require("math", "plots", "X")
    with pytest.raises(ValueError, match="unknown extra"):
        install_hint("nope")
    assert install_hint("all") == "pip install 'devinterp-losskernel[all]'"


_BLOCK = '''
import sys

BLOCKED = set({blocked!r})
for name in BLOCKED:  # as if not installed: import raises ModuleNotFoundError, find_spec gives None
    sys.modules[name] = None
'''


def run_without(blocked, code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which the modules ``blocked`` are not installed."""
    script = _BLOCK.format(blocked=sorted(blocked)) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_without_any_extra_the_kernel_and_its_analyses_work_and_each_extra_is_named(tmp_path):
    blocked = {"matplotlib", "bokeh", "PIL", "pandas", "xarray", "zarr"}
    result = run_without(blocked, '''
        import numpy as np
        import torch

        import devinterp_losskernel as lk
        from devinterp_losskernel.analysis import (compare_kernels, memorization_scores, singular_fluctuation,
                                                   top_correlated)

        acc = lk.KernelAccumulator(4)
        acc.update(torch.randn(30, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
        kernel = acc.compute()
        assert kernel.correlation.shape == (4, 4)
        memorization_scores(kernel), top_correlated(kernel, index=0, k=2)
        assert singular_fluctuation(kernel, nbeta=10.0, num_train=4).method == "exact"

        def says(extra, call):
            try:
                call()
            except ImportError as error:
                assert f"pip install 'devinterp-losskernel[{extra}]'" in str(error), str(error)
                print(extra, "->", error)
            else:
                raise AssertionError(f"no ImportError for [{extra}]")

        says("plot", lambda: __import__("devinterp_losskernel.plotting"))
        from devinterp_losskernel.explore import explore
        says("explore", lambda: explore(kernel, embedding=np.zeros((4, 2)), path="k.html"))
        says("pandas", lambda: compare_kernels({"a": kernel, "b": kernel}))
        says("xarray", lambda: kernel.to_xarray())
        says("xarray", lambda: lk.LossKernel.from_samples("run.zarr"))
        from devinterp_losskernel.demo import require_demo_modules
        says("demo", require_demo_modules)
        from devinterp_losskernel.hierarchy import Hierarchy
        tree = Hierarchy.from_parents({"a": "root", "b": "root"})
        says("plot", lambda: tree.position_colors(["a", "b"]))
        print("ok")
    ''', tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
    assert not (tmp_path / "k.html").exists()  # refused before any work
    assert "plotting needs matplotlib" in result.stdout and "explore() needs bokeh" in result.stdout


def test_losskernel_demo_without_its_extra_says_which_to_install(tmp_path):
    result = run_without({"bokeh"}, '''
        import sys
        from devinterp_losskernel.cli import main
        sys.argv = ["losskernel", "demo", "--quick", "--out", "out"]
        main()
    ''', tmp_path)
    assert result.returncode == 1
    assert "losskernel demo needs bokeh, which is not installed: pip install 'devinterp-losskernel[demo]'" \
        in result.stderr
    assert not (tmp_path / "out" / "kernel.pt").exists()


def test_a_devinterp_1_run_needs_no_extra(tmp_path):
    """The whole pipeline — devinterp's sampler, the callback, the kernel, the SLT numbers —
    without any extra (devinterp 1.3 imports none of them; devinterp 2 imports pandas and xarray
    itself, so there the run needs what devinterp needs)."""
    if devinterp_major() != 1:
        pytest.skip("devinterp 2 imports pandas and xarray itself")
    blocked = {"matplotlib", "bokeh", "PIL", "pandas", "xarray", "zarr", "sklearn", "umap", "nltk"}
    result = run_without(blocked, '''
        import sys
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        from devinterp_losskernel import estimate_loss_kernel

        torch.manual_seed(0)
        x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        kernel = estimate_loss_kernel(model, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True),
                                      (x[:20], y[:20]), num_chains=2, num_draws=6, num_burnin_steps=2,
                                      lr=1e-4, nbeta=10.0, localization=100.0, seed=0, verbose=False)
        assert kernel.covariance.shape == (20, 20) and "singular_fluctuation" in kernel.metadata
        heavy = sorted(m for m, module in sys.modules.items() if m.split(".")[0] in BLOCKED and module is not None)
        print("ok", heavy)
    ''', tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok []", result.stdout
