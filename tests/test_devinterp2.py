"""The callback inside devinterp 2.x's sample_single_chain (run by CI in the devinterp 2.0 venv)."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import require_devinterp
from devinterp_losskernel import LossKernelCallback, estimate_loss_kernel
from devinterp_losskernel.probe import lm_sequence_loss

from _models import LMDataset, ProbeRecorder, TinyLM


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


def test_classification_data_under_devinterp2_uses_its_sgld_in_our_loop():
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
    cb, witness = LossKernelCallback(probe, reference_model=model, num_draws=6, divergence_window=3), ProbeRecorder(probe)
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
    k = cb.kernel
    assert cb.diverged_chains == [0] and "stopped it after 3 of num_draws=6" in k.metadata["chain_failures"][0]
    assert k.draws_per_chain == {1: 6} and k.rejected_per_chain == {0: 3}
    traces = witness.traces()[np.array(witness.chains) == 1]
    np.testing.assert_allclose(k.covariance.numpy(), np.cov(traces, rowvar=False), rtol=1e-9, atol=1e-15)
