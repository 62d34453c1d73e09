"""The loss kernel over training (paper, Appendix D.5, Fig. 8), on the Fashion-MNIST CNN.

The paper samples the kernel of Inception-v1 at several training checkpoints with the same
SGLD settings and the same probe, embeds each with the same UMAP hyperparameters (aligned
across checkpoints), and watches structure appear coarse-to-fine. Here the same on the
small CNN of :mod:`.fashion_wordnet`: one training run whose weights are kept at a few
steps (:func:`train_with_checkpoints`), one kernel per checkpoint
(:func:`development_kernels`), and numbers that show the structure emerging
(:func:`structure_numbers`, :func:`consecutive_cka`).

Without the Fashion-MNIST files, :func:`load_development_data` falls back to
scikit-learn's bundled 8×8 digits (no hierarchy: the WordNet numbers are then left out).

``tutorials/04_development.ipynb`` uses this module; the notebook as one call:
``python -m losskernel_examples.development --scale cpu``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from ._scale import SamplingScale
from .fashion_mnist import FashionMNISTNotFound
from .fashion_wordnet import (
    FashionData,
    FashionScale,
    SmallCNN,
    accuracy,
    balanced_probe,
    group_neighbour_lift,
    load_fashion_data,
    mean_correlation_by_branch,
    sample_kernel,
    top_level_groups,
    train_cnn,
)

__all__ = [
    "DIGITS_EPOCHS",
    "DevelopmentScale",
    "SCALES",
    "consecutive_cka",
    "development_kernels",
    "knn_label_purity",
    "load_development_data",
    "load_digits_data",
    "run_development",
    "structure_numbers",
    "train_with_checkpoints",
]


@dataclass(frozen=True, kw_only=True)
class DevelopmentScale(SamplingScale):
    """Sizes of one development run: training (``num_train`` images, ``epochs``), the
    checkpoints kept (optimiser steps; 0 = the initialisation; the last must be the end of
    training), the probe and the SGLD settings, the same at every checkpoint."""

    num_train: Optional[int]
    epochs: float
    checkpoint_steps: Tuple[int, ...]
    note: str = ""

    def kernel_scale(self) -> FashionScale:
        """The :class:`~.fashion_wordnet.FashionScale` that :func:`~.fashion_wordnet.sample_kernel` takes."""
        return FashionScale(**{f.name: getattr(self, f.name) for f in fields(FashionScale)})


# the SGLD settings of tutorial 03b (see fashion_wordnet._SGLD), unchanged at every checkpoint
_SGLD = dict(lr=5e-5, nbeta=100.0, localization=10_000.0)

SCALES: Dict[str, DevelopmentScale] = {
    # 12,000 images, batch 128: 94 steps per epoch
    "ci": DevelopmentScale(num_train=12_000, epochs=2, checkpoint_steps=(0, 40, 188), num_probe=300,
                           num_chains=2, num_draws=80, num_burnin_steps=30, num_steps_bw_draws=2,
                           batch_size=128, **_SGLD, note="test suite: three checkpoints"),
    # 60,000 images: 469 steps per epoch
    "cpu": DevelopmentScale(num_train=None, epochs=2, checkpoint_steps=(0, 20, 100, 938), num_probe=500,
                            num_chains=2, num_draws=100, num_burnin_steps=50, num_steps_bw_draws=2,
                            batch_size=128, **_SGLD, note="the tutorial's default without a GPU"),
    "paper": DevelopmentScale(num_train=None, epochs=5, checkpoint_steps=(0, 10, 30, 100, 300, 1000, 2345),
                              num_probe=5000, num_chains=8, num_draws=500, num_burnin_steps=100,
                              num_steps_bw_draws=2, batch_size=128, **_SGLD, note="GPU"),
}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
#: epochs of the digits fallback (its 1,297 training images give 11 steps per epoch)
DIGITS_EPOCHS = 30


def load_digits_data(num_test: int = 500, seed: int = 0) -> FashionData:
    """scikit-learn's bundled 8×8 digits (1,797 images, no download) in the form of
    :class:`~.fashion_wordnet.FashionData`: a random ``num_test`` images held out."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    test, train = np.sort(order[:num_test]), np.sort(order[num_test:])
    x = torch.from_numpy(images).float().div_(255.0)
    x = ((x - x.mean()) / x.std()).unsqueeze(1)
    return FashionData(train_x=x[train], train_y=torch.from_numpy(labels[train]),
                       test_x=x[test], test_y=torch.from_numpy(labels[test]), raw_test=images[test],
                       class_names=tuple(str(d) for d in range(10)), source="scikit-learn digits (8×8)")


def load_development_data(num_train: Optional[int] = None, *, dataset: str = "auto", seed: int = 0
                          ) -> FashionData:
    """Fashion-MNIST (``dataset="fashion"``), scikit-learn's digits (``"digits"``), or
    Fashion-MNIST if its files are here and the digits with a warning if not (``"auto"``)."""
    if dataset not in ("auto", "fashion", "digits"):
        raise ValueError(f"dataset must be 'auto', 'fashion' or 'digits', got {dataset!r}")
    if dataset != "digits":
        try:
            return load_fashion_data(num_train, seed=seed)
        except FashionMNISTNotFound as error:
            if dataset == "fashion":
                raise
            warnings.warn(f"{error}\nFalling back to scikit-learn's 8×8 digits (no WordNet hierarchy).",
                          stacklevel=2)
    return load_digits_data(seed=seed)


# ---------------------------------------------------------------------------------------------
# Checkpoints and kernels
# ---------------------------------------------------------------------------------------------
def train_with_checkpoints(data: FashionData, cfg: DevelopmentScale, *, seed: int = 0, verbose: bool = False
                           ) -> Tuple[Dict[int, nn.Module], Any]:
    """Train the CNN once and return ({step: model at that step}, the TrainResult).

    The digits fallback (1,297 training images, 11 steps per epoch) trains for
    :data:`DIGITS_EPOCHS` epochs instead of ``cfg.epochs``; ``cfg.checkpoint_steps`` beyond
    the run's last step are clipped to it."""
    epochs = cfg.epochs if data.source == "Fashion-MNIST" else DIGITS_EPOCHS
    steps_per_epoch = -(-len(data.train_y) // 128)
    total = max(1, int(round(epochs * steps_per_epoch)))
    steps = sorted({min(int(s), total) for s in cfg.checkpoint_steps} | {total})
    result = train_cnn(data.train_x, data.train_y, epochs=epochs, seed=seed, snapshot_steps=steps,
                       log_every=max(1, total // 4), verbose=verbose)
    models = {}
    for step in steps:
        model = SmallCNN(image_size=data.train_x.shape[-1])
        model.load_state_dict(result.snapshots[step])
        models[step] = model.eval()
    return models, result


def development_kernels(models: Dict[int, nn.Module], data: FashionData, probe_index: np.ndarray,
                        cfg: DevelopmentScale, *, seed: int = 0, device=None, verbose: bool = False
                        ) -> Dict[int, Any]:
    """One loss kernel per checkpoint: the same probe, SGLD settings and chain seeds."""
    scale = cfg.kernel_scale()
    return {step: sample_kernel(model, data, probe_index, scale, seed=seed, device=device, verbose=verbose)
            for step, model in models.items()}


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------
def knn_label_purity(kernel: Any, labels: Any, k: int = 10) -> float:
    """Share of each sample's k most correlated probe samples (any label) that share its
    label, averaged. Careful: same-label losses co-vary even in an untrained network (noise
    in the unembedding, Appendix B), so this is high from the start."""
    from devinterp_losskernel.analysis import top_correlated

    labels = np.asarray(labels)
    neighbours, _ = top_correlated(kernel, None, k)
    return float((labels[neighbours] == labels[:, None]).mean())


def structure_numbers(kernel: Any, labels: Any, groups: Optional[Any] = None, *, k: int = 10) -> Dict[str, float]:
    """Numbers of one checkpoint's kernel.

    - ``knn_label_purity``: :func:`knn_label_purity` (confounded by the label, see there);
    - with ``groups`` (e.g. clothing / footwear / bag): ``branch_lift`` (pooled) and
      ``branch_lift/<group>`` — the same-branch rate of the k most correlated
      *different-label* samples over chance (:func:`~.fashion_wordnet.group_neighbour_lift`),
      and ``mean_R/within_minus_across`` over different-label pairs;
    - ``probe_loss/at_w_star``, ``probe_loss/mean_over_draws`` for a LossKernel.
    """
    labels = np.asarray(labels)
    numbers = {"knn_label_purity": knn_label_purity(kernel, labels, k)}
    if groups is not None:
        lift = group_neighbour_lift(kernel, groups, labels, k=k)
        numbers["branch_lift"] = float(lift.pooled_lift)
        for group, value in lift.per_group["lift"].items():
            if np.isfinite(value):
                numbers[f"branch_lift/{group}"] = float(value)
        by_branch = mean_correlation_by_branch(kernel, groups, labels)
        numbers["mean_R/within_minus_across"] = by_branch["within_minus_across"]
    if hasattr(kernel, "init_loss"):
        numbers["probe_loss/at_w_star"] = float(kernel.init_loss.mean())
        numbers["probe_loss/mean_over_draws"] = float(kernel.mean.mean())
    return numbers


def consecutive_cka(kernels: Dict[int, Any], *, use: str = "correlation") -> List[Tuple[int, int, float]]:
    """CKA between the kernels of consecutive checkpoints: [(step_a, step_b, CKA)]."""
    from devinterp_losskernel.analysis import cka

    steps = sorted(kernels)
    return [(a, b, cka(kernels[a], kernels[b], use=use)) for a, b in zip(steps[:-1], steps[1:])]


# ---------------------------------------------------------------------------------------------
# The notebook as one call
# ---------------------------------------------------------------------------------------------
def run_development(scale: Union[str, DevelopmentScale] = "cpu", *, seed: int = 0, device=None,
                    dataset: str = "auto", k: int = 10, verbose: bool = True) -> Dict[str, Any]:
    """Train with checkpoints, sample a kernel at each, and return ``{"kernels", "numbers"
    (one dict per step), "cka", "probe_index", "labels", "groups", "data", "seconds"}``."""
    cfg = SCALES[scale] if isinstance(scale, str) else scale
    started = time.perf_counter()
    data = load_development_data(cfg.num_train, dataset=dataset, seed=seed)
    models, trained = train_with_checkpoints(data, cfg, seed=seed, verbose=verbose)
    probe_index = balanced_probe(data.test_y.numpy(), min(cfg.num_probe, len(data.test_y)), seed=seed)
    labels = data.test_y.numpy()[probe_index]
    groups = None
    if data.source == "Fashion-MNIST":
        from devinterp_losskernel.hierarchy import fashion_mnist_hierarchy

        groups = top_level_groups(fashion_mnist_hierarchy(), labels)
    kernels = {}
    for step, model in models.items():
        tick = time.perf_counter()
        kernels[step] = development_kernels({step: model}, data, probe_index, cfg, seed=seed, device=device)[step]
        if verbose:
            print(f"step {step}: kernel in {time.perf_counter() - tick:.0f} s", flush=True)
    numbers = {}
    for step, kernel in kernels.items():
        numbers[step] = {"test_accuracy": accuracy(models[step], data.test_x, data.test_y),
                         **structure_numbers(kernel, labels, groups, k=k)}
    return {"kernels": kernels, "numbers": numbers, "cka": consecutive_cka(kernels),
            "probe_index": probe_index, "labels": labels, "groups": groups, "data": data,
            "train_seconds": trained.seconds, "seconds": time.perf_counter() - started}


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m losskernel_examples.development --scale {ci,cpu,paper}``"""
    import argparse

    import pandas as pd

    parser = argparse.ArgumentParser(prog="python -m losskernel_examples.development")
    parser.add_argument("--scale", default="cpu", choices=sorted(SCALES))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", default="auto", choices=("auto", "fashion", "digits"))
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_development(args.scale, seed=args.seed, device=args.device, dataset=args.dataset)
    print(pd.DataFrame(result["numbers"]).T.round(4).to_string())
    print("consecutive CKA (correlation):", [(a, b, round(c, 3)) for a, b, c in result["cka"]])
    print(f"total {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
