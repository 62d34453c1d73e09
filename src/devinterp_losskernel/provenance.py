"""What made a kernel, and proof that a file still holds it.

Two things live here, used by every state the package keeps (accumulators, callbacks,
kernel files, checkpoints):

- :class:`KernelIdentity` — the fields that say *which* kernel a state belongs to: n, the
  rows of a rectangular kernel, the accumulator dtype, the probe's fingerprint, the SGLD
  arguments and a run id. Two states may be merged, or one loaded into the other, only when
  their identities agree; :meth:`KernelIdentity.differences` names every field that does not,
  with both values side by side (as kronfluence does for its saved arguments).
- :func:`checksum` / :func:`save_verified` / :func:`load_verified` — files carry the SHA-256
  of everything in them (tensors bit for bit, and the metadata), and refuse to load when a
  byte has changed, naming the file. ``torch.load`` alone does not verify anything.

This module imports nothing else of the package at import time (``save_verified`` uses
:mod:`~devinterp_losskernel.validation`'s output-path checks when called).
"""

from __future__ import annotations

import hashlib
import math
import os
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

__all__ = [
    "argument_differences",
    "mismatch_error",
    "FileIntegrityError",
    "FormatVersionError",
    "package_version",
    "IdentityMismatchError",
    "KernelIdentity",
    "check_format_version",
    "checksum",
    "devinterp_version",
    "load_verified",
    "new_run_id",
    "save_verified",
    "from_typed_json",
    "to_storable",
    "to_typed_json",
]


class IdentityMismatchError(ValueError):
    """Two states that belong to different kernels were about to be merged or loaded."""


class FileIntegrityError(ValueError):
    """A kernel or checkpoint file is not what was written: damaged, truncated or foreign."""


class FormatVersionError(FileIntegrityError):
    """A file of a format version this installation cannot read (newer, or too old)."""


PACKAGE = "devinterp-losskernel"


def package_version() -> str:
    """This installation's devinterp-losskernel version ("unknown" when not installed)."""
    try:
        from importlib.metadata import version

        return version(PACKAGE)
    except Exception:  # running from a source tree that was never installed
        return "unknown"


def devinterp_version() -> Optional[str]:
    """The installed devinterp's version string, or None."""
    try:
        from importlib.metadata import version

        return version("devinterp")
    except Exception:  # not installed
        return None


def mismatch_error(what: str, diffs, *, mine: str, theirs: str, advice: str = "") -> "IdentityMismatchError":
    """The one report of differing fields: ``diffs`` is [(field, mine, theirs)]; each line
    shows both sides (long values shortened), then ``advice``."""
    lines = "\n".join(f"  {name}: {mine} = {_short(a)!s}   {theirs} = {_short(b)!s}" for name, a, b in diffs)
    return IdentityMismatchError(f"{what}:\n{lines}" + (f"\n{advice}" if advice else ""))


def argument_differences(saved: Dict[str, Any], now: Dict[str, Any], prefix: str = "") -> List[Tuple[str, Any, Any]]:
    """[(dotted key, saved value, current value)] for every entry of two nested dicts that differs."""
    out = []
    for key in sorted(set(saved) | set(now), key=str):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += argument_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def new_run_id() -> str:
    """A fresh random run id (16 hex digits)."""
    return uuid.uuid4().hex[:16]


def _canonical_sampler(sampler: Optional[dict]) -> Optional[Tuple[Tuple[str, Any], ...]]:
    if sampler is None:
        return None
    return tuple(sorted((str(k), float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                        for k, v in dict(sampler).items()))


@dataclass(frozen=True)
class KernelIdentity:
    """Which kernel a state belongs to.

    Attributes:
        num_samples: n, the probe size (columns of K).
        rows: the row samples of a rectangular [q, n] kernel, or None for the square one.
        dtype: the accumulator dtype, "float32" or "float64".
        probe: the probe's fingerprint (shapes, dtypes and per-sample sums of its first pass,
            in order; see :meth:`~devinterp_losskernel.probe.ProbeSet.fingerprint`), or None
            where the draws came without a probe (``KernelAccumulator.update`` by hand).
        sampler: the SGLD arguments the draws were taken with (lr, nbeta, localization, …),
            or None where unknown.
        mode: "full", "diagonal" or "combined" (what part of K is kept; see KernelAccumulator).
        run_id: names the run; informative only (merging runs of one kind is what merges
            are for), kept with every kernel and checkpoint.

    ``num_samples``, ``mode``, ``rows`` and ``dtype`` must always agree; ``probe`` and ``sampler`` must
    agree where both sides know them (a side that does not know one takes the other's).
    """

    num_samples: int
    rows: Optional[Tuple[int, ...]] = None
    dtype: str = "float64"
    probe: Optional[str] = None
    sampler: Optional[Tuple[Tuple[str, Any], ...]] = None
    run_id: str = field(default_factory=new_run_id)
    mode: str = "full"

    def __post_init__(self):
        if self.rows is not None:
            object.__setattr__(self, "rows", tuple(int(r) for r in self.rows))
        if self.sampler is not None and isinstance(self.sampler, dict):
            object.__setattr__(self, "sampler", _canonical_sampler(self.sampler))
        elif self.sampler is not None:
            object.__setattr__(self, "sampler", _canonical_sampler(dict(self.sampler)))

    ALWAYS = ("num_samples", "mode", "rows", "dtype")
    WHERE_KNOWN = ("probe", "sampler")

    def with_known(self, **fields) -> "KernelIdentity":
        """A copy with more fields filled in (``probe=``, ``sampler=`` as a dict, …)."""
        if "sampler" in fields and isinstance(fields["sampler"], dict):
            fields["sampler"] = _canonical_sampler(fields["sampler"])
        return replace(self, **fields)

    def differences(self, other: "KernelIdentity") -> List[Tuple[str, Any, Any]]:
        """[(field, this value, other value)] for every field that disagrees (run_id aside)."""
        out = []
        for name in self.ALWAYS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append((name, mine, theirs))
        for name in self.WHERE_KNOWN:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is not None and theirs is not None and mine != theirs:
                out.append((name, mine, theirs))
        return out

    def check_matches(self, other: "KernelIdentity", *, what: str, mine: str = "this",
                      theirs: str = "other", advice: str = "") -> None:
        """Raise :class:`IdentityMismatchError` naming each differing field, both sides."""
        diffs = self.differences(other)
        if diffs:
            raise mismatch_error(f"{what}: they belong to different kernels", diffs, mine=mine, theirs=theirs,
                                 advice=advice)

    def combined(self, other: "KernelIdentity") -> "KernelIdentity":
        """This identity with the fields it does not know taken from ``other``."""
        return replace(self, probe=self.probe if self.probe is not None else other.probe,
                       sampler=self.sampler if self.sampler is not None else other.sampler)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["rows"] = None if self.rows is None else list(self.rows)
        d["sampler"] = None if self.sampler is None else dict(self.sampler)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "KernelIdentity":
        return cls(num_samples=int(d["num_samples"]), rows=d.get("rows"), dtype=d["dtype"],
                   probe=d.get("probe"), sampler=d.get("sampler"), run_id=d.get("run_id") or new_run_id(),
                   mode=d.get("mode", "full"))


def _short(value: Any) -> str:
    text = repr(dict(value)) if isinstance(value, tuple) and value and isinstance(value[0], tuple) else repr(value)
    if isinstance(value, tuple) and len(value) > 8 and not isinstance(value[0], tuple):
        text = f"({len(value)} indices: {', '.join(map(str, value[:4]))}, …, {value[-1]})"
    return text if len(text) < 300 else text[:297] + "…"


# -- storable metadata ---------------------------------------------------------------------
def to_storable(value: Any) -> Any:
    """Metadata in the types ``torch.load(weights_only=True)`` reads back unchanged: dicts,
    lists, tuples, str, int, float (NaN and ±Inf included), bool, None and CPU tensors.
    numpy arrays become lists, numpy scalars Python numbers, sets sorted lists; anything
    else its ``repr`` (said in the docstring of the saving function)."""
    if isinstance(value, dict):
        return {k if isinstance(k, (str, int, float, bool)) or k is None else str(k): to_storable(v)
                for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(to_storable(v) for v in value)
    if isinstance(value, list):
        return [to_storable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(to_storable(v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, np.ndarray):
        return [to_storable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


_TAGS = ("__float__", "__tuple__", "__dict__", "__tensor__")


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": str(value)}  # "nan", "inf", "-inf"
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not (k.startswith("__") and k.endswith("__")) for k in value):
            return {k: _encode(v) for k, v in value.items()}
        return {"__dict__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        data = torch.view_as_real(t).tolist() if t.is_complex() else t.tolist()
        return {"__tensor__": _encode(data), "dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)}
    return _encode(to_storable(value))


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"__float__"}:
        return float(value["__float__"])
    if set(value) == {"__tuple__"}:
        return tuple(_decode(v) for v in value["__tuple__"])
    if set(value) == {"__dict__"}:
        return {_decode(k): _decode(v) for k, v in value["__dict__"]}
    if set(value) == {"__tensor__", "dtype", "shape"}:
        dtype = getattr(torch, value["dtype"])
        data = _decode(value["__tensor__"])
        if dtype.is_complex:
            real = torch.tensor(data, dtype=torch.empty((), dtype=dtype).real.dtype)
            return torch.view_as_complex(real.reshape(*value["shape"], 2).contiguous())
        return torch.tensor(data, dtype=dtype).reshape(value["shape"])
    return {k: _decode(v) for k, v in value.items()}


def to_typed_json(value: Any) -> str:
    """Storable metadata (see :func:`to_storable`) as strict JSON text that
    :func:`from_typed_json` turns back into the same types: NaN and ±Inf floats, tuples,
    dicts with int (or other non-str) keys and tensors are tagged, so nothing becomes a
    string on the way through JSON, zarr or netCDF attributes."""
    import json

    return json.dumps(_encode(to_storable(value)), allow_nan=False)


def from_typed_json(text: str) -> Any:
    """The value :func:`to_typed_json` encoded, with its types."""
    import json

    return _decode(json.loads(text))


# -- checksums -------------------------------------------------------------------------------
def _feed(h, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            _feed(h, key)
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}".encode())
        for item in value:
            _feed(h, item)
    elif isinstance(value, float):
        h.update(b"F" + (repr(value) if math.isfinite(value) else str(value)).encode())
    else:
        h.update(f"{type(value).__name__}:{value!r}".encode())


def checksum(value: Any) -> str:
    """SHA-256 (hex) of a nested structure of tensors, containers and plain values: tensors
    by dtype, shape and bytes, dict entries in key order."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def save_verified(payload: Dict[str, Any], path: Union[str, Path], *, name: str = "path") -> Path:
    """Write ``payload`` (a dict of storable values) with its checksum and the version of
    devinterp-losskernel that wrote it (``written_by``), atomically: a file at ``path`` is
    either the old one or the whole new one, never half of either, and a failed write leaves
    no temp file. ``path`` is checked first (``name`` is the argument named in the error): a
    folder, or a regular file where a parent folder should be, is refused; missing parent
    folders are created."""
    from .validation import atomic_write, check_output_path  # here: validation imports kernel.py

    path = check_output_path(path, name, expect="file", make_parents=True)
    payload = dict(payload)
    payload.pop("checksum", None)
    payload.setdefault("written_by", f"{PACKAGE} {package_version()}")
    payload["checksum"] = checksum(payload)
    with atomic_write(path, mode=None) as tmp:
        torch.save(payload, tmp)
    return path


def check_format_version(payload: Dict[str, Any], path: Union[str, Path], *, kind: str, current: int,
                         oldest: int = 1, default: int = 1) -> int:
    """The ``format_version`` of a loaded ``kind`` file, refused (:class:`FormatVersionError`
    naming the file, its version and what to do) unless ``oldest <= version <= current``.
    A file without one is ``default`` (the first format wrote none)."""
    version = payload.get("format_version", default)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise FileIntegrityError(f"{str(path)!r} has format_version {version!r}, not a positive int: it is "
                                 f"damaged or not a {kind} file this package wrote")
    written_by = payload.get("written_by")
    readable = f"format version {current}" if oldest == current else f"format versions {oldest} to {current}"
    if version > current:
        wrote = f"it was written by {written_by}" if written_by else "it was written by a newer devinterp-losskernel"
        their_version = str(written_by).split()[-1] if written_by else ""
        need = f"'{PACKAGE}>={their_version}'" if their_version[:1].isdigit() else f"the newest {PACKAGE}"
        raise FormatVersionError(
            f"{str(path)!r} is a {kind} file of format version {version}, but this {PACKAGE} "
            f"({package_version()}) reads {readable}; {wrote}. "
            f"Upgrade: pip install -U {need}")
    if version < oldest:
        wrote = f" (written by {written_by})" if written_by else ""
        raise FormatVersionError(
            f"{str(path)!r} is a {kind} file of format version {version}{wrote}, older than this {PACKAGE} "
            f"({package_version()}) reads ({readable}); read it with the release "
            "that wrote it, or make it again")
    return version


def load_verified(path: Union[str, Path], *, kind: str, map_location="cpu",
                  require_checksum=True, versions: Optional[Tuple[int, int]] = None) -> Dict[str, Any]:
    """Read a file written by :func:`save_verified` and check it: a ``format`` of ``kind``
    and a matching checksum; :class:`FileIntegrityError` names the file otherwise.
    ``require_checksum``: a bool, or a function of the payload (older formats had none).
    ``versions=(oldest, current)``: the format versions this reader understands; any other is
    refused by :func:`check_format_version` before the payload is used."""
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be the path (str or os.PathLike) of a {kind} file, got {type(path).__name__}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"path {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"path must be a {kind} file, got {str(path)!r}, which is a folder")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, flipped bytes in a header, a foreign pickle
        raise FileIntegrityError(
            f"{str(path)!r} cannot be read as a {kind} file ({type(error).__name__}: {error}); "
            "it is damaged or not a file this package wrote") from None
    if not isinstance(payload, dict) or payload.get("format") != kind:
        raise FileIntegrityError(f"{str(path)!r} is not a {kind} file (not a file written by its save())")
    if versions is not None:
        check_format_version(payload, path, kind=kind, oldest=versions[0], current=versions[1])
    stored = payload.pop("checksum", None)
    if stored is None:
        if require_checksum(payload) if callable(require_checksum) else require_checksum:
            raise FileIntegrityError(f"{str(path)!r} carries no checksum, so it cannot be verified")
        return payload
    actual = checksum(payload)
    if actual != stored:
        raise FileIntegrityError(
            f"{str(path)!r} is damaged: the checksum of its contents is {actual[:16]}…, but it was "
            f"written with {stored[:16]}…. Some bytes changed after it was saved; use another copy "
            "or recompute it.")
    return payload
