"""The sizes and SGLD settings every tutorial run shares (the paper's symbols)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict


@dataclass(frozen=True)
class SamplingScale:
    """Probe size n (``num_probe``) and SGLD settings of one run: minibatch m
    (``batch_size``), C chains, T draws per chain, b burn-in steps, ε (``lr``), nβ, γ
    (``localization``); ``num_steps_bw_draws`` thins each chain (a draw every so many steps).
    Each tutorial's scale class adds its own fields after these."""

    num_probe: int
    num_chains: int
    num_draws: int
    num_burnin_steps: int
    num_steps_bw_draws: int
    batch_size: int
    lr: float
    nbeta: float
    localization: float

    def sampler_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for :func:`~devinterp_losskernel.estimate_loss_kernel`."""
        return dict(num_chains=self.num_chains, num_draws=self.num_draws,
                    num_burnin_steps=self.num_burnin_steps, num_steps_bw_draws=self.num_steps_bw_draws,
                    lr=self.lr, nbeta=self.nbeta, localization=self.localization)
