"""The chain guard (chains.py): which draws of which chains reach the kernel — hold-back,
divergence (non-finite and finite blow-ups), a chain the sampler aborts, and its record."""

from __future__ import annotations

import warnings

import pytest
import torch

from devinterp_losskernel.chains import ChainGuard, ChainRecord
from devinterp_losskernel.options import DivergenceGuard


class Folded(list):
    """The fold callback: what reached the kernel, in order."""

    def __call__(self, losses):
        self.append(float(losses[0]))


def guard(window=2, tolerance=100.0, reference=1.0, expected=None):
    folded = Folded()
    g = ChainGuard(DivergenceGuard(tolerance=tolerance, window=window), folded, lambda: reference,
                   expected_draws=expected)
    return g, folded


def deliver(g, chain, draw, value, n=3):
    losses = torch.full((n,), float(value), dtype=torch.float64)
    g.deliver(chain, draw, losses, float(losses.double().mean()), stacklevel=1)


def test_the_last_window_draws_are_held_back_until_the_chain_ends():
    g, folded = guard(window=2)
    for draw, value in enumerate([1.0, 1.1, 1.2, 1.3]):
        deliver(g, 0, draw, value)
    assert folded == [1.0, 1.1]                       # 1.2, 1.3 held
    assert [float(b[0]) for b in g.record.held[0]] == [1.2, 1.3]
    g.end_chain(0)
    assert folded == [1.0, 1.1, 1.2, 1.3] and g.record.draws_per_chain == {0: 4}
    assert 0 not in g.record.held


def test_a_draw_of_the_next_chain_ends_a_complete_one():
    g, folded = guard(window=2, expected=3)
    for draw in range(3):
        deliver(g, 0, draw, 1.0 + draw / 10)
    deliver(g, 1, 0, 2.0)
    assert folded == [1.0, 1.1, 1.2]                  # chain 0 delivered its 3: released
    assert g.record.draws_per_chain == {0: 3}


def test_a_nan_draw_cuts_the_chain_and_drops_its_held_draws():
    g, folded = guard(window=2)
    for draw, value in enumerate([1.0, 1.1, 1.2]):
        deliver(g, 0, draw, value)
    with pytest.warns(RuntimeWarning, match="chain 0: draw 3 has 3 non-finite probe losses"):
        deliver(g, 0, 3, float("nan"))
    assert g.cut_off(0) and g.record.diverged_chains == [0]
    deliver(g, 0, 4, 1.0)                             # later draws of the chain: rejected too
    g.end_chain()
    assert folded == [1.0]                            # the 2 held + the NaN + the later one are out
    assert g.record.draws_per_chain == {0: 1} and g.record.rejected_per_chain == {0: 4}
    assert "non-finite" in g.record.chain_failures[0]


def test_a_finite_blow_up_past_the_tolerance_is_divergence():
    g, folded = guard(window=1, tolerance=10.0, reference=1.0)
    deliver(g, 0, 0, 1.0)
    with pytest.warns(RuntimeWarning, match="has drifted far above the probe loss at w"):
        deliver(g, 0, 1, 5.0)                         # drift: warned, kept
    with pytest.warns(RuntimeWarning, match=r"more than divergence_tolerance=10 × \(1 \+ \|1\|\) above the probe"):
        deliver(g, 0, 2, 25.0)                        # 25 − 1 > 10 × 2
    g.end_chain()
    assert folded == [1.0] and g.record.rejected_per_chain == {0: 2}


def test_without_a_reference_each_chain_is_compared_with_its_first_draw():
    g, folded = guard(window=0, tolerance=1.0, reference=None)
    deliver(g, 0, 0, 10.0)
    with pytest.warns(RuntimeWarning, match="above the chain's first draw"):
        deliver(g, 0, 1, 100.0)
    assert folded == [10.0]


def test_tolerance_none_lets_finite_blow_ups_through():
    g, folded = guard(window=0, tolerance=None, reference=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")               # the drift warning
        deliver(g, 0, 0, 1e6)
    assert folded == [1e6] and not g.record.diverged_chains


def test_an_aborted_chain_is_failed_at_finish_and_its_held_draws_left_out():
    g, folded = guard(window=2, expected=5)
    for draw in range(3):                             # the sampler stopped after 3 of 5
        deliver(g, 0, draw, 1.0 + draw / 10)
    assert g.aborted(0) == "the sampler stopped it after 3 of num_draws=5 draws"
    assert g.release_complete() == {0: "3 of 5 draws"} and folded == [1.0]   # still held
    with pytest.warns(RuntimeWarning, match="chain 0: the sampler stopped it after 3 of num_draws=5"):
        g.finish(stacklevel=1)
    assert folded == [1.0] and g.record.rejected_per_chain == {0: 2}
    assert g.record.chain_failures == {0: "the sampler stopped it after 3 of num_draws=5 draws"}


def test_chains_that_delivered_every_draw_are_released_at_finish():
    g, folded = guard(window=3, expected=2)
    for chain in (0, 1):
        for draw in range(2):
            deliver(g, chain, draw, chain + draw / 10)
    g.finish(stacklevel=1)
    assert sorted(folded) == [0.0, 0.1, 1.0, 1.1] and not g.record.diverged_chains


def test_mark_diverged_by_hand_warns_once():
    g, folded = guard(window=2)
    deliver(g, 0, 0, 1.0)
    with pytest.warns(RuntimeWarning) as caught:
        g.mark_diverged(0, "stopped by the sampler")
        g.mark_diverged(0, "again")
    assert len(caught) == 1 and g.record.chain_failures == {0: "stopped by the sampler"}
    assert g.record.rejected_per_chain == {0: 1} and folded == []


def test_the_record_round_trips_with_its_held_draws():
    g, _ = guard(window=2, expected=4)
    for draw in range(3):
        deliver(g, 0, draw, 1.0 + draw)
    saved = g.record.state_dict()
    assert torch.equal(saved["held"][0], torch.tensor([[2.0] * 3, [3.0] * 3]))
    back = ChainRecord.from_state_dict(saved)
    assert back.draws_per_chain == {0: 1} and back.expected_draws == 4 and back.delivered == {0: 3}
    assert [b.tolist() for b in back.held[0]] == [[2.0] * 3, [3.0] * 3]
    assert back.first_mean == {} and back.drift_warned == set()   # bookkeeping: fresh
