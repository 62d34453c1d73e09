"""StreamingFloat32Mean gives numpy's and xarray's float32 mean bit for bit, fed in pieces."""

import numpy as np
import pytest

from devinterp_losskernel.float32_mean import StreamingFloat32Mean, pairwise_sum_float32

SIZES = [1, 5, 7, 8, 9, 15, 16, 100, 127, 128, 129, 255, 256, 1000, 4095, 8193, 20000, 100003, 131072]


@pytest.mark.parametrize("n", SIZES)
def test_pairwise_sum_equals_numpys_sum(n):
    values = (np.random.default_rng(n).standard_normal(n) * 3 + 1000).astype(np.float32)  # large mean
    assert pairwise_sum_float32(values) == np.sum(values)


def test_the_float64_mean_would_not_do():
    """What the float32 tree is for: a float64 mean of the same numbers is another number."""
    xr = pytest.importorskip("xarray")
    values = (np.random.default_rng(0).standard_normal(100003) * 3 + 5).astype(np.float32)
    stream = StreamingFloat32Mean(values.size)
    stream.add(values)
    assert stream.mean() == float(xr.DataArray(values).mean()) != float(values.astype(np.float64).mean())


@pytest.mark.parametrize("shape", [(2, 7, 4, 5), (3, 30, 8, 16), (4, 101, 16, 33), (1, 5, 32, 64), (2, 13, 3, 1)])
def test_streamed_mean_equals_xarrays_mean_with_nans_and_ragged_pieces(shape):
    xr = pytest.importorskip("xarray")
    rng = np.random.default_rng(sum(shape))
    values = (rng.standard_normal(shape) * 2 + 5).astype(np.float32)
    values[0, 1] = np.nan  # a failed step: devinterp's store holds NaN there
    values.flat[rng.integers(values.size, size=3)] = np.nan
    stream = StreamingFloat32Mean(values.size)
    flat, start = values.ravel(), 0
    while start < flat.size:  # pieces of random sizes, as rows of steps arrive
        stop = min(flat.size, start + int(rng.integers(1, 300)))
        stream.add(flat[start:stop])
        start = stop
    assert stream.mean() == float(xr.DataArray(values).mean())


def test_refuses_more_values_than_declared_and_a_sum_before_all_arrived():
    stream = StreamingFloat32Mean(10)
    stream.add(np.ones(4, dtype=np.float32))
    with pytest.raises(ValueError, match="4 of its 10"):
        stream.sum()
    with pytest.raises(ValueError, match="made for 10"):
        stream.add(np.ones(7, dtype=np.float32))
