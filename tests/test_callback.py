"""The callback driven by a hand-written SGLD-like loop (no devinterp needed)."""

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch

from devinterp_losskernel import LossKernelCallback

from _models import MLP, ProbeRecorder, classification_data


def perturbed_draws(model, num_chains, num_draws, scale=0.05, seed=0):
    """Yield (chain, draw, model) with the weights jittered around w*: a stand-in sampler."""
    g = torch.Generator().manual_seed(seed)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    for chain in range(num_chains):
        for draw in range(num_draws):
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(ref[name] + scale * torch.randn(p.shape, generator=g))
            model.train()  # devinterp hands over the model in train mode
            yield chain, draw, model
    model.load_state_dict(ref)


def test_kernel_equals_recomputed_from_traces():
    torch.manual_seed(0)
    model = MLP(dropout=0.3, batchnorm=True)
    probe = classification_data(40)
    cb = LossKernelCallback(probe, block_size=7, batch_size=9, reference_model=model)
    witness = ProbeRecorder(probe)
    for chain, draw, m in perturbed_draws(model, 3, 11):
        cb(model=m, chain=chain, draw=draw)
        witness(model=m, chain=chain)
    k = cb.kernel
    traces = witness.traces()
    np.testing.assert_allclose(k.covariance.numpy(), np.cov(traces, rowvar=False), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(k.mean.numpy(), traces.mean(0), rtol=1e-12)
    assert k.num_draws == 33 and k.draws_per_chain == {0: 11, 1: 11, 2: 11}
    assert k.init_loss is not None and k.init_loss.shape == (40,)


def test_results_dict_keys():
    model = MLP()
    cb = LossKernelCallback(classification_data(10))
    for chain, draw, m in perturbed_draws(model, 1, 4):
        cb(model=m, chain=chain, draw=draw)
    results = cb.get_results()
    for key in ("covariance", "correlation", "mean", "variance", "num_draws", "trace"):
        assert f"loss_kernel/{key}" in results
    assert results["loss_kernel/covariance"].shape == (10, 10)
    assert results["loss_kernel/num_draws"] == 4


def _blow_up(m, factor):
    """What a diverging SGLD chain does to the weights: scale the last layer by ``factor``."""
    with torch.no_grad():
        m.net[-1].weight.mul_(factor)


@pytest.mark.parametrize("window, kept_of_chain_1", [(16, 0), (1, 1), (0, 2)])
def test_non_finite_draw_cuts_the_chain_off(window, kept_of_chain_1):
    model = MLP()
    probe = classification_data(12)
    cb = LossKernelCallback(probe, divergence_window=window)
    witness = ProbeRecorder(probe)
    with pytest.warns(RuntimeWarning, match="chain 1: draw 2 has .* non-finite.*the chain has diverged"):
        for chain, draw, m in perturbed_draws(model, 3, 5):
            if chain == 1 and draw == 2:
                with torch.no_grad():
                    m.net[0].weight[0, 0] = float("nan")
            cb(model=m, chain=chain, draw=draw)
            # kept: chains 0 and 2, and chain 1's draws older than the window when it diverged
            if chain != 1 or draw < 2 - window:
                witness(model=m, chain=chain)
    k = cb.kernel
    expected_kept = {0: 5, 2: 5, **({1: kept_of_chain_1} if kept_of_chain_1 else {})}
    assert k.draws_per_chain == expected_kept and k.rejected_per_chain == {1: 5 - kept_of_chain_1}
    assert cb.diverged_chains == [1]
    # the later draws of chain 1 (3, 4: finite again) stay out too: the chain has left w*
    np.testing.assert_allclose(k.covariance.numpy(), np.cov(witness.traces(), rowvar=False), rtol=1e-10)


def test_the_blow_up_before_a_nan_is_left_out_of_the_kernel():
    """Losses grow by orders of magnitude for a few draws before they turn NaN: those finite
    draws would swamp K̂. Held back by the window, they are dropped with the NaN draw."""
    probe = classification_data(12)

    def run(window):
        model = MLP()
        cb = LossKernelCallback(probe, divergence_window=window, divergence_tolerance=None)
        witness = ProbeRecorder(probe)
        with pytest.warns(RuntimeWarning, match="chain 1: draw 7 has .* non-finite"):
            for chain, draw, m in perturbed_draws(model, 2, 8):
                if chain == 1 and draw >= 4:
                    _blow_up(m, 1e3 ** (draw - 3) if draw < 7 else float("inf"))
                cb(model=m, chain=chain, draw=draw)
                witness(model=m, chain=chain)
        return cb.kernel, witness.traces()

    held, traces = run(window=4)  # chain 1's draws 3-6 were held when draw 7 turned NaN
    assert held.draws_per_chain == {0: 8, 1: 3} and held.rejected_per_chain == {1: 5}
    np.testing.assert_allclose(held.covariance.numpy(), np.cov(traces[:11], rowvar=False), rtol=1e-10)
    # without the window the finite blow-up (losses up to ~1e9) is folded in and dominates K̂
    folded, _ = run(window=0)
    assert folded.draws_per_chain == {0: 8, 1: 7}
    assert float(folded.variance.max()) > 1e6 * float(held.variance.max())


@pytest.mark.parametrize("with_reference", [True, False])
def test_a_finite_blow_up_past_divergence_tolerance_cuts_the_chain(with_reference):
    model = MLP()
    probe = classification_data(12)
    cb = LossKernelCallback(probe, reference_model=model if with_reference else None, divergence_window=2)
    witness = ProbeRecorder(probe)
    source = "the probe loss at w" if with_reference else "the chain's first draw"
    with pytest.warns(RuntimeWarning, match=rf"chain 0: draw 5 has mean probe loss .* above {source}"):
        for chain, draw, m in perturbed_draws(model, 2, 8):
            if chain == 0 and draw >= 5:
                _blow_up(m, 1e4)  # finite, ~1e3-1e4 × the loss: no NaN ever
            cb(model=m, chain=chain, draw=draw)
            if chain == 1 or draw < 3:
                witness(model=m, chain=chain)
    k = cb.kernel
    assert k.draws_per_chain == {0: 3, 1: 8} and k.rejected_per_chain == {0: 5}
    np.testing.assert_allclose(k.covariance.numpy(), np.cov(witness.traces(), rowvar=False), rtol=1e-10)


def test_held_back_draws_are_all_folded_in_at_the_end():
    model = MLP()
    probe = classification_data(10)
    cb = LossKernelCallback(probe, divergence_window=16)
    witness = ProbeRecorder(probe)
    for chain, draw, m in perturbed_draws(model, 3, 6):  # fewer draws per chain than the window
        cb(model=m, chain=chain, draw=draw)
        witness(model=m, chain=chain)
    # chains 0 and 1 were folded when the next chain began; chain 2 is still held
    assert cb.accumulator.count == 12 and cb.draws_per_chain == {0: 6, 1: 6}
    cb.finalize()
    assert cb.accumulator.count == 18 and cb.draws_per_chain == {0: 6, 1: 6, 2: 6}
    np.testing.assert_allclose(cb.kernel.covariance.numpy(), np.cov(witness.traces(), rowvar=False), rtol=1e-10)


def test_mark_diverged_by_hand_keeps_the_failed_chains_held_draws_out():
    """A user loop that catches the sampler's NaN error and goes on with the next chain."""
    model = MLP()
    probe = classification_data(10)
    cb = LossKernelCallback(probe, divergence_window=4)
    witness = ProbeRecorder(probe)
    for chain, draw, m in perturbed_draws(model, 3, 6):
        if chain == 1 and draw == 5:
            with pytest.warns(RuntimeWarning, match="chain 1: sampler raised NaN; the chain has diverged. The 4 draws"):
                cb.mark_diverged(1, "sampler raised NaN")  # instead of draw 5
            continue
        cb(model=m, chain=chain, draw=draw)
        if chain != 1 or draw < 1:  # chain 1's draws 1-4 were still held back
            witness(model=m, chain=chain)
    k = cb.kernel
    assert k.draws_per_chain == {0: 6, 1: 1, 2: 6} and k.rejected_per_chain == {1: 4}
    np.testing.assert_allclose(k.covariance.numpy(), np.cov(witness.traces(), rowvar=False), rtol=1e-10)


def test_every_chain_diverged_says_so():
    model = MLP()
    cb = LossKernelCallback(classification_data(8))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        for chain, draw, m in perturbed_draws(model, 2, 3):
            _blow_up(m, float("nan"))
            cb(model=m, chain=chain, draw=draw)
    with pytest.raises(ValueError, match=r"only 0 draws were kept: chains \[0, 1\] diverged"):
        cb.kernel


@pytest.mark.parametrize("kwargs, match", [
    (dict(divergence_tolerance=0.0), "divergence_tolerance must be a positive number or None"),
    (dict(divergence_tolerance="big"), "divergence_tolerance must be a positive number or None"),
    (dict(divergence_window=-1), "divergence_window must be a non-negative int"),
    (dict(divergence_window=2.5), "divergence_window must be a non-negative int"),
])
def test_divergence_settings_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossKernelCallback(classification_data(4), **kwargs)


def test_drift_warning_once_per_chain():
    torch.manual_seed(0)
    model = MLP()
    cb = LossKernelCallback(classification_data(12), reference_model=copy.deepcopy(model), drift_tolerance=0.5,
                            divergence_tolerance=None)
    with pytest.warns(RuntimeWarning, match="drifted far above the probe loss at w") as caught:
        for chain, draw, m in perturbed_draws(model, 1, 3, scale=5.0):
            cb(model=m, chain=chain, draw=draw)
    assert len([w for w in caught if "drifted" in str(w.message)]) == 1
    assert cb.kernel.draws_per_chain == {0: 3}  # a drift is only reported; the draws stay in
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for chain, draw, m in perturbed_draws(model, 1, 3, scale=1e-4):
            LossKernelCallback(classification_data(12), reference_model=model)(model=m, chain=0, draw=draw)


def test_probe_size_change_between_draws():
    model = MLP()
    cb = LossKernelCallback(classification_data(12))
    cb(model=model, chain=0, draw=0)
    cb.probe = type(cb.probe)(classification_data(13))
    with pytest.raises(ValueError, match="same 12 samples every draw"):
        cb(model=model, chain=0, draw=1)


def test_kernel_before_any_draw():
    with pytest.raises(ValueError, match="no draws yet"):
        LossKernelCallback(classification_data(5)).kernel


def test_bad_loss_fn_type():
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        LossKernelCallback(classification_data(5), loss_fn="cross_entropy")


def test_refuses_to_be_pickled():
    with pytest.raises(TypeError, match="cores > 1"):
        pickle.dumps(LossKernelCallback(classification_data(5)))


def test_accumulator_lives_on_model_device_and_dtype():
    model = MLP()
    cb = LossKernelCallback(classification_data(8), dtype=torch.float32)
    cb(model=model, chain=0, draw=0)
    assert cb.accumulator.device == next(model.parameters()).device
    assert cb.accumulator.dtype == torch.float32


# -- kernel snapshots during a run (CKA convergence, paper Fig. 6A) ---------------------------
def test_snapshots_equal_covariance_of_trace_prefixes():
    torch.manual_seed(0)
    model = MLP()
    probe = classification_data(30)
    cb = LossKernelCallback(probe, block_size=5, snapshot_every=6, snapshot_rows=12, snapshot_seed=3)
    witness = ProbeRecorder(probe)
    for chain, draw, m in perturbed_draws(model, 2, 10):
        cb(model=m, chain=chain, draw=draw)
        witness(model=m, chain=chain)
    cb.finalize()  # as devinterp does after the last chain: folds the draws held back
    traces = witness.traces()
    idx = cb.snapshot_indices.numpy()
    assert len(idx) == 12 and len(set(idx)) == 12 and np.all(np.diff(idx) > 0)
    assert [t for t, _ in cb.snapshots] == [6, 12, 18]
    for t, block in cb.snapshots:
        expected = np.cov(traces[:t][:, idx], rowvar=False)
        np.testing.assert_allclose(block.numpy(), expected, rtol=1e-10, atol=1e-14)
    curve = cb.cka_convergence()
    assert [t for t, _ in curve] == [6, 12, 18]
    from devinterp_losskernel import cka
    full = np.cov(traces[:, idx], rowvar=False)
    for (t, value), (_, block) in zip(curve, cb.snapshots):
        assert value == pytest.approx(cka(block.numpy(), full), rel=1e-12)
    assert 0 < curve[0][1] < 1
    assert cb.get_results()["loss_kernel/cka_convergence"] == curve
    # the same seed picks the same subset; explicit counts work too
    cb2 = LossKernelCallback(probe, snapshot_every=[3, 20], snapshot_rows=12, snapshot_seed=3)
    for chain, draw, m in perturbed_draws(model, 2, 10):
        cb2(model=m, chain=chain, draw=draw)
    cb2.finalize()
    assert torch.equal(cb2.snapshot_indices, cb.snapshot_indices)
    assert [t for t, _ in cb2.snapshots] == [3, 20]
    assert cb2.cka_convergence()[-1][1] == pytest.approx(1.0, abs=1e-12)


def test_snapshots_in_rectangular_mode_come_from_rows():
    model = MLP()
    probe = classification_data(20)
    rows = [1, 4, 7, 9, 15]
    cb = LossKernelCallback(probe, rows=rows, snapshot_every=4, snapshot_rows=3)
    witness = ProbeRecorder(probe)
    for chain, draw, m in perturbed_draws(model, 1, 8):
        cb(model=m, chain=chain, draw=draw)
        witness(model=m, chain=chain)
    cb.finalize()
    idx = cb.snapshot_indices.numpy()
    assert set(idx) <= set(rows) and len(idx) == 3
    np.testing.assert_allclose(cb.snapshots[0][1].numpy(),
                               np.cov(witness.traces()[:4][:, idx], rowvar=False), rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="among rows"):  # in the constructor, before any draw
        LossKernelCallback(probe, rows=rows, snapshot_every=4, snapshot_rows=[0, 1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(snapshot_every=0), "snapshot_every"),
    (dict(snapshot_every=[1, 5]), "at least 2"),
    (dict(snapshot_every="often"), "snapshot_every"),
    (dict(snapshot_every=5, snapshot_rows=1), "snapshot_rows"),
])
def test_bad_snapshot_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossKernelCallback(classification_data(10), **kwargs)


def test_cka_convergence_without_snapshots_is_explained():
    cb = LossKernelCallback(classification_data(10))
    for chain, draw, m in perturbed_draws(MLP(), 1, 3):
        cb(model=m, chain=chain, draw=draw)
    with pytest.raises(ValueError, match="snapshot_every"):
        cb.cka_convergence()
