"""Identities, checksums and verified files (provenance.py), and the kernel file on top."""

import math

import numpy as np
import pytest
import torch

from devinterp_losskernel import KernelAccumulator, LossKernel
from devinterp_losskernel.provenance import (FileIntegrityError, KernelIdentity, checksum, load_verified,
                                             save_verified, to_storable)


def test_identity_differences_name_fields_and_both_values():
    a = KernelIdentity(10, rows=[1, 2], dtype="float64", probe="p1", sampler={"lr": 1e-4, "nbeta": 10})
    b = KernelIdentity(10, rows=[1, 3], dtype="float32", probe="p2", sampler={"lr": 1e-3, "nbeta": 10})
    names = [d[0] for d in a.differences(b)]
    assert names == ["rows", "dtype", "probe", "sampler"]
    assert a.differences(KernelIdentity(10, rows=(1, 2), probe=None)) == []  # unknown probe: no conflict
    with pytest.raises(ValueError, match=r"probe: mine = 'p1'\s+theirs = 'p2'"):
        a.check_matches(b, what="test", mine="mine", theirs="theirs")
    assert KernelIdentity.from_dict(a.to_dict()) == a


def test_checksum_sees_every_byte_and_every_value():
    payload = {"t": torch.arange(6.0), "meta": {"x": float("nan"), 1: (2, 3)}}
    base = checksum(payload)
    assert checksum({"meta": {1: (2, 3), "x": float("nan")}, "t": torch.arange(6.0)}) == base  # key order
    flipped = torch.arange(6.0)
    flipped.view(torch.uint8)[5] ^= 1
    assert checksum({**payload, "t": flipped}) != base
    assert checksum({**payload, "meta": {"x": float("inf"), 1: (2, 3)}}) != base
    assert checksum({**payload, "t": torch.arange(6.0).double()}) != base  # dtype counts


def test_metadata_round_trips_types(tmp_path):
    meta = {"nan": float("nan"), "inf": float("-inf"), "ints": {0: 3, 7: None}, "tuple": (1, "a"),
            "np": np.float32(0.5), "array": np.arange(3), "tensor": torch.ones(2), "set": {3, 1}}
    stored = to_storable(meta)
    save_verified({"format": "x", "meta": stored}, tmp_path / "m.pt")
    back = load_verified(tmp_path / "m.pt", kind="x")["meta"]
    assert math.isnan(back["nan"]) and back["inf"] == float("-inf")
    assert back["ints"] == {0: 3, 7: None} and back["tuple"] == (1, "a")
    assert back["np"] == 0.5 and back["array"] == [0, 1, 2] and back["set"] == [1, 3]
    assert torch.equal(back["tensor"], torch.ones(2))


def kernel_file(tmp_path, rng):
    acc = KernelAccumulator(8)
    acc.update(torch.from_numpy(rng.normal(size=(30, 8))))
    k = acc.compute(metadata={"llc/mean": float("nan"), "llc/per_chain": [1.5, None], "nu": float("inf"),
                              "per_chain": {0: 1.0, 3: 2.0}})
    return k, k.save(tmp_path / "kernel.pt")


def test_kernel_metadata_keeps_nan_inf_and_int_keys(tmp_path, rng):
    k, path = kernel_file(tmp_path, rng)
    loaded = LossKernel.load(path)
    assert math.isnan(loaded.metadata["llc/mean"]) and loaded.metadata["nu"] == float("inf")
    assert loaded.metadata["per_chain"] == {0: 1.0, 3: 2.0} and loaded.metadata["llc/per_chain"] == [1.5, None]


def _flip_inside_tensor(path, needle: bytes):
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at > 0
    data[at + 3] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_byte_inside_a_tensor_is_refused_naming_the_file(tmp_path, rng):
    k, path = kernel_file(tmp_path, rng)
    # the covariance's raw float64 bytes lie uncompressed in the zip: flip one bit in them
    _flip_inside_tensor(path, k.covariance.numpy().tobytes()[:16])
    assert torch.load(path, weights_only=True)["covariance"] is not None, "torch.load alone does not notice"
    with pytest.raises(FileIntegrityError, match=r"kernel\.pt.* is damaged"):
        LossKernel.load(path)


def test_truncated_or_foreign_files_are_refused(tmp_path, rng):
    _, path = kernel_file(tmp_path, rng)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(FileIntegrityError, match="cannot be read"):
        LossKernel.load(path)
    torch.save({"format": "devinterp_losskernel.LossKernel", "format_version": 2, "covariance": torch.ones(1)},
               tmp_path / "forged.pt")
    with pytest.raises(FileIntegrityError, match="no checksum"):
        LossKernel.load(tmp_path / "forged.pt")
