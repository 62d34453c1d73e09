"""Can this kernel be trusted? A health report on the SGLD run behind every kernel.

Recorded during a run, at almost no cost (:class:`HealthRecorder`, fed each draw the kernel
folds in):

- the **trace** of the mean probe loss L̄_probe(w_{c,t}) = 1/n Σ_i ℓ(x_i; w_{c,t}) of every
  kept draw t of every chain c (C×T floats);
- **split-half moments**: the draws go to four groups, by chain parity (c mod 2) and by the
  half of its chain a draw falls in (t < T/2, or alternating blocks of
  :data:`UNKNOWN_T_BLOCK` draws when T is not known), and each group keeps the count, mean
  [n], the diagonal co-moment [n] and the co-moment of a fixed block of q ≤ :data:`BLOCK_ROWS`
  rows × m ≤ :data:`BLOCK_COLUMNS` columns of the probe (evenly spaced indices, no random
  numbers). Merged by chain parity they give two independent halves of the chains; merged by
  time, the first and second half of one chain. Whatever the kernel's mode (full,
  rectangular, diagonal), this is 4·(2n + q·m) floats.

Judged afterwards (:func:`diagnose`, ``kernel.diagnostics()``), each verdict with its numbers:

- **basin**, on the model's own scale: the fluctuation ratio h = nβ·Var_t(L̄_probe)/(E[L̄_probe]
  − L̄_probe(w*)) (≈ 1 in a tempered posterior inside one basin, whatever the loss scale), and the
  mean probe loss against chance, log(number of classes), for a classification cross-entropy with
  known labels. Above either with stationary, agreeing chains it is a *loose posterior* (a note:
  tutorial 02 uses one on purpose); with chains that drift or disagree, or too large a step, a
  problem.
- **movement**, on the sampler's own clock: the relaxation times (burn-in + draws)·εγ/2 the
  chains ran, and the sign of the LLC nβ(E_w[L̄_probe] − L̄_probe(w*)) (devinterp's ``llc/mean``
  when the run has it); without nβ or the schedule, the probe loss's rise relative to w*'s.
- **stationarity**: the change of each chain's trace from its first to its last third, in
  standard errors (each third's variance over its effective sample size).
- **agreement**: split-R̂ of the chains' traces (Gelman et al., BDA3 §11.4).
- **mixing**: per chain, the integrated autocorrelation time τ and the effective sample size
  T/τ of the trace (Geyer's initial positive sequence with the monotone bound).
- **reliability**: the correlation between the two halves of the per-sample log-variances
  log K̂(x,x) and of the off-diagonal R̂ entries of the block, projected to all draws with the
  Spearman–Brown formula, and the draws that would reach :data:`TARGET_RELIABILITY`.

Every threshold is a module constant with the measurement it came from
(``benchmarks/health_report.py``, ``benchmarks/RESULTS.md``); each can be overridden by name:
``kernel.diagnostics(rhat_max=1.05)``.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["HealthRecorder", "HealthReport", "THRESHOLDS", "diagnose", "effective_sample_size",
           "merge_health_records", "record_from_draws", "split_rhat", "spearman_brown"]

RECORD_VERSION = 1

# -- what is recorded --------------------------------------------------------------------------
BLOCK_ROWS = 64  # q: rows of R̂ whose split-half agreement is measured (64·m floats a group)
BLOCK_COLUMNS = 512  # m: their columns (all n when n ≤ 512): ≤ 32,768 R̂ entries
UNKNOWN_T_BLOCK = 32  # draws per time block when T (num_draws) is not known: halves alternate

# -- thresholds, each from benchmarks/health_report.py and its raw traces: the README's digits MLP
#    (400-sample probe, nβ 100, γ 200, 4 chains × 200 draws after 50 burn-in steps; "README" is
#    its ε = 3e-4 at chain seeds 0, 1, 2) and tutorial 02's Fashion-MNIST MLP (2,000 images,
#    ε 3e-4, 4 × 300 draws); the table is in benchmarks/RESULTS.md ---------------------------------
# Too few draws to judge: a third of a chain (the trend check) needs ≥ 10 draws for its ESS, and
# split-R̂ two halves of ≥ 15. The 2 × 8 run is below; every other run has 200 or 300.
MIN_DRAWS_PER_CHAIN = 30
# Chance: a classifier that knows nothing scores log(K) in cross-entropy. ε = 1e-2 sat at 13.0
# (5.6× chance), tutorial 02's loose γ = 20 at 7.0 (3.0×); every other run below 0.3× chance.
CHANCE_FRACTION_MAX = 1.0
# Left the basin, on the model's own scale: the fluctuation ratio h = nβ·Var_t(L̄_probe)/(E_t[L̄_probe]
# − L̄_probe(w*)), the within-chain variance of the probe-loss trace against its mean rise. In a
# tempered local posterior nβ(L − L*) is Gamma(λ, 1)-like (λ = d/2 for a regular basin, the LLC
# for a singular one): mean and variance both λ, so h ≈ 1 whatever the model's loss scale or size;
# h ≪ 1 when the localization, not the loss, shapes the draws (a tight posterior: fine). Measured
# (benchmarks/calibration_sweep.py, 2 chains × 100 draws, four models; RESULTS.md "Scale-free basin
# and movement checks"): every setting that kept its model's kernel quality 0.0002–3.2 (hand-tuned:
# digits MLP 1.02, tutorial 02 (γ 200) 0.65, modular 0.010, CNN 0.62; CNN ε 6e-4 γ 100 3.15, AUC 0.952);
# README ε 3e-4 (4 × 200) 0.35; chains outside the basin 7.98–256 (modular γ 4e4, loss 1e-4 →
# 0.79 at 0.15× chance: 21.8, PC1 AUC 0.516 vs 0.750 hand-tuned; modular γ 1e5 ε 2e-6: 7.98,
# 0.508; digits ε 2e-3 γ 100: 256, AUC 0.719; CNN ε 2e-3 γ 100: 34.6, 0.886; digits ε 7e-4 γ 300:
# 38, 0.872). Misses: digits ε 6e-4 γ 100 (23.9, AUC 0.948 — memorization scores
# survive a loose posterior; 0.4× chance, refused by the chance rule before this one existed), and
# the other way modular γ 1e5 ε 6e-7 (h 1.07, PC1 AUC 0.518: caught only by the sweep's
# VARIANCE_RELIABILITY_MIN). README ε 3e-3: 77 (a loose-posterior note, AUC 0.902); ε 1e-2: 209.
FLUCTUATION_RATIO_MAX = 5.0
# Not moved / not relaxed, on the sampler's own clock: SGLD pulls w back towards w* by εγ/2 per
# step, so the flattest directions (the ones a singular model has) reach their spread after about
# 2/(εγ) steps; "relaxations" = (burn-in + draws × steps between draws)·εγ/2 counts those times.
# Below 1 the chains cannot have left w*'s neighbourhood: ε = 1e-6 (README, γ 200): 0.025 (LLC
# −1.6, trend 8.7σ); digits γ 20 (ε 3e-4): 0.75 (still rising, 5.1σ). Settled: tutorial 02 γ 20
# 1.2; the sweep's κ = 0.01 settings 1.5; README 7.5; modular hand-tuned 45 (LLC 0.18: a small
# LLC is a narrow posterior, not a chain that did not move — the absolute LLC ≥ 2 this replaces
# refused the modular model's best kernel, and digits γ 1e5, AUC 0.946).
RELAXATIONS_MIN = 1.0
# A negative LLC (the draws' loss below w*'s: w* is not a local minimum, or the chains have not
# settled) is a problem at any scale. ε = 1e-6: −1.6; every other run measured > 0 (≥ 0.009).
LLC_MIN = 0.0
# Not moved, when neither nβ nor the schedule is known: the rise of the probe loss over its value
# at w*, relative to it. ε = 1e-6: 9%; README 117%; ε = 3e-3: 439%.
RELATIVE_RISE_MIN = 0.25
# Step size against localization: SGLD's step pulls w back towards w* by the fraction εγ/2 of its
# distance; the discretised Gaussian part then has variance 1/(γ(1 − εγ/4)) instead of 1/γ (33%
# too wide at εγ/2 = 0.5, 2× at 1). ε = 1e-2, γ = 200 (εγ/2 = 1.0) sat at probe loss 13.0, 5.6×
# chance, stationary; ε = 3e-3 (0.3) at 0.62–0.67; the README's ε = 3e-4 (0.03) at 0.25.
STEP_LOCALIZATION_MAX = 0.5
# Stationarity: |mean of the last third − mean of the first third| / its standard error, the
# largest over chains. Still climbing: ε = 1e-6 8.7, digits at γ = 20 (50 burn-in steps) 5.1;
# README 2.5, 1.7, 2.7; ε = 3e-3 1.8, 0.7; tutorial 02 γ = 200 1.6, γ = 20 1.3.
TREND_Z_MAX = 4.0
# Chains agree: split-R̂ of the traces. ε = 1e-6: 2.45; digits γ = 20: 1.24; README 1.091, 1.012,
# 1.099 (the classic 1.1 would fail the README run at seed 2); ε = 3e-3 1.003; tutorial 02 ≤ 1.007.
RHAT_MAX = 1.15
# Mixing: effective draws (Geyer) of the worst chain's trace. ε = 1e-6: 2.9 (τ = 69 draws); digits
# γ = 20: 4.8; README 14.9, 11.6, 12.2 (τ 13–17); ε = 3e-3 62, 77; tutorial 02 ≥ 110.
MIN_ESS_PER_CHAIN = 8.0
# Reliability of R̂ (of the log-variances, in diagonal mode) projected to all draws: ε = 1e-6 0.16,
# 2 × 8 0.18, digits γ = 20 0.35; README 0.61, 0.59, 0.62 (0.9 needs ~4,600 draws: said in a
# note); tutorial 02 γ = 200 0.72, γ = 20 0.84; ε = 3e-3 0.85, 0.86. log K(x,x): ≥ 0.83 everywhere.
RELIABILITY_MIN = 0.5
TARGET_RELIABILITY = 0.9  # what "draws needed" aims at
# Minibatch mode (per-sample variances of the whole training set from the SGLD minibatches):
# visits per sample. benchmarks/minibatch_study.py (digits MLP, N = 1,797, m = 64, 4 chains,
# minibatches drawn with replacement, against a pooled 8 × 1,600-draw exact reference): at 28
# visits ν/ν_ref = 1.066 ± 0.11 and Spearman 0.79; at 110 visits 0.991 ± 0.03, Spearman 0.85; at
# 221 1.011 ± 0.015, Spearman 0.88. From ~100 visits ν agrees with the reference within its SE.
MIN_MEDIAN_VISITS = 100
# ν's standard error (between chains) relative to ν: 0.11 at 28 visits, 0.03 at 110.
NU_RELATIVE_SE_MAX = 0.1

THRESHOLDS: Dict[str, float] = {
    "min_draws_per_chain": MIN_DRAWS_PER_CHAIN,
    "chance_fraction_max": CHANCE_FRACTION_MAX,
    "llc_min": LLC_MIN,
    "relative_rise_min": RELATIVE_RISE_MIN,
    "fluctuation_ratio_max": FLUCTUATION_RATIO_MAX,
    "relaxations_min": RELAXATIONS_MIN,
    "step_localization_max": STEP_LOCALIZATION_MAX,
    "trend_z_max": TREND_Z_MAX,
    "rhat_max": RHAT_MAX,
    "min_ess_per_chain": MIN_ESS_PER_CHAIN,
    "reliability_min": RELIABILITY_MIN,
    "target_reliability": TARGET_RELIABILITY,
    "min_median_visits": MIN_MEDIAN_VISITS,
    "nu_relative_se_max": NU_RELATIVE_SE_MAX,
}


# ============================================================================================
# Recording
# ============================================================================================
def block_indices(num_samples: int, size: int) -> torch.Tensor:
    """``min(size, n)`` evenly spaced sample indices in [0, n), int64 — deterministic, so every
    process and every resume picks the same block."""
    k = min(size, num_samples)
    return torch.div(torch.arange(k, dtype=torch.long) * num_samples, k, rounding_mode="floor")


def _empty_group(n: int, q: int, m: int, device) -> Dict[str, Any]:
    z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
    return {"count": 0, "mean": z(n), "m2_diag": z(n), "m2_block": z(q, m)}


def _merge_group(a: Dict[str, Any], b: Dict[str, Any], rows: torch.Tensor, cols: torch.Tensor) -> Dict[str, Any]:
    """Chan et al.'s pairwise merge of two groups' moments (a new dict; neither is changed):
    N = N_a + N_b, μ = μ_a + δ N_b/N, M2 = M2_a + M2_b + δδᵀ N_a N_b/N, δ = μ_b − μ_a."""
    na, nb = int(a["count"]), int(b["count"])
    if nb == 0:
        return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    if na == 0:
        return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
    device = a["mean"].device
    mb = b["mean"].to(device)
    total = na + nb
    delta = mb - a["mean"]
    weight = na * nb / total
    rows, cols = rows.to(device), cols.to(device)
    return {"count": total, "mean": a["mean"] + delta * (nb / total),
            "m2_diag": a["m2_diag"] + b["m2_diag"].to(device) + delta.square() * weight,
            "m2_block": a["m2_block"] + b["m2_block"].to(device) + torch.outer(delta[rows], delta[cols]) * weight}


def _block_group(block: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> Dict[str, Any]:
    """The moments of a block of draws [b, n] (float64), centred on its own mean."""
    mean = block.mean(dim=0)
    centred = block - mean
    return {"count": int(block.shape[0]), "mean": mean, "m2_diag": centred.square().sum(dim=0),
            "m2_block": centred[:, rows].T @ centred[:, cols]}


class HealthRecorder:
    """The split-half moments of a run's draws, fed as they are folded into the kernel.

    Args:
        num_samples: n, the probe size.
        expected_draws: T, the draws per chain, when known (the time halves are then
            t < T/2 and t ≥ T/2; otherwise alternating blocks of :data:`UNKNOWN_T_BLOCK` draws).
        device: where the moments live (moved to the draws' device on the first update).

    ``update(chain, position, losses)`` takes one draw ([n] or a block [b, n] of consecutive
    draws starting at ``position``, the draw's index among the chain's kept draws);
    :meth:`record` returns the moments (with the trace added by the caller) as plain tensors
    and numbers, the form kept in ``LossKernel.health_record``.
    """

    def __init__(self, num_samples: int, expected_draws: Optional[int] = None, device=None):
        self.num_samples = int(num_samples)
        self.expected_draws = expected_draws
        self.rows = block_indices(self.num_samples, BLOCK_ROWS)
        self.cols = block_indices(self.num_samples, BLOCK_COLUMNS)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.groups = [_empty_group(self.num_samples, len(self.rows), len(self.cols), self.device)
                       for _ in range(4)]
        self.time_split: Optional[str] = None
        self._rows_on: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # rows, cols on the draws' device

    def _time_half(self, position: int) -> int:
        if self.expected_draws:
            return int(2 * position >= self.expected_draws)
        return (position // UNKNOWN_T_BLOCK) % 2

    def _to(self, device: torch.device) -> None:
        if device != self.device:
            self.device = device
            self.groups = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in g.items()}
                           for g in self.groups]

    def update(self, chain: int, position: int, losses: torch.Tensor) -> None:
        """Fold draws of ``chain`` (losses [n] or [b, n], the first at kept-draw ``position``)."""
        block = losses.detach()
        block = block[None] if block.dim() == 1 else block
        self._to(block.device)
        block = block.to(torch.float64)
        self.time_split = self.time_split or (
            f"halves of num_draws={self.expected_draws}" if self.expected_draws else
            f"alternating blocks of {UNKNOWN_T_BLOCK} draws")
        if self._rows_on is None or self._rows_on[0].device != block.device:
            self._rows_on = (self.rows.to(block.device), self.cols.to(block.device))
        rows, cols = self._rows_on
        parity = 2 * (int(chain) % 2)
        if block.shape[0] == 1:  # one draw (the callback's case): Welford's update in place
            group = self.groups[parity + self._time_half(position)]
            x = block[0]
            group["count"] += 1
            delta = x - group["mean"]
            group["mean"].add_(delta, alpha=1.0 / group["count"])
            after = x - group["mean"]
            group["m2_diag"].addcmul_(delta, after)
            group["m2_block"].addr_(delta[rows], after[cols])
            return
        halves = torch.tensor([self._time_half(position + i) for i in range(block.shape[0])])
        for half in (0, 1):
            part = block[(halves == half).to(block.device)]
            if part.shape[0] == 0:
                continue
            g = parity + half
            self.groups[g] = _merge_group(self.groups[g], _block_group(part, rows, cols), rows, cols)

    def record(self) -> Dict[str, Any]:
        """The moments as CPU tensors (a copy): ``version``, ``block_rows`` [q], ``block_columns``
        [m], ``groups`` (4 dicts: count, mean [n], m2_diag [n], m2_block [q, m]; group
        2·(c mod 2) + half) and ``time_split``."""
        return {"version": RECORD_VERSION, "num_samples": self.num_samples,
                "block_rows": self.rows.clone(), "block_columns": self.cols.clone(),
                "time_split": self.time_split or "none",
                "groups": [{k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else int(v))
                            for k, v in g.items()} for g in self.groups]}

    def state_dict(self) -> Dict[str, Any]:
        return {**self.record(), "expected_draws": self.expected_draws}

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> "HealthRecorder":
        recorder = cls(int(state["num_samples"]), state.get("expected_draws"))
        recorder.groups = [{k: (v.clone() if isinstance(v, torch.Tensor) else int(v)) for k, v in g.items()}
                           for g in state["groups"]]
        recorder.time_split = None if state.get("time_split") in (None, "none") else state["time_split"]
        return recorder


def record_from_draws(chains: Mapping[int, torch.Tensor], expected_draws: Optional[int] = None) -> Dict[str, Any]:
    """The health record of draws held in memory: ``{chain: losses [T_c, n]}`` (as
    :func:`~devinterp_losskernel.loss_kernel` and ``LossKernel.from_samples`` see them)."""
    chains = {int(c): torch.as_tensor(v) for c, v in chains.items()}
    if not chains:
        raise ValueError("chains must hold at least one chain's draws")
    n = int(next(iter(chains.values())).shape[-1])
    if expected_draws is None:
        lengths = {int(v.shape[0]) for v in chains.values()}
        expected_draws = lengths.pop() if len(lengths) == 1 else None
    recorder = HealthRecorder(n, expected_draws)
    for chain, draws in chains.items():
        recorder.update(chain, 0, draws)
    return with_trace(recorder.record(), {c: v.double().mean(dim=1) for c, v in chains.items()})


def with_trace(record: Dict[str, Any], trace: Mapping[int, Sequence[float]]) -> Dict[str, Any]:
    """``record`` with the per-chain trace of mean probe losses, {chain: float64 [T_c]}."""
    return {**record, "trace": {int(c): torch.as_tensor(v, dtype=torch.float64).cpu().clone()
                                for c, v in trace.items()}}


def merge_health_records(records: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One record of the draws of several (of runs over distinct chains, e.g. one per
    process): traces side by side (a chain in two records is refused), moments merged
    exactly (Chan et al.)."""
    records = [r for r in records if r is not None]
    if not records:
        raise ValueError("records must hold at least one health record")
    first = records[0]
    for r in records[1:]:
        if r["num_samples"] != first["num_samples"] or not torch.equal(r["block_rows"], first["block_rows"]):
            raise ValueError("health records of different probes cannot be merged")
    trace: Dict[int, torch.Tensor] = {}
    for r in records:
        overlap = set(trace) & set(r.get("trace", {}))
        if overlap:
            raise ValueError(f"health records share chains {sorted(overlap)}: each chain's draws must be in one")
        trace.update(r.get("trace", {}))
    groups = first["groups"]
    for r in records[1:]:
        groups = [_merge_group(a, b, first["block_rows"], first["block_columns"]) for a, b in zip(groups, r["groups"])]
    return {**first, "groups": groups, "trace": trace}


# ============================================================================================
# Statistics of traces (float64 numpy)
# ============================================================================================
def _autocovariance(x: np.ndarray) -> np.ndarray:
    """The biased (1/T) autocovariance of x [T] at lags 0…T−1, by FFT."""
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    t = len(x)
    size = 1 << (2 * t - 1).bit_length()
    f = np.fft.rfft(x, size)
    return np.fft.irfft(f * np.conj(f), size)[:t] / t


def effective_sample_size(x: Sequence[float]) -> Tuple[float, float]:
    """(ESS, τ) of one trace x [T]: τ = 1 + 2 Σ_{t≥1} ρ_t summed with Geyer's (1992) initial
    positive sequence — pairs Γ_k = ρ_{2k} + ρ_{2k+1} while positive, made monotone — and
    ESS = T/τ (at most T·log10(T), as Stan bounds it). A constant trace gives (T, 1)."""
    x = np.asarray(x, dtype=np.float64)
    t = len(x)
    if t < 4:
        return float(t), 1.0
    acov = _autocovariance(x)
    if acov[0] <= 0:
        return float(t), 1.0
    rho = acov / acov[0]
    total, previous = 0.0, math.inf
    for k in range(t // 2):
        pair = rho[2 * k] + rho[2 * k + 1]
        if pair <= 0:
            break
        pair = min(pair, previous)
        total += pair
        previous = pair
    tau = max(2.0 * total - 1.0, 1.0 / math.log10(max(t, 10)))
    return t / tau, tau


def split_rhat(traces: Sequence[Sequence[float]]) -> float:
    """Split-R̂ (Gelman et al., BDA3 §11.4): each chain cut in two halves of ⌊T/2⌋ draws (the
    shortest chain sets T), then R̂ = √(((T'−1)/T' W + B/T') / W) over the 2C half-chains of T'
    draws, W the mean within-half variance, B/T' the variance of the half means. NaN when W is 0."""
    length = min(len(t) for t in traces)
    half = length // 2
    if half < 2:
        return math.nan
    parts = []
    for t in traces:
        t = np.asarray(t, dtype=np.float64)[:length]
        parts += [t[:half], t[length - half:]]
    parts = np.stack(parts)
    within = parts.var(axis=1, ddof=1).mean()
    between = parts.mean(axis=1).var(ddof=1) if len(parts) > 1 else 0.0
    if within <= 0:
        return math.nan
    return float(math.sqrt(((half - 1) / half * within + between) / within))


def _trend_z(trace: np.ndarray) -> float:
    """(mean of the last third − mean of the first third) / √(Var_a/ESS_a + Var_b/ESS_b)."""
    third = len(trace) // 3
    a, b = trace[:third], trace[len(trace) - third:]
    se2 = 0.0
    for part in (a, b):
        ess, _ = effective_sample_size(part)
        se2 += part.var(ddof=1) / max(ess, 1.0)
    diff = float(b.mean() - a.mean())
    if se2 <= 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / math.sqrt(se2)


def spearman_brown(r: float, factor: float) -> float:
    """The reliability of ``factor`` times as many draws as gave reliability r:
    factor·r / (1 + (factor − 1)·r).

    >>> round(spearman_brown(0.5, 2), 4)      # two halves that agree at 0.5: the whole run at 2/3
    0.6667
    """
    if not math.isfinite(r) or r <= 0:
        return r
    return factor * r / (1 + (factor - 1) * r)


def draws_for_reliability(r_half: float, half_draws: float, target: float) -> float:
    """Draws N that would reach reliability ``target`` when ``half_draws`` gave ``r_half``:
    N = half_draws · target(1 − r) / (r(1 − target)) (Spearman–Brown, inverted).

    >>> round(draws_for_reliability(0.5, 100, 0.9))   # halves of 100 draws agreeing at 0.5: 900 for 0.9
    900
    """
    if not math.isfinite(r_half) or r_half <= 0:
        return math.inf
    if r_half >= 1:
        return float(half_draws)
    return half_draws * target * (1 - r_half) / (r_half * (1 - target))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else math.nan


# ============================================================================================
# The report
# ============================================================================================
@dataclass
class HealthReport:
    """The verdict on a kernel's run.

    Attributes:
        ok: True when the run is judgeable and nothing is wrong (notes allowed).
        problems: plain sentences, each naming the setting to change and which way.
        notes: informational sentences (e.g. a loose posterior, reported for what it is).
        judgeable: False when the run has too few draws or chains (or no record) to judge,
            with the reason among ``problems``.
        numbers: the numbers behind each verdict (NaN where not known).
    """

    ok: bool
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    judgeable: bool = True
    numbers: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """Plain values (bool, lists of str, dict of floats) for metadata, JSON and xarray."""
        return {"ok": bool(self.ok), "judgeable": bool(self.judgeable), "problems": list(self.problems),
                "notes": list(self.notes), "numbers": {k: float(v) for k, v in self.numbers.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HealthReport":
        return cls(ok=bool(d["ok"]), problems=list(d.get("problems", [])), notes=list(d.get("notes", [])),
                   judgeable=bool(d.get("judgeable", True)), numbers=dict(d.get("numbers", {})))

    def __str__(self) -> str:
        head = "health report: " + ("OK" if self.ok else "not judgeable" if not self.judgeable else "PROBLEMS")
        lines = [head]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  note: {s}" for s in self.notes]
        if self.numbers:
            lines.append("  numbers: " + ", ".join(f"{k}={_fmt(v)}" for k, v in self.numbers.items()))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        colour = "#1a7f37" if self.ok else "#b35900" if not self.judgeable else "#c62828"
        verdict = "OK" if self.ok else "not judgeable" if not self.judgeable else "problems"
        items = "".join(f"<li><b>problem:</b> {html.escape(p)}</li>" for p in self.problems)
        items += "".join(f"<li><i>note:</i> {html.escape(s)}</li>" for s in self.notes)
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in self.numbers.items())
        return (f"<div><b>Health report: <span style='color:{colour}'>{verdict}</span></b>"
                f"<ul>{items}</ul><details><summary>numbers</summary><table>{rows}</table></details></div>")


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _check_thresholds(thresholds: Mapping[str, Any]) -> Dict[str, float]:
    from .validation import check_health_thresholds  # validation imports kernel.py

    return check_health_thresholds(thresholds, THRESHOLDS)


def _halves(record: Dict[str, Any], num_chains: int) -> Tuple[Optional[Tuple[dict, dict]], str]:
    """The two halves of the draws: by chain parity (≥ 2 chains), else first/second half in time."""
    g = record["groups"]
    rows, cols = record["block_rows"], record["block_columns"]
    if num_chains >= 2:
        a, b = _merge_group(g[0], g[1], rows, cols), _merge_group(g[2], g[3], rows, cols)
        how = "even vs odd chains"
    else:
        a, b = _merge_group(g[0], g[2], rows, cols), _merge_group(g[1], g[3], rows, cols)
        how = f"first vs second half of the draws ({record.get('time_split', '?')})"
    if a["count"] < 3 or b["count"] < 3:
        return None, how
    return (a, b), how


def _half_statistics(group: dict, rows: torch.Tensor, cols: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """(per-sample variances [n], off-diagonal R̂ entries of the block) of one half."""
    n1 = group["count"] - 1
    var = (group["m2_diag"] / n1).numpy()
    cov = (group["m2_block"] / n1).numpy()
    scale = np.sqrt(np.outer(var[rows.numpy()], var[cols.numpy()]))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(scale > 0, cov / np.where(scale > 0, scale, 1.0), 0.0)
    off = rows.numpy()[:, None] != cols.numpy()[None, :]
    return var, corr[off]


def _reliability(record: Dict[str, Any], num_chains: int, numbers: Dict[str, float]) -> Optional[str]:
    """Split-half reliabilities into ``numbers``; returns how the halves were made (None: too few)."""
    halves, how = _halves(record, num_chains)
    if halves is None:
        return None
    a, b = halves
    rows, cols = record["block_rows"], record["block_columns"]
    var_a, r_a = _half_statistics(a, rows, cols)
    var_b, r_b = _half_statistics(b, rows, cols)
    positive = (var_a > 0) & (var_b > 0)
    r_var = _pearson(np.log(var_a[positive]), np.log(var_b[positive])) if positive.sum() > 2 else math.nan
    r_corr = _pearson(r_a, r_b) if r_a.size > 2 else math.nan
    total = a["count"] + b["count"]
    half = 2 * a["count"] * b["count"] / total  # harmonic mean of the halves' draws
    factor = total / half
    numbers.update({
        "split_half_draws": float(half),
        "split_half_variance_r": r_var, "reliability_variance": spearman_brown(r_var, factor),
        "split_half_correlation_r": r_corr, "reliability_correlation": spearman_brown(r_corr, factor),
    })
    return how


def diagnose(kernel, **thresholds) -> HealthReport:
    """The :class:`HealthReport` of a kernel's run.

    Args:
        kernel: a :class:`~devinterp_losskernel.LossKernel` (its ``health_record``, ``mean``,
            ``init_loss``, ``labels`` and ``metadata`` are read).
        **thresholds: any of :data:`THRESHOLDS` by name (e.g. ``rhat_max=1.05``), and
            ``chance_loss=`` (the probe loss of a model that knows nothing; default log(K) for
            K = max label + 1 when labels are known and the probe loss is a classification
            cross-entropy) or ``nbeta=`` (default: the run's).

    A kernel without a health record (made before the record existed, or from a source that
    has none) gets ``judgeable=False`` saying why, never an error.

    >>> import numpy as np, torch
    >>> from devinterp_losskernel import loss_kernel
    >>> losses = torch.from_numpy(np.random.default_rng(0).normal(1.0, 0.1, size=(4, 100, 20)))  # [C, T, n]
    >>> kernel = loss_kernel(losses)                     # the record is fed from the same draws
    >>> report = diagnose(kernel)
    >>> report.judgeable, round(report.numbers["split_rhat"], 2)
    (True, 1.0)
    """
    chance = thresholds.pop("chance_loss", None)
    nbeta = thresholds.pop("nbeta", None)
    t = _check_thresholds(thresholds)
    record = getattr(kernel, "health_record", None)
    metadata = getattr(kernel, "metadata", None) or {}
    sampler = metadata.get("sampler") or {}
    nbeta = nbeta if nbeta is not None else sampler.get("nbeta")
    numbers: Dict[str, float] = {}
    problems: List[str] = []
    notes: List[str] = []

    mean_over_draws = float(kernel.mean.double().mean())
    numbers["probe_loss_draws"] = mean_over_draws
    init = None if kernel.init_loss is None else float(kernel.init_loss.double().mean())
    numbers["probe_loss_w_star"] = math.nan if init is None else init
    if chance is None and kernel.labels is not None and metadata.get("probe_loss", "cross_entropy") == "cross_entropy":
        chance = math.log(max(int(kernel.labels.max()) + 1, 2))
    numbers["chance_loss"] = math.nan if chance is None else float(chance)
    if init is not None:
        rise = mean_over_draws - init
        numbers["relative_rise"] = rise / max(abs(init), 1e-12)
        if nbeta is not None:
            numbers["probe_llc"] = float(nbeta) * rise
    if isinstance(metadata.get("llc/mean"), (int, float)):
        numbers["llc"] = float(metadata["llc/mean"])

    if metadata.get("mode") == "minibatch":
        return _minibatch_report(kernel, metadata, sampler, numbers, t)
    stored = metadata.get("diagnostics")
    if (record is None or not record.get("trace")) and isinstance(stored, Mapping) and "ok" in stored:
        report = HealthReport.from_dict(stored)  # the run's own report, kept where the record was not
        report.notes.append("from the summary stored with the kernel (its health record was not kept, e.g. a "
                            "subset or an xarray round trip): thresholds cannot be changed here")
        return report
    if record is None or not record.get("trace"):
        why = ("this kernel has no health record: it was made before the record existed, from draws the record did "
               "not see (accumulators merged across processes: merge their callbacks' records with "
               "merge_health_records()), or is a subset; rerun the sampler "
               "with this version to judge it")
        return HealthReport(ok=False, problems=[f"not judgeable: {why}"], notes=notes, judgeable=False,
                            numbers=numbers)
    traces = {int(c): np.asarray(v, dtype=np.float64) for c, v in record["trace"].items() if len(v)}
    num_chains = len(traces)
    lengths = [len(v) for v in traces.values()]
    numbers.update({"num_chains": float(num_chains), "draws_per_chain_min": float(min(lengths, default=0)),
                    "num_draws": float(sum(lengths))})
    diverged = list(metadata.get("diverged_chains") or [])
    if diverged:
        failures = metadata.get("chain_failures") or {}
        reasons = "; ".join(f"chain {c}: {failures[c]}" for c in diverged if c in failures)
        problems.append(f"chains {diverged} diverged and were cut off" + (f" ({reasons})" if reasons else "")
                        + ". Lower lr (ε) or raise localization (γ)")
    # the settings themselves, whatever the draws
    step_too_large = _step_check(sampler, numbers, problems, t)
    # a chain cut off early (diverged) is left out of the trace checks rather than make the run unjudgeable
    long_enough = {c: v for c, v in traces.items() if len(v) >= t["min_draws_per_chain"]}
    judgeable = bool(long_enough)
    if judgeable and len(long_enough) < num_chains:
        notes.append(f"chains {sorted(set(traces) - set(long_enough))} have fewer than "
                     f"{int(t['min_draws_per_chain'])} draws and are left out of the trend, mixing and agreement "
                     "checks")

    # reliability first: it also says how many draws would do
    how = _reliability(record, num_chains, numbers)
    key = "reliability_variance" if kernel.covariance is None else "reliability_correlation"
    half_r = numbers.get("split_half_variance_r" if kernel.covariance is None else "split_half_correlation_r",
                         math.nan)
    needed = draws_for_reliability(half_r, numbers.get("split_half_draws", math.nan), t["target_reliability"])
    numbers["draws_for_target_reliability"] = needed
    if not judgeable:
        sentence = (f"not judgeable: {num_chains} chains × {max(lengths, default=0)} draws are too few to judge the "
                    f"run (at least {int(t['min_draws_per_chain'])} draws per chain are needed for trends, mixing "
                    f"and chain agreement); take more draws (num_draws ≥ {int(t['min_draws_per_chain'])}")
        sentence += ", and 2 or more chains)" if num_chains < 2 else ")"
        if math.isfinite(needed):
            what = "K̂(x,x)" if kernel.covariance is None else "R̂"
            sentence += f"; for {what} reproducible to {t['target_reliability']:g} about {_draws(needed)} draws in all"
        return HealthReport(ok=False, problems=problems + [sentence], notes=notes, judgeable=False, numbers=numbers)

    stationary, agree = _trace_checks(long_enough, numbers, problems, t)
    _scale_free_numbers(numbers, long_enough, metadata, sampler, nbeta, init, mean_over_draws)
    moved = _movement_check(numbers, init, mean_over_draws, problems, t)
    if not moved:  # a chain that has not moved trends, mixes slowly and disagrees because of it: said once
        problems[:] = [p for p in problems if not p.startswith(_TRACE_PROBLEMS)]
    _basin_check(numbers, init, mean_over_draws, chance, stationary and agree and not step_too_large,
                 problems, notes, t)
    _reliability_verdict(numbers, how, key, needed, kernel.covariance is None, problems, notes, t)
    return HealthReport(ok=not problems, problems=problems, notes=notes, judgeable=True, numbers=numbers)


_TRACE_PROBLEMS = ("not stationary", "the chains disagree", "poor mixing")


def _step_check(sampler: Mapping[str, Any], numbers: Dict[str, float], problems: List[str],
                t: Dict[str, float]) -> bool:
    """εγ/2 against :data:`STEP_LOCALIZATION_MAX` (a problem when too large); True if it is."""
    lr, gamma = sampler.get("lr"), sampler.get("localization")
    if not (isinstance(lr, (int, float)) and isinstance(gamma, (int, float)) and gamma > 0):
        return False
    numbers["step_localization"] = lr * gamma / 2
    if numbers["step_localization"] < t["step_localization_max"]:
        return False
    problems.append(f"the step is too large for the localization: εγ/2 = {lr:g}·{gamma:g}/2 = "
                    f"{numbers['step_localization']:.3g} (at most {t['step_localization_max']:g}): each step "
                    "overshoots the pull back to w*, so the draws are not from the local posterior. Lower "
                    f"lr (ε) to {t['step_localization_max'] * 0.6 / gamma:.2g} or below")
    return True


def _minibatch_report(kernel, metadata: Mapping[str, Any], sampler: Mapping[str, Any], numbers: Dict[str, float],
                      t: Dict[str, float]) -> HealthReport:
    """The report of a minibatch-mode kernel (the training set's variances from the SGLD
    minibatches): no probe trace exists, so it judges the settings (εγ/2), whether the chains
    moved (devinterp's LLC), the visits per sample (:data:`MIN_MEDIAN_VISITS`) and ν's
    between-chain standard error (:data:`NU_RELATIVE_SE_MAX`)."""
    problems: List[str] = []
    notes: List[str] = ["minibatch mode: judged from the LLC, the visits per sample and ν's spread between chains "
                        "(no probe trace: run a probe kernel for the trend, mixing and reliability checks)"]
    visits = kernel.visits.double() if kernel.visits is not None else None
    if visits is not None and len(visits):
        numbers["visits_median"] = float(visits.median())
        numbers["visits_min"] = float(visits.min())
        numbers["unseen"] = float((visits < 2).sum())
    nu, nu_se = metadata.get("singular_fluctuation"), metadata.get("singular_fluctuation_se")
    if isinstance(nu, (int, float)):
        numbers["nu"] = float(nu)
    if isinstance(nu_se, (int, float)):
        numbers["nu_se"] = float(nu_se)
        if isinstance(nu, (int, float)) and nu != 0 and math.isfinite(nu_se):
            numbers["nu_relative_se"] = abs(nu_se / nu)
    per_chain = metadata.get("llc/per_chain")
    num_chains = len(per_chain) if isinstance(per_chain, (list, tuple)) else None
    if num_chains is not None:
        numbers["num_chains"] = float(num_chains)
    _step_check(sampler, numbers, problems, t)
    _scale_free_numbers(numbers, {}, metadata, sampler, None, None, math.nan)
    if numbers.get("relaxations", math.inf) < t["relaxations_min"]:
        problems.append(f"the chains have hardly moved from w*: they ran {numbers['relaxations']:.3g} relaxation times "
                        f"of the localization ((burn-in + draws)·εγ/2, at least {t['relaxations_min']:g}). Raise lr "
                        "(ε), or num_burnin_steps")
    elif "llc" in numbers and numbers["llc"] < t["llc_min"]:
        problems.append(f"the chains have hardly moved from w*: LLC {numbers['llc']:.3g} (below {t['llc_min']:g}), "
                        "so the variances measure the sampler's noise, not the posterior. Raise lr (ε), or lower "
                        "localization (γ)")
    median = numbers.get("visits_median", math.nan)
    if math.isfinite(median) and median < t["min_median_visits"]:
        factor = t["min_median_visits"] / max(median, 1.0)
        problems.append(f"too few visits per sample: median {median:.0f} (at least {t['min_median_visits']:g}, where "
                        "ν met a converged reference within its standard error in benchmarks/minibatch_study.py). "
                        f"More draws: about {factor:.1f}× num_draws (or more chains)")
    relative = numbers.get("nu_relative_se", math.nan)
    if math.isfinite(relative) and relative > t["nu_relative_se_max"]:
        problems.append(f"ν is uncertain: standard error {relative:.0%} of ν between chains (at most "
                        f"{t['nu_relative_se_max']:.0%}). More chains or draws")
    if num_chains is not None and num_chains < 2:
        notes.append("one chain: ν has no standard error; run 2 or more chains")
    if numbers.get("unseen"):
        notes.append(f"{int(numbers['unseen'])} samples were seen fewer than twice: their variance is NaN")
    return HealthReport(ok=not problems, problems=problems, notes=notes, judgeable=True, numbers=numbers)


def _trace_checks(traces: Dict[int, np.ndarray], numbers: Dict[str, float], problems: List[str],
                  t: Dict[str, float]) -> Tuple[bool, bool]:
    """Stationarity (trend |z|), agreement (split-R̂) and mixing (ESS, τ) of the chains' traces
    into ``numbers`` and ``problems``; returns (stationary, agree)."""
    z = [(_trend_z(v), c) for c, v in traces.items()]
    worst_z, worst_chain = max(z, key=lambda p: abs(p[0]))
    rhat = split_rhat(list(traces.values()))
    ess = {c: effective_sample_size(v) for c, v in traces.items()}
    numbers.update({"trend_z_max": abs(worst_z), "split_rhat": rhat,
                    "ess_per_chain_min": min(e for e, _ in ess.values()),
                    "ess_total": sum(e for e, _ in ess.values()),
                    "autocorrelation_time_max": max(tau for _, tau in ess.values())})
    stationary = abs(worst_z) <= t["trend_z_max"]
    agree = not (math.isfinite(rhat) and rhat > t["rhat_max"])
    if not stationary:
        direction = "rising" if worst_z > 0 else "falling"
        problems.append(f"not stationary: chain {worst_chain}'s probe loss is still {direction} ({abs(worst_z):.3g} "
                        f"standard errors between its first and last third, above {t['trend_z_max']:g}). Raise "
                        "num_burnin_steps" + (", or lower lr (ε) if it keeps rising" if worst_z > 0 else ""))
    if not agree:
        problems.append(f"the chains disagree: split-R̂ {rhat:.3g} (above {t['rhat_max']:g}). Take more draws "
                        "(num_draws) or more burn-in (num_burnin_steps)")
    if numbers["ess_per_chain_min"] < t["min_ess_per_chain"]:
        problems.append(f"poor mixing: {numbers['ess_per_chain_min']:.3g} effective draws in the worst chain "
                        f"(autocorrelation time {numbers['autocorrelation_time_max']:.3g} draws; at least "
                        f"{t['min_ess_per_chain']:g} wanted). Take more draws (num_draws), more steps between draws "
                        "(num_steps_bw_draws), or raise lr (ε)")
    return stationary, agree


def _scale_free_numbers(numbers: Dict[str, float], traces: Mapping[int, np.ndarray], metadata: Mapping[str, Any],
                        sampler: Mapping[str, Any], nbeta, init: Optional[float], mean_over_draws: float) -> None:
    """The fluctuation ratio h = nβ·Var_t(L̄)/(E[L̄] − L̄(w*)) (within-chain variance of the trace,
    averaged over chains; :data:`FLUCTUATION_RATIO_MAX`) and the relaxations (steps run)·εγ/2
    (:data:`RELAXATIONS_MIN`), each only when what it needs is known."""
    rise = None if init is None else mean_over_draws - init
    variances = [float(np.var(v, ddof=1)) for v in traces.values() if len(v) > 1]
    if nbeta is not None and rise is not None and rise > 0 and variances:
        numbers["fluctuation_ratio"] = float(nbeta) * float(np.mean(variances)) / rise
    schedule = {**dict(metadata.get("settings") or {}), **dict(metadata.get("sgld") or {}), **dict(sampler)}
    lr, gamma = schedule.get("lr"), schedule.get("localization")
    burnin, draws = schedule.get("num_burnin_steps"), schedule.get("num_draws")
    between = schedule.get("num_steps_bw_draws", 1) or 1
    known = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lr, gamma, burnin, draws, between))
    if known and gamma > 0:
        numbers["relaxations"] = (burnin + draws * between) * lr * gamma / 2


def _movement_check(numbers: Dict[str, float], init: Optional[float], mean_over_draws: float,
                    problems: List[str], t: Dict[str, float]) -> bool:
    """Whether the chains moved away from w* and settled, judged on scales that do not depend on
    the model: the chains ran at least ``relaxations_min`` relaxation times 2/(εγ) of the
    localization, and the LLC (devinterp's, else the probe's) is at least ``llc_min`` (not
    negative); without nβ or the schedule, the probe loss's relative rise at least
    ``relative_rise_min``."""
    llc = numbers.get("llc", numbers.get("probe_llc"))
    moved_from = "" if init is None else f"; the probe loss went from {init:.4g} at w* to {mean_over_draws:.4g}"
    relaxations = numbers.get("relaxations")
    if relaxations is not None and relaxations < t["relaxations_min"]:
        problems.append(f"the chains have hardly moved from w* or not yet settled: they ran {relaxations:.3g} "
                        f"relaxation times of the localization ((burn-in + draws)·εγ/2; at least "
                        f"{t['relaxations_min']:g} to reach the spread it allows){moved_from}. Raise lr (ε), or "
                        "num_burnin_steps")
        return False
    if llc is not None and llc < t["llc_min"]:
        problems.append(f"the chains have hardly moved from w*: LLC {llc:.3g} (below {t['llc_min']:g}: the draws' "
                        f"loss is below w*'s){moved_from}. Raise lr (ε), or lower localization (γ)")
        return False
    if init is not None and llc is None and relaxations is None and numbers["relative_rise"] < t["relative_rise_min"]:
        problems.append(f"the chains have hardly moved from w*: the probe loss rose by {numbers['relative_rise']:.1%} "
                        f"of its value at w* (below {t['relative_rise_min']:.0%}){moved_from}. Raise lr (ε), or "
                        "lower localization (γ)")
        return False
    return True


def _basin_check(numbers: Dict[str, float], init: Optional[float], mean_over_draws: float, chance: Optional[float],
                 settled: bool, problems: List[str], notes: List[str], t: Dict[str, float]) -> None:
    """Outside the basin — above chance (when chance is known), or a fluctuation ratio above
    ``fluctuation_ratio_max`` (the probe loss fluctuates more than a tempered posterior in one
    basin allows, on the model's own scale) — is a loose posterior (a note) when the chains are
    ``settled`` (stationary, agreeing, a step the localization allows), else a problem."""
    why_out = []
    if chance is not None:
        numbers["chance_fraction"] = mean_over_draws / chance
        if numbers["chance_fraction"] > t["chance_fraction_max"]:
            why_out.append(f"above chance ({chance:.3g})")
    ratio = numbers.get("fluctuation_ratio", math.nan)
    if math.isfinite(ratio) and ratio > t["fluctuation_ratio_max"]:
        why_out.append(f"fluctuating {ratio:.3g}× more than a tempered posterior in one basin does (nβ·Var(probe "
                       f"loss)/its rise over w*, ≈ 1 inside a basin; at most {t['fluctuation_ratio_max']:g})")
    if not why_out:
        return
    where = " and ".join(why_out)
    if settled:
        notes.append(f"loose posterior: the chains sit at a probe loss of {mean_over_draws:.3g}, {where}, and are "
                     "stationary and agree: the kernel describes a wide neighbourhood of w*, not its basin. Fine if "
                     "chosen on purpose (e.g. label-issue scores from the posterior mean); raise localization (γ) "
                     "for the local kernel")
        return
    why = "the step is too large" if numbers.get("step_localization", 0.0) >= t["step_localization_max"] \
        else "they drift or disagree"
    at_w_star = "" if init is None else f"; {init:.3g} at w*"
    problems.append(f"the chains left the basin of w*: mean probe loss {mean_over_draws:.3g} over the draws, {where}"
                    f"{at_w_star}, and {why}. Lower lr (ε) or raise localization (γ)")


def _reliability_verdict(numbers: Dict[str, float], how: Optional[str], key: str, needed: float, diagonal: bool,
                         problems: List[str], notes: List[str], t: Dict[str, float]) -> None:
    """R̂'s (a diagonal kernel: the variances') split-half reliability: a problem below
    ``reliability_min``, else a note with the draws that ``target_reliability`` needs."""
    if how is None:
        notes.append("split-half reliability not measured: each half needs at least 3 draws")
        return
    reliability = numbers[key]
    what = "the per-sample variances K̂(x,x)" if diagonal else "R̂"
    if math.isfinite(reliability) and reliability < t["reliability_min"]:
        problems.append(f"{what} is not reproducible: split-half reliability {reliability:.2f} projected to all "
                        f"{int(numbers['num_draws'])} draws ({how}), below {t['reliability_min']:g}. More draws: "
                        f"about {_draws(needed)} in all for {t['target_reliability']:g}")
    else:
        notes.append(f"{what}: split-half reliability {reliability:.2f} projected to all draws ({how}); "
                     f"{t['target_reliability']:g} needs about {_draws(needed)} draws")


def _draws(n: float) -> str:
    return "∞" if not math.isfinite(n) else f"{int(math.ceil(n)):,}"


def report_summary(kernel, **thresholds) -> Dict[str, Any]:
    """``diagnose(kernel).to_dict()``, or ``{"error": …}`` if the report itself fails (a run's
    result is never lost to its report)."""
    try:
        return diagnose(kernel, **thresholds).to_dict()
    except Exception as error:  # pragma: no cover - reported, not raised
        return {"ok": False, "judgeable": False, "problems": [f"the health report failed: {type(error).__name__}: "
                                                              f"{error}"], "notes": [], "numbers": {}}
