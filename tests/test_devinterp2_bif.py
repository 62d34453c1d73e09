"""bif() / compute_bif() from streaming moments against devinterp 2's own (the devinterp 2.0 venv),
and against float64 references computed from the stored draws."""

import itertools
import warnings

import numpy as np
import pytest
import torch

from devinterp_losskernel import LossKernel
from devinterp_losskernel.accumulator import KernelMemoryError
from devinterp_losskernel.devinterp2_bif import (
    BifMoments,
    bif,
    compute_bif,
    estimate_bif_memory,
    influences_from_kernel,
)
from devinterp_losskernel.samples import kernel_from_samples

from _models import LMDataset, TinyLM
from conftest import require_devinterp

xr = pytest.importorskip("xarray")

SAMPLER = dict(lr=1e-3, n_beta=20.0, num_chains=2, num_draws=9, batch_size=8, num_burnin_steps=2,
               num_init_loss_batches=2, localization=50.0, device="cpu")


def setup():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 13, (80, 9), generator=g)
    model = TinyLM()
    with torch.no_grad():
        for p, value in zip(model.parameters(), torch.randn(sum(p.numel() for p in model.parameters()), generator=g)
                            .split([p.numel() for p in model.parameters()])):
            p.copy_(value.reshape(p.shape) * 0.3)
    # two observables: 24 + 8 sequences of T = 8 target positions; "other set" has devinterp id other_set
    observables = {"probe": LMDataset(ids[:40]), "other set": (LMDataset(ids[40:]), 1)}
    return model, LMDataset(ids), observables


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """devinterp's own sample() run, stored (its compute_bif reads it back)."""
    require_devinterp(2)
    from devinterp.slt.sampling import sample

    model, dataset, observables = setup()
    path = tmp_path_factory.mktemp("bif") / "samples.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = sample(model, dataset, observables, output_path=str(path), **SAMPLER)
    return samples, path


def reference(ds, keys, method="token", reduce="stack", r1="all", r2="all", average=False, covariance=False):
    """compute_bif in float64 numpy, from every stored draw."""
    losses = np.concatenate([np.asarray(ds[f"loss_{k}"].values, np.float64) for k in keys], axis=2)  # [C, D, N, T]
    x = losses.mean(axis=0) if reduce == "mean" else losses.reshape(-1, *losses.shape[2:])
    if method == "sequence":
        x = x.mean(axis=-1, keepdims=True)
    draws, n, width = x.shape
    k = np.cov(x.reshape(draws, -1), rowvar=False).reshape(n, width, n, width)
    r1 = np.arange(n) if r1 == "all" else np.asarray(r1)
    r2 = np.arange(n) if r2 == "all" else np.asarray(r2)
    block = k[r1][:, :, r2].transpose(0, 2, 1, 3)  # [n1, n2, w, w]
    if not covariance:
        sd = np.sqrt(np.einsum("iaia->ia", k))
        block = block / (sd[r1][:, None, :, None] * sd[r2][None, :, None, :])
        if method == "sequence":
            block = np.clip(block, -1, 1)
    if method == "sequence":
        return block[..., 0, 0]
    return block.mean(axis=(-1, -2)) if average else block


def assert_same_dataset(ours, theirs, *, atol):
    """devinterp's dims, coords, input_ids exactly; influences to float32 rounding."""
    assert ours.influences.dims == theirs.influences.dims
    assert ours.influences.dtype == theirs.influences.dtype == np.float32
    assert set(ours.coords) == set(theirs.coords) and set(ours.data_vars) == set(theirs.data_vars)
    for name in theirs.coords:
        np.testing.assert_array_equal(ours[name].values, theirs[name].values)
    assert ours.input_ids.dims == theirs.input_ids.dims
    np.testing.assert_array_equal(ours.input_ids.values, theirs.input_ids.values)
    np.testing.assert_allclose(ours.influences.values, theirs.influences.values, rtol=0, atol=atol)


OPTIONS = [dict(correlation_method=m, reduce_chain_dimension_method=r, average_tokenwise_bif=a, compute_covariance=c)
           for m, r, a, c in itertools.product(("token", "sequence"), ("stack", "mean"), (False, True), (False, True))]
RANGES = [dict(batch_index_range_1=[3, 0, 30], batch_index_range_2=[5, 6, 31, 3]),
          dict(loss_keys=["other_set"], batch_index_range_1=[1, 2]),
          dict(loss_keys=["other set", "probe"], batch_index_range_2=[0, 9])]


@pytest.mark.parametrize("options", OPTIONS + [dict(o, **r) for o, r in itertools.product(OPTIONS[:4:3], RANGES)],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_compute_bif_from_a_stored_run_equals_devinterps_and_the_float64_reference(stored, options):
    from devinterp.slt.bif import compute_bif as devinterp_compute_bif

    samples, path = stored
    keys = [k.replace(" ", "_") for k in options.get("loss_keys", ["other_set", "probe"])]
    # devinterp's compute_bif takes observable ids (other_set); ours also the names given to sample()
    theirs = devinterp_compute_bif(samples, **dict(options, loss_keys=keys) if "loss_keys" in options else options)
    ours = compute_bif(samples, draws_per_read=4, **options)  # chunks of 4 draws: not the store's chunking
    scale = float(np.abs(theirs.influences.values).max())
    # devinterp computes in float32: its chain and token means of losses ≈ 2.7 round at ~1e-7, against
    # per-draw spreads of sequence means down to ~1e-2, so its correlations carry errors up to ~1.2e-5
    # (measured against the float64 reference below, which ours meets to 3e-8)
    assert_same_dataset(ours, theirs, atol=2e-5 * scale)
    expected = reference(samples.dataset, keys, options["correlation_method"], options["reduce_chain_dimension_method"],
                         options.get("batch_index_range_1", "all"), options.get("batch_index_range_2", "all"),
                         options["average_tokenwise_bif"], options["compute_covariance"])
    np.testing.assert_allclose(ours.influences.values, expected, rtol=2e-7, atol=1e-7 * scale)  # ours: float64, cast
    again = compute_bif(path, **options)  # from the path, the store's own chunks
    np.testing.assert_array_equal(again.influences.values, ours.influences.values)


@pytest.mark.parametrize("options", [
    dict(),  # devinterp's defaults: token-wise correlations, chains stacked
    dict(correlation_method="sequence", compute_covariance=True),
    dict(reduce_chain_dimension_method="mean", average_tokenwise_bif=True),
    dict(loss_keys=["probe"], batch_index_range_1=[0, 5], batch_index_range_2=[1, 2, 23]),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_bif_in_one_run_equals_devinterps_on_its_stored_draws(stored, options):
    from devinterp.slt.bif import compute_bif as devinterp_compute_bif

    samples, _ = stored
    model, dataset, observables = setup()
    before = [p.detach().clone() for p in model.parameters()]
    ours, kernel = bif(model, dataset, observables, **SAMPLER, **options, return_kernel=True)
    theirs = devinterp_compute_bif(samples, **options)
    assert_same_dataset(ours, theirs, atol=2e-5 * float(np.abs(theirs.influences.values).max()))
    # the run's draws are devinterp's draws: what the stored run gives, to the last bit of float32
    np.testing.assert_array_equal(ours.influences.values, compute_bif(samples, **options).influences.values)
    assert ours.attrs["memory_bytes"] == kernel.metadata["bif"]["memory_bytes"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert_same_dataset(influences_from_kernel(kernel), ours, atol=0)


def test_devinterps_own_bif_call_and_ours_agree_and_leave_the_global_generators_alike():
    require_devinterp(2)
    import random

    from devinterp.slt.bif import bif as devinterp_bif

    model, dataset, observables = setup()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # devinterp: "Sampling without output_path"
        theirs = devinterp_bif(model, dataset, observables, **SAMPLER)
    after_theirs = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    ours = bif(model, dataset, observables, **SAMPLER)
    after_ours = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    assert_same_dataset(ours, theirs, atol=2e-5)
    # devinterp seeds the global generators per chain; ours adds no draw on them
    assert torch.equal(after_theirs[0], after_ours[0]) and np.array_equal(after_theirs[1], after_ours[1])
    assert after_theirs[2] == after_ours[2]


def test_a_tiny_gpt2_with_dropout_from_devinterps_configs_gives_devinterps_influences():
    """devinterp's own tiny configs; GPT-2's has dropout 0.1: devinterp evaluates every observable in
    the chain's train mode, and so does bif(), so even the dropout masks (and the chains) agree.
    (Llama and the other options: the same code path, tested on TinyLM above.)"""
    require_devinterp(2)
    from devinterp.slt._tiny_configs import make_tiny
    from devinterp.slt.bif import bif as devinterp_bif
    from transformers import AutoModelForCausalLM

    config = make_tiny("gpt2")
    assert config.resid_pdrop > 0 and config.attn_pdrop > 0  # devinterp's tiny GPT-2 keeps dropout
    with torch.random.fork_rng():  # the model's initialisation draws on the global generator: not ours
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, config.vocab_size, (48, 7), generator=g)
    dataset, observables = LMDataset(ids), {"a": (LMDataset(ids[:24]), 2), "b": (LMDataset(ids[24:]), 1)}
    kwargs = dict(SAMPLER, num_chains=2, num_draws=4, batch_size=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = devinterp_bif(model, dataset, observables, **kwargs)
    ours = bif(model, dataset, observables, **kwargs)
    assert_same_dataset(ours, theirs, atol=2e-5 * float(np.abs(theirs.influences.values).max()))


def test_output_path_writes_devinterps_store_too(stored, tmp_path):
    from devinterp.slt.bif import compute_bif as devinterp_compute_bif

    samples, _ = stored
    model, dataset, observables = setup()
    path = tmp_path / "ours.zarr"
    ours = bif(model, dataset, observables, **SAMPLER, output_path=str(path), correlation_method="sequence")
    written = xr.open_datatree(str(path), engine="zarr", consolidated=False)
    assert written.attrs["completed"] == 1
    for name in ("loss_probe", "loss_other_set", "input_ids_probe", "sampling_loss", "init_loss"):
        np.testing.assert_array_equal(written.dataset[name].values, samples.dataset[name].values)
    theirs = devinterp_compute_bif(written, correlation_method="sequence")
    assert_same_dataset(ours, theirs, atol=2e-5)
    with pytest.raises(FileExistsError, match="output_path"):
        bif(model, dataset, observables, **SAMPLER, output_path=str(path))


# -- the token-level kernel -----------------------------------------------------------------------
def test_token_kernel_from_samples_keeps_positions_and_ids_through_save_load_and_xarray(stored, tmp_path):
    samples, _ = stored
    k = kernel_from_samples(samples, correlation_method="token", loss_keys="all", batch_index_range_1=[2, 30])
    n, T = 32, 8
    assert k.covariance.shape == (2 * T, n * T) and k.num_samples == n * T
    assert k.token_positions.shape == (n * T, 2) and k.token_positions[9].tolist() == [1, 2]
    assert k.input_ids.shape == (n, T + 1)
    ids = np.concatenate([samples.dataset["input_ids_other_set"].values, samples.dataset["input_ids_probe"].values])
    np.testing.assert_array_equal(k.input_ids.numpy(), ids)
    k.save(tmp_path / "k.pt")
    back = LossKernel.load(tmp_path / "k.pt")
    assert torch.equal(back.token_positions, k.token_positions) and torch.equal(back.input_ids, k.input_ids)
    ds = k.to_xarray()
    assert ds.input_ids.dims == ("batch", "position")
    np.testing.assert_array_equal(ds.target_position.values, np.tile(np.arange(1, T + 1), n))
    np.testing.assert_array_equal(ds.batch_index.values, np.repeat(np.arange(n), T))
    again = LossKernel.from_xarray(ds)
    assert torch.equal(again.token_positions, k.token_positions) and torch.equal(again.input_ids, k.input_ids)
    theirs = compute_bif(samples, batch_index_range_1=[2, 30])
    xr.testing.assert_identical(influences_from_kernel(again), theirs)
    xr.testing.assert_identical(influences_from_kernel(LossKernel.from_samples(
        samples, "probe", correlation_method="sequence", compute_covariance=True)),
        compute_bif(samples, correlation_method="sequence", compute_covariance=True, loss_keys=["probe"]))


# -- moments without devinterp: synthetic draws, float64 references ---------------------------------
def synthetic(chains=3, draws=11, sizes=(4, 2), T=3, seed=1):
    g = np.random.default_rng(seed)
    return {f"o{i}": (5.0 + g.standard_normal((chains, draws, n, T)) @ g.standard_normal((T, T)) * 0.01
                      + g.standard_normal((chains, draws, 1, 1)) * 0.02).astype(np.float32)
            for i, n in enumerate(sizes)}


@pytest.mark.parametrize("reduce", ["stack", "mean"])
def test_moments_equal_the_float64_reference_for_a_large_offset_and_any_chunking(reduce):
    losses = synthetic()
    ds = xr.Dataset({f"loss_{k}": (("chain", "draw", f"batch_{k}", "token_pos"), v) for k, v in losses.items()})
    for average, covariance in itertools.product((False, True), repeat=2):
        m = BifMoments({"o0": 4, "o1": 2}, 3, reduce_chain_dimension_method=reduce, num_draws=11,
                       average_tokenwise_bif=average, compute_covariance=covariance, block_size=4)
        for chain in range(3):
            for start in (0, 5, 6):  # draw blocks of 5, 1 and 5
                stop = {0: 5, 5: 6, 6: 11}[start]
                m.update({k: v[chain, start:stop] for k, v in losses.items()}, chain=chain, draw=start)
        got = m.dataset(batch_size=2).influences.values
        want = reference(ds, ["o0", "o1"], "token", reduce, average=average, covariance=covariance)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7 * np.abs(want).max())


def test_state_memory_is_said_before_allocating_and_refused_when_it_cannot_fit(monkeypatch):
    from devinterp_losskernel import devinterp2_bif as bif_module

    assert estimate_bif_memory(10, 10, 4) > estimate_bif_memory(10, 10, 4, token_level=False)
    assert estimate_bif_memory(10, 10, 4, num_draws_for_mean=100) - estimate_bif_memory(10, 10, 4) == 8 * 100 * 41
    m = BifMoments({"a": 10}, 4, batch_index_range_1=[1], num_draws=5)
    assert m.memory_bytes == estimate_bif_memory(1, 10, 4) and tuple(m.accumulator._moments.m2.shape) == (4, 40)
    monkeypatch.setattr(bif_module, "_available_bytes", lambda device: 1000)
    with pytest.raises(KernelMemoryError, match=r"token-level BIF moments need .* GiB .*\(1·4\) × \(10·4\)"):
        BifMoments({"a": 10}, 4, batch_index_range_1=[1])
    with pytest.raises(KernelMemoryError, match="chain-mean sum of 50 draws"):
        BifMoments({"a": 10}, 4, reduce_chain_dimension_method="mean", num_draws=50)


def test_memory_does_not_grow_with_the_draws():
    m = BifMoments({"a": 3}, 2, block_size=8)
    sizes = []
    for start in range(0, 400, 40):
        m.update({"a": np.random.default_rng(start).standard_normal((40, 3, 2))}, chain=0)
        sizes.append(sum(t.numel() for t in (m.accumulator._moments.m2, m.accumulator._buffer)))
    assert len(set(sizes)) == 1 and m.accumulator.count == 400


def test_nan_where_devinterp_has_nan_and_the_mean_skips_unwritten_draws():
    losses = synthetic(chains=2, draws=6, sizes=(3,), T=2)
    cut = losses["o0"].copy()
    cut[1, 4:] = np.nan  # chain 1 stopped after 4 draws
    stack = BifMoments({"o0": 3}, 2)
    mean = BifMoments({"o0": 3}, 2, reduce_chain_dimension_method="mean", num_draws=6)
    for chain in range(2):
        stack.update({"o0": cut[chain]}, chain=chain)
        mean.update({"o0": cut[chain]}, chain=chain, draw=0)
    with pytest.warns(RuntimeWarning, match="NaN, as devinterp's"):
        assert np.isnan(stack.dataset().influences.values).all()
    with pytest.raises(ValueError, match="devinterp's compute_bif gives NaN"):
        stack.compute()
    want = np.cov(np.nanmean(cut.astype(np.float64), axis=0).reshape(6, -1), rowvar=False)
    got = mean.compute().covariance.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-9)


# -- arguments refused by name before any sampling --------------------------------------------------
class CountingLoss:
    def __init__(self):
        self.calls = 0

    def __call__(self, model, input_ids):
        self.calls += 1
        from devinterp.slt.lm_loss import compute_per_token_loss

        return compute_per_token_loss(model, input_ids)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(correlation_method="tokens"), ValueError, r"correlation_method must be one of \('token', 'sequence'\)"),
    (dict(reduce_chain_dimension_method="avg"), ValueError, "reduce_chain_dimension_method must be one of"),
    (dict(average_tokenwise_bif="yes"), TypeError, "average_tokenwise_bif must be True or False"),
    (dict(compute_covariance=1), TypeError, "compute_covariance must be True or False"),
    (dict(bif_batch_size=0), ValueError, "bif_batch_size must be a positive int"),
    (dict(batch_index_range_1=[32]), ValueError, r"batch_index_range_1 must hold batch indices in \[0, 32\)"),
    (dict(batch_index_range_2=[1.0]), TypeError, "batch_index_range_2 must hold int batch indices"),
    (dict(batch_index_range_2=[]), ValueError, "batch_index_range_2 must select at least one"),
    (dict(loss_keys=["nope"]), KeyError, r"loss_keys: observable\(s\) \['nope'\] not found"),
    (dict(loss_keys="some"), ValueError, "loss_keys must be 'all' or a list"),
    (dict(num_chainz=2), TypeError, r"does not take: \['num_chainz'\]"),
    (dict(bif_device="gpu!"), ValueError, "bif_device must be a torch device"),
    (dict(return_kernel="yes"), TypeError, "return_kernel must be True or False"),
])
def test_bad_arguments_are_refused_by_name_before_any_forward_pass(kwargs, error, match):
    require_devinterp(2)
    model, dataset, observables = setup()
    loss = CountingLoss()
    with pytest.raises(error, match=match):
        bif(model, dataset, observables, **{**SAMPLER, **kwargs}, loss_fn=loss)
    assert loss.calls == 0


def test_kernel_from_samples_names_options_that_do_not_combine(stored):
    samples, _ = stored
    with pytest.raises(ValueError, match=r"\['rows'\] cannot be combined with correlation_method="):
        kernel_from_samples(samples, correlation_method="token", rows=[0])
    with pytest.raises(ValueError, match=r"\['batch_index_range_1'\] are devinterp's compute_bif options"):
        kernel_from_samples(samples, batch_index_range_1=[0])
    with pytest.raises(ValueError, match="token-level influences need the token-level kernel"):
        influences_from_kernel(kernel_from_samples(samples, correlation_method="token", average_tokenwise_bif=True,
                                                   compute_covariance=True), average_tokenwise_bif=False)
