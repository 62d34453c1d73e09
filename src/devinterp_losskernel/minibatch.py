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
minibatch. devinterp evaluates minibatches in train mode: with active dropout or train-mode
BatchNorm a sample's loss carries noise or depends on its batch-mates, so such models are
refused. ν = β/2 · Σ_i Var_w[ℓ(x_i; w)], β = nβ/N, is Watanabe's singular fluctuation when ℓ is
a negative log-likelihood (for an MSE loss with Gaussian noise of variance σ², divide by 2σ²:
``loss_scale=``).

Not yet here (issue 19 stays open): the devinterp 2 path (``micro_callback``), the ``llc()``
twin's default ν, ``estimate_loss_kernel(mode="minibatch")``, a ``LossKernel`` of mode
"minibatch" for the analyses, and the study against the exact diagonal mode.
"""

from __future__ import annotations

import itertools
import math
import warnings
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import Dataset

from .probe import LossFn, check_loss_fn, default_loss_fn
from .sample_moments import SampleMoments, merge_moments

__all__ = ["MinibatchMoments", "MinibatchVariance", "WithIndices"]

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


def _stochastic_modules(model: nn.Module) -> List[str]:
    """Modules whose train-mode forward makes a sample's loss noisy or batch-dependent."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            found.append(f"{name or 'model'} ({type(module).__name__}, p={module.p})")
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            found.append(f"{name or 'model'} ({type(module).__name__})")
    return found


class MinibatchMoments:
    """Per-chain per-sample moments of N training samples' minibatch losses, and what is derived
    from them: the merged moments, ν with a jackknife standard error over chains, devinterp 1.x
    style results and a ``LossKernel`` of mode "minibatch". The recorders for devinterp 1.x
    (:class:`MinibatchVariance`) and 2.x (``devinterp2.MinibatchVariance2``) feed it."""

    _missing_nbeta = "nbeta is unknown: the sampler's optimizer did not carry it"
    _no_losses = "no draws yet: pass the recorder as callbacks=[recorder] and evaluate=recorder.evaluate"

    def _start_moments(self, num_train: int, loss_scale: float, nbeta: Optional[float] = None) -> None:
        self.num_train = num_train
        self.loss_scale = float(loss_scale)
        self.nbeta = nbeta
        self.hyperparameters: Dict[str, float] = {} if nbeta is None else {"nbeta": float(nbeta)}
        self.chains: Dict[int, SampleMoments] = {}
        self.steps_per_chain: Dict[int, int] = {}  # post-burn-in steps folded, per chain
        self.fold_every = max(4 * num_train, 4096)  # losses buffered per chain before an O(N) update
        self._buffer: Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
        self._buffered: Dict[int, int] = {}

    def _add(self, chain: int, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """Buffer one minibatch's losses of ``chain``; fold when enough are buffered."""
        self._buffer.setdefault(chain, []).append((indices, losses))
        self._buffered[chain] = self._buffered.get(chain, 0) + len(indices)
        if self._buffered[chain] >= self.fold_every:
            self._fold(chain)

    def _fold(self, chain: int) -> None:
        """One O(N) update for a chain's buffered minibatches (amortised over many steps)."""
        buffer = self._buffer.pop(chain, [])
        self._buffered.pop(chain, None)
        if not buffer:
            return
        device = buffer[0][1].device
        moments = self.chains.get(chain) or SampleMoments.zeros(self.num_train, device)
        self.chains[chain] = moments.update(torch.cat([i.to(device) for i, _ in buffer]),
                                            torch.cat([v for _, v in buffer]))

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
        """ν = β/2 · Σ_i Var_w[ℓ(x_i)/loss_scale], β = nβ/N; the samples seen fewer than twice are
        filled with the mean variance of the others (N / N_seen extrapolation); NaN if none was."""
        if self.nbeta is None:
            raise ValueError(self._missing_nbeta)
        variance = (moments if moments is not None else self.moments()).variance() / self.loss_scale ** 2
        seen = ~torch.isnan(variance)
        if not bool(seen.any()):
            return float("nan")
        return float(self.nbeta / self.num_train / 2 * self.num_train * variance[seen].mean())

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
                   "visits": moments.count.cpu().numpy(), "unseen": int((moments.count < 2).sum())}
        if self.nbeta is not None:
            results["singular_fluctuation"] = self.singular_fluctuation(moments)
            results["singular_fluctuation_se"] = self.singular_fluctuation_se()
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
                    "method": MINIBATCH_METHOD, **self._kernel_metadata()}
        if self.nbeta is not None:
            metadata["singular_fluctuation"] = self.singular_fluctuation(moments)
            metadata["singular_fluctuation_se"] = self.singular_fluctuation_se()
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
        loss_scale: ν is reported for ℓ / ``loss_scale`` (e.g. 2σ² for an MSE loss with
            Gaussian noise of variance σ²), so that it is Watanabe's singular fluctuation.
    """

    def __init__(self, num_train: int, loss_fn: Optional[LossFn] = None, *, loss_scale: float = 1.0):
        if isinstance(num_train, bool) or not isinstance(num_train, int) or num_train < 2:
            raise ValueError(f"num_train must be the training-set size, an int >= 2, got {num_train!r}")
        check_loss_fn(loss_fn)
        if not (isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool)
                and math.isfinite(loss_scale) and loss_scale > 0):
            raise ValueError(f"loss_scale must be a positive number, got {loss_scale!r}")
        self._start_moments(num_train, loss_scale)
        self.loss_fn = loss_fn or default_loss_fn
        self.sampler_kind: Optional[str] = None  # how the loader draws minibatches, once seen
        self._pending: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self._checked_models: set = set()
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
        self._check_model(model)
        losses = self.loss_fn(model, inner)
        if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (len(indices),):
            got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"loss_fn must return per-sample losses [{len(indices)}], got {got}")
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= self.num_train):
            raise ValueError(f"the loader's sample indices must lie in [0, num_train={self.num_train}), got "
                             f"[{int(indices.min())}, {int(indices.max())}]: is num_train the training-set size?")
        self._pending.append((indices.detach(), losses.detach()))
        return losses.mean(), {}

    def _check_model(self, model: nn.Module) -> None:
        if id(model) in self._checked_models:
            return
        noisy = _stochastic_modules(model)
        if noisy:
            raise ValueError(
                "the minibatch losses are not draws of ℓ(x; w) for this model: devinterp evaluates minibatches in "
                f"train mode, where {', '.join(noisy[:3])} make a sample's loss noisy or depend on its batch-mates. "
                "Use a probe mode (LossKernelCallback(..., mode='diagonal'): eval-mode probe passes) instead")
        self._checked_models.add(id(model))

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
        if int(draw) == 0:
            pending = pending[-int(num_steps_bw_draws):]
        if not pending:
            return
        chain = int(chain)
        for indices, losses in pending:
            self._add(chain, indices, losses)
        self.steps_per_chain[chain] = self.steps_per_chain.get(chain, 0) + len(pending)

    def _check_sampler(self, loader) -> None:
        """Warn once about epoch-wise shuffling: a sample is evaluated just before a step that uses
        it, never just after, so its visits follow its own recent gradient steps — measured, ν came
        out 9% high at 103 visits a sample (benchmarks/RESULTS.md, minibatch study)."""
        if self.sampler_kind is not None or loader is None:
            return
        sampler = getattr(loader, "sampler", None)
        with_replacement = isinstance(sampler, torch.utils.data.RandomSampler) and sampler.replacement
        self.sampler_kind = "with replacement" if with_replacement else type(sampler).__name__
        if not with_replacement:
            warnings.warn(
                f"MinibatchVariance: the training loader draws its minibatches with a {type(sampler).__name__}, not "
                "with replacement; epoch-wise shuffling biases the per-sample variances up (ν +9% in the repository's "
                "study). For ν, pass DataLoader(WithIndices(train_set), batch_size=m, sampler=RandomSampler("
                "indexed, replacement=True))", RuntimeWarning, stacklevel=3)

    def finalize(self, *args, **kwargs) -> None:
        """Nothing is held back: every draw's interval is folded when the draw arrives."""

    def _kernel_metadata(self) -> Dict[str, Any]:
        return {"minibatch_sampler": self.sampler_kind}

    def __getstate__(self):
        raise TypeError("MinibatchVariance cannot be sent to worker processes (devinterp's cores > 1): each "
                        "worker would record into its own copy. Use cores=1.")

