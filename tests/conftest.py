import os

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def devinterp_major():
    try:
        from importlib.metadata import version

        return int(version("devinterp").split(".")[0])
    except Exception:
        return None


def require_devinterp(major: int):
    """Skip unless devinterp `major` is installed; CI sets LOSSKERNEL_REQUIRE_DEVINTERP to the
    major its environment holds, and then a mismatch fails instead of skipping."""
    required = os.environ.get("LOSSKERNEL_REQUIRE_DEVINTERP")
    installed = devinterp_major()
    if installed == major:
        return
    if required is not None and int(required) == major:
        pytest.fail(f"LOSSKERNEL_REQUIRE_DEVINTERP={required} but devinterp major {installed} is installed")
    pytest.skip(f"needs devinterp {major}.x (installed: {installed})")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
