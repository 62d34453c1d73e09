"""Draw one thumbnail per ``plot_*`` function of :mod:`devinterp_losskernel.plotting` into
``docs/figures/<function>.png``, from synthetic losses over scikit-learn's bundled digits
(no downloads, no training, no SGLD).

    python docs/make_figures.py                 # thumbnails (≈ 600 px wide) into docs/figures/
    python docs/make_figures.py --out /tmp/figs --dpi 120   # larger, for checking by eye

The kernel: 300 digits x_i (labels y_i ∈ 0…9) and N = 400 synthetic "SGLD draws" of their
losses, ℓ_t(x_i) = a·f_t(y_i) + b·g_t(shape(y_i)) + s_i·ε_{t,i}: a factor shared by the
digit's class, a weaker one shared by its shape group (round / straight / curved, the
hierarchy), and per-sample noise whose scale s_i is 3× larger for 10 % "relabelled" samples
(so K(x, x) detects them). K̂ and R̂ are accumulated by :class:`KernelAccumulator` exactly as
from real draws. Deterministic (fixed seeds); about 30–40 s on one core, most of it
umap-learn's first-use compilation.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

SHAPES = {"round": (0, 6, 8, 9), "straight": (1, 4, 7), "curved": (2, 3, 5)}


def synthetic_draws(labels: np.ndarray, relabelled: np.ndarray, draws: int, seed: int,
                    class_strength: float = 1.0, shape_strength: float = 0.6) -> np.ndarray:
    """Losses [draws, n] with class, shape-group and per-sample noise factors (see above)."""
    rng = np.random.default_rng(seed)
    shape_of = np.empty(10, dtype=np.int64)
    for s, members in enumerate(SHAPES.values()):
        shape_of[list(members)] = s
    n = labels.size
    scale = np.where(relabelled, 3.0, 1.0) * rng.uniform(0.6, 1.4, n)
    losses = (class_strength * rng.standard_normal((draws, 10))[:, labels]
              + shape_strength * rng.standard_normal((draws, 3))[:, shape_of[labels]]
              + scale * rng.standard_normal((draws, n)))
    return 2.0 + 0.3 * losses  # a positive "loss" level; K is unchanged by the shift


def main(out: Path, dpi: int) -> None:
    torch.set_num_threads(1)
    from sklearn.datasets import load_digits

    from devinterp_losskernel import KernelAccumulator, plotting
    from devinterp_losskernel.analysis import (
        aligned_umap_embeddings,
        attribute_lift,
        cka_convergence,
        memorization_scores,
        pc1_separation,
        taxonomic_lift,
        top_correlated,
        umap_embedding,
    )
    from devinterp_losskernel.hierarchy import Hierarchy

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    n = 300
    images, labels = digits.images[:n], digits.target[:n].astype(np.int64)
    relabelled = np.random.default_rng(1).random(n) < 0.1
    tree = Hierarchy.from_parents({**{d: shape for shape, ds in SHAPES.items() for d in ds},
                                   **{shape: "digit" for shape in SHAPES}})

    losses = synthetic_draws(labels, relabelled, 400, seed=0)
    acc = KernelAccumulator(n)
    snapshots = []
    for block in np.array_split(losses, 8):
        acc.update(torch.as_tensor(block))
        snapshots.append(acc.compute(labels=torch.as_tensor(labels)))
    kernel = snapshots[-1]

    def save(fig, name):
        fig.savefig(out / f"{name}.png", dpi=dpi, bbox_inches="tight")

    save(plotting.plot_correlation_matrix(kernel), "plot_correlation_matrix")
    shape_name = tree.ancestors_at_depth(labels, 1)
    save(plotting.plot_covariance_histograms(kernel, shape_name), "plot_covariance_histograms")
    save(plotting.plot_cka_convergence(cka_convergence(snapshots[:-1], kernel)), "plot_cka_convergence")
    save(plotting.plot_memorization(memorization_scores(kernel), relabelled,
                                    positive_label="relabelled", negative_label="clean"),
         "plot_memorization")
    round_or_not = np.where(shape_name == "round", "round", "other")
    save(plotting.plot_pc1_separation(pc1_separation(kernel, round_or_not)), "plot_pc1_separation")
    queries = np.array([0, 1, 2, 3])
    idx, val = top_correlated(kernel, queries, k=6, exclude_same_label=True)
    save(plotting.plot_top_k_grid(images, queries, idx, val, labels=labels,
                                  title="most correlated other-label digits (R)"), "plot_top_k_grid")
    save(plotting.plot_hierarchy_sorted_matrix(kernel, labels, tree), "plot_hierarchy_sorted_matrix")
    save(plotting.plot_lift_curves(taxonomic_lift(kernel, labels, tree, k=10)), "plot_lift_curves")
    save(plotting.plot_attribute_transition(attribute_lift(kernel, shape_name, k=10)),
         "plot_attribute_transition")

    emb = umap_embedding(kernel, n_neighbors=10, random_state=0, n_epochs=100)
    save(plotting.plot_embedding(emb, labels), "plot_embedding")
    later = []
    for step, strength in enumerate((0.2, 0.6, 1.0)):
        acc = KernelAccumulator(n)
        acc.update(torch.as_tensor(synthetic_draws(labels, relabelled, 200, seed=10 + step,
                                                   class_strength=strength, shape_strength=strength)))
        later.append(acc.compute(labels=torch.as_tensor(labels)))
    aligned = aligned_umap_embeddings(later, n_neighbors=10, random_state=0, n_epochs=60)
    save(plotting.plot_aligned_embeddings(aligned, labels, titles=["step 100", "step 1000", "step 10000"]),
         "plot_aligned_embeddings")
    print(f"wrote {len(list(out.glob('plot_*.png')))} figures to {out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "figures")
    parser.add_argument("--dpi", type=int, default=60, help="60 gives ≈ 600 px wide thumbnails")
    args = parser.parse_args()
    main(args.out, args.dpi)
