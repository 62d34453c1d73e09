"""loss_kernel() for any trace, and LossKernel.from_samples() for devinterp 2's stored runs.

The synthetic-store tests need only xarray (a Dataset in the layout of devinterp 2's sample());
the parity tests against compute_bif run devinterp 2 (CI: the devinterp 2.0 venv)."""

import numpy as np
import pytest
import torch

from conftest import require_devinterp
from devinterp_losskernel import LossKernel, kernel_from_samples, loss_kernel


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
    from _models import LMDataset, TinyLM
    from devinterp.slt.sampling import sample

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
