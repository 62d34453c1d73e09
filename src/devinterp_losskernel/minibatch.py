"""Minibatch mode, devinterp 1.x: per-sample loss variances of the whole training set from the
losses the sampler already computes (issue 19; a first slice — see the note at the end).

devinterp evaluates the minibatch's per-sample losses ℓ(x_i; w_t) at every SGLD step and
averages them for the gradient. :class:`MinibatchVariance` is both devinterp's ``evaluate``
(it returns that mean, so the chain is the one ``evaluate=lambda m, b: loss_fn(m, b).mean()``
gives, bit for bit) and a callback: at each draw it folds the per-sample losses of the steps
since the previous draw — every post-burn-in step, whatever ``num_steps_bw_draws`` — into
per-sample moments keyed by each sample's index in the training set
(:class:`~devinterp_losskernel.sample_moments.SampleMoments`), one set per chain. No extra
forward pass. The one line a user adds: the training data carries each sample's index
(:class:`WithIndices`); samples are never identified by hashing their inputs.

    recorder = MinibatchVariance(num_train=len(train_set))
    indexed = WithIndices(train_set)                  # the one added line: each item is (index, sample)
    loader = DataLoader(indexed, batch_size=64, sampler=RandomSampler(indexed, replacement=True))
    results = estimate_learning_coeff_with_summary(model, loader, evaluate=recorder.evaluate,
                                                   callbacks=[recorder], ...)
    results["minibatch/singular_fluctuation"], results["minibatch/variance"]  # ν, Var_w[ℓ(x_i)] [N]

What it measures: Var over the chain's states w_t of ℓ(x_i; w_t) at the steps where x_i was in the
minibatch. devinterp evaluates minibatches in train mode: with active dropout (modules, or
functional dropout such as ``nn.MultiheadAttention(dropout=0.1)``) or BatchNorm a sample's loss
carries noise or depends on its batch-mates, so such models are refused with the reason
(:func:`~devinterp_losskernel.validation.check_train_mode_noise`) unless
``allow_train_mode_noise=True``, which the results record. ν = β/2 · Σ_i Var_w[ℓ(x_i; w)] /
loss_scale, β = nβ/N, is Watanabe's singular fluctuation when ℓ is a negative log-likelihood
(``loss_scale=1``); for an MSE loss with Gaussian noise of variance σ², pass ``loss_scale=2σ²``
(ν is divided by it).

Minibatch order: a loader that draws with replacement (``RandomSampler(replacement=True)``, what
``estimate_loss_kernel(mode="minibatch")`` uses) makes a sample's visits independent of its own
recent gradient steps; epoch-wise shuffling does not, and biases ν up (see
``benchmarks/RESULTS.md``, minibatch study): the recorder warns about such a loader. The probe
modes' ``estimate_loss_kernel(..., train_variance=True)`` records beside the probe kernel from the
caller's own loader (:func:`indexed_loader`: the same minibatches from the same random numbers, so
the probe kernel and the LLC are those of the run without it) and warns likewise.
"""

from __future__ import annotations

import itertools
import math
import warnings
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .probe import LossFn, check_loss_fn, default_loss_fn
from .sample_moments import NU_MEANING, SampleMoments, merge_moments
from .validation import check_loss_scale, check_train_mode_noise

__all__ = ["MinibatchMoments", "MinibatchVariance", "WithIndices", "IndexedCollate", "loader_with_replacement",
           "indexed_loader"]

RESULT_PREFIX = "minibatch/"
MINIBATCH_METHOD = "minibatch: losses of the SGLD minibatches after burn-in, no extra forward pass"


class WithIndices(Dataset):
    """``dataset`` whose items come with their index: item i is ``(i, dataset[i])``, so a
    DataLoader's batch is ``(indices [B], batch)``."""

    def __init__(self, dataset):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset must be a map-style dataset (with __getitem__ and __len__), "
                            f"got {type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return index, self.dataset[index]

    def __getitems__(self, indices):
        """A whole batch in one call (torch >= 2.1's DataLoader fetches batches this way): the
        inner dataset's own ``__getitems__`` when it has one, else item by item; the same
        ``(index, sample)`` items as :meth:`__getitem__`, which :class:`IndexedCollate` collates
        without taking them apart again."""
        indices = list(indices)
        inner = getattr(self.dataset, "__getitems__", None)
        samples = list(inner(indices)) if callable(inner) else [self.dataset[i] for i in indices]
        return _IndexedItems(indices, samples)


class _IndexedItems(list):
    """:meth:`WithIndices.__getitems__`'s batch: a list of ``(index, sample)`` items (what any
    collate_fn expects) that also keeps the indices and the samples apart."""

    __slots__ = ("indices", "samples")

    def __init__(self, indices, samples):
        super().__init__(zip(indices, samples))
        self.indices, self.samples = indices, samples


class IndexedCollate:
    """Collate for :class:`WithIndices` items: ``(indices LongTensor [B], collate_fn(samples))``,
    so a loader keeps its own collate for the samples."""

    def __init__(self, collate_fn=None):
        self.collate_fn = collate_fn or torch.utils.data.default_collate

    def __call__(self, items):
        if isinstance(items, _IndexedItems):
            return torch.as_tensor(items.indices, dtype=torch.long), self.collate_fn(items.samples)
        return torch.as_tensor([i for i, _ in items], dtype=torch.long), self.collate_fn([x for _, x in items])


def loader_with_replacement(loader: DataLoader, seed: int) -> DataLoader:
    """The minibatch mode's own loader over ``loader``'s dataset: batches of ``loader.batch_size``
    samples drawn uniformly **with replacement** (each batch independent of the steps before it,
    so a sample's visits do not follow its own gradient steps, as they do under epoch-wise
    shuffling: the study measured ν biased up there), each item with its index; the loader's
    collate_fn, workers and pin_memory kept. Its draws come from its own generator seeded with
    ``seed``, never from the global one."""
    indexed = WithIndices(loader.dataset)
    generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(indexed, batch_size=loader.batch_size, drop_last=loader.drop_last,
                      sampler=torch.utils.data.RandomSampler(indexed, replacement=True, generator=generator),
                      collate_fn=IndexedCollate(loader.collate_fn), num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory, generator=generator)


def indexed_loader(loader: DataLoader) -> DataLoader:
    """``loader`` with each batch as ``(indices [B], batch)``: the same sampler (or batch sampler)
    object, generator, collate_fn, workers and pin_memory, so it draws the same minibatches from
    the same random numbers as ``loader`` itself (the probe modes' ``train_variance=True``: the
    chains stay the caller's chains, bit for bit). Needs a loader that batches (a ``batch_size``
    or a ``batch_sampler``) over a map-style dataset."""
    if loader.batch_sampler is None:
        raise ValueError("loader must batch its samples (batch_size= or batch_sampler=) for the training set's "
                         "per-sample losses; a loader with batch_size=None yields one item at a time")
    indexed = WithIndices(loader.dataset)
    workers = dict(num_workers=loader.num_workers, pin_memory=loader.pin_memory, timeout=loader.timeout,
                   worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context,
                   generator=loader.generator, persistent_workers=loader.persistent_workers)
    if loader.num_workers > 0:
        workers["prefetch_factor"] = loader.prefetch_factor
    if loader.batch_size is None:  # built with batch_sampler=
        return DataLoader(indexed, batch_sampler=loader.batch_sampler, collate_fn=IndexedCollate(loader.collate_fn),
                          **workers)
    return DataLoader(indexed, batch_size=loader.batch_size, drop_last=loader.drop_last, sampler=loader.sampler,
                      collate_fn=IndexedCollate(loader.collate_fn), **workers)


def sampler_kind(loader) -> Tuple[str, bool]:
    """How ``loader`` draws its minibatches, in words, and whether that is with replacement."""
    sampler = getattr(loader, "sampler", None)
    with_replacement = isinstance(sampler, torch.utils.data.RandomSampler) and sampler.replacement
    return ("with replacement" if with_replacement else type(sampler).__name__), with_replacement


def warn_shuffling(where: str, kind: str, stacklevel: int = 3) -> None:
    """The warning about a loader that does not draw with replacement (see :class:`MinibatchVariance`)."""
    warnings.warn(
        f"{where}: the training loader draws its minibatches with a {kind}, not with replacement; epoch-wise "
        "shuffling biases the per-sample variances up (ν +10–13% at 28–110 visits a sample, +5.6% at 221, in the "
        "repository's study; with replacement within ~1% from 110 visits). For ν, pass "
        "DataLoader(WithIndices(train_set), batch_size=m, sampler=RandomSampler(indexed, replacement=True))",
        RuntimeWarning, stacklevel=stacklevel + 1)


_LIVE_RECORDERS: "weakref.WeakValueDictionary[int, MinibatchVariance]" = weakref.WeakValueDictionary()
_TOKENS = itertools.count()


def _live_evaluate(token: int) -> "_RecorderEvaluate":
    recorder = _LIVE_RECORDERS.get(token)
    if recorder is None:
        raise RuntimeError("MinibatchVariance.evaluate was sent to another process (devinterp's cores > 1), where "
                           "its recorder does not exist: use cores=1")
    return _RecorderEvaluate(recorder)


class _RecorderEvaluate:
    """``recorder.evaluate`` as devinterp 1.x needs it: devinterp cloudpickles ``evaluate`` and
    loads it back even with ``cores=1``; a plain bound method would come back as a copy that
    records into a copy of the recorder. This handle pickles as a reference to the live one."""

    def __init__(self, recorder: "MinibatchVariance"):
        self.recorder = recorder

    def __call__(self, model: nn.Module, batch):
        return self.recorder._evaluate(model, batch)

    def __reduce__(self):
        return _live_evaluate, (self.recorder._token,)


class MinibatchMoments:
    """Per-chain per-sample moments of N training samples' minibatch losses, and what is derived
    from them: the merged moments, ν with a jackknife standard error over chains, devinterp 1.x
    style results and a ``LossKernel`` of mode "minibatch". The recorders for devinterp 1.x
    (:class:`MinibatchVariance`) and 2.x (``devinterp2.MinibatchVariance2``) feed it."""

    _missing_nbeta = "nbeta is unknown: the sampler's optimizer did not carry it"
    _no_losses = "no draws yet: pass the recorder as callbacks=[recorder] and evaluate=recorder.evaluate"

    def _start_moments(self, num_train: int, loss_scale: float, nbeta: Optional[float] = None,
                       allow_train_mode_noise: bool = False) -> None:
        self.num_train = num_train
        self.loss_scale = check_loss_scale(loss_scale)
        if not isinstance(allow_train_mode_noise, bool):
            raise TypeError(f"allow_train_mode_noise must be True or False, got {allow_train_mode_noise!r}")
        self.allow_train_mode_noise = allow_train_mode_noise
        self.train_mode_noise: List[str] = []  # what check_train_mode_noise found (recorded when allowed)
        self._checked_models: set = set()
        self.nbeta = nbeta
        self.hyperparameters: Dict[str, float] = {} if nbeta is None else {"nbeta": float(nbeta)}
        self.chains: Dict[int, SampleMoments] = {}
        self.steps_per_chain: Dict[int, int] = {}  # post-burn-in steps folded, per chain
        self.fold_every = max(4 * num_train, 4096)  # losses buffered per chain before an O(N) update
        self._buffer: Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
        self._buffered: Dict[int, int] = {}
        self.recorded = 0  # losses recorded so far, all chains (a progress bar's visits per sample)

    def _check_model(self, model: nn.Module) -> None:
        """Train-mode noise, once per model: refused, or recorded under the opt-in."""
        if id(model) in self._checked_models:
            return
        found = check_train_mode_noise(model, self.allow_train_mode_noise, where=type(self).__name__)
        self.train_mode_noise += [f for f in found if f not in self.train_mode_noise]
        self._checked_models.add(id(model))

    def _noise_record(self) -> Dict[str, Any]:
        """What the results say about train-mode noise."""
        return {"allow_train_mode_noise": self.allow_train_mode_noise,
                "train_mode_noise": "; ".join(self.train_mode_noise) or "none"}

    def _forget_chain(self, chain: int) -> None:
        """Leave a chain out (it diverged): its moments, steps and buffered losses."""
        for store in (self.chains, self.steps_per_chain, self._buffer, self._buffered):
            store.pop(chain, None)
        if hasattr(self, "_pending"):
            self._pending = []
        self._stash = None

    def _add(self, chain: int, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """Buffer one minibatch's losses of ``chain``; fold when enough are buffered."""
        size = len(indices)
        self.recorded += size  # losses so far (a progress bar's visits)
        buffer = self._buffer.get(chain)
        if buffer is None:
            buffer = self._buffer[chain] = []
        buffer.append((indices, losses))
        buffered = self._buffered[chain] = self._buffered.get(chain, 0) + size
        if buffered >= self.fold_every:
            self._fold(chain)

    def _check_indices(self, indices: torch.Tensor) -> None:
        """Refuse sample indices outside [0, N) (one reduction and one host sync: checked a fold
        at a time, not at every step)."""
        if indices.numel() == 0:
            return
        low, high = torch.stack(torch.aminmax(indices)).tolist()
        if low < 0 or high >= self.num_train:
            raise ValueError(f"the loader's sample indices must lie in [0, num_train={self.num_train}), got "
                             f"[{low}, {high}]: is num_train the training-set size?")

    def _fold(self, chain: int) -> None:
        """One O(N) update for a chain's buffered minibatches (amortised over many steps). Their
        indices are checked first: out of range, nothing is folded or dropped (the error recurs)."""
        buffer = self._buffer.get(chain)
        if not buffer:
            self._buffer.pop(chain, None)
            self._buffered.pop(chain, None)
            return
        device = buffer[0][1].device
        indices = torch.cat([i.to(device) for i, _ in buffer])
        self._check_indices(indices)
        del self._buffer[chain]
        self._buffered.pop(chain, None)
        moments = self.chains.get(chain) or SampleMoments.zeros(self.num_train, device)
        self.chains[chain] = moments.update(indices, torch.cat([v for _, v in buffer]))

    # -- results -------------------------------------------------------------------------------
    def moments(self, chains=None) -> SampleMoments:
        """The chains' moments merged (Chan), float64 [N]; all zero when none was recorded."""
        for chain in list(self._buffer):
            self._fold(chain)
        merged = None
        for chain in sorted(self.chains) if chains is None else chains:
            merged = self.chains[chain] if merged is None else merge_moments(merged, self.chains[chain])
        return merged if merged is not None else SampleMoments.zeros(self.num_train)

    def variance(self) -> torch.Tensor:
        """Var_w[ℓ(x_i)] [N], float64 (of ℓ, not ℓ / loss_scale); NaN where seen fewer than twice."""
        return self.moments().variance()

    def visits(self) -> torch.Tensor:
        """How many losses each sample's moments hold [N], int64."""
        return self.moments().count

    def singular_fluctuation(self, moments: Optional[SampleMoments] = None) -> float:
        """ν = β/2 · Σ_i Var_w[ℓ(x_i)] / loss_scale, β = nβ/N; the samples seen fewer than twice are
        filled with the mean variance of the others (N / N_seen extrapolation, the package's one
        rule: ``analysis.singular_fluctuation`` of :attr:`kernel` gives the same); NaN if none was.
        Watanabe's singular fluctuation when ℓ / loss_scale is a negative log-likelihood."""
        if self.nbeta is None:
            raise ValueError(self._missing_nbeta)
        variance = (moments if moments is not None else self.moments()).variance()
        seen = ~torch.isnan(variance)
        if not bool(seen.any()):
            return float("nan")
        return float(self.nbeta / self.num_train / 2 * self.num_train * variance[seen].mean() / self.loss_scale)

    def singular_fluctuation_se(self) -> float:
        """Standard error of ν, a jackknife over chains (leave one out; NaN with fewer than two)."""
        self.moments()  # folds what is buffered
        chains = sorted(self.chains)
        if len(chains) < 2:
            return float("nan")
        estimates = [self.singular_fluctuation(self.moments([c for c in chains if c != out])) for out in chains]
        c, mean = len(estimates), sum(estimates) / len(estimates)
        return math.sqrt((c - 1) / c * sum((e - mean) ** 2 for e in estimates))

    def get_results(self) -> Dict[str, Any]:
        """devinterp 1.x dialect: ``minibatch/variance`` and ``/mean`` [N], ``/visits`` [N],
        ``/unseen`` (samples seen fewer than twice), ``/singular_fluctuation`` ν and
        ``/singular_fluctuation_se`` (when nβ is known)."""
        if not self.chains and not self._buffer:  # said beside devinterp's results, which are not lost to it
            return {RESULT_PREFIX + "error": self._no_losses}
        moments = self.moments()
        results = {"variance": moments.variance().cpu().numpy(), "mean": moments.loss_mean().cpu().numpy(),
                   "visits": moments.count.cpu().numpy(), "unseen": int((moments.count < 2).sum()),
                   "loss_scale": self.loss_scale, **self._noise_record()}
        if self.nbeta is not None:
            results["singular_fluctuation"] = self.singular_fluctuation(moments)
            results["singular_fluctuation_se"] = self.singular_fluctuation_se()
            results["singular_fluctuation_meaning"] = NU_MEANING
        return {RESULT_PREFIX + key: value for key, value in results.items()}

    def _kernel_metadata(self) -> Dict[str, Any]:
        """What a recorder adds to its kernel's metadata."""
        return {}

    @property
    def kernel(self):
        """The :class:`~devinterp_losskernel.LossKernel` of mode "minibatch": mean and variance
        of every training sample's loss [N] (NaN where seen fewer than twice), ``visits`` [N],
        no covariances; ``metadata`` holds ν, its standard error and the number of unseen samples."""
        from .kernel import LossKernel

        moments = self.moments()
        if not self.chains:
            raise ValueError(self._no_losses)
        metadata = {"mode": "minibatch", "sampler": dict(self.hyperparameters), "num_train": self.num_train,
                    "loss_scale": self.loss_scale, "unseen": int((moments.count < 2).sum()),
                    "method": MINIBATCH_METHOD, **self._noise_record(), **self._kernel_metadata()}
        if self.nbeta is not None:
            metadata["singular_fluctuation"] = self.singular_fluctuation(moments)
            metadata["singular_fluctuation_se"] = self.singular_fluctuation_se()
            metadata["singular_fluctuation_meaning"] = NU_MEANING
        return LossKernel(covariance=None, mean=moments.loss_mean().cpu(), variance=moments.variance().cpu(),
                          num_draws=sum(self.steps_per_chain.values()), draws_per_chain=dict(self.steps_per_chain),
                          visits=moments.count.cpu(), metadata=metadata)


class MinibatchVariance(MinibatchMoments):
    """devinterp 1.x ``evaluate`` and callback in one: per-sample loss moments of all N
    training samples from the SGLD minibatches (see the module docstring).

    Args:
        num_train: N, the training-set size (the indices that :class:`WithIndices` gives).
        loss_fn: per-sample loss ``(model, batch) -> Tensor[B]``; by default cross-entropy for
            ``(inputs, targets)`` batches. The SGLD minibatch loss is its mean.
        loss_scale: s with ℓ = s · NLL + const; ν is divided by it (1 for a negative
            log-likelihood; 2σ² for an MSE loss with Gaussian noise of variance σ²), so that it is
            Watanabe's singular fluctuation. Recorded in the results.
        allow_train_mode_noise: record even for a model with active dropout or BatchNorm (refused
            otherwise, with the reason: its train-mode minibatch losses are not draws of ℓ(x; w));
            the results record the opt-in and what was found.
    """

    def __init__(self, num_train: int, loss_fn: Optional[LossFn] = None, *, loss_scale: float = 1.0,
                 allow_train_mode_noise: bool = False):
        if isinstance(num_train, bool) or not isinstance(num_train, int) or num_train < 2:
            raise ValueError(f"num_train must be the training-set size, an int >= 2, got {num_train!r}")
        check_loss_fn(loss_fn)
        self._start_moments(num_train, loss_scale, allow_train_mode_noise=allow_train_mode_noise)
        self.loss_fn = loss_fn or default_loss_fn
        self.sampler_kind: Optional[str] = None  # how the loader draws minibatches, once seen
        self._pending: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self._token = next(_TOKENS)
        _LIVE_RECORDERS[self._token] = self

    @property
    def evaluate(self) -> _RecorderEvaluate:
        """devinterp's ``evaluate(model, (indices, batch)) -> (mean loss, {})``, recording each
        sample's loss under its index."""
        return _RecorderEvaluate(self)

    # -- devinterp's evaluate -------------------------------------------------------------------
    def _evaluate(self, model: nn.Module, batch) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """The SGLD minibatch loss (the mean of ``loss_fn``), recording each sample's loss."""
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor)
                and batch[0].dim() == 1 and not batch[0].is_floating_point()):
            raise ValueError("the training loader must yield (indices, batch): wrap its dataset as "
                             "DataLoader(WithIndices(train_set), ...) so that each sample's loss is kept "
                             "under its index")
        indices, inner = batch
        if id(model) not in self._checked_models:  # the first minibatch of a model: its train-mode noise,
            self._check_model(model)                # and a wrong num_train refused at once, not at the fold
            self._check_indices(indices)
        losses = self.loss_fn(model, inner)
        if not isinstance(losses, torch.Tensor) or losses.shape != indices.shape:
            got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"loss_fn must return per-sample losses [{len(indices)}], got {got}")
        # the other minibatches' indices are checked a fold at a time (_fold: before anything is folded),
        # not here: a check at every step costs a reduction and, on a GPU, a host sync per step
        self._pending.append((indices, losses.detach()))
        return losses.mean(), {}

    # -- devinterp's callback (tensor bookkeeping only: draws on no random generator) ---------------
    def __call__(self, *, chain: int = 0, draw: int = 0, num_steps_bw_draws: int = 1, optimizer=None,
                 loader=None, **_ignored) -> None:
        """At each draw: fold the losses of the steps since the previous draw. At draw 0 the
        pending records also hold the burn-in steps (and devinterp's init-loss batches): only the
        last ``num_steps_bw_draws`` — the draw's own interval — are post-burn-in."""
        if self.nbeta is None and optimizer is not None and optimizer.param_groups:
            group = optimizer.param_groups[0]
            self.hyperparameters = {k: float(group[k]) for k in ("lr", "nbeta", "localization")
                                    if isinstance(group.get(k), (int, float)) and not isinstance(group.get(k), bool)}
            self.nbeta = self.hyperparameters.get("nbeta")
        self._check_sampler(loader)
        pending, self._pending = self._pending, []
        if draw == 0:
            pending = pending[-int(num_steps_bw_draws):]
        if not pending:
            return
        chain = int(chain)
        for indices, losses in pending:
            self._add(chain, indices, losses)
        self.steps_per_chain[chain] = self.steps_per_chain.get(chain, 0) + len(pending)

    def _check_sampler(self, loader) -> None:
        """Warn once about epoch-wise shuffling: a sample is evaluated just before a step that uses
        it, never just after, so its visits follow its own recent gradient steps — measured on the
        digits MLP against a converged reference, ν came out 10–13% high at 28–110 visits a sample and
        5.6% high at 221 (benchmarks/RESULTS.md, minibatch study)."""
        if self.sampler_kind is not None or loader is None:
            return
        self.sampler_kind, with_replacement = sampler_kind(loader)
        if not with_replacement:
            warn_shuffling("MinibatchVariance", self.sampler_kind, stacklevel=3)

    def finalize(self, *args, **kwargs) -> None:
        """Nothing is held back: every draw's interval is folded when the draw arrives."""

    def _kernel_metadata(self) -> Dict[str, Any]:
        return {"minibatch_sampler": self.sampler_kind}

    def __getstate__(self):
        raise TypeError("MinibatchVariance cannot be sent to worker processes (devinterp's cores > 1): each "
                        "worker would record into its own copy. Use cores=1.")



class StepRecorder(MinibatchMoments):
    """The minibatch mode of ``estimate_loss_kernel`` under devinterp 2: the package's evaluate
    hands each minibatch's per-sample losses to :meth:`keep`, and devinterp's ``micro_callback``
    (which names the step) folds them when ``step >= num_burnin_steps``: every post-burn-in step
    counts, whatever ``num_steps_bw_draws``. Tensor bookkeeping only: draws on no generator."""

    def __init__(self, num_train: int, *, num_burnin_steps: int, nbeta: float, loss_scale: float = 1.0,
                 allow_train_mode_noise: bool = False):
        self._start_moments(num_train, loss_scale, float(nbeta), allow_train_mode_noise=allow_train_mode_noise)
        self.num_burnin_steps = int(num_burnin_steps)
        self.sampler_kind = "with replacement"
        self._stash: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def keep(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        self._stash = (indices.detach(), losses.detach())

    def __call__(self, *, chain: int = 0, step: int = 0, **_ignored) -> None:
        stash, self._stash = self._stash, None
        if stash is None or int(step) < self.num_burnin_steps:
            return
        chain = int(chain)
        self._add(chain, *stash)
        self.steps_per_chain[chain] = self.steps_per_chain.get(chain, 0) + 1

    def _kernel_metadata(self) -> Dict[str, Any]:
        return {"minibatch_sampler": self.sampler_kind}
