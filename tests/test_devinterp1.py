"""The callback inside devinterp 1.x's own sampler (run by CI in the devinterp 1.3 venv)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from devinterp_losskernel import LossKernelCallback, SLTSummary, estimate_loss_kernel

from _models import MLP, ProbeRecorder, classification_data, loader_for
from conftest import require_devinterp


@pytest.fixture(autouse=True)
def _needs_devinterp1():
    require_devinterp(1)


def evaluate(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


SGLD = dict(lr=1e-3, nbeta=30.0, localization=100.0)


def setup():
    torch.manual_seed(0)
    x, y = classification_data(96)
    model = MLP(dropout=0.2, batchnorm=True)
    probe = (x[:30], y[:30])
    return model, loader_for(x, y), probe


def test_estimate_learning_coeff_with_summary():
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary

    model, loader, probe = setup()
    cb, witness = LossKernelCallback(probe, block_size=8), ProbeRecorder(probe)
    results = estimate_learning_coeff_with_summary(
        model, loader, callbacks=[cb, SLTSummary(cb), witness], evaluate=evaluate, optimizer_kwargs=dict(SGLD),
        num_chains=2, num_draws=12, num_burnin_steps=3, seed=1, verbose=False,
    )
    assert "llc/mean" in results
    for key in ("covariance", "correlation", "mean", "variance", "num_draws", "probe_llc",
                "singular_fluctuation"):
        assert f"loss_kernel/{key}" in results
    # ν = β V / 2 with β = nβ/n (n = 96 from devinterp's loader) and V = n · mean probe variance
    nu = 30.0 / 96 * (96 * results["loss_kernel/variance"].mean()) / 2
    assert results["loss_kernel/singular_fluctuation"] == pytest.approx(nu, rel=1e-9)
    traces = witness.traces()
    assert results["loss_kernel/num_draws"] == 24 == len(traces)
    np.testing.assert_allclose(results["loss_kernel/covariance"], np.cov(traces, rowvar=False),
                               rtol=1e-9, atol=1e-15)
    k = cb.kernel
    assert k.draws_per_chain == {0: 12, 1: 12}
    assert k.metadata["sampler"]["nbeta"] == 30.0 and k.metadata["sampler"]["localization"] == 100.0
    assert k.metadata["devinterp_version"].startswith("1.")
    # init_loss comes from devinterp's ref_model local: the probe losses at w*
    witness_at_w_star = ProbeRecorder(probe)
    witness_at_w_star(model=model, chain=0)
    np.testing.assert_allclose(k.init_loss.numpy(), witness_at_w_star.traces()[0], rtol=1e-6)
    assert k.covariance.abs().max() > 0


def test_sample_directly_without_finalize():
    from devinterp.slt.sampler import sample

    model, loader, probe = setup()
    cb, witness = LossKernelCallback(probe, block_size=64), ProbeRecorder(probe)
    sample(model, loader, callbacks=[cb, witness], evaluate=evaluate, optimizer_kwargs=dict(SGLD),
           num_chains=2, num_draws=5, num_burnin_steps=0, init_loss=1.0, verbose=False)
    # block_size 64 > 10 draws: the kernel must still see the buffered draws
    np.testing.assert_allclose(cb.kernel.covariance.numpy(), np.cov(witness.traces(), rowvar=False), rtol=1e-9)


def test_cores_greater_than_one_is_refused():
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary

    model, loader, probe = setup()
    with pytest.raises(Exception, match="cores > 1"):
        estimate_learning_coeff_with_summary(
            model, loader, callbacks=[LossKernelCallback(probe)], evaluate=evaluate,
            optimizer_kwargs=dict(SGLD), num_chains=2, num_draws=3, cores=2, verbose=False,
        )


def test_estimate_loss_kernel_one_call():
    model, loader, probe = setup()
    k = estimate_loss_kernel(model, loader, probe, num_chains=2, num_draws=10, num_burnin_steps=2,
                             seed=3, verbose=False, labels=probe[1], **SGLD)
    assert k.num_draws == 20 and k.covariance.shape == (30, 30)
    assert np.isfinite(k.metadata["llc/mean"]) and len(k.metadata["llc/per_chain"]) == 2
    assert k.metadata["settings"]["num_chains"] == 2
    assert np.isfinite(k.metadata["probe_llc"]) and k.metadata["singular_fluctuation"] > 0
    assert k.init_loss is not None and torch.equal(k.labels, probe[1])
    again = estimate_loss_kernel(model, loader, probe, num_chains=2, num_draws=10, num_burnin_steps=2,
                                 seed=3, verbose=False, **SGLD)
    torch.testing.assert_close(again.covariance, k.covariance), "seeded runs must repeat"


# -- devinterp's own flow: a cell run twice, a callback passed twice, a late failure --------
def test_the_same_cell_run_twice_gives_the_second_runs_kernel_not_both():
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary

    model, loader, probe = setup()
    cb = LossKernelCallback(probe, block_size=8)
    call = lambda seed, witness: estimate_learning_coeff_with_summary(  # noqa: E731
        model, loader, callbacks=[cb, witness], evaluate=evaluate, optimizer_kwargs=dict(SGLD),
        num_chains=2, num_draws=6, num_burnin_steps=2, seed=seed, verbose=False)
    call(1, ProbeRecorder(probe))
    witness = ProbeRecorder(probe)
    with pytest.warns(RuntimeWarning, match="a new run started"):
        results = call(2, witness)
    assert results["loss_kernel/num_draws"] == 12, "run B must not be folded into run A"
    np.testing.assert_allclose(results["loss_kernel/covariance"], np.cov(witness.traces(), rowvar=False),
                               rtol=1e-9, atol=1e-15)


def test_the_same_callback_passed_twice_is_refused():
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary

    model, loader, probe = setup()
    cb = LossKernelCallback(probe)
    with pytest.raises(ValueError, match="registered twice"):
        estimate_learning_coeff_with_summary(
            model, loader, callbacks=[cb, cb], evaluate=evaluate, optimizer_kwargs=dict(SGLD),
            num_chains=1, num_draws=4, num_burnin_steps=0, verbose=False)


def test_a_late_kernel_failure_keeps_devinterps_llc():
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary

    model, loader, probe = setup()
    cb = LossKernelCallback(probe)
    with pytest.warns(RuntimeWarning, match="no loss kernel for this run"):
        results = estimate_learning_coeff_with_summary(
            model, loader, callbacks=[cb], evaluate=evaluate, optimizer_kwargs=dict(SGLD),
            num_chains=1, num_draws=1, num_burnin_steps=0, verbose=False)  # one draw: no covariance
    assert np.isfinite(results["llc/mean"]) and "at least 2 draws" in results["loss_kernel/error"]
