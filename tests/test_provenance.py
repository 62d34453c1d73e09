"""Identities, checksums and verified files (provenance.py), and the kernel file on top."""

import math

import numpy as np
import pytest
import torch

from devinterp_losskernel import KernelAccumulator, LossKernel
from devinterp_losskernel.provenance import (
    FileIntegrityError,
    KernelIdentity,
    checksum,
    load_verified,
    save_verified,
    to_storable,
)


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


# -- output paths and atomic writes (validation.py's PATHS section) --------------------------------
def test_check_output_path_refuses_inputs_wrong_kinds_and_bad_parents(tmp_path):
    import os

    from devinterp_losskernel.validation import check_output_path

    data = tmp_path / "data.pt"
    data.write_bytes(b"input")
    os.symlink(data, tmp_path / "link.pt")
    for same in (data, str(tmp_path / "." / "data.pt"), tmp_path / "link.pt"):
        with pytest.raises(ValueError, match=r"out must not be one of the inputs .*which is the input"):
            check_output_path(same, "out", inputs=[None, data])
    with pytest.raises(ValueError, match=r"out must be a file path, got .*, which is an existing folder"):
        check_output_path(tmp_path, "out")
    with pytest.raises(ValueError, match=r"out must be a folder path, got .*data\.pt', which is an existing file"):
        check_output_path(data, "out", expect="folder")
    with pytest.raises(ValueError, match=r"out must be inside a folder, got .*data\.pt/x/k\.pt', but .*data\.pt' "
                                         r"is a regular file"):
        check_output_path(data / "x" / "k.pt", "out", make_parents=True)
    with pytest.raises(ValueError, match=r"out must be inside an existing folder, .*missing' does not exist"):
        check_output_path(tmp_path / "missing" / "k.pt", "out")
    with pytest.raises(ValueError, match=r"out must be a file name ending in \.html"):
        check_output_path(tmp_path / "k.htm", "out", suffix=".html")
    with pytest.raises(TypeError, match=r"out must be a path \(str or os.PathLike\) to a file, got int"):
        check_output_path(3, "out")
    with pytest.raises(ValueError, match="expect must be one of"):
        check_output_path(tmp_path / "k.pt", "out", expect="dir")
    assert check_output_path(tmp_path / "a" / "b" / "k.pt", "out", inputs=[data], make_parents=True).parent.is_dir()
    assert data.read_bytes() == b"input"


def test_atomic_write_replaces_whole_files_and_cleans_up_on_failure(tmp_path):
    from devinterp_losskernel.validation import atomic_write

    target = tmp_path / "out.txt"
    with atomic_write(target, "w") as handle:
        handle.write("first")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as handle:
            handle.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    with atomic_write(tmp_path / "x.npy", mode=None) as tmp:  # writers that take a path: the suffix is kept
        assert tmp.suffix == ".npy" and tmp.parent == tmp_path
        np.save(tmp, np.arange(3))
    assert np.load(tmp_path / "x.npy").tolist() == [0, 1, 2]
    for content in ("a", "b"):  # a folder replaces a folder, whole
        with atomic_write(tmp_path / "store", folder=True) as folder:
            (folder / content).write_text(content)
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "store", folder=True) as folder:
            (folder / "c").write_text("c")
            raise RuntimeError("interrupted")
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "store", "x.npy"]


def test_check_selection_counts_each_index_once():
    from devinterp_losskernel.validation import check_selection

    assert check_selection([2, 0], 3, "chains") == [2, 0]
    assert check_selection(np.array([1]), 3, "chains") == [1] == check_selection(torch.tensor([1]), 3, "chains")
    assert check_selection(slice(1, None), 3, "draws", allow_slice=True) == [1, 2]
    for bad, error in (([0, 0], ValueError), ([3], ValueError), ([-1], ValueError), ([1.0], TypeError),
                       ([True], TypeError), ("01", TypeError), (2, TypeError), ([], ValueError),
                       (slice(0, 3), TypeError), (torch.tensor([0.0]), TypeError)):
        with pytest.raises(error, match="chains must"):
            check_selection(bad, 3, "chains", what="chain")


# -- checkpoints: their own format version, and a checkpoint_dir that cannot be a folder -----------
def test_a_checkpoint_of_another_format_version_is_refused(tmp_path):
    from devinterp_losskernel.estimate import CHECKPOINT_FORMAT, CHECKPOINT_NAME, _Checkpoint
    from devinterp_losskernel.provenance import FormatVersionError

    for version, match in ((99, r"format version 99, but this devinterp-losskernel .* reads format version 2; "
                                r".*Upgrade"),
                           (1, r"format version 1 .*older than this devinterp-losskernel .* reads")):
        save_verified({"format": CHECKPOINT_FORMAT, "format_version": version, "arguments": {}},
                      tmp_path / CHECKPOINT_NAME)
        with pytest.raises(FormatVersionError, match=match):
            _Checkpoint(tmp_path, None, None, devinterp_major=2)


def test_a_checkpoint_dir_below_a_file_is_named(tmp_path):
    from devinterp_losskernel.estimate import _Checkpoint

    (tmp_path / "file").write_text("x")
    cases = ((tmp_path / "file", r"checkpoint_dir must be a folder path, got .*which is an existing file"),
             (tmp_path / "file" / "sub", r"checkpoint_dir must be inside a folder, .*is a regular file"))
    for directory, match in cases:
        with pytest.raises(ValueError, match=match):
            _Checkpoint(directory, None, None, devinterp_major=2)
