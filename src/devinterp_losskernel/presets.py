"""The paper's SGLD settings (Table 1, Appendix B) as named presets."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, Optional

__all__ = ["SGLDSettings", "PAPER_PRESETS", "preset"]

_SAMPLER_FIELDS = ("num_chains", "num_draws", "num_burnin_steps", "num_steps_bw_draws", "lr", "nbeta",
                   "localization")


def _int_at_least(name: str, value, low: int) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        kind = {0: "a non-negative int", 1: "a positive int"}.get(low, f"an int >= {low}")
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def _finite(name: str, value, *, positive: bool) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) \
            or (value <= 0 if positive else value < 0):
        kind = "a positive number" if positive else "a non-negative number"
        kind += " (finite: not NaN or Inf)"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


@dataclass(frozen=True)
class SGLDSettings:
    """The SGLD arguments of one run, in the paper's symbols — the one validated record of
    them: every preset, tutorial config, the demo and :func:`estimate_loss_kernel` go through
    it, and ``to_dict()`` is saved with every kernel and checkpoint.

    batch_size m (None where the loader sets it), num_chains C, num_draws T (per chain),
    num_burnin_steps b, lr ε, nbeta nβ (devinterp's inverse temperature, multiplying the
    mean minibatch loss), localization γ (None only in a preset that varies it),
    num_steps_bw_draws (thinning), seed (None: drawn at random by the run and recorded).
    Bad values (NaN, ±Inf, zero or negative where positive is needed) are refused at
    construction, naming the argument.
    """

    batch_size: Optional[int]
    num_chains: int
    num_draws: int
    num_burnin_steps: int
    lr: float
    nbeta: float
    localization: Optional[float]
    source: str = ""
    num_steps_bw_draws: int = 1
    seed: Optional[int] = None

    def __post_init__(self):
        if self.batch_size is not None:
            _int_at_least("batch_size", self.batch_size, 1)
        _int_at_least("num_chains", self.num_chains, 1)
        _int_at_least("num_draws", self.num_draws, 1)
        _int_at_least("num_burnin_steps", self.num_burnin_steps, 0)
        _int_at_least("num_steps_bw_draws", self.num_steps_bw_draws, 1)
        if self.num_chains * self.num_draws < 2:
            raise ValueError("num_chains * num_draws must be at least 2 for an unbiased covariance, got "
                             f"{self.num_chains} * {self.num_draws}")
        _finite("lr", self.lr, positive=True)
        _finite("nbeta", self.nbeta, positive=True)
        if self.localization is not None:
            _finite("localization", self.localization, positive=False)
        if self.seed is not None:
            _int_at_least("seed", self.seed, 0)

    @classmethod
    def from_config(cls, config: Any, **changes) -> "SGLDSettings":
        """The SGLD arguments read off any config with the fields ``num_chains, num_draws,
        num_burnin_steps, lr, nbeta, localization`` (and optionally ``num_steps_bw_draws``,
        ``batch_size``, ``seed``), with ``changes`` applied; validated."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(changes) - names)
        if unknown:  # a change that is not an SGLD setting would otherwise vanish without a word
            raise ValueError(f"SGLDSettings has no settings {unknown}; its fields are {sorted(names)}")
        values = {f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)}
        values.setdefault("batch_size", None)
        values.update(changes)
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def sampler_kwargs(self, **overrides) -> Dict:
        """Keyword arguments for :func:`estimate_loss_kernel` (batch size belongs to the
        loader), with ``overrides`` applied and validated."""
        settings = replace(self, **overrides)
        if settings.localization is None:
            raise ValueError(f"this preset varies localization ({self.source}); pass localization=")
        kwargs = {k: getattr(settings, k) for k in _SAMPLER_FIELDS
                  if k != "num_steps_bw_draws" or settings.num_steps_bw_draws != 1}
        if settings.seed is not None:
            kwargs["seed"] = settings.seed
        return kwargs

    def scaled(self, **changes) -> "SGLDSettings":
        """A copy with some settings changed (e.g. fewer draws for a CPU run); validated."""
        return replace(self, **changes)


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
