"""The callback driven by a hand-written SGLD-like loop (no devinterp needed)."""

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch

from devinterp_losskernel import LossKernelCallback, SLTSummary
from devinterp_losskernel.summary import snapshot_convergence

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


@pytest.mark.parametrize("mode", ["full", "diagonal"])
def test_every_per_sample_output_permutes_with_the_probe(mode):
    """The same draws on a permuted probe: K, R, mean, variance, ℓ(x; w*), labels and ids are
    the permuted ones (no result depends on where a sample sits in the probe)."""
    torch.manual_seed(0)
    model = MLP()
    x, y = classification_data(30)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    ids = [f"s{i}" for i in range(30)]
    kernels = []
    for order in (torch.arange(30), perm):
        cb = LossKernelCallback((x[order], y[order]), batch_size=7, block_size=5, mode=mode, reference_model=model,
                                labels=y[order], sample_ids=[ids[i] for i in order])
        for chain, draw, m in perturbed_draws(model, 2, 9):
            cb(model=m, chain=chain, draw=draw)
        kernels.append(cb.kernel)
    base, permuted = kernels
    # float32 forwards of a sample in another batch may round differently (1 ulp): float32 tolerances
    for field in ("mean", "init_loss"):
        np.testing.assert_allclose(getattr(permuted, field).numpy(), getattr(base, field).numpy()[perm], rtol=1e-6,
                                   err_msg=field)
    np.testing.assert_allclose(permuted.variance.numpy(), base.variance.numpy()[perm], rtol=1e-4, atol=1e-9)
    assert torch.equal(permuted.labels, base.labels[perm])
    assert list(permuted.sample_ids) == [ids[i] for i in perm]
    if mode == "full":
        for field in ("covariance", "correlation"):
            expected = getattr(base, field).numpy()[np.ix_(perm, perm)]
            np.testing.assert_allclose(getattr(permuted, field).numpy(), expected, rtol=1e-4,
                                       atol=1e-6 * np.abs(expected).max())


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
    curve = snapshot_convergence(cb)
    assert [t for t, _ in curve] == [6, 12, 18]
    from devinterp_losskernel.analysis import cka
    full = np.cov(traces[:, idx], rowvar=False)
    for (t, value), (_, block) in zip(curve, cb.snapshots):
        assert value == pytest.approx(cka(block.numpy(), full), rel=1e-12)
    assert 0 < curve[0][1] < 1
    assert SLTSummary(cb).get_results()["loss_kernel/cka_convergence"] == curve
    # the same seed picks the same subset; explicit counts work too
    cb2 = LossKernelCallback(probe, snapshot_every=[3, 20], snapshot_rows=12, snapshot_seed=3)
    for chain, draw, m in perturbed_draws(model, 2, 10):
        cb2(model=m, chain=chain, draw=draw)
    cb2.finalize()
    assert torch.equal(cb2.snapshot_indices, cb.snapshot_indices)
    assert [t for t, _ in cb2.snapshots] == [3, 20]
    assert snapshot_convergence(cb2)[-1][1] == pytest.approx(1.0, abs=1e-12)


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
        snapshot_convergence(cb)


# -- nothing silently wrong: runs never mix, bad input fails before sampling -----------------
from torch.utils.data import (  # noqa: E402
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from devinterp_losskernel import DivergenceGuard, KernelStorage, ProbeOptions  # noqa: E402


def run_chains(cb, model, num_chains=2, num_draws=5, seed=0, witness=None, **call_kwargs):
    for chain, draw, m in perturbed_draws(model, num_chains, num_draws, seed=seed):
        cb(model=m, chain=chain, draw=draw, **call_kwargs)
        if witness is not None:
            witness(model=m, chain=chain)


def test_a_second_run_starts_a_fresh_kernel_not_a_mixed_one():
    # a notebook cell run twice: the same callback receives a second run (chain 0 from draw 0)
    model, probe = MLP(), classification_data(10)
    cb = LossKernelCallback(probe)
    run_chains(cb, model, seed=0)
    first = cb.kernel
    # chain 0 at draw 0 again, without finalize(): ambiguous, so refused before it counts
    with pytest.raises(ValueError, match=r"chain 0 started again at draw 0.*chain=i.*finalize\(\).*reset\(\)"):
        run_chains(cb, model, seed=1)
    assert cb.kernel.num_draws == first.num_draws
    cb.finalize()  # the end of run A (devinterp 1.x calls this itself)
    witness = ProbeRecorder(probe)
    with pytest.warns(RuntimeWarning, match=r"a new run started \(draws arrived after finalize"):
        run_chains(cb, model, seed=1, witness=witness)
    second = cb.kernel
    assert second.num_draws == 10 == first.num_draws
    np.testing.assert_allclose(second.covariance.numpy(), np.cov(witness.traces(), rowvar=False), rtol=1e-10)


@pytest.mark.parametrize("change", ["finalize", "ref_model", "sampler"])
def test_other_signs_of_a_new_run(change):
    model, probe = MLP(), classification_data(10)
    cb = LossKernelCallback(probe)
    opt_a = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(model.parameters(), lr=0.2)
    ref_a, ref_b = copy.deepcopy(model), copy.deepcopy(model)
    run_chains(cb, model, num_chains=1, optimizer=opt_a, ref_model=ref_a)
    if change == "finalize":
        cb.finalize()
    kwargs = dict(optimizer=opt_b if change == "sampler" else opt_a,
                  ref_model=ref_b if change == "ref_model" else ref_a)
    with pytest.warns(RuntimeWarning, match="a new run started"):
        cb(model=model, chain=1, draw=0, **kwargs)  # a new chain number: only the sign tells
    # the fresh kernel holds only the new run's draw (still held back by the divergence window)
    assert cb.accumulator.count == 0 and cb.draws_per_chain == {} and sum(map(len, cb.chains.held.values())) == 1


def test_registered_twice_is_refused_at_the_first_draw():
    model = MLP()
    cb = LossKernelCallback(classification_data(10))
    cb(model=model, chain=0, draw=0)
    with pytest.raises(ValueError, match=r"registered twice in callbacks"):
        cb(model=model, chain=0, draw=0)


class RandomTransform(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.01 * torch.randn(self.x.shape[1]), self.y[i]


@pytest.mark.parametrize("make", [
    lambda ds: DataLoader(ds, batch_size=4, shuffle=True),
    lambda ds: DataLoader(ds, batch_size=4, sampler=SubsetRandomSampler(range(len(ds)))),
    lambda ds: DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), 4, False)),
    lambda ds: DataLoader(ds, batch_size=4, sampler=WeightedRandomSampler(torch.ones(len(ds)), len(ds))),
    lambda ds: DataLoader(ds, batch_size=4, sampler=_Shuffled(len(ds))),
    lambda ds: DataLoader(RandomTransform(*ds.tensors), batch_size=4),
])
def test_probes_that_do_not_repeat_themselves_are_refused_in_the_constructor(make):
    loader = make(TensorDataset(*classification_data(12)))
    with pytest.raises(ValueError, match="same samples in the same order"):
        LossKernelCallback(loader)


class _Shuffled(torch.utils.data.Sampler):
    """A custom sampler with no `shuffle` flag: only the two-pass check can catch it."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(torch.randperm(self.n).tolist())

    def __len__(self):
        return self.n


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=[0, 1, 2]), "labels must have one entry per probe sample: length 10, got 3"),
    (dict(labels=[0.5] * 10), "labels must be whole numbers"),
    (dict(labels=["cat"] * 10), "labels must be"),
    (dict(sample_ids=list(range(9))), "sample_ids must have one entry per probe sample"),
    (dict(rows=[0, 10]), r"rows must be indices in \[0, 10\)"),
    (dict(rows=[0.5]), "rows must be integer sample indices"),
    (dict(probe_train_mask=torch.ones(9, dtype=torch.bool)),
     r"probe_train_mask must be a bool tensor of shape \(10,\)"),
    (dict(snapshot_every=2, snapshot_rows=[0, 12]), "snapshot_rows must be sample indices"),
    (dict(num_draws=0), "num_draws must be a positive int"),
    (dict(device="cuda:3" if not torch.cuda.is_available() else "nope"), "device must be"),
    (dict(dtype=torch.float16), "dtype must be torch.float32 or torch.float64"),
    (dict(storage=KernelStorage(), block_size=3), "not both"),
    (dict(colour="red"), "unexpected keyword arguments"),
])
def test_bad_arguments_fail_in_the_constructor(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LossKernelCallback(classification_data(10), **kwargs)


@pytest.mark.parametrize("loss_fn, match", [
    (lambda model, batch: (model(batch[0]).argmax(1) != batch[1]).long(), "floating-point losses"),
    (lambda model, batch: torch.nn.functional.cross_entropy(model(batch[0]), batch[1]), r"shape \[batch_size\]"),
])
def test_a_bad_loss_fn_fails_before_any_sampling(loss_fn, match):
    with pytest.raises(ValueError, match=match):  # with the model at w*: in the constructor
        LossKernelCallback(classification_data(10), loss_fn, reference_model=MLP())
    cb = LossKernelCallback(classification_data(10), loss_fn)
    with pytest.raises(ValueError, match=match):  # without: at the first draw, before it counts
        cb(model=MLP(), chain=0, draw=0)


def test_inputs_users_pass_are_converted_safely():
    x, y = classification_data(12)
    model = MLP()
    reference = LossKernelCallback((x, y), reference_model=model).init_loss
    for probe in [(x.numpy(), y.numpy()), (x, y.tolist()), (x, y.int()), (x, y.double()), (x.double(), y)]:
        cb = LossKernelCallback(probe, reference_model=model, labels=y.numpy().astype(np.int32))
        torch.testing.assert_close(cb.init_loss, reference, rtol=1e-6, atol=1e-7)
        assert cb.labels.dtype == torch.long
    cb = LossKernelCallback((x, y), reference_model=copy.deepcopy(model).double(), labels=y.double().tolist())
    torch.testing.assert_close(cb.init_loss, reference, rtol=1e-5, atol=1e-6)  # float64 model, float32 probe
    with pytest.raises(ValueError, match="targets must be class indices"):
        LossKernelCallback((x, y.double() + 0.5), reference_model=model)
    with pytest.raises(ValueError, match="probe's tensors must share their first dimension"):
        LossKernelCallback((x, y[:5]))


def test_an_aborted_chain_is_recorded_and_its_held_draws_left_out():
    # devinterp 2.x turns a NaN into a warning and returns: the chain simply stops early
    model, probe = MLP(), classification_data(10)
    cb = LossKernelCallback(probe, num_draws=5, divergence_window=2)
    witness = ProbeRecorder(probe)
    for chain, draw, m in perturbed_draws(model, 3, 5):
        if chain == 1 and draw >= 3:
            continue  # aborted after 3 draws
        cb(model=m, chain=chain, draw=draw)
        if chain != 1 or draw < 1:  # chain 1's last 2 draws were held back
            witness(model=m, chain=chain)
    assert "incomplete_chains" in cb.kernel.metadata  # read mid-run: its held draws stay out
    with pytest.warns(RuntimeWarning, match=r"chain 1: the sampler stopped it after 3 of num_draws=5"):
        cb.finalize()  # the run is over: chain 1 was aborted
    k = cb.kernel
    assert cb.diverged_chains == [1] and "stopped it after 3" in k.metadata["chain_failures"][1]
    assert k.draws_per_chain == {0: 5, 1: 1, 2: 5} and k.rejected_per_chain == {1: 2}
    np.testing.assert_allclose(k.covariance.numpy(), np.cov(witness.traces(), rowvar=False), rtol=1e-10)


def test_chains_interleaved_in_lock_step_are_not_taken_for_aborted_ones():
    model, probe = MLP(), classification_data(10)
    cb, witness = LossKernelCallback(probe, num_draws=4, divergence_window=2), ProbeRecorder(probe)
    draws = list(perturbed_draws(model, 1, 8))
    for step, (_, draw, m) in enumerate(draws):  # chain 0, chain 1, chain 0, … each 4 draws
        cb(model=m, chain=step % 2, draw=step // 2)
        witness(model=m, chain=step % 2)
    cb.finalize()
    k = cb.kernel
    assert cb.diverged_chains == [] and k.draws_per_chain == {0: 4, 1: 4}
    np.testing.assert_allclose(k.covariance.numpy(), np.cov(witness.traces(), rowvar=False), rtol=1e-10)


def test_num_draws_that_disagree_with_the_sampler_are_refused():
    cb = LossKernelCallback(classification_data(10), num_draws=10)
    with pytest.raises(ValueError, match="num_draws must match the sampler's"):
        cb(model=MLP(), chain=0, draw=0, num_draws=4)


def test_a_probe_that_changes_order_after_the_checks_is_caught_at_the_draw():
    class Flipping(torch.utils.data.Sampler):
        def __init__(self, n):
            self.n, self.passes = n, 0

        def __iter__(self):
            self.passes += 1
            order = list(range(self.n))
            return iter(order if self.passes <= 2 else order[::-1])  # set_epoch-like change

        def __len__(self):
            return self.n

    loader = DataLoader(TensorDataset(*classification_data(10)), batch_size=4, sampler=Flipping(10))
    cb = LossKernelCallback(loader, cache_probe_on_device=False)
    with pytest.raises(ValueError, match="same samples in the same order every draw"):
        cb(model=MLP(), chain=0, draw=0)


def test_drop_last_and_non_finite_probes_are_refused_before_sampling():
    x, y = classification_data(10)
    with pytest.raises(ValueError, match="drop_last=True"):
        LossKernelCallback(DataLoader(TensorDataset(x, y), batch_size=4, drop_last=True))
    x[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or Inf in the inputs of 1 samples .*indices \[3\]"):
        LossKernelCallback((x, y))  # found from the probe itself: no reference_model needed

    class NonFiniteAtWStar(torch.nn.Module):  # finite inputs, non-finite losses: caught at w*
        def forward(self, inputs):
            out = MLP()(inputs)
            return out.masked_fill(torch.arange(len(inputs))[:, None] == 3, float("nan"))

    x[3, 0] = 0.0
    with pytest.raises(ValueError, match=r"probe losses at w\* .* not finite .*indices \[3\]"):
        LossKernelCallback((x, y), reference_model=NonFiniteAtWStar())


@pytest.mark.parametrize("loss_fn", [torch.nn.functional.cross_entropy, torch.nn.CrossEntropyLoss(reduction="none")])
def test_torch_losses_passed_as_loss_fn_are_explained(loss_fn):
    with pytest.raises(TypeError, match=r"takes \(logits, targets\).*lambda model, batch"):
        LossKernelCallback(classification_data(10), loss_fn)


def test_a_probe_that_does_not_fit_the_model_names_the_probe():
    with pytest.raises(ValueError, match=r"probe could not be evaluated.*mat1 and mat2"):
        LossKernelCallback((torch.randn(10, 5), torch.zeros(10, dtype=torch.long)), reference_model=MLP())
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        LossKernelCallback((torch.randn(10, 6), torch.full((10,), 3)), reference_model=MLP())


def test_the_last_chain_aborted_is_caught_at_finalize():
    model, probe = MLP(), classification_data(10)
    cb = LossKernelCallback(probe, divergence_window=2)
    with pytest.warns(RuntimeWarning, match=r"chain 1: the sampler stopped it after 2 of num_draws=4"):
        for chain, draw, m in perturbed_draws(model, 2, 4):
            if chain == 1 and draw >= 2:
                break
            cb(model=m, chain=chain, draw=draw, num_draws=4)  # devinterp 1.x passes num_draws
        cb.finalize()
    assert cb.kernel.draws_per_chain == {0: 4} and cb.kernel.rejected_per_chain == {1: 2}


def test_get_results_reports_a_kernel_error_instead_of_raising():
    model = MLP()
    cb = LossKernelCallback(classification_data(8))
    cb(model=model, chain=0, draw=0)  # one draw: no covariance
    with pytest.warns(RuntimeWarning, match="no loss kernel for this run"):
        results = cb.get_results()
    assert "at least 2 draws" in results["loss_kernel/error"]


def test_callback_state_round_trip_and_mismatch():
    model, probe = MLP(), classification_data(10)
    cb = LossKernelCallback(probe, reference_model=model, divergence=DivergenceGuard(window=3),
                            probe_options=ProbeOptions(batch_size=4))
    run_chains(cb, model, num_chains=2, num_draws=4)
    state = cb.state_dict()
    twin = LossKernelCallback(probe, reference_model=model, divergence_window=3, batch_size=4)
    twin.load_state_dict(state, model)
    torch.testing.assert_close(twin.kernel.covariance, cb.kernel.covariance)
    assert twin.kernel.draws_per_chain == cb.kernel.draws_per_chain
    x, y = probe
    other = LossKernelCallback((x, (y + 1) % 3), divergence_window=3, batch_size=4)  # same size, other labels
    with pytest.raises(ValueError, match=r"probe: saved = '[0-9a-f]+'\s+now = '[0-9a-f]+'"):
        other.load_state_dict(state, model)
