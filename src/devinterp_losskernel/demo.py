"""The embedded default job: a memorizing MLP on scikit-learn's bundled digits.

No downloads: the digits (1,797 8×8 images) ship with scikit-learn. A fraction of the
training labels is flipped, an MLP is trained until it fits them all (it must memorize the
flipped ones), and one devinterp SGLD run with the loss-kernel callback gives the kernel,
the LLC, the trace (empirical variance) and memorization scores. SGLD settings: those of the
memorization tutorial (ε 3e-4, nβ 100, γ 200). Measured over seeds 0–4 (2 CPU cores, ~10 s a
run): the variance beats the loss at w* on every seed (ROC-AUC 0.970–0.988 vs 0.954–0.968),
mean probe loss 0.25–0.28 over the draws (8e-4 at w*; chance is 2.3); the tutorial's
starting point γ 1000, ε 1e-4 lost to the loss at w* on three of the five seeds.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .extras import require
from .presets import SGLDSettings
from .rng import leaves_rng_untouched

# scikit-learn (the digits), matplotlib (correlation.png), Bokeh and Pillow (explorer.html)
DEMO_MODULES = ("sklearn", "matplotlib", "bokeh", "PIL")


def require_demo_modules() -> None:
    """Raise the ImportError naming the ``[demo]`` extra if one of :data:`DEMO_MODULES` is
    missing, before any training."""
    for module in DEMO_MODULES:
        require(module, "demo", "losskernel demo")


@dataclass
class DemoConfig:
    """The demo's sizes and settings (each is a ``losskernel demo --flag``).

    ``num_train`` digits, ``flip_fraction`` of them relabelled; an MLP with two ``hidden``-wide
    layers, full-batch Adam for ``train_epochs``; the probe is the first ``num_probe`` training
    samples. SGLD: ``num_chains`` C × ``num_draws`` T after ``num_burnin_steps`` b, ``lr`` = ε,
    ``nbeta`` = nβ, ``localization`` = γ, minibatch ``batch_size``.
    """

    num_train: int = 1000
    flip_fraction: float = 0.1
    num_probe: int = 500
    hidden: int = 256
    train_epochs: int = 400
    num_chains: int = 4
    num_draws: int = 200
    num_burnin_steps: int = 100
    lr: float = 3e-4
    nbeta: float = 100.0
    localization: float = 200.0
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self):
        self.sgld  # refuse bad SGLD values (a NaN lr from the command line) before any training

    @property
    def sgld(self) -> SGLDSettings:
        """The SGLD arguments as the one validated record."""
        return SGLDSettings.from_config(self)


def flip_labels(labels: np.ndarray, fraction: float, num_classes: int, seed: int):
    """Relabel ``round(fraction · n)`` samples, chosen without replacement, each to a class
    drawn uniformly from the other ``num_classes − 1``: (noisy labels int64 [n], flipped bool [n]).
    (The memorization tutorial's ``relabel``, same draws, kept here so the library needs no
    tutorial code.)"""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    rng = np.random.default_rng(seed)
    n = len(labels)
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, int(round(fraction * n)), replace=False)] = True
    noisy = np.asarray(labels).astype(np.int64).copy()
    noisy[flipped] = (noisy[flipped] + rng.integers(1, num_classes, int(flipped.sum()))) % num_classes
    return noisy, flipped


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``x`` against integer labels ``y`` (one batch, on the CPU)."""
    return int((model(x).argmax(-1) == y).sum()) / max(1, len(y))


def digits_with_flipped_labels(cfg: DemoConfig):
    """Standardised digits [N, 64], true labels, training labels with ``flip_fraction`` flipped."""
    load_digits = require("sklearn.datasets", "demo", "the demo's digits").load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(x))[: cfg.num_train]
    x = (x[order] - x.mean()) / x.std()
    y = y[order]
    noisy, flipped = flip_labels(y, cfg.flip_fraction, num_classes=10, seed=cfg.seed + 1)
    return (torch.tensor(x, dtype=torch.float32), torch.tensor(y), torch.tensor(noisy),
            torch.tensor(flipped))


@leaves_rng_untouched  # seeds torch for a reproducible init, then puts the caller's state back
def train_memorizing_mlp(x, y, cfg: DemoConfig) -> nn.Module:
    torch.manual_seed(cfg.seed)
    model = nn.Sequential(nn.Linear(x.shape[1], cfg.hidden), nn.ReLU(),
                          nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(cfg.train_epochs):  # full batch: 1,000 samples
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


@leaves_rng_untouched
def run_demo(out_dir: str | Path = "losskernel_demo", cfg: Optional[DemoConfig] = None,
             verbose: bool = True) -> dict:
    """Train, sample, and write kernel.pt, summary.json, correlation.png and explorer.html
    (the interactive kernel explorer, :func:`~devinterp_losskernel.explore.explore`) to
    ``out_dir``. The summary ends with the kernel's health report (``kernel.diagnostics()``,
    also in ``kernel.metadata["diagnostics"]`` and on the explorer page). Needs the ``[demo]``
    extra."""
    require_demo_modules()
    from .analysis import detection_auc, memorization_scores
    from .estimate import estimate_loss_kernel
    from .plotting import plot_correlation_matrix

    cfg = cfg or DemoConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    x, y_true, y_train, flipped = digits_with_flipped_labels(cfg)
    model = train_memorizing_mlp(x, y_train, cfg)
    train_accuracy = accuracy(model, x, y_train)
    trained_at = time.perf_counter()

    # probe: the first num_probe training samples, sorted by (training) label for the picture
    probe_index = torch.argsort(y_train[: cfg.num_probe], stable=True)
    probe = (x[probe_index], y_train[probe_index])
    loader = DataLoader(TensorDataset(x, y_train), batch_size=cfg.batch_size, shuffle=True)
    kernel = estimate_loss_kernel(model, loader, probe, cfg.sgld, verbose=verbose,
                                  sample_ids=probe_index.tolist(), labels=probe[1])
    sampled_at = time.perf_counter()

    is_flipped = flipped[probe_index].numpy()
    report = kernel.diagnostics()  # can these draws be trusted? (basin, mixing, reliability of R̂)
    kernel.metadata.setdefault("diagnostics", report.to_dict())  # the explorer page shows its verdict
    summary = {
        "config": asdict(cfg),
        "train_accuracy_on_noisy_labels": train_accuracy,
        "num_probe": int(kernel.num_samples),
        "num_draws": int(kernel.num_draws),
        "llc/mean (devinterp, minibatch)": kernel.metadata["llc/mean"],
        "llc/std (devinterp)": kernel.metadata["llc/std"],
        "probe_llc (paired, probe losses)": kernel.metadata["probe_llc"],
        "trace (sum of probe variances)": kernel.trace,
        "singular_fluctuation/nu": kernel.metadata["singular_fluctuation"],
        "memorization_auc/variance": detection_auc(memorization_scores(kernel), is_flipped),
        "memorization_auc/loss_at_w_star": detection_auc(kernel.init_loss.numpy(), is_flipped),
        # the chains should stay where the model still fits the data (chance: ln 10 = 2.3)
        "mean probe loss/at w*": float(kernel.init_loss.mean()),
        "mean probe loss/over draws": float(kernel.mean.mean()),
        "seconds/train": trained_at - started,
        "seconds/sample": sampled_at - trained_at,
        "health report": report.to_dict(),
    }
    kernel.save(out / "kernel.pt")
    plot_correlation_matrix(kernel, labels=probe[1].numpy(), path=out / "correlation.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_demo_explorer(kernel, x[probe_index], is_flipped, out / "explorer.html", seed=cfg.seed,
                        title=f"losskernel demo: digits with {cfg.flip_fraction:.0%} flipped labels")
    return summary


def write_demo_explorer(kernel, probe_x: torch.Tensor, is_flipped: np.ndarray, path: Path,
                        seed: int = 0, title: Optional[str] = None) -> Path:
    """explorer.html: the kernel's UMAP map with the 8×8 digits as thumbnails, coloured by
    label, K(x, x) (the memorization score) or the flipped-label flag."""
    from .analysis import memorization_scores
    from .explore import explore

    return explore(kernel, images=probe_x.reshape(-1, 8, 8).numpy(), path=path, random_state=seed,
                   scores={"memorization score K(x,x)": memorization_scores(kernel),
                           "label flipped": is_flipped.astype(np.int64)},
                   title=title)
