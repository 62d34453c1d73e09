"""devinterp-losskernel: the loss kernel K(x, x') = Cov_w[ℓ(x; w), ℓ(x'; w)] under SGLD.

Pipeline: probe losses (:mod:`.probe`) → streaming accumulation (:mod:`.accumulator`, its
identity and verified files in :mod:`.provenance`) →
the kernel result (:mod:`.kernel`), driven by the devinterp callback (:mod:`.callback`) or
the one-call :func:`estimate_loss_kernel` (:mod:`.estimate`) → analyses (:mod:`.analysis`)
→ figures (:mod:`.plotting`, imported on demand so that the package does not load matplotlib)
and the interactive kernel explorer (:func:`explore`, loaded on first use; Bokeh only when it writes).
"""

from .analysis import (
    aligned_umap_embeddings,
    attribute_lift,
    cka,
    cka_convergence,
    color_groups,
    compare_kernels,
    detection_auc,
    group_covariances,
    label_issue_scores,
    mean_self_covariance,
    memorization_scores,
    pc1_separation,
    probe_llc,
    singular_fluctuation,
    taxonomic_lift,
    top_correlated,
    umap_embedding,
)
from .accumulator import KernelAccumulator, KernelMemoryError, estimate_kernel_memory
from .callback import LossKernelCallback
from .summary import SLTSummary
from .options import DivergenceGuard, KernelStorage, ProbeOptions, SnapshotSchedule
from .provenance import FileIntegrityError, IdentityMismatchError, KernelIdentity
from .estimate import estimate_loss_kernel
from .devinterp2 import as_devinterp2_dataset, devinterp2_evaluate, llc
from .samples import kernel_from_samples, loss_kernel
from .hierarchy import Hierarchy, fashion_mnist_hierarchy, imagenet_wnids, wordnet_imagenet
from .kernel import LossKernel, correlation_from_covariance
from .presets import PAPER_PRESETS, SGLDSettings, preset
from .probe import (
    ProbeSet,
    classification_loss,
    default_loss_fn,
    evaluate_probe_losses,
    lm_sequence_loss,
)

__version__ = "0.1.0"


def __getattr__(name):
    # explore (the kernel explorer) is loaded on first use; it imports Bokeh only when it writes a page
    if name == "explore":
        import importlib

        return importlib.import_module(".explore", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "aligned_umap_embeddings",
    "attribute_lift",
    "cka",
    "cka_convergence",
    "color_groups",
    "compare_kernels",
    "detection_auc",
    "group_covariances",
    "label_issue_scores",
    "mean_self_covariance",
    "memorization_scores",
    "pc1_separation",
    "probe_llc",
    "singular_fluctuation",
    "taxonomic_lift",
    "top_correlated",
    "umap_embedding",
    "Hierarchy",
    "fashion_mnist_hierarchy",
    "imagenet_wnids",
    "wordnet_imagenet",
    "DivergenceGuard",
    "FileIntegrityError",
    "IdentityMismatchError",
    "KernelAccumulator",
    "KernelIdentity",
    "KernelStorage",
    "ProbeOptions",
    "SnapshotSchedule",
    "KernelMemoryError",
    "LossKernel",
    "LossKernelCallback",
    "SLTSummary",
    "PAPER_PRESETS",
    "ProbeSet",
    "SGLDSettings",
    "classification_loss",
    "correlation_from_covariance",
    "default_loss_fn",
    "estimate_kernel_memory",
    "estimate_loss_kernel",
    "evaluate_probe_losses",
    "explore",
    "kernel_from_samples",
    "llc",
    "as_devinterp2_dataset",
    "devinterp2_evaluate",
    "lm_sequence_loss",
    "loss_kernel",
    "preset",
]
