"""Fashion-MNIST and WordNet on a CPU: the paper's Section 4 pipeline at small scale.

The paper samples the loss kernel of Inception-v1 on 10,000 ImageNet validation images and
reads it against the WordNet hierarchy (UMAP, hierarchy-sorted correlation, taxonomic lift,
top-k neighbours). Here the same pipeline runs on real images a laptop can handle: a small
CNN trained on Fashion-MNIST (Debian's ``dataset-fashion-mnist``, read by
:mod:`.fashion_mnist`, nothing downloaded), its ten classes placed in WordNet by
:func:`~devinterp_losskernel.hierarchy.fashion_mnist_hierarchy` (clothing / footwear / bag),
a probe of held-out test images, and :func:`~devinterp_losskernel.estimate_loss_kernel`.

What lives here (``tutorials/03b_fashion_mnist_wordnet.ipynb`` uses it; so does
:mod:`.development` for the checkpoints of tutorial 04):

- data: :func:`load_fashion_data` (normalised tensors), :func:`balanced_probe`;
- the model: :class:`SmallCNN` (two conv layers, 26,698 parameters) and :func:`train_cnn`
  (Adam, seeded, optional snapshots of the weights at given steps);
- the SGLD settings per scale (:data:`SCALES`) and :func:`sample_kernel`;
- the numbers the tutorial reads: :func:`top_level_groups` (each class's branch at the
  depth where WordNet splits clothing / footwear / bag), :func:`group_neighbour_lift`
  (same-branch rate of a sample's different-label kernel neighbours over chance) and
  :func:`mean_correlation_by_branch`;
- :func:`run_fashion_wordnet`: the notebook as one call
  (``python -m losskernel_examples.fashion_wordnet --scale cpu``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ._metrics import accuracy
from ._scale import SamplingScale
from .fashion_mnist import CLASS_NAMES, load_fashion_mnist

__all__ = [
    "CLASS_NAMES",
    "FashionData",
    "FashionScale",
    "SCALES",
    "SmallCNN",
    "TrainResult",
    "accuracy",
    "balanced_probe",
    "group_neighbour_lift",
    "load_fashion_data",
    "mean_correlation_by_branch",
    "run_fashion_wordnet",
    "sample_kernel",
    "split_depth",
    "top_level_groups",
    "train_cnn",
    "training_loader",
]

# mean and standard deviation of Fashion-MNIST training pixels (in [0, 1])
_MEAN, _STD = 0.2860, 0.3530


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
@dataclass
class FashionData:
    """Normalised images [N, 1, H, W] (float32) and labels [N] (int64) of both splits.

    ``raw_test`` keeps the uint8 test images for display (top-k grids).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    raw_test: np.ndarray
    class_names: Tuple[str, ...] = CLASS_NAMES
    source: str = "Fashion-MNIST"


def _normalise(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    return x.sub_(_MEAN).div_(_STD).unsqueeze(1)


def _subset(labels: np.ndarray, count: Optional[int], seed: int) -> np.ndarray:
    """``count`` indices drawn at random (all, in order, when None or ≥ len)."""
    if count is None or count >= len(labels):
        return np.arange(len(labels))
    return np.sort(np.random.default_rng(seed).choice(len(labels), size=count, replace=False))


def load_fashion_data(num_train: Optional[int] = None, *, root=None, seed: int = 0) -> FashionData:
    """Fashion-MNIST from local IDX files (see :func:`.fashion_mnist.find_fashion_mnist`).

    Args:
        num_train: use a random subset of this many training images (None: all 60,000).
        root: folder with the IDX files (default: ``$LOSSKERNEL_FASHION_MNIST_DIR``, then
            ``/usr/share/datasets/fashion-mnist``).

    Raises:
        FashionMNISTNotFound: the files are missing (the message says how to install them).
    """
    train_images, train_labels = load_fashion_mnist(root, "train")
    test_images, test_labels = load_fashion_mnist(root, "test")
    keep = _subset(train_labels, num_train, seed)
    return FashionData(
        train_x=_normalise(train_images[keep]), train_y=torch.from_numpy(train_labels[keep]),
        test_x=_normalise(test_images), test_y=torch.from_numpy(test_labels),
        raw_test=test_images,
    )


def balanced_probe(labels: Any, num_probe: int, seed: int = 0) -> np.ndarray:
    """``num_probe`` indices, the same number from every class (as near as divisible),
    drawn at random without replacement, sorted by class then index."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if num_probe < len(classes):
        raise ValueError(f"num_probe must be at least the number of classes ({len(classes)}), got {num_probe}")
    rng = np.random.default_rng(seed)
    per_class = [num_probe // len(classes) + (i < num_probe % len(classes)) for i in range(len(classes))]
    chosen = []
    for c, count in zip(classes, per_class):
        pool = np.flatnonzero(labels == c)
        if count > len(pool):
            raise ValueError(f"class {c} has {len(pool)} samples, fewer than the {count} asked for")
        chosen.append(np.sort(rng.choice(pool, size=count, replace=False)))
    return np.concatenate(chosen)


class _TensorBatches(TensorDataset):
    """A TensorDataset a DataLoader reads one whole batch at a time (no per-sample collate)."""

    def __getitems__(self, indices):
        index = torch.as_tensor(indices)
        return tuple(t[index] for t in self.tensors)


def _identity(batch):
    return batch


def training_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, seed: Optional[int] = None
                    ) -> DataLoader:
    """Shuffled minibatches ``(images, labels)`` (the SGLD and training batches)."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(_TensorBatches(x, y), batch_size=batch_size, shuffle=True,
                      collate_fn=_identity, generator=generator)


# ---------------------------------------------------------------------------------------------
# Model and training
# ---------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    """conv(3×3, c₁) → ReLU → max-pool 2 → conv(3×3, c₂) → ReLU → max-pool 2 → linear(h)
    → ReLU → linear(10). With the defaults (8, 16, 32) and 28×28 inputs: 26,698 parameters
    (≈ 0.1 MB in float32)."""

    def __init__(self, channels: Tuple[int, int] = (8, 16), hidden: int = 32, num_classes: int = 10,
                 image_size: int = 28):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        side = image_size // 2 // 2
        self.classifier = nn.Sequential(nn.Linear(c2 * side * side, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass
class TrainResult:
    """The trained model, its training curve and (optionally) weight snapshots.

    Attributes:
        model: the network after the last step.
        history: one dict per logged step: ``step``, ``epoch``, ``train_loss`` (mean over the
            steps since the last log) and ``test_accuracy`` (on ``eval_x``/``eval_y``).
        snapshots: {step: state_dict (CPU copies)} for the steps asked for (0 = the
            initialisation, before any update).
        seconds: wall time of the training loop.
    """

    model: nn.Module
    history: List[Dict[str, float]]
    snapshots: Dict[int, Dict[str, torch.Tensor]] = field(default_factory=dict)
    seconds: float = 0.0


def train_cnn(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: float = 2.0,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    model: Optional[nn.Module] = None,
    snapshot_steps: Sequence[int] = (),
    eval_x: Optional[torch.Tensor] = None,
    eval_y: Optional[torch.Tensor] = None,
    log_every: int = 100,
    verbose: bool = False,
) -> TrainResult:
    """Train a :class:`SmallCNN` (or ``model``) with Adam on ``(x, y)``; deterministic given ``seed``.

    Args:
        epochs: passes over the data; fractional values stop part-way (``epochs=0.1`` = the
            first tenth of an epoch's steps).
        snapshot_steps: optimiser steps at which to keep a copy of the weights (0 = before
            the first update); the last step is always available as ``result.model``.
        eval_x, eval_y: held-out data for the test accuracy in the history.
    """
    torch.manual_seed(seed)
    if model is None:
        model = SmallCNN(image_size=x.shape[-1])
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = -(-len(x) // batch_size)
    total = max(1, int(round(epochs * steps_per_epoch)))
    wanted = sorted({int(s) for s in snapshot_steps})
    if wanted and (wanted[0] < 0 or wanted[-1] > total):
        raise ValueError(f"snapshot_steps must lie in 0 … {total} (the run's steps), got {wanted}")
    snapshots: Dict[int, Dict[str, torch.Tensor]] = {}

    def snap(step):
        if step in wanted:
            snapshots[step] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    history: List[Dict[str, float]] = []
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    step, running, count = 0, 0.0, 0
    snap(0)
    model.train()
    while step < total:
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            index = order[start:start + batch_size]
            loss = F.cross_entropy(model(x[index]), y[index])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            step += 1
            running += float(loss.detach())
            count += 1
            snap(step)
            if step % log_every == 0 or step == total:
                entry = {"step": step, "epoch": step / steps_per_epoch, "train_loss": running / count}
                if eval_x is not None:
                    entry["test_accuracy"] = accuracy(model, eval_x, eval_y)
                history.append(entry)
                running, count = 0.0, 0
                if verbose:
                    print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in entry.items()), flush=True)
            if step >= total:
                break
    model.eval()
    return TrainResult(model=model, history=history, snapshots=snapshots,
                       seconds=time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class FashionScale(SamplingScale):
    """One run's sizes and SGLD settings (the paper's symbols: m, C, T, b, ε, nβ, γ).

    ``num_train`` training images (None: all 60,000) are used to train the CNN for
    ``epochs`` and as the SGLD data; the probe is ``num_probe`` test images, balanced over
    the classes.
    """

    num_train: Optional[int]
    epochs: float
    note: str = ""


# SGLD around the trained CNN (sweep at CI size, 2 chains × 100 draws, in tutorials/README.md,
# section 03b). ε = 1e-4, nβ = 20, γ = 1,000 (the paper's ImageNet nβ, a γ of its order) let
# the probe loss climb (0.55 → 0.63) and the different-label neighbours were no better than
# chance (branch lift 1.01). Tighter localisation kept the chains in the basin and gave the
# structure: γ = 10⁴ with nβ = 100 (lift 1.52), nβ = 300 (1.60), γ = 3·10⁴ (1.59). We use
# ε = 5e-5, nβ = 100, γ = 10⁴ (εγ/2 = 0.25: SGLD relaxes within a few steps).
_SGLD = dict(lr=5e-5, nbeta=100.0, localization=10_000.0)

SCALES: Dict[str, FashionScale] = {
    "ci": FashionScale(num_train=12_000, epochs=2, num_probe=500, num_chains=3, num_draws=80,
                       num_burnin_steps=50, num_steps_bw_draws=2, batch_size=128, **_SGLD,
                       note="test suite: under a minute of sampling on 2 CPU cores"),
    "cpu": FashionScale(num_train=None, epochs=2, num_probe=1000, num_chains=4, num_draws=150,
                        num_burnin_steps=100, num_steps_bw_draws=2, batch_size=128, **_SGLD,
                        note="the tutorial's default without a GPU: minutes on one CPU thread"),
    "paper": FashionScale(num_train=None, epochs=5, num_probe=10_000, num_chains=15, num_draws=500,
                          num_burnin_steps=100, num_steps_bw_draws=2, batch_size=256, **_SGLD,
                          note="the paper's probe size (10,000 held-out images) and C×T; GPU"),
}


def sample_kernel(model: nn.Module, data: FashionData, probe_index: np.ndarray, cfg: FashionScale, *,
                  seed: int = 0, device=None, verbose: bool = True, **kwargs):
    """The loss kernel of ``model`` over the test images ``probe_index``: SGLD on the
    training images with ``cfg``'s settings (a thin wrapper of
    :func:`~devinterp_losskernel.estimate_loss_kernel`; labels are the class indices)."""
    from devinterp_losskernel.estimate import estimate_loss_kernel

    index = torch.as_tensor(np.asarray(probe_index), dtype=torch.long)
    probe = (data.test_x[index], data.test_y[index])
    loader = training_loader(data.train_x, data.train_y, cfg.batch_size)
    return estimate_loss_kernel(
        model, loader, probe, **cfg.sampler_kwargs(), seed=seed, device=device,
        probe_batch_size=2048, sample_ids=index.tolist(), labels=data.test_y[index],
        probe_train_mask=False, verbose=verbose, **kwargs,
    )


# ---------------------------------------------------------------------------------------------
# Reading the kernel against the hierarchy
# ---------------------------------------------------------------------------------------------
def split_depth(hierarchy, labels: Any = range(10)) -> int:
    """The shallowest depth at which the labels' ancestors fall into more than one node:
    where the tree first splits them (WordNet: depth 5, commodity ⊃ clothing / covering ⊃
    footwear / instrumentality ⊃ bag; the hand-written fallback: depth 1)."""
    labels = list(labels)
    for depth in range(0, min(hierarchy.depth(hierarchy.node_of(label)) for label in labels) + 1):
        if len(set(hierarchy.ancestors_at_depth(labels, depth).tolist())) > 1:
            return depth
    raise ValueError("the labels all share every ancestor down to the shallowest label")


def top_level_groups(hierarchy, labels: Any, depth: Optional[int] = None) -> np.ndarray:
    """Each label's branch, named readably: the ancestor at ``depth`` (default
    :func:`split_depth`) as ``"clothing"`` / ``"footwear"`` / ``"bag"`` where it holds
    those classes, else the node's display name."""
    labels = np.asarray(labels)
    depth = split_depth(hierarchy, np.unique(labels)) if depth is None else depth
    nodes = hierarchy.ancestors_at_depth(labels, depth)
    readable = {}
    for node in set(nodes.tolist()):
        members = {CLASS_NAMES[int(label)] for label in np.unique(labels[nodes == node])
                   if isinstance(label, (int, np.integer))}
        if members and members <= {"Sandal", "Sneaker", "Ankle boot"}:
            readable[node] = "footwear"
        elif members and members <= {"Bag"}:
            readable[node] = "bag"
        elif members and members <= {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Shirt"}:
            readable[node] = "clothing"
        else:
            readable[node] = hierarchy.name(node)
    return np.array([readable[node] for node in nodes.tolist()])


def group_neighbour_lift(kernel: Any, groups: Any, labels: Any, k: int = 10):
    """:func:`~devinterp_losskernel.analysis.attribute_lift` with same-label pairs excluded:
    how much more often than chance a sample's k most correlated *different-label* probe
    samples are in its group. Returns the AttributeLift (``per_group``, ``pooled_lift``, …)."""
    from devinterp_losskernel.analysis import attribute_lift

    return attribute_lift(kernel, groups, k, labels=labels)


def mean_correlation_by_branch(kernel: Any, groups: Any, labels: Any) -> Dict[str, float]:
    """Mean R̂ over different-label pairs in the same branch, and across branches
    (``"within"``, ``"across"``, ``"within_minus_across"``)."""
    from devinterp_losskernel.validation import kernel_matrix

    R = kernel_matrix(kernel, "correlation")
    groups, labels = np.asarray(groups), np.asarray(labels)
    different = labels[:, None] != labels[None, :]
    same_group = groups[:, None] == groups[None, :]
    within = float(R[different & same_group].mean())
    across = float(R[different & ~same_group].mean())
    return {"within": within, "across": across, "within_minus_across": within - across}


# ---------------------------------------------------------------------------------------------
# The tutorial as one call
# ---------------------------------------------------------------------------------------------
def run_fashion_wordnet(scale: Union[str, FashionScale] = "cpu", *, seed: int = 0, device=None,
                        k: int = 30, verbose: bool = True) -> Dict[str, Any]:
    """Train the CNN, sample its loss kernel on a balanced probe of test images, and read it
    against the WordNet tree. Returns ``{"kernel", "model", "probe_index", "hierarchy",
    "lift" (taxonomic_lift DataFrame), "numbers" (flat, JSON-ready)}``."""
    from devinterp_losskernel.analysis import taxonomic_lift
    from devinterp_losskernel.hierarchy import fashion_mnist_hierarchy

    cfg = SCALES[scale] if isinstance(scale, str) else scale
    started = time.perf_counter()
    data = load_fashion_data(cfg.num_train, seed=seed)
    trained = train_cnn(data.train_x, data.train_y, epochs=cfg.epochs, seed=seed, verbose=False)
    model = trained.model
    probe_index = balanced_probe(data.test_y.numpy(), cfg.num_probe, seed=seed)
    labels = data.test_y.numpy()[probe_index]
    sampled_from = time.perf_counter()
    kernel = sample_kernel(model, data, probe_index, cfg, seed=seed, device=device, verbose=verbose)
    sampled = time.perf_counter()
    hierarchy = fashion_mnist_hierarchy()
    lift = taxonomic_lift(kernel, labels, hierarchy, k=k)
    groups = top_level_groups(hierarchy, labels)
    branch = group_neighbour_lift(kernel, groups, labels, k=k)
    numbers = {
        "scale": asdict(cfg),
        "hierarchy": hierarchy.source,
        "train_seconds": trained.seconds,
        "test_accuracy": accuracy(model, data.test_x, data.test_y),
        "num_probe": int(kernel.num_samples),
        "num_draws": int(kernel.num_draws),
        "probe_loss/at_w_star": float(kernel.init_loss.mean()),
        "probe_loss/mean_over_draws": float(kernel.mean.mean()),
        "branch_lift/pooled": branch.pooled_lift,
        **{f"branch_lift/{g}": float(v) for g, v in branch.per_group["lift"].items()},
        **{f"mean_R/{key}": v for key, v in mean_correlation_by_branch(kernel, groups, labels).items()},
        "llc/mean": kernel.metadata.get("llc/mean"),
        "seconds/sampling": sampled - sampled_from,
        "seconds/total": time.perf_counter() - started,
    }
    return {"kernel": kernel, "model": model, "probe_index": probe_index, "hierarchy": hierarchy,
            "lift": lift, "numbers": numbers, "data": data}


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m losskernel_examples.fashion_wordnet --scale {ci,cpu,paper}``"""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m losskernel_examples.fashion_wordnet")
    parser.add_argument("--scale", default="cpu", choices=sorted(SCALES))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_fashion_wordnet(args.scale, seed=args.seed, device=args.device)
    print(result["lift"].round(3).to_string())
    print(json.dumps(result["numbers"], indent=2, default=str))


if __name__ == "__main__":
    main()
