"""Development task: digits fallback, checkpoints of one run, kernel numbers, consecutive CKA."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from devinterp_losskernel.hierarchy import fashion_mnist_hierarchy
from losskernel_examples.development import (
    DIGITS_EPOCHS,
    SCALES,
    DevelopmentScale,
    consecutive_cka,
    knn_label_purity,
    load_development_data,
    load_digits_data,
    structure_numbers,
    train_with_checkpoints,
)
from losskernel_examples.fashion_wordnet import accuracy, top_level_groups


def test_digits_fallback_data():
    data = load_digits_data(num_test=300, seed=0)
    assert data.train_x.shape == (1797 - 300, 1, 8, 8) and data.test_x.shape == (300, 1, 8, 8)
    assert data.raw_test.shape == (300, 8, 8) and data.raw_test.dtype == np.uint8
    assert set(np.unique(data.test_y.numpy())) == set(range(10))
    assert abs(float(torch.cat([data.train_x, data.test_x]).mean())) < 1e-4
    assert data.class_names == tuple("0123456789")


def test_load_development_data_falls_back_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("LOSSKERNEL_FASHION_MNIST_DIR", str(tmp_path))   # empty: not found there…
    monkeypatch.setattr("losskernel_examples.fashion_mnist.DEBIAN_DIR", tmp_path / "none")  # …nor here
    with pytest.warns(UserWarning, match="digits"):
        data = load_development_data(dataset="auto")
    assert data.source.startswith("scikit-learn digits")
    from losskernel_examples.fashion_mnist import FashionMNISTNotFound

    with pytest.raises(FashionMNISTNotFound):
        load_development_data(dataset="fashion")
    with pytest.raises(ValueError, match="dataset"):
        load_development_data(dataset="mnist")


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is faster, above all on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_checkpoints_are_the_weights_of_one_run(one_thread):
    data = load_digits_data(seed=0)
    cfg = replace(SCALES["ci"], num_train=None, epochs=3, checkpoint_steps=(0, 2, 10, 10_000))
    models, trained = train_with_checkpoints(data, cfg, seed=0)
    total = DIGITS_EPOCHS * -(-len(data.train_y) // 128)   # the digits train longer than cfg.epochs
    assert sorted(models) == [0, 2, 10, total], "steps past the end are clipped to the last step"
    for p, q in zip(models[total].parameters(), trained.model.parameters()):
        assert torch.equal(p, q)
    acc = {s: accuracy(m, data.test_x, data.test_y) for s, m in models.items()}
    assert acc[0] < 0.3 and acc[total] > 0.85
    assert not torch.equal(models[0].classifier[2].weight, models[2].classifier[2].weight)
    # the snapshots are copies: later training did not change the step-10 weights
    assert not torch.equal(models[10].classifier[2].weight, models[total].classifier[2].weight)
    # (train_cnn's determinism is tested in test_examples_fashion_wordnet.py)


def _kernel_with_branches(labels, groups, branch, same_label, seed=0):
    rng = np.random.default_rng(seed)
    n = len(labels)
    R = branch * (groups[:, None] == groups[None, :]) + same_label * (labels[:, None] == labels[None, :])
    R = R + 0.05 * rng.standard_normal((n, n))
    R = (R + R.T) / 2
    np.fill_diagonal(R, 1.0)
    return R


def test_structure_numbers_tell_branch_structure_from_label_structure():
    labels = np.repeat(np.arange(10), 10)
    groups = top_level_groups(fashion_mnist_hierarchy(use_wordnet=False), labels)
    label_only = structure_numbers(_kernel_with_branches(labels, groups, 0.0, 0.5), labels, groups, k=5)
    both = structure_numbers(_kernel_with_branches(labels, groups, 0.3, 0.5), labels, groups, k=5)
    # a kernel coupling only same-label samples: perfect label purity, branch lift at chance
    assert label_only["knn_label_purity"] == pytest.approx(1.0)
    assert 0.6 < label_only["branch_lift"] < 1.4
    # add coupling within branches: the lift sees it, the purity cannot
    assert both["branch_lift/footwear"] == pytest.approx(4.5)
    assert both["branch_lift"] > 1.5 and both["mean_R/within_minus_across"] > 0.25
    assert "probe_loss/at_w_star" not in both   # a plain matrix has no probe losses
    assert set(structure_numbers(np.eye(100) + 0.01, labels, None, k=5)) == {"knn_label_purity"}


def test_knn_label_purity():
    labels = np.repeat(np.arange(4), 5)
    R = (labels[:, None] == labels[None, :]).astype(float) + 0.01 * np.eye(20)
    assert knn_label_purity(R, labels, k=4) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((200, 200))
    noise = noise @ noise.T
    labels = np.repeat(np.arange(10), 20)
    assert knn_label_purity(noise, labels, k=10) < 0.25


def test_consecutive_cka():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((30, 50))
    K1 = a @ a.T
    K2 = K1 + 0.01 * np.eye(30)
    b = rng.standard_normal((30, 50))
    K3 = b @ b.T
    out = consecutive_cka({10: K2, 0: K1, 20: K3})
    assert [(s, t) for s, t, _ in out] == [(0, 10), (10, 20)]
    assert out[0][2] > 0.99 and out[1][2] < 0.9


def test_scales():
    for name, cfg in SCALES.items():
        assert isinstance(cfg, DevelopmentScale)
        assert cfg.checkpoint_steps[0] == 0 and list(cfg.checkpoint_steps) == sorted(cfg.checkpoint_steps), name
        assert len(cfg.checkpoint_steps) >= 3
        assert cfg.kernel_scale().sampler_kwargs()["localization"] == cfg.localization
    # the last checkpoint is the end of training (60,000 / 128 = 469 steps per epoch)
    assert SCALES["cpu"].checkpoint_steps[-1] == 2 * 469
    assert SCALES["ci"].checkpoint_steps[-1] == 2 * 94


def test_development_kernels_on_digits(one_thread):
    from conftest import require_devinterp

    require_devinterp(1)
    from losskernel_examples.development import development_kernels
    from losskernel_examples.fashion_wordnet import balanced_probe

    data = load_digits_data(seed=0)
    cfg = replace(SCALES["ci"], num_train=None, epochs=1, checkpoint_steps=(0, 11), num_probe=50,
                  num_chains=2, num_draws=5, num_burnin_steps=2, batch_size=64)
    models, _ = train_with_checkpoints(data, cfg, seed=0)
    index = balanced_probe(data.test_y.numpy(), 50)
    kernels = development_kernels(models, data, index, cfg, seed=0)
    assert sorted(kernels) == [0, 11, DIGITS_EPOCHS * 11]   # the end of training is always kept
    for kernel in kernels.values():
        assert kernel.num_samples == 50 and kernel.num_draws == 10
        assert torch.isfinite(kernel.covariance).all()
    # different weights, same probe and seeds: different kernels
    assert not torch.allclose(kernels[0].covariance, kernels[11].covariance)
