"""Memorization (paper, Appendix D.4): find relabelled training samples with K(x, x).

A classifier is trained to convergence on real images with a random subset of the training
labels changed; to fit those it must memorize them, and memorized samples sit in a sharper
basin: their loss varies more under the local posterior, so the per-sample loss variance
K(x, x) = Var_w[ℓ(x; w)] flags them.

Everything the tutorial (``tutorials/02_memorization.ipynb``) needs lives here:

- the data (:func:`load_images`, :func:`relabel`, :func:`memorization_data`): Fashion-MNIST
  from Debian's ``dataset-fashion-mnist`` (see :mod:`.fashion_mnist`), in Colab optionally
  torchvision's download, else scikit-learn's bundled digits;
- the model and its training to memorization (:func:`make_mlp`, :func:`train_to_memorization`);
- the scores a user would otherwise reach for, on the same model: the loss at w*
  (:func:`loss_at_w_star`), the per-sample gradient norm (:func:`per_sample_grad_norm`),
  Kronfluence's EK-FAC self-influence (:func:`ekfac_self_influence`) and captum's TracInCP
  self-influence (:func:`tracin_self_influence`); the last two need the optional packages
  and raise :class:`MissingOptionalDependency` without them;
- the whole experiment as one call (:func:`run_memorization`), returning the comparison
  table (ROC-AUC and wall time per score) and the kernel.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from devinterp_losskernel.presets import SGLDSettings

from ._scale import sampler_kwargs
from .fashion_mnist import FashionMNISTNotFound, load_fashion_mnist

__all__ = [
    "MemorizationConfig",
    "MemorizationData",
    "MemorizationResult",
    "MissingOptionalDependency",
    "SCALES",
    "TrainedModel",
    "ekfac_self_influence",
    "get_config",
    "load_images",
    "loss_at_w_star",
    "knn_share",
    "make_mlp",
    "memorization_data",
    "per_sample_grad_norm",
    "plot_detector_rocs",
    "pool_images",
    "relabel",
    "run_memorization",
    "sample_kernel",
    "sample_kernel_and_predictive",
    "score_table",
    "tracin_self_influence",
    "train_to_memorization",
]


class MissingOptionalDependency(ImportError):
    """An optional attribution library (kronfluence, captum) is not installed."""


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemorizationConfig:
    """Sizes and settings of the experiment (``SCALES["full"]`` / ``SCALES["ci"]``).

    Data: ``num_train`` training images of ``dataset`` ("fashion_mnist", "digits" or "auto":
    Fashion-MNIST if its files are here, else digits), ``flip_fraction`` of them relabelled,
    average-pooled over ``pool`` × ``pool`` pixel blocks (``pool=2``: 28×28 → 14×14; the CI
    scale uses it to keep EK-FAC's 785×785 input-side eigenbasis out of a 2-minute test;
    Fashion-MNIST only, the 8×8 digits are never pooled).
    Model: an MLP with ``depth`` hidden layers of ``hidden`` units, trained with Adam
    (``train_lr``, ``train_batch_size``) for ``train_epochs`` epochs, the last of which fit
    every (noisy) training label. SGLD: devinterp's SGLD with ``lr`` = ε, ``nbeta`` = nβ,
    ``localization`` = γ, minibatch ``sgld_batch_size``; the probe is the whole training set.
    """

    dataset: str = "auto"
    num_train: int = 5000
    flip_fraction: float = 0.1
    pool: int = 1
    hidden: int = 512
    depth: int = 2
    train_epochs: int = 120
    train_lr: float = 1e-3
    train_schedule: str = "cosine"
    train_batch_size: int = 128
    tracin_checkpoints: int = 5
    num_chains: int = 8
    num_draws: int = 1000
    num_burnin_steps: int = 100
    num_steps_bw_draws: int = 1
    lr: float = 3e-4
    nbeta: float = 100.0
    localization: float = 200.0
    sgld_batch_size: int = 256
    seed: int = 0

    def __post_init__(self):
        self.sgld  # refuse bad SGLD values when the config is made

    @property
    def sgld(self) -> "SGLDSettings":
        """The SGLD arguments as the one validated record (minibatch ``sgld_batch_size``)."""
        return SGLDSettings.from_config(self, batch_size=self.sgld_batch_size, seed=self.seed)


SCALES: Dict[str, MemorizationConfig] = {
    "full": MemorizationConfig(),
    # 1,000 images pooled to 14×14, a narrower MLP (3e-3 to memorize in 100 epochs): a 2-minute test
    "ci": MemorizationConfig(num_train=1000, pool=2, hidden=256, train_epochs=100, train_lr=3e-3,
                             num_chains=2, num_draws=100, num_burnin_steps=50, localization=300.0,
                             tracin_checkpoints=3),
}


# the other tutorials' scale names: this experiment has no separate paper-size run
_SCALE_ALIASES = {"cpu": "full", "paper": "full"}


def get_config(scale: Union[str, MemorizationConfig, None] = None, **overrides) -> MemorizationConfig:
    """``SCALES[scale]`` (default: ``$LOSSKERNEL_TUTORIAL_SCALE`` or "full"; "cpu" and "paper"
    mean "full") with overrides."""
    if isinstance(scale, MemorizationConfig):
        cfg = scale
    else:
        scale = scale or os.environ.get("LOSSKERNEL_TUTORIAL_SCALE", "full")
        scale = _SCALE_ALIASES.get(scale, scale)
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {sorted(SCALES)} or a MemorizationConfig, got {scale!r}")
        cfg = SCALES[scale]
    return replace(cfg, **overrides) if overrides else cfg


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def _in_colab() -> bool:
    return "google.colab" in sys.modules


def _torchvision_fashion_mnist(root: str) -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST through torchvision, downloading into ``root`` (Colab only by default)."""
    from torchvision.datasets import FashionMNIST

    ds = FashionMNIST(root, train=True, download=True)
    return ds.data.numpy(), ds.targets.numpy().astype(np.int64)


def load_images(dataset: str = "auto", *, root: Optional[str] = None,
                allow_download: Optional[bool] = None, verbose: bool = True
                ) -> Tuple[np.ndarray, np.ndarray, str]:
    """Training images, flattened to float32 [N, d] in [0, 1], labels int64 [N], and the name.

    Args:
        dataset: "fashion_mnist" (local IDX files; an error says how to install them),
            "digits" (scikit-learn's bundled 8×8 digits), or "auto": Fashion-MNIST from the
            local files; failing that, torchvision's download where downloads are allowed;
            failing that, digits, with a printed note.
        root: a folder with the Fashion-MNIST IDX files (default: ``$LOSSKERNEL_FASHION_MNIST_DIR``,
            then ``/usr/share/datasets/fashion-mnist``).
        allow_download: let "auto" fall back to torchvision's FashionMNIST download (into
            ``./data``). Default: only in Google Colab. Never used for "fashion_mnist".
    """
    if dataset not in ("auto", "fashion_mnist", "digits"):
        raise ValueError(f"dataset must be 'auto', 'fashion_mnist' or 'digits', got {dataset!r}")
    say = print if verbose else (lambda *a, **k: None)
    if dataset in ("auto", "fashion_mnist"):
        try:
            images, labels = load_fashion_mnist(root)
            return images.reshape(len(images), -1).astype(np.float32) / 255.0, labels, "fashion_mnist"
        except FashionMNISTNotFound as error:
            if dataset == "fashion_mnist":
                raise
            missing = error
        if allow_download if allow_download is not None else _in_colab():
            try:
                images, labels = _torchvision_fashion_mnist("data")
                say("Fashion-MNIST: downloaded with torchvision into ./data")
                return images.reshape(len(images), -1).astype(np.float32) / 255.0, labels, "fashion_mnist"
            except Exception as error:  # no torchvision, no network, …
                say(f"torchvision's FashionMNIST download failed ({type(error).__name__}: {error})")
        say(f"NOTE: {missing}\nFalling back to scikit-learn's bundled digits (1,797 8x8 images); "
            "the numbers below are then for digits, not Fashion-MNIST.")
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64), "digits"


def relabel(labels: Any, fraction: float, num_classes: Optional[int] = None, seed: int = 0
            ) -> Tuple[np.ndarray, np.ndarray]:
    """Change the labels of a random ``fraction`` of samples to a different class.

    Exactly ``round(fraction * n)`` samples are chosen without replacement; each gets a
    label drawn uniformly from the other ``num_classes − 1`` classes.

    Returns:
        (noisy labels int64 [n], flipped bool [n]).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape}, dtype {labels.dtype}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if num_classes < 2 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, num_classes) with num_classes >= 2, got num_classes={num_classes}")
    from devinterp_losskernel.demo import flip_labels  # the same draws; the demo keeps the one copy

    return flip_labels(labels, fraction, num_classes, seed)


def pool_images(pixels: np.ndarray, pool: int) -> np.ndarray:
    """Average ``pool`` × ``pool`` blocks of square flattened images [n, side²] → [n, (side/pool)²].

    ``side`` must be divisible by ``pool``; ``pool=1`` returns the input unchanged.
    """
    if not isinstance(pool, (int, np.integer)) or pool < 1:
        raise ValueError(f"pool must be a positive int, got {pool!r}")
    if pool == 1:
        return pixels
    n, d = pixels.shape
    side = int(round(np.sqrt(d)))
    if side * side != d or side % pool:
        raise ValueError(f"pool={pool} needs square images with a side divisible by it, got {d} pixels")
    blocks = pixels.reshape(n, side // pool, pool, side // pool, pool)
    return blocks.mean(axis=(2, 4)).reshape(n, -1).astype(pixels.dtype)


@dataclass
class MemorizationData:
    """The training set: inputs x [n, d] (standardised), true and training (noisy) labels,
    and ``flipped`` (bool [n], the relabelled samples); ``images`` [n, h, w] for display."""

    x: torch.Tensor
    y_true: torch.Tensor
    y_train: torch.Tensor
    flipped: torch.Tensor
    dataset: str
    images: np.ndarray
    num_classes: int = 10


def memorization_data(cfg: MemorizationConfig, *, root: Optional[str] = None,
                      allow_download: Optional[bool] = None, verbose: bool = True) -> MemorizationData:
    """``cfg.num_train`` images of ``cfg.dataset`` (a seeded, class-stratified-by-chance
    subset) with ``cfg.flip_fraction`` of the labels changed."""
    pixels, labels, name = load_images(cfg.dataset, root=root, allow_download=allow_download, verbose=verbose)
    rng = np.random.default_rng(cfg.seed)
    n = min(cfg.num_train, len(labels))
    if n < cfg.num_train and verbose:
        print(f"{name} has {len(labels)} images; using all of them (num_train={cfg.num_train})")
    order = np.sort(rng.choice(len(labels), n, replace=False))
    pixels, labels = pixels[order], labels[order]
    noisy, flipped = relabel(labels, cfg.flip_fraction, num_classes=10, seed=cfg.seed + 1)
    pixels = pool_images(pixels, cfg.pool if name == "fashion_mnist" else 1)  # digits are 8×8 already
    x = (pixels - pixels.mean()) / pixels.std()
    side = int(round(np.sqrt(pixels.shape[1])))
    return MemorizationData(
        x=torch.tensor(x, dtype=torch.float32), y_true=torch.tensor(labels),
        y_train=torch.tensor(noisy), flipped=torch.tensor(flipped), dataset=name,
        images=pixels.reshape(n, side, side),
    )


# ---------------------------------------------------------------------------------------------
# Model and training
# ---------------------------------------------------------------------------------------------
def make_mlp(in_features: int, hidden: int = 512, depth: int = 2, num_classes: int = 10) -> nn.Sequential:
    """ReLU MLP with ``depth`` hidden layers (only Linear layers: EK-FAC and TracInCP's
    batched gradients support them)."""
    layers: List[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@dataclass
class TrainedModel:
    """The model at w*, its training accuracy on the (noisy) training labels, and the
    checkpoints (state dicts, learning rate) TracInCP sums over, the last one being w*."""

    model: nn.Module
    train_accuracy: float
    train_loss: float
    epochs: int
    seconds: float
    checkpoints: List[Tuple[Dict[str, torch.Tensor], float]] = field(default_factory=list)


def train_to_memorization(data: MemorizationData, cfg: MemorizationConfig, *, device: Union[str, torch.device] = "cpu",
                          verbose: bool = True) -> TrainedModel:
    """Adam on the noisy labels for ``cfg.train_epochs`` epochs (minibatches of
    ``cfg.train_batch_size``, learning rate ``cfg.train_lr``, cosine-decayed to 1% of it by
    default); keeps ``cfg.tracin_checkpoints`` evenly spaced checkpoints with the learning
    rate of their epoch."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model = make_mlp(data.x.shape[1], cfg.hidden, cfg.depth, data.num_classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train_lr)
    if cfg.train_schedule not in ("cosine", "constant"):
        raise ValueError(f"train_schedule must be 'cosine' or 'constant', got {cfg.train_schedule!r}")
    x, y = data.x.to(device), data.y_train.to(device)
    n = x.shape[0]
    generator = torch.Generator().manual_seed(cfg.seed)
    keep = set(np.linspace(cfg.train_epochs, 0, max(cfg.tracin_checkpoints, 1), endpoint=False)
               .round().astype(int).tolist())
    checkpoints = []
    for epoch in range(1, cfg.train_epochs + 1):
        if cfg.train_schedule == "cosine":  # per epoch, from train_lr down to 1% of it
            lr = cfg.train_lr * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * (epoch - 1) / cfg.train_epochs)))
            for group in optimizer.param_groups:
                group["lr"] = lr
        model.train()
        for index in torch.randperm(n, generator=generator).split(cfg.train_batch_size):
            index = index.to(device)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[index]), y[index]).backward()
            optimizer.step()
        if epoch in keep:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            checkpoints.append((state, float(optimizer.param_groups[0]["lr"])))
    model.eval()
    with torch.no_grad():
        logits = model(x)
        accuracy = float((logits.argmax(1) == y).float().mean())
        loss = float(F.cross_entropy(logits, y))
    seconds = time.perf_counter() - started
    if verbose:
        print(f"trained {cfg.train_epochs} epochs in {seconds:.0f} s: accuracy on the noisy training "
              f"labels {accuracy:.4f}, mean loss {loss:.2e}")
    return TrainedModel(model, accuracy, loss, cfg.train_epochs, seconds, checkpoints)


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------
def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def loss_at_w_star(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> np.ndarray:
    """ℓ(x; w*), the cross-entropy of each sample at the trained weights, [n]."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [F.cross_entropy(model(x[s].to(device)), y[s].to(device), reduction="none").cpu()
           for s in _batches(len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out).double().numpy()


def per_sample_grad_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """‖∇_w ℓ(x; w*)‖₂ over all parameters, per sample [n], with torch.func (vmap of grad)."""
    from torch.func import functional_call, grad, vmap

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample_grads = vmap(grad(loss_one), in_dims=(None, 0, 0))
    norms = []
    for s in _batches(len(x), batch_size):
        grads = per_sample_grads(params, x[s].to(device), y[s].to(device))
        sq = sum(g.flatten(1).pow(2).sum(1) for g in grads.values())
        norms.append(sq.sqrt().cpu())
    model.train(was_training)
    return torch.cat(norms).double().numpy()


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingOptionalDependency(
            f"{package} is not installed ({error}); see tutorials/README.md ('02 memorization') "
            "for how to install the attribution libraries offline"
        ) from error


def cleanlab_self_confidence(data: "MemorizationData", cfg: "MemorizationConfig", *, learner: str = "logistic",
                             folds: int = 5, epochs: Optional[int] = None) -> np.ndarray:
    """cleanlab's label-quality ranking from out-of-fold predicted probabilities — what
    practitioners use to find label errors — as a score (larger = more likely mislabelled), [n].

    ``learner``: ``"logistic"`` (scikit-learn LogisticRegression, C = 0.01, on the pixels) or
    ``"mlp"`` (the tutorial's MLP, retrained on each of the ``folds`` folds for ``epochs``,
    default the tutorial's ``train_epochs``). Needs cleanlab (``pip install cleanlab``)."""
    rank = _require("cleanlab.rank", "cleanlab")
    from dataclasses import replace as _replace

    x, y = data.x.numpy(), data.y_train.numpy()
    n, classes = len(y), data.num_classes
    probs = np.zeros((n, classes))
    order = np.random.default_rng(cfg.seed).permutation(n)
    for fold in np.array_split(order, folds):
        train = np.setdiff1d(order, fold)
        if learner == "logistic":
            from sklearn.linear_model import LogisticRegression

            fitted = LogisticRegression(C=0.01, max_iter=500).fit(x[train], y[train])
            probs[np.ix_(fold, fitted.classes_)] = fitted.predict_proba(x[fold])
        elif learner == "mlp":
            part = MemorizationData(data.x[train], data.y_true[train], data.y_train[train], data.flipped[train],
                                    data.dataset, data.images[train], data.num_classes)
            trained = train_to_memorization(part, _replace(cfg, train_epochs=epochs or cfg.train_epochs,
                                                             tracin_checkpoints=1), verbose=False)
            with torch.no_grad():
                probs[fold] = torch.softmax(trained.model(data.x[fold]), dim=1).numpy()
        else:
            raise ValueError(f"learner must be 'logistic' or 'mlp', got {learner!r}")
    return -rank.get_label_quality_scores(y, probs, method="self_confidence")


def ekfac_self_influence(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256,
                         damping: Union[float, str] = "heuristic", output_dir: Optional[str] = None) -> np.ndarray:
    """Kronfluence's EK-FAC self-influence ∇ℓ(x)ᵀ (G + λI)⁻¹ ∇ℓ(x) of every training sample, [n].

    The factors are fitted on the same (x, y) (the training set with its noisy labels);
    Kronfluence writes them to ``output_dir`` (default: a temporary folder, removed after).
    ``damping`` λ: "heuristic" (Kronfluence's 0.1 × mean eigenvalue of each module's
    EK-FAC eigenvalues) or a number (Kronfluence's own default for pairwise scores is 1e-8).

    Raises:
        MissingOptionalDependency: kronfluence is not installed.
    """
    _require("kronfluence", "kronfluence")
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class _Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:  # the true Fisher: labels drawn from the model's own predictions
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    task = _Classification()
    work = prepare_model(copy.deepcopy(model).cpu().eval(), task)
    dataset = TensorDataset(x.cpu(), y.cpu())
    loggers = [logging.getLogger(name) for name in ("kronfluence", "accelerate")]
    levels = [lg.level for lg in loggers]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            analyzer = Analyzer(analysis_name="memorization", model=work, task=task, cpu=True,
                                disable_tqdm=True, output_dir=output_dir or tmp)
            analyzer.fit_all_factors(factors_name="ekfac", dataset=dataset, per_device_batch_size=batch_size,
                                     factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
            score_args = ScoreArguments(damping_factor=None if damping == "heuristic" else float(damping))
            analyzer.compute_self_scores(scores_name="self", factors_name="ekfac", train_dataset=dataset,
                                         per_device_train_batch_size=batch_size, score_args=score_args,
                                         overwrite_output_dir=True)
            scores = analyzer.load_self_scores("self")["all_modules"]
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
    return scores.double().numpy()


def tracin_self_influence(model: nn.Module, checkpoints: List[Tuple[Dict[str, torch.Tensor], float]],
                          x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256) -> np.ndarray:
    """captum's TracInCP self-influence Σ_c η_c ‖∇ℓ(x; w_c)‖² over training checkpoints, [n].

    ``checkpoints`` are (state dict, learning rate) pairs (:attr:`TrainedModel.checkpoints`);
    they are written to a temporary folder for captum to load.

    Raises:
        MissingOptionalDependency: captum is not installed.
    """
    _require("captum", "captum")
    from captum.influence import TracInCP

    if not checkpoints:
        raise ValueError("checkpoints must hold at least one (state_dict, lr) pair")
    work = copy.deepcopy(model).cpu().eval()

    def load_checkpoint(net, path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["state_dict"])
        return state["lr"]

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = []
        for i, (state, lr) in enumerate(checkpoints):
            path = os.path.join(tmp, f"checkpoint_{i}.pt")
            torch.save({"state_dict": state, "lr": float(lr)}, path)
            paths.append(path)
        tracin = TracInCP(work, TensorDataset(x.cpu(), y.cpu()), checkpoints=paths,
                          checkpoints_load_func=load_checkpoint,
                          loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=batch_size,
                          sample_wise_grads_per_batch=True)
        scores = tracin.self_influence(show_progress=False)
    return scores.detach().double().numpy()


# ---------------------------------------------------------------------------------------------
# The loss kernel
# ---------------------------------------------------------------------------------------------
def sample_kernel(model: nn.Module, data: MemorizationData, cfg: MemorizationConfig, *,
                  device: Union[str, torch.device, None] = None, verbose: bool = True,
                  **overrides):
    """The loss kernel of the whole (noisy) training set, from devinterp's SGLD around w*.

    ``overrides`` replace ``estimate_loss_kernel`` arguments (e.g. ``localization=100.0``).
    """
    from devinterp_losskernel.estimate import estimate_loss_kernel

    loader = DataLoader(TensorDataset(data.x, data.y_train), batch_size=cfg.sgld_batch_size, shuffle=True)
    kwargs = sampler_kwargs(cfg, **{**dict(seed=cfg.seed, device=device, verbose=verbose, labels=data.y_train),
                                    **overrides})
    return estimate_loss_kernel(model, loader, (data.x, data.y_train), **kwargs)


class _PredictiveRecorder:
    """The probe loss (per-sample cross-entropy) that also sums, at every SGLD draw, the
    softmax probabilities of each probe sample (batches ``(x, y, index)``). Passes at w*
    itself (the callback's checks and ℓ(x; w*)) are left out: their weights equal w*
    exactly, which no SGLD draw does."""

    def __init__(self, model: nn.Module, n: int, num_classes: int):
        self.reference = [p.detach().clone() for p in model.parameters()]
        self.sums = torch.zeros(n, num_classes, dtype=torch.float64)
        self.counts = torch.zeros(n, dtype=torch.float64)

    def _at_reference(self, model: nn.Module) -> bool:
        return all(torch.equal(p, r.to(p.device)) for p, r in zip(model.parameters(), self.reference))

    def __call__(self, model: nn.Module, batch) -> torch.Tensor:
        logits = model(batch[0])
        losses = F.cross_entropy(logits, batch[1], reduction="none")
        if len(batch) == 3 and not self._at_reference(model):  # a probe batch at a draw
            with torch.no_grad():
                index = batch[2].cpu()
                self.sums.index_add_(0, index, torch.softmax(logits.detach().double(), 1).cpu())
                self.counts.index_add_(0, index, torch.ones(len(index), dtype=torch.float64))
        return losses


def sample_kernel_and_predictive(model: nn.Module, data: MemorizationData, cfg: MemorizationConfig, *,
                                 device: Union[str, torch.device, None] = None, verbose: bool = True,
                                 **overrides):
    """:func:`sample_kernel` (the same draws, the same kernel) and, from the same draws, the
    posterior predictive p̄(c | x) = E_w[p_w(c | x)] of every training image, float64 [n, C].

    p̄ feeds :func:`~devinterp_losskernel.analysis.memorization.label_issue_scores`
    (``posterior_probs=``): 1 − p̄(y | x) = 1 − E_w[exp(−ℓ(x; w))] is a label-issue score
    of the one trained model. Draws of chains cut off as diverged still count in p̄ (the
    kernel leaves them out); a warning says so.
    """
    from devinterp_losskernel.estimate import estimate_loss_kernel

    n = len(data.x)
    recorder = _PredictiveRecorder(model, n, data.num_classes)
    loader = DataLoader(TensorDataset(data.x, data.y_train), batch_size=cfg.sgld_batch_size, shuffle=True)
    kwargs = sampler_kwargs(cfg, **{**dict(seed=cfg.seed, device=device, verbose=verbose, labels=data.y_train),
                                    **overrides})
    kernel = estimate_loss_kernel(model, loader, (data.x, data.y_train, torch.arange(n)), loss_fn=recorder,
                                  **kwargs)
    counts = recorder.counts
    if not bool((counts == counts[0]).all()) or float(counts[0]) == 0:
        raise RuntimeError("the posterior predictive did not see every probe sample at every draw")
    if kernel.metadata.get("diverged_chains"):
        warnings.warn(f"chains {kernel.metadata['diverged_chains']} diverged: the posterior predictive "
                      "includes their draws, the kernel does not", stacklevel=2)
    return kernel, (recorder.sums / counts[:, None]).numpy()


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------
def score_table(scores: Dict[str, np.ndarray], seconds: Dict[str, float], is_positive: Any,
                notes: Optional[Dict[str, str]] = None):
    """A pandas DataFrame: one row per score with its ROC-AUC for ``is_positive`` and wall time,
    sorted by ROC-AUC; scores that could not be computed appear with their note."""
    import pandas as pd

    from devinterp_losskernel.analysis import detection_auc

    rows = [{"score": name, "roc_auc": detection_auc(values, is_positive), "seconds": seconds.get(name, np.nan),
             "note": (notes or {}).get(name, "")} for name, values in scores.items()]
    rows += [{"score": name, "roc_auc": np.nan, "seconds": np.nan, "note": note}
             for name, note in (notes or {}).items() if name not in scores]
    table = pd.DataFrame(rows, columns=["score", "roc_auc", "seconds", "note"])
    return table.sort_values("roc_auc", ascending=False, na_position="last").reset_index(drop=True)


def plot_detector_rocs(scores: Dict[str, np.ndarray], is_positive: Any, *, title: Optional[str] = None,
                       path: Optional[str] = None):
    """ROC curves of several detectors of the same samples on one axis (a matplotlib Figure).

    ``scores``: {name: [n] scores, larger = more likely positive}; the legend gives each
    curve's ROC-AUC, curves are listed best first.
    """
    from matplotlib.figure import Figure

    from devinterp_losskernel.analysis import detection_auc
    from devinterp_losskernel.analysis.memorization import roc_curve

    if not scores:
        raise ValueError("scores must hold at least one detector")
    aucs = {name: detection_auc(values, is_positive) for name, values in scores.items()}
    fig = Figure(figsize=(6.0, 5.6))
    ax = fig.add_subplot()
    for name in sorted(scores, key=lambda k: -aucs[k]):
        fpr, tpr, _ = roc_curve(scores[name], is_positive)
        ax.plot(fpr, tpr, linewidth=2.0 if name.startswith("loss-kernel") else 1.2,
                label=f"{name}: {aucs[name]:.3f}")
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1), ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8, title="ROC-AUC")
    ax.set_title(title or "Detecting the relabelled samples")
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def knn_share(knn_indices: np.ndarray, is_positive: Any) -> Tuple[float, float]:
    """How clustered the positives are in a neighbour graph.

    Returns (share of positive neighbours among the neighbours of positive samples, base
    rate of positives). ``knn_indices`` [n, k] as in
    :attr:`~devinterp_losskernel.analysis.embedding.Embedding.knn_indices` (column 0, the
    sample itself, is skipped; padding entries < 0 are ignored).
    """
    mask = np.asarray(is_positive, dtype=bool)
    neighbours = np.asarray(knn_indices)[mask, 1:]
    valid = neighbours >= 0
    if not valid.any():
        raise ValueError("the positive samples have no neighbours")
    return float(mask[neighbours[valid]].mean()), float(mask.mean())


@dataclass
class MemorizationResult:
    config: MemorizationConfig
    data: MemorizationData
    trained: TrainedModel
    kernel: Any
    scores: Dict[str, np.ndarray]
    seconds: Dict[str, float]
    notes: Dict[str, str]
    table: Any

    def summary(self) -> Dict[str, Any]:
        from devinterp_losskernel.analysis import mean_self_covariance

        means = mean_self_covariance(self.kernel, self.data.flipped.numpy())
        return {
            "config": asdict(self.config),
            "dataset": self.data.dataset,
            "train_accuracy_on_noisy_labels": self.trained.train_accuracy,
            "num_flipped": int(self.data.flipped.sum()),
            "mean_self_covariance/normal": means[False],
            "mean_self_covariance/mislabelled": means[True],
            "llc/mean": self.kernel.metadata.get("llc/mean"),
            "table": self.table.to_dict(orient="records"),
        }


BASELINES = ("loss at w*", "per-sample gradient norm", "EK-FAC self-influence (Kronfluence)",
             "TracInCP self-influence (captum)")


def run_memorization(scale: Union[str, MemorizationConfig, None] = None, *, device=None,
                     baselines: Tuple[str, ...] = BASELINES, verbose: bool = True,
                     root: Optional[str] = None, allow_download: Optional[bool] = None,
                     **overrides) -> MemorizationResult:
    """The whole experiment: data, training to memorization, the loss kernel, the baselines,
    and the comparison table (ROC-AUC for the relabelled samples, wall time).

    Args:
        scale: "full", "ci", or a :class:`MemorizationConfig` (default: ``$LOSSKERNEL_TUTORIAL_SCALE``).
        baselines: which of :data:`BASELINES` to compute; unavailable libraries are noted in
            the table (and printed), not raised.
        overrides: :class:`MemorizationConfig` fields to change.
    """
    cfg = get_config(scale, **overrides)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    say = print if verbose else (lambda *a, **k: None)
    data = memorization_data(cfg, root=root, allow_download=allow_download, verbose=verbose)
    say(f"{data.dataset}: {len(data.x)} training images, {int(data.flipped.sum())} relabelled")
    trained = train_to_memorization(data, cfg, device=device, verbose=verbose)
    model = trained.model

    scores: Dict[str, np.ndarray] = {}
    seconds: Dict[str, float] = {}
    notes: Dict[str, str] = {}

    started = time.perf_counter()
    kernel = sample_kernel(model, data, cfg, device=device, verbose=verbose)
    seconds["loss-kernel variance K(x,x)"] = time.perf_counter() - started
    from devinterp_losskernel.analysis import memorization_scores

    scores["loss-kernel variance K(x,x)"] = memorization_scores(kernel)

    x, y = data.x.to(device), data.y_train.to(device)
    computers: Dict[str, Callable[[], np.ndarray]] = {
        "loss at w*": lambda: loss_at_w_star(model, x, y),
        "per-sample gradient norm": lambda: per_sample_grad_norm(model, x, y),
        "EK-FAC self-influence (Kronfluence)": lambda: ekfac_self_influence(model, data.x, data.y_train),
        "TracInCP self-influence (captum)":
            lambda: tracin_self_influence(model, trained.checkpoints, data.x, data.y_train),
    }
    for name in baselines:
        if name not in computers:
            raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")
        started = time.perf_counter()
        try:
            scores[name] = computers[name]()
            seconds[name] = time.perf_counter() - started
        except MissingOptionalDependency as error:
            notes[name] = f"skipped: {error}"
            say(f"NOTE: {name} skipped — {error}")
    table = score_table(scores, seconds, data.flipped.numpy(), notes)
    return MemorizationResult(cfg, data, trained, kernel, scores, seconds, notes, table)


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m losskernel_examples.memorization --scale full --threads 1``"""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m losskernel_examples.memorization",
                                     description="the memorization experiment (tutorial 02) as a script")
    parser.add_argument("--scale", default=None, choices=sorted(SCALES) + sorted(_SCALE_ALIASES),
                        help="default: $LOSSKERNEL_TUTORIAL_SCALE, else full")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--skip", nargs="*", default=[], choices=["ekfac", "tracin"],
                        help="baselines to leave out")
    parser.add_argument("--out", default=None, help="write the summary (numbers, table) as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = {"ekfac": BASELINES[2], "tracin": BASELINES[3]}
    baselines = tuple(b for b in BASELINES if b not in {skip[s] for s in args.skip})
    started = time.perf_counter()
    result = run_memorization(args.scale, device=args.device, baselines=baselines)
    summary = result.summary()
    summary["seconds_total"] = time.perf_counter() - started
    print(result.table.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"mean self-covariance K(x,x): relabelled {summary['mean_self_covariance/mislabelled']:.4g}, "
          f"clean {summary['mean_self_covariance/normal']:.4g}; total {summary['seconds_total']:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2, default=float))


if __name__ == "__main__":
    main()
