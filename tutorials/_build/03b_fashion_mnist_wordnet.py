import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_nb import notebook, install_cell, FASHION_MNIST_COLAB

INSTALL = install_cell(FASHION_MNIST_COLAB)

cells = [
("md", '''
# Fashion-MNIST and WordNet on a CPU

Paper, Section 4 and Appendix D.2, at laptop scale on real images. The paper samples the loss
kernel of Inception-v1 on 10,000 ImageNet validation images and finds that its structure
follows the WordNet hierarchy: a UMAP of 1 − R whose regions are WordNet branches, a
correlation matrix that, sorted by the hierarchy, mirrors the tree-distance matrix, and a
*taxonomic lift* > 1: a sample's most correlated inputs *of other classes* share its WordNet
ancestors more often than chance.

Here the same pipeline runs in minutes on a CPU:

1. a small CNN (26,698 parameters) is trained on Fashion-MNIST;
2. its ten classes are placed in WordNet 3.0 (`fashion_mnist_hierarchy()`): *clothing*
   (T-shirt ⊂ shirt, pullover ⊂ sweater, coat ⊂ overgarment, trouser, dress), *footwear*
   (sandal and sneaker ⊂ shoe, boot) and *bag* (⊂ container);
3. the loss kernel K(x, x′) = Cov_w[ℓ(x; w), ℓ(x′; w)] is sampled with SGLD
   (`estimate_loss_kernel`) on a class-balanced probe of held-out test images;
4. we read it against the tree: taxonomic lift curves, the hierarchy-sorted correlation
   beside the hierarchy distance, a UMAP coloured by hierarchy position, top-k neighbours.

Nothing is downloaded: the images come from Debian's `dataset-fashion-mnist`, WordNet from
Debian's `wordnet-base` (or nltk's own copy).

[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/timaeus-research/devinterp-losskernel/blob/main/tutorials/03b_fashion_mnist_wordnet.ipynb)
'''),
("code", INSTALL),
("code", '''
import os
import time
import warnings

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from devinterp_losskernel.analysis import taxonomic_lift, top_correlated, umap_embedding
from devinterp_losskernel.hierarchy import fashion_mnist_hierarchy
from devinterp_losskernel.plotting import (
    plot_embedding, plot_hierarchy_sorted_matrix, plot_lift_curves, plot_top_k_grid,
)
from losskernel_examples.fashion_mnist import FashionMNISTNotFound
from losskernel_examples.fashion_wordnet import (
    CLASS_NAMES, SCALES, accuracy, balanced_probe, group_neighbour_lift, load_fashion_data,
    mean_correlation_by_branch, sample_kernel, split_depth, top_level_groups, train_cnn,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# LOSSKERNEL_TUTORIAL_SCALE: "ci" (the test suite's small run: 12,000 training images, a
# 500-image probe, 240 draws), "cpu" (the default without a GPU: all 60,000 training images,
# a 1,000-image probe, 600 draws) or "paper" (the default on a GPU: the paper's 10,000
# held-out images and 15 chains × 500 draws).
SCALE = os.environ.get("LOSSKERNEL_TUTORIAL_SCALE", "paper" if DEVICE == "cuda" else "cpu")
if SCALE == "full":
    SCALE = "paper" if DEVICE == "cuda" else "cpu"
cfg = SCALES[SCALE]
K_NEIGHBOURS = 30   # the paper's k for the taxonomic lift
if DEVICE == "cpu":
    # The CNN is small (27k parameters, minibatches of 128): a second thread gains little,
    # and on a machine shared with other jobs, threads that wait on each other cost a lot.
    torch.set_num_threads(1)
# devinterp warns that a chain cycles through the training batches more than once (it
# reshuffles each pass, which is what we want); it does not concern the kernel.
warnings.filterwarnings("ignore", message=r"You are taking more")
print(DEVICE, SCALE, cfg)
'''),
("md", '''
## The data and the hierarchy

`load_fashion_data` reads the IDX files (`$LOSSKERNEL_FASHION_MNIST_DIR`, else
`/usr/share/datasets/fashion-mnist`) and normalises the pixels. Where they are missing it
stops with a message that says how to install them.

`fashion_mnist_hierarchy()` puts each class at its WordNet synset and keeps, for every
synset, the hypernym with the longest path to `entity` (see `devinterp_losskernel.hierarchy`).
The tree first splits the ten classes at depth 5, `artifact → commodity` (clothing),
`→ covering` (footwear) and `→ instrumentality` (bag). Note WordNet's own quirks: a T-shirt
is a kind of shirt, so "Shirt" is an inner node, and the dress hangs from *woman's clothing*,
not from *garment*. Without WordNet a hand-written tree with the same three branches is used
(and `hierarchy.source` says so).
'''),
("code", '''
try:
    data = load_fashion_data(cfg.num_train, seed=0)
except FashionMNISTNotFound as error:
    raise RuntimeError("This tutorial needs the Fashion-MNIST IDX files on this machine.\\n"
                       f"{error}") from None
print(f"{data.source}: {len(data.train_y)} training images, {len(data.test_y)} test images, "
      f"shape {tuple(data.train_x.shape[1:])}")

hierarchy = fashion_mnist_hierarchy()
print(hierarchy.source)
print(hierarchy.to_text())
SPLIT = split_depth(hierarchy)                       # where clothing / footwear / bag part
branch_of_class = dict(zip(CLASS_NAMES, top_level_groups(hierarchy, np.arange(10)).tolist()))
print(f"the classes split at depth {SPLIT}:", branch_of_class)
'''),
("md", '''
## Train the CNN

Two conv layers (8 and 16 channels, 3×3, max-pooling), a hidden layer of 32 and ten logits:
26,698 parameters. Adam (lr 2·10⁻³), minibatch 128, two epochs, seeded: one to two minutes
on one CPU thread for all 60,000 images, 87% test accuracy (81% at CI size, on 12,000
images). It is not a state-of-the-art model: the question is what structure the trained
network's loss landscape holds, not how good it is.
'''),
("code", '''
trained = train_cnn(data.train_x, data.train_y, epochs=cfg.epochs, seed=0, log_every=200, verbose=True)
model = trained.model
test_accuracy = accuracy(model, data.test_x, data.test_y)
print(f"trained in {trained.seconds:.0f} s: test accuracy {test_accuracy:.3f}")
assert test_accuracy > 0.75, "the CNN should have learned Fashion-MNIST (chance is 0.10)"
'''),
("md", '''
## Sample the loss kernel

The probe: `cfg.num_probe` *test* images, the same number from every class (the paper
probes validation images too). SGLD runs on the training images with devinterp's SGLD
(`lr` = ε, `nbeta` = nβ, `localization` = γ); at every draw the probe's per-image
cross-entropies are folded into the running covariance.

**Hyperparameters.** The paper's ImageNet row of Table 1 (ε = 5·10⁻⁵, nβ = 20, γ = 4,000)
is for a 7M-parameter Inception-v1 on 1.28M images. On this CNN, a sweep at CI size
(recorded in `tutorials/README.md`) showed that loose localisation (nβ = 20, γ = 1,000) lets
the chains climb out of the basin (probe loss 0.55 → 0.63) and leaves a kernel whose
cross-class neighbours are no better than chance; γ = 10⁴ keeps the probe loss at its
value at w* and brings out the structure below. We use **ε = 5·10⁻⁵, nβ = 100, γ = 10⁴**
(εγ/2 = 0.25, so a chain relaxes within a few steps) and take a draw every 2 steps.
'''),
("code", '''
probe_index = balanced_probe(data.test_y.numpy(), cfg.num_probe, seed=0)
labels = data.test_y.numpy()[probe_index]            # class index per probe image
names = np.array(CLASS_NAMES)[labels]
branch = top_level_groups(hierarchy, labels)         # clothing / footwear / bag per probe image
images = data.raw_test[probe_index]                  # uint8, for display
print(f"probe: {len(probe_index)} test images, {len(probe_index) // 10} per class; "
      f"SGLD on {len(data.train_y)} training images")

started = time.perf_counter()
kernel = sample_kernel(model, data, probe_index, cfg, seed=0, device=DEVICE)
seconds = time.perf_counter() - started
print(kernel, f"  {seconds:.0f} s")
print(f"mean probe loss: {kernel.init_loss.mean():.3f} at w*, {kernel.mean.mean():.3f} over the draws")
assert kernel.mean.mean() < 1.5 * kernel.init_loss.mean() + 0.1, "the chains should stay in the basin"
'''),
("md", '''
## 1. Taxonomic lift (Fig. 5)

For each probe image i (label y(i) at depth d(i)), take its k = 30 most correlated probe
images **with a different label** (same-label pairs co-vary for reasons unrelated to the
function, Appendix B, and would make the lift trivial). Lift(d, d′) is the fraction of those
neighbours whose label shares an ancestor at depth d′ with y(i), over the same fraction for
all different-label images (chance), averaged over the queries at depth d. Lift = 1 is
chance; everything shares the root, so Lift(d, d′ ≤ 4) = 1 (the classes only part at
depth 5).
'''),
("code", '''
lift = taxonomic_lift(kernel, labels, hierarchy, k=K_NEIGHBOURS)
print(lift.round(2).to_string())
for depth in lift.index:
    members = sorted({CLASS_NAMES[c] for c in np.unique(labels)
                      if hierarchy.depth(hierarchy.node_of(int(c))) == depth})
    print(f"  query depth {depth}: {', '.join(members)}")
plot_lift_curves(lift, title=f"Taxonomic lift, Fashion-MNIST CNN ({SCALE} scale, k = {K_NEIGHBOURS})")
'''),
("md", '''
**Footwear with footwear.** Sandal, sneaker and ankle boot share `footwear` (depth 6); only
2 of the 9 other classes are footwear, so chance is 2/9 and the largest possible lift 4.5.
(The bag sits at depth 7 beside the ankle boot, but shares nothing at depth 6 with any other
class, so it adds nothing to either side of that row's ratio: Lift(7, 6) is the ankle
boot's.)
Clothing queries share `clothing` (depth 7) with 5 of the 9 other classes: chance is 5/9
and the ceiling 1.8. A control: the same lift after shuffling which
kernel row belongs to which image is ≈ 1 everywhere.
'''),
("code", '''
def node_depth(*classes):
    """Depth of the lowest common ancestor of the given class names."""
    node = hierarchy.node_of(CLASS_NAMES.index(classes[0]))
    for other in classes[1:]:
        node = hierarchy.lowest_common_ancestor(node, hierarchy.node_of(CLASS_NAMES.index(other)))
    return hierarchy.depth(node)

FOOTWEAR_DEPTH = node_depth("Sandal", "Sneaker", "Ankle boot")      # the shared parent, 'footwear'
CLOTHING = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Shirt")
CLOTHING_DEPTH = node_depth(*CLOTHING)                               # 'clothing'
clothing_queries = sorted({hierarchy.depth(hierarchy.node_of(CLASS_NAMES.index(c))) for c in CLOTHING})
footwear_queries = [hierarchy.depth(hierarchy.node_of(CLASS_NAMES.index(c))) for c in ("Sandal", "Sneaker", "Ankle boot")]
footwear_lift = {d: float(lift.loc[d, FOOTWEAR_DEPTH]) for d in sorted(set(footwear_queries))}
print(f"lift at the footwear node (depth {FOOTWEAR_DEPTH}) for footwear queries, by query depth: "
      + ", ".join(f"d = {d}: {v:.2f}" for d, v in footwear_lift.items()))

rng = np.random.default_rng(0)
shuffle = rng.permutation(len(labels))
R = kernel.correlation.cpu().numpy()
control = taxonomic_lift(R[np.ix_(shuffle, shuffle)], labels, hierarchy, k=K_NEIGHBOURS)
print(f"control (kernel rows shuffled against the images): lift at depth {FOOTWEAR_DEPTH} "
      + ", ".join(f"d = {d}: {float(control.loc[d, FOOTWEAR_DEPTH]):.2f}" for d in footwear_lift))

# bounds: a kernel that ignores the hierarchy gives ≈ 1 (the control); the trained CNN's is far above
assert min(footwear_lift.values()) > 1.3, "footwear images' cross-class neighbours should be footwear"
assert all(0.75 < float(control.loc[d, FOOTWEAR_DEPTH]) < 1.3 for d in footwear_lift), "the control should be at chance"
'''),
("md", '''
### By branch and by class

`group_neighbour_lift` is `attribute_lift` with the branch (clothing / footwear / bag) as the
attribute: the share of a query's different-label neighbours in its own branch, over
chance. The bag is a branch of one class, so it has no different-label same-branch images
(no lift). The table below it gives, for each class, where its 30 neighbours of other
classes fall.
'''),
("code", '''
branch_lift = group_neighbour_lift(kernel, branch, labels, k=K_NEIGHBOURS)
print(branch_lift.per_group.round(3).to_string())
print(f"pooled branch lift {branch_lift.pooled_lift:.2f}")

neighbours, _ = top_correlated(kernel, None, K_NEIGHBOURS, labels=labels, exclude_same_label=True)
share = pd.DataFrame({b: (branch[neighbours] == b).mean(axis=1) for b in ("clothing", "footwear", "bag")})
share["class"] = names
table = share.groupby("class", sort=False).mean()
own = {b: sum(v == b for v in branch_of_class.values()) for b in ("clothing", "footwear", "bag")}
table["own branch"] = [table.loc[c, branch_of_class[c]] for c in table.index]
table["chance"] = [(own[branch_of_class[c]] - 1) / 9 for c in table.index]   # other classes of the branch / 9
print("share of each class's different-label neighbours in each branch, and in its own against chance:")
print(table.round(2).to_string())
assert branch_lift.per_group.loc["footwear", "lift"] > 1.3
'''),
("md", '''
## 2. The correlation sorted by the hierarchy, beside the hierarchy distance (Fig. 1B)

Samples in the tree's leaf order (shirt, T-shirt, trouser, pullover, coat, dress | sandal,
sneaker, ankle boot | bag); left the correlation R̂, right the tree distance between the
labels. The same-class blocks on the diagonal are strongly positive (the same-label
coupling of Appendix B); off the diagonal, blocks are *negative* between classes the network
confuses (shirt and T-shirt, pullover and coat, sandal and sneaker) and pale elsewhere. The
class-averaged matrix below it shows the same at a glance.
'''),
("code", '''
plot_hierarchy_sorted_matrix(kernel, labels, hierarchy,
                             title=f"Loss correlation sorted by WordNet ({len(labels)} test images)")
'''),
("code", '''
leaf_classes = [c for c in hierarchy.leaf_order() if c in CLASS_NAMES]   # classes in tree order
R_off = R.copy()
np.fill_diagonal(R_off, np.nan)
class_mean = np.array([[np.nanmean(R_off[np.ix_(names == a, names == b)]) for b in leaf_classes] for a in leaf_classes])
tree = hierarchy.distance_matrix([CLASS_NAMES.index(c) for c in leaf_classes])
fig = Figure(figsize=(12, 5))
left, right = fig.subplots(1, 2)
off = class_mean[~np.eye(10, dtype=bool)]
limit = float(np.abs(off).max())
image = left.imshow(class_mean, cmap="RdBu_r", vmin=-limit, vmax=limit)
fig.colorbar(image, ax=left, shrink=0.8, label="mean R (diagonal: same class, clipped)")
left.set_title("mean loss correlation between classes")
image = right.imshow(tree, cmap="viridis_r")
fig.colorbar(image, ax=right, shrink=0.8, label="tree distance (edges)")
right.set_title("WordNet distance between classes")
for ax in (left, right):
    ax.set_xticks(range(10), leaf_classes, rotation=90, fontsize=8)
    ax.set_yticks(range(10), leaf_classes, fontsize=8)
fig
'''),
("md", '''
Between classes, the mean correlation is *negative* within a branch and near zero across
branches: a weight perturbation that lowers the loss of sandals tends to raise that of
sneakers (the two classes compete for the same images' logits), while it hardly moves
trousers. So the class-mean correlation *rises* with the tree distance (a positive
correlation below), while the most correlated individual images, the positive tail the
lift counts, sit in the same branch. Both say the kernel couples the classes the hierarchy
puts together and leaves the others alone; the sign depends on whether one looks at
averages or at nearest neighbours.
'''),
("code", '''
by_branch = mean_correlation_by_branch(kernel, branch, labels)
print("mean R over different-label pairs: "
      + ", ".join(f"{key} {value:+.4f}" for key, value in by_branch.items()))
print("correlation between the class-mean R (off the diagonal) and the tree distance: "
      f"{np.corrcoef(off, tree[~np.eye(10, dtype=bool)])[0, 1]:+.2f}")
'''),
("md", '''
## 3. UMAP of 1 − R, coloured by hierarchy position (Fig. 1A)

UMAP on d(x, x′) = 1 − R(x, x′) from each image's 15 nearest images, with **same-label edges
removed** during the neighbour search (Appendix B), so images of one class are never
neighbours just because they share a label. Colours follow the hierarchy's leaf order on a
cyclic map: nearby categories get nearby hues (the paper's colouring); then the same map by
class name.
'''),
("code", '''
emb = umap_embedding(kernel, labels=labels, n_neighbors=15, random_state=0)
plot_embedding(emb, labels=labels, hierarchy=hierarchy,
               title=f"UMAP of 1 - R, coloured by WordNet position ({SCALE} scale)")
'''),
("code", '''
plot_embedding(emb, labels=np.array([f"{branch_of_class[n]}: {n}" for n in names]),
               title="the same UMAP, by branch and class")
'''),
("md", '''
### Explore the kernel

The same map as one self-contained, offline HTML page (`explore`, shown inline below): hover
an image for its thumbnail, class, WordNet path, K(x,x) and mean loss; click it for its 15
most (or least) correlated images with R and lines to them, optionally hiding its own class;
colour by WordNet position, class or K(x,x); search "footwear" or "clothing".
'''),
("code", '''
from devinterp_losskernel.explore import explore

explore(kernel, embedding=emb, images=images, labels=labels, hierarchy=hierarchy,
        label_names=CLASS_NAMES, color_by="hierarchy", path="fashion_mnist_explorer.html")
'''),
("md", '''
## 4. Top-k neighbours (Fig. 4)

For a few query images (red frame), the six most correlated probe images *of other
classes*, with R above each. What the network treats as alike is mostly the silhouette: at
CPU scale (seed 0) the ankle boot's neighbours are sandals, the bag's are sneakers (wide,
flat, dark at the bottom), the pullover's are long bright dresses, the trouser's long coats;
a few rows cross branches by shape (a sandal next to trousers and a dress, a sneaker next to
bags with handles). Texture shows within them: patterned garments next to patterned ones.
'''),
("code", '''
queries = [int(np.flatnonzero(names == c)[0]) for c in ("Sandal", "Sneaker", "Ankle boot", "Shirt", "Pullover", "Trouser", "Bag")]
idx, val = top_correlated(kernel, queries, 6, labels=labels, exclude_same_label=True)
plot_top_k_grid(images, queries, idx, val, labels=names,
                title="most correlated test images of other classes")
'''),
("md", '''
And with same-label neighbours allowed: they fill the rows (at CPU scale all 42 of these
neighbours share the query's label), the same-label coupling that the lift and the UMAP
leave out.
'''),
("code", '''
idx_all, val_all = top_correlated(kernel, queries, 6)
same_label_share = float((labels[idx_all] == labels[np.array(queries)][:, None]).mean())
print(f"share of same-label images among these neighbours: {same_label_share:.2f}")
plot_top_k_grid(images, queries, idx_all, val_all, labels=names, title="most correlated test images, any class")
'''),
("md", '''
## The finding in numbers

`python -m losskernel_examples.fashion_wordnet --scale cpu` runs the same pipeline
as a script. Measured values at each scale, with wall times and hardware, are in
`tutorials/README.md` (section "03b Fashion-MNIST and WordNet").
'''),
("code", '''
print(f"scale {SCALE}: CNN test accuracy {test_accuracy:.3f}; probe n = {kernel.num_samples}, "
      f"{kernel.num_draws} draws, sampling {seconds:.0f} s on {DEVICE}")
print(f"probe loss {kernel.init_loss.mean():.3f} at w*, {kernel.mean.mean():.3f} over the draws; "
      f"devinterp LLC {kernel.metadata['llc/mean']:.2f}")
print(f"taxonomic lift at the footwear node (depth {FOOTWEAR_DEPTH}), footwear queries: "
      + ", ".join(f"d = {d}: {v:.2f}" for d, v in footwear_lift.items()) + "  (chance 1, ceiling 4.5)")
print(f"taxonomic lift at the clothing node (depth {CLOTHING_DEPTH}), clothing queries: "
      + ", ".join(f"d = {d}: {float(lift.loc[d, CLOTHING_DEPTH]):.2f}" for d in clothing_queries)
      + "  (ceiling 1.8: 5 of the 9 other classes are clothing)")
print("branch lift (k = 30, different-label neighbours): "
      + ", ".join(f"{g} {v:.2f}" for g, v in branch_lift.per_group["lift"].dropna().items())
      + f", pooled {branch_lift.pooled_lift:.2f}")
print(f"mean R, different-label pairs: same branch {by_branch['within']:+.4f}, across {by_branch['across']:+.4f}")
'''),
]
notebook(cells, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "03b_fashion_mnist_wordnet.ipynb"), devinterp_major=1)
