"""A guest leaves no trace: the global random generators are as we found them.

devinterp seeds torch's global generator once per chain and then draws its SGLD noise and its
minibatch order from it. Anything of ours that draws from that generator in between — iterating
a torch DataLoader draws a base seed from it even with ``shuffle=False`` — shifts every number
the chain draws afterwards, and devinterp's LLC changes. So every piece of our work that runs
inside the host's run (the callback's constructor, every probe pass, finalize, results) runs
inside :func:`global_rng_untouched`, which restores torch's CPU and CUDA generators, numpy's
global generator and Python's ``random`` on the way out, whatever happened inside. Our own
randomness (subset choices, seeds for runs we start) comes from generators we own.
"""

from __future__ import annotations

import functools
import random
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch

__all__ = ["global_rng_untouched", "leaves_rng_untouched"]

F = TypeVar("F", bound=Callable)


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


@contextmanager
def global_rng_untouched() -> Iterator[None]:
    """Run the block, then put torch's (CPU and every initialised CUDA device's), numpy's and
    Python's global generator states back to what they were before it.

    Cheap enough for every draw (a few kB copied); nests.
    """
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if _cuda_ready() else None
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def leaves_rng_untouched(method: F) -> F:
    """Decorator: the function runs inside :func:`global_rng_untouched`."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with global_rng_untouched():
            return method(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
