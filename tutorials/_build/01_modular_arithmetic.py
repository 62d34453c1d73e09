import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_nb import notebook, install_cell

INSTALL = install_cell()

cells = [
("md", '''
# Multitask modular arithmetic: the loss kernel separates tasks

Paper, Section 3 and Appendix C. A two-layer transformer in the style of Power et al. (2022)
has learned two tasks modulo p = 97 at once, each with its own vocabulary:

- **addition** `a + b mod p`, tokens `0 … 96`;
- **division** `a · b⁻¹ mod p` (b ≠ 0), tokens `97 … 193`.

The model reads `a, b` and predicts the result token. If the two tasks are solved by
mechanisms in disjoint weights, the losses of an addition input and a division input do
not co-vary under the local posterior: the cross-task loss covariance is zero (paper,
Appendix A.4). We sample the **loss kernel** K(x, x′) = Cov_w[ℓ(x; w), ℓ(x′; w)] with SGLD
around the trained weights on a probe split evenly between the tasks and check:

1. the kernel is not sampling noise (two independent halves of the chains agree);
2. the first principal component of the correlation rows separates the tasks (paper: ROC-AUC 0.931);
3. within-task covariances are heavy-tailed, cross-task ones narrow around zero (Fig. 3D);
4. the correlation matrix sorted by task shows two blocks;
5. a UMAP of 1 − R shows two task clusters and a small satellite: the trivial
   divisions 0 / b = 0 (Fig. 3A).

The trained model ships with the package: nothing is trained or downloaded here.

[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/timaeus-research/devinterp-losskernel/blob/main/tutorials/01_modular_arithmetic.ipynb)
'''),
("code", INSTALL),
("code", '''
import os
import time
import warnings

import numpy as np
import torch

from matplotlib.figure import Figure

from devinterp_losskernel import estimate_loss_kernel
from devinterp_losskernel.analysis import group_covariances, pc1_separation, umap_embedding
from devinterp_losskernel.plotting import plot_covariance_histograms, plot_embedding, plot_pc1_separation
from losskernel_examples.modular import (
    ADD, DIV, SCALES, TASK_NAMES, accuracy, load_checkpoint, modular_probe, pool_kernels,
    split_half_agreement, training_loader,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# LOSSKERNEL_TUTORIAL_SCALE: "ci" (the test suite's small run), "cpu" (the default without a
# GPU: n = 3,000 probe inputs, 2,000 draws) or "paper" (the default on a GPU: the paper's
# n = 10,000 and 30 chains × 800 draws).
SCALE = os.environ.get("LOSSKERNEL_TUTORIAL_SCALE", "paper" if DEVICE == "cuda" else "cpu")
if SCALE == "full":
    SCALE = "paper" if DEVICE == "cuda" else "cpu"
cfg = SCALES[SCALE]
# devinterp warns that a chain cycles through the training batches more than once (it
# reshuffles each pass, which is what we want) and that T exceeds the burn-in (we report no
# LLC-based claims); neither concerns the kernel.
warnings.filterwarnings("ignore", message=r"You are taking more")
print(DEVICE, SCALE, cfg)
'''),
("md", '''
## The trained model and its data

`load_checkpoint()` returns the transformer (d_model 128, 4 heads, MLP 512, 2 layers,
LayerNorm; 447k parameters), trained with AdamW (weight decay 1.0) on a random half of each
task's inputs until it fit them all and generalised to the other half ("grokking"), and the
data with that exact split. `data.a_zero_division` flags the 96 inputs 0 / b.
'''),
("code", '''
model, data, info = load_checkpoint(device=DEVICE)
for split, in_split in (("train", data.is_train), ("test", ~data.is_train)):
    for t, name in enumerate(TASK_NAMES):
        sel = in_split & (data.task == t)
        print(f"{split:5s} {name:9s} {int(sel.sum()):5d} inputs   accuracy "
              f"{accuracy(model, data.inputs[sel], data.targets[sel]):.4f}")
print("trained for", info["history"][-1]["step"], "steps")
for i in (0, 1, len(data) - 1):
    print(f"{TASK_NAMES[int(data.task[i])]:9s} a={int(data.a[i]):2d} b={int(data.b[i]):2d} "
          f"-> result {int(data.result[i]):2d}   tokens {data.inputs[i].tolist()} -> {int(data.targets[i])}")
'''),
("md", '''
## Sampling the loss kernel

The probe: `cfg.num_probe` inputs drawn at random from all inputs (training and held out),
half from each task, addition first. SGLD runs on the training split (devinterp's SGLD:
`lr` = ε, `nbeta` = nβ, `localization` = γ); at every draw the probe's per-sample losses
(cross-entropy of the result token) are folded into the running covariance.

**Hyperparameters, scaled to this model.** Table 1 of the paper has m = 512, C = 30, T = 800,
b = 200, ε = 2·10⁻⁷, nβ = 500, γ = 30,000 for p = 97. Weight decay under LayerNorm left our
weight matrices small (RMS ≈ 0.01, about a fifth of a freshly initialised 128-wide layer's
0.05), and γ = 30,000 spreads each weight by 1/√γ ≈ 0.006, about its own size: the probe
loss jumps from 10⁻⁴ to ≈ 1 and the kernel is noise. We keep the spread at the same fraction
of the weight scale, which multiplies γ by (0.05 / 0.01)² ≈ 30: **γ = 10⁶**. We raise
**ε to 6·10⁻⁷** (εγ/2 = 0.3), so that SGLD relaxes in a few steps and draws taken
`num_steps_bw_draws = 3` steps apart are nearly independent; with Table 1's ε, consecutive
draws are almost the same sample. nβ stays 500; the minibatch is m = 128 on the CPU (512 at
paper scale; it made no difference we could measure). We run the chains as two halves with
different seeds and pool them: the halves give a check that the kernel is not noise.
'''),
("code", '''
index = modular_probe(data, cfg.num_probe, seed=0)
task = data.task[index].numpy()                      # 0 addition, 1 division
task_name = np.array(TASK_NAMES)[task]
a_zero = data.a_zero_division[index].numpy()         # the trivial divisions 0 / b
probe = (data.inputs[index], data.targets[index])
loader = training_loader(data, cfg.batch_size)       # shuffled minibatches (m) of the training split
print(f"probe: {len(index)} inputs, {int((task == ADD).sum())} addition, {int((task == DIV).sum())} division "
      f"({int(a_zero.sum())} of them 0 / b); SGLD on {int(data.is_train.sum())} training inputs")

started = time.perf_counter()
halves = [
    estimate_loss_kernel(
        model, loader, probe, **{**cfg.sampler_kwargs(), "num_chains": cfg.num_chains // 2},
        seed=half, device=DEVICE, probe_batch_size=4096, sample_ids=index.tolist(),
        labels=data.task[index], probe_train_mask=data.is_train[index],
    )
    for half in range(2)
]
kernel = pool_kernels(*halves)                       # all draws, as one kernel
agreement = split_half_agreement(*halves)            # R of one half against R of the other (next section)
del halves
seconds = time.perf_counter() - started
print(kernel, f"  {seconds:.0f} s")
print(f"mean probe loss: {kernel.init_loss.mean():.2e} at w*, {kernel.mean.mean():.2e} over the draws")
'''),
("md", '''
## 1. Is it signal? Split-half agreement

R̂ from the first half of the chains against R̂ from the second half (Pearson correlation
over all pairs). Independent noise would give ≈ 0. Noise in R̂ shrinks like 1/√(draws), so
the agreement grows with more draws; the structure the analyses below rely on is shared by
many pairs and shows long before single entries are precise.
'''),
("code", '''
print(f"split-half agreement of R: {agreement:.3f}")
assert agreement > 0.05, "the two halves of the chains should agree on R beyond noise"
'''),
("md", '''
## 2. One axis separates the tasks (Fig. 3B)

Row i of R̂ is input i's *loss-response vector*: how its loss co-moves with every probe
input. We project the centred rows on their first principal component and score the
projection against the task labels by ROC-AUC (paper: 0.931). Measured with this model
(tutorials/README.md): 0.960 at ci scale, 0.974 at cpu scale, 0.992 at the paper's 24,000 draws.
'''),
("code", '''
pc1 = pc1_separation(kernel, task_name)
print(f"PC1 separation ROC-AUC: {pc1.auc:.3f}  (paper: 0.931; {pc1.explained_variance_ratio:.1%} of the variance)")
# bounds: far above chance (0.5) at CI scale; at least the paper's 0.931 at its size
assert pc1.auc > {"ci": 0.75, "cpu": 0.9, "paper": 0.931}[SCALE], "the first principal component should separate the tasks"
plot_pc1_separation(pc1)
'''),
("md", '''
## 3. Within-task against cross-task covariances (Fig. 3D)

Off-diagonal K(x, x′) by task pair, as magnitudes on a log axis (the paper's Fig. 3D), and
the same for R(x, x′), which takes out how much each input's loss varies at all. Within a
task the values are heavy-tailed and skewed: inputs that share an operand or a result
co-vary strongly. Across tasks they are narrow, with no tail. Their centre sits slightly
above zero: the tasks share the transformer's weights, including the final LayerNorm that
scales all logits, and when a draw moves those every loss moves a little.
'''),
("code", '''
summary = group_covariances(kernel, task_name, use="correlation").summary.set_index("kind")
print(summary[["group_a", "group_b", "count", "mean", "std", "q05", "q95", "skewness"]]
      .to_string(float_format=lambda v: f"{v:.3g}"))
within, cross = summary.loc["within"], summary.loc["cross"]
assert cross["std"] < within["std"].min() and cross["q95"] < within["q95"].min(), \\
    "cross-task correlations should be narrower than within-task ones"
plot_covariance_histograms(kernel, task_name)
'''),
("code", '''
plot_covariance_histograms(kernel, task_name, use="correlation")
'''),
("md", '''
## 4. The correlation matrix, sorted by task

Inputs sorted by task, then by `a`, then by `b` (a random subset of at most 1,500). The
correlations are small except between inputs that share a token, so the colour scale is
clipped at ±0.2: the two diagonal blocks are the tasks, the off-diagonal blocks between
them are paler.
'''),
("code", '''
rng = np.random.default_rng(0)
shown = np.sort(rng.choice(len(index), size=min(1500, len(index)), replace=False))
a_of, b_of = data.a[index].numpy(), data.b[index].numpy()
order = shown[np.lexsort((b_of[shown], a_of[shown], task[shown]))]
R_sorted = kernel.correlation[order][:, order].cpu().numpy()
fig = Figure(figsize=(6.4, 5.4))
ax = fig.add_subplot()
image = ax.imshow(R_sorted, cmap="RdBu_r", vmin=-0.2, vmax=0.2, interpolation="antialiased")
fig.colorbar(image, ax=ax, label="R(x, x') (clipped at ±0.2)")
boundary = int((task[order] == ADD).sum()) - 0.5
ax.axhline(boundary, color="k", linewidth=0.6), ax.axvline(boundary, color="k", linewidth=0.6)
ticks = [boundary / 2, (boundary + len(order)) / 2]
ax.set_xticks(ticks, TASK_NAMES), ax.set_yticks(ticks, TASK_NAMES, rotation=90, va="center")
ax.set_title(f"Loss correlation, {len(order)} probe inputs sorted by task, a, b")
fig
'''),
("md", '''
## 5. UMAP of 1 − R (Fig. 3A and 3C)

UMAP on the distances d(x, x′) = 1 − R(x, x′), from each input's 15 most correlated inputs.
(The paper removes same-label neighbour edges only for ImageNet, so we keep every edge.)
First by task, with the division inputs 0 / b as their own group; then by the operand b.
'''),
("code", '''
emb = umap_embedding(kernel, exclude_same_label_edges=False, n_neighbors=15, random_state=0)
plot_embedding(emb, labels=np.where(a_zero, "division, a = 0", task_name),
               title=f"UMAP of d = 1 - R by task ({SCALE} scale)")
'''),
("code", '''
plot_embedding(emb, labels=b_of, title="the same UMAP, coloured by b (cyclic colour map)")
'''),
("md", '''
### Explore the kernel

`explore` writes one self-contained HTML page (works offline; shown inline here): the same
UMAP, drawn with WebGL. Hover an input to see its (a, b) pair, task, K(x,x) and mean loss;
click it to list its 15 most (or least) correlated inputs with their R and lines to them on
the map. Colour by the 0 / b flag to find the satellite; search "division".
'''),
("code", '''
from devinterp_losskernel.explore import explore

explore(kernel, embedding=emb, texts=list(zip(a_of.tolist(), b_of.tolist())), labels=task,
        label_names=TASK_NAMES, scores={"0 / b (a = 0 division)": a_zero.astype(int), "b": b_of},
        color_by="0 / b (a = 0 division)", path="modular_explorer.html")
'''),
("md", '''
## The numbers, and the script twin

`losskernel_examples.modular.run_modular_kernel(scale)` runs this notebook's pipeline
as a function and returns the kernel and these numbers (`python -m
losskernel_examples.modular kernel --scale cpu`). Measured values at each scale,
with wall times and hardware, are in `tutorials/README.md`.
'''),
("code", '''
R = kernel.correlation
add, div, zero = np.flatnonzero(task == ADD), np.flatnonzero(task == DIV), np.flatnonzero(a_zero)
def mean_offdiagonal(rows, cols):
    block = R[rows][:, cols].double()
    if rows is cols:
        return float((block.sum() - block.diagonal().sum()) / (len(rows) * (len(rows) - 1)))
    return float(block.mean())
print(f"scale {SCALE}: n = {kernel.num_samples}, {kernel.num_draws} draws, {seconds:.0f} s on {DEVICE}")
print(f"PC1 ROC-AUC {pc1.auc:.3f}   split-half agreement {agreement:.3f}")
print(f"mean R: within addition {mean_offdiagonal(add, add):.3f}, within division {mean_offdiagonal(div, div):.3f}, "
      f"across {mean_offdiagonal(add, div):.3f}, among the {len(zero)} inputs 0 / b "
      f"{mean_offdiagonal(zero, zero) if len(zero) > 1 else float('nan'):.3f}")
'''),
]
notebook(cells, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "01_modular_arithmetic.ipynb"), devinterp_major=1)
