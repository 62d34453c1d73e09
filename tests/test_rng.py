"""A guest leaves no trace: devinterp's own numbers are bit-identical with and without the
callback at a fixed seed, and the global generators end where they would have ended.

Run on devinterp's own example models (``devinterp.test_utils.Polynomial``, the normal-crossing
model of its example notebook; ``ReducedRankRegressor``; the TMS toy model of its ``tms``
notebook) and on a classifier of ours, in both devinterp majors.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from devinterp_losskernel import LossKernelCallback
from devinterp_losskernel.estimate import devinterp_major
from devinterp_losskernel.rng import global_rng_untouched

devinterp = pytest.importorskip("devinterp")
MAJOR = devinterp_major()


def _global_states():
    return (torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate())


def _same_states(a, b) -> bool:
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_global_rng_untouched_restores_every_generator_even_on_error():
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    before = _global_states()
    with pytest.raises(RuntimeError):
        with global_rng_untouched():
            torch.rand(5), np.random.rand(5), random.random()
            list(DataLoader(TensorDataset(torch.arange(4)), batch_size=2))  # draws a base seed
            raise RuntimeError("inside")
    assert _same_states(before, _global_states())
    with global_rng_untouched():
        torch.rand(1)
    assert _same_states(before, _global_states())


def test_the_guard_is_needed_iterating_a_dataloader_moves_the_global_generator():
    """The cause the guard exists for: without it, the check above could pass vacuously."""
    torch.manual_seed(0)
    before = torch.get_rng_state().clone()
    list(DataLoader(TensorDataset(torch.arange(4)), batch_size=2, shuffle=False))
    assert not torch.equal(before, torch.get_rng_state())


# --------------------------------------------------------------------------------------------
# devinterp's example models and data
# --------------------------------------------------------------------------------------------
class ToyModel(nn.Module):
    """Toy models of superposition, as devinterp's ``tms`` example notebook defines it:
    x ↦ ReLU(WᵀW x + b), W [m, n]."""

    def __init__(self, num_features: int = 5, num_hidden: int = 2):
        super().__init__()
        self.W = nn.Parameter(torch.empty(num_hidden, num_features))
        nn.init.xavier_normal_(self.W)
        self.b = nn.Parameter(torch.zeros(num_features))

    def forward(self, x):
        return F.relu(x @ self.W.T @ self.W + self.b)


try:  # devinterp 1.3 ships its example models; devinterp 2 does not: the same definitions
    from devinterp.test_utils import Polynomial, ReducedRankRegressor
except ImportError:
    class Polynomial(nn.Module):
        """devinterp 1.3's ``test_utils.Polynomial``: x ↦ x · Π_i w_i^{p_i} (the normal crossing)."""

        def __init__(self, powers=(1, 1)):
            super().__init__()
            self.powers = torch.tensor(powers)
            self.weights = nn.Parameter(torch.zeros_like(self.powers, dtype=torch.float32))

        def forward(self, x):
            return x * torch.prod(self.weights ** self.powers)

    class ReducedRankRegressor(nn.Module):
        """devinterp 1.3's ``test_utils.ReducedRankRegressor``: two bias-free linear maps."""

        def __init__(self, m, h, n):
            super().__init__()
            self.fc1 = nn.Linear(m, h, bias=False)
            self.fc2 = nn.Linear(h, n, bias=False)

        def forward(self, x):
            return self.fc2(self.fc1(x))


def _normal_crossing():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200, generator=gen)
    y = x * 0.0 + 0.1 * torch.randn(200, generator=gen)
    model = Polynomial([2, 2])
    with torch.no_grad():
        model.weights.copy_(torch.tensor([0.05, -0.02]))
    return model, (x, y), "mse"


def _reduced_rank():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(120, 4, generator=gen)
    y = x @ torch.randn(4, 3, generator=gen) + 0.1 * torch.randn(120, 3, generator=gen)
    torch.manual_seed(5)
    return ReducedRankRegressor(4, 2, 3), (x, y), "mse"


def _tms():
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(150, 5, generator=gen) * (torch.rand(150, 5, generator=gen) < 0.3)
    torch.manual_seed(6)
    return ToyModel(), (x, x.clone()), "mse"


def _classifier():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(96, 6, generator=gen)
    y = torch.randint(0, 3, (96,), generator=gen)
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), (x, y), "ce"


PROBLEMS = {"normal_crossing": _normal_crossing, "reduced_rank": _reduced_rank, "tms": _tms,
            "classifier": _classifier}


def _losses(kind):
    if kind == "ce":
        return (lambda out, y: F.cross_entropy(out, y)), (lambda out, y: F.cross_entropy(out, y, reduction="none"))
    per_sample = lambda out, y: ((out - y) ** 2).reshape(len(y), -1).mean(dim=1)  # noqa: E731
    return (lambda out, y: per_sample(out, y).mean()), per_sample


def _probe_loss_fn(per_sample):
    def loss_fn(model, batch):
        x, y = batch
        return per_sample(model(x), y)
    return loss_fn


# --------------------------------------------------------------------------------------------
# devinterp 1.3: estimate_learning_coeff_with_summary(callbacks=[...])
# --------------------------------------------------------------------------------------------
def _dv1_run(name, with_callback):
    from devinterp.optim.sgld import SGLD
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary

    model, (x, y), kind = PROBLEMS[name]()
    mean_loss, per_sample = _losses(kind)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    callbacks = []
    if with_callback:  # built where a user builds it: after the model and data, before the call
        callbacks = [LossKernelCallback((x[:40], y[:40]), _probe_loss_fn(per_sample), batch_size=16)]

    def evaluate(model, batch):
        inputs, targets = batch
        return mean_loss(model(inputs), targets), {}

    torch.manual_seed(123)  # a global state the host's init-loss minibatches draw from
    results = estimate_learning_coeff_with_summary(
        model, loader=loader, evaluate=evaluate, sampling_method=SGLD,
        optimizer_kwargs=dict(lr=1e-3, nbeta=10.0, localization=100.0),
        num_chains=2, num_draws=12, num_burnin_steps=3, num_steps_bw_draws=2,
        cores=1, seed=0, device="cpu", callbacks=callbacks, verbose=False)
    return results, _global_states(), callbacks


@pytest.mark.skipif(MAJOR != 1, reason="devinterp 1.x's estimate_learning_coeff_with_summary")
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_devinterp1_llc_is_bit_identical_with_and_without_the_callback(name):
    without, state_without, _ = _dv1_run(name, with_callback=False)
    with_cb, state_with, callbacks = _dv1_run(name, with_callback=True)
    for key, value in without.items():  # llc/mean, llc/std, llc/means, llc/trace, loss/trace, init_loss…
        other = with_cb[key]
        assert np.array_equal(np.asarray(value), np.asarray(other), equal_nan=True), \
            f"devinterp's {key} changed when the callback was added"
    assert _same_states(state_without, state_with), "the global generators ended elsewhere"
    assert callbacks[0].kernel.num_draws == 2 * 12  # and the callback did its work


# --------------------------------------------------------------------------------------------
# devinterp 2.0: sample_single_chain(callbacks=[...])
# --------------------------------------------------------------------------------------------
def _dv2_run(name, with_callback):
    from devinterp.optim import SGMCMC
    from devinterp.slt.sampler import sample_single_chain

    model, (x, y), kind = PROBLEMS[name]()
    mean_loss, per_sample = _losses(kind)
    dataset = [{"input_ids": x[i], "labels": y[i]} for i in range(len(x))]
    callback = None
    if with_callback:
        callback = LossKernelCallback((x[:40], y[:40]), _probe_loss_fn(per_sample), batch_size=16)

    def evaluate(model, batch):
        return per_sample(model(batch["input_ids"]), batch["labels"]), {}

    traces = []

    def recorder(*, loss, **_):
        traces.append(float(loss) if not isinstance(loss, torch.Tensor) else loss.detach().clone())

    torch.manual_seed(123)
    for chain in range(2):
        sample_single_chain(
            model, dataset, evaluate, param_masks={name: None for name, _ in model.named_parameters()},
            sampling_method=SGMCMC.sgld, sampling_method_kwargs=dict(lr=1e-3, nbeta=10.0, localization=100.0),
            num_draws=10, num_burnin_steps=3, num_steps_bw_draws=2, batch_size=16,
            chain=chain, seed=chain, dataloader_seed=chain + 100, device="cpu",
            callbacks=[recorder] + ([callback] if callback is not None else []))
    if callback is not None:
        callback.finalize()
    return traces, _global_states(), callback


@pytest.mark.skipif(MAJOR != 2, reason="devinterp 2.x's sample_single_chain")
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_devinterp2_loss_trace_is_bit_identical_with_and_without_the_callback(name):
    without, state_without, _ = _dv2_run(name, with_callback=False)
    with_cb, state_with, callback = _dv2_run(name, with_callback=True)
    assert len(without) == len(with_cb) > 0
    for a, b in zip(without, with_cb):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), "devinterp's loss trace changed"
    assert _same_states(state_without, state_with), "the global generators ended elsewhere"
    assert callback.kernel.num_draws == 2 * 10


# --------------------------------------------------------------------------------------------
# estimate_loss_kernel: the chains do not depend on the probe, and the caller's generators stay
# --------------------------------------------------------------------------------------------
def _estimate(probe_size, *, seed=11, before_call=None):
    from devinterp_losskernel import estimate_loss_kernel

    model, (x, y), _ = _classifier()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    if before_call is not None:
        before_call()
    return estimate_loss_kernel(model, loader, (x[:probe_size], y[:probe_size]), num_chains=2, num_draws=8,
                                num_burnin_steps=2, num_steps_bw_draws=2, lr=1e-3, nbeta=10.0,
                                localization=100.0, seed=seed, verbose=False, probe_batch_size=7,
                                evaluate=_mean_cross_entropy)


def _mean_cross_entropy(model, batch):
    inputs, targets = batch
    return F.cross_entropy(model(inputs), targets)


def test_estimate_loss_kernel_llc_does_not_depend_on_the_probe_and_leaves_the_generators():
    before = []

    def seed_and_record():
        torch.manual_seed(99), np.random.seed(99), random.seed(99)
        before.append(_global_states())

    small = _estimate(10, before_call=seed_and_record)
    before = before[0]
    assert _same_states(before, _global_states()), "estimate_loss_kernel moved the caller's generators"
    large = _estimate(60)
    for key in ("llc/per_chain", "llc/mean", "llc/init_loss"):
        assert small.metadata[key] == large.metadata[key], f"{key} depends on the probe"
    assert small.num_samples == 10 and large.num_samples == 60


@pytest.mark.skipif(MAJOR != 1, reason="devinterp 1.x's sample and LLCEstimator")
def test_estimate_loss_kernel_llc_equals_devinterps_own_chains_without_the_callback():
    from devinterp.optim.sgld import SGLD
    from devinterp.slt.llc import LLCEstimator
    from devinterp.slt.sampler import sample

    from devinterp_losskernel.estimate import chain_seeds

    kernel = _estimate(20)
    init_loss = kernel.metadata["llc/init_loss"]
    for chain, seed in enumerate(chain_seeds(11, 2)):
        model, (x, y), _ = _classifier()
        loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
        llc = LLCEstimator(1, 8, init_loss=torch.tensor(init_loss), nbeta=10.0)
        sample(model, loader, callbacks=[llc], evaluate=_mean_cross_entropy,
               optimizer_kwargs=dict(lr=1e-3, nbeta=10.0, localization=100.0), num_draws=8, num_chains=1,
               num_burnin_steps=2, num_steps_bw_draws=2, seed=[seed], device="cpu", verbose=False, cores=1,
               init_loss=init_loss, sampling_method=SGLD)
        expected = 10.0 * (float(llc.losses.double().mean()) - init_loss)
        assert kernel.metadata["llc/per_chain"][chain] == expected


def test_probe_passes_leave_the_generators_whatever_the_probe_is():
    from devinterp_losskernel.probe import ProbeSet, evaluate_probe_losses

    model, (x, y), _ = _classifier()
    probes = [(x, y), DataLoader(TensorDataset(x, y), batch_size=10), TensorDataset(x, y), x]
    for probe in probes:
        torch.manual_seed(5), np.random.seed(5), random.seed(5)
        before = _global_states()
        probe_set = ProbeSet(probe, batch_size=9)
        probe_set.fingerprint(), probe_set.check_stable()
        if not isinstance(probe, torch.Tensor):
            evaluate_probe_losses(model, probe_set)
        assert _same_states(before, _global_states()), type(probe).__name__
