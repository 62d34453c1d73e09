"""Fashion-MNIST + WordNet task: data, CNN, training, probe, branch grouping, lift helpers."""

import numpy as np
import pytest
import torch

from devinterp_losskernel.hierarchy import Hierarchy, fashion_mnist_hierarchy
from losskernel_examples.fashion_mnist import FashionMNISTNotFound, find_fashion_mnist, write_idx
from losskernel_examples.fashion_wordnet import (
    CLASS_NAMES,
    SCALES,
    FashionData,
    SmallCNN,
    accuracy,
    balanced_probe,
    group_neighbour_lift,
    load_fashion_data,
    mean_correlation_by_branch,
    split_depth,
    top_level_groups,
    train_cnn,
    training_loader,
)


def _fake_idx_folder(folder, n_train=60, n_test=40, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return folder


def test_load_fashion_data_from_idx_files(tmp_path):
    data = load_fashion_data(root=_fake_idx_folder(tmp_path))
    assert data.train_x.shape == (60, 1, 28, 28) and data.train_x.dtype == torch.float32
    assert data.test_x.shape == (40, 1, 28, 28) and data.raw_test.dtype == np.uint8
    assert torch.equal(data.test_y, torch.arange(40) % 10)
    # normalised: pixel 0 → -mean/std, 255 → (1 - mean)/std
    assert float(data.train_x.min()) == pytest.approx(-0.2860 / 0.3530, abs=1e-5)
    sub = load_fashion_data(25, root=tmp_path, seed=1)
    assert sub.train_x.shape[0] == 25


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FashionMNISTNotFound, match="dataset-fashion-mnist"):
        load_fashion_data(root=tmp_path)


def test_balanced_probe():
    labels = np.repeat(np.arange(10), 50)
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    index = balanced_probe(labels, 103, seed=0)
    assert len(index) == 103 and len(np.unique(index)) == 103
    counts = np.bincount(labels[index], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert np.all(np.diff(labels[index]) >= 0), "sorted by class"
    assert np.array_equal(index, balanced_probe(labels, 103, seed=0))
    assert not np.array_equal(index, balanced_probe(labels, 103, seed=1))
    with pytest.raises(ValueError, match="at least the number of classes"):
        balanced_probe(labels, 5)
    with pytest.raises(ValueError, match="fewer than"):
        balanced_probe(labels, 600)


def test_small_cnn_shapes_and_size():
    model = SmallCNN()
    assert sum(p.numel() for p in model.parameters()) == 26_698
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert SmallCNN(image_size=8)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def _separable(n=400, seed=0):
    """Images whose class is written in their brightness pattern: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = torch.randn(n, 1, 28, 28, generator=g) * 0.3
    for c in range(10):
        x[y == c, 0, c * 2:(c * 2) + 6, :] += 2.0
    return x, y


def test_train_cnn_learns_is_deterministic_and_snapshots():
    x, y = _separable()
    a = train_cnn(x, y, epochs=3, batch_size=64, seed=0, snapshot_steps=(0, 5), eval_x=x, eval_y=y, log_every=5)
    assert accuracy(a.model, x, y) > 0.9
    assert set(a.snapshots) == {0, 5}
    assert a.history[-1]["step"] == 3 * 7 and "test_accuracy" in a.history[-1]
    assert a.history[-1]["train_loss"] < a.history[0]["train_loss"]
    fresh = SmallCNN()
    torch.manual_seed(0)
    fresh = SmallCNN()
    for key, value in fresh.state_dict().items():      # step 0 is the seeded initialisation
        assert torch.equal(a.snapshots[0][key], value)
    assert not torch.equal(a.snapshots[5]["classifier.2.weight"], a.snapshots[0]["classifier.2.weight"])
    b = train_cnn(x, y, epochs=3, batch_size=64, seed=0)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="snapshot_steps"):
        train_cnn(x, y, epochs=1, batch_size=64, snapshot_steps=(1000,))


def test_fractional_epochs_stop_part_way():
    x, y = _separable(200)
    result = train_cnn(x, y, epochs=0.5, batch_size=20, log_every=1)
    assert result.history[-1]["step"] == 5


def test_training_loader_batches():
    x, y = _separable(100)
    loader = training_loader(x, y, 32, seed=0)
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [32, 32, 32, 4]
    assert torch.equal(torch.sort(torch.cat([b[1] for b in batches])).values, torch.sort(y).values)


def test_branches_of_the_fallback_tree():
    h = fashion_mnist_hierarchy(use_wordnet=False)
    assert split_depth(h) == 1
    groups = top_level_groups(h, np.arange(10))
    assert dict(zip(CLASS_NAMES, groups)) == {
        "T-shirt/top": "clothing", "Trouser": "clothing", "Pullover": "clothing", "Dress": "clothing",
        "Coat": "clothing", "Sandal": "footwear", "Shirt": "clothing", "Sneaker": "footwear",
        "Bag": "bag", "Ankle boot": "footwear"}


def test_branches_of_the_wordnet_tree():
    from _wordnet import require_wordnet

    require_wordnet()
    h = fashion_mnist_hierarchy(use_wordnet=True)
    depth = split_depth(h)
    assert depth == 5   # artifact → commodity / covering / instrumentality
    assert list(top_level_groups(h, [5, 7, 9, 8, 0, 3])) == ["footwear"] * 3 + ["bag", "clothing", "clothing"]


def test_split_depth_of_a_custom_tree():
    h = Hierarchy.from_parents({"a": "r", "b": "r", "x": "a", "y": "a", "z": "b"})
    assert split_depth(h, ["x", "y", "z"]) == 1
    assert split_depth(h, ["x", "y"]) == 2


def _block_kernel(labels, groups, within=0.4, noise=0.05, seed=0):
    """A correlation matrix where different-label samples of one group correlate."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    R = within * (groups[:, None] == groups[None, :]) + noise * rng.standard_normal((n, n))
    R = (R + R.T) / 2
    np.fill_diagonal(R, 1.0)
    return R


def test_group_neighbour_lift_and_branch_means():
    labels = np.repeat(np.arange(10), 12)
    groups = top_level_groups(fashion_mnist_hierarchy(use_wordnet=False), labels)
    R = _block_kernel(labels, groups)
    lift = group_neighbour_lift(R, groups, labels, k=10)
    assert lift.excluded_same_label
    # every different-label neighbour is in the query's branch: lift = 1 / chance
    assert lift.per_group.loc["footwear", "lift"] == pytest.approx(9 / 2)
    assert lift.per_group.loc["clothing", "lift"] == pytest.approx(9 / 5)
    assert np.isnan(lift.per_group.loc["bag", "lift"])
    means = mean_correlation_by_branch(R, groups, labels)
    assert means["within"] == pytest.approx(0.4, abs=0.02) and abs(means["across"]) < 0.02
    # a structureless kernel: lift ≈ 1
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((120, 120))
    noise = (noise + noise.T) / 2
    np.fill_diagonal(noise, 5.0)
    assert 0.7 < group_neighbour_lift(noise, groups, labels, k=10).pooled_lift < 1.3


def test_scales_are_consistent():
    for name, cfg in SCALES.items():
        assert cfg.num_probe % 10 == 0, name
        kwargs = cfg.sampler_kwargs()
        assert kwargs["num_chains"] * kwargs["num_draws"] >= 2
        assert set(kwargs) == {"num_chains", "num_draws", "num_burnin_steps", "num_steps_bw_draws",
                               "lr", "nbeta", "localization"}
    assert SCALES["ci"].num_probe < SCALES["cpu"].num_probe <= SCALES["paper"].num_probe


def test_real_fashion_mnist_if_installed():
    try:
        find_fashion_mnist(split="test")
    except FashionMNISTNotFound:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    data = load_fashion_data(1000)
    assert data.train_x.shape == (1000, 1, 28, 28) and data.test_x.shape == (10_000, 1, 28, 28)
    assert np.bincount(data.test_y.numpy()).tolist() == [1000] * 10


def test_sample_kernel_runs_on_a_tiny_probe(tmp_path):
    from conftest import require_devinterp

    require_devinterp(1)
    from dataclasses import replace

    from losskernel_examples.fashion_wordnet import sample_kernel

    x, y = _separable(200)
    data = FashionData(train_x=x, train_y=y, test_x=x[:50], test_y=y[:50],
                       raw_test=np.zeros((50, 28, 28), dtype=np.uint8))
    model = train_cnn(x, y, epochs=2, batch_size=50).model
    cfg = replace(SCALES["ci"], num_probe=20, num_chains=2, num_draws=5, num_burnin_steps=2, batch_size=50)
    index = balanced_probe(data.test_y.numpy(), 20)
    kernel = sample_kernel(model, data, index, cfg, seed=0, verbose=False)
    assert kernel.num_samples == 20 and kernel.num_draws == 10
    assert torch.equal(torch.as_tensor(kernel.labels), data.test_y[index])
    assert torch.isfinite(kernel.covariance).all()
