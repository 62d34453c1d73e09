"""One call: run devinterp's SGLD with the loss-kernel callback and return the kernel.

The LLC of the same run is carried in ``kernel.metadata`` (``llc/mean``, ``llc/std``,
``llc/per_chain``), so the kernel, its trace and the LLC all come from the same draws.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .callback import LossKernelCallback, devinterp_version
from .kernel import LossKernel
from .probe import LossFn, _model_device, default_loss_fn, move_to_device

__all__ = ["estimate_loss_kernel", "devinterp_major"]


def devinterp_major() -> int:
    """The installed devinterp's major version (1 or 2)."""
    version = devinterp_version()
    if version is None:
        raise ImportError("devinterp is not installed: pip install 'devinterp>=1.3,<3'")
    return int(version.split(".")[0])


def _check_positive(name: str, value, kind=int) -> None:
    if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive {kind.__name__}, got {value!r}")


def estimate_loss_kernel(
    model: nn.Module,
    loader: DataLoader,
    probe,
    *,
    num_chains: int,
    num_draws: int,
    num_burnin_steps: int,
    lr: float,
    nbeta: float,
    localization: float,
    num_steps_bw_draws: int = 1,
    loss_fn: Optional[LossFn] = None,
    evaluate: Optional[Callable] = None,
    device: Union[str, torch.device, None] = None,
    seed: Optional[int] = None,
    probe_batch_size: int = 512,
    sample_ids: Optional[Sequence] = None,
    labels: Optional[Sequence] = None,
    dtype: torch.dtype = torch.float64,
    verbose: bool = True,
    callback_kwargs: Optional[Dict[str, Any]] = None,
) -> LossKernel:
    """Sample C chains of SGLD around w* (``model``'s weights) and return the loss kernel.

    Args:
        model: the trained network at w*. It is not modified (devinterp copies it per chain).
        loader: training data for the SGLD gradient (its batch size is the paper's m).
        probe: the n probe samples (DataLoader without shuffling, Dataset, tensors, dict).
        num_chains, num_draws, num_burnin_steps: C, T (per chain), b.
        lr, nbeta, localization: ε, nβ, γ of devinterp's SGLD. See
            :data:`~devinterp_losskernel.presets.PAPER_PRESETS` for the paper's values, e.g.
            ``estimate_loss_kernel(m, loader, probe, **preset("inception_imagenet").sampler_kwargs())``.
        loss_fn: per-sample loss ``(model, batch) -> Tensor[batch_size]`` for the probe; by
            default cross-entropy / per-sequence LM loss.
        evaluate: devinterp ``evaluate(model, batch)`` for the SGLD minibatch loss; by default
            the mean of ``loss_fn`` over the batch.
        device: where to sample; default: the model's device.
        seed: seeds the chains (chain c gets a seed derived from ``seed``).
        callback_kwargs: extra :class:`LossKernelCallback` arguments (``block_size``, ``rows``,
            ``autocast_dtype``, …).

    Returns:
        The :class:`LossKernel`, with ``init_loss`` = ℓ(x; w*) and ``metadata`` holding the
        SGLD settings and devinterp's LLC of the same run (``llc/mean``, ``llc/std``,
        ``llc/per_chain``).
    """
    for name in ("num_chains", "num_draws", "num_steps_bw_draws"):
        _check_positive(name, locals()[name])
    if not isinstance(num_burnin_steps, int) or num_burnin_steps < 0:
        raise ValueError(f"num_burnin_steps must be a non-negative int, got {num_burnin_steps!r}")
    if num_chains * num_draws < 2:
        raise ValueError("num_chains * num_draws must be at least 2 for an unbiased covariance")
    for name in ("lr", "nbeta"):
        value = locals()[name]
        if not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not isinstance(localization, (int, float)) or localization < 0:
        raise ValueError(f"localization must be a non-negative number, got {localization!r}")
    if not isinstance(loader, DataLoader):
        raise TypeError(f"loader must be a torch DataLoader, got {type(loader).__name__}")

    major = devinterp_major()
    if major >= 2:
        _check_lm_loader(loader)
    device = torch.device(device) if device is not None else _model_device(model)
    # Work on a copy: devinterp 1.x evaluates the model at w* in train mode, which would
    # update the caller's BatchNorm running statistics.
    model = copy.deepcopy(model).to(device)
    per_sample = loss_fn or default_loss_fn
    if evaluate is None:
        def evaluate(model, batch):
            return per_sample(model, batch).mean()

    callback = LossKernelCallback(
        probe, loss_fn, dtype=dtype, batch_size=probe_batch_size,
        sample_ids=sample_ids, labels=labels,
        total_draws=num_chains * num_draws if verbose else None,
        **(callback_kwargs or {}),
    )
    callback.set_reference(model)  # ℓ(x; w*), before the sampler touches anything
    settings = dict(
        num_chains=num_chains, num_draws=num_draws, num_burnin_steps=num_burnin_steps,
        num_steps_bw_draws=num_steps_bw_draws, lr=lr, nbeta=nbeta, localization=localization,
        seed=seed, batch_size=loader.batch_size, num_train=len(loader.dataset),
    )
    run = _run_devinterp1 if major == 1 else _run_devinterp2
    llc = run(model, loader, callback, evaluate, settings, device)
    callback.finalize()
    callback.extra_metadata.update({"settings": settings, **llc})
    return callback.kernel


def _llc_summary(means: Sequence[float]) -> Dict[str, Any]:
    means = np.asarray(means, dtype=float)
    return {"llc/mean": float(means.mean()), "llc/std": float(means.std()), "llc/per_chain": means.tolist()}


def _loss_of(result) -> torch.Tensor:
    """The loss in whatever an ``evaluate`` returns: a tensor, (loss, …), {"loss": …}, .loss."""
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, (tuple, list)):
        return result[0]
    if isinstance(result, Mapping):
        return result["loss"]
    if hasattr(result, "loss"):
        return result.loss
    raise TypeError(f"evaluate must return a loss tensor, (loss, ...), or {{'loss': ...}}, got {type(result).__name__}")


def _minibatch_init_loss(model, loader, evaluate, s, device) -> float:
    """L_m(w*): the SGLD minibatch loss at w*, averaged over ``num_chains`` batches, as
    devinterp does, but reproducible (seeded batch order) and on a copy of the model, so
    that train-mode BatchNorm statistics of the model the chains start from are untouched."""
    work = copy.deepcopy(model).train()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0 if s["seed"] is None else int(s["seed"]))
        losses = [
            float(_loss_of(evaluate(work, move_to_device(batch, device))).mean())
            for _, batch in zip(range(s["num_chains"]), loader)
        ]
    # devinterp 1.x recomputes its own init loss when handed exactly 0.0
    return float(np.mean(losses)) or 1e-30


def _run_devinterp1(model, loader, callback, evaluate, s, device) -> Dict[str, Any]:
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary

    results = estimate_learning_coeff_with_summary(
        model, loader, callbacks=[callback], evaluate=evaluate,
        optimizer_kwargs=dict(lr=s["lr"], nbeta=s["nbeta"], localization=s["localization"]),
        num_draws=s["num_draws"], num_chains=s["num_chains"],
        num_burnin_steps=s["num_burnin_steps"], num_steps_bw_draws=s["num_steps_bw_draws"],
        seed=s["seed"], device=device, verbose=False, cores=1,
        init_loss=_minibatch_init_loss(model, loader, evaluate, s, device),
    )
    per_chain = [results[f"llc-chain/{c}"] for c in range(s["num_chains"])]
    summary = _llc_summary(per_chain)
    # devinterp's own numbers, as it reports them
    summary["llc/mean"] = float(results["llc/mean"])
    summary["llc/std"] = float(results["llc/std"])
    return summary


class _MinibatchLossRecorder:
    """Records the SGLD minibatch loss devinterp 2.x hands each callback, per chain."""

    def __init__(self):
        self.losses: Dict[int, list] = {}

    def __call__(self, *, loss, chain, **_):
        self.losses.setdefault(int(chain), []).append(float(loss.mean()))


def _check_lm_loader(loader: DataLoader) -> None:
    first = next(iter(loader))
    if not (isinstance(first, Mapping) and "input_ids" in first):
        raise ValueError(
            "loader must yield {'input_ids': ...} batches under devinterp 2.x, whose sampler "
            "feeds only language-model data; for other data install devinterp 1.3 "
            "(pip install 'devinterp>=1.3,<2') or call LossKernelCallback from your own loop"
        )


def _run_devinterp2(model, loader, callback, evaluate, s, device) -> Dict[str, Any]:
    from devinterp.optim import SGLD
    from devinterp.slt.sampler import sample_single_chain

    def evaluate2(model, batch):
        return _loss_of(evaluate(model, batch)), {}

    init_loss = _minibatch_init_loss(model, loader, evaluate, s, device)
    recorder = _MinibatchLossRecorder()
    seeds = np.random.SeedSequence(s["seed"]).generate_state(s["num_chains"]) if s["seed"] is not None else None
    for chain in range(s["num_chains"]):
        sample_single_chain(
            model, loader.dataset, evaluate2,
            param_masks={name: None for name, _ in model.named_parameters()},
            num_draws=s["num_draws"], num_burnin_steps=s["num_burnin_steps"],
            num_steps_bw_draws=s["num_steps_bw_draws"], sampling_method=SGLD,
            sampling_method_kwargs=dict(lr=s["lr"], nbeta=s["nbeta"], localization=s["localization"]),
            chain=chain, seed=None if seeds is None else int(seeds[chain]),
            dataloader_seed=None if seeds is None else int(seeds[chain]) + 1,
            device=str(device), callbacks=[callback, recorder], batch_size=loader.batch_size,
        )
    means = [s["nbeta"] * (np.mean(v) - init_loss) for _, v in sorted(recorder.losses.items())]
    return _llc_summary(means) if means else {}
