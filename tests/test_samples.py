"""loss_kernel() for any trace, and LossKernel.from_samples() for devinterp 2's stored runs.

The synthetic-store tests need only xarray (a Dataset in the layout of devinterp 2's sample());
the parity tests against compute_bif run devinterp 2 (CI: the devinterp 2.0 venv)."""

import numpy as np
import pytest
import torch

from devinterp_losskernel import LossKernel, loss_kernel
from devinterp_losskernel.provenance import FileIntegrityError
from devinterp_losskernel.samples import kernel_from_samples

from conftest import require_devinterp


def trace(draws=40, n=7, seed=0):
    g = np.random.default_rng(seed)
    return 3.0 + g.standard_normal((draws, n)) @ g.standard_normal((n, n)) * 0.1


def test_loss_kernel_equals_numpy_cov_for_2d_3d_and_blocks():
    x = trace()
    k = loss_kernel(x)
    np.testing.assert_allclose(k.covariance.numpy(), np.cov(x, rowvar=False), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(k.mean.numpy(), x.mean(axis=0), rtol=1e-13)
    k3 = loss_kernel(x.reshape(4, 10, 7), block_size=3)
    assert k3.draws_per_chain == {0: 10, 1: 10, 2: 10, 3: 10} and k3.num_draws == 40
    np.testing.assert_allclose(k3.covariance.numpy(), np.cov(x, rowvar=False), rtol=1e-12, atol=1e-15)
    blocks = (torch.from_numpy(x[i:i + 6]).float() for i in range(0, 40, 6))  # streamed, float32 blocks
    kb = loss_kernel(blocks)
    np.testing.assert_allclose(kb.covariance.numpy(), np.cov(x.astype(np.float32).astype(np.float64), rowvar=False),
                               rtol=1e-9, atol=1e-12)


def test_loss_kernel_refuses_non_finite_and_bad_shapes():
    x = trace()
    x[5, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN or Inf in 1 draws"):
        loss_kernel(x)
    with pytest.raises(ValueError, match=r"\[draws, n\] or \[chains, draws, n\]"):
        loss_kernel(np.zeros(5))
    with pytest.raises(ValueError, match=r"at least 2 draws"):
        loss_kernel(trace(draws=1))


def fake_store(chains=3, draws=11, n=6, tokens=4, seed=1):
    """An xarray Dataset laid out as devinterp 2's sample() stores it."""
    xr = pytest.importorskip("xarray")
    g = np.random.default_rng(seed)
    losses = (2.0 + 0.1 * g.standard_normal((chains, draws, n, tokens))).astype(np.float32)
    ds = xr.Dataset(
        {"loss_probe": (("chain", "draw", "batch_probe", "token_pos"), losses),
         "input_ids_probe": (("batch_probe", "token"), g.integers(0, 9, (n, tokens + 1))),
         "sampling_loss": (("chain", "draw", "batch", "token_pos"), np.zeros((chains, draws, 2, tokens), np.float32))},
        attrs={"metadata": {"config": {"sampler": {"lr": 1e-3, "n_beta": 20.0, "localization": 5.0,
                                                   "noise_level": 1.0, "llc_weight_decay": 0.0}}}},
    )
    return ds, losses


def test_from_samples_reads_chunks_exactly_mean_and_sum():
    ds, losses = fake_store()
    per_seq = losses.astype(np.float64).mean(-1).reshape(-1, losses.shape[2])
    for per_read in (1, 4, None):
        k = LossKernel.from_samples(ds, "probe", draws_per_read=per_read)
        np.testing.assert_allclose(k.covariance.numpy(), np.cov(per_seq, rowvar=False), rtol=1e-12, atol=1e-16)
    assert k.num_draws == 33 and k.draws_per_chain == {0: 11, 1: 11, 2: 11}
    assert k.metadata["sampler"] == {"lr": 1e-3, "nbeta": 20.0, "localization": 5.0, "noise_level": 1.0,
                                     "weight_decay": 0.0}
    assert k.metadata["identity"]["probe"].startswith("input_ids:")
    total = LossKernel.from_samples(ds, "probe", reduction="sum")
    np.testing.assert_allclose(total.covariance.numpy(), 16 * k.covariance.numpy(), rtol=1e-12)
    one = kernel_from_samples(ds, "probe", chains=[1])
    np.testing.assert_allclose(one.covariance.numpy(), np.cov(losses[1].astype(np.float64).mean(-1), rowvar=False),
                               rtol=1e-12, atol=1e-16)
    with pytest.raises(KeyError, match=r"observables: \['probe'\]"):
        LossKernel.from_samples(ds, "other")
    with pytest.raises(ValueError, match="reduction"):
        LossKernel.from_samples(ds, "probe", reduction="token")


def test_from_samples_drops_a_chain_devinterp_aborted_and_refuses_a_mid_chain_nan():
    ds, losses = fake_store()
    ds["loss_probe"][1, 7:] = np.nan  # chain 1 aborted after 7 draws: the rest is the store's NaN fill
    ds["sampling_loss"][1, 7:] = np.nan  # devinterp writes a draw's sampling_loss with its observable losses
    with pytest.warns(RuntimeWarning, match=r"chains \[1\] were aborted"):
        k = LossKernel.from_samples(ds, "probe")
    assert k.draws_per_chain == {0: 11, 2: 11} and k.rejected_per_chain == {1: 11}
    kept = losses[[0, 2]].astype(np.float64).mean(-1).reshape(-1, losses.shape[2])
    np.testing.assert_allclose(k.covariance.numpy(), np.cov(kept, rowvar=False), rtol=1e-12, atol=1e-16)
    with pytest.warns(RuntimeWarning):
        finite = LossKernel.from_samples(ds, "probe", failed_chains="keep_finite", draws_per_read=3)
    assert finite.draws_per_chain == {0: 11, 1: 7, 2: 11} and finite.rejected_per_chain == {1: 4}
    ds2, _ = fake_store()
    ds2["loss_probe"][2, 3, 0, 1] = np.inf  # a completed chain with an overflowed observable loss
    with pytest.raises(ValueError, match=r"chain 2, draw 3: non-finite"):
        LossKernel.from_samples(ds2, "probe")


def _tiny_run(tmp_path):
    import sys
    import warnings

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from devinterp.slt.sampling import sample

    from _models import LMDataset, TinyLM

    torch.manual_seed(0)
    ids = torch.randint(0, 13, (80, 9))
    model = TinyLM()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = sample(model, LMDataset(ids), {"probe": LMDataset(ids[:40])}, lr=1e-3, n_beta=20.0,
                         num_chains=2, num_draws=9, batch_size=8, num_burnin_steps=2, num_init_loss_batches=2,
                         localization=50.0, device="cpu", output_path=str(tmp_path / "samples.zarr"))
    return samples


def test_from_samples_equals_compute_bif_covariance_on_a_devinterp2_run(tmp_path):
    require_devinterp(2)
    from devinterp.slt.bif import compute_bif

    samples = _tiny_run(tmp_path)
    k = LossKernel.from_samples(samples, "probe")
    scale = float(k.covariance.abs().max())
    sequence = compute_bif(samples, correlation_method="sequence", compute_covariance=True).influences.values
    # covariance is bilinear: the token-wise covariance averaged over token pairs is the same kernel
    token = compute_bif(samples, correlation_method="token", average_tokenwise_bif=True,
                        compute_covariance=True).influences.values
    for theirs in (sequence, token):  # theirs in float32
        np.testing.assert_allclose(k.covariance.numpy(), theirs, rtol=0, atol=1e-5 * scale)
    stored = np.asarray(samples.dataset["loss_probe"].values, np.float64).mean(-1).reshape(-1, 24)
    np.testing.assert_allclose(k.covariance.numpy(), np.cov(stored, rowvar=False), rtol=1e-10, atol=1e-14 * scale)
    from_path = LossKernel.from_samples(tmp_path / "samples.zarr", "probe")
    torch.testing.assert_close(from_path.covariance, k.covariance, rtol=0, atol=0)


# -- selections, arguments and stores: refused by name, never counted twice or misread ------------
@pytest.mark.parametrize("chains, match", [
    ([0, 0], r"chains must name each chain once, got \[0\]"),
    ([-1], r"chains must be chain indices in \[0, 3\).*negative"),
    ([3], r"chains must be chain indices in \[0, 3\)"),
    ([1.0], r"chains must hold int chain indices, got 1.0"),
    ([True], r"chains must hold int chain indices, got True"),
    ("0", r"chains must be a sequence of int indices"),
    (1, r"chains must be a sequence of int indices"),
    ([], r"chains must select at least one chain"),
])
def test_from_samples_refuses_bad_chain_selections(chains, match):
    ds, _ = fake_store()
    with pytest.raises((ValueError, TypeError), match=match):
        LossKernel.from_samples(ds, "probe", chains=chains)


@pytest.mark.parametrize("kwargs, match", [
    (dict(draws=[2, 2]), r"draws must name each draw once"),
    (dict(draws=[11]), r"draws must be draw indices in \[0, 11\)"),
    (dict(draws=slice(20, None)), r"draws must select at least one draw of 11"),
    (dict(draws=[0.5]), r"draws must hold int draw indices"),
    (dict(rows=[1, 1]), r"rows must name each sequence once"),
    (dict(rows=[6]), r"rows must be sequence indices in \[0, 6\)"),
    (dict(draws_per_read=0), r"draws_per_read must be a positive int"),
    (dict(draws_per_read=2.5), r"draws_per_read must be a positive int"),
    (dict(draws_per_read=True), r"draws_per_read must be a positive int"),
])
def test_from_samples_refuses_bad_draw_and_row_selections(kwargs, match):
    ds, _ = fake_store()
    with pytest.raises((ValueError, TypeError), match=match):
        LossKernel.from_samples(ds, "probe", **kwargs)


def test_from_samples_selects_chains_and_draws_exactly():
    ds, losses = fake_store()
    k = LossKernel.from_samples(ds, "probe", chains=np.array([2, 0]), draws=slice(3, None), draws_per_read=4)
    kept = losses[[0, 2], 3:].astype(np.float64).mean(-1).reshape(-1, losses.shape[2])
    np.testing.assert_allclose(k.covariance.numpy(), np.cov(kept, rowvar=False), rtol=1e-12, atol=1e-16)
    assert k.draws_per_chain == {2: 8, 0: 8} and k.metadata["chains"] == [2, 0]
    assert k.metadata["draws"] == list(range(3, 11))


def test_from_samples_names_an_empty_store():
    ds, _ = fake_store(draws=0)
    with pytest.raises(ValueError, match=r"loss_probe of these samples is empty: 3 chains × 0 draws × 6 sequences"):
        LossKernel.from_samples(ds, "probe")


@pytest.mark.parametrize("observable", [0, None, ["probe"], ""])
def test_from_samples_refuses_an_observable_that_is_not_a_name(observable):
    ds, _ = fake_store()
    with pytest.raises(TypeError, match="observable must be the observable's name"):
        LossKernel.from_samples(ds, observable)


def zarr_store(tmp_path, chains=3, draws=11, completed=True, **kwargs):
    """fake_store() written to disk as devinterp does: zarr v3, one chain and 4 draws a chunk."""
    pytest.importorskip("zarr")
    ds, losses = fake_store(chains=chains, draws=draws, **kwargs)
    if completed:
        ds.attrs["completed"] = 1
    enc = {v: {"chunks": tuple(1 if d == "chain" else 4 if d == "draw" else s for d, s in zip(ds[v].dims, ds[v].shape))}
           for v in ds.data_vars}
    path = tmp_path / "run.zarr"
    ds.to_zarr(path, mode="w", encoding=enc, consolidated=False, zarr_format=3)
    return path, losses


def test_from_samples_names_a_path_that_is_not_a_store(tmp_path):
    pytest.importorskip("xarray")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match=r"samples must be a zarr store .*folder.* no zarr\.json"):
        LossKernel.from_samples(tmp_path / "folder", "probe")
    (tmp_path / "kernel.pt").write_bytes(b"not a store")
    with pytest.raises(ValueError, match=r"kernel\.pt', which is a file \(a kernel file\? use LossKernel\.load\)"):
        LossKernel.from_samples(tmp_path / "kernel.pt", "probe")
    with pytest.raises(FileNotFoundError, match=r"samples: the zarr store .*missing\.zarr' does not exist"):
        LossKernel.from_samples(tmp_path / "missing.zarr", "probe")
    path, _ = zarr_store(tmp_path)
    (path / "zarr.json").write_text("{ not json")
    with pytest.raises(FileIntegrityError, match=r"run\.zarr' is damaged and cannot be opened"):
        LossKernel.from_samples(path, "probe")


@pytest.mark.parametrize("chunk", ["c/0/1/0/0", "c/2/2/0/0"])  # chain 0 draws 4–7; chain 2's last draws 8–10
def test_a_deleted_chunk_is_named_as_damage_not_as_an_aborted_chain(tmp_path, chunk):
    path, _ = zarr_store(tmp_path)
    (path / "loss_probe" / chunk).unlink()
    with pytest.raises(FileIntegrityError, match=rf"run\.zarr' is damaged: .*chunk file .*{chunk}' is missing"):
        LossKernel.from_samples(path, "probe", failed_chains="keep_finite")
    with pytest.raises(FileIntegrityError, match=rf"chunk file .*{chunk}' is missing"):
        LossKernel.from_samples(path, "probe")


def test_a_truncated_chunk_is_named_as_damage(tmp_path):
    path, _ = zarr_store(tmp_path)
    chunk = path / "loss_probe" / "c" / "1" / "1" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(FileIntegrityError, match=r"damaged: array 'loss_probe', chain 1, draws 4–7 cannot be read "
                                                 r"\(chunk file .*c/1/1/0/0'\)"):
        LossKernel.from_samples(path, "probe")


def test_in_memory_holes_in_written_draws_are_not_taken_for_an_aborted_chain():
    ds, _ = fake_store()
    ds["loss_probe"][1, 7:] = np.nan  # sampling_loss still has those draws: a lost chunk, not an abort
    with pytest.raises(FileIntegrityError, match=r"chain 1, draw 10: 'probe' losses are NaN in draws devinterp "
                                                 r"wrote .*lost a chunk"):
        LossKernel.from_samples(ds, "probe")
    ds, _ = fake_store()
    ds["loss_probe"][1, 2:4] = np.nan  # both arrays lost draws 2–3, though the chain goes on
    ds["sampling_loss"][1, 2:4] = np.nan
    with pytest.raises(FileIntegrityError, match=r"no values at draw 2 but has them at a later draw"):
        LossKernel.from_samples(ds, "probe", failed_chains="keep_finite")


def test_an_aborted_chain_on_disk_is_still_an_aborted_chain_and_an_unfinished_run_says_so(tmp_path):
    path, losses = zarr_store(tmp_path, completed=False)
    for array in ("loss_probe", "sampling_loss"):  # chain 1 stopped after draw 3: devinterp wrote no more chunks
        for chunk in ("1", "2"):
            (path / array / "c" / "1" / chunk / "0" / "0").unlink()
    with pytest.warns(RuntimeWarning, match=r"chains \[1\] were interrupted: .*no 'completed' flag"):
        k = LossKernel.from_samples(path, "probe", failed_chains="keep_finite")
    assert k.draws_per_chain == {0: 11, 1: 4, 2: 11} and k.rejected_per_chain == {1: 7}
    kept = np.concatenate([losses[0], losses[1, :4], losses[2]]).astype(np.float64).mean(-1)
    np.testing.assert_allclose(k.covariance.numpy(), np.cov(kept, rowvar=False), rtol=1e-12, atol=1e-16)


def test_loss_kernel_takes_chains_of_different_lengths_and_names_ragged_input():
    x = trace(draws=30)
    k = loss_kernel([x[:10], torch.from_numpy(x[10:])])
    assert k.draws_per_chain == {0: 10, 1: 20}
    np.testing.assert_allclose(k.covariance.numpy(), np.cov(x, rowvar=False), rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match=r"losses\[1\] has n=5 and losses\[0\] has n=7"):
        loss_kernel([x[:10], x[10:, :5]])
    with pytest.raises(ValueError, match=r"losses rows must all hold the same n samples: got rows of lengths \[3, 2"):
        loss_kernel([[1.0, 2.0, 3.0], [1.0, 2.0], [1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="losses is empty"):
        loss_kernel([])
    for bad in (None, "losses", 3.0, {"a": 1}):
        with pytest.raises(TypeError, match="losses must be"):
            loss_kernel(bad)


def test_loss_kernel_checks_kernel_fields_before_reading_a_stream():
    x = trace()
    read = []

    def blocks():
        for i in range(0, 40, 8):
            read.append(i)
            yield x[i:i + 8]

    for kwargs, match in ((dict(init_loss=np.zeros(6)), r"init_loss must have shape \(7,\)"),
                          (dict(sample_ids=list("abc")), r"sample_ids must have length n=7"),
                          (dict(labels=[0, 1]), r"labels must have one entry per probe sample: length 7"),
                          (dict(rows=[2, 2]), r"rows must name each sample once")):
        read.clear()
        with pytest.raises(ValueError, match=match):
            loss_kernel(blocks(), **kwargs)
        assert read == [0], "only the first block may be read before the fields are checked"
    with pytest.raises(TypeError, match="metadata must be a dict"):
        loss_kernel(x, metadata=["not", "a", "dict"])


def _aborting_loss(after_steps: int):
    """devinterp's per-token LM loss, NaN from the SGLD step `after_steps` on (probe passes unaffected)."""
    from devinterp.slt.lm_loss import compute_per_token_loss

    calls = {"n": 0}

    def loss_fn(model, input_ids):
        loss = compute_per_token_loss(model, input_ids)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] > after_steps:
                return loss * float("nan")
        return loss

    return loss_fn


def test_a_chain_devinterp2_aborted_is_dropped_and_its_store_is_not_called_damaged(tmp_path):
    require_devinterp(2)
    import sys
    import warnings

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from devinterp.slt.sampling import sample

    from _models import LMDataset, TinyLM

    torch.manual_seed(0)
    ids = torch.randint(0, 13, (80, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # 12 draws + 1 burn-in step a chain: chain 1 fails a few steps in, after writing its first draws
        sample(TinyLM(), LMDataset(ids), {"probe": LMDataset(ids[:40])}, lr=1e-3, n_beta=20.0, num_chains=2,
               num_draws=12, batch_size=8, num_burnin_steps=1, num_init_loss_batches=1, localization=50.0,
               loss_fn=_aborting_loss(13 + 5), device="cpu", output_path=str(tmp_path / "run.zarr"))
    stored = np.asarray(__import__("xarray").open_zarr(tmp_path / "run.zarr", consolidated=False)["loss_probe"].values,
                        np.float64).mean(-1)
    written = int(np.isfinite(stored[1]).all(-1).sum())
    assert 0 < written < 12 and np.isnan(stored[1, written:]).all()
    with pytest.warns(RuntimeWarning, match=r"chains \[1\] were aborted by devinterp"):
        dropped = LossKernel.from_samples(tmp_path / "run.zarr", "probe")
    assert dropped.draws_per_chain == {0: 12} and dropped.rejected_per_chain == {1: 12}
    with pytest.warns(RuntimeWarning, match=r"chains \[1\] were aborted by devinterp"):
        kept = LossKernel.from_samples(tmp_path / "run.zarr", "probe", failed_chains="keep_finite")
    assert kept.draws_per_chain == {0: 12, 1: written} and kept.rejected_per_chain == {1: 12 - written}
    rows = np.concatenate([stored[0], stored[1, :written]])
    np.testing.assert_allclose(kept.covariance.numpy(), np.cov(rows, rowvar=False), rtol=1e-10, atol=1e-14)


# -- compute_bif's options, chunk by chunk (a synthetic store: needs xarray only) -------------------
def _bif_store(chains=2, draws=7, seed=3):
    xr = pytest.importorskip("xarray")
    g = np.random.default_rng(seed)
    arrays = {}
    for key, n in (("b", 3), ("a", 2)):
        losses = (4.0 + 0.05 * g.standard_normal((chains, draws, n, 4))).astype(np.float32)
        arrays[f"loss_{key}"] = (("chain", "draw", f"batch_{key}", "token_pos"), losses)
        arrays[f"input_ids_{key}"] = ((f"batch_{key}", "token"), g.integers(0, 50, (n, 5)))
    return xr.Dataset(arrays)


@pytest.mark.parametrize("reduce", ["stack", "mean"])
def test_from_samples_with_bif_options_reads_chunks_into_the_token_kernel(reduce):
    ds = _bif_store()
    k = kernel_from_samples(ds, correlation_method="token", loss_keys="all", reduce_chain_dimension_method=reduce,
                            batch_index_range_1=[4, 0], draws_per_read=3)
    x = np.concatenate([ds["loss_a"].values, ds["loss_b"].values], axis=2).astype(np.float64)  # "all": sorted ids
    x = x.mean(axis=0) if reduce == "mean" else x.reshape(-1, 5, 4)
    full = np.cov(x.reshape(len(x), -1), rowvar=False)
    rows = np.r_[np.arange(16, 20), np.arange(0, 4)]
    np.testing.assert_allclose(k.covariance.numpy(), full[rows], rtol=1e-10, atol=1e-15)
    assert k.num_draws == len(x) and k.token_positions[rows].tolist()[:2] == [[4, 1], [4, 2]]
    np.testing.assert_array_equal(k.input_ids.numpy(), np.concatenate([ds["input_ids_a"].values,
                                                                       ds["input_ids_b"].values]))


def test_from_samples_with_bif_options_averages_only_the_chains_that_reached_a_draw():
    ds = _bif_store()
    values = ds["loss_a"].values.copy()
    values[1, 5:] = np.nan  # chain 1 aborted after 5 draws: devinterp leaves NaN in its store
    ds["loss_a"] = (ds["loss_a"].dims, values)
    ds["loss_b"] = (ds["loss_b"].dims, np.where(np.isnan(values[..., :1, :1]), np.nan, ds["loss_b"].values))
    k = kernel_from_samples(ds, "a", correlation_method="sequence", reduce_chain_dimension_method="mean")
    want = np.cov(np.nanmean(values.astype(np.float64), axis=0).mean(axis=-1), rowvar=False)
    np.testing.assert_allclose(k.covariance.numpy(), want, rtol=1e-10)
    with pytest.raises(ValueError, match="devinterp's compute_bif gives NaN"):
        kernel_from_samples(ds, "a", correlation_method="sequence")
