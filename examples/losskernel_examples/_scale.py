"""The sizes and SGLD settings every tutorial run shares (the paper's symbols)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Optional

from devinterp_losskernel.presets import SGLDSettings


@dataclass(frozen=True, kw_only=True)
class SamplingScale:
    """Probe size n (``num_probe``; None means all of the probe data, where a tutorial
    allows it) and SGLD settings of one run: minibatch m (``batch_size``), C chains, T draws
    per chain, b burn-in steps, ε (``lr``), nβ, γ (``localization``); ``num_steps_bw_draws``
    thins each chain (a draw every so many steps, default every step).
    Each tutorial's scale class adds its own fields; all are keyword-only."""

    num_probe: Optional[int]
    num_chains: int
    num_draws: int
    num_burnin_steps: int
    batch_size: int
    lr: float
    nbeta: float
    localization: float
    num_steps_bw_draws: int = 1

    def __post_init__(self):
        SGLDSettings.from_config(self, seed=None)  # refuse bad SGLD values when the scale is made

    @property
    def sgld(self) -> SGLDSettings:
        """This scale's SGLD arguments as the one validated record."""
        return SGLDSettings.from_config(self, seed=None)

    def sampler_kwargs(self, **changes) -> Dict[str, Any]:
        """Keyword arguments for :func:`~devinterp_losskernel.estimate_loss_kernel`,
        with ``changes`` applied (e.g. another ``localization`` for a γ sweep)."""
        return sampler_kwargs(self, **changes)


def sampler_kwargs(settings: Any, **changes) -> Dict[str, Any]:
    """The SGLD arguments of :func:`~devinterp_losskernel.estimate_loss_kernel` read off any
    config with the fields ``num_chains, num_draws, num_burnin_steps, num_steps_bw_draws, lr,
    nbeta, localization`` (a :class:`SamplingScale`, the memorization tutorial's config), with
    ``changes`` applied — validated by the one SGLD record,
    :class:`~devinterp_losskernel.presets.SGLDSettings` (the seed stays the caller's)."""
    sgld_fields = {f.name for f in fields(SGLDSettings)} - {"seed"}
    sgld = SGLDSettings.from_config(settings, seed=None, **{k: v for k, v in changes.items() if k in sgld_fields})
    kwargs = dict(sgld.sampler_kwargs(), num_steps_bw_draws=sgld.num_steps_bw_draws)
    # the seed and every other estimate_loss_kernel argument (device, labels, …) pass through as given
    kwargs.update({k: v for k, v in changes.items() if k not in sgld_fields})
    return kwargs
