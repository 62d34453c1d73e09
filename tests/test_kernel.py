import numpy as np
import pytest
import torch

from devinterp_losskernel import KernelAccumulator, LossKernel, correlation_from_covariance


def make_kernel(rng, n=6, draws=40, **fields):
    traces = rng.normal(size=(draws, n))
    traces[:, 2] = 1.5  # a sample whose loss never moves: zero variance
    acc = KernelAccumulator(n)
    acc.update(torch.from_numpy(traces))
    return acc.compute(**fields), traces


def test_correlation_zero_where_variance_zero(rng):
    k, traces = make_kernel(rng)
    r = k.correlation.numpy()
    assert np.all(r[2] == 0) and np.all(r[:, 2] == 0)
    keep = [0, 1, 3, 4, 5]
    np.testing.assert_allclose(r[np.ix_(keep, keep)], np.corrcoef(traces[:, keep], rowvar=False), atol=1e-14)
    assert np.all(np.diag(r)[keep] == 1.0)
    assert np.abs(r).max() <= 1.0


def test_correlation_clamped_and_exact_diagonal():
    cov = torch.tensor([[1.0, 1.0 + 1e-12], [1.0 + 1e-12, 1.0]], dtype=torch.float64)
    r = correlation_from_covariance(cov, torch.diagonal(cov))
    assert r.max() <= 1.0 and torch.all(torch.diagonal(r) == 1)


def test_save_load_round_trip_is_exact(rng, tmp_path):
    k, _ = make_kernel(
        rng, init_loss=torch.arange(6.0), labels=torch.tensor([0, 1, 0, 1, 2, 2]),
        sample_ids=["a", "b", "c", "d", "e", "f"], draws_per_chain={0: 20, 1: 20},
        rejected_per_chain={1: 3},
        metadata={"sampler": {"lr": 1e-4, "nbeta": 10.0}, "llc/mean": np.float64(3.5),
                  "llc/means": np.array([3.0, 4.0])},
    )
    path = k.save(tmp_path / "sub" / "kernel.pt")
    loaded = LossKernel.load(path)
    for name in ("covariance", "mean", "variance", "init_loss", "labels"):
        assert torch.equal(getattr(loaded, name), getattr(k, name)), name
    assert loaded.num_draws == 40
    assert loaded.sample_ids == ["a", "b", "c", "d", "e", "f"]
    assert loaded.draws_per_chain == {0: 20, 1: 20} and loaded.rejected_per_chain == {1: 3}
    identity = loaded.metadata.pop("identity")
    assert identity == k.metadata["identity"] and identity["num_samples"] == 6
    assert loaded.metadata == {"sampler": {"lr": 1e-4, "nbeta": 10.0}, "llc/mean": 3.5, "llc/means": [3.0, 4.0]}
    assert torch.equal(loaded.correlation, k.correlation)


def test_load_rejects_other_files(tmp_path):
    torch.save({"something": torch.ones(2)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a file written by its save"):
        LossKernel.load(tmp_path / "x.pt")


def test_to_xarray(rng):
    k, _ = make_kernel(rng, init_loss=torch.zeros(6), labels=torch.arange(6), metadata={"sampler": {"lr": 0.1}})
    ds = k.to_xarray()
    np.testing.assert_array_equal(ds["covariance"].values, k.covariance.numpy())
    np.testing.assert_array_equal(ds["correlation"].values, k.correlation.numpy())
    assert ds.attrs["num_draws"] == 40
    assert list(ds["label"].values) == list(range(6))
    assert set(ds.data_vars) == {"covariance", "correlation", "mean", "variance", "init_loss"}


def test_shape_validation():
    with pytest.raises(ValueError, match="covariance must have shape"):
        LossKernel(covariance=torch.zeros(3, 2), mean=torch.zeros(3), variance=torch.zeros(3), num_draws=2)
    with pytest.raises(ValueError, match="labels must have one entry per probe sample: length 3"):
        LossKernel(covariance=torch.zeros(3, 3), mean=torch.zeros(3), variance=torch.zeros(3),
                   num_draws=2, labels=torch.zeros(4))


def test_trace_is_sum_of_variances(rng):
    k, traces = make_kernel(rng)
    assert k.trace == pytest.approx(traces.var(0, ddof=1).sum(), rel=1e-12)


def _xr_kernel(rows=None, columns=None, diagonal=False):
    torch.manual_seed(0)
    losses = torch.randn(40, 6, dtype=torch.float64)
    cov = torch.cov(losses.T)
    var, mean = cov.diagonal().clone(), losses.mean(0)
    if rows is not None:
        cov = cov[rows][:, rows if columns is not None else slice(None)]
    return LossKernel(covariance=None if diagonal else cov, mean=mean, variance=var, num_draws=40,
                      init_loss=mean - 0.1, rows=None if rows is None else torch.tensor(rows),
                      columns=None if columns is None else torch.tensor(columns),
                      labels=torch.tensor([0, 1, 0, 1, 2, 2]), sample_ids=[10, 11, 12, 13, 14, 15],
                      draws_per_chain={0: 20, 1: 20}, metadata={"llc/mean": 3.0, "settings": {"lr": 1e-3}})


def test_to_xarray_puts_per_sample_variables_on_sample():
    pytest.importorskip("xarray")
    k = _xr_kernel()
    ds = k.to_xarray()
    for name in ("mean", "variance", "init_loss"):
        assert ds[name].dims == ("sample",)
    assert ds.covariance.dims == ("sample", "sample_other")
    assert list(ds.sample.values) == [10, 11, 12, 13, 14, 15] == list(ds.sample_other.values)
    assert ds.label.dims == ("sample",)
    # the diagonal of the 2-D variable is the 1-D variance, read through the coordinates
    assert float(ds.covariance.sel(sample=12, sample_other=12)) == pytest.approx(float(ds.variance.sel(sample=12)))
    assert float(ds.covariance.sel(sample=11, sample_other=14)) == pytest.approx(float(k.covariance[1, 4]))
    assert list(ds.draws_per_chain.values) == [20, 20] and ds.draws_per_chain.dims == ("chain",)
    assert ds.attrs["meta_llc/mean"] == 3.0


def test_to_xarray_rectangular_combined_and_diagonal():
    pytest.importorskip("xarray")
    rect = _xr_kernel(rows=[1, 4]).to_xarray()
    assert rect.covariance.dims == ("query", "sample_other") and rect.covariance.shape == (2, 6)
    assert list(rect["query"].values) == [11, 14] and list(rect.query_index.values) == [1, 4]
    assert rect.variance.dims == ("sample",) and rect.variance.shape == (6,)
    comb = _xr_kernel(rows=[1, 4], columns=[1, 4]).to_xarray()
    assert comb.covariance.shape == (2, 2) and list(comb.sample_other.values) == [11, 14]
    assert float(comb.covariance.sel(query=14, sample_other=14)) == pytest.approx(float(comb.variance.sel(sample=14)))
    diag = _xr_kernel(diagonal=True).to_xarray()
    assert "covariance" not in diag and diag.variance.dims == ("sample",)
