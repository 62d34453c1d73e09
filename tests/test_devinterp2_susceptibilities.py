"""The streaming susceptibilities() twin against devinterp 2's own (run in the devinterp 2.0 venv)."""

import warnings

import numpy as np
import pytest
import torch

from _models import LMDataset, TinyLM
from conftest import require_devinterp


@pytest.fixture(autouse=True)
def _needs_devinterp2():
    require_devinterp(2)


def run_args(**extra):
    args = dict(lr=1e-3, n_beta=20.0, num_chains=2, num_draws=8, batch_size=8, num_burnin_steps=2,
                num_init_loss_batches=3, localization=50.0, device="cpu")
    args.update(extra)
    return args


def lm_setup(seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(0, 13, (80, 9))
    model, dataset = TinyLM(), LMDataset(ids)
    observables = {"train": LMDataset(ids[:40]), "probe set": LMDataset(ids[40:])}
    half = torch.zeros(12, 12, dtype=torch.bool)
    half[:6] = True
    restrictions = {"out": {"out.weight": None, "out.bias": None}, "full": None, "mix half": {"mix.weight": half}}
    return model, dataset, observables, restrictions


def float64_reference(stores, sampling_id, obs_id):
    """devinterp's estimator (compute_susceptibilities) in float64 on its stored draws:
    χ = E[φ·a] − E[φ·b] − E[φ]·(ā_full − b̄_full), φ = a − c."""
    full = stores["full"].dataset
    c = np.asarray(full["init_loss"].values, np.float64).mean()
    full_delta = np.asarray(full[f"loss_{sampling_id}"].values, np.float64).mean() \
        - np.asarray(full[f"loss_{obs_id}"].values, np.float64).mean(axis=(0, 1))
    columns = []
    for name, tree in stores.items():
        if name == "full":
            continue
        a = np.asarray(tree.dataset[f"loss_{sampling_id}"].values, np.float64).mean(axis=(-2, -1))
        b = np.asarray(tree.dataset[f"loss_{obs_id}"].values, np.float64)
        phi = a - c
        chi = (phi * a).mean() - (phi[:, :, None, None] * b).mean(axis=(0, 1)) - phi.mean() * full_delta
        columns.append(chi.ravel())
    return np.stack(columns, axis=-1)


def test_susceptibilities_equal_devinterps_on_the_same_draws(tmp_path):
    from devinterp.slt.sampling import sample
    from devinterp.slt.susceptibilities import susceptibilities as devinterp_susceptibilities

    from devinterp_losskernel.devinterp2_susceptibilities import susceptibilities

    model, dataset, observables, restrictions = lm_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = devinterp_susceptibilities(model, dataset, observables, restrictions, sampling_task="train",
                                            **run_args())
        their_rng = torch.get_rng_state()
        ours = susceptibilities(model, dataset, observables, restrictions, sampling_task="train", **run_args())
        our_rng = torch.get_rng_state()
        stores = {name: sample(model, dataset, observables, param_masks=masks, output_path=str(tmp_path / name),
                               **run_args())
                  for name, masks in restrictions.items()}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # w* untouched
    assert torch.equal(their_rng, our_rng)  # the same seeding, nothing more drawn from torch's generator
    sus, their_sus = ours["/susceptibilities"], theirs["/susceptibilities"]
    assert sus.sus.dims == their_sus.sus.dims == ("sus_flat", "wr") and sus.sus.shape == (24 * 8, 2)
    assert list(sus.wr.values) == ["out", "mix half"] and sus.attrs == their_sus.attrs == {
        "dataset_id_to_name": ["probe_set"]}
    for coord in ("dataset_id", "batch", "target_position"):
        np.testing.assert_array_equal(sus[coord].values, their_sus[coord].values, err_msg=coord)
    context, their_context = ours["/context"].dataset, theirs["/context"].dataset
    assert context.identical(their_context)
    scale = float(np.abs(their_sus.sus.values).max())
    assert scale > 0
    # devinterp computes in float32: agreement to its rounding
    np.testing.assert_allclose(sus.sus.values, their_sus.sus.values, rtol=0, atol=2e-5 * scale)
    # the same draws: devinterp's estimator in float64 on devinterp's own store agrees to float64 rounding
    reference = float64_reference(stores, "train", "probe_set")
    np.testing.assert_allclose(sus.sus.values, reference, rtol=1e-9, atol=1e-12 * scale)


def test_include_sampling_task_and_stored_runs_read_in_chunks(tmp_path):
    from devinterp.slt.sampling import sample
    from devinterp.slt.susceptibilities import compute_susceptibilities as devinterp_compute

    from devinterp_losskernel.devinterp2_susceptibilities import compute_susceptibilities, susceptibilities

    model, dataset, observables, restrictions = lm_setup(1)
    restrictions.pop("mix half")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stores = {name: sample(model, dataset, observables, param_masks=masks, output_path=str(tmp_path / name),
                               **run_args(num_draws=7))
                  for name, masks in restrictions.items()}
        ours = susceptibilities(model, dataset, observables, restrictions, sampling_task="train",
                                include_sampling_task=True, **run_args(num_draws=7))
    theirs = devinterp_compute(stores, "train", include_sampling_task=True)
    from_store = compute_susceptibilities(stores, "train", include_sampling_task=True, chunk_draws=3)
    assert theirs["/susceptibilities"].attrs["dataset_id_to_name"] == ["probe_set", "train"]
    for tree in (ours, from_store):
        assert tree["/susceptibilities"].attrs == theirs["/susceptibilities"].attrs
        assert tree["/context"].dataset.identical(theirs["/context"].dataset)
    their_sus = theirs["/susceptibilities"].sus.values
    scale = float(np.abs(their_sus).max())
    np.testing.assert_allclose(from_store["/susceptibilities"].sus.values, their_sus, rtol=0, atol=2e-5 * scale)
    # the run's moments and the store's, chunk by chunk: the same float32 draws, float64 sums
    np.testing.assert_allclose(ours["/susceptibilities"].sus.values, from_store["/susceptibilities"].sus.values,
                               rtol=1e-9, atol=1e-12 * scale)
    only = compute_susceptibilities(stores, "train", observable_names=["train"])
    np.testing.assert_allclose(only["/susceptibilities"].sus.values,
                               devinterp_compute(stores, "train", observable_names=["train"])[
                                   "/susceptibilities"].sus.values, rtol=0, atol=2e-5 * scale)


def test_moments_fold_blocks_and_single_draws_alike():
    """Chan's merge of blocks gives the one-pass float64 moments, and χ from them is the
    closed form on known draws."""
    from devinterp_losskernel.devinterp2_susceptibilities import SusceptibilityMoments

    gen = torch.Generator().manual_seed(3)
    draws, n, t = 23, 5, 4
    a_losses = 3.0 + 0.1 * torch.randn(draws, 6, t, generator=gen, dtype=torch.float64)
    b_losses = 2.0 + torch.randn(draws, n, t, generator=gen, dtype=torch.float64) + 0.5 * a_losses.mean(
        dim=(1, 2))[:, None, None]
    ids = {"s": torch.zeros(6, t + 1, dtype=torch.long), "p": torch.zeros(n, t + 1, dtype=torch.long)}
    one, blocks = SusceptibilityMoments("s", ids), SusceptibilityMoments("s", ids)
    for d in range(draws):
        one.update({"s": a_losses[d], "p": b_losses[d]})
    for start, stop in ((0, 7), (7, 8), (8, 23)):
        blocks.update({"s": a_losses[start:stop], "p": b_losses[start:stop]})
    a = a_losses.mean(dim=(1, 2)).numpy()
    b = b_losses.numpy()
    for m in (one, blocks):
        assert m.count == draws
        np.testing.assert_allclose(float(m.mean_a), a.mean(), rtol=1e-14)
        np.testing.assert_allclose(float(m.m2_a), ((a - a.mean()) ** 2).sum(), rtol=1e-12)
        np.testing.assert_allclose(m.comoment["p"].numpy(), np.einsum("d,dij->ij", a - a.mean(), b - b.mean(0)),
                                   rtol=1e-11, atol=1e-13)
    c = 2.9
    chi = blocks.susceptibility("p", init_loss_mean=c, full=one)  # full = the same run: χ = −Cov(a, b − a)
    phi = a - c
    expected = (phi * a).mean() - np.einsum("d,dij->ij", phi, b) / draws - phi.mean() * (a.mean() - b.mean(0))
    np.testing.assert_allclose(chi.numpy(), expected, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(chi.numpy(), -np.einsum("d,dij->ij", a - a.mean(), (b - a[:, None, None])
                                                       - (b - a[:, None, None]).mean(0)) / draws, rtol=1e-10,
                               atol=1e-13)
    with pytest.raises(ValueError, match=r"losses\['p'\] has shape"):
        one.update({"s": a_losses[0], "p": b_losses[0, :3]})


def test_arguments_are_refused_by_name_before_sampling(tmp_path):
    from devinterp_losskernel.devinterp2_susceptibilities import susceptibilities

    model, dataset, observables, restrictions = lm_setup()

    def call(**change):
        kwargs = dict(model=model, dataset=dataset, observables=observables, weight_restrictions=restrictions,
                      sampling_task="train", **run_args())
        kwargs.update(change)
        return susceptibilities(**kwargs)

    with pytest.raises(ValueError, match="'full' key"):
        call(weight_restrictions={"out": None})
    with pytest.raises(ValueError, match="besides 'full'"):
        call(weight_restrictions={"full": None})
    with pytest.raises(ValueError, match="does not have"):
        call(weight_restrictions={"full": None, "x": {"nope.weight": None}})
    with pytest.raises(ValueError, match=r"bool mask of shape \(12, 12\)"):
        call(weight_restrictions={"full": None, "x": {"mix.weight": torch.ones(3, dtype=torch.bool)}})
    with pytest.raises(ValueError, match="sampling_task 'missing'"):
        call(sampling_task="missing")
    with pytest.raises(TypeError, match="num_draw"):
        call(num_draw=3)
    with pytest.raises(TypeError, match="param_masks"):
        call(param_masks=None)
    with pytest.raises(ValueError, match="besides sampling_task"):
        call(observables={"train": observables["train"]})
    with pytest.raises(ValueError, match="rmsprop_eps"):
        call(rmsprop_eps=1e-3)
    with pytest.raises(ValueError, match=r"observables\['train'\] holds 40 sequences"):
        call(batches_per_draw=6)
    (tmp_path / "s_out.zarr").mkdir()
    with pytest.raises(FileExistsError, match="weight restriction 'out'"):
        call(output_path=str(tmp_path / "s.zarr"))
    assert not (tmp_path / "s_full.zarr").exists()  # refused before anything was written


def test_output_path_writes_devinterps_stores(tmp_path):
    """With output_path=, each restriction's store is devinterp's sample() store of the same run."""
    import xarray as xr
    from devinterp.slt.susceptibilities import susceptibilities as devinterp_susceptibilities

    from devinterp_losskernel.devinterp2_susceptibilities import susceptibilities

    model, dataset, observables, restrictions = lm_setup(2)
    restrictions.pop("mix half")
    args = run_args(num_draws=5, save_metrics=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = devinterp_susceptibilities(model, dataset, observables, restrictions, sampling_task="train",
                                            output_path=str(tmp_path / "theirs.zarr"), **args)
        ours = susceptibilities(model, dataset, observables, restrictions, sampling_task="train",
                                output_path=str(tmp_path / "ours.zarr"), **args)
    for name in restrictions:
        mine = xr.open_datatree(str(tmp_path / f"ours_{name}.zarr"), engine="zarr", consolidated=False).dataset
        devs = xr.open_datatree(str(tmp_path / f"theirs_{name}.zarr"), engine="zarr", consolidated=False).dataset
        assert sorted(mine.data_vars) == sorted(devs.data_vars)
        assert any(str(v).startswith("metrics_") for v in mine.data_vars) and "metrics_numel" in mine.attrs
        assert mine.attrs == devs.attrs and mine.attrs["completed"] == 1
        for var in devs.data_vars:
            assert mine[var].dims == devs[var].dims, var
            np.testing.assert_array_equal(mine[var].values, devs[var].values, err_msg=f"{name}: {var}")
    np.testing.assert_allclose(ours["/susceptibilities"].sus.values, theirs["/susceptibilities"].sus.values,
                               rtol=0, atol=2e-5 * float(np.abs(theirs["/susceptibilities"].sus.values).max()))


def test_a_stopped_chain_gives_nan_as_in_devinterp():
    """A chain devinterp stops (a non-finite loss) leaves NaN in its store, so its numbers are
    NaN; ours too, with a warning that says which chains."""
    from devinterp.slt.lm_loss import compute_per_token_loss
    from devinterp.slt.susceptibilities import susceptibilities as devinterp_susceptibilities

    from devinterp_losskernel.devinterp2_susceptibilities import susceptibilities

    model, dataset, observables, restrictions = lm_setup()
    restrictions.pop("mix half")
    limit = float(model.out.weight.abs().max()) + 0.02

    def fragile_loss(model, input_ids):  # NaN once the chain has wandered off
        loss = compute_per_token_loss(model, input_ids)
        return loss if float(model.out.weight.abs().max()) < limit else loss * float("nan")

    args = run_args(num_draws=6, num_burnin_steps=0, localization=0.0, lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = devinterp_susceptibilities(model, dataset, observables, restrictions, sampling_task="train",
                                            loss_fn=fragile_loss, **args)
    with pytest.warns(RuntimeWarning, match="incomplete"):
        ours = susceptibilities(model, dataset, observables, restrictions, sampling_task="train",
                                loss_fn=fragile_loss, **args)
    their_sus, our_sus = theirs["/susceptibilities"].sus.values, ours["/susceptibilities"].sus.values
    np.testing.assert_array_equal(np.isnan(our_sus), np.isnan(their_sus))
    assert np.isnan(our_sus).all()


def test_compute_susceptibilities_refuses_what_it_cannot_use():
    from devinterp_losskernel.devinterp2_susceptibilities import SusceptibilityMoments, compute_susceptibilities

    ids = {"train": torch.zeros(4, 3, dtype=torch.long), "probe": torch.ones(2, 3, dtype=torch.long)}
    gen = torch.Generator().manual_seed(0)

    def run(init_loss=None):
        m = SusceptibilityMoments("train", ids, init_loss=init_loss)
        m.update({"train": torch.rand(5, 4, 2, generator=gen), "probe": torch.rand(5, 2, 2, generator=gen)})
        return m

    full, other = run(torch.full((2, 2), 0.4)), run()
    tree = compute_susceptibilities({"full": full, "wr": other}, "train")
    assert tree["/susceptibilities"].sus.shape == (4, 1) and list(tree["/susceptibilities"].wr.values) == ["wr"]
    with pytest.raises(ValueError, match="'full' key"):
        compute_susceptibilities({"wr": other}, "train")
    with pytest.raises(ValueError, match="besides 'full'"):
        compute_susceptibilities({"full": full}, "train")
    with pytest.raises(TypeError, match=r"wr_map\['wr'\] must be"):
        compute_susceptibilities({"full": full, "wr": np.zeros(3)}, "train")
    with pytest.raises(KeyError, match="no observable"):
        compute_susceptibilities({"full": full, "wr": other}, "train", observable_names=["missing"])
    with pytest.raises(ValueError, match="sampling task 'train'"):
        compute_susceptibilities({"full": full, "wr": other}, "probe")
    with pytest.raises(ValueError, match="no init_loss"):
        compute_susceptibilities({"full": run(), "wr": other}, "train")
