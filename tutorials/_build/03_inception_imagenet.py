import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_nb import notebook, install_cell

INSTALL = install_cell('''
# WordNet for nltk when neither nltk's copy nor Debian's wordnet-base is present.
from devinterp_losskernel.hierarchy import wordnet_available
if not wordnet_available():
    import nltk
    nltk.download("wordnet", quiet=True)
''')

cells = [
("md", '''
# Inception-v1 on ImageNet: the loss kernel and the WordNet hierarchy

Paper, Section 4 and Appendices D.1–D.3, D.6. The loss kernel of an image classifier,
K(x, x′) = Cov_w[ℓ(x; w), ℓ(x′; w)] under SGLD draws around the trained weights w*, read
against the WordNet tree the ImageNet labels come from:

1. a UMAP of d = 1 − R, coloured by the label's position in WordNet (Fig. 1A);
2. R sorted by the hierarchy, beside the WordNet distance matrix (Fig. 1B);
3. each image's most and least correlated images (Fig. 4);
4. the taxonomic lift: do kernel neighbours share WordNet ancestors more than chance (Fig. 5)?
5. convergence of the kernel with the number of draws (CKA, Fig. 6A) and its dependence on
   the localization γ (Fig. 6B–D): colour lift against WordNet-node lift (App. D.6).

**What runs where.** The paper's run — torchvision's GoogLeNet with ImageNet weights, 10,000
validation images at 256×256, SGLD over the 1.28M training images with Table 1's settings
(m = 256, C = 15, T = 500, b = 100, ε = 5·10⁻⁵, nβ = 20, γ = 4,000) — needs ImageNet, the
weights and a GPU: set `IMAGENET_DIR` and `WEIGHTS` below. Without them (the default, and
what the test suite runs) the notebook writes a **tiny generated ImageNet-layout folder**:
six real ImageNet classes spread over WordNet (two dogs, a cat, a car, a bicycle, a fruit)
with synthetic images whose colour and texture depend on the class, and uses an
**untrained** GoogLeNet. Every step of the pipeline runs the same way; the pictures then show
how the pipeline works, not what Inception-v1 learned.

[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/timaeus-research/devinterp-losskernel/blob/main/tutorials/03_inception_imagenet.ipynb)
'''),
("code", INSTALL),
("md", '''
## Parameters

- `IMAGENET_DIR`: an ImageNet-layout folder, `train/<wnid>/*.JPEG` and `val/<wnid>/*.JPEG`
  (torchvision's `ImageFolder` layout; the probe comes from `val/`, SGLD runs on `train/`), or
  one folder of wnid sub-folders (then both come from it). Class folders may be any subset
  of the 1000 ImageNet-1k classes: labels are ImageNet class indices either way.
- `WEIGHTS`: a GoogLeNet `state_dict` file (`torch.save(model.state_dict(), path)`, or
  torchvision's `googlenet-1378be20.pth`); in Colab also
  `torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1` (downloaded by torchvision). `None`:
  untrained weights.
- `LOSSKERNEL_TUTORIAL_SCALE`: `ci` (the test suite: 32×32 inputs, 36 probe images,
  2 chains × 30 draws — about a minute of sampling on 2 CPU cores), `cpu` (the default
  without a GPU: 64×64, more images and draws) or `paper` (the default on a GPU: 256×256,
  10,000 probe images, Table 1). **The ci scale uses 32×32 images, not the paper's 256×256**:
  on this project's 2-core CPU GoogLeNet takes ≈ 0.18 s per 256×256 image per forward pass,
  ≈ 3 ms at 32×32 (its global average pooling accepts any input size ≥ 32).
'''),
("code", '''
import math
import os
import time
import warnings

import numpy as np
import torch

try:
    import torchvision
except ImportError as error:
    raise ImportError("This tutorial needs torchvision (GoogLeNet, image transforms): "
                      "pip install torchvision, a build matching your torch") from error

IMAGENET_DIR = None        # e.g. "/data/imagenet" (train/ and val/ of wnid folders); None: generated folder
WEIGHTS = None             # e.g. "googlenet-1378be20.pth" or torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1
WORK_DIR = "imagenet_tutorial"   # the generated folder, kernel.pt and numbers.json go here
SEED = 0

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALE = os.environ.get("LOSSKERNEL_TUTORIAL_SCALE", "paper" if DEVICE == "cuda" else "cpu")
if SCALE == "full":
    SCALE = "paper" if DEVICE == "cuda" else "cpu"

from devinterp_losskernel.analysis import (attribute_lift, cka, color_groups, compare_kernels,
                                           correlation_by_tree_distance, taxonomic_lift,
                                           top_correlated, umap_embedding)
from devinterp_losskernel.hierarchy import imagenet_class_names, imagenet_wnids, wordnet_imagenet
from devinterp_losskernel.plotting import (plot_attribute_transition, plot_cka_convergence, plot_embedding,
                                           plot_hierarchy_sorted_matrix, plot_lift_curves, plot_top_k_grid)
from losskernel_examples.imagenet import (
    SCALES, TINY_CLASSES, ImageNetFolder, calibrate_batchnorm, for_untrained, gamma_sweep,
    load_googlenet, load_probe, make_tiny_imagenet, plot_colour_groups, plot_gamma_sweep, plot_images,
    probe_indices, resolve_imagenet_dirs, sample_kernel, training_loader,
)

cfg = SCALES[SCALE]
if WEIGHTS is None:
    cfg = for_untrained(cfg)     # see "The model" below
if DEVICE == "cpu" and SCALE == "ci":
    # 32×32 inputs give GoogLeNet tiny convolutions that a second thread does not speed up:
    # on a shared 2-core machine one thread was several times faster than two
    torch.set_num_threads(1)
print(DEVICE, SCALE, cfg)
'''),
("md", '''
## The data

The probe is `cfg.num_probe` random images of the probe folder (all of them at ci scale),
resized (shorter side) and centre-cropped to `cfg.image_size`, kept as uint8 (10,000 images
at 256×256 are 2 GB; the loss function normalises each batch on the device). SGLD draws
minibatches of m = `cfg.batch_size` from the training folder.
'''),
("code", '''
if IMAGENET_DIR is None:
    root = make_tiny_imagenet(os.path.join(WORK_DIR, "tiny_imagenet"), train_per_class=cfg.tiny_train,
                              val_per_class=cfg.tiny_val, seed=SEED)
else:
    root = IMAGENET_DIR
train_dir, probe_dir = resolve_imagenet_dirs(root)
probe_folder = ImageNetFolder(probe_dir, cfg.image_size, normalize=False)
train_folder = ImageNetFolder(train_dir, cfg.image_size, normalize=False)
index = probe_indices(len(probe_folder), cfg.num_probe, seed=SEED)
images, targets = load_probe(probe_folder, index, num_workers=cfg.num_workers)
wnids = probe_folder.wnids[index]                    # each probe image's WordNet id
class_name = dict(zip(imagenet_wnids(), imagenet_class_names()))
names = np.array([class_name[w] for w in wnids])
loader = training_loader(train_folder, cfg.batch_size, num_workers=cfg.num_workers,
                         pin_memory=DEVICE == "cuda")
print(probe_folder)
print(train_folder)
print(f"probe: {len(index)} images of {len(set(wnids))} classes, {tuple(images.shape)} {images.dtype}")
assert images.dtype == torch.uint8 and images.shape[1:] == (3, cfg.image_size, cfg.image_size)
assert all(imagenet_wnids()[t] == w for t, w in zip(targets.tolist(), wnids)), "targets must be ImageNet-1k indices"
shown = np.linspace(0, len(index) - 1, min(12, len(index))).round().astype(int)
plot_images(images[shown], names[shown], title=f"some probe images ({cfg.image_size}×{cfg.image_size})")
'''),
("md", '''
## The model

torchvision's GoogLeNet (Inception-v1 with BatchNorm), without the auxiliary classifiers.
With `WEIGHTS`, their values (and torchvision's `transform_input=True`, which its ImageNet
weights expect). Without, torchvision's initialisation (σ = 0.01), with the BatchNorm
running statistics set to the training images' (`calibrate_batchnorm`): with the default
mean 0 / variance 1 the signal of an untrained GoogLeNet shrinks layer by layer in eval mode
and every image gets the same loss, log 1000.

**SGLD settings.** Trained weights get Table 1's Section 4 row. For untrained weights Table 1's
γ = 4,000 spreads each weight by 1/√γ ≈ 0.016, more than the weights' own size (0.01): the
first steps blow up. `for_untrained` multiplies γ by 250 (spread 0.001, a tenth of a weight)
and divides ε by 250, keeping Table 1's εγ/2 = 0.1, so chains relax as fast.

BatchNorm stays in **eval mode during SGLD** too (`imagenet_evaluate`): devinterp would run
the chains in train mode, where each minibatch of m images is normalised by its own
statistics and the running statistics drift step by step, while the probe losses are taken
in eval mode. This way the sampled loss and the probe loss are one function of w.
'''),
("code", '''
model = load_googlenet(WEIGHTS, device=DEVICE, seed=SEED)
if WEIGHTS is None:
    calibrate_batchnorm(model, loader, num_batches=8)
print(f"GoogLeNet, {sum(p.numel() for p in model.parameters()):,} parameters, transform_input={model.transform_input}")
print(f"SGLD: m={cfg.batch_size} C={cfg.num_chains} T={cfg.num_draws} b={cfg.num_burnin_steps} "
      f"ε={cfg.lr:g} nβ={cfg.nbeta:g} γ={cfg.localization:g}")
'''),
("md", '''
## The WordNet hierarchy

`wordnet_imagenet(wnids)` hangs each class from `entity` along one hypernym chain (the
longest; see `devinterp_losskernel.hierarchy`). The distance between two labels is the
number of edges between them in that tree. For the generated folder's classes the values are
known: the two dogs meet at *dog* (Chihuahua 2 edges below it, golden retriever 4: distance
6), the cat meets them at *carnivore*, the car and the bicycle at *wheeled vehicle*, and
the animals, vehicles and the orange only at *whole* (depth 3).
'''),
("code", '''
classes = sorted(set(wnids))
hierarchy = wordnet_imagenet(classes)
print(hierarchy)
for w in hierarchy.leaf_order():
    print(f"{w} {class_name[w]:18s} depth {hierarchy.depth(w):2d}: "
          + " → ".join(hierarchy.name(a) for a in hierarchy.path(w)[-5:]))
distance = hierarchy.distance_matrix(classes)
if IMAGENET_DIR is None:
    # WordNet 3.0, longest hypernym paths: depths and tree distances of the generated classes
    expected_depth = {"n02085620": 15, "n02099601": 17, "n02123045": 15,
                      "n03792782": 10, "n04285008": 12, "n07747607": 11}
    expected = {("n02085620", "n02099601"): 6, ("n02085620", "n02123045"): 8, ("n02099601", "n02123045"): 10,
                ("n03792782", "n04285008"): 6, ("n02085620", "n04285008"): 21, ("n02099601", "n03792782"): 21,
                ("n02123045", "n07747607"): 20, ("n04285008", "n07747607"): 17, ("n03792782", "n07747607"): 15}
    assert classes == sorted(w for w, _ in TINY_CLASSES)
    assert {w: hierarchy.depth(w) for w in classes} == expected_depth
    for (a, b), d in expected.items():
        i, j = classes.index(a), classes.index(b)
        assert distance[i, j] == distance[j, i] == d, (a, b, distance[i, j], d)
    assert (np.diag(distance) == 0).all()
'''),
("md", '''
## Sampling the loss kernel

`sample_kernel` calls `estimate_loss_kernel` with the per-sample cross-entropy
(`imagenet_loss_fn`) and keeps snapshots of K̂ along the way for the CKA convergence curve.
Draws are taken every step after the burn-in (Table 1 does not thin).
'''),
("code", '''
started = time.perf_counter()
kernel = sample_kernel(model, loader, (images.to(DEVICE), targets.to(DEVICE)), cfg, device=DEVICE, seed=SEED,
                       sample_ids=[probe_folder.samples[i][0] for i in index],
                       probe_in_training_set=train_dir == probe_dir)
seconds = time.perf_counter() - started
print(kernel, f"  {seconds:.0f} s on {DEVICE}")
print(f"mean probe loss: {kernel.init_loss.mean():.3f} at w*, {kernel.mean.mean():.3f} over the draws; "
      f"devinterp's LLC of the run {kernel.metadata['llc/mean']:.3g}")

K = kernel.covariance.double().cpu().numpy()
R = kernel.correlation.double().cpu().numpy()
# a principal submatrix of a PSD matrix is PSD: check at most 3,000 samples (10,000² takes minutes)
subset = np.random.default_rng(SEED).choice(len(K), size=min(len(K), 3000), replace=False)
eigenvalues = np.linalg.eigvalsh(K[np.ix_(subset, subset)])
print(f"K: eigenvalues {eigenvalues.min():.2e} … {eigenvalues.max():.2e}; R off-diagonal "
      f"{R[~np.eye(len(R), dtype=bool)].min():.2f} … {R[~np.eye(len(R), dtype=bool)].max():.2f}")
assert kernel.num_draws == cfg.num_chains * cfg.num_draws, "every draw of every chain should be folded in"
assert np.isfinite(K).all() and np.allclose(K, K.T)
assert eigenvalues.min() > -1e-8 * eigenvalues.max(), "a covariance matrix is positive semi-definite"
assert (kernel.variance > 0).all() and np.allclose(np.diag(R), 1.0)
if WEIGHTS is None:   # untrained 1000-way classifier: every loss near log 1000
    assert abs(float(kernel.init_loss.mean()) - math.log(1000)) < 1.0
'''),
("md", '''
## 1. Has the kernel converged? (Fig. 6A)

CKA(K̂_t, K̂) between the kernel after t draws (over all chains) and the final one. It ends
at 1 by construction (the last snapshot is the final kernel); how fast it gets close says
whether there were enough draws. The paper found the kernel's quality depends strongly on
the total number of draws, and that larger γ converges faster.
'''),
("code", '''
curve = kernel.metadata["cka_convergence"]
print("draws → CKA with the final kernel:", ", ".join(f"{t}: {c:.3f}" for t, c in curve))
assert abs(cka(kernel, kernel) - 1.0) < 1e-9, "CKA of a kernel with itself is 1"
assert curve[-1][0] == kernel.num_draws and abs(curve[-1][1] - 1.0) < 1e-9, "the curve ends at the final kernel"
assert all(0.0 < c <= 1.0 + 1e-9 for _, c in curve) and curve[0][1] < 1.0 - 1e-6
plot_cka_convergence(curve, title=f"Kernel convergence ({SCALE} scale)")
'''),
("md", '''
## 2. UMAP of 1 − R, coloured by WordNet position (Fig. 1A)

UMAP on d(x, x′) = 1 − R(x, x′) from each image's nearest neighbours, with edges between
images of the same label removed (the paper does this for ImageNet: noise in the last layer
makes same-label losses co-vary, Appendix B). Colours follow the classes' order in the
WordNet tree, so nearby categories get nearby hues.
'''),
("code", '''
largest_class = int(np.unique(wnids, return_counts=True)[1].max())
threads = torch.get_num_threads()
emb = umap_embedding(kernel, labels=wnids, exclude_same_label_edges=True,
                     n_neighbors=min(cfg.n_neighbors, len(wnids) - largest_class), random_state=SEED)
# umap-learn's numba resets the OpenMP thread count torch shares; restore torch's, or the
# γ sweep below runs many times slower on a busy CPU
torch.set_num_threads(threads)
assert emb.embedding.shape == (len(wnids), 2) and np.isfinite(emb.embedding).all()
assert not (wnids[emb.knn_indices[:, 1:]] == wnids[:, None]).any(), "no same-label edges in the kNN graph"
fig = plot_embedding(emb, labels=wnids, hierarchy=hierarchy, point_size=30 if len(wnids) < 500 else 4,
                     title=f"UMAP of d = 1 − R, coloured by WordNet position ({SCALE} scale)")
ax = fig.axes[0]
for w in hierarchy.leaf_order():     # a legend: each class's colour
    ax.scatter([], [], color=hierarchy.position_colors([w])[0], label=class_name[w])
if len(classes) <= 20:
    ax.legend(fontsize=7, frameon=False)
fig
'''),
("md", '''
### Explore the kernel

`explore` writes the map as one self-contained, offline HTML page (shown inline below):
hover an image for its thumbnail, class, WordNet path, K(x,x) and mean loss; click it for its
15 most (or least) correlated images with their R, optionally without its own class; colour
by WordNet position or class; search a WordNet node ("dog", "vehicle") to ring its images.
'''),
("code", '''
from devinterp_losskernel.explore import explore

class_index = np.searchsorted(classes, wnids)        # integer labels: classes[i] is hierarchy class i
explore(kernel, embedding=emb, images=images, labels=class_index, hierarchy=hierarchy,
        label_names=[class_name[w] for w in classes], color_by="hierarchy", thumbnail_size=48,
        path="imagenet_explorer.html")
'''),
("md", '''
## 3. R sorted by the hierarchy, beside the WordNet distances (Fig. 1B)

Images sorted by their label's position in the tree; left R, right the tree distance between
their labels. In the paper the two show the same block structure.
'''),
("code", '''
plot_hierarchy_sorted_matrix(kernel, wnids, hierarchy, title=f"R and WordNet distance ({SCALE} scale)")
'''),
("code", '''
by_distance = correlation_by_tree_distance(kernel, wnids, hierarchy)
print("mean R by WordNet distance between the labels (different-label pairs):")
print(by_distance.to_string(float_format=lambda v: f"{v:.3f}"))
same_class = wnids[:, None] == wnids[None, :]
off_diagonal = ~np.eye(len(wnids), dtype=bool)
print(f"mean R: same class {R[same_class & off_diagonal].mean():.3f}, different class {R[~same_class].mean():.3f}")
if SCALE == "ci":   # same-class images share colour and texture: their losses co-vary more
    assert R[same_class & off_diagonal].mean() > R[~same_class].mean() + 0.02
'''),
("md", '''
## 4. Most and least correlated images (Fig. 4)

For a few query images (red frame), the five most correlated probe images under R (top) and
the five least correlated (bottom), R above each. In the paper neighbours share colour,
texture, shape or content.
'''),
("code", '''
queries = np.linspace(0, len(wnids) - 1, min(6, len(wnids))).round().astype(int)
top_idx, top_val = top_correlated(kernel, queries, 5)
assert top_idx.shape == (len(queries), 5) and not (top_idx == queries[:, None]).any()
assert (np.diff(top_val, axis=1) <= 1e-12).all(), "neighbours come sorted by R"
plot_top_k_grid(images, queries, top_idx, top_val, labels=names, title="most correlated (R)")
'''),
("code", '''
low_idx, low_val = top_correlated(kernel, queries, 5, lowest=True)
assert (low_val.max(axis=1) <= top_val.min(axis=1) + 1e-12).all()
plot_top_k_grid(images, queries, low_idx, low_val, labels=names, title="least correlated (R)")
'''),
("md", '''
## 5. Taxonomic lift (Fig. 5, Appendix D.2)

For each image whose label sits at depth d in WordNet, take its k most correlated images
*with a different label* (the paper: k = 30; at ci scale k is smaller, the probe has only
30 different-label images per query). Lift(d, d′) is the fraction of them whose label shares
an ancestor at depth d′ with the query's, over the same fraction among all different-label
images. Lift > 1: kernel neighbours share WordNet categories more often than chance.
Lift(d, 0) = 1 always (every label descends from the root).
'''),
("code", '''
k = min(cfg.k, len(wnids) - largest_class)
lift = taxonomic_lift(kernel, wnids, hierarchy, k=k)
print(f"k = {k}; queries per depth: {lift.attrs['num_queries'].to_dict()}")
print(lift.round(2).to_string(na_rep="·"))
depths = sorted({hierarchy.depth(w) for w in classes})
assert list(lift.index) == depths, "one row per query depth present in the probe"
assert list(lift.columns) == list(range(max(depths) + 1))
assert np.allclose(lift[0], 1.0), "everything shares the root"
plot_lift_curves(lift)
'''),
("md", '''
## 6. Colour lift (Appendix D.6) and WordNet-node lift

Colour groups: each image's mean (R, G, B), then farthest-point sampling picks
`cfg.colour_groups` centres spread over those colours and each image joins its nearest
centre. The colour lift is the fraction of a query's k neighbours (different label) in its
colour group over the base rate, averaged per group. The node lift does the same with the
label's WordNet ancestor at depth `cfg.node_depth` (at ci scale: animals / vehicles / fruit).
The paper (Fig. 6D, 9): low γ favours colour neighbours, high γ WordNet neighbours.
'''),
("code", '''
groups, centres = color_groups(images, min(cfg.colour_groups, len(wnids)), channels_last=False, return_centers=True)
colour_lift = attribute_lift(kernel, groups, k=k, labels=wnids)
nodes = hierarchy.ancestors_at_depth(wnids, cfg.node_depth)
node_lift = attribute_lift(kernel, nodes, k=k, labels=wnids)
print(f"colour lift {colour_lift.mean_lift:.2f} over {len(centres)} colour groups; "
      f"WordNet-node lift {node_lift.mean_lift:.2f} over the depth-{cfg.node_depth} nodes "
      f"{sorted(hierarchy.name(n) for n in set(nodes))}")
print(colour_lift.per_group.round(3).to_string())
assert len(np.unique(groups)) == len(centres) and np.allclose(colour_lift.transition.sum(axis=1), 1.0)
assert np.isfinite(colour_lift.mean_lift) and np.isfinite(node_lift.mean_lift)
plot_colour_groups(images, groups)
'''),
("code", '''
plot_attribute_transition(colour_lift, colors=centres / 255.0, title="colour of the top-k neighbours, per colour group")
'''),
("md", '''
## 7. The localization γ (Fig. 6B–D)

The same sampler at a few γ (the paper: Table 1's D.3 row, C = 5, T = 1,200, b = 2,000,
ε = 10⁻⁴; here `cfg.gamma_sweep`, with fewer draws at ci scale), every run with the same seed.
B: CKA between the kernels; C: mean R against WordNet distance; D: colour and WordNet-node
lift against γ. The paper found the kernel stable for γ between 900 and 1,500, and colour
lift falling while WordNet lift rises with γ.
'''),
("code", '''
started = time.perf_counter()
sweep = gamma_sweep(model, loader, (images.to(DEVICE), targets.to(DEVICE)), cfg, device=DEVICE, seed=SEED)
sweep_seconds = time.perf_counter() - started
table = compare_kernels({f"γ={g:g}": kern for g, kern in sweep.items()})
print(table.round(3).to_string(), f"\\n{sweep_seconds:.0f} s")
rows = []
for g, kern in sweep.items():
    m = kern.num_samples
    k_g = min(k, m - int(np.unique(wnids[:m], return_counts=True)[1].max()))
    rows.append((g, attribute_lift(kern, groups[:m], k=k_g, labels=wnids[:m]).mean_lift,
                 attribute_lift(kern, nodes[:m], k=k_g, labels=wnids[:m]).mean_lift, float(kern.mean.mean())))
import pandas as pd
lifts = pd.DataFrame(rows, columns=["gamma", "colour_lift", "node_lift", "mean_probe_loss"]).set_index("gamma")
print(lifts.round(3).to_string())
values = table.to_numpy()
assert np.allclose(np.diag(values), 1.0) and np.allclose(values, values.T)
assert (values[~np.eye(len(values), dtype=bool)] < 1.0 - 1e-6).all(), "different γ give different kernels"
if SCALE == "ci":   # tighter localization keeps the chains, and the probe loss, closer to w*
    assert lifts["mean_probe_loss"].is_monotonic_decreasing, lifts
plot_gamma_sweep(table, lifts, {g: correlation_by_tree_distance(kern, wnids[:kern.num_samples], hierarchy)
                                for g, kern in sweep.items()})
'''),
("md", '''
## The numbers, and the script twin

`losskernel_examples.imagenet.run_imagenet_kernel(imagenet_dir, weights, scale)` runs
this notebook's pipeline as a function (figures as PNGs, `kernel.pt` and `numbers.json`
in its `work_dir`): `python -m losskernel_examples.imagenet --imagenet-dir /data/imagenet
--weights googlenet-1378be20.pth --scale paper`. How to run it at paper scale on one or
several GPUs, and measured times, are in `tutorials/README.md`.
'''),
("code", '''
kernel.save(os.path.join(WORK_DIR, "kernel.pt"))
print(f"scale {SCALE}: n = {kernel.num_samples} images ({cfg.image_size}×{cfg.image_size}) of {len(classes)} classes, "
      f"{kernel.num_draws} draws in {seconds:.0f} s, γ sweep {sweep_seconds:.0f} s, on {DEVICE}")
print(f"CKA after {curve[0][0]} draws {curve[0][1]:.3f}; max taxonomic lift {np.nanmax(lift.to_numpy()):.2f}; "
      f"colour lift {colour_lift.mean_lift:.2f}; WordNet-node lift {node_lift.mean_lift:.2f}")
'''),
]
notebook(cells, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "03_inception_imagenet.ipynb"), devinterp_major=1)
