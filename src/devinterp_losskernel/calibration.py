"""A calibration sweep for a new model: short chains over a small grid of ε and γ, one
health report per setting, and the setting to use.

What devinterp's own ``sgld_calibration`` notebook does by eye — run short chains over a grid
of step sizes and localizations, plot the loss traces, keep a setting whose trace rises and
then stays flat — done in one call, with each setting judged by the kernel's health report
(:func:`devinterp_losskernel.diagnostics.diagnose`: basin, movement, stationarity, mixing,
chain agreement, split-half reliability of R̂) instead of by eye.

The default grid is placed by the model's own scale, so a model the sweep has not seen gets a
sensible one:

- γ: 1/√γ is the spread the localization allows each weight, so γ is set against the RMS of
  the weight matrices, γ = c / rms² for c in ``GAMMA_FACTORS`` (a spread of about 1, 0.3,
  0.1 and 0.03 weight RMS). The hand-tuned settings of the tutorials sit inside this range:
  γ = 200 for the digits MLP (rms 0.09: c ≈ 1.7) and γ = 10⁶ for the modular-arithmetic
  transformer (rms 0.015: c ≈ 240).
- ε: SGLD relaxes towards w* at rate εγ/2 per step, so a chain forgets its start in about
  2/(εγ) steps. ε = 2κ/γ for κ in ``STEP_FRACTIONS``: κ = 0.01 settles within a burn-in of
  about a hundred steps, κ = 0.1 in tens (the tutorials' hand-tuned κ: 0.03 for the digits
  MLP, 0.3 for the modular transformer, which thins by 3 steps).

Each setting runs :func:`~devinterp_losskernel.estimate.estimate_loss_kernel` with the same
seed (common random numbers: the settings differ by ε and γ, not by luck).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .presets import SGLDSettings
from .probe import check_loss_fn, default_loss_fn
from .progress import progress_bar
from .rng import leaves_rng_untouched
from .validation import check_positive_grid

__all__ = ["CalibrationResult", "CalibrationRow", "CalibrationSetting", "GAMMA_FACTORS",
           "STEP_FRACTIONS", "VARIANCE_RELIABILITY_MIN", "calibrate", "default_grid",
           "weight_rms"]

GAMMA_FACTORS: Tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)  # γ = c / rms²
STEP_FRACTIONS: Tuple[float, ...] = (0.01, 0.03, 0.1)  # κ = εγ/2
# The smallest split-half reliability of log K(x,x) (the report's ``reliability_variance``, even
# vs odd chains, projected to all the short run's draws) of a usable setting: the part of the
# kernel a short run can measure reproducibly (R̂'s own reliability needs the real run's draws).
# Measured on 2 chains × 100 draws (benchmarks/calibration_sweep.py, 2026-12-03): on the modular
# transformer every setting with PC1 AUC ≤ 0.54 had 0.38–0.72 (γ 1e5 ε 6e-7: 0.56, AUC 0.518, whose
# chains pass every other check), every setting with AUC ≥ 0.59 0.76–0.93 (hand-tuned γ 1e6: 0.87);
# on the digits MLP, tutorial 02 and the CNN 0.73–1.0 (the lowest, CNN ε 2e-4 γ 100: 0.73, AUC
# 0.934; digits ε 6e-4 γ 100: 0.75), the hand-tuned settings 0.83–0.89.
VARIANCE_RELIABILITY_MIN = 0.75


@dataclass(frozen=True)
class CalibrationSetting:
    """One point of the grid: ε (``lr``), γ (``localization``), nβ (``nbeta``)."""

    lr: float
    localization: float
    nbeta: float

    @property
    def label(self) -> str:
        return f"ε={self.lr:.2g} γ={self.localization:.2g}"

    def to_dict(self) -> Dict[str, float]:
        return {"lr": self.lr, "localization": self.localization, "nbeta": self.nbeta}


@dataclass
class CalibrationRow:
    """What one setting gave: the kernel's numbers, its health report, the probe-loss trace
    (mean probe loss per draw, [C, T]; NaN where a chain was cut off) and the kernel itself."""

    setting: CalibrationSetting
    numbers: Dict[str, float]
    ok: bool
    judgeable: bool
    problems: List[str]
    notes: List[str]
    trace: np.ndarray
    seconds: float
    kernel: Any = field(default=None, repr=False)
    usable: Optional[bool] = None  # a candidate for the real run (see recommend); None: same as ok

    def __post_init__(self):
        if self.usable is None:
            self.usable = self.ok

    def as_dict(self) -> Dict[str, Any]:
        """One flat table row: the setting, the headline numbers, the verdict."""
        return {**self.setting.to_dict(), **self.numbers, "ok": self.ok, "usable": self.usable,
                "judgeable": self.judgeable, "problems": " ".join(self.problems), "seconds": self.seconds}


@dataclass
class CalibrationResult:
    """The sweep: ``rows`` (one :class:`CalibrationRow` per setting, in grid order),
    ``recommended`` (a :class:`CalibrationSetting`, or None when no setting passed) and
    ``reason`` (a sentence saying why), plus the short-chain sizes every setting ran with."""

    rows: List[CalibrationRow]
    recommended: Optional[CalibrationSetting]
    reason: str
    sizes: Dict[str, int]

    def table(self):
        """The rows as a pandas DataFrame (a list of dicts when pandas is not installed)."""
        records = [row.as_dict() for row in self.rows]
        try:
            import pandas as pd
        except ImportError:
            return records
        return pd.DataFrame.from_records(records)

    def to_markdown(self) -> str:
        """The table as Markdown, the recommended row in bold."""
        head = ["ε", "γ", "nβ", "LLC", "loss at w*", "loss over draws", "ESS", "reliability", "verdict"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            n = row.numbers
            verdict = "ok" if row.ok else ("too few draws to judge" if not row.judgeable else
                                            "; ".join(_short(p) for p in row.problems))
            verdict = ("usable: " if row.usable else "") + verdict
            cells = [f"{row.setting.lr:.2g}", f"{row.setting.localization:.3g}", f"{row.setting.nbeta:.3g}",
                     _fmt(n.get("llc")), _fmt(n.get("loss_at_w_star")), _fmt(n.get("loss_over_draws")),
                     _fmt(n.get("ess")), _fmt(n.get("reliability")), verdict]
            if row.setting == self.recommended:
                cells = [f"**{c}**" for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def sgld(self, **changes) -> SGLDSettings:
        """The recommended setting as an :class:`SGLDSettings` for the real run, with the sweep's
        short-chain sizes unless ``changes`` give others (e.g. ``num_chains=8, num_draws=1000``)."""
        if self.recommended is None:
            raise ValueError(f"no setting is recommended: {self.reason}")
        values = {**self.sizes, **self.recommended.to_dict(), **changes}
        return SGLDSettings(batch_size=values.pop("batch_size", None), source="calibrate()", **values)

    def figure(self, path: Union[str, Path, None] = None):
        """Loss traces per setting (top) and the report's numbers per setting (bottom), the
        recommended setting starred; saved to ``path`` when given. Needs matplotlib."""
        from .extras import require

        figure = require("matplotlib.figure", "plot", "CalibrationResult.figure").Figure
        return _calibration_figure(self, figure, path)

    def __repr__(self) -> str:
        passed = sum(row.ok for row in self.rows)
        return (f"CalibrationResult({len(self.rows)} settings, {passed} ok, recommended="
                f"{self.recommended.label if self.recommended else None})")


def weight_rms(model: nn.Module) -> float:
    """RMS of the model's weight matrices (parameters with ≥ 2 dimensions; all parameters if
    it has none): the scale the localization's spread 1/√γ is compared with."""
    params = [p.detach().double().flatten() for p in model.parameters() if p.dim() >= 2]
    if not params:
        params = [p.detach().double().flatten() for p in model.parameters()]
    if not params:
        raise ValueError("model must have parameters to sample")
    values = torch.cat([p.cpu() for p in params])
    rms = float(values.pow(2).mean().sqrt())
    if not math.isfinite(rms) or rms <= 0:
        raise ValueError(f"model's weights must be finite and not all zero to place the default grid (RMS {rms}); "
                         "pass localizations= and lrs= yourself")
    return rms


def _round(value: float) -> float:
    """One significant figure: grids read as 3e-4, not 2.87e-4."""
    exponent = math.floor(math.log10(value))
    return float(round(value / 10**exponent) * 10**exponent)


def default_grid(model: nn.Module, localizations: Optional[Sequence[float]] = None,
                 lrs: Optional[Sequence[float]] = None) -> List[Tuple[float, float]]:
    """The (ε, γ) pairs of the sweep: γ = c / rms² (``GAMMA_FACTORS``) unless ``localizations``
    are given, and for each γ, ε = 2κ/γ (``STEP_FRACTIONS``) unless ``lrs`` are given (then
    every ε with every γ)."""
    if localizations is None:
        rms2 = weight_rms(model) ** 2
        localizations = [_round(c / rms2) for c in GAMMA_FACTORS]
    pairs = []
    for gamma in localizations:
        for lr in (lrs if lrs is not None else [_round(2 * k / gamma) for k in STEP_FRACTIONS]):
            pairs.append((float(lr), float(gamma)))
    return pairs


class _DrawRecorder:
    """The probe's per-sample loss, keeping every loss it returns: the callback's check and
    reference passes over the probe, then one pass per draw. Cut into passes of n once n is
    known, so that a kernel whose run kept no health record can still be judged from its draws."""

    def __init__(self, loss_fn: Callable):
        self.loss_fn = loss_fn
        self.parts: List[torch.Tensor] = []

    def __call__(self, model, batch):
        losses = self.loss_fn(model, batch)
        if isinstance(losses, torch.Tensor) and losses.dim() == 1:
            self.parts.append(losses.detach().float().cpu())
        return losses

    def draws(self, n: int, num_chains: int, draws_per_chain: Dict[int, int], num_draws: int
              ) -> Dict[int, torch.Tensor]:
        """{chain: losses [T, n]} of the draws: the last C·T passes, chains in order; {} when a
        chain was cut off (its evaluated and its kept draws differ) or the passes do not add up."""
        flat = torch.cat(self.parts) if self.parts else torch.zeros(0)
        kept = [int(draws_per_chain.get(c, 0)) for c in range(num_chains)]
        if flat.numel() % n or any(t != num_draws for t in kept) or flat.numel() // n < num_chains * num_draws:
            return {}
        passes = flat.reshape(-1, n)[-num_chains * num_draws:]
        return {c: passes[c * num_draws:(c + 1) * num_draws].double() for c in range(num_chains)}


def _traces(kernel, num_chains: int, num_draws: int) -> np.ndarray:
    """[C, T] of the mean probe loss per kept draw, from the kernel's health record; NaN where a
    chain has fewer draws."""
    out = np.full((num_chains, num_draws), np.nan)
    record = getattr(kernel, "health_record", None) or {}
    for c, trace in (record.get("trace") or {}).items():
        values = np.asarray(trace, dtype=float)[:num_draws]
        if 0 <= int(c) < num_chains:
            out[int(c), : len(values)] = values
    return out


def _chance_loss(probe, labels) -> Optional[float]:
    """log K, the cross-entropy of a classifier that knows nothing, when the probe is scored by
    the default loss as a classification with K = max label + 1 classes; else None."""
    from .probe import ProbeSet, default_loss_kind

    if labels is None:
        return None
    try:
        kind = default_loss_kind(next(iter(ProbeSet(probe).loader)))
    except Exception:  # the run itself names what is wrong with the probe
        return None
    if kind != "classification":
        return None
    return math.log(max(int(torch.as_tensor(labels).max()) + 1, 2))


def _with_health_record(kernel, recorder: _DrawRecorder, num_chains: int, num_draws: int):
    """The kernel, given a health record from the recorded draws if its run kept none."""
    if getattr(kernel, "health_record", None):
        return kernel
    from .diagnostics import record_from_draws

    draws = recorder.draws(kernel.num_samples, num_chains, dict(kernel.draws_per_chain), num_draws)
    if draws:
        kernel.health_record = record_from_draws(draws, expected_draws=num_draws)
    return kernel


def _diagnose(kernel, **thresholds):
    from .diagnostics import diagnose

    return diagnose(kernel, **thresholds)


def _usable(kernel, diverged: bool, **given) -> bool:
    """Whether a short run's setting is a candidate for the real run, by its health report:

    - no problem but the reliability of R̂ (short chains are expected to fall short of it; the
      real run's draws fix it, and its own report says how many it needs): the chains moved and
      settled (relaxations, LLC not negative), are stationary, agree and mix;
    - no loose-posterior note: the chains stay inside the basin on the model's own scale (the
      report's fluctuation ratio, and below chance when chance is known; a loose posterior is a
      choice to make on purpose, not a default to recommend);
    - log K(x,x) reproducible between halves of the short run: ``reliability_variance`` at least
      :data:`VARIANCE_RELIABILITY_MIN`.
    """
    if diverged:
        return False
    relaxed = _diagnose(kernel, reliability_min=0.0, **given)
    loose = any(note.startswith("loose posterior") for note in relaxed.notes)
    reliability = relaxed.numbers.get("reliability_variance", float("nan"))
    return (bool(relaxed.ok) and not loose
            and not (math.isfinite(reliability) and reliability < VARIANCE_RELIABILITY_MIN))


def _row(setting: CalibrationSetting, kernel, num_chains: int, num_draws: int, seconds: float,
         keep_kernel: bool, chance: Optional[float] = None) -> CalibrationRow:
    given = {} if chance is None else {"chance_loss": chance}
    report = _diagnose(kernel, **given)
    rn = {k: float(v) for k, v in dict(report.numbers).items() if isinstance(v, (int, float))}
    reliability = "reliability_variance" if kernel.covariance is None else "reliability_correlation"
    numbers = {
        "llc": float(kernel.metadata.get("llc/mean", float("nan"))),
        "loss_at_w_star": float(kernel.init_loss.double().mean()) if kernel.init_loss is not None else float("nan"),
        "loss_over_draws": float(kernel.mean.double().mean()),
        "ess": rn.get("ess_per_chain_min", float("nan")),
        "rhat": rn.get("split_rhat", float("nan")),
        "reliability": rn.get(reliability, float("nan")),
        "draws_for_reliability_0.9": rn.get("draws_for_target_reliability", float("nan")),
        **{f"report/{k}": v for k, v in rn.items()},
    }
    problems = list(report.problems)
    diverged = list(kernel.metadata.get("diverged_chains") or [])
    if diverged:  # the report judges the draws that were kept; a chain that blew up is a verdict too
        problems.insert(0, f"chains {diverged} diverged and were cut off (their probe loss blew up): lower lr (ε) "
                           "or raise localization (γ)")
    return CalibrationRow(setting, numbers, bool(report.ok) and not diverged, bool(report.judgeable), problems,
                          list(report.notes), _traces(kernel, num_chains, num_draws), seconds,
                          kernel if keep_kernel else None, usable=_usable(kernel, bool(diverged), **given))


def recommend(rows: Sequence[CalibrationRow]) -> Tuple[Optional[CalibrationSetting], str]:
    """The loosest localization (smallest γ) with a usable setting, and at that γ the smallest
    usable ε (SGLD's discretisation error grows with ε; usable already means the chains settle
    and mix: the README's digits MLP lost memorization AUC at larger ε, 0.94 → 0.87).

    Usable (:func:`_usable`): the health report finds nothing wrong but the reliability of R̂
    (which the real run's draws fix), gives no loose-posterior note (the chains stay inside the
    basin on the model's own scale) and log K(x,x) reproduces between halves of the short run.
    Why the loosest: the
    localization is the lever of what the kernel sees (tutorial 02's γ sweep: a weaker pull lets
    memorized fits break while shared features hold); the report stops it where the chains
    leave the basin, drift, disagree or stop mixing.
    """
    usable = [row for row in rows if row.usable]
    if not usable:
        judged = [row for row in rows if row.judgeable]
        if not judged:
            return None, ("no setting could be judged: the chains are too short for the report; "
                          "raise num_draws (or num_chains)")
        best = min(judged, key=lambda row: len(row.problems))
        told = " ".join(best.problems) or " ".join(best.notes)
        return None, f"no setting passed its health report; the closest, {best.setting.label}, was told: {told}"
    gamma = min(row.setting.localization for row in usable)
    best = min((row for row in usable if row.setting.localization == gamma), key=lambda row: row.setting.lr)
    n = best.numbers
    looser = sorted({row.setting.localization for row in rows if row.setting.localization < gamma})
    why_not_looser = (f" (every setting at γ = {', '.join(f'{g:.3g}' for g in looser)} failed)"
                      if looser else " (the loosest γ of the grid; a looser one may pass too)")
    needed = n.get("draws_for_reliability_0.9", float("nan"))
    more = (f"; for R̂ reproducible to 0.9 the real run needs about {int(math.ceil(needed)):,} draws in all"
            if math.isfinite(needed) else "")
    return best.setting, (
        f"{best.setting.label} is the loosest localization whose chains stay in the basin, stationary, agreeing "
        f"and mixing{why_not_looser}, at the smallest step size that does there: probe loss "
        f"{_fmt(n['loss_at_w_star'])} at w* → {_fmt(n['loss_over_draws'])} over the draws, LLC {_fmt(n['llc'])}, "
        f"ESS {_fmt(n['ess'])} per chain, split-half reliability {_fmt(n['reliability'])} in this short run{more}.")


def _refinement(rows: Sequence[CalibrationRow], recommended: Optional[CalibrationSetting]) -> List[Tuple[float, float]]:
    """(ε, γ) pairs halfway (geometrically) between the recommended γ and the next looser γ of
    the grid, which failed: γ' = √(γ·γ_looser), at the step fractions εγ/2 the recommended γ ran
    with. Empty when there is no looser γ or nothing was recommended."""
    if recommended is None:
        return []
    gamma = recommended.localization
    looser = [row.setting.localization for row in rows if row.setting.localization < gamma]
    if not looser:
        return []
    middle = _round(math.sqrt(gamma * max(looser)))
    if middle in {row.setting.localization for row in rows} or not max(looser) < middle < gamma:
        return []
    fractions = sorted({row.setting.lr * gamma / 2 for row in rows if row.setting.localization == gamma})
    return [(_round(2 * k / middle), middle) for k in fractions]


@leaves_rng_untouched
def calibrate(
    model: nn.Module,
    loader: DataLoader,
    probe,
    *,
    lrs: Optional[Sequence[float]] = None,
    localizations: Optional[Sequence[float]] = None,
    nbeta: Optional[float] = None,
    num_chains: int = 2,
    num_draws: int = 100,
    num_burnin_steps: int = 50,
    num_steps_bw_draws: int = 1,
    seed: int = 0,
    loss_fn: Optional[Callable] = None,
    evaluate: Optional[Callable] = None,
    labels=None,
    device=None,
    keep_kernels: bool = False,
    refine: bool = True,
    verbose: bool = True,
) -> CalibrationResult:
    """Run short chains at every (ε, γ) of a small grid and recommend one.

    Args:
        model, loader, probe, loss_fn, evaluate, labels, device: as for
            :func:`~devinterp_losskernel.estimate.estimate_loss_kernel`.
        lrs: the step sizes ε to try at every γ; default: ε = 2κ/γ for κ in
            ``STEP_FRACTIONS`` at each γ (see the module docstring).
        localizations: the γ to try; default: c / rms² of the weight matrices for c in
            ``GAMMA_FACTORS``.
        nbeta: nβ for every setting; default devinterp's ``default_nbeta(loader)``
            (batch size / log batch size).
        num_chains, num_draws, num_burnin_steps, num_steps_bw_draws, seed: the short chains,
            the same for every setting (same seed: the settings differ by ε and γ, not by
            luck). At least 2 chains (the report compares chains and halves).
        keep_kernels: keep each setting's kernel on its row (``row.kernel``).
        refine: when the grid's next looser γ failed, also try the γ halfway between
            (geometrically) at the recommended γ's step fractions, and recommend again.
        verbose: one progress bar over the settings.

    Returns:
        A :class:`CalibrationResult`: ``table()``, ``to_markdown()``, ``figure(path)``,
        ``recommended`` and ``reason``, ``sgld(num_chains=…, num_draws=…)`` for the real run.
    """
    from .estimate import estimate_loss_kernel

    # every argument is checked before anything is sampled
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(loader, DataLoader):
        raise TypeError(f"loader must be a torch DataLoader, got {type(loader).__name__}")
    lrs = None if lrs is None else check_positive_grid(lrs, "lrs")
    localizations = None if localizations is None else check_positive_grid(localizations, "localizations")
    if nbeta is None:
        from devinterp.utils import default_nbeta

        nbeta = float(default_nbeta(loader))
    if isinstance(num_chains, bool) or not isinstance(num_chains, int) or num_chains < 2:
        raise ValueError(f"num_chains must be an int ≥ 2 (the report compares chains), got {num_chains!r}")
    if seed is None:
        raise ValueError("seed must be an int ≥ 0: every setting runs with the same seed")
    check_loss_fn(loss_fn)
    sizes = dict(num_chains=num_chains, num_draws=num_draws, num_burnin_steps=num_burnin_steps,
                 num_steps_bw_draws=num_steps_bw_draws, seed=seed)
    pairs = default_grid(model, localizations, lrs)
    settings = [CalibrationSetting(lr, gamma, float(nbeta)) for lr, gamma in pairs]
    for s in settings:  # SGLDSettings names a bad nbeta, size or seed before any chain runs
        SGLDSettings(batch_size=None, lr=s.lr, nbeta=s.nbeta, localization=s.localization, **sizes)

    chance = _chance_loss(probe, labels) if loss_fn is None else None  # the recorder hides the default loss
    rows: List[CalibrationRow] = []
    bar = progress_bar(len(settings), "calibrating", unit="setting", disable=not verbose) if verbose else None

    def run(batch: Sequence[CalibrationSetting]) -> None:
        for s in batch:
            recorder = _DrawRecorder(loss_fn or default_loss_fn)
            started = time.perf_counter()
            kernel = estimate_loss_kernel(model, loader, probe, loss_fn=recorder, evaluate=evaluate, labels=labels,
                                          device=device, verbose=False, **sizes, **s.to_dict())
            kernel = _with_health_record(kernel, recorder, num_chains, num_draws)
            rows.append(_row(s, kernel, num_chains, num_draws, time.perf_counter() - started, keep_kernels,
                             chance))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(setting=s.label, verdict="usable" if rows[-1].usable else "flagged", refresh=False)

    try:
        run(settings)
        extra = _refinement(rows, recommend(rows)[0]) if refine else []
        if extra and bar is not None:
            bar.total += len(extra)
            bar.refresh()
        run([CalibrationSetting(lr, gamma, float(nbeta)) for lr, gamma in extra])
    finally:
        if bar is not None:
            bar.close()
    recommended, reason = recommend(rows)
    return CalibrationResult(rows, recommended, reason, sizes)


# --------------------------------------------------------------------------------------------
# the figure
# --------------------------------------------------------------------------------------------

def _fmt(value) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "–"
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.3g}"
    return f"{value:.1e}"


def _short(problem: str, limit: int = 60) -> str:
    first = problem.split(":")[0].split(";")[0].strip()
    return first if len(first) <= limit else first[: limit - 1] + "…"


_PANELS = (("loss_over_draws", "mean probe loss over draws", True), ("llc", "LLC (devinterp)", False),
           ("ess", "ESS of the probe loss", True), ("reliability", "split-half reliability of R̂", False))


def _calibration_figure(result: CalibrationResult, figure_class, path):
    rows = result.rows
    gammas = sorted({row.setting.localization for row in rows})
    lrs_at = {g: sorted(row.setting.lr for row in rows if row.setting.localization == g) for g in gammas}
    ncols = max(len(v) for v in lrs_at.values())
    fig = figure_class(figsize=(3.2 * max(ncols, 2) + 1, 2.2 * len(gammas) + 4.4), layout="constrained")
    grid = fig.add_gridspec(len(gammas) + 1, max(ncols, len(_PANELS)), height_ratios=[1] * len(gammas) + [2.0])
    for row in rows:
        i = gammas.index(row.setting.localization)
        j = lrs_at[row.setting.localization].index(row.setting.lr)
        ax = fig.add_subplot(grid[i, j])
        for c, chain in enumerate(row.trace):
            ax.plot(chain, lw=0.8, label=f"chain {c}")
        ax.axhline(row.numbers["loss_at_w_star"], color="k", ls=":", lw=0.8)
        if np.all(np.isfinite(row.trace)) and np.all(row.trace > 0):
            ax.set_yscale("log")
        star = " ★" if row.setting == result.recommended else ""
        verdict = "ok" if row.ok else (_short(row.problems[0], 34) if row.problems else "not judged")
        verdict = ("usable; " if row.usable and not row.ok else "") + verdict
        if row.ok and not row.usable:
            verdict = ("report ok, not a default: loose posterior" if any(n.startswith("loose posterior")
                       for n in row.notes) else f"K(x,x) reliability < {VARIANCE_RELIABILITY_MIN:g}")
        ax.set_title(f"{row.setting.label}{star}\n{verdict}", fontsize=8, color="green" if row.usable else "firebrick")
        ax.tick_params(labelsize=7)
        if j == 0:
            ax.set_ylabel("probe loss", fontsize=8)
        if i == len(gammas) - 1:
            ax.set_xlabel("draw", fontsize=8)
    rows = sorted(rows, key=lambda r: (r.setting.localization, r.setting.lr))
    labels = [f"ε {r.setting.lr:.1g}, γ {r.setting.localization:.2g}" for r in rows]
    colours = ["green" if r.usable else "firebrick" for r in rows]
    span = max(ncols, len(_PANELS)) // len(_PANELS)
    for p, (key, title, log) in enumerate(_PANELS):
        ax = fig.add_subplot(grid[len(gammas), p * span:(p + 1) * span])
        values = [r.numbers.get(key, float("nan")) for r in rows]
        ax.bar(range(len(rows)), [v if math.isfinite(v) else 0 for v in values], color=colours)
        if key == "loss_over_draws":
            ax.plot(range(len(rows)), [r.numbers["loss_at_w_star"] for r in rows], "k_", ms=10, label="at w*")
            ax.legend(fontsize=7)
        if log and all(math.isfinite(v) and v > 0 for v in values):
            ax.set_yscale("log")
        if result.recommended is not None:
            k = [r.setting for r in rows].index(result.recommended)
            ax.annotate("★", (k, values[k] if math.isfinite(values[k]) else 0), ha="center", va="bottom")
        ax.set_xticks(range(len(rows)), labels, fontsize=6, rotation=90)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("green: usable", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle("calibration sweep: " + (f"recommended {result.recommended.label} (★)" if result.recommended
                                          else "no setting passed"), fontsize=11)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
