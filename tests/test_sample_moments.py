"""SampleMoments against a float64 reference: per-sample mean and unbiased variance of every
sample's loss values, in any order, with repeats, split and merged."""

import numpy as np
import pytest
import torch

from devinterp_losskernel.sample_moments import SampleMoments, merge_moments


def _stream(num_samples=50, steps=300, batch=16, mean=0.0, scale=1.0, seed=0, replacement=True):
    """(indices, losses) per step, and every sample's values in a list (the reference)."""
    gen = np.random.default_rng(seed)
    sample_mean = mean + gen.normal(size=num_samples)
    values = [[] for _ in range(num_samples)]
    steps_out = []
    for _ in range(steps):
        idx = gen.integers(num_samples, size=batch) if replacement else gen.permutation(num_samples)[:batch]
        loss = sample_mean[idx] + scale * gen.normal(size=batch)
        for i, v in zip(idx, loss.astype(np.float32)):
            values[i].append(float(v))
        steps_out.append((torch.as_tensor(idx), torch.as_tensor(loss, dtype=torch.float32)))
    return steps_out, values


def _reference(values):
    var = np.array([np.var(v, ddof=1) if len(v) >= 2 else np.nan for v in values])
    mean = np.array([np.mean(v) if v else np.nan for v in values])
    return mean, var, np.array([len(v) for v in values])


@pytest.mark.parametrize("mean,scale", [(0.0, 1.0), (1e4, 1e-3)])  # the second: a large mean, a tiny variance
def test_moments_equal_float64_reference_with_repeats_in_a_batch(mean, scale):
    steps, values = _stream(mean=mean, scale=scale)
    moments = SampleMoments.zeros(50)
    for idx, loss in steps:
        moments = moments.update(idx, loss)
    ref_mean, ref_var, visits = _reference(values)
    assert moments.count.tolist() == visits.tolist()
    np.testing.assert_allclose(moments.variance().numpy(), ref_var, rtol=1e-9, equal_nan=True)
    np.testing.assert_allclose(moments.loss_mean().numpy(), ref_mean, rtol=1e-12, equal_nan=True)


def test_unseen_and_once_seen_samples_have_nan_variance():
    moments = SampleMoments.zeros(4).update(torch.tensor([0, 0, 1]), torch.tensor([1.0, 3.0, 5.0]))
    var = moments.variance()
    assert var[0] == pytest.approx(2.0) and torch.isnan(var[1:]).all()
    assert moments.count.tolist() == [2, 1, 0, 0]


def test_merge_of_split_streams_equals_one_stream_and_is_pure():
    steps, _ = _stream(seed=3)
    whole, first, second = SampleMoments.zeros(50), SampleMoments.zeros(50), SampleMoments.zeros(50)
    for t, (idx, loss) in enumerate(steps):
        whole = whole.update(idx, loss)
        if t % 3 == 0:
            first = first.update(idx, loss)
        else:
            second = second.update(idx, loss)
    before = first.m2.clone()
    merged = merge_moments(first, second)
    assert torch.equal(first.m2, before)  # inputs unchanged
    np.testing.assert_allclose(merged.variance().numpy(), whole.variance().numpy(), rtol=1e-10, equal_nan=True)
    assert torch.equal(merged.count, whole.count)


def test_state_round_trip_and_mismatched_merge():
    steps, _ = _stream(steps=20)
    moments = SampleMoments.zeros(50)
    for idx, loss in steps:
        moments = moments.update(idx, loss)
    again = SampleMoments.from_state_dict(moments.state_dict())
    assert torch.equal(again.m2, moments.m2) and torch.equal(again.count, moments.count)
    with pytest.raises(ValueError, match="different training sets"):
        merge_moments(moments, SampleMoments.zeros(49))
    state = moments.state_dict()
    state["format_version"] = 7
    with pytest.raises(ValueError, match="format version 7"):
        SampleMoments.from_state_dict(state)
