"""The SLT numbers beside the callback (summary.py): SLTSummary's results are slt_summary's
(and the snapshot convergence) under loss_kernel/, computed from the callback's kernel."""

from __future__ import annotations

import types

import pytest
import torch

from devinterp_losskernel import LossKernelCallback, SLTSummary
from devinterp_losskernel.analysis import probe_llc, singular_fluctuation
from devinterp_losskernel.summary import slt_summary, snapshot_convergence

from _models import MLP, classification_data

SGLD = {"lr": 1e-3, "nbeta": 20.0, "localization": 100.0}


def sampled(num_train=None, probe_train_mask=None, optimizer=True, **kwargs):
    """A callback fed 2 chains × 8 jittered draws around w*, as devinterp 1.x feeds it."""
    torch.manual_seed(0)
    model = MLP()
    probe = classification_data(24)
    cb = LossKernelCallback(probe, reference_model=model, num_train=num_train, probe_train_mask=probe_train_mask,
                            **kwargs)
    sgld = types.SimpleNamespace(param_groups=[dict(SGLD)]) if optimizer else None
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    for chain in range(2):
        for draw in range(8):
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(reference[name] + 0.05 * torch.randn(p.shape, generator=g))
            cb(model=model, chain=chain, draw=draw, optimizer=sgld)
    model.load_state_dict(reference)
    cb.finalize()
    return cb


def test_sltsummary_results_are_slt_summary_under_the_prefix():
    cb = sampled(num_train=100)
    expected = slt_summary(cb)
    assert set(expected) == {"probe_llc", "singular_fluctuation", "empirical_variance", "singular_fluctuation_method"}
    assert SLTSummary(cb).get_results() == {f"loss_kernel/{key}": value for key, value in expected.items()}
    fluctuation = singular_fluctuation(cb.kernel, nbeta=SGLD["nbeta"], num_train=100)
    assert expected["singular_fluctuation"] == fluctuation.nu and expected["empirical_variance"] == fluctuation.V
    assert expected["probe_llc"] == probe_llc(cb.kernel, nbeta=SGLD["nbeta"])
    assert expected["singular_fluctuation_method"] == "extrapolated"      # 24 probe samples of 100


def test_with_snapshots_the_convergence_curve_is_added():
    cb = sampled(num_train=24, snapshot_every=4)
    results = SLTSummary(cb).get_results()
    assert results["loss_kernel/cka_convergence"] == snapshot_convergence(cb)
    assert [t for t, _ in results["loss_kernel/cka_convergence"]] == [4, 8, 12, 16]
    assert results["loss_kernel/singular_fluctuation_method"] == "exact"


def test_what_is_unknown_is_left_out():
    assert slt_summary(sampled(optimizer=False)) == {}                            # no nbeta: nothing
    assert set(slt_summary(sampled())) == {"probe_llc"}                           # no num_train: no ν
    assert set(slt_summary(sampled(num_train=100, probe_train_mask=False))) == {"probe_llc"}   # held-out probe


def test_no_kernel_means_no_numbers_and_the_callback_says_why():
    cb = LossKernelCallback(classification_data(10))
    assert SLTSummary(cb).get_results() == {}                                     # no draws yet
    with pytest.raises(ValueError, match="no snapshots"):
        snapshot_convergence(sampled())


def test_the_base_must_be_the_runs_callback():
    with pytest.raises(TypeError, match="base must be the LossKernelCallback of the run, got dict"):
        SLTSummary({})
    summary = SLTSummary(sampled())
    assert summary(model=None, chain=0, draw=0) is None                           # it takes no draws
