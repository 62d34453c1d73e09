"""Run state declared once: each field says what it holds, whether it is saved, and how.

As torchmetrics' ``Metric.add_state`` does for metrics, a part of the callback declares its
run state as a dataclass of :func:`state` fields; resetting (a fresh instance), saving
(:meth:`DeclaredState.state_dict`) and restoring (:meth:`DeclaredState.from_state_dict`)
are derived from that one declaration, so a new field cannot be forgotten in one of them.
"""

from __future__ import annotations

import copy
from dataclasses import field, fields
from typing import Any, Callable, Dict, Optional

__all__ = ["DeclaredState", "int_keys", "state"]


def state(default: Any = None, *, factory: Optional[Callable[[], Any]] = None, saved: bool = True,
          save: Optional[Callable[[Any], Any]] = None, load: Optional[Callable[[Any], Any]] = None):
    """A field of run state.

    Args:
        default / factory: its value in a fresh run (``factory`` for mutable values).
        saved: whether checkpoints keep it (bookkeeping for warnings is not kept).
        save, load: how it is written to and read from a state dict (default: a deep copy, and
            the saved value as it is).
    """
    metadata = {"saved": saved, "save": save, "load": load}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def int_keys(mapping: Dict[Any, Any]) -> Dict[int, Any]:
    """A per-chain dict read back from a file (keys may come back as strings)."""
    return {int(key): value for key, value in mapping.items()}


class DeclaredState:
    """Mixin for a dataclass whose fields are :func:`state` declarations."""

    def state_dict(self) -> Dict[str, Any]:
        """The saved fields, as copies."""
        out = {}
        for spec in fields(self):
            if spec.metadata.get("saved", True):
                save = spec.metadata.get("save") or copy.deepcopy
                out[spec.name] = save(getattr(self, spec.name))
        return out

    @classmethod
    def from_state_dict(cls, saved: Dict[str, Any], **kept):
        """A run restored from :meth:`state_dict`; ``kept`` fields are carried over as given,
        fields that are not saved start fresh, saved fields missing from ``saved`` too."""
        values = dict(kept)
        for spec in fields(cls):
            if spec.name in kept or not spec.metadata.get("saved", True) or spec.name not in saved:
                continue
            load = spec.metadata.get("load")
            values[spec.name] = load(saved[spec.name]) if load else saved[spec.name]
        return cls(**values)
