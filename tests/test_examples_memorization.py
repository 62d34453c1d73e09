"""The memorization task: IDX reader, relabelling, training, baseline scores (all fast)."""

import gzip
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from losskernel_examples import fashion_mnist as fm
from losskernel_examples.fashion_mnist import (
    FashionMNISTNotFound,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx,
    write_idx,
)
from losskernel_examples.memorization import (
    MemorizationConfig,
    ekfac_self_influence,
    get_config,
    load_images,
    loss_at_w_star,
    make_mlp,
    memorization_data,
    per_sample_grad_norm,
    relabel,
    score_table,
    tracin_self_influence,
    train_to_memorization,
)


def idx_bytes(array: np.ndarray, code: int, big_endian_dtype: str) -> bytes:
    """An IDX file built by hand (independently of write_idx)."""
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(big_endian_dtype).tobytes()


@pytest.fixture
def tiny_fashion(tmp_path):
    """A 7-image Fashion-MNIST look-alike: train files gzipped, test files plain."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images, 0x08, ">u1")))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels, 0x08, ">u1")))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images[:3], 0x08, ">u1"))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels[:3], 0x08, ">u1"))
    return tmp_path, images, labels


# -- IDX ----------------------------------------------------------------------------------------
def test_read_idx_plain_and_gzipped(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    plain = tmp_path / "images-idx3-ubyte"
    plain.write_bytes(idx_bytes(images, 0x08, ">u1"))
    zipped = tmp_path / "images-idx3-ubyte.gz"
    zipped.write_bytes(gzip.compress(idx_bytes(images, 0x08, ">u1")))
    for path in (plain, zipped):
        out = read_idx(path)
        assert out.shape == (2, 3, 4) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, images)


def test_read_idx_detects_gzip_by_content_not_name(tmp_path):
    labels = np.array([3, 1, 4], dtype=np.uint8)
    path = tmp_path / "labels-no-suffix"
    path.write_bytes(gzip.compress(idx_bytes(labels, 0x08, ">u1")))
    np.testing.assert_array_equal(read_idx(path), labels)


@pytest.mark.parametrize("code,dtype", [(0x09, ">i1"), (0x0B, ">i2"), (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8")])
def test_read_idx_big_endian_types(tmp_path, code, dtype):
    values = np.array([[-2, 1, 300 if "i1" not in dtype else 5], [7, 0, -1]]).astype(dtype)
    path = tmp_path / "x.idx"
    path.write_bytes(idx_bytes(values, code, dtype))
    out = read_idx(path)
    assert out.dtype.byteorder in ("=", "|") or out.dtype.isnative
    np.testing.assert_array_equal(out, values.astype(values.dtype.newbyteorder("=")))


def test_write_idx_round_trip(tmp_path):
    array = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
    for name in ("a.idx", "a.idx.gz"):
        np.testing.assert_array_equal(read_idx(write_idx(tmp_path / name, array)), array)
    assert (tmp_path / "a.idx.gz").read_bytes()[:2] == b"\x1f\x8b"


@pytest.mark.parametrize("payload,match", [
    (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "two zero bytes"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "type code"),
    (b"\x00\x00\x08\x02\x00\x00\x00\x02", "truncated IDX header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x03\x05\x06", "needs 11 bytes"),
])
def test_read_idx_rejects_bad_files(tmp_path, payload, match):
    path = tmp_path / "bad"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=match):
        read_idx(path)


def test_load_fashion_mnist_from_a_folder(tiny_fashion):
    root, images, labels = tiny_fashion
    x, y = load_fashion_mnist(root)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    assert y.dtype == np.int64
    x_test, y_test = load_fashion_mnist(root, split="test")  # the uncompressed files
    np.testing.assert_array_equal(x_test, images[:3])
    assert find_fashion_mnist(root)[0].name == "train-images-idx3-ubyte.gz"


def test_environment_variable_is_searched_first(tiny_fashion, monkeypatch):
    root, images, _ = tiny_fashion
    monkeypatch.setenv(fm.ENV_VAR, str(root))
    np.testing.assert_array_equal(load_fashion_mnist()[0], images)


def test_missing_files_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    with pytest.raises(FashionMNISTNotFound, match="apt-get install dataset-fashion-mnist") as info:
        load_fashion_mnist(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "nowhere")
    with pytest.raises(FashionMNISTNotFound, match="/usr/share/datasets/fashion-mnist|nowhere"):
        load_fashion_mnist()
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist(tmp_path, split="validation")


def test_mismatched_counts_are_refused(tiny_fashion):
    root, images, labels = tiny_fashion
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels[:5], 0x08, ">u1")))
    with pytest.raises(ValueError, match="shapes"):
        load_fashion_mnist(root)


# -- data ---------------------------------------------------------------------------------------
def test_load_images_falls_back_to_digits_with_a_note(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    x, y, name = load_images("auto", root=tmp_path, allow_download=False)
    assert name == "digits" and x.shape == (1797, 64) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert "digits" in capsys.readouterr().out
    with pytest.raises(FashionMNISTNotFound):
        load_images("fashion_mnist", root=tmp_path)


def test_load_images_reads_fashion_files(tiny_fashion):
    root, images, labels = tiny_fashion
    x, y, name = load_images("auto", root=root)
    assert name == "fashion_mnist" and x.shape == (7, 784)
    np.testing.assert_allclose(x, images.reshape(7, -1) / 255.0, rtol=1e-6)


def test_relabel_invariants():
    labels = np.random.default_rng(2).integers(0, 10, 1000)
    noisy, flipped = relabel(labels, 0.1, num_classes=10, seed=3)
    assert flipped.dtype == bool and flipped.sum() == 100
    assert np.all(noisy[flipped] != labels[flipped])
    np.testing.assert_array_equal(noisy[~flipped], labels[~flipped])
    assert noisy.min() >= 0 and noisy.max() < 10 and noisy.dtype == np.int64
    again = relabel(labels, 0.1, num_classes=10, seed=3)
    np.testing.assert_array_equal(again[0], noisy)
    np.testing.assert_array_equal(again[1], flipped)
    other = relabel(labels, 0.1, num_classes=10, seed=4)
    assert not np.array_equal(other[1], flipped)


def test_relabel_draws_uniformly_from_the_other_classes():
    labels = np.zeros(20000, dtype=np.int64)
    noisy, flipped = relabel(labels, 1.0, num_classes=5, seed=0)
    assert flipped.all()
    counts = np.bincount(noisy, minlength=5)
    assert counts[0] == 0
    np.testing.assert_allclose(counts[1:] / 20000, 0.25, atol=0.02)


def test_relabel_edge_cases_and_errors():
    labels = np.array([0, 1, 2, 1])
    noisy, flipped = relabel(labels, 0.0)
    assert not flipped.any() and np.array_equal(noisy, labels)
    with pytest.raises(ValueError, match="fraction"):
        relabel(labels, 1.5)
    with pytest.raises(ValueError, match="integer"):
        relabel(labels.astype(float), 0.1)
    with pytest.raises(ValueError, match="num_classes"):
        relabel(labels, 0.5, num_classes=2)


def test_memorization_data_on_digits():
    cfg = MemorizationConfig(dataset="digits", num_train=300, flip_fraction=0.1, seed=5)
    data = memorization_data(cfg, verbose=False)
    assert data.dataset == "digits" and data.x.shape == (300, 64) and data.images.shape == (300, 8, 8)
    assert int(data.flipped.sum()) == 30
    assert torch.all(data.y_train[data.flipped] != data.y_true[data.flipped])
    assert torch.equal(data.y_train[~data.flipped], data.y_true[~data.flipped])
    assert abs(float(data.x.mean())) < 1e-4 and abs(float(data.x.std()) - 1) < 1e-3


def test_get_config_scales(monkeypatch):
    monkeypatch.setenv("LOSSKERNEL_TUTORIAL_SCALE", "ci")
    assert get_config() == get_config("ci")
    assert get_config("full", num_draws=7).num_draws == 7
    assert get_config("cpu") == get_config("paper") == get_config("full")
    with pytest.raises(ValueError, match="scale"):
        get_config("huge")


# -- training and scores ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only add contention
    cfg = MemorizationConfig(dataset="digits", num_train=200, hidden=128, train_epochs=150,
                             train_batch_size=50, train_lr=3e-3, tracin_checkpoints=3, seed=0)
    data = memorization_data(cfg, verbose=False)
    try:
        yield cfg, data, train_to_memorization(data, cfg, verbose=False)
    finally:
        torch.set_num_threads(threads)


def test_training_memorizes_the_flipped_labels(tiny_trained):
    cfg, data, trained = tiny_trained
    assert trained.train_accuracy == 1.0
    assert len(trained.checkpoints) == 3
    lrs = [lr for _, lr in trained.checkpoints]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < cfg.train_lr  # cosine decay
    final = trained.checkpoints[-1][0]
    assert all(torch.equal(final[k], v.cpu()) for k, v in trained.model.state_dict().items())


def test_loss_and_gradient_norm_match_a_loop(tiny_trained):
    _, data, trained = tiny_trained
    model, x, y = trained.model, data.x[:20], data.y_train[:20]
    losses = loss_at_w_star(model, x, y)
    norms = per_sample_grad_norm(model, x, y, batch_size=7)
    for i in range(20):
        model.zero_grad()
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        loss.backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
        assert losses[i] == pytest.approx(float(loss), rel=1e-3, abs=1e-6)
        assert norms[i] == pytest.approx(float(norm), rel=1e-3, abs=1e-6)
    model.zero_grad()


def test_tracin_self_influence_is_lr_weighted_squared_gradient_norm(tiny_trained):
    pytest.importorskip("captum")
    _, data, trained = tiny_trained
    x, y = data.x[:30], data.y_train[:30]
    state, lr = trained.checkpoints[-1]
    scores = tracin_self_influence(trained.model, [(state, lr)], x, y, batch_size=16)
    expected = lr * per_sample_grad_norm(trained.model, x, y) ** 2
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-9)


def test_ekfac_self_influence_runs(tiny_trained):
    pytest.importorskip("kronfluence")
    _, data, trained = tiny_trained
    scores = ekfac_self_influence(trained.model, data.x, data.y_train, batch_size=64)
    assert scores.shape == (200,) and np.all(np.isfinite(scores)) and np.all(scores >= 0)
    # EK-FAC preconditions the same gradients: its ranking agrees with the gradient norm's
    norms = per_sample_grad_norm(trained.model, data.x, data.y_train)
    assert np.corrcoef(np.argsort(np.argsort(scores)), np.argsort(np.argsort(norms)))[0, 1] > 0.5


def test_score_table_ranks_scores_and_keeps_notes():
    positive = np.array([True, True, False, False, False])
    table = score_table({"good": np.array([5, 4, 1, 2, 3.0]), "bad": np.array([1, 2, 5, 4, 3.0])},
                        {"good": 1.5, "bad": 0.1}, positive, notes={"missing": "skipped: not installed"})
    assert list(table["score"]) == ["good", "bad", "missing"]
    assert table.loc[0, "roc_auc"] == 1.0 and table.loc[1, "roc_auc"] == 0.0
    assert np.isnan(table.loc[2, "roc_auc"]) and "not installed" in table.loc[2, "note"]


def test_make_mlp_has_only_linear_layers():
    model = make_mlp(64, hidden=32, depth=3, num_classes=10)
    linear = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 4 and linear[0].in_features == 64 and linear[-1].out_features == 10


# -- pooling, neighbour share, ROC figure, the whole run --------------------------------------
def test_pool_images_averages_blocks():
    from losskernel_examples.memorization import pool_images

    images = np.arange(2 * 16, dtype=np.float32).reshape(2, 16)  # two 4x4 images
    pooled = pool_images(images, 2)
    assert pooled.shape == (2, 4) and pooled.dtype == np.float32
    # first image: rows [0..3], [4..7], ...; the top-left block is 0, 1, 4, 5
    np.testing.assert_allclose(pooled[0], [2.5, 4.5, 10.5, 12.5])
    np.testing.assert_allclose(pooled[1], pooled[0] + 16)
    assert pool_images(images, 1) is images
    with pytest.raises(ValueError, match="divisible"):
        pool_images(images, 3)
    with pytest.raises(ValueError, match="positive int"):
        pool_images(images, 0)


def test_pool_applies_to_fashion_mnist_only(tiny_fashion):
    root, images, _ = tiny_fashion
    cfg = MemorizationConfig(dataset="fashion_mnist", num_train=7, flip_fraction=0.0, pool=2)
    data = memorization_data(cfg, root=root, verbose=False)
    assert data.x.shape == (7, 196) and data.images.shape == (7, 14, 14)
    block = images.reshape(7, 14, 2, 14, 2).mean(axis=(2, 4)) / 255.0
    order = np.sort(np.random.default_rng(cfg.seed).choice(7, 7, replace=False))
    np.testing.assert_allclose(data.images, block[order], rtol=1e-5)
    digits = memorization_data(MemorizationConfig(dataset="digits", num_train=50, pool=2), verbose=False)
    assert digits.x.shape == (50, 64)


def test_knn_share_counts_positive_neighbours():
    from losskernel_examples.memorization import knn_share

    positive = np.array([True, True, False, False])
    knn = np.array([[0, 1, 2], [1, 0, 3], [2, 3, 0], [3, 2, 1]])
    share, base = knn_share(knn, positive)
    assert share == pytest.approx(0.5) and base == pytest.approx(0.5)  # 0→{1,2}, 1→{0,3}
    knn[0] = [0, 1, -1]
    assert knn_share(knn, positive)[0] == pytest.approx(2 / 3)  # padding ignored


def test_plot_detector_rocs_orders_by_auc(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from losskernel_examples.memorization import plot_detector_rocs

    positive = np.array([True, True, False, False, False])
    fig = plot_detector_rocs({"weak": np.array([1, 2, 5, 4, 3.0]), "strong": np.array([5, 4, 1, 2, 3.0])},
                             positive, path=tmp_path / "roc.png")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["strong: 1.000", "weak: 0.000"]
    assert (tmp_path / "roc.png").stat().st_size > 0
    with pytest.raises(ValueError, match="at least one"):
        plot_detector_rocs({}, positive)


def test_run_memorization_end_to_end_without_optional_libraries(monkeypatch, capsys):
    """Digits, a small SGLD run; the attribution libraries 'missing': their rows are notes."""
    from losskernel_examples import memorization as mem

    def missing(module, package):
        raise mem.MissingOptionalDependency(f"{package} is not installed (test)")

    monkeypatch.setattr(mem, "_require", missing)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = mem.run_memorization(
            MemorizationConfig(dataset="digits", num_train=400, hidden=128, train_epochs=80,
                               train_batch_size=50, train_lr=3e-3, tracin_checkpoints=2,
                               num_chains=2, num_draws=60, num_burnin_steps=20, lr=3e-4,
                               localization=300.0, sgld_batch_size=100),
            device="cpu", verbose=False)
    finally:
        torch.set_num_threads(threads)
    table = result.table.set_index("score")
    assert set(table.index) == {"loss-kernel variance K(x,x)", *mem.BASELINES}
    for name in mem.BASELINES[2:]:
        assert np.isnan(table.loc[name, "roc_auc"]) and "not installed" in table.loc[name, "note"]
    assert "skipped" not in capsys.readouterr().out  # verbose=False: no print
    variance_auc = table.loc["loss-kernel variance K(x,x)", "roc_auc"]
    assert variance_auc > 0.75  # 40 relabelled digits among 400: far above chance
    summary = result.summary()
    assert summary["num_flipped"] == 40 and summary["train_accuracy_on_noisy_labels"] == 1.0
    assert summary["mean_self_covariance/mislabelled"] > summary["mean_self_covariance/normal"]
    np.testing.assert_allclose(result.scores["loss-kernel variance K(x,x)"], result.kernel.variance.numpy())


def test_sampler_kwargs_pass_non_sgld_arguments_through_instead_of_dropping_them():
    from devinterp_losskernel.presets import SGLDSettings
    from losskernel_examples._scale import sampler_kwargs
    from losskernel_examples.memorization import get_config

    cfg = get_config("ci")
    labels = torch.arange(4)
    kwargs = sampler_kwargs(cfg, seed=3, device="cpu", verbose=False, labels=labels, localization=20.0)
    assert kwargs["device"] == "cpu" and kwargs["verbose"] is False and kwargs["labels"] is labels
    assert kwargs["seed"] == 3 and kwargs["localization"] == 20.0
    with pytest.raises(ValueError, match=r"no settings \['localisation'\]"):
        SGLDSettings.from_config(cfg, localisation=20.0)


def test_sample_kernel_and_predictive_averages_the_softmax_over_the_draws():
    """The recorder skips the passes at w* and adds one softmax per draw; p̄ is consistent
    with the kernel's mean loss from the same draws (Jensen: E[e^−ℓ] ≥ e^−E[ℓ])."""
    from dataclasses import replace

    from losskernel_examples import memorization as task

    torch.manual_seed(0)
    model = task.make_mlp(6, hidden=8, depth=1, num_classes=3)
    recorder = task._PredictiveRecorder(model, 5, 3)
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    recorder(model, (x, y, torch.arange(5)))  # at w*: not recorded
    assert float(recorder.counts.sum()) == 0
    moved = task.make_mlp(6, hidden=8, depth=1, num_classes=3)
    losses = recorder(moved, (x[1:3], y[1:3], torch.tensor([1, 2])))
    expected = F.cross_entropy(moved(x[1:3]), y[1:3], reduction="none")
    np.testing.assert_allclose(losses.detach().numpy(), expected.detach().numpy())
    expected = torch.softmax(moved(x[1:3]).double(), 1).detach().numpy()
    np.testing.assert_allclose(recorder.sums[1:3].numpy(), expected, rtol=1e-12)
    assert recorder.counts.tolist() == [0, 1, 1, 0, 0]
    recorder(moved, (x[:2], y[:2]))  # a training minibatch (no index): not recorded
    assert recorder.counts.tolist() == [0, 1, 1, 0, 0]

    n = 60
    data = task.MemorizationData(x=torch.randn(n, 6), y_true=torch.arange(n) % 3, y_train=torch.arange(n) % 3,
                                 flipped=torch.zeros(n, dtype=torch.bool), dataset="synthetic",
                                 images=np.zeros((n, 1, 1)), num_classes=3)
    cfg = replace(task.get_config("ci"), num_chains=2, num_draws=20, num_burnin_steps=5, sgld_batch_size=20)
    kernel, probs = task.sample_kernel_and_predictive(model, data, cfg, device="cpu", verbose=False)
    assert probs.shape == (n, 3) and probs.dtype == np.float64
    np.testing.assert_array_equal(np.asarray(kernel.labels), data.y_train.numpy())  # labels reach the kernel
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-12)
    given = probs[np.arange(n), data.y_train.numpy()]
    assert np.all(given >= np.exp(-kernel.mean.numpy()) - 1e-12)
    # the same draws as sample_kernel: the kernel is the same to the last bit
    plain = task.sample_kernel(model, data, cfg, device="cpu", verbose=False)
    torch.testing.assert_close(kernel.covariance, plain.covariance, rtol=0, atol=0)
    # and not the softmax at w*
    at_w_star = torch.softmax(model(data.x).double(), 1).detach().numpy()
    assert np.abs(probs - at_w_star).max() > 1e-3
