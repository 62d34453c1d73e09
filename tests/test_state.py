"""Run state declared once (state.py): the declared fields round-trip through
state_dict / from_state_dict; unsaved fields start fresh; copies, not references."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, List, Optional

import torch

from devinterp_losskernel.state import DeclaredState, int_keys, state


def _save_blocks(blocks):
    return {int(k): torch.stack(v) for k, v in blocks.items()}


def _load_blocks(saved):
    return {int(k): list(v) for k, v in saved.items()}


@dataclass
class Run(DeclaredState):
    count: int = state(0)
    per_chain: Dict[int, int] = state(factory=dict, load=int_keys)
    names: List[str] = state(factory=list, load=list)
    blocks: Dict[int, List[torch.Tensor]] = state(factory=dict, save=_save_blocks, load=_load_blocks)
    limit: Optional[float] = state(None)
    warned: set = state(factory=set, saved=False)   # bookkeeping: never saved


def filled() -> Run:
    return Run(count=7, per_chain={0: 3, 1: 4}, names=["a", "b"],
               blocks={0: [torch.ones(3), torch.zeros(3)]}, limit=2.5, warned={1})


def test_every_saved_field_round_trips():
    run = filled()
    saved = run.state_dict()
    assert set(saved) == {f.name for f in fields(Run)} - {"warned"}
    assert torch.equal(saved["blocks"][0], torch.stack([torch.ones(3), torch.zeros(3)]))  # its own save=
    back = Run.from_state_dict(saved)
    for spec in fields(Run):
        if spec.name in ("warned", "blocks"):
            continue
        assert getattr(back, spec.name) == getattr(run, spec.name), spec.name
    assert [b.tolist() for b in back.blocks[0]] == [b.tolist() for b in run.blocks[0]]
    assert back.warned == set()  # not saved: fresh


def test_state_dict_holds_copies():
    run = filled()
    saved = run.state_dict()
    saved["per_chain"][0] = 99
    saved["names"].append("c")
    assert run.per_chain[0] == 3 and run.names == ["a", "b"]
    back = Run.from_state_dict(run.state_dict())
    back.per_chain[5] = 1
    assert 5 not in run.per_chain


def test_keys_read_back_as_strings_become_ints_again():
    saved = filled().state_dict()
    saved["per_chain"] = {str(k): v for k, v in saved["per_chain"].items()}  # as JSON gives them back
    assert Run.from_state_dict(saved).per_chain == {0: 3, 1: 4}
    assert int_keys({"2": "x", 3: "y"}) == {2: "x", 3: "y"}


def test_missing_fields_start_fresh_and_kept_ones_are_carried_over():
    saved = filled().state_dict()
    del saved["names"], saved["limit"]
    back = Run.from_state_dict(saved, count=100, warned={4})
    assert back.names == [] and back.limit is None       # missing from the dict: fresh
    assert back.count == 100 and back.warned == {4}      # kept: as given, whatever was saved
    assert back.per_chain == {0: 3, 1: 4}


def test_a_fresh_instance_is_the_declared_defaults():
    a, b = Run(), Run()
    a.per_chain[0] = 1
    assert b.per_chain == {} and b.count == 0 and b.limit is None  # factories: no shared dicts
