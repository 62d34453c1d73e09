import numpy as np
import pytest
import torch

from devinterp_losskernel import KernelAccumulator, LossKernel
from devinterp_losskernel.correlation import correlation_from_covariance


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


# -- files: format versions, output paths, atomic writes, metadata types through every export ----
METADATA_OF_EVERY_TYPE = {
    "none": None, "true": True, "false": False, "int": 7, "big": 2**40, "float": 1.5, "nan": float("nan"),
    "inf": float("inf"), "-inf": -float("inf"), "str": "text", "list": [1, 2.5, "a", None, [float("nan")]],
    "nested": {"a": {"b": [float("inf"), {"c": None}]}, "flag": False}, "tuple": (1, "x"),
    "int_keys": {0: 1.0, 3: "three"},
}


def _same(a, b) -> bool:
    """Equal values of equal types, NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (np.isnan(a) and np.isnan(b)) or a == b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _typed_kernel():
    k = _xr_kernel()
    k.metadata = dict(METADATA_OF_EVERY_TYPE)
    k.rejected_per_chain = {2: 40}
    return k


def _check_round_trip(k, back):
    for key, value in METADATA_OF_EVERY_TYPE.items():
        assert _same(back.metadata[key], value), (key, back.metadata[key], value)
    for name in ("covariance", "mean", "variance", "init_loss", "labels"):
        assert torch.equal(getattr(back, name), getattr(k, name)), name
    assert back.sample_ids == k.sample_ids and back.num_draws == k.num_draws
    assert back.draws_per_chain == k.draws_per_chain and back.rejected_per_chain == {2: 40}


def test_metadata_types_survive_save_and_load(tmp_path):
    k = _typed_kernel()
    _check_round_trip(k, LossKernel.load(k.save(tmp_path / "k.pt")))


@pytest.mark.parametrize("export", ["memory", "zarr", "netcdf"])
def test_metadata_types_survive_to_xarray_through_zarr_and_netcdf(tmp_path, export):
    xr = pytest.importorskip("xarray")
    k = _typed_kernel()
    ds = k.to_xarray()
    if export == "zarr":
        pytest.importorskip("zarr")
        ds.to_zarr(tmp_path / "k.zarr", consolidated=False)
        ds = xr.open_zarr(tmp_path / "k.zarr", consolidated=False).load()
    elif export == "netcdf":
        pytest.importorskip("scipy")
        ds.to_netcdf(tmp_path / "k.nc")
        ds = xr.open_dataset(tmp_path / "k.nc").load()
    # the attributes read by eye: numbers stay numbers, NaN and ±Inf stay floats (never the strings "nan")
    assert np.isnan(ds.attrs["meta_nan"]) and ds.attrs["meta_inf"] == np.inf and ds.attrs["meta_-inf"] == -np.inf
    assert ds.attrs["meta_int"] == 7 and ds.attrs["meta_str"] == "text"
    _check_round_trip(k, LossKernel.from_xarray(ds))


def test_from_xarray_refuses_a_newer_export_and_foreign_datasets():
    xr = pytest.importorskip("xarray")
    from devinterp_losskernel.provenance import FormatVersionError, from_typed_json, to_typed_json

    ds = _xr_kernel().to_xarray()
    fields = from_typed_json(ds.attrs["losskernel"])
    ds.attrs["losskernel"] = to_typed_json({**fields, "format_version": 99, "written_by": "devinterp-losskernel 9.0"})
    with pytest.raises(FormatVersionError, match=r"format version 99.*devinterp-losskernel>=9\.0"):
        LossKernel.from_xarray(ds)
    with pytest.raises(ValueError, match="no 'losskernel' attribute"):
        LossKernel.from_xarray(xr.Dataset())
    with pytest.raises(TypeError, match="must be an xarray.Dataset"):
        LossKernel.from_xarray({"covariance": 1})


def _payload_with(tmp_path, **changes):
    from devinterp_losskernel.provenance import save_verified

    k = _xr_kernel()
    k.save(tmp_path / "k.pt")
    payload = torch.load(tmp_path / "k.pt", weights_only=True)
    payload.update(changes)
    save_verified(payload, tmp_path / "edited.pt")  # a valid checksum: only the version is wrong
    return tmp_path / "edited.pt"


def test_a_newer_or_invalid_format_version_is_refused_saying_what_to_upgrade(tmp_path):
    from devinterp_losskernel.provenance import FileIntegrityError, FormatVersionError

    path = _payload_with(tmp_path, format_version=99, written_by="devinterp-losskernel 3.2.0")
    with pytest.raises(FormatVersionError, match=r"edited\.pt' is a devinterp_losskernel\.LossKernel file of format "
                                                 r"version 99.*reads format versions 1 to 2.*written by "
                                                 r"devinterp-losskernel 3\.2\.0.*pip install -U "
                                                 r"'devinterp-losskernel>=3\.2\.0'"):
        LossKernel.load(path)
    for bad in ("2", 0, True, None):
        with pytest.raises(FileIntegrityError, match=r"format_version .* not a positive int"):
            LossKernel.load(_payload_with(tmp_path, format_version=bad))


def test_files_record_their_version_and_format_1_files_still_load(tmp_path):
    import json

    k = _xr_kernel()
    payload = torch.load(k.save(tmp_path / "k.pt"), weights_only=True)
    assert payload["format_version"] == 2 and payload["written_by"].startswith("devinterp-losskernel ")
    old = {key: v for key, v in payload.items() if key not in ("metadata", "checksum", "written_by")}
    torch.save({**old, "format_version": 1, "metadata_json": json.dumps({"llc/mean": 3.0})}, tmp_path / "v1.pt")
    assert LossKernel.load(tmp_path / "v1.pt").metadata == {"llc/mean": 3.0}


def test_save_names_a_wrong_output_path(tmp_path):
    k = _xr_kernel()
    with pytest.raises(ValueError, match=r"path must be a file path, got .*, which is an existing folder"):
        k.save(tmp_path)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"path must be inside a folder, got .*notes\.txt/k\.pt', but .*notes\.txt' "
                                         r"is a regular file"):
        k.save(tmp_path / "notes.txt" / "k.pt")
    with pytest.raises(TypeError, match="path must be a path"):
        k.save(3)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert LossKernel.load(k.save(tmp_path / "new" / "sub" / "k.pt")).num_draws == 40  # parents are made


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    old = _xr_kernel()
    path = old.save(tmp_path / "k.pt")
    before = path.read_bytes()

    def dying_save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        _typed_kernel().save(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["k.pt"]


def test_sample_ids_keep_their_types_through_save_and_what_cannot_is_said(tmp_path):
    from pathlib import PurePosixPath

    k = _xr_kernel()
    k.sample_ids = [np.int64(10), 11, "twelve", ("a", 13), 14.5, PurePosixPath("/data/15")]
    with pytest.warns(UserWarning, match=r"sample_ids of types \{'PurePosixPath': 1\}.* stored as their str"):
        path = k.save(tmp_path / "k.pt")
    ids = LossKernel.load(path).sample_ids
    assert ids == [10, 11, "twelve", ("a", 13), 14.5, "/data/15"] and type(ids[0]) is int
