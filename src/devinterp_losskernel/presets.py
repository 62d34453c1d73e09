"""The paper's SGLD settings (Table 1, Appendix B) as named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional

__all__ = ["SGLDSettings", "PAPER_PRESETS", "preset"]


@dataclass(frozen=True)
class SGLDSettings:
    """SGLD hyperparameters in the paper's symbols.

    batch_size m, num_chains C, num_draws T (per chain), num_burnin_steps b, lr ε,
    nbeta nβ (devinterp's inverse temperature, multiplying the mean minibatch loss),
    localization γ (None where the paper varies it).
    """

    batch_size: int
    num_chains: int
    num_draws: int
    num_burnin_steps: int
    lr: float
    nbeta: float
    localization: Optional[float]
    source: str = ""

    def sampler_kwargs(self, **overrides) -> Dict:
        """Keyword arguments for :func:`estimate_loss_kernel` (batch size belongs to the loader)."""
        kwargs = {k: v for k, v in asdict(self).items() if k not in ("batch_size", "source")}
        kwargs.update(overrides)
        if kwargs["localization"] is None:
            raise ValueError(f"this preset varies localization ({self.source}); pass localization=")
        return kwargs

    def scaled(self, **changes) -> "SGLDSettings":
        """A copy with some settings changed (e.g. fewer draws for a CPU run)."""
        values = asdict(self)
        values.update(changes)
        return SGLDSettings(**values)


PAPER_PRESETS: Dict[str, SGLDSettings] = {
    "modular_arithmetic": SGLDSettings(512, 30, 800, 200, 2e-7, 500.0, 30_000.0,
                                       "Table 1, Section 3: 2-layer transformer, mod 97"),
    "inception_imagenet": SGLDSettings(256, 15, 500, 100, 5e-5, 20.0, 4_000.0,
                                       "Table 1, Section 4: Inception-v1 on ImageNet"),
    "inception_mislabeled": SGLDSettings(256, 8, 1000, 100, 1e-5, 20.0, 4_000.0,
                                         "Table 1, Appendix D.4: 1,000 mislabelled ImageNet samples"),
    "inception_gamma_sweep": SGLDSettings(256, 5, 1200, 2000, 1e-4, 20.0, None,
                                          "Table 1, Appendix D.3: localization varied"),
}


def preset(name: str) -> SGLDSettings:
    """The named Table 1 preset, e.g. ``preset("inception_imagenet")``."""
    try:
        return PAPER_PRESETS[name]
    except KeyError:
        raise ValueError(f"name must be one of {sorted(PAPER_PRESETS)}, got {name!r}") from None
