"""Progress bars that stay readable where the output goes.

In a notebook: tqdm's widget. On a terminal: the usual bar. Written to a file or a pipe
(a log, CI): at most one line every ``LOSSKERNEL_PROGRESS_INTERVAL`` seconds (default 60)
instead of a carriage-return line per update. ``LOSSKERNEL_PROGRESS=0`` hides the bars.
devinterp 2.x's own per-chain bars get the same policy inside our calls
(:func:`devinterp_bars`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Any, Dict, Iterator

_DEFAULT_LOG_INTERVAL = 60.0


def _in_notebook() -> bool:
    """Whether tqdm.auto draws a notebook widget here (tqdm.auto's class is always its own
    subclass; tqdm.autonotebook's is the plain one outside a notebook kernel)."""
    import warnings

    with warnings.catch_warnings():  # autonotebook warns about its experimental status in notebooks
        warnings.simplefilter("ignore")
        from tqdm.autonotebook import tqdm as chosen
    from tqdm.std import tqdm as plain

    return chosen is not plain


def bar_settings(file: Any = None) -> Dict[str, Any]:
    """tqdm keyword arguments for a bar written to ``file`` (default: stderr):
    ``disable`` and ``mininterval`` chosen as the module docstring says."""
    if os.environ.get("LOSSKERNEL_PROGRESS", "1").strip().lower() in ("0", "false", "no", "off"):
        return {"disable": True}
    if _in_notebook():
        return {"mininterval": 0.5}
    stream = sys.stderr if file is None else file
    try:
        interactive = bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a stream
        interactive = False
    if interactive:
        return {"mininterval": 0.5}
    interval = float(os.environ.get("LOSSKERNEL_PROGRESS_INTERVAL", _DEFAULT_LOG_INTERVAL))
    return {"mininterval": interval, "maxinterval": max(interval, 10.0), "ascii": True}


def progress_bar(total: int, desc: str, unit: str = "draw", **kwargs):
    """A tqdm bar over ``total`` items with :func:`bar_settings` (explicit kwargs win)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, **{**bar_settings(kwargs.get("file")), **kwargs})


@contextlib.contextmanager
def devinterp_bars(show: bool = True) -> Iterator[None]:
    """Inside this block devinterp 2.x's ``sample_single_chain`` draws its per-chain bars with
    :func:`bar_settings` (``show=False``: not at all, when one bar of ours covers the run).
    devinterp 1.x's bars are switched off through its own ``verbose=`` argument instead."""
    try:
        from devinterp.slt import sampler
    except ImportError:  # pragma: no cover - devinterp is a dependency
        yield
        return
    original = getattr(sampler, "trange", None)
    if original is None:  # devinterp 1.x: nothing to patch
        yield
        return
    settings = bar_settings() if show else {"disable": True}

    @functools.wraps(original)
    def trange(*args, **kwargs):
        return original(*args, **{**kwargs, **settings})

    sampler.trange = trange
    try:
        yield
    finally:
        sampler.trange = original
