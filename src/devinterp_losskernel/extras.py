"""The optional dependencies, and the ImportError that says which extra brings one.

The pipeline itself — probe losses → :class:`~devinterp_losskernel.KernelAccumulator` →
:class:`~devinterp_losskernel.LossKernel`, driven by the callback or
:func:`~devinterp_losskernel.estimate_loss_kernel` — and the analyses need only the default
install (torch, numpy, tqdm, devinterp, umap-learn, nltk). The rest is an extra of
``pyproject.toml``, imported where it is used, never by ``import devinterp_losskernel``:

========== ============================== ===============================================
extra      brings                          for
========== ============================== ===============================================
plot       matplotlib                      :mod:`devinterp_losskernel.plotting`
explore    bokeh, matplotlib, pillow       :func:`devinterp_losskernel.explore.explore`
pandas     pandas                          the analyses that return tables (DataFrames)
xarray     xarray, zarr                    ``LossKernel.to_xarray``, ``LossKernel.from_samples``
demo       scikit-learn + plot + explore   ``losskernel demo``
all        all of the above
========== ============================== ===============================================

A missing one raises :class:`ImportError` naming the extra, e.g.
``pip install 'devinterp-losskernel[plot]'`` (devinterp itself brings pandas, and devinterp
2.x xarray and zarr, so those are usually there already).

>>> install_hint("plot")
"pip install 'devinterp-losskernel[plot]'"
>>> print(missing_extra(ModuleNotFoundError("No module named 'bokeh'", name="bokeh"), "explore", "explore()"))
explore() needs bokeh, which is not installed: pip install 'devinterp-losskernel[explore]'
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "install_hint", "missing_extra", "pandas_for", "require"]

DISTRIBUTION = "devinterp-losskernel"

#: extra → the modules (import names) it brings; pyproject.toml's [project.optional-dependencies]
EXTRAS = {
    "plot": ("matplotlib",),
    "explore": ("bokeh", "matplotlib", "PIL"),
    "pandas": ("pandas",),
    "xarray": ("xarray", "zarr"),
    "demo": ("sklearn", "matplotlib", "bokeh", "PIL"),
}

# the distribution to name for an import name that differs from it
_DISTRIBUTIONS = {"PIL": "pillow", "sklearn": "scikit-learn"}


def install_hint(extra: str) -> str:
    """The command that installs ``extra``."""
    if extra not in EXTRAS and extra != "all":
        raise ValueError(f"unknown extra {extra!r}; the extras are {sorted(EXTRAS) + ['all']}")
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def missing_extra(error: ImportError, extra: str, feature: str) -> ImportError:
    """The ImportError to raise for ``error`` (caught while importing what ``feature`` needs):
    one naming the extra when the missing module is one of ``extra``'s, else ``error`` itself
    (a module that is there but fails to import is not fixed by installing the extra)."""
    missing = getattr(error, "name", None) or ""
    root = missing.split(".")[0]
    if not isinstance(error, ModuleNotFoundError) or root not in EXTRAS[extra]:
        return error
    distribution = _DISTRIBUTIONS.get(root, root)
    return ImportError(f"{feature} needs {distribution}, which is not installed: {install_hint(extra)}",
                       name=missing)


def require(module: str, extra: str, feature: str) -> ModuleType:
    """``importlib.import_module(module)``, or the ImportError that names ``extra``.

    Args:
        module: the import name (``"matplotlib.figure"``, ``"bokeh.plotting"``…).
        extra: the extra of pyproject.toml that brings it (a key of :data:`EXTRAS`).
        feature: what needs it, for the message (``"devinterp_losskernel.plotting"``).
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; the extras are {sorted(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise missing_extra(error, extra, feature) from error


def pandas_for(feature: str) -> ModuleType:
    """pandas, for an analysis that returns tables (the ``[pandas]`` extra)."""
    return require("pandas", "pandas", f"{feature} (it returns pandas DataFrames)")
