"""devinterp-losskernel: the loss kernel K(x, x') = Cov_w[ℓ(x; w), ℓ(x'; w)] under SGLD.

The top level holds the pipeline's nouns: probe losses (:class:`ProbeSet` and the loss
functions) → the streaming :class:`KernelAccumulator` → the :class:`LossKernel`, driven by
the devinterp callback (:class:`LossKernelCallback`, its option groups, :class:`SLTSummary`),
the one-call runners (:func:`estimate_loss_kernel`, :func:`loss_kernel`, the devinterp 2.x
twins :func:`llc`, :func:`bif`, :func:`susceptibilities`), the SGLD settings
(:class:`SGLDSettings`, :func:`preset`) and the errors.

Everything after the kernel lives in its own namespace, imported on first use (PEP 562), so
``import devinterp_losskernel`` loads neither matplotlib, Bokeh, UMAP, nltk, pandas, xarray
nor devinterp:

* :mod:`devinterp_losskernel.analysis` — the paper's analyses (``singular_fluctuation``,
  ``memorization_scores``, ``top_correlated``, ``taxonomic_lift``, ``umap_embedding``…);
* :mod:`devinterp_losskernel.plotting` — figures (``pip install 'devinterp-losskernel[plot]'``);
* :mod:`devinterp_losskernel.explore` — the interactive kernel explorer,
  ``from devinterp_losskernel.explore import explore`` (``[explore]``);
* :mod:`devinterp_losskernel.hierarchy` — class hierarchies (WordNet, ImageNet, Fashion-MNIST).

Optional dependencies and their extras: :mod:`devinterp_losskernel.extras`.

>>> import devinterp_losskernel as lk
>>> lk.LossKernel.__name__, lk.analysis.__name__
('LossKernel', 'devinterp_losskernel.analysis')
"""

import importlib

from .accumulator import KernelAccumulator, KernelMemoryError
from .callback import LossKernelCallback
from .devinterp2 import as_devinterp2_dataset, devinterp2_evaluate, llc
from .devinterp2_bif import bif
from .devinterp2_susceptibilities import susceptibilities
from .estimate import estimate_loss_kernel
from .kernel import LossKernel
from .options import DivergenceGuard, KernelStorage, ProbeOptions, SnapshotSchedule
from .presets import PAPER_PRESETS, SGLDSettings, preset
from .probe import ProbeSet, classification_loss, default_loss_fn, lm_sequence_loss
from .provenance import FileIntegrityError, IdentityMismatchError
from .samples import loss_kernel
from .summary import SLTSummary

__version__ = "0.1.0"

__all__ = [
    # the callback, its option groups and the SLT numbers derived beside it
    "LossKernelCallback",
    "ProbeOptions",
    "KernelStorage",
    "DivergenceGuard",
    "SnapshotSchedule",
    "SLTSummary",
    # the result and the accumulator behind it
    "LossKernel",
    "KernelAccumulator",
    # the runners, and the devinterp 2.x twins
    "estimate_loss_kernel",
    "loss_kernel",
    "llc",
    "bif",
    "susceptibilities",
    "as_devinterp2_dataset",
    "devinterp2_evaluate",
    # the SGLD settings record and the paper's presets
    "SGLDSettings",
    "preset",
    "PAPER_PRESETS",
    # the probe protocol
    "ProbeSet",
    "classification_loss",
    "lm_sequence_loss",
    "default_loss_fn",
    # the errors
    "FileIntegrityError",
    "IdentityMismatchError",
    "KernelMemoryError",
]

# namespaces after the kernel, imported on first attribute access (plotting needs [plot],
# explore [explore]); `from devinterp_losskernel import analysis` works the same way
_SUBMODULES = ("analysis", "plotting", "explore", "hierarchy")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES))
