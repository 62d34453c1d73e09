"""The loss kernel result: K, R, per-sample mean and variance, and what made them."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from .correlation import correlation_from_covariance
from .extras import require
from .provenance import (
    check_format_version,
    from_typed_json,
    load_verified,
    package_version,
    save_verified,
    to_storable,
    to_typed_json,
)

__all__ = ["LossKernel", "as_labels", "correlation_from_covariance"]

FORMAT = "devinterp_losskernel.LossKernel"
FORMAT_VERSION = 2  # 2: metadata stored as values (NaN, Inf, int keys and tuples survive) and a checksum
OLDEST_FORMAT_VERSION = 1  # 1: metadata as JSON text, no checksum
XARRAY_FORMAT = "devinterp_losskernel.LossKernel.xarray"
XARRAY_FORMAT_VERSION = 1  # the "losskernel" attribute of to_xarray(): typed JSON of every non-array field


def as_labels(labels, num_samples: Optional[int] = None, name: str = "labels") -> torch.Tensor:
    """[n] integer labels as an int64 tensor: :func:`devinterp_losskernel.validation.as_labels`
    with ``integer=True`` (the package's one labels rule: ints of any width, bools, whole-number
    floats; refused with a message naming ``name``: the wrong length, NaN, non-whole floats,
    strings — map class names to integers first)."""
    from .validation import as_labels as _as_labels  # validation imports this module

    return torch.from_numpy(np.ascontiguousarray(_as_labels(labels, num_samples, name, integer=True)))


def _to_jsonable(value: Any) -> Any:
    """Storable metadata as plain JSON values for reading by eye (str keys, lists for tuples and
    tensors); NaN and ±Inf stay floats (Python's json writes and reads them as NaN/Infinity)."""
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    return value


def _attribute(value: Any) -> Any:
    """One metadata value as an xarray attribute that zarr and netCDF both store: str, bool,
    32-bit int and float (NaN and ±Inf included) as they are, anything else (None, lists, dicts,
    larger ints) as JSON text (netCDF refuses None and dicts, netCDF-3 ints beyond 32 bits). The
    exact types come back from :meth:`LossKernel.from_xarray` (netCDF itself reads a bool back
    as 0/1)."""
    if isinstance(value, (str, float, bool)) or (isinstance(value, int) and -2**31 <= value < 2**31):
        return value
    return json.dumps(_to_jsonable(value))


def _storable_ids(sample_ids) -> list:
    """Sample ids as a file keeps them: numpy scalars as Python numbers; str, int, float, bool,
    None and tuples of them as they are; anything else as its str, said in a warning (it comes
    back as a str)."""
    plain = (str, int, float, bool, type(None))
    out, changed = [], {}
    for s in sample_ids:
        s = s.item() if isinstance(s, np.generic) else s
        if not (isinstance(s, plain) or (isinstance(s, tuple) and all(isinstance(v, plain) for v in s))):
            changed[type(s).__name__] = changed.get(type(s).__name__, 0) + 1
            s = str(s)
        out.append(s)
    if changed:
        warnings.warn(f"save: sample_ids of types {changed} (counts) are stored as their str and load back as str",
                      UserWarning, stacklevel=3)
    return out


def _health_attributes(kernel: "LossKernel") -> dict:
    """The health report's summary as xarray attributes (``health_ok``, ``health_judgeable``,
    ``health_problems`` and ``health_notes`` as text, one sentence a line)."""
    summary = kernel.metadata.get("diagnostics")
    if not isinstance(summary, dict) or "ok" not in summary:
        from .diagnostics import report_summary

        summary = report_summary(kernel)
    return {"health_ok": bool(summary["ok"]), "health_judgeable": bool(summary.get("judgeable", True)),
            "health_problems": "\n".join(summary.get("problems", [])),
            "health_notes": "\n".join(summary.get("notes", []))}


@dataclass
class LossKernel:
    """The estimated loss kernel of a probe set of n samples.

    Attributes:
        covariance: K̂, [n, n] float — unbiased (1/(N−1)) covariance of per-sample losses
            over all N = C·T draws. [q, n] for a rectangular kernel (see ``rows``), [q, q] for
            a combined one (``columns`` = ``rows``), None for a diagonal-mode kernel (only
            ``mean`` and ``variance`` of every sample are kept).
        mean: μ̂(x), [n] — mean probe loss over draws.
        variance: K̂(x, x), [n] — per-sample loss variance (the diagonal of K̂).
        num_draws: N, draws folded in (all chains).
        init_loss: ℓ(x; w*), [n] — probe losses at the trained weights, or None if unknown.
        rows: for a rectangular kernel, the [q] probe indices of K̂'s rows; else None.
        columns: the probe indices of K̂'s columns when not all n (a combined kernel); else None.
        draws_per_chain: {chain: draws kept}. rejected_per_chain: {chain: draws left out
            because the chain diverged: the diverging draw (NaN/Inf or far too large probe
            losses), the draws held back before it and the chain's later draws; see
            ``LossKernelCallback(divergence_tolerance=, divergence_window=)``}.
        sample_ids: [n] identifiers of the probe samples, when known (list or tensor).
        labels: [n] labels of the probe samples, when known (tensor).
        metadata: sampler hyperparameters, devinterp version, LLC results of the run, ….
        visits: [n] int64 — how many loss values each sample's mean and variance come from,
            for a minibatch-mode kernel (``metadata["mode"] == "minibatch"``: the losses of the
            SGLD minibatches, a different number per sample; variance NaN where fewer than 2);
            None when every sample was evaluated at every draw (``num_draws`` values each).
        token_positions: [n, 2] int64 for a token-level kernel (devinterp 2's
            ``correlation_method="token"``): row i is the loss of token (batch index,
            target position 1…T), the batch index into ``input_ids``; None otherwise.
        input_ids: [num_sequences, T + 1] int64 token ids of the sequences the rows come
            from (devinterp's observables concatenated), when known; else None.
        health_record: what the run recorded for its health report (:meth:`diagnostics`): the
            trace of the mean probe loss of every kept draw, {chain: float64 [T_c]}, and
            split-half moments (:class:`~devinterp_losskernel.diagnostics.HealthRecorder`);
            None when the kernel was made without them (an older file, a subset).

    Example (three draws of four samples; in a run the callback or
    :func:`~devinterp_losskernel.estimate_loss_kernel` makes the kernel):

    >>> import torch
    >>> from devinterp_losskernel import loss_kernel
    >>> losses = torch.tensor([[1.0, 2.0, 6.0, 5.0],       # [draws, n]: sample 1 moves with
    ...                        [2.0, 4.0, 4.0, 5.0],       # sample 0, sample 2 against it,
    ...                        [3.0, 6.0, 2.0, 5.0]])      # sample 3 not at all
    >>> kernel = loss_kernel(losses)
    >>> kernel
    LossKernel(4×4, num_draws=3, chains=1, trace=9, dtype=torch.float64, device=cpu)
    >>> kernel.mean.tolist(), kernel.variance.tolist()
    ([2.0, 4.0, 4.0, 5.0], [1.0, 4.0, 4.0, 0.0])
    >>> kernel.correlation[0].tolist()                       # R = 0 where a variance is 0
    [1.0, 1.0, -1.0, 0.0]
    >>> kernel.save("kernel.pt"); LossKernel.load("kernel.pt").trace   # doctest: +SKIP
    9.0
    """

    _LOSS_KERNEL = True  # how validation.py recognises a kernel without importing this module

    covariance: Optional[torch.Tensor]
    mean: torch.Tensor
    variance: torch.Tensor
    num_draws: int
    init_loss: Optional[torch.Tensor] = None
    rows: Optional[torch.Tensor] = None
    draws_per_chain: dict = field(default_factory=dict)
    rejected_per_chain: dict = field(default_factory=dict)
    sample_ids: Optional[Union[list, torch.Tensor]] = None
    labels: Optional[torch.Tensor] = None
    metadata: dict = field(default_factory=dict)
    columns: Optional[torch.Tensor] = None
    visits: Optional[torch.Tensor] = None
    token_positions: Optional[torch.Tensor] = None
    input_ids: Optional[torch.Tensor] = None
    health_record: Optional[dict] = None

    def __post_init__(self):
        n = self.mean.shape[0]
        q = n if self.rows is None else len(self.rows)
        m = n if self.columns is None else len(self.columns)
        if self.covariance is not None and tuple(self.covariance.shape) != (q, m):
            raise ValueError(f"covariance must have shape ({q}, {m}), got {tuple(self.covariance.shape)}")
        if tuple(self.variance.shape) != (n,):
            raise ValueError(f"variance must have shape ({n},), got {tuple(self.variance.shape)}")
        if self.init_loss is not None:
            self.init_loss = torch.as_tensor(self.init_loss)
            if tuple(self.init_loss.shape) != (n,):
                raise ValueError(f"init_loss must have shape ({n},), got {tuple(self.init_loss.shape)}")
        if self.labels is not None:
            self.labels = as_labels(self.labels, n)
        if self.visits is not None:
            self.visits = torch.as_tensor(self.visits)
            if tuple(self.visits.shape) != (n,):
                raise ValueError(f"visits must have shape ({n},), got {tuple(self.visits.shape)}")
        if self.token_positions is not None:
            self.token_positions = torch.as_tensor(self.token_positions, dtype=torch.long)
            if tuple(self.token_positions.shape) != (n, 2):
                raise ValueError(f"token_positions must have shape ({n}, 2) (batch index, target position), got "
                                 f"{tuple(self.token_positions.shape)}")
        if self.input_ids is not None:
            self.input_ids = torch.as_tensor(self.input_ids)
            if self.input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [num_sequences, T + 1], got shape {tuple(self.input_ids.shape)}")
        if self.sample_ids is not None and len(self.sample_ids) != n:
            raise ValueError(f"sample_ids must have length {n}, got {len(self.sample_ids)}")
        self._correlation: Optional[torch.Tensor] = None

    # -- derived quantities -----------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """n, the number of probe samples (columns of K)."""
        return self.mean.shape[0]

    @property
    def is_rectangular(self) -> bool:
        return self.rows is not None

    @property
    def is_diagonal(self) -> bool:
        """Only the per-sample mean and variance were kept (``mode="diagonal"``)."""
        return self.covariance is None

    def _need_covariance(self, what: str) -> torch.Tensor:
        if self.covariance is None:
            raise ValueError(f"{what} needs covariances, but this kernel kept only the per-sample variances "
                             "(mode='diagonal'); sample with mode='full', or mode='combined' with rows=")
        return self.covariance

    def subset(self) -> "LossKernel":
        """The square kernel over the samples a combined (or rectangular) kernel keeps in full:
        K̂[rows, rows], with their means, variances, labels, ids and losses at w*."""
        if self.rows is None:
            return self
        cov = self._need_covariance("subset()")
        rows = self.rows.cpu()
        if self.columns is None:
            cov = cov[:, self.rows.to(cov.device)]
        elif not torch.equal(self.columns.cpu(), rows):
            raise ValueError("subset() needs columns equal to rows")
        pick = lambda t: None if t is None else t[rows.to(t.device)]  # noqa: E731
        ids = self.sample_ids
        if ids is not None:
            ids = ids[rows] if isinstance(ids, torch.Tensor) else [ids[int(i)] for i in rows]
        return LossKernel(covariance=cov, mean=pick(self.mean), variance=pick(self.variance),
                          num_draws=self.num_draws, init_loss=pick(self.init_loss),
                          draws_per_chain=dict(self.draws_per_chain), rejected_per_chain=dict(self.rejected_per_chain),
                          sample_ids=ids, labels=pick(self.labels),
                          metadata={**self.metadata, "subset_of": self.num_samples, "subset_rows": rows.tolist()},
                          token_positions=pick(self.token_positions), input_ids=self.input_ids)

    @property
    def correlation(self) -> torch.Tensor:
        """R̂ = K̂(x,x') / √(K̂(x,x) K̂(x',x')), [n, n] (or [q, n]); 0 where a variance is 0."""
        if self._correlation is None:
            self._correlation = correlation_from_covariance(self._need_covariance("correlation"), self.variance,
                                                            self.rows, self.columns)
        return self._correlation

    @property
    def std(self) -> torch.Tensor:
        """√K̂(x, x), [n]."""
        return self.variance.clamp(min=0).sqrt()

    @property
    def trace(self) -> float:
        """Σ_i K̂(x_i, x_i): the empirical variance V of the paper's Appendix A.1.3 when the
        probe is the training set (2ν/β ≈ V, ν the singular fluctuation)."""
        return float(self.variance.sum())

    def cpu(self) -> "LossKernel":
        """A copy with every tensor on the CPU."""
        move = lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
        return LossKernel(
            covariance=move(self.covariance), mean=move(self.mean), variance=move(self.variance),
            num_draws=self.num_draws, init_loss=move(self.init_loss), rows=move(self.rows),
            columns=move(self.columns),
            draws_per_chain=dict(self.draws_per_chain),
            rejected_per_chain=dict(self.rejected_per_chain),
            sample_ids=move(self.sample_ids), labels=move(self.labels),
            metadata=dict(self.metadata), visits=move(self.visits),
            token_positions=move(self.token_positions), input_ids=move(self.input_ids),
            health_record=self.health_record,
        )

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: Union[str, Path]) -> Path:
        """Write the kernel (tensors bit-exact) and its metadata to ``path`` (a torch file),
        with a SHA-256 of everything in it that :meth:`load` verifies. Metadata keeps its
        types (NaN and ±Inf floats, int dict keys, tuples, tensors); numpy arrays are stored as
        lists, other objects as their repr.

        The file records its format version (and the devinterp-losskernel that wrote it), so a
        newer file is refused by name rather than misread. ``path`` must be a file path (an
        existing folder, or a regular file where a parent folder should be, is refused;
        missing parent folders are created); the file is written atomically (temp file, then
        rename): a failed save leaves the old file, and no temp file, behind."""
        k = self.cpu()
        sample_ids = k.sample_ids
        if sample_ids is not None and not isinstance(sample_ids, torch.Tensor):
            sample_ids = _storable_ids(sample_ids)
        payload = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "covariance": k.covariance,
            "mean": k.mean,
            "variance": k.variance,
            "num_draws": int(k.num_draws),
            "init_loss": k.init_loss,
            "rows": k.rows,
            "columns": k.columns,
            "draws_per_chain": {int(c): int(v) for c, v in k.draws_per_chain.items()},
            "rejected_per_chain": {int(c): int(v) for c, v in k.rejected_per_chain.items()},
            "sample_ids": sample_ids,
            "labels": k.labels,
            "visits": k.visits,
            "token_positions": k.token_positions,
            "input_ids": k.input_ids,
            "metadata": to_storable(k.metadata),
            "health_record": k.health_record,
        }
        return save_verified(payload, path)

    @classmethod
    def load(cls, path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> "LossKernel":
        """Read a kernel written by :meth:`save` (safe: no pickled code is executed). The
        file's checksum is verified: a damaged file raises
        :class:`~devinterp_losskernel.provenance.FileIntegrityError` naming it, and a file of a
        format version this release cannot read (a newer one) raises
        :class:`~devinterp_losskernel.provenance.FormatVersionError` saying which version of
        devinterp-losskernel wrote it."""
        location = torch.device(map_location) if isinstance(map_location, (str, torch.device)) else None
        if location is not None and location.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"map_location must be an available device: got {str(map_location)!r}, but "
                             "torch.cuda.is_available() is False here; use map_location='cpu'")
        payload = load_verified(path, kind=FORMAT, map_location=map_location,
                                require_checksum=lambda p: p.get("format_version", 1) >= 2,
                                versions=(OLDEST_FORMAT_VERSION, FORMAT_VERSION))
        if payload.get("format_version", 1) >= 2 and "metadata" not in payload:
            raise ValueError(f"{str(path)!r} is a LossKernel file without metadata")
        if payload.get("format_version", 1) >= 2:
            metadata = payload["metadata"]
        else:  # format 1: JSON metadata, no checksum
            metadata = json.loads(payload["metadata_json"])
        return cls(
            covariance=payload["covariance"], mean=payload["mean"], variance=payload["variance"],
            num_draws=payload["num_draws"], init_loss=payload["init_loss"], rows=payload["rows"],
            columns=payload.get("columns"),
            draws_per_chain=payload["draws_per_chain"],
            rejected_per_chain=payload["rejected_per_chain"],
            sample_ids=payload["sample_ids"], labels=payload["labels"],
            metadata=metadata, visits=payload.get("visits"),
            token_positions=payload.get("token_positions"), input_ids=payload.get("input_ids"),
            health_record=payload.get("health_record"),
        )

    def to_xarray(self):
        """An ``xarray.Dataset`` (the devinterp 2.x dialect).

        Every per-sample variable is on dim ``sample`` (all n probe samples; coordinate: the
        sample ids, else 0…n−1): ``mean`` μ̂(x), ``variance`` K̂(x,x), ``init_loss`` ℓ(x; w*),
        and the ``label`` coordinate. ``covariance`` K̂ and ``correlation`` R̂ are on
        (``sample``, ``sample_other``) for a square kernel — ``sample_other`` is the same n
        samples again, so ``ds.covariance.sel(sample=i, sample_other=j)`` reads K̂(x_i, x_j) —
        and on (``query``, ``sample_other``) for a rectangular or combined one, where ``query``
        holds the kernel's rows and ``sample_other`` its columns (both with their sample
        ids, and with ``query_index`` / ``sample_other_index`` the probe positions). A
        diagonal-mode kernel has no 2-D variables. ``draws_per_chain`` is on dim ``chain``.

        The metadata are attributes ``meta_<key>`` for reading by eye: str, bool, 32-bit int and
        float values (NaN and ±Inf included) as they are, others (None, lists, dicts) as JSON
        text, so the dataset writes to zarr and to netCDF alike. The attribute ``losskernel``
        holds every non-array field (metadata, rejected_per_chain, rows, …) as typed JSON,
        with its format version: :meth:`from_xarray` rebuilds the same kernel, every metadata
        type included, from this dataset or from one read back from zarr or netCDF. Needs the
        ``[xarray]`` extra (devinterp 2.x brings it)."""
        xr = require("xarray", "xarray", "LossKernel.to_xarray")

        k = self.cpu()
        n = k.num_samples
        ids = np.arange(n) if k.sample_ids is None else np.asarray(
            k.sample_ids.numpy() if isinstance(k.sample_ids, torch.Tensor) else k.sample_ids
        )
        coords = {"sample": ids}
        data_vars = {"mean": (("sample",), k.mean.numpy()), "variance": (("sample",), k.variance.numpy())}
        if k.init_loss is not None:
            data_vars["init_loss"] = (("sample",), k.init_loss.numpy())
        if k.visits is not None:
            data_vars["visits"] = (("sample",), k.visits.numpy())
        if k.labels is not None:
            coords["label"] = ("sample", k.labels.numpy())
        if k.token_positions is not None:  # devinterp's names: the row's sequence and target position
            coords["batch_index"] = ("sample", k.token_positions[:, 0].numpy())
            coords["target_position"] = ("sample", k.token_positions[:, 1].numpy())
        if k.input_ids is not None:  # devinterp's compute_bif output variable and dims
            data_vars["input_ids"] = (("batch", "position"), k.input_ids.numpy())
        if k.covariance is not None:
            square = k.rows is None and k.columns is None
            rows = np.arange(n) if k.rows is None else k.rows.numpy()
            columns = np.arange(n) if k.columns is None else k.columns.numpy()
            dims = ("sample", "sample_other") if square else ("query", "sample_other")
            data_vars["covariance"] = (dims, k.covariance.numpy())
            data_vars["correlation"] = (dims, k.correlation.numpy())
            coords["sample_other"] = ids[columns]
            if not square:
                coords.update(query=ids[rows], query_index=("query", rows),
                              sample_other_index=("sample_other", columns))
        if k.draws_per_chain:
            chains = sorted(k.draws_per_chain)
            coords["chain"] = np.asarray(chains)
            data_vars["draws_per_chain"] = (("chain",), np.asarray([k.draws_per_chain[c] for c in chains]))
        metadata = to_storable(k.metadata)
        fields = {
            "format": XARRAY_FORMAT, "format_version": XARRAY_FORMAT_VERSION,
            "written_by": f"devinterp-losskernel {package_version()}",
            "num_draws": int(k.num_draws), "metadata": metadata,
            "rows": None if k.rows is None else k.rows.tolist(),
            "columns": None if k.columns is None else k.columns.tolist(),
            "draws_per_chain": {int(c): int(v) for c, v in k.draws_per_chain.items()},
            "rejected_per_chain": {int(c): int(v) for c, v in k.rejected_per_chain.items()},
            "sample_ids": None if k.sample_ids is None else
            ("tensor" if isinstance(k.sample_ids, torch.Tensor) else list(k.sample_ids)),
        }
        attrs = {"num_draws": k.num_draws, "losskernel": to_typed_json(fields),
                 **{f"meta_{key}": _attribute(v) for key, v in metadata.items()}}
        attrs.update(_health_attributes(k))
        trace = (k.health_record or {}).get("trace") or {}
        if trace and k.draws_per_chain and set(trace) == set(k.draws_per_chain):
            chains = sorted(k.draws_per_chain)
            padded = np.full((len(chains), max(len(trace[c]) for c in chains)), np.nan)
            for i, c in enumerate(chains):
                padded[i, : len(trace[c])] = np.asarray(trace[c], dtype=np.float64)
            data_vars["probe_loss_trace"] = (("chain", "draw"), padded)  # L̄_probe(w_{c,t}), NaN past a chain's end
        return xr.Dataset(data_vars, coords=coords, attrs=attrs)

    @classmethod
    def from_xarray(cls, dataset) -> "LossKernel":
        """The kernel :meth:`to_xarray` made this dataset from (also after a round trip through
        ``to_zarr``/``open_zarr`` or ``to_netcdf``/``open_dataset``): the same tensors and the
        same metadata, types included (None, bool, int, NaN/±Inf floats, str, tuples, lists,
        nested and int-keyed dicts). A dataset of a newer export format is refused, saying
        which version of devinterp-losskernel wrote it."""
        xr = require("xarray", "xarray", "LossKernel.from_xarray")

        if not isinstance(dataset, xr.Dataset):
            raise TypeError(f"dataset must be an xarray.Dataset from LossKernel.to_xarray(), got "
                            f"{type(dataset).__name__}")
        text = dataset.attrs.get("losskernel")
        if not isinstance(text, str):
            raise ValueError("dataset must come from LossKernel.to_xarray(): it has no 'losskernel' attribute "
                             "(the kernel's fields as typed JSON)")
        try:
            fields = from_typed_json(text)
        except (ValueError, TypeError, AttributeError) as error:
            raise ValueError(f"dataset's 'losskernel' attribute is damaged: {error}") from None
        if not isinstance(fields, dict) or fields.get("format") != XARRAY_FORMAT:
            raise ValueError("dataset's 'losskernel' attribute is not a LossKernel.to_xarray() record")
        check_format_version(fields, "<dataset>", kind="LossKernel xarray", current=XARRAY_FORMAT_VERSION)
        tensor = lambda name: None if name not in dataset else torch.from_numpy(  # noqa: E731
            np.array(dataset[name].values))
        ids = fields["sample_ids"]
        if ids == "tensor":
            ids = torch.from_numpy(np.array(dataset["sample"].values))
        labels = torch.from_numpy(np.array(dataset["label"].values)) if "label" in dataset.coords else None
        as_index = lambda v: None if v is None else torch.tensor(v, dtype=torch.long)  # noqa: E731
        return cls(covariance=tensor("covariance"), mean=tensor("mean"), variance=tensor("variance"),
                   num_draws=fields["num_draws"], init_loss=tensor("init_loss"), rows=as_index(fields["rows"]),
                   columns=as_index(fields["columns"]), draws_per_chain=fields["draws_per_chain"],
                   rejected_per_chain=fields["rejected_per_chain"], sample_ids=ids, labels=labels,
                   metadata=fields["metadata"], visits=tensor("visits"),
                   token_positions=None if "target_position" not in dataset.coords else torch.stack([
                       torch.from_numpy(np.array(dataset[name].values)) for name in ("batch_index",
                                                                                      "target_position")], dim=1),
                   input_ids=tensor("input_ids"))

    def diagnostics(self, **thresholds):
        """The health report of the run behind this kernel: is it to be trusted?

        A :class:`~devinterp_losskernel.diagnostics.HealthReport` with ``ok``, ``problems``
        (sentences naming the setting to change and which way), ``notes``, ``judgeable`` and
        the ``numbers`` behind each verdict: the chains left the basin or did not move, trends,
        split-R̂, effective sample sizes of the probe-loss trace, and the split-half reliability
        of R̂ (of the variances for a diagonal kernel) with the draws a reliability of 0.9 needs.
        ``thresholds``: any of :data:`~devinterp_losskernel.diagnostics.THRESHOLDS` by name,
        ``chance_loss=``, ``nbeta=``. A kernel without a health record (an older file) gets
        ``judgeable=False`` saying why. See :func:`~devinterp_losskernel.diagnostics.diagnose`.
        """
        from .diagnostics import diagnose  # here: the report is read, not needed to build a kernel

        return diagnose(self, **thresholds)

    @classmethod
    def from_samples(cls, samples, observable: str = "probe", **kwargs) -> "LossKernel":
        """The exact kernel of a finished devinterp 2.x run (``sample()``, or ``llc()`` /
        ``bif()`` with ``output_path=``) from its stored per-draw losses of ``observable``,
        read one chunk of draws at a time (memory n², whatever the number of draws).

        Args:
            samples: what devinterp's ``sample()`` returned (an xarray DataTree), an
                ``xarray.Dataset`` of it, or the path of its zarr store.
            observable: the observable's name, as given to ``sample(observables={name: …})``.
            **kwargs: ``reduction="mean"|"sum"``, ``chains``, ``draws``, ``failed_chains``,
                ``dtype``, ``rows``, ``mode``, …, and devinterp's ``compute_bif`` options
                (``correlation_method="token"`` for the token-level kernel over (sequence,
                position) rows, ``reduce_chain_dimension_method``, ``loss_keys``,
                ``batch_index_range_1``/``_2``): see
                :func:`devinterp_losskernel.samples.kernel_from_samples`, which does the work.

        The health record (:meth:`diagnostics`) is read from the store in a second pass over it.
        """
        from .diagnostics import report_summary
        from .samples import kernel_from_samples, record_from_store  # here: samples.py imports this module

        kernel = kernel_from_samples(samples, observable, **kwargs)
        if kernel.health_record is None:  # the health report's trace and split halves: a second read
            try:
                kernel.health_record = record_from_store(samples, observable, kernel,
                                                         reduction=kwargs.get("reduction", "mean"))
            except Exception as error:  # the kernel is never lost to its report
                warnings.warn(f"from_samples: no health record ({type(error).__name__}: {error}); "
                              "kernel.diagnostics() will say it cannot judge the run", RuntimeWarning, stacklevel=2)
            kernel.metadata["diagnostics"] = report_summary(kernel)
        return kernel

    def __repr__(self) -> str:
        shape = "diagonal " + str(self.num_samples) if self.covariance is None else \
            "×".join(str(s) for s in self.covariance.shape)
        chains = len(self.draws_per_chain) or "?"
        return (
            f"LossKernel({shape}, num_draws={self.num_draws}, chains={chains}, "
            f"trace={self.trace:.4g}, dtype={self.variance.dtype}, device={self.variance.device})"
        )
