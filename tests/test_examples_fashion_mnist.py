"""The real Fashion-MNIST files (Debian's dataset-fashion-mnist), where they are installed.

The reader itself is tested on generated IDX files in test_examples_memorization.py. CI installs
the Debian package and sets LOSSKERNEL_REQUIRE_FASHION_MNIST=1: then a missing or unreadable
dataset fails here instead of letting the tutorials fall back to scikit-learn's digits.
"""

import os

import numpy as np
import pytest

from losskernel_examples.fashion_mnist import FashionMNISTNotFound, load_fashion_mnist


def _load(split):
    try:
        return load_fashion_mnist(split=split)
    except FashionMNISTNotFound as error:
        if os.environ.get("LOSSKERNEL_REQUIRE_FASHION_MNIST") == "1":
            pytest.fail(f"LOSSKERNEL_REQUIRE_FASHION_MNIST=1 but {error}")
        pytest.skip(str(error))


@pytest.mark.parametrize("split, count", [("train", 60_000), ("test", 10_000)])
def test_real_fashion_mnist(split, count):
    images, labels = _load(split)
    assert len(images) == len(labels) == count
    assert images.reshape(count, -1).shape[1] == 28 * 28
    assert images.dtype == np.uint8 and images.max() > 200 and images.min() == 0
    # the ten classes, balanced in both splits
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, count // 10))
