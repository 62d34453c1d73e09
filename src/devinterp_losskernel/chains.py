"""The chain guard: which draws of which chains reach the kernel.

Each chain's latest ``window`` draws are held back before they are folded in, so that when a
chain diverges (a NaN/Inf probe loss, or a mean probe loss far above the reference) the
blow-up before it can be left out with it. A chain that the sampler stops early (fewer than
``num_draws`` draws when another chain starts or the run ends) is recorded as failed and its
held draws are dropped. The guard keeps the per-chain record; the callback folds what the
guard releases.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .options import DivergenceGuard
from .state import DeclaredState, int_keys, state

__all__ = ["ChainGuard", "ChainRecord"]


def _save_held(held: Dict[int, List[torch.Tensor]]) -> Dict[int, torch.Tensor]:
    return {int(c): torch.stack(v).cpu() for c, v in held.items() if v}


def _load_held(saved: Dict[int, torch.Tensor]) -> Dict[int, List[torch.Tensor]]:
    return {int(c): list(block) for c, block in saved.items()}


@dataclass
class ChainRecord(DeclaredState):
    """What the guard knows of each chain of the run (chain index → …)."""

    draws_per_chain: Dict[int, int] = state(factory=dict, load=int_keys)  # folded into the kernel
    rejected_per_chain: Dict[int, int] = state(factory=dict, load=int_keys)  # left out
    diverged_chains: List[int] = state(factory=list, load=list)
    chain_failures: Dict[int, str] = state(factory=dict, load=int_keys)  # why each was cut off
    held: Dict[int, List[torch.Tensor]] = state(factory=dict, save=_save_held, load=_load_held)
    delivered: Dict[int, int] = state(factory=dict, load=int_keys)  # draws the sampler delivered
    last_draw: Dict[int, int] = state(factory=dict, load=int_keys)  # last draw index seen
    expected_draws: Optional[int] = state(None)  # num_draws per chain, when known
    # mean probe loss L̄_probe(w_{c,t}) of each accepted draw, in order: the kept draws of a chain
    # are the first draws_per_chain[c] of them (held draws dropped with a diverged chain are the tail)
    mean_trace: Dict[int, List[float]] = state(factory=dict, load=int_keys)
    first_mean: Dict[int, float] = state(factory=dict, saved=False)
    drift_warned: set = state(factory=set, saved=False)


class ChainGuard:
    """Hold back, release, reject and record the draws of each chain.

    Args:
        settings: the :class:`~devinterp_losskernel.options.DivergenceGuard` (tolerance,
            window, drift_tolerance).
        fold: called with a chain's released draw (losses [n]) to fold it into the kernel.
        reference_loss: the mean probe loss at w*, or None while it is unknown (then each
            chain is compared with its first draw).
        observe: if given, called as ``observe(chain, position, losses)`` with each draw folded
            in (``position``: its index among the chain's kept draws) — the health record.
    """

    def __init__(self, settings: DivergenceGuard, fold: Callable[[torch.Tensor], None],
                 reference_loss: Callable[[], Optional[float]], expected_draws: Optional[int] = None,
                 observe: Optional[Callable[[int, int, torch.Tensor], None]] = None):
        self.settings = settings
        self._fold_draw = fold
        self._observe = observe
        self._reference_loss = reference_loss
        self.record = ChainRecord(expected_draws=expected_draws)

    # -- one draw ----------------------------------------------------------------------------
    def deliver(self, chain: int, draw: Optional[int], losses: Optional[torch.Tensor], mean_loss: float,
                *, stacklevel: int) -> None:
        """A draw of ``chain`` arrived with these probe losses (None: not evaluated, the chain
        is already cut off). Checks it, holds it back and releases the oldest held draw."""
        record = self.record
        self._end_other_chains(chain)
        record.delivered[chain] = record.delivered.get(chain, 0) + 1
        if draw is not None:
            record.last_draw[chain] = draw
        if chain in record.diverged_chains or losses is None:
            self._count_rejected(chain)
            return
        reason = self._divergence(chain, losses, mean_loss)
        if reason is not None:
            self._count_rejected(chain)
            self.mark_diverged(chain, f"draw {draw} {reason}", stacklevel=stacklevel + 1)
            return
        self._check_drift(chain, mean_loss, stacklevel=stacklevel + 1)
        record.mean_trace.setdefault(chain, []).append(float(mean_loss))
        held = record.held.setdefault(chain, [])
        held.append(losses.detach())
        while len(held) > self.settings.window:
            self._fold(chain, held.pop(0))

    def cut_off(self, chain: int) -> bool:
        """Whether ``chain`` diverged earlier: its draws need no probe pass."""
        return chain in self.record.diverged_chains

    # -- chains ending ----------------------------------------------------------------------
    def end_chain(self, chain: Optional[int] = None) -> None:
        """The chain ended without diverging: fold in its held-back draws (every chain's when
        ``chain`` is None)."""
        for c in ([chain] if chain is not None else list(self.record.held)):
            for losses in self.record.held.pop(c, []):
                self._fold(c, losses)

    def mark_diverged(self, chain: int, reason: str = "diverged", *, stacklevel: int = 2) -> None:
        """Leave ``chain`` out from here on: its held-back draws are dropped and its later draws
        rejected (all counted in ``rejected_per_chain``); recorded in ``diverged_chains`` and
        ``chain_failures``; warns once."""
        record = self.record
        dropped = len(record.held.pop(chain, []))
        if dropped:
            self._count_rejected(chain, dropped)
        if chain in record.diverged_chains:
            return
        record.diverged_chains.append(chain)
        record.chain_failures[chain] = reason
        warnings.warn(
            f"chain {chain}: {reason}; the chain has diverged. The {dropped} draws held back "
            f"before it (divergence_window={self.settings.window}) and all later draws of the "
            f"chain are left out of the kernel; its {record.draws_per_chain.get(chain, 0)} earlier "
            "draws are kept. Lower lr or raise localization. Kept/rejected draws per chain are in "
            "kernel.draws_per_chain / kernel.rejected_per_chain.",
            RuntimeWarning, stacklevel=stacklevel + 1,
        )

    def aborted(self, chain: int) -> Optional[str]:
        """Why ``chain`` looks stopped by the sampler (fewer draws than expected), or None."""
        record = self.record
        delivered = record.delivered.get(chain, 0)
        if record.expected_draws is None or chain in record.diverged_chains or delivered >= record.expected_draws:
            return None
        return f"the sampler stopped it after {delivered} of num_draws={record.expected_draws} draws"

    def finish(self, *, stacklevel: int) -> None:
        """The run ended: chains short of their draws are failed, the others' draws folded."""
        for chain in list(self.record.delivered):
            reason = self.aborted(chain)
            if reason is not None:
                self.mark_diverged(chain, reason, stacklevel=stacklevel + 1)
        self.end_chain()

    def release_complete(self) -> Dict[int, str]:
        """Fold the held draws of every chain that is complete; returns the incomplete ones
        (chain → "k of T draws"), whose draws stay held."""
        record = self.record
        incomplete = {c: f"{record.delivered.get(c, 0)} of {record.expected_draws} draws"
                      for c in record.held if self.aborted(c) is not None}
        for chain in [c for c in record.held if c not in incomplete]:
            self.end_chain(chain)
        return incomplete

    # -- the checks ---------------------------------------------------------------------------
    def _end_other_chains(self, chain: int) -> None:
        """A draw of another chain ends the chains that are complete (their held draws are
        folded). One that has not delivered its ``num_draws`` keeps its held draws: it was
        either aborted (then :meth:`finish` leaves them out) or runs interleaved."""
        for other in [c for c in self.record.held if c != chain and c not in self.record.diverged_chains]:
            if self.aborted(other) is None:
                self.end_chain(other)

    def _fold(self, chain: int, losses: torch.Tensor) -> None:
        self._fold_draw(losses)
        position = self.record.draws_per_chain.get(chain, 0)
        if self._observe is not None:
            self._observe(chain, position, losses)
        self.record.draws_per_chain[chain] = position + 1

    def kept_trace(self) -> Dict[int, List[float]]:
        """{chain: the mean probe loss of each draw folded into the kernel, in order}."""
        record = self.record
        return {c: record.mean_trace.get(c, [])[:k] for c, k in record.draws_per_chain.items()}

    def _count_rejected(self, chain: int, draws: int = 1) -> None:
        self.record.rejected_per_chain[chain] = self.record.rejected_per_chain.get(chain, 0) + draws

    def _reference(self, chain: int, current: float) -> Tuple[float, str]:
        """The mean probe loss a chain is compared with: at w* if known, else its first draw."""
        at_w_star = self._reference_loss()
        if at_w_star is not None:
            return at_w_star, "the probe loss at w*"
        return self.record.first_mean.setdefault(chain, current), "the chain's first draw"

    def _divergence(self, chain: int, losses: torch.Tensor, mean_loss: float) -> Optional[str]:
        """Why this draw shows the chain has diverged, or None."""
        if not math.isfinite(mean_loss):
            return f"has {int((~torch.isfinite(losses)).sum())} non-finite probe losses (NaN/Inf)"
        tolerance = self.settings.tolerance
        if tolerance is None:
            return None
        reference, source = self._reference(chain, mean_loss)
        if mean_loss - reference > tolerance * (1.0 + abs(reference)):
            return (f"has mean probe loss {mean_loss:.4g}, more than divergence_tolerance="
                    f"{tolerance:g} × (1 + |{reference:.4g}|) above {source}")
        return None

    def _check_drift(self, chain: int, current: float, *, stacklevel: int) -> None:
        if chain in self.record.drift_warned:
            return
        reference, source = self._reference(chain, current)
        if current - reference > self.settings.drift_tolerance * (1.0 + abs(reference)):
            self.record.drift_warned.add(chain)
            warnings.warn(
                f"chain {chain}: mean probe loss {current:.4g} has drifted far above {source} "
                f"({reference:.4g}); the chain may have left the basin of w*. Consider a smaller "
                "lr, larger localization or larger nbeta.",
                RuntimeWarning, stacklevel=stacklevel + 1,
            )
