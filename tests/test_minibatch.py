"""Minibatch mode under devinterp 1.3: the per-sample variances are exactly those of every
post-burn-in step's minibatch losses, and devinterp's LLC is the one of the same evaluate."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from devinterp_losskernel.estimate import devinterp_major
from devinterp_losskernel.minibatch import MinibatchVariance, WithIndices

pytest.importorskip("devinterp")
pytestmark = pytest.mark.skipif(devinterp_major() != 1, reason="devinterp 1.x's estimate_learning_coeff_with_summary")

N, CHAINS, DRAWS, BURNIN, EVERY = 40, 2, 15, 4, 3


def _problem():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 6, generator=gen), torch.randint(0, 3, (N,), generator=gen)
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), TensorDataset(x, y)


def _run(model, loader, evaluate, callbacks):
    from devinterp.optim.sgld import SGLD
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary

    return estimate_learning_coeff_with_summary(
        model, loader=loader, evaluate=evaluate, sampling_method=SGLD,
        optimizer_kwargs=dict(lr=1e-3, nbeta=10.0, localization=100.0), num_chains=CHAINS, num_draws=DRAWS,
        num_burnin_steps=BURNIN, num_steps_bw_draws=EVERY, cores=1, seed=0, device="cpu",
        callbacks=callbacks, verbose=False)


LOG = {}


def logged_evaluate(model, batch):
    loss, extras = LOG["recorder"].evaluate(model, batch)
    LOG["calls"].append(LOG["recorder"]._pending[-1])
    return loss, extras


def test_variances_are_those_of_every_post_burn_in_minibatch_and_the_llc_is_unchanged():
    model, data = _problem()
    recorder = MinibatchVariance(num_train=N)
    LOG["recorder"], LOG["calls"] = recorder, []  # devinterp pickles evaluate: log through a module global
    calls, draw_marks = LOG["calls"], []  # every evaluate call; the call count at each draw, per chain

    def mark(chain, draw, **_):
        draw_marks.append((chain, len(calls)))

    loader = DataLoader(WithIndices(data), batch_size=8, shuffle=True)
    results = _run(model, loader, logged_evaluate, [recorder, mark])

    # the reference: per chain, the DRAWS·EVERY evaluate calls up to its last draw (devinterp's schedule)
    values = [[] for _ in range(N)]
    for chain in range(CHAINS):
        last = max(count for c, count in draw_marks if c == chain)
        for indices, losses in calls[last - DRAWS * EVERY:last]:
            for i, v in zip(indices.tolist(), losses.double().tolist()):
                values[i].append(v)
    reference = np.array([np.var(v, ddof=1) if len(v) > 1 else np.nan for v in values])
    np.testing.assert_allclose(results["minibatch/variance"], reference, rtol=1e-10, equal_nan=True)
    assert results["minibatch/visits"].tolist() == [len(v) for v in values]
    assert results["minibatch/visits"].sum() == CHAINS * DRAWS * EVERY * 8
    nu = 10.0 / N / 2 * N * np.nanmean(reference)
    assert results["minibatch/singular_fluctuation"] == pytest.approx(nu, rel=1e-10)
    assert np.isfinite(results["minibatch/singular_fluctuation_se"])

    # devinterp's LLC is the one of the plain evaluate (the mean of the same per-sample losses)
    model2, _ = _problem()

    def plain(model, batch):
        _, (x, y) = batch
        return F.cross_entropy(model(x), y, reduction="none").mean(), {}

    plain_results = _run(model2, DataLoader(WithIndices(data), batch_size=8, shuffle=True), plain, [])
    assert "llc/mean" in plain_results
    for key, value in plain_results.items():  # llc/mean, llc/std, per-chain LLCs, loss trace …
        assert np.array_equal(np.asarray(results[key]), np.asarray(value), equal_nan=True), key


def test_models_with_train_mode_noise_are_refused_and_a_plain_loader_is_named():
    recorder = MinibatchVariance(num_train=N)
    noisy = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.2), nn.Linear(16, 3))
    batch = (torch.arange(4), (torch.randn(4, 6), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match="Dropout"):
        recorder.evaluate(noisy, batch)
    with pytest.raises(ValueError, match="WithIndices"):
        recorder.evaluate(nn.Linear(6, 3), (torch.randn(4, 6), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match="num_train"):
        MinibatchVariance(num_train=0)


def test_the_kernel_of_mode_minibatch_carries_visits_and_survives_a_save(tmp_path):
    from devinterp_losskernel import LossKernel
    from devinterp_losskernel.analysis import memorization_scores

    model, data = _problem()
    recorder = MinibatchVariance(num_train=N)
    results = _run(model, DataLoader(WithIndices(data), batch_size=8, shuffle=True), recorder.evaluate, [recorder])
    kernel = recorder.kernel
    assert kernel.metadata["mode"] == "minibatch" and kernel.is_diagonal
    assert torch.equal(kernel.visits, torch.as_tensor(results["minibatch/visits"]))
    assert kernel.num_draws == CHAINS * DRAWS * EVERY == sum(kernel.draws_per_chain.values())
    assert kernel.metadata["singular_fluctuation"] == results["minibatch/singular_fluctuation"]
    again = LossKernel.load(kernel.save(tmp_path / "mb.pt"))
    assert torch.equal(again.visits, kernel.visits) and again.metadata["mode"] == "minibatch"
    if kernel.metadata["unseen"] == 0:
        np.testing.assert_array_equal(memorization_scores(kernel), kernel.variance.numpy())


def test_the_opt_in_records_a_noisy_model_and_loss_scale_divides_nu():
    from devinterp_losskernel.analysis import singular_fluctuation

    _, data = _problem()
    torch.manual_seed(1)
    noisy = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
    recorder = MinibatchVariance(num_train=N, loss_scale=4.0, allow_train_mode_noise=True)
    loader = DataLoader(WithIndices(data), batch_size=8, sampler=torch.utils.data.RandomSampler(
        WithIndices(data), replacement=True, generator=torch.Generator().manual_seed(0)))
    results = _run(noisy, loader, recorder.evaluate, [recorder])
    nu = 10.0 / 2 * np.nanmean(results["minibatch/variance"]) / 4.0  # β/2 · N · mean / loss_scale, β = nβ/N
    assert results["minibatch/singular_fluctuation"] == pytest.approx(nu, rel=1e-10)
    assert results["minibatch/allow_train_mode_noise"] is True and "Dropout" in results["minibatch/train_mode_noise"]
    assert results["minibatch/loss_scale"] == 4.0 and "Watanabe" in results["minibatch/singular_fluctuation_meaning"]
    kernel = recorder.kernel
    assert kernel.metadata["allow_train_mode_noise"] is True and kernel.metadata["loss_scale"] == 4.0
    assert singular_fluctuation(kernel).nu == pytest.approx(nu, rel=1e-10)  # the analysis reads the same scale
    with pytest.raises(TypeError, match="allow_train_mode_noise"):
        MinibatchVariance(num_train=N, allow_train_mode_noise="yes")


class _IndicesPastTheEnd(torch.utils.data.Dataset):
    """Items (index, sample) whose indices run past num_train after the first batch: a loader
    over a bigger dataset than the recorder was told, caught only at a fold."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return (i if i < 8 else i + N), self.data[i]


def test_indices_outside_the_training_set_are_refused_at_the_fold_and_nothing_is_folded():
    model, data = _problem()
    recorder = MinibatchVariance(num_train=N)
    loader = DataLoader(_IndicesPastTheEnd(data), batch_size=8, shuffle=False)
    with pytest.raises(ValueError, match=r"must lie in \[0, num_train=40\)"):
        _run(model, loader, recorder.evaluate, [recorder])
        recorder.kernel  # noqa: B018  (the fold at the end, if no fold came during the run)
    with pytest.raises(ValueError, match="num_train"):  # the error recurs: nothing was dropped silently
        recorder.kernel  # noqa: B018
