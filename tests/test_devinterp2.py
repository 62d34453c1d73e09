"""The callback inside devinterp 2.x's sample_single_chain (run by CI in the devinterp 2.0 venv)."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from devinterp_losskernel import LossKernelCallback, estimate_loss_kernel
from devinterp_losskernel.probe import lm_sequence_loss

from _models import LMDataset, ProbeRecorder, TinyLM
from conftest import require_devinterp


@pytest.fixture(autouse=True)
def _needs_devinterp2():
    require_devinterp(2)


def setup():
    torch.manual_seed(0)
    ids = torch.randint(0, 13, (80, 9))
    return TinyLM(), LMDataset(ids), {"input_ids": ids[:24]}


def evaluate(model, batch):
    return lm_sequence_loss(model, batch), {}


def test_sample_single_chain_with_callback():
    from devinterp.optim import SGLD
    from devinterp.slt.sampler import sample_single_chain

    model, dataset, probe = setup()
    cb, witness = LossKernelCallback(probe, block_size=5, reference_model=model), ProbeRecorder(probe)
    for chain in range(2):
        sample_single_chain(
            model, dataset, evaluate, param_masks={n: None for n, _ in model.named_parameters()},
            num_draws=8, num_burnin_steps=2, sampling_method=SGLD,
            sampling_method_kwargs=dict(lr=1e-3, nbeta=20.0, localization=50.0),
            chain=chain, seed=chain, device="cpu", callbacks=[cb, witness], batch_size=8,
        )
    k = cb.kernel
    traces = witness.traces()
    assert k.num_draws == 16 == len(traces) and k.draws_per_chain == {0: 8, 1: 8}
    np.testing.assert_allclose(k.covariance.numpy(), np.cov(traces, rowvar=False), rtol=1e-9, atol=1e-15)
    assert k.metadata["devinterp_version"].startswith("2.")
    assert k.metadata["sampler"]["lr"] == 1e-3
    assert "loss_kernel/covariance" in cb.get_results()
    assert k.covariance.abs().max() > 0


def test_estimate_loss_kernel_under_devinterp2():
    model, dataset, probe = setup()
    loader = DataLoader(dataset, batch_size=8, shuffle=True)
    k = estimate_loss_kernel(model, loader, probe, num_chains=2, num_draws=6, num_burnin_steps=1,
                             lr=1e-3, nbeta=20.0, localization=50.0, seed=0, verbose=False)
    assert k.num_draws == 12 and k.covariance.shape == (24, 24)
    assert np.isfinite(k.metadata["llc/mean"]) and len(k.metadata["llc/per_chain"]) == 2


def test_classification_data_runs_through_devinterp2s_sampler():
    torch.manual_seed(0)
    x = torch.randn(48, 5)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    loader = DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=12, shuffle=True)
    kwargs = dict(num_chains=2, num_draws=7, num_burnin_steps=3, num_steps_bw_draws=2, lr=1e-3,
                  nbeta=10.0, localization=50.0, seed=4, verbose=False,
                  callback_kwargs=dict(block_size=3))
    k = estimate_loss_kernel(model, loader, (x[:20], y[:20]), **kwargs)
    assert k.num_draws == 14 and k.draws_per_chain == {0: 7, 1: 7}
    assert k.metadata["sampler"]["nbeta"] == 10.0 and np.isfinite(k.metadata["llc/mean"])
    again = estimate_loss_kernel(model, loader, (x[:20], y[:20]), **kwargs)
    torch.testing.assert_close(again.covariance, k.covariance)  # seeded: repeats exactly
    assert k.covariance.abs().max() > 0


def test_diverged_chain_kept_out_under_devinterp2():
    model, dataset, probe = setup()
    loader = DataLoader(dataset, batch_size=8, shuffle=True)
    calls = {"n": 0}

    def evaluate(model, batch):
        calls["n"] += 1
        loss = lm_sequence_loss(model, batch).mean()
        return loss * float("nan") if calls["n"] >= 2 + 7 + 4 else loss  # chain 1, 4th step

    with pytest.warns(RuntimeWarning, match=r"chain 1: devinterp stopped it: .*NaN.*the chain has diverged"):
        k = estimate_loss_kernel(model, loader, probe, evaluate=evaluate, num_chains=2, num_draws=6,
                                 num_burnin_steps=1, lr=1e-3, nbeta=20.0, localization=50.0, seed=0,
                                 verbose=False)
    assert torch.isfinite(k.covariance).all()
    # chain 1's draws before the NaN were held back (window 16) and dropped with it
    assert k.draws_per_chain == {0: 6} and k.rejected_per_chain.get(1, 0) > 0 and k.num_draws == 6
    assert k.metadata["diverged_chains"] == [1] and k.metadata["llc/per_chain"][1] is None


def test_a_chain_devinterp2_aborts_in_the_users_own_loop_is_recorded():
    # devinterp 2.x catches a NaN minibatch loss, warns "Chain failed" and returns: with
    # num_draws= the callback sees the short chain when the next one starts
    from devinterp.optim import SGLD
    from devinterp.slt.sampler import sample_single_chain

    model, dataset, probe = setup()
    cb = LossKernelCallback(probe, reference_model=model, num_draws=6, divergence_window=3)
    witness = ProbeRecorder(probe)
    calls = {"n": 0}

    def nan_in_chain_0(model, batch):
        calls["n"] += 1
        loss, extra = evaluate(model, batch)
        return (loss * float("nan") if calls["n"] == 1 + 4 else loss), extra  # chain 0, step 5

    with pytest.warns(RuntimeWarning):
        for chain in range(2):
            sample_single_chain(
                model, dataset, nan_in_chain_0 if chain == 0 else evaluate,
                param_masks={n: None for n, _ in model.named_parameters()},
                num_draws=6, num_burnin_steps=1, sampling_method=SGLD,
                sampling_method_kwargs=dict(lr=1e-3, nbeta=20.0, localization=50.0),
                chain=chain, seed=chain, device="cpu", callbacks=[cb, witness], batch_size=8)
        cb.finalize()  # the end of the run: chain 0 delivered 3 of 6 draws
    k = cb.kernel
    assert cb.diverged_chains == [0] and "stopped it after 3 of num_draws=6" in k.metadata["chain_failures"][0]
    assert k.draws_per_chain == {1: 6} and k.rejected_per_chain == {0: 3}
    traces = witness.traces()[np.array(witness.chains) == 1]
    np.testing.assert_allclose(k.covariance.numpy(), np.cov(traces, rowvar=False), rtol=1e-9, atol=1e-15)


# -- issue 11: devinterp 2.x first class ---------------------------------------------------------
def lm_run_args(**extra):
    return dict(lr=1e-3, n_beta=20.0, num_chains=3, num_draws=10, batch_size=8, num_burnin_steps=3,
                num_init_loss_batches=4, localization=50.0, device="cpu", **extra)


def test_llc_twin_gives_devinterps_llc_and_compute_bifs_kernel(tmp_path):
    import warnings

    from devinterp.slt.bif import compute_bif
    from devinterp.slt.llc import compute_llc
    from devinterp.slt.llc import llc as devinterp_llc
    from devinterp.slt.sampling import sample

    from devinterp_losskernel import LossKernel, llc

    torch.manual_seed(0)
    ids = torch.randint(0, 13, (80, 9))
    model, dataset = TinyLM(), LMDataset(ids)
    observables = {"other": LMDataset(ids[40:]), "probe": LMDataset(ids[:40])}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = devinterp_llc(model, dataset, observables, **lm_run_args())
        ours, kernel = llc(model, dataset, observables, observable="probe", return_kernel=True, **lm_run_args())
        samples = sample(model, dataset, observables, output_path=str(tmp_path / "s.zarr"), **lm_run_args())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # w* untouched
    for name in ("llc_mean", "llc_std", "llc_per_chain", "loss_trace", "init_loss", "llc_scalar"):
        # bit for bit: llc_scalar is devinterp's float32 mean of its whole store, streamed (float32_mean.py)
        np.testing.assert_array_equal(np.asarray(ours[name].values), np.asarray(theirs[name].values), err_msg=name)
    assert ours.loss_trace.shape == (3, 13)  # every step, burn-in included
    np.testing.assert_allclose(float(compute_llc(samples).llc_mean), float(ours.llc_mean), rtol=1e-6)
    bif = compute_bif(samples, loss_keys=["probe"], correlation_method="sequence", compute_covariance=True)
    scale = float(np.abs(ours.covariance.values).max())
    assert scale > 0 and ours.covariance.shape == (24, 24)
    np.testing.assert_allclose(ours.covariance.values, bif.influences.values, rtol=0, atol=1e-5 * scale)
    np.testing.assert_array_equal(ours.probe_input_ids.values, samples.dataset["input_ids_probe"].values)
    stored = LossKernel.from_samples(samples, "probe")  # the kernel of the stored run, the same draws
    np.testing.assert_allclose(ours.covariance.values, stored.covariance.numpy(), rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(ours.correlation.values, kernel.correlation.numpy())
    assert ours.draws_per_chain.values.tolist() == [10, 10, 10] and int(ours.num_draws) == 30
    assert np.isfinite(float(ours.probe_llc))
    # the probe observable is another dataset object: not taken as training data, so no ν (said why)
    assert np.isnan(float(ours.singular_fluctuation))
    assert "probe_train_mask" in ours.singular_fluctuation.attrs["why_nan"]
    assert kernel.metadata["sampler"]["localization"] == 50.0 and kernel.metadata["sampler"]["nbeta"] == 20.0
    assert kernel.metadata["llc/mean"] == pytest.approx(float(theirs.llc_mean), rel=1e-6)
    with pytest.raises(KeyError, match="missing"):
        llc(model, dataset, observables, observable="missing", **lm_run_args())
    (tmp_path / "x.zarr").mkdir()  # output_path is taken (issue 20), but an existing store is not overwritten
    with pytest.raises(FileExistsError, match="output_path"):
        llc(model, dataset, observables, output_path=str(tmp_path / "x.zarr"), **lm_run_args())


def test_callback_records_sgmcmc_sgld_settings_like_sgld():
    import warnings

    from devinterp.optim import SGLD, SGMCMC
    from devinterp.slt.sampler import sample_single_chain

    model, dataset, probe = setup()
    kernels = []
    for method in (SGMCMC.sgld, SGLD):
        cb = LossKernelCallback(probe, reference_model=model, num_draws=5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sample_single_chain(model, dataset, evaluate, param_masks={n: None for n, _ in model.named_parameters()},
                                num_draws=5, num_burnin_steps=1, sampling_method=method,
                                sampling_method_kwargs=dict(lr=1e-3, nbeta=20.0, localization=50.0),
                                chain=0, seed=3, device="cpu", callbacks=[cb], batch_size=8)
        kernels.append(cb.kernel)
    for k in kernels:
        assert k.metadata["sampler"] == {"lr": 1e-3, "nbeta": 20.0, "localization": 50.0, "noise_level": 1.0,
                                         "weight_decay": 0.0}
    torch.testing.assert_close(kernels[0].covariance, kernels[1].covariance, rtol=0, atol=0)  # the same steps


def test_draw_schedule_is_devinterps_with_num_steps_bw_draws_3():
    torch.manual_seed(0)
    x, y = torch.randn(40, 5), torch.randint(0, 2, (40,))
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    events = []

    def evaluate(model, batch):
        events.append("e")
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    def loss_fn(model, batch):
        events.append("p")
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")

    b, k, T, C = 2, 3, 4, 2
    kernel = estimate_loss_kernel(model, DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True),
                                  (x[:10], y[:10]), loss_fn=loss_fn, evaluate=evaluate, num_chains=C, num_draws=T,
                                  num_burnin_steps=b, num_steps_bw_draws=k, lr=1e-3, nbeta=10.0,
                                  localization=50.0, seed=1, verbose=False)
    # devinterp 2: draws after steps b, b+k, …, b+(T−1)k (0-based), then the k−1 remaining steps
    chain = "e" * (b + 1) + "p" + ("e" * k + "p") * (T - 1) + "e" * (k - 1)
    assert "".join(events).endswith(chain * C)
    assert kernel.num_draws == C * T and kernel.metadata["settings"]["sampling_method"] == "SGMCMC.sgld"


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = torch.nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.head(h.flatten(1))


def test_cnn_through_devinterp2s_sampler_keeps_the_users_collate_fn_and_sampler():
    from devinterp.optim import SGLD

    torch.manual_seed(0)
    images, labels = torch.randn(60, 1, 8, 8), torch.randint(0, 3, (60,))
    model = SmallCNN()
    seen = set()

    class Indexed(torch.utils.data.Dataset):
        def __len__(self):
            return 60

        def __getitem__(self, i):
            return i, images[i], labels[i]

    def collate(items):  # the user's: drops the index, records it
        seen.update(i for i, _, _ in items)
        return torch.stack([im for _, im, _ in items]), torch.stack([lab for _, _, lab in items])

    subset = list(range(0, 60, 2))
    loader = DataLoader(Indexed(), batch_size=6, sampler=torch.utils.data.SubsetRandomSampler(subset),
                        collate_fn=collate)
    kwargs = dict(num_chains=2, num_draws=6, num_burnin_steps=2, lr=1e-3, nbeta=10.0, localization=100.0,
                  seed=5, verbose=False)
    probe = (images[:12], labels[:12])
    k = estimate_loss_kernel(model, loader, probe, **kwargs)
    assert seen and seen <= set(subset)  # only the sampler's indices, through the user's collate_fn
    assert k.num_draws == 12 and k.draws_per_chain == {0: 6, 1: 6} and torch.isfinite(k.covariance).all()
    assert k.covariance.abs().max() > 0 and np.isfinite(k.metadata["llc/mean"])
    assert k.metadata["sampler"]["localization"] == 100.0
    again = estimate_loss_kernel(model, loader, probe, sampling_method=SGLD, **kwargs)
    # SGLD and SGMCMC.sgld take the same steps, up to the order of float operations
    torch.testing.assert_close(again.covariance, k.covariance, rtol=1e-3, atol=1e-6 * float(k.covariance.abs().max()))
    assert again.metadata["settings"]["sampling_method"] == "SGLD"


def test_attention_mask_follows_the_tokens_to_their_device():
    model, _, _ = setup()
    ids = torch.randint(0, 13, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 5:] = 0
    out = lm_sequence_loss(model, {"input_ids": ids, "attention_mask": mask})
    full = lm_sequence_loss(model, {"input_ids": ids[:1, :5]})
    torch.testing.assert_close(out[0], full[0])


def test_cnn_through_sample_single_chain_with_mapping_items_and_num_steps_bw_draws_3():
    # the notebook's recipe (tutorial 05): an image dataset as {"input_ids": image, "labels": y}
    # items, straight into devinterp 2's sampler with the callback; devinterp's draw schedule
    from devinterp.optim import SGMCMC
    from devinterp.slt.sampler import sample_single_chain

    torch.manual_seed(0)
    images, labels = torch.randn(48, 1, 8, 8), torch.randint(0, 3, (48,))
    model = SmallCNN()

    class AsInputIds(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return {"input_ids": images[i], "labels": labels[i]}

    events = []

    def evaluate(model, batch):  # devinterp moves only "input_ids"; the labels are moved here
        events.append("e")
        logits = model(batch["input_ids"])
        return torch.nn.functional.cross_entropy(logits, batch["labels"].to(logits.device), reduction="none"), {}

    draws = []

    def witness_draw(*, draw, chain, **_):
        events.append("p")
        draws.append((chain, draw))

    probe = (images[:10], labels[:10])
    b, k, T, C = 2, 3, 5, 2
    cb, witness = LossKernelCallback(probe, reference_model=model, num_draws=T), ProbeRecorder(probe)
    for chain in range(C):
        sample_single_chain(model, AsInputIds(), evaluate, param_masks={n: None for n, _ in model.named_parameters()},
                            num_draws=T, num_burnin_steps=b, num_steps_bw_draws=k, sampling_method=SGMCMC.sgld,
                            sampling_method_kwargs=dict(lr=1e-3, nbeta=10.0, localization=100.0),
                            chain=chain, seed=chain, device="cpu", callbacks=[cb, witness, witness_draw],
                            batch_size=8)
    cb.finalize()
    kernel = cb.kernel
    # devinterp 2: draws after steps b, b+k, …, b+(T−1)k (0-based), then the k−1 remaining steps
    assert "".join(events) == ("e" * (b + 1) + "p" + ("e" * k + "p") * (T - 1) + "e" * (k - 1)) * C
    assert draws == [(c, d) for c in range(C) for d in range(T)]
    assert kernel.num_draws == C * T and kernel.draws_per_chain == {0: T, 1: T}
    np.testing.assert_allclose(kernel.covariance.numpy(), np.cov(witness.traces(), rowvar=False),
                               rtol=1e-9, atol=1e-15)
    assert kernel.covariance.abs().max() > 0 and kernel.init_loss.shape == (10,)
    assert kernel.metadata["sampler"]["localization"] == 100.0


def test_llc_twin_equals_devinterp_with_num_steps_bw_draws_3(tmp_path):
    import warnings

    from devinterp.slt.bif import compute_bif
    from devinterp.slt.llc import llc as devinterp_llc
    from devinterp.slt.sampling import sample

    from devinterp_losskernel import llc

    torch.manual_seed(1)
    ids = torch.randint(0, 13, (64, 9))
    model, dataset = TinyLM(), LMDataset(ids)
    observables = {"probe": LMDataset(ids[:24])}
    args = lm_run_args(num_steps_bw_draws=3)
    args.update(num_chains=2, num_draws=5, num_burnin_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = devinterp_llc(model, dataset, observables, **args)
        ours = llc(model, dataset, observables, **args)
        samples = sample(model, dataset, observables, output_path=str(tmp_path / "s.zarr"), **args)
    assert ours.loss_trace.shape == theirs.loss_trace.shape == (2, 2 + 5 * 3)  # every step
    for name in ("llc_mean", "llc_per_chain", "loss_trace", "init_loss"):
        np.testing.assert_allclose(np.asarray(ours[name].values, float), np.asarray(theirs[name].values, float),
                                   rtol=1e-6, atol=1e-7, err_msg=name)
    bif = compute_bif(samples, correlation_method="sequence", compute_covariance=True).influences.values
    scale = float(np.abs(bif).max())
    assert scale > 0 and ours.draws_per_chain.values.tolist() == [5, 5]
    np.testing.assert_allclose(ours.covariance.values, bif, rtol=0, atol=1e-5 * scale)  # the same draws


def test_llc_twin_keeps_devinterps_llc_when_no_kernel_can_be_made():
    """Every chain diverges (lr=100): the kernel has no draws, but devinterp's LLC of the run is
    returned (bit for bit), with the reason, not lost to an error after sampling."""
    import warnings

    from devinterp.slt.llc import llc as devinterp_llc

    from devinterp_losskernel import llc

    torch.manual_seed(0)
    ids = torch.randint(0, 13, (40, 9))
    model, dataset = TinyLM(), LMDataset(ids)
    args = dict(lr=100.0, n_beta=20.0, num_chains=2, num_draws=5, batch_size=8, num_init_loss_batches=2,
                device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = devinterp_llc(model, dataset, {"probe": LMDataset(ids[:24])}, **args)
    with pytest.warns(RuntimeWarning, match="no loss kernel for this run"):
        ours, kernel = llc(model, dataset, {"probe": LMDataset(ids[:24])}, return_kernel=True, **args)
    assert kernel is None and "diverged" in ours.attrs["loss_kernel_error"]
    for name in ("llc_mean", "llc_per_chain", "llc_scalar", "loss_trace", "init_loss"):
        np.testing.assert_array_equal(np.asarray(ours[name].values), np.asarray(theirs[name].values), err_msg=name)


def test_llc_twin_writes_devinterps_store_with_output_path_and_save_metrics(tmp_path):
    """Issue 20: every sample() argument passes through; with output_path the twin writes the
    store devinterp's llc(..., output_path=) writes, bit for bit, and the LLC is devinterp's."""
    import warnings

    import xarray as xr
    from devinterp.slt.llc import compute_llc
    from devinterp.slt.llc import llc as devinterp_llc

    from devinterp_losskernel import llc

    torch.manual_seed(0)
    ids = torch.randint(0, 13, (64, 9))
    model, dataset = TinyLM(), LMDataset(ids)
    observables = {"other set": (LMDataset(ids[32:]), 2), "probe": LMDataset(ids[:32])}
    args = lm_run_args(save_metrics=True, gradient_accumulation_steps=2)
    args.update(num_chains=2, num_draws=6, batches_per_draw=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = devinterp_llc(model, dataset, observables, output_path=str(tmp_path / "theirs.zarr"), **args)
        ours = llc(model, dataset, observables, observable="probe", output_path=str(tmp_path / "ours.zarr"), **args)
    for name in ("llc_mean", "llc_std", "llc_per_chain", "loss_trace", "init_loss", "llc_scalar"):
        np.testing.assert_array_equal(np.asarray(ours[name].values), np.asarray(theirs[name].values), err_msg=name)
    mine = xr.open_datatree(str(tmp_path / "ours.zarr"), engine="zarr", consolidated=False)
    devs = xr.open_datatree(str(tmp_path / "theirs.zarr"), engine="zarr", consolidated=False)
    assert sorted(mine.dataset.data_vars) == sorted(devs.dataset.data_vars)
    assert any(str(v).startswith("metrics_") for v in devs.dataset.data_vars)
    assert mine.attrs == devs.attrs and mine.attrs["completed"] == 1 and "metrics_numel" in mine.attrs
    for var in devs.dataset.data_vars:
        assert mine[var].dims == devs[var].dims, var
        np.testing.assert_array_equal(mine[var].values, devs[var].values, err_msg=var)
    assert float(compute_llc(mine).llc_mean) == float(theirs.llc_mean)
    # the store's probe draws are the kernel's draws: the kernel of the stored run is ours
    from devinterp_losskernel import LossKernel

    stored = LossKernel.from_samples(mine, "probe")
    scale = float(np.abs(ours.covariance.values).max())
    np.testing.assert_allclose(ours.covariance.values, stored.covariance.numpy(), rtol=0, atol=1e-6 * scale)
    with pytest.raises(TypeError, match="save_metrics"):
        llc(model, dataset, observables, save_metrics="yes", **lm_run_args())
