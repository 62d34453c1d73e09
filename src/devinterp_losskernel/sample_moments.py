"""Per-sample running moments over a whole training set: the minibatch mode's accumulator.

SGLD already evaluates ℓ(x_i; w_t) for the samples i of each step's minibatch. Folding those
values into running moments keyed by each sample's index in the training set estimates
Var_w[ℓ(x_i; w)] for every training sample with no extra forward pass (issue 19). Each sample
is seen a different number of times (``visits``); its variance is NaN until it is seen twice.

State per sample i, float64: ``count`` n_i, ``shift`` c_i (a value near its mean, fixed the
first time it is seen), ``mean`` m_i of ℓ − c_i and ``m2`` M2_i = Σ (ℓ − c_i − m_i)². The shift
keeps losses with a large mean and a tiny variance exact (no Σℓ² − (Σℓ)²/n cancellation).
A minibatch may hold a sample more than once (sampling with replacement): its values are
first reduced per sample, then merged with Chan et al.'s pairwise update, which is also how two
accumulators (chains, processes, files) merge: :func:`merge_moments` is a pure function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

__all__ = ["NU_MEANING", "SampleMoments", "merge_moments"]

# what ν is, said wherever it is returned (analysis.singular_fluctuation, the minibatch recorders, kernels)
NU_MEANING = ("ν = β/2 · Σ_i Var_w[ℓ(x_i; w)] / loss_scale over the training set, β = nβ/n: Watanabe's singular "
              "fluctuation when ℓ is a negative log-likelihood (loss_scale 1). With an MSE loss it is scaled by the "
              "noise variance: for Gaussian noise of variance σ², ℓ = 2σ² · NLL + const, pass loss_scale = 2σ² "
              "(ν is divided by it).")

STATE_FORMAT = "devinterp_losskernel.SampleMoments"
STATE_VERSION = 1


@dataclass(frozen=True)
class SampleMoments:
    """Running moments of N samples' losses. Tensors are [N] on one device.

    Make one with :meth:`zeros`; :meth:`update` returns a new one (the state is never changed
    in place, so a merge can never alias a live buffer).
    """

    count: torch.Tensor  # int64 [N]
    shift: torch.Tensor  # float64 [N]
    mean: torch.Tensor  # float64 [N], mean of ℓ − shift
    m2: torch.Tensor  # float64 [N]

    @classmethod
    def zeros(cls, num_samples: int, device: Optional[torch.device] = None) -> "SampleMoments":
        f64 = dict(dtype=torch.float64, device=device)
        return cls(torch.zeros(num_samples, dtype=torch.long, device=device), torch.zeros(num_samples, **f64),
                   torch.zeros(num_samples, **f64), torch.zeros(num_samples, **f64))

    @property
    def num_samples(self) -> int:
        return int(self.count.shape[0])

    def update(self, indices: torch.Tensor, losses: torch.Tensor) -> "SampleMoments":
        """Fold one minibatch in: ``indices`` [m] (int, in [0, N), repeats allowed) and their
        losses [m] at one state of the chain. Returns the new moments."""
        indices = indices.to(self.count.device, torch.long)
        losses = losses.detach().to(self.count.device, torch.float64)
        n = self.num_samples
        batch_count = torch.zeros(n, dtype=torch.long, device=indices.device).index_add_(
            0, indices, torch.ones_like(indices))
        seen = batch_count > 0
        # a shift for samples seen for the first time: their mean in this batch
        first_time = seen & (self.count == 0)
        batch_sum = torch.zeros(n, dtype=torch.float64, device=indices.device).index_add_(0, indices, losses)
        shift = torch.where(first_time, batch_sum / batch_count.clamp(min=1), self.shift)
        deviation = losses - shift[indices]
        dev_sum = torch.zeros_like(batch_sum).index_add_(0, indices, deviation)
        batch_mean = dev_sum / batch_count.clamp(min=1)
        batch_m2 = torch.zeros_like(batch_sum).index_add_(0, indices, (deviation - batch_mean[indices]) ** 2)
        batch = SampleMoments(batch_count, shift, batch_mean, batch_m2)
        return merge_moments(SampleMoments(self.count, shift, self.mean, self.m2), batch)

    def variance(self) -> torch.Tensor:
        """Unbiased Var[ℓ(x_i)] [N], float64; NaN where a sample was seen fewer than twice."""
        variance = self.m2 / (self.count - 1).clamp(min=1)
        return torch.where(self.count >= 2, variance, torch.full_like(variance, float("nan")))

    def loss_mean(self) -> torch.Tensor:
        """E[ℓ(x_i)] [N], float64; NaN where a sample was never seen."""
        mean = self.shift + self.mean
        return torch.where(self.count >= 1, mean, torch.full_like(mean, float("nan")))

    def state_dict(self) -> Dict[str, object]:
        return {"format": STATE_FORMAT, "format_version": STATE_VERSION,
                **{name: getattr(self, name).detach().cpu().clone() for name in ("count", "shift", "mean", "m2")}}

    @classmethod
    def from_state_dict(cls, state: Dict[str, object], device: Optional[torch.device] = None) -> "SampleMoments":
        from .provenance import check_format_version

        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError("state must be a dict from SampleMoments.state_dict()")
        check_format_version(state, "the SampleMoments state", kind="SampleMoments state", current=STATE_VERSION)
        return cls(*(torch.as_tensor(state[name]).to(device) for name in ("count", "shift", "mean", "m2")))


def merge_moments(a: SampleMoments, b: SampleMoments) -> SampleMoments:
    """Chan et al.'s pairwise merge, per sample; pure. Where both sides have seen a sample, ``a``'s
    shift is kept and ``b``'s moments are moved onto it; where only one has, its moments are taken."""
    if a.num_samples != b.num_samples:
        raise ValueError(f"cannot merge moments of {a.num_samples} and {b.num_samples} samples: "
                         "they were made for different training sets")
    b = b if b.count.device == a.count.device else SampleMoments(*(t.to(a.count.device) for t in
                                                                   (b.count, b.shift, b.mean, b.m2)))
    shift = torch.where(a.count > 0, a.shift, b.shift)
    b_mean = b.mean + (b.shift - shift)  # b's mean, measured from the common shift
    count = a.count + b.count
    total = count.clamp(min=1).to(torch.float64)
    na, nb = a.count.to(torch.float64), b.count.to(torch.float64)
    delta = b_mean - a.mean
    mean = torch.where(count > 0, a.mean + delta * nb / total, torch.zeros_like(a.mean))
    m2 = a.m2 + b.m2 + delta ** 2 * na * nb / total
    return SampleMoments(count, shift, mean, m2)
