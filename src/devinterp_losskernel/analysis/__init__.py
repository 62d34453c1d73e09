"""Analyses of a loss kernel: pure functions of K̂ / R̂ (numpy or torch in, plain results out).

One module per question: :mod:`.fluctuation` (singular fluctuation, probe LLC),
:mod:`.memorization` (self-covariance as a detector), :mod:`.neighbours` (top-k correlated
samples), :mod:`.separation` (task separation), :mod:`.cka` (kernel alignment),
:mod:`.lift` (taxonomic and attribute lift against a :class:`~..hierarchy.Hierarchy`),
:mod:`.embedding` (UMAP of d = 1 − R̂ on a kNN graph without same-label edges).
Shared input checks live in :mod:`devinterp_losskernel.validation`. Import every analysis from
here (``from devinterp_losskernel.analysis import memorization_scores``); the functions that
return tables (``taxonomic_lift``, ``compare_kernels``, ``group_covariances``…) need pandas,
the ``[pandas]`` extra (devinterp brings it).

>>> import numpy as np
>>> from devinterp_losskernel.analysis import detection_auc, memorization_scores
>>> K = np.diag([0.1, 0.2, 3.0, 0.1])              # [n, n] covariance: sample 2 varies most
>>> memorization_scores(K)
array([0.1, 0.2, 3. , 0.1])
>>> detection_auc(memorization_scores(K), [False, False, True, False])
1.0
"""

from .cka import cka, cka_convergence, compare_kernels
from .embedding import Embedding, aligned_umap_embeddings, kernel_knn_graph, umap_embedding
from .fluctuation import SingularFluctuation, probe_llc, singular_fluctuation
from .lift import (
    AttributeLift,
    attribute_lift,
    color_groups,
    correlation_by_tree_distance,
    farthest_point_sampling,
    mean_colors,
    taxonomic_lift,
)
from .memorization import (
    LABEL_ISSUE_SCORES,
    detection_auc,
    label_issue_scores,
    mean_self_covariance,
    memorization_scores,
    roc_curve,
)
from .neighbours import TiedNeighboursWarning, top_correlated
from .separation import GroupCovariances, PC1Separation, group_covariances, pc1_separation

__all__ = [
    # fluctuation
    "SingularFluctuation",
    "probe_llc",
    "singular_fluctuation",
    # memorization
    "LABEL_ISSUE_SCORES",
    "detection_auc",
    "label_issue_scores",
    "mean_self_covariance",
    "memorization_scores",
    "roc_curve",
    # neighbours
    "TiedNeighboursWarning",
    "top_correlated",
    # separation
    "GroupCovariances",
    "PC1Separation",
    "group_covariances",
    "pc1_separation",
    # cka
    "cka",
    "cka_convergence",
    "compare_kernels",
    # lift
    "AttributeLift",
    "attribute_lift",
    "color_groups",
    "correlation_by_tree_distance",
    "farthest_point_sampling",
    "mean_colors",
    "taxonomic_lift",
    # embedding
    "Embedding",
    "aligned_umap_embeddings",
    "kernel_knn_graph",
    "umap_embedding",
]
