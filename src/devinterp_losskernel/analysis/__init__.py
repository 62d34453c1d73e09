"""Analyses of a loss kernel: pure functions of K̂ / R̂ (numpy or torch in, plain results out).

One module per question: :mod:`.fluctuation` (singular fluctuation, probe LLC),
:mod:`.memorization` (self-covariance as a detector), :mod:`.neighbours` (top-k correlated
samples), :mod:`.separation` (task separation), :mod:`.cka` (kernel alignment).
Shared input checks live in :mod:`._validate`.
"""

from .cka import cka, cka_convergence, compare_kernels
from .fluctuation import SingularFluctuation, probe_llc, singular_fluctuation
from .memorization import detection_auc, mean_self_covariance, memorization_scores, roc_curve
from .neighbours import top_correlated
from .separation import GroupCovariances, PC1Separation, group_covariances, pc1_separation

