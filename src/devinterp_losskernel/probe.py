"""The probe set and per-sample losses ℓ(x_i; w) on it.

A *probe* is the fixed set of n inputs whose losses are recorded at every SGLD draw. It
must yield the same samples in the same order every time. A *loss function* is any
``loss_fn(model, batch) -> Tensor[batch_size]`` of per-sample losses.

The probe forward pass runs in eval mode under no-grad, and the model's modes are restored
afterwards: in train mode BatchNorm would make a sample's loss depend on its batch-mates and
dropout would add noise that is not the posterior's.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    RandomSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

from .rng import leaves_rng_untouched

__all__ = [
    "LossFn",
    "ProbeSet",
    "classification_loss",
    "default_loss_fn",
    "evaluate_probe_losses",
    "eval_mode",
    "lm_sequence_loss",
    "move_to_device",
    "check_loss_fn",
    "default_loss_kind",
]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def _logits(output: Any) -> torch.Tensor:
    """Model outputs may be a tensor, a HF-style object with ``.logits``, or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot find logits in the model output of type {type(output).__name__}; "
        "pass loss_fn=(model, batch) -> Tensor[batch_size]"
    )


def class_targets(targets: torch.Tensor, name: str = "targets") -> torch.Tensor:
    """Class-index targets as int64: any integer or bool dtype, and floats that hold whole
    numbers (labels read from a CSV); anything else is refused, naming ``name``."""
    if not isinstance(targets, torch.Tensor):
        targets = torch.as_tensor(np.asarray(targets))
    if targets.dtype == torch.long:
        return targets
    if targets.is_floating_point():
        if not bool(torch.isfinite(targets).all()) or not bool((targets == targets.round()).all()):
            raise ValueError(
                f"{name} must be class indices (whole numbers), got float values such as "
                f"{targets.flatten()[:3].tolist()}; for soft or regression targets pass "
                "loss_fn=(model, batch) -> Tensor[batch_size]")
        return targets.long()
    if targets.is_complex():
        raise ValueError(f"{name} must be class indices, got dtype {targets.dtype}")
    return targets.long()


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    """Per-sample cross-entropy for ``(inputs, targets)`` batches: [B, C] logits → [B].
    Targets of any integer dtype (or whole-number floats) are taken as class indices."""
    inputs, targets = batch[0], class_targets(batch[1])
    logits = _logits(model(inputs))
    if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"the default loss_fn (cross-entropy) expects logits [batch_size, classes] = "
            f"[{targets.shape[0]}, C] for (inputs, targets) batches, got {tuple(logits.shape)}; "
            "pass loss_fn=(model, batch) -> Tensor[batch_size]")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
        raise ValueError(f"probe labels must be class indices in [0, {logits.shape[1]}) for a model with "
                         f"{logits.shape[1]} outputs, got values in [{int(targets.min())}, {int(targets.max())}]")
    # float64 logits stay float64 (a float64 model's losses keep their digits); half → float32
    return F.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), targets, reduction="none")


def lm_sequence_loss(model: nn.Module, batch: Mapping) -> torch.Tensor:
    """Mean next-token cross-entropy per sequence for ``{"input_ids": [B, T], ...}`` batches.

    Logits [B, T, V] at position t predict token t+1; positions where ``attention_mask`` is 0
    are ignored. Returns [B].
    """
    input_ids = batch["input_ids"]
    logits = _logits(model(input_ids)).float()
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(input_ids.shape):
        raise ValueError(
            f"the language-model loss expects logits [batch_size, seq_len, vocab] = {list(input_ids.shape)} + "
            f"[V] for input_ids {list(input_ids.shape)}, got {list(logits.shape)}; for a classifier give "
            "per-sample 'labels' [batch_size] in the batch, or pass loss_fn=(model, batch) -> Tensor[batch_size]")
    token_loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
    ).view(input_ids.shape[0], -1)
    mask = batch.get("attention_mask")
    if mask is None:
        return token_loss.mean(dim=1)
    mask = mask[:, 1:].to(token_loss.device, token_loss.dtype)  # devinterp 2 moves only input_ids
    return (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


_LOGIT_NAMES = {"logits", "outputs", "output", "preds", "pred", "predictions", "input", "y_pred", "scores"}
_TARGET_NAMES = {"targets", "target", "labels", "label", "y", "y_true"}


def check_loss_fn(loss_fn, name: str = "loss_fn") -> None:
    """Refuse what cannot be a ``loss_fn(model, batch) -> Tensor[batch_size]`` before any work:
    not callable, a torch loss module or a torch.nn.functional loss (they take
    ``(logits, targets)``, not ``(model, batch)``)."""
    if loss_fn is None:
        return
    if not callable(loss_fn):
        raise TypeError(f"{name} must be callable (model, batch) -> Tensor[batch_size], got {loss_fn!r}")
    example = ("Leave it as None for cross-entropy on (inputs, targets) batches, or pass e.g. "
               "lambda model, batch: F.cross_entropy(model(batch[0]), batch[1], reduction='none')")
    module = getattr(loss_fn, "__module__", "") or ""
    if isinstance(loss_fn, nn.Module) or module.startswith("torch.nn.functional") or module.startswith("torch._C"):
        raise TypeError(
            f"{name} must take (model, batch) and return per-sample losses [batch_size], but {loss_fn!r} takes "
            f"(logits, targets). {example}")
    try:
        signature = inspect.signature(loss_fn)
    except (TypeError, ValueError):  # builtins without a signature: judged when called
        return
    try:
        signature.bind(None, None)
    except TypeError:
        params = ", ".join(signature.parameters) or "no arguments"
        raise TypeError(f"{name} must be called as {name}(model, batch) -> Tensor[batch_size], but it takes "
                        f"({params}). {example}") from None
    first = [p.lower() for p in list(signature.parameters)[:2]]
    if len(first) == 2 and first[0] in _LOGIT_NAMES and first[1] in _TARGET_NAMES:
        raise TypeError(
            f"{name} must take (model, batch), but its parameters are named ({', '.join(first)}): it looks like "
            f"a (logits, targets) loss, which would be called with the model and a probe batch. {example}")


def default_loss_kind(batch) -> str:
    """Which loss :func:`default_loss_fn` takes for ``batch``: ``"classification"`` or
    ``"language_model"``; a batch it cannot take is refused by name (no model needed, so the
    callback checks its probe's first batch before any sampling)."""
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(
                f"the default loss_fn expects dict batches with 'input_ids', got keys "
                f"{sorted(batch)}; pass loss_fn=(model, batch) -> Tensor[batch_size]"
            )
        inputs, labels = batch["input_ids"], batch.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() == 1 and labels.shape[0] == batch_size_of(batch):
            return "classification"  # per-sample labels: a classifier
        if not isinstance(inputs, torch.Tensor) or inputs.is_floating_point() or inputs.dim() != 2:
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            dtype = f" {inputs.dtype}" if isinstance(inputs, torch.Tensor) else ""
            raise ValueError(
                f"batch['input_ids'] is{dtype} {shape}, not integer token ids [batch_size, seq_len]: for "
                "{'input_ids'} batches the default loss_fn is the language-model loss. For images or other "
                "inputs of a classifier, give the probe as (inputs, targets) (a tuple or a TensorDataset), or "
                "add per-sample 'labels' [batch_size] to each mapping, or pass loss_fn=(model, batch) -> "
                "Tensor[batch_size]")
        return "language_model"
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return "classification"
    raise ValueError(
        "the default loss_fn expects (inputs, targets) or {'input_ids': ...} batches, got "
        f"{type(batch).__name__}; pass loss_fn=(model, batch) -> Tensor[batch_size]"
    )


def default_loss_fn(model: nn.Module, batch) -> torch.Tensor:
    """The loss used when ``loss_fn`` is None, [B]:

    - ``(inputs, targets)``: cross-entropy of ``model(inputs)`` [B, C] on the class indices;
    - ``{"input_ids": x, "labels": y}`` with per-sample ``labels`` [B] (devinterp 2's batches
      for a classifier, images included): cross-entropy of ``model(x)`` on ``y``;
    - ``{"input_ids": tokens [B, T]}`` (integer token ids): the mean next-token cross-entropy
      per sequence (:func:`lm_sequence_loss`).

    Anything else (e.g. float images as ``input_ids`` without labels) is refused by name
    (:func:`default_loss_kind`).
    """
    kind = default_loss_kind(batch)
    if kind == "language_model":
        return lm_sequence_loss(model, batch)
    if isinstance(batch, Mapping):
        return classification_loss(model, (batch["input_ids"], batch["labels"]))
    return classification_loss(model, batch)


def map_tensors(batch, fn):
    """``fn`` applied to every tensor of a (nested) batch: tensors, dicts, (named) tuples, lists."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({k: map_tensors(v, fn) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def move_to_device(batch, device: torch.device):
    """Move every tensor in a (nested) batch to ``device``."""
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True))


def to_channels_last(batch):
    """Every 4-D floating tensor of a (nested) batch in channels-last memory layout."""
    return map_tensors(batch, lambda t: t.contiguous(memory_format=torch.channels_last)
                       if t.dim() == 4 and t.is_floating_point() else t)


def cast_floating(batch, dtype: Optional[torch.dtype]):
    """Every floating tensor of a (nested) batch in ``dtype`` (a float64 model fed a float32
    probe); integer tensors (labels, token ids) are left alone."""
    if dtype is None:
        return batch
    return map_tensors(batch, lambda t: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t)


def as_tensors(batch):
    """numpy arrays (and, inside a tuple or dict, lists of numbers) of a probe as tensors."""
    if isinstance(batch, np.ndarray):
        return torch.as_tensor(batch)
    if isinstance(batch, Mapping):
        return {k: as_tensors(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(torch.as_tensor(np.asarray(v)) if isinstance(v, (np.ndarray, list)) else v for v in batch)
    return batch


def batch_size_of(batch) -> int:
    """Leading dimension of the first tensor in a batch."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, Mapping) else batch
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError(f"cannot tell the batch size of a {type(batch).__name__} with no tensors")


def _batch_nbytes(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.numel() * batch.element_size()
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else []
    return sum(_batch_nbytes(v) for v in values)


@contextmanager
def eval_mode(model: nn.Module):
    """Put every submodule in eval mode; restore each one's own mode on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


class ProbeSet:
    """The probe: n samples yielded in the same order every time.

    Args:
        probe: a DataLoader (must not shuffle), a Dataset, a tensor of inputs, a tuple of
            tensors (e.g. ``(inputs, targets)``), or a dict of tensors (``{"input_ids": …}``).
        batch_size: batch size when the probe is not already a DataLoader.
        cache_on_device: keep the probe's batches on the model's device after the first
            pass. ``"auto"`` does so when they fit in ``cache_limit_bytes``.
    """

    def __init__(
        self,
        probe,
        *,
        batch_size: int = 512,
        cache_on_device: Union[bool, str] = "auto",
        cache_limit_bytes: int = 2 * 2**30,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if cache_on_device not in (True, False, "auto"):
            raise ValueError(f"cache_on_device must be True, False or 'auto', got {cache_on_device!r}")
        self.loader = self._as_loader(probe, batch_size)
        self.cache_on_device = cache_on_device
        self.cache_limit_bytes = cache_limit_bytes
        self._cache: Optional[List[Any]] = None
        self._cache_device = None
        self._checked: Optional[Tuple[int, str]] = None
        self._reference_sums: Optional[torch.Tensor] = None

    @staticmethod
    def _as_loader(probe, batch_size: int):
        if isinstance(probe, DataLoader):
            _check_not_shuffled(probe)
            if probe.drop_last:
                raise ValueError("probe must yield every sample, but its DataLoader has drop_last=True "
                                 "(the last partial batch would be left out): pass drop_last=False")
            return probe
        if isinstance(probe, np.ndarray):
            probe = torch.as_tensor(probe)
        elif isinstance(probe, (Mapping, tuple)) or (isinstance(probe, list) and probe and all(
                isinstance(t, (torch.Tensor, np.ndarray)) for t in probe)):
            probe = as_tensors(probe)
        if isinstance(probe, torch.Tensor):
            return DataLoader(TensorDataset(probe), batch_size=batch_size, shuffle=False, generator=_own_generator(),
                              collate_fn=lambda rows: torch.stack([r[0] for r in rows]))
        if isinstance(probe, Mapping):
            return _DictBatches(probe, batch_size)
        if isinstance(probe, (tuple, list)) and probe and all(isinstance(t, torch.Tensor) for t in probe):
            lengths = [len(t) if t.dim() else 0 for t in probe]
            if len(set(lengths)) > 1:
                raise ValueError(f"probe's tensors must share their first dimension (one row per sample), "
                                 f"got lengths {lengths}")
            return DataLoader(TensorDataset(*probe), batch_size=batch_size, shuffle=False, generator=_own_generator())
        if isinstance(probe, list) and probe and _looks_like_a_batch(probe[0]):
            raise ValueError(
                "probe looks like a list of batches (its first item is a batch: its targets are a vector of "
                f"{len(probe[0][1])}, not one sample's); the probe is a sequence of samples. Pass the batches "
                "concatenated, e.g. (torch.cat(xs), torch.cat(ys)), or a DataLoader with shuffle=False")
        if isinstance(probe, Dataset) or hasattr(probe, "__getitem__") and hasattr(probe, "__len__"):
            return DataLoader(probe, batch_size=batch_size, shuffle=False, generator=_own_generator())
        raise TypeError(
            "probe must be a DataLoader, Dataset, tensor, tuple of tensors or dict of tensors, "
            f"got {type(probe).__name__}"
        )

    @leaves_rng_untouched
    def fingerprint(self) -> Tuple[int, str]:
        """(n, fingerprint) of one pass over the probe, without a model: a SHA-256 of each
        batch's structure (keys, per-sample shapes, dtypes) and of every sample's sum and sum
        of squares per tensor, in order — so the same samples in another order, other samples
        of the same size, or other labels give another fingerprint."""
        n, digest, _sums = fingerprint_batches(self.loader)
        if n == 0:
            raise ValueError("probe is empty: it yielded no samples")
        return n, digest

    @leaves_rng_untouched
    def check_stable(self) -> Tuple[int, str]:
        """Pass over the probe twice and refuse one that yields its samples in another order
        (or other samples) the second time; returns ``(n, fingerprint)``. Cached."""
        if self._checked is None:
            *first, sums = fingerprint_batches(self.loader)
            *second, _ = fingerprint_batches(self.loader)
            if first[0] == 0:
                raise ValueError("probe is empty: it yielded no samples")
            if first != second:
                raise ValueError(
                    "probe must yield the same samples in the same order every pass, but two passes "
                    f"differed ({first[0]} samples, fingerprint {first[1][:12]}…, then {second[0]}, "
                    f"{second[1][:12]}…): a shuffling sampler or a random transform? Pass a "
                    "DataLoader with shuffle=False and no random augmentation, or the tensors themselves")
            bad = ~torch.isfinite(sums).all(dim=1)
            if bool(bad.any()):  # their losses would be NaN at every draw: found now, not after sampling
                where = torch.nonzero(bad).flatten()[:5].tolist()
                raise ValueError(
                    f"probe has NaN or Inf in the inputs of {int(bad.sum())} samples (e.g. probe indices {where}): "
                    "their losses would be non-finite at every draw, and the chains cut off as diverged after "
                    "sampling. Clean or drop those samples")
            self._checked = (first[0], first[1])
            self._reference_sums = sums
        return self._checked

    def batches(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> Iterator:
        """Yield the probe's batches on ``device`` (from the cache after the first pass), with
        floating tensors cast to ``dtype`` when given (the model's floating dtype)."""
        if self._cache is not None and self._cache_device == (device, dtype):
            yield from self._cache
            return
        fresh, total_bytes, keep = [], 0, self.cache_on_device is not False
        sums = [] if self._reference_sums is not None else None
        for batch in self.loader:
            if sums is not None:  # every pass from the loader is checked against the first
                sums.append(_sample_stats(batch, squares=False))
            batch = cast_floating(move_to_device(batch, device), dtype)
            if keep:
                total_bytes += _batch_nbytes(batch)
                if self.cache_on_device == "auto" and total_bytes > self.cache_limit_bytes:
                    keep, fresh = False, []
                else:
                    fresh.append(batch)
            yield batch
        if sums is not None:
            got = torch.cat(sums) if sums else torch.zeros(0, self._reference_sums.shape[1], dtype=torch.float64)
            if got.shape != self._reference_sums.shape or not torch.allclose(
                    got, self._reference_sums, rtol=0.0, atol=0.0, equal_nan=True):
                what = ("other samples or another order" if got.shape == self._reference_sums.shape
                        else f"{got.shape[0]} samples instead of {self._reference_sums.shape[0]}")
                raise ValueError(
                    "probe must yield the same samples in the same order every draw, but this pass "
                    f"yielded {what} "
                    "than the passes checked when the callback was made (a sampler that changes its "
                    "order between epochs, a random transform?). Pass a DataLoader with a fixed order")
        if keep:
            self._cache, self._cache_device = fresh, (device, dtype)


def _looks_like_a_batch(item) -> bool:
    """An ``(inputs, targets)`` item whose targets are a vector as long as its inputs: a batch."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        return False
    inputs, targets = item
    return (isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor) and inputs.dim() >= 2
            and targets.dim() == 1 and len(targets) == len(inputs) > 1)


def _own_generator() -> torch.Generator:
    """Our loaders' generator: iterating a DataLoader draws a base seed from its generator (the
    global one when it has none), which would shift the host's SGLD noise."""
    return torch.Generator().manual_seed(0)


_RANDOM_SAMPLERS = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)


def _check_not_shuffled(loader: DataLoader) -> None:
    """Refuse a loader whose sampler (or its batch sampler's) draws at random."""
    samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    for sampler in samplers:
        shuffles = isinstance(sampler, _RANDOM_SAMPLERS) or bool(getattr(sampler, "shuffle", False))
        if shuffles:
            raise ValueError(
                "probe must yield the same samples in the same order every draw, but its DataLoader "
                f"draws them with a {type(sampler).__name__}: pass a DataLoader with shuffle=False "
                "(for a subset, torch.utils.data.Subset with a fixed index list)")


def _leaves(value) -> List[Any]:
    """The leaves of a (nested) batch in a fixed order: tensors and other values."""
    if isinstance(value, Mapping):
        return [leaf for key in sorted(value, key=str) for leaf in _leaves(value[key])]
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def _structure(batch) -> str:
    """Keys, per-sample shapes and dtypes of a batch (not its batch size)."""
    def describe(value):
        if isinstance(value, Mapping):
            return "{" + ",".join(f"{k}:{describe(value[k])}" for k in sorted(value, key=str)) + "}"
        if isinstance(value, (tuple, list)):
            return "(" + ",".join(describe(v) for v in value) + ")"
        if isinstance(value, torch.Tensor):
            return f"{value.dtype}{tuple(value.shape[1:])}"
        return type(value).__name__
    return describe(batch)


def fingerprint_batches(batches) -> Tuple[int, str, torch.Tensor]:
    """(number of samples, fingerprint, per-sample sums [n, L]) of a sequence of batches: a
    SHA-256 of their structure (keys, per-sample shapes, dtypes) and of every sample's sum and
    sum of squares per tensor, in order. It does not depend on how the samples are batched."""
    structures, stats = [], []
    for batch in batches:
        structure = _structure(batch)
        if not structures or structures[-1] != structure:
            structures.append(structure)
        stats.append(_sample_stats(batch, squares=True))
    table = torch.cat(stats) if stats else torch.zeros(0, 0, dtype=torch.float64)
    h = hashlib.sha256("|".join(structures).encode())
    h.update(table.numpy().tobytes())
    return int(table.shape[0]), h.hexdigest()[:32], table[:, 0::2].clone()


def _sample_stats(batch, *, squares: bool) -> torch.Tensor:
    """[B, L] (or [B, 2L] with ``squares``) float64: each sample's sum (and sum of squares)
    of every tensor leaf of the batch, on the CPU."""
    size = batch_size_of(batch)
    columns = []
    for leaf in _leaves(batch):
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0 or leaf.shape[0] != size:
            continue
        flat = leaf.detach().reshape(size, -1)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(size, -1)
        if flat.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        columns.append(flat.sum(dim=1, dtype=torch.float64).cpu())
        if squares:
            columns.append(flat.double().square().sum(dim=1).cpu())
    return torch.stack(columns, dim=1) if columns else torch.zeros(size, 0, dtype=torch.float64)


class _DictBatches:
    """Batches of a dict of equal-length tensors, in order."""

    def __init__(self, data: Mapping, batch_size: int):
        lengths = {k: len(v) for k, v in data.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"probe dict tensors must share their first dimension, got {lengths}")
        self.data, self.batch_size = dict(data), batch_size
        self.n = next(iter(lengths.values()), 0)

    def __iter__(self):
        for start in range(0, self.n, self.batch_size):
            yield {k: v[start : start + self.batch_size] for k, v in self.data.items()}


@leaves_rng_untouched
def evaluate_probe_losses(
    model: nn.Module,
    probe: Union[ProbeSet, Any],
    loss_fn: Optional[LossFn] = None,
    *,
    device: Optional[torch.device] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    expected_num_samples: Optional[int] = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Per-sample losses ℓ(x_i; w) of ``model`` on every probe sample, [n], float32 or wider.

    Runs in eval mode under inference mode (no autograd) and restores the model's modes. ``autocast_dtype``
    (e.g. torch.bfloat16 on GPU) runs the forward passes under autocast; losses are cast
    to float32 before they are returned. ``channels_last=True`` (convolutional models) puts
    the model's 4-D weights and the probe's 4-D image batches [B, C, H, W] in channels-last
    memory layout, which cuDNN / oneDNN convolutions run faster on; the values are unchanged
    (the model keeps that layout afterwards, which SGLD's elementwise updates preserve).
    """
    probe = probe if isinstance(probe, ProbeSet) else ProbeSet(probe)
    loss_fn = loss_fn or default_loss_fn
    if device is None:
        device = _model_device(model)
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype is not None else nullcontext()
    )
    if channels_last:
        model.to(memory_format=torch.channels_last)
    pieces = []
    with eval_mode(model), torch.inference_mode(), autocast:
        for batch in probe.batches(device, _model_float_dtype(model)):
            size = batch_size_of(batch)
            if channels_last:
                batch = to_channels_last(batch)
            try:
                losses = loss_fn(model, batch)
            except (TypeError, RuntimeError, IndexError) as error:  # name what to change, not a raw torch error
                if isinstance(error, MemoryError) or "out of memory" in str(error):
                    raise
                raise ValueError(
                    f"the probe could not be evaluated: loss_fn(model, batch) raised {type(error).__name__}: "
                    f"{error}. loss_fn is called as loss_fn(model, batch) -> Tensor[batch_size] on probe "
                    f"batches of structure {_structure(batch)}; check that the probe's inputs fit the model "
                    "(shape, dtype) and that loss_fn takes (model, batch)") from error
            if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (size,):
                got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
                raise ValueError(
                    f"loss_fn must return per-sample losses of shape [batch_size] = [{size}], "
                    f"got {got} (a mean over the batch? use reduction='none')"
                )
            if not losses.is_floating_point():
                raise ValueError(
                    f"loss_fn must return floating-point losses, got dtype {losses.dtype} "
                    "(integer losses, e.g. 0/1 errors, have no meaningful covariance under SGLD "
                    "noise; return the float loss)")
            pieces.append(losses.detach().float() if losses.dtype in (torch.float16, torch.bfloat16)
                          else losses.detach())
    if not pieces:
        raise ValueError("probe is empty: it yielded no batches")
    losses = torch.cat(pieces)
    if expected_num_samples is not None and losses.shape[0] != expected_num_samples:
        raise ValueError(
            f"probe must yield the same {expected_num_samples} samples every draw, "
            f"but this pass yielded {losses.shape[0]}"
        )
    return losses


def _model_float_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the model's first floating parameter, or None."""
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def _model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")
