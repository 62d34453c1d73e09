"""Fault cases: a careless user and a faulty environment against the public API.

Each case does one thing a user (or a disk, or a sampler) gets wrong and classifies what the
package did about it into exactly one of four classes:

- ``clear error``   raised (or reported in devinterp's results dict) with a message that names
                    the offending argument/file and what was expected: it contains one of the
                    keywords given for the case (no keywords: the call should have worked, so
                    any error is not a clear one);
- ``correct``       ran, and the result is right: checked against an independent float64
                    numpy reference (np.cov of the draws that were meant to be in, recorded by a
                    witness callback or by the loss_fn itself), or the documented behaviour
                    (e.g. a warning plus a fresh kernel);
- ``obscure error`` raised, but the message does not name what to change (a raw torch error, a
                    wrong diagnosis); also a wrong result whose only report is a warning that
                    does not name the cause;
- ``silently wrong`` ran without an error or a relevant warning, and the result is wrong
                    (mixed runs, double-counted draws, rows in the wrong order, lost state…).

"lost work" says whether an error came only after SGLD steps had been taken in the call under
test (a global torch optimizer step hook counts them; hand-written loops count their draws).

Small models only: a 6-16-3 MLP on random data, 20-probe-sample kernels, 2 chains × 4 draws.
Runs in about a minute on 2 CPU cores, in the devinterp 1.x venv:

    .venv-ci1/bin/python benchmarks/fault_cases.py            # print the table
    .venv-ci1/bin/python benchmarks/fault_cases.py --append   # … and append a section to RESULTS.md
    .venv-ci1/bin/python benchmarks/fault_cases.py -k resume  # only cases whose name contains "resume"
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import pickle
import re
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import (  # noqa: E402
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

import devinterp_losskernel.distributed as dist_api  # noqa: E402
import devinterp_losskernel.provenance as provenance  # noqa: E402
from devinterp_losskernel import (  # noqa: E402
    KernelAccumulator,
    LossKernel,
    LossKernelCallback,
    SGLDSettings,
    SLTSummary,
    classification_loss,
    estimate_loss_kernel,
    preset,
)
from devinterp_losskernel.estimate import CHECKPOINT_NAME, chain_seeds  # noqa: E402

CLASSES = ("clear error", "correct", "obscure error", "silently wrong")
MACHINE = "2-core x86_64 CPU VM, no GPU"


# ============================================================================================
# harness
# ============================================================================================
STEPS = {"n": 0}  # SGLD optimizer steps (global hook) + draws of hand-written loops


def _count_step(optimizer, args, kwargs):
    STEPS["n"] += 1


class Interrupt(Exception):
    """Stands for a run killed part-way (raised from a probe pass)."""


class Reported(Exception):
    """An error the package reported in devinterp's results dict instead of raising."""


class HarnessError(Exception):
    """The case's own setup went wrong: a bug of this script, not a finding."""


@dataclass
class Check:
    ok: bool
    detail: str
    warning_keywords: Tuple[str, ...] = ()  # for a wrong result that came with a warning


def ok(detail: str) -> Check:
    return Check(True, detail)


def wrong(detail: str) -> Check:
    return Check(False, detail)


@dataclass
class Case:
    name: str
    group: str
    keywords: Tuple[str, ...]
    fn: Callable
    staged: bool  # an exception before ctx.arm() is a harness error


@dataclass
class Outcome:
    case: Case
    klass: str
    steps_lost: int
    message: str
    seconds: float

    @property
    def lost(self) -> bool:
        return self.steps_lost > 0


CASES: List[Case] = []


def case(name: str, *keywords: str, group: str, staged: bool = False):
    def deco(fn):
        if any(c.name == name for c in CASES):
            raise RuntimeError(f"duplicate case name {name!r}")
        CASES.append(Case(name, group, tuple(keywords), fn, staged))
        return fn
    return deco


class Ctx:
    def __init__(self, root: Path):
        self.root = root
        self.armed_at: Optional[int] = None
        self._k = 0

    def arm(self) -> None:
        """The call under test starts here: steps before it are not lost work."""
        self.armed_at = STEPS["n"]

    def tmpdir(self) -> Path:
        self._k += 1
        path = self.root / f"d{self._k}"
        path.mkdir()
        return path

    def steps(self) -> int:
        return STEPS["n"] - (self.armed_at if self.armed_at is not None else 0)


# devinterp's own chatter, repeated on every call: not a report about the fault under test
_NOISE = re.compile("|".join([
    r"You are taking more", r"If you're setting a nbeta", r"You are using seeded runs",
    r"SGLD has been deprecated", r"Using passed in nbeta", r"degrees of freedom",
    r"Temperature is deprecated", r"torch.distributed", r"TypedStorage", r"lr_scheduler",
]))


def relevant(caught) -> List[str]:
    out = []
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
            continue
        text = str(w.message)
        if _NOISE.search(text):
            continue
        out.append(f"{w.category.__name__}: {text}")
    return out


def one_line(text: str, limit: int = 150) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def matches(message: str, keywords: Sequence[str]) -> bool:
    low = message.lower()
    return any(k.lower() in low for k in keywords)


def run_case(c: Case, root: Path) -> Outcome:
    ctx = Ctx(root)
    STEPS["n"] = 0
    torch.manual_seed(0)
    np.random.seed(0)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            check = c.fn(ctx)
            error = None
        except HarnessError as e:
            check, error = None, e
        except BaseException as e:  # noqa: BLE001  (KeyboardInterrupt aside, every outcome counts)
            if isinstance(e, KeyboardInterrupt):
                raise
            check, error = None, e
    seconds = time.perf_counter() - start
    warned = relevant(caught)
    if error is not None:
        if isinstance(error, HarnessError) or (c.staged and ctx.armed_at is None):
            tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))[-1500:]
            return Outcome(c, "HARNESS", 0, one_line(f"{type(error).__name__}: {error} | {tb}", 600), seconds)
        message = str(error) if isinstance(error, Reported) else f"{type(error).__name__}: {error}"
        klass = "clear error" if c.keywords and matches(message, c.keywords) else "obscure error"
        return Outcome(c, klass, ctx.steps(), one_line(message), seconds)
    if not isinstance(check, Check):
        return Outcome(c, "HARNESS", 0, f"case returned {check!r}, not a Check", seconds)
    if check.ok:
        note = f" [warned: {one_line(warned[0], 90)}]" if warned else ""
        return Outcome(c, "correct", 0, one_line(check.detail + note, 240), seconds)
    if warned:
        keys = check.warning_keywords or c.keywords
        klass = "clear error" if keys and any(matches(w, keys) for w in warned) else "obscure error"
        return Outcome(c, klass, 0, one_line(f"{check.detail} — only a warning: {warned[0]}", 240), seconds)
    return Outcome(c, "silently wrong", 0, one_line(check.detail, 240), seconds)


# ============================================================================================
# the small problem, witnesses and references
# ============================================================================================
SGLD = dict(lr=1e-3, nbeta=10.0, localization=100.0)
N_PROBE = 20


class MLP(nn.Module):
    def __init__(self, dim=6, hidden=16, classes=3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


def data(n=64, seed=0, dim=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randint(0, 3, (n,), generator=g)


def problem(seed=0, model_seed=0):
    """(model at w*, training loader, probe inputs [20, 6], probe labels [20])."""
    x, y = data(seed=seed)
    torch.manual_seed(model_seed)
    model = MLP()
    return model, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True), x[:N_PROBE], y[:N_PROBE]


def evaluate(model, batch):
    """devinterp's SGLD minibatch loss (no probe passes in it)."""
    return F.cross_entropy(model(batch[0]), batch[1])


def evaluate_l2(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1]) + 0.5 * sum(p.square().sum() for p in model.parameters())


EST = dict(num_chains=2, num_draws=4, num_burnin_steps=2, seed=1, verbose=False, evaluate=evaluate, **SGLD)


class Recorder:
    """A per-sample cross-entropy loss_fn that records every probe pass (float64 copies): with
    the probe in one batch, pass 0 of estimate_loss_kernel is w*, then one pass per draw."""

    def __init__(self, kill_at: Optional[int] = None, scale: float = 1.0):
        self.kill_at, self.scale = kill_at, scale
        self.rows: List[np.ndarray] = []
        self.dtypes: List[torch.dtype] = []
        self.calls = 0

    def __call__(self, model, batch):
        self.calls += 1
        if self.kill_at is not None and self.calls == self.kill_at:
            raise Interrupt(f"killed at probe pass {self.calls}")
        x, y = batch[0], batch[1]
        self.dtypes.append(x.dtype)
        losses = F.cross_entropy(model(x), y.long(), reduction="none") * self.scale
        self.rows.append(losses.detach().double().cpu().numpy().copy())
        return losses

    def draws(self) -> List[np.ndarray]:
        return self.rows[1:]


class Witness:
    """A devinterp callback that records the probe losses of every draw, computed on its own."""

    def __init__(self, x, y):
        self.x, self.y = x, y
        self.rows: List[np.ndarray] = []
        self.chains: List[int] = []

    def __call__(self, *, model, chain=0, **_):
        with torch.no_grad():
            logits = model(self.x.to(next(model.parameters()).dtype))
            self.rows.append(F.cross_entropy(logits, self.y, reduction="none").double().numpy().copy())
        self.chains.append(int(chain))

    def of_chain(self, chain: int) -> List[np.ndarray]:
        return [r for r, c in zip(self.rows, self.chains) if c == chain]


def reference(rows) -> Tuple[np.ndarray, np.ndarray]:
    a = np.stack([np.asarray(r, dtype=np.float64) for r in rows])
    return np.cov(a, rowvar=False, ddof=1), a.mean(axis=0)


def compare(cov, rows, *, num_draws=None, mean=None, sel=None, rtol=1e-8, what="K") -> Check:
    """cov (tensor/array) against np.cov of ``rows`` (restricted to rows ``sel``)."""
    if len(rows) < 2:
        return wrong(f"reference has {len(rows)} draws")
    ref, ref_mean = reference(rows)
    if sel is not None:
        ref = ref[np.asarray(sel)]
    got = cov.detach().cpu().double().numpy() if isinstance(cov, torch.Tensor) else np.asarray(cov, dtype=float)
    if got.shape != ref.shape:
        return wrong(f"{what} has shape {got.shape}, expected {ref.shape}")
    if num_draws is not None and num_draws != len(rows):
        return wrong(f"num_draws = {num_draws}, expected {len(rows)}")
    if not np.isfinite(got).all():
        return wrong(f"{what} holds {int((~np.isfinite(got)).sum())} non-finite entries")
    scale = np.abs(ref).max()
    err = np.abs(got - ref).max()
    if err > rtol * scale + 1e-300:
        return wrong(f"max|Δ{what}| = {err:.2e} ({err / scale:.1e} of max|{what}| = {scale:.2e}) against np.cov "
                     f"of the {len(rows)} intended draws")
    if mean is not None:
        m = mean.detach().cpu().double().numpy() if isinstance(mean, torch.Tensor) else np.asarray(mean)
        if np.abs(m - ref_mean).max() > max(rtol, 1e-12) * np.abs(ref_mean).max():
            return wrong(f"mean off by {np.abs(m - ref_mean).max():.2e}")
    return ok(f"{what} = np.cov of the {len(rows)} intended draws (max|Δ| {err:.1e})")


def check_kernel(k: LossKernel, rows, *, sel=None, rtol=1e-8) -> Check:
    return compare(k.covariance, rows, num_draws=k.num_draws, mean=k.mean, sel=sel, rtol=rtol)


def run_estimate(probe, *, loss_fn=None, model=None, loader=None, **changes):
    base_model, base_loader, _, _ = problem()
    kwargs = {**EST, **changes}
    return estimate_loss_kernel(model if model is not None else base_model,
                                loader if loader is not None else base_loader, probe,
                                loss_fn=loss_fn, **kwargs)


def fresh_rows(probe, **changes) -> List[np.ndarray]:
    """The draws of an uninterrupted run with these arguments (the reference of a resume)."""
    rec = Recorder()
    run_estimate(probe, loss_fn=rec, **changes)
    return rec.draws()


def elc(model, loader, callbacks, *, num_chains=2, num_draws=4, num_burnin_steps=2, seed=1,
        evaluate_fn=evaluate, **sgld):
    """devinterp 1.x's estimate_learning_coeff_with_summary on the small problem."""
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary

    return estimate_learning_coeff_with_summary(
        model, loader, callbacks=callbacks, evaluate=evaluate_fn, optimizer_kwargs={**SGLD, **sgld},
        num_chains=num_chains, num_draws=num_draws, num_burnin_steps=num_burnin_steps, seed=seed,
        verbose=False)


def dv_sample(model, loader, callbacks, *, num_chains=2, num_draws=4, num_burnin_steps=2, seed=1, **sgld):
    from devinterp.slt.sampler import sample

    sample(model, loader, callbacks=callbacks, evaluate=evaluate, optimizer_kwargs={**SGLD, **sgld},
           num_chains=num_chains, num_draws=num_draws, num_burnin_steps=num_burnin_steps, seed=seed,
           verbose=False, init_loss=1.0)


def kernel_from_results(results: dict) -> np.ndarray:
    if "loss_kernel/error" in results:
        raise Reported(results["loss_kernel/error"])
    return results["loss_kernel/covariance"]


def jitter_draws(model, num_chains, num_draws, scale=0.05, seed=0):
    """(chain, draw, model) with the weights jittered around w*: a hand-written stand-in sampler;
    every draw counts as one sampler step."""
    g = torch.Generator().manual_seed(seed)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    for chain in range(num_chains):
        for draw in range(num_draws):
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(ref[name] + scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
            model.train()
            STEPS["n"] += 1
            yield chain, draw, model
    model.load_state_dict(ref)


def loop(cb, model, num_chains=2, num_draws=4, seed=0, witness=None, **call):
    for chain, draw, m in jitter_draws(model, num_chains, num_draws, seed=seed):
        cb(model=m, chain=chain, draw=draw, **call)
        if witness is not None:
            witness(model=m, chain=chain)


def interrupt_run(ctx, probe, *, kill_at=7, **first) -> Path:
    """A run killed in chain 1 (pass 7: w* is pass 1, chain 0 passes 2-5): the checkpoint holds chain 0."""
    d = ctx.tmpdir()
    try:
        run_estimate(probe, loss_fn=Recorder(kill_at=kill_at), checkpoint_dir=d, **first)
    except Interrupt:
        pass
    else:
        raise HarnessError("the first run was not interrupted")
    if not (d / CHECKPOINT_NAME).exists():
        raise HarnessError("the interrupted run left no checkpoint")
    return d


def resume_check(ctx, *, first=None, second=None, probe1=None, probe2=None, sel=None, rtol=1e-8,
                 model2=None, loader2=None, loss_fn2=None) -> Check:
    """Interrupt a run with arguments ``first``, resume it with ``second``; right is a clear
    refusal or the kernel of an uninterrupted run with ``second``."""
    _, _, x, y = problem()
    probe1 = probe1 if probe1 is not None else (x, y)
    probe2 = probe2 if probe2 is not None else probe1
    first, second = dict(first or {}), dict(second if second is not None else first or {})
    d = interrupt_run(ctx, probe1, **first)
    rec = loss_fn2 or Recorder()
    ctx.arm()
    k = run_estimate(probe2, loss_fn=rec, checkpoint_dir=d, model=model2, loader=loader2, **second)
    ref_rec = Recorder(scale=getattr(rec, "scale", 1.0))
    run_estimate(probe2, loss_fn=ref_rec, model=model2, loader=loader2, **second)
    return check_kernel(k, ref_rec.draws(), sel=sel, rtol=rtol)


def flip_tensor_bytes(path: Path, count: int = 4) -> None:
    """Flip ``count`` bytes in the middle of the largest tensor stored in a torch zip file."""
    with zipfile.ZipFile(path) as z:
        infos = [i for i in z.infolist() if "/data/" in i.filename]
        big = max(infos, key=lambda i: i.file_size)
        name_len, extra_len = None, None
    raw = bytearray(path.read_bytes())
    off = big.header_offset
    name_len = int.from_bytes(raw[off + 26: off + 28], "little")
    extra_len = int.from_bytes(raw[off + 28: off + 30], "little")
    start = off + 30 + name_len + extra_len
    mid = start + big.file_size // 2
    for i in range(count):
        raw[mid + i] ^= 0x5A
    path.write_bytes(bytes(raw))


def small_kernel(**fields) -> LossKernel:
    g = torch.Generator().manual_seed(3)
    acc = KernelAccumulator(5)
    acc.update(torch.randn(6, 5, generator=g, dtype=torch.float64))
    return acc.compute(**fields)


# ============================================================================================
# devinterp 1.x: the callback inside estimate_learning_coeff_with_summary / sample
# ============================================================================================
G_DV1 = "devinterp-1 callback"


@case("dv1: one callback reused for a second estimate_learning_coeff_with_summary run",
      "new run", "one callback per run", group=G_DV1, staged=True)
def _(ctx):
    model, loader, x, y = problem()
    cb = LossKernelCallback((x, y))
    elc(model, loader, [cb, Witness(x, y)], seed=1)
    witness = Witness(x, y)
    ctx.arm()
    results = elc(model, loader, [cb, witness], seed=2)
    return compare(kernel_from_results(results), witness.rows, num_draws=results["loss_kernel/num_draws"])


@case("dv1: callback reused for a second run with another nbeta",
      "new run", "SGLD settings", group=G_DV1, staged=True)
def _(ctx):
    model, loader, x, y = problem()
    cb = LossKernelCallback((x, y))
    elc(model, loader, [cb], seed=1)
    witness = Witness(x, y)
    ctx.arm()
    results = elc(model, loader, [cb, witness], seed=1, nbeta=20.0)
    check = compare(kernel_from_results(results), witness.rows, num_draws=results["loss_kernel/num_draws"])
    if check.ok and cb.kernel.metadata["sampler"].get("nbeta") != 20.0:
        return wrong(f"metadata['sampler'] still says nbeta={cb.kernel.metadata['sampler'].get('nbeta')}")
    return check


@case("dv1: callback reused for a second run on another model (other w*)",
      "new run", "ref_model", group=G_DV1, staged=True)
def _(ctx):
    model, loader, x, y = problem()
    other, _, _, _ = problem(model_seed=5)
    cb = LossKernelCallback((x, y))
    elc(model, loader, [cb], seed=1)
    witness = Witness(x, y)
    ctx.arm()
    results = elc(other, loader, [cb, witness], seed=1)
    check = compare(kernel_from_results(results), witness.rows, num_draws=results["loss_kernel/num_draws"])
    if check.ok:
        expect = F.cross_entropy(other(x), y, reduction="none").detach().double().numpy()
        if not np.allclose(results["loss_kernel/init_loss"], expect, rtol=1e-6):
            return wrong("init_loss is the first model's, not the second run's w*")
    return check


@case("dv1: callbacks=[cb, cb]", "registered twice", group=G_DV1)
def _(ctx):
    model, loader, x, y = problem()
    cb, witness = LossKernelCallback((x, y)), Witness(x, y)
    results = elc(model, loader, [cb, cb, witness])
    return compare(kernel_from_results(results), witness.rows, num_draws=results["loss_kernel/num_draws"])


@case("dv1: the same callback in sample() twice (other seeds)", "new run", group=G_DV1, staged=True)
def _(ctx):
    model, loader, x, y = problem()
    cb = LossKernelCallback((x, y))
    dv_sample(model, loader, [cb], seed=1)
    witness = Witness(x, y)
    ctx.arm()
    dv_sample(model, loader, [cb, witness], seed=2)
    return check_kernel(cb.kernel, witness.rows)


@case("dv1: chains run by separate sample(num_chains=1) calls into one callback",
      "new run", group=G_DV1, staged=True)
def _(ctx):
    # documented: each sample() call ends with finalize(), so the next call is a new run
    model, loader, x, y = problem()
    cb = LossKernelCallback((x, y))
    dv_sample(model, loader, [cb], num_chains=1, seed=1)
    witness = Witness(x, y)
    ctx.arm()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dv_sample(model, loader, [cb, witness], num_chains=1, seed=2)
    if not any("new run" in str(w.message) for w in caught):
        return wrong("no 'new run' warning: the two calls were mixed")
    check = check_kernel(cb.kernel, witness.rows)
    return ok("documented: warned 'a new run started', kernel = the last call's draws; " + check.detail) \
        if check.ok else check


@case("dv1: cores=2", "cores", group=G_DV1)
def _(ctx):
    model, loader, x, y = problem()
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary

    results = estimate_learning_coeff_with_summary(
        model, loader, callbacks=[LossKernelCallback((x, y))], evaluate=evaluate,
        optimizer_kwargs=dict(SGLD), num_chains=2, num_draws=2, cores=2, verbose=False)
    return wrong(f"ran with cores=2: {sorted(results)[:4]}")


def _nan_from(chain_seed: int, from_step: int):
    """An evaluate that returns NaN in the chain seeded ``chain_seed`` from its step ``from_step``
    (devinterp cloudpickles evaluate per chain, so the step counter restarts per chain)."""
    state = {"step": 0}

    def evaluate_nan(model, batch):
        loss = F.cross_entropy(model(batch[0]), batch[1])
        if torch.initial_seed() == chain_seed:
            state["step"] += 1
            if state["step"] >= from_step:
                return loss * float("nan")
        return loss
    return evaluate_nan


def _dv1_nan_case(ctx, window):
    model, loader, x, y = problem()
    seeds = [int(s) for s in np.random.SeedSequence(1).generate_state(2)]
    cb, witness = LossKernelCallback((x, y), divergence_window=window), Witness(x, y)
    # chain 1: 2 burn-in steps, draws 0-2 fine, NaN minibatch loss at draw 3 → devinterp raises
    try:
        elc(model, loader, [cb, witness], evaluate_fn=_nan_from(seeds[1], 6))
    except RuntimeError as error:
        if "NaN" not in str(error):
            raise
    else:
        raise HarnessError("devinterp did not abort the chain")
    ctx.arm()
    k = cb.kernel
    chain1 = witness.of_chain(1)
    kept1 = chain1[: max(0, len(chain1) - window)]  # documented: draws older than the window stay
    return check_kernel(k, witness.of_chain(0) + kept1)


@case("dv1: devinterp aborts chain 1 on a NaN loss; the user catches it and reads cb.kernel",
      "incomplete", "diverged", group=G_DV1, staged=True)
def _(ctx):
    return _dv1_nan_case(ctx, window=16)


@case("dv1: NaN abort of chain 1 with divergence_window=1", "incomplete", "diverged", group=G_DV1, staged=True)
def _(ctx):
    return _dv1_nan_case(ctx, window=1)


@case("dv1: NaN abort, then the same callback rerun with a smaller lr", "new run", group=G_DV1, staged=True)
def _(ctx):
    model, loader, x, y = problem()
    seeds = [int(s) for s in np.random.SeedSequence(1).generate_state(2)]
    cb = LossKernelCallback((x, y))
    try:
        elc(model, loader, [cb], evaluate_fn=_nan_from(seeds[0], 4))
    except RuntimeError:
        pass
    witness = Witness(x, y)
    ctx.arm()
    results = elc(model, loader, [cb, witness], lr=5e-4)
    return compare(kernel_from_results(results), witness.rows, num_draws=results["loss_kernel/num_draws"])


@case("dv1: LossKernelCallback(num_draws=10) but the sampler takes 4 draws per chain", "num_draws",
      group=G_DV1)
def _(ctx):
    model, loader, x, y = problem()
    cb, witness = LossKernelCallback((x, y), num_draws=10), Witness(x, y)
    results = elc(model, loader, [cb, witness])
    return compare(kernel_from_results(results), witness.rows)


@case("dv1: loss_fn=F.cross_entropy passed directly", "loss_fn", group=G_DV1)
def _(ctx):
    model, loader, x, y = problem()
    results = elc(model, loader, [LossKernelCallback((x, y), F.cross_entropy)])
    return wrong(f"ran: {sorted(results)[:3]}")


@case("dv1: loss_fn returning a scalar mean (no reference_model)", "shape", "reduction", group=G_DV1)
def _(ctx):
    model, loader, x, y = problem()
    cb = LossKernelCallback((x, y), lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    elc(model, loader, [cb])
    return wrong("ran")


@case("dv1: loss_fn returning integer 0/1 errors (no reference_model)", "floating", group=G_DV1)
def _(ctx):
    model, loader, x, y = problem()
    cb = LossKernelCallback((x, y), lambda m, b: (m(b[0]).argmax(1) != b[1]).long())
    elc(model, loader, [cb])
    return wrong("ran")


@case("dv1: loss_fn returning [batch, classes] (no reduction over classes)", "shape", group=G_DV1)
def _(ctx):
    model, loader, x, y = problem()
    cb = LossKernelCallback((x, y), lambda m, b: -F.log_softmax(m(b[0]), dim=1))
    elc(model, loader, [cb])
    return wrong("ran")


@case("dv1: a single draw (num_chains=1, num_draws=1)", "at least 2", group=G_DV1)
def _(ctx):
    model, loader, x, y = problem()
    results = elc(model, loader, [LossKernelCallback((x, y))], num_chains=1, num_draws=1)
    if not np.isfinite(results["llc/mean"]):
        return wrong("devinterp's LLC was lost")
    kernel_from_results(results)
    return wrong("a kernel from one draw")


@case("dv1: get_results() before any sampling", "no draws", group=G_DV1)
def _(ctx):
    _, _, x, y = problem()
    results = LossKernelCallback((x, y)).get_results()
    kernel_from_results(results)
    return wrong(f"results without draws: {sorted(results)}")


@case("dv1: results dict carries probe_llc and singular_fluctuation", group=G_DV1)
def _(ctx):
    model, loader, x, y = problem()
    cb, witness = LossKernelCallback((x, y)), Witness(x, y)
    results = elc(model, loader, [cb, SLTSummary(cb), witness])
    missing = [k for k in ("probe_llc", "singular_fluctuation", "init_loss") if f"loss_kernel/{k}" not in results]
    if missing or "llc/mean" not in results:
        return wrong(f"missing keys {missing}")
    num_train = len(loader.dataset)  # ν = βV/2, β = nβ/n, V = n · mean probe variance
    nu = SGLD["nbeta"] / num_train * (num_train * float(reference(witness.rows)[0].diagonal().mean())) / 2
    if not math.isclose(results["loss_kernel/singular_fluctuation"], nu, rel_tol=1e-8):
        return wrong(f"singular_fluctuation {results['loss_kernel/singular_fluctuation']} != βV/2 = {nu}")
    return compare(kernel_from_results(results), witness.rows)


# ============================================================================================
# estimate_loss_kernel: arguments, probes, loss functions
# ============================================================================================
G_EST = "estimate_loss_kernel"


def _est_bad(**changes):
    _, _, x, y = problem()
    k = run_estimate((x, y), **changes)
    return wrong(f"ran: {k!r}")


for _name, _kw, _keys in [
    ("lr=nan", dict(lr=float("nan")), ("lr",)),
    ("lr=-1e-3", dict(lr=-1e-3), ("lr",)),
    ("nbeta=inf", dict(nbeta=float("inf")), ("nbeta",)),
    ("localization=-1", dict(localization=-1.0), ("localization",)),
    ("localization=nan", dict(localization=float("nan")), ("localization",)),
    ("num_draws=2.0", dict(num_draws=2.0), ("num_draws",)),
    ("num_chains=True", dict(num_chains=True), ("num_chains",)),
    ("num_chains=1, num_draws=1", dict(num_chains=1, num_draws=1), ("at least 2",)),
    ("num_burnin_steps=-1", dict(num_burnin_steps=-1), ("num_burnin_steps",)),
    ("seed=-1", dict(seed=-1), ("seed",)),
    ("seed='1'", dict(seed="1"), ("seed",)),
    ("device='cuda' without CUDA", dict(device="cuda"), ("device",)),
    ("dtype=torch.float16", dict(dtype=torch.float16), ("dtype",)),
    ("probe_batch_size=0", dict(probe_batch_size=0), ("batch_size",)),
    ("callback_kwargs with an unknown key", dict(callback_kwargs=dict(colour="red")), ("colour",)),
    ("callback_kwargs=dict(dtype=...) beside dtype=", dict(callback_kwargs=dict(dtype=torch.float32)), ("dtype",)),
    ("rows= out of range (callback_kwargs)", dict(callback_kwargs=dict(rows=[0, 25])), ("rows",)),
    ("loss_fn not callable", dict(loss_fn="cross_entropy"), ("loss_fn",)),
    ("probe_train_mask of 0/1 ints", dict(probe_train_mask=[1] * 10 + [0] * 10), ("probe_train_mask",)),
]:
    case(f"estimate: {_name}", *_keys, group=G_EST)(lambda ctx, _kw=_kw: _est_bad(**_kw))


@case("estimate: loader is a TensorDataset, not a DataLoader", "loader", group=G_EST)
def _(ctx):
    model, loader, x, y = problem()
    estimate_loss_kernel(model, loader.dataset, (x, y), **EST)
    return wrong("ran")


@case("estimate: model is a function, not an nn.Module", "model", group=G_EST)
def _(ctx):
    model, loader, x, y = problem()
    estimate_loss_kernel(lambda t: model(t), loader, (x, y), **EST)
    return wrong("ran")


@case("estimate: labels of the wrong length", "labels", group=G_EST)
def _(ctx):
    _, _, x, y = problem()
    return _est_bad(labels=y[:5])


@case("estimate: numpy labels", group=G_EST)
def _(ctx):
    _, _, x, y = problem()
    k = run_estimate((x, y), labels=y.numpy().astype(np.int32))
    return ok("labels kept as int64") if torch.equal(k.labels, y) and k.labels.dtype == torch.long \
        else wrong(f"labels {k.labels}")


@case("estimate: numpy probe arrays", group=G_EST)
def _(ctx):
    _, _, x, y = problem()
    rec = Recorder()
    k = run_estimate((x.numpy(), y.numpy()), loss_fn=rec)
    check = check_kernel(k, rec.draws())
    if check.ok:  # and the same kernel as with the tensors themselves
        return compare(k.covariance, fresh_rows((x, y)), what="K vs the tensor probe's run")
    return check


@case("estimate: float64 model with a float32 probe", group=G_EST)
def _(ctx):
    model, loader, x, y = problem()
    xt, yt = loader.dataset.tensors  # the SGLD data in float64 too: only the probe stays float32
    loader = DataLoader(TensorDataset(xt.double(), yt), batch_size=16, shuffle=True)
    rec = Recorder()
    k = run_estimate((x, y), loss_fn=rec, model=model.double(), loader=loader)
    if any(d != torch.float64 for d in rec.dtypes):
        return wrong(f"probe reached the float64 model as {set(rec.dtypes)}")
    expect = F.cross_entropy(model(x.double()), y, reduction="none").detach().numpy()
    if not np.allclose(k.init_loss.numpy(), expect, rtol=1e-12):
        return wrong("init_loss is not the float64 model's loss")
    return check_kernel(k, rec.draws())


@case("estimate: loss_fn=F.cross_entropy passed directly", "loss_fn", group=G_EST)
def _(ctx):
    return _est_bad(loss_fn=F.cross_entropy)


@case("estimate: loss_fn returning integers", "floating", group=G_EST)
def _(ctx):
    return _est_bad(loss_fn=lambda m, b: (m(b[0]).argmax(1) != b[1]).long())


@case("estimate: loss_fn returning a scalar mean", "shape", "reduction", group=G_EST)
def _(ctx):
    return _est_bad(loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))


@case("estimate: loss_fn returning shape [batch, 1]", "shape", group=G_EST)
def _(ctx):
    return _est_bad(loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")[:, None])


@case("estimate: loss_fn returning a numpy array", "loss_fn", group=G_EST)
def _(ctx):
    return _est_bad(loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none").detach().numpy())


@case("estimate: evaluate returning per-sample losses (not a scalar)", "evaluate", group=G_EST)
def _(ctx):
    # taking their mean would be right: then the kernel is that of the usual run
    _, _, x, y = problem()
    rec = Recorder()
    k = run_estimate((x, y), loss_fn=rec, evaluate=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))
    check = check_kernel(k, rec.draws())
    return compare(k.covariance, fresh_rows((x, y)), num_draws=k.num_draws,
                   what="K vs the scalar-evaluate run") if check.ok else check


@case("estimate: evaluate returning NaN from w* on", "evaluate", "w*", group=G_EST)
def _(ctx):
    return _est_bad(evaluate=lambda m, b: F.cross_entropy(m(b[0]), b[1]) * float("nan"))


@case("estimate: devinterp aborts chain 1 on a NaN minibatch loss", "diverged", group=G_EST)
def _(ctx):
    _, _, x, y = problem()
    seeds = chain_seeds(EST["seed"], 2)
    rec = Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        k = run_estimate((x, y), loss_fn=rec, evaluate=_nan_from(seeds[1], 6))
    if not any("diverged" in str(w.message) for w in caught):
        return wrong("no warning about the diverged chain")
    if k.metadata.get("diverged_chains") != [1] or k.metadata["llc/per_chain"][1] is not None:
        return wrong(f"metadata: diverged_chains={k.metadata.get('diverged_chains')}")
    check = check_kernel(k, rec.draws()[:4])  # chain 0's draws only; chain 1's were held back
    return ok("documented: warned, chain 1 left out; " + check.detail) if check.ok else check


@case("estimate: a probe sample with an Inf feature (non-finite loss at w*)", "non-finite", "nan", "inf",
      group=G_EST)
def _(ctx):
    _, _, x, y = problem()
    x = x.clone()
    x[3, 2] = float("inf")
    return wrong(f"ran: {run_estimate((x, y))!r}")


@case("estimate: probe features of the wrong width (5, model takes 6)", "probe", group=G_EST)
def _(ctx):
    _, _, x, y = problem()
    return wrong(f"ran: {run_estimate((x[:, :5], y))!r}")


@case("estimate: probe labels out of range for the model's 3 classes", "probe", group=G_EST)
def _(ctx):
    _, _, x, y = problem()
    return wrong(f"ran: {run_estimate((x, y + 3))!r}")


@case("estimate: probe tuple of mismatched lengths", "first dimension", group=G_EST)
def _(ctx):
    _, _, x, y = problem()
    return wrong(f"ran: {run_estimate((x, y[:12]))!r}")


@case("estimate: an empty probe", "empty", group=G_EST)
def _(ctx):
    _, _, x, y = problem()
    return wrong(f"ran: {run_estimate((x[:0], y[:0]))!r}")


@case("estimate: probe DataLoader with drop_last=True (batch 8 drops 4 of 20 samples)",
      "drop_last", group=G_EST)
def _(ctx):
    _, _, x, y = problem()
    k = run_estimate(DataLoader(TensorDataset(x, y), batch_size=8, drop_last=True))
    if k.num_samples != N_PROBE:
        return wrong(f"kernel of {k.num_samples} samples for a probe Dataset of {N_PROBE}, no warning")
    return ok("all 20 samples")


@case("estimate: callback_kwargs num_draws=10 while num_draws=4", "num_draws", group=G_EST)
def _(ctx):
    _, _, x, y = problem()
    rec = Recorder()
    k = run_estimate((x, y), loss_fn=rec, callback_kwargs=dict(num_draws=10))
    if k.metadata.get("diverged_chains") or k.metadata.get("chain_failures"):
        return Check(False, f"kernel of {k.num_draws} draws, but metadata says chains "
                            f"{k.metadata.get('diverged_chains') or list(k.metadata['chain_failures'])} failed: "
                            f"{one_line(str(k.metadata.get('chain_failures')), 120)}", ("num_draws",))
    return check_kernel(k, rec.draws())


@case("estimate: rows= as a numpy int array (rectangular kernel)", group=G_EST)
def _(ctx):
    _, _, x, y = problem()
    rec = Recorder()
    k = run_estimate((x, y), loss_fn=rec, callback_kwargs=dict(rows=np.array([3, 0, 7])))
    return check_kernel(k, rec.draws(), sel=[3, 0, 7])


# ============================================================================================
# estimate_loss_kernel(checkpoint_dir=): resumes, finished runs, damaged files
# ============================================================================================
G_CKPT = "checkpoint"


@case("resume: identical arguments (control)", group=G_CKPT, staged=True)
def _(ctx):
    return resume_check(ctx)


@case("resume: another probe of the same size (other samples)", "callback.probe", group=G_CKPT, staged=True)
def _(ctx):
    x, y = data()
    return resume_check(ctx, probe1=(x[:20], y[:20]), probe2=(x[20:40], y[20:40]))


@case("resume: the same probe samples in reverse order", "callback.probe", group=G_CKPT, staged=True)
def _(ctx):
    x, y = data()
    return resume_check(ctx, probe1=(x[:20], y[:20]), probe2=(x[:20].flip(0), y[:20].flip(0)))


@case("resume: other labels=", "labels", group=G_CKPT, staged=True)
def _(ctx):
    _, _, x, y = problem()
    return resume_check(ctx, first=dict(labels=y), second=dict(labels=(y + 1) % 3))


@case("resume: other rows=", "rows", group=G_CKPT, staged=True)
def _(ctx):
    return resume_check(ctx, first=dict(callback_kwargs=dict(rows=[0, 1, 2])),
                        second=dict(callback_kwargs=dict(rows=[0, 1, 3])), sel=[0, 1, 3])


@case("resume: other dtype=", "dtype", group=G_CKPT, staged=True)
def _(ctx):
    return resume_check(ctx, first=dict(), second=dict(dtype=torch.float32), rtol=1e-5)


@case("resume: other seed=", "seed", group=G_CKPT, staged=True)
def _(ctx):
    return resume_check(ctx, first=dict(seed=1), second=dict(seed=12))


@case("resume: other lr=", "lr", group=G_CKPT, staged=True)
def _(ctx):
    return resume_check(ctx, first=dict(), second=dict(lr=2e-3))


@case("resume: other num_burnin_steps=", "num_burnin_steps", group=G_CKPT, staged=True)
def _(ctx):
    return resume_check(ctx, first=dict(), second=dict(num_burnin_steps=3))


@case("resume: more chains (num_chains 2 -> 3)", "num_chains", group=G_CKPT, staged=True)
def _(ctx):
    return resume_check(ctx, first=dict(), second=dict(num_chains=3))


@case("resume: other probe_batch_size (harmless)", group=G_CKPT, staged=True)
def _(ctx):
    # with probe_batch_size=7 a pass is 3 loss_fn calls: compare with an uninterrupted run instead
    _, _, x, y = problem()
    d = interrupt_run(ctx, (x, y))
    ctx.arm()
    k = run_estimate((x, y), checkpoint_dir=d, probe_batch_size=7)
    return compare(k.covariance, fresh_rows((x, y)), num_draws=k.num_draws, rtol=1e-6)


@case("resume: killed in chain 0, before any checkpoint was written", group=G_CKPT, staged=True)
def _(ctx):
    _, _, x, y = problem()
    d = ctx.tmpdir()
    try:
        run_estimate((x, y), loss_fn=Recorder(kill_at=3), checkpoint_dir=d)
    except Interrupt:
        pass
    ctx.arm()
    k = run_estimate((x, y), checkpoint_dir=d)
    return compare(k.covariance, fresh_rows((x, y)), num_draws=k.num_draws)


@case("resume: verbose toggled (harmless)", group=G_CKPT, staged=True)
def _(ctx):
    return resume_check(ctx, first=dict(verbose=False), second=dict(verbose=True))


@case("resume: seed=None both times", "seed", group=G_CKPT, staged=True)
def _(ctx):
    _, _, x, y = problem()
    d = interrupt_run(ctx, (x, y), seed=None)
    ctx.arm()
    k = run_estimate((x, y), checkpoint_dir=d, seed=None)
    seed = k.metadata["settings"]["seed"]
    return compare(k.covariance, fresh_rows((x, y), seed=seed), num_draws=k.num_draws,
                   what=f"K vs an uninterrupted run with seed={seed}")


@case("resume: another loss_fn (same shapes, losses x2)", "loss_fn", group=G_CKPT, staged=True)
def _(ctx):
    return resume_check(ctx, loss_fn2=Recorder(scale=2.0))


@case("resume: another model (other w*, same architecture)", "model", "w*", group=G_CKPT, staged=True)
def _(ctx):
    other, _, _, _ = problem(model_seed=7)
    return resume_check(ctx, model2=other)


@case("resume: other training data of the same size", "loader", "training data", group=G_CKPT, staged=True)
def _(ctx):
    x2, y2 = data(seed=9)
    return resume_check(ctx, loader2=DataLoader(TensorDataset(x2, y2), batch_size=16, shuffle=True))


@case("resume: another evaluate (SGLD loss with an L2 term)", "evaluate", group=G_CKPT, staged=True)
def _(ctx):
    return resume_check(ctx, first=dict(), second=dict(evaluate=evaluate_l2))


@case("finished run called again with the same checkpoint_dir", group=G_CKPT, staged=True)
def _(ctx):
    _, _, x, y = problem()
    d = ctx.tmpdir()
    first = run_estimate((x, y), checkpoint_dir=d)
    ctx.arm()
    again = run_estimate((x, y), checkpoint_dir=d)
    for key in ("sampler", "probe_llc", "singular_fluctuation", "llc/mean", "llc/per_chain", "settings"):
        if key not in again.metadata:
            return wrong(f"metadata lacks {key!r}")
        if again.metadata[key] != first.metadata[key]:
            return wrong(f"metadata[{key!r}] = {again.metadata[key]!r}, first run {first.metadata[key]!r}")
    if ctx.steps():
        return wrong(f"resampled ({ctx.steps()} steps) instead of reporting")
    if not torch.equal(again.covariance, first.covariance):
        return wrong("another kernel")
    return ok("same kernel and metadata (sampler, probe_llc, singular_fluctuation, llc/*), 0 steps")


@case("checkpoint: a few bytes flipped inside a tensor", CHECKPOINT_NAME, group=G_CKPT, staged=True)
def _(ctx):
    _, _, x, y = problem()
    d = interrupt_run(ctx, (x, y))
    flip_tensor_bytes(d / CHECKPOINT_NAME)
    ctx.arm()
    k = run_estimate((x, y), checkpoint_dir=d)
    return compare(k.covariance, fresh_rows((x, y)), num_draws=k.num_draws)


@case("checkpoint: a flipped byte in the zip header (the first entry's name)", CHECKPOINT_NAME, group=G_CKPT,
      staged=True)
def _(ctx):
    _, _, x, y = problem()
    d = interrupt_run(ctx, (x, y))
    raw = bytearray((d / CHECKPOINT_NAME).read_bytes())
    raw[30 + 3] ^= 0x20  # local file header: 30 fixed bytes, then the entry's file name
    (d / CHECKPOINT_NAME).write_bytes(bytes(raw))
    ctx.arm()
    k = run_estimate((x, y), checkpoint_dir=d)
    return compare(k.covariance, fresh_rows((x, y)), num_draws=k.num_draws)


@case("checkpoint: truncated file", CHECKPOINT_NAME, group=G_CKPT, staged=True)
def _(ctx):
    _, _, x, y = problem()
    d = interrupt_run(ctx, (x, y))
    raw = (d / CHECKPOINT_NAME).read_bytes()
    (d / CHECKPOINT_NAME).write_bytes(raw[: len(raw) * 2 // 3])
    ctx.arm()
    k = run_estimate((x, y), checkpoint_dir=d)
    return compare(k.covariance, fresh_rows((x, y)), num_draws=k.num_draws)


@case("checkpoint: an empty (0-byte) file", CHECKPOINT_NAME, group=G_CKPT, staged=True)
def _(ctx):
    _, _, x, y = problem()
    d = ctx.tmpdir()
    (d / CHECKPOINT_NAME).write_bytes(b"")
    ctx.arm()
    k = run_estimate((x, y), checkpoint_dir=d)
    return compare(k.covariance, fresh_rows((x, y)), num_draws=k.num_draws)


@case("checkpoint: a LossKernel file put where the checkpoint belongs", CHECKPOINT_NAME, group=G_CKPT,
      staged=True)
def _(ctx):
    _, _, x, y = problem()
    d = ctx.tmpdir()
    run_estimate((x, y)).save(d / CHECKPOINT_NAME)
    ctx.arm()
    k = run_estimate((x, y), checkpoint_dir=d)
    return compare(k.covariance, fresh_rows((x, y)), num_draws=k.num_draws)


@case("checkpoint_dir is an existing regular file", "checkpoint_dir", "directory", group=G_CKPT, staged=True)
def _(ctx):
    _, _, x, y = problem()
    path = ctx.tmpdir() / "notes.txt"
    path.write_text("not a directory")
    ctx.arm()
    k = run_estimate((x, y), checkpoint_dir=path)
    return wrong(f"ran: {k!r}")


# ============================================================================================
# KernelAccumulator: merges, state, updates
# ============================================================================================
G_ACC = "accumulator"


def draws(count, n=8, seed=0, mean=1.0, scale=0.1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (mean + scale * torch.randn(count, n, generator=g, dtype=torch.float64)).to(dtype)


def acc_with(block, **kw) -> KernelAccumulator:
    acc = KernelAccumulator(block.shape[1], block_size=kw.pop("block_size", 4), **kw)
    acc.update(block)
    return acc


def rows_of(*blocks):
    return [r.double().numpy() for b in blocks for r in b]


@case("acc: merge with itself", "itself", group=G_ACC)
def _(ctx):
    a = acc_with(draws(6))
    a.merge(a)
    return compare(a.compute().covariance, rows_of(draws(6)), num_draws=a.count)


@case("acc: the same accumulator merged twice", "twice", "already", group=G_ACC)
def _(ctx):
    a, b = acc_with(draws(6, seed=1)), acc_with(draws(5, seed=2))
    a.merge(b)
    a.merge(b)
    return compare(a.compute().covariance, rows_of(draws(6, seed=1), draws(5, seed=2)), num_draws=a.count)


@case("acc: merged with its own clone", "twice", "already", group=G_ACC)
def _(ctx):
    a = acc_with(draws(6))
    a.merge(a.clone())
    return compare(a.compute().covariance, rows_of(draws(6)), num_draws=a.count)


@case("acc: a clone fed more draws, merged back into the original", "twice", "already", group=G_ACC)
def _(ctx):
    a = acc_with(draws(6, seed=1))
    b = a.clone()
    b.update(draws(4, seed=2))
    a.merge(b)
    return compare(a.compute().covariance, rows_of(draws(6, seed=1), draws(4, seed=2)), num_draws=a.count)


@case("acc: clones of an empty template, fed distinct draws, then merged", group=G_ACC)
def _(ctx):
    template = KernelAccumulator(8, block_size=4)
    parts = [template.clone() for _ in range(3)]
    for i, p in enumerate(parts):
        p.update(draws(5, seed=10 + i))
    merged = KernelAccumulator.merged(parts)
    return compare(merged.compute().covariance, rows_of(*(draws(5, seed=10 + i) for i in range(3))),
                   num_draws=merged.count)


@case("acc: merge of two independent accumulators", group=G_ACC)
def _(ctx):
    a, b = acc_with(draws(7, seed=1)), acc_with(draws(3, seed=2, mean=5.0))
    a.merge(b)
    return compare(a.compute().covariance, rows_of(draws(7, seed=1), draws(3, seed=2, mean=5.0)),
                   num_draws=a.count, mean=a.compute().mean)


@case("acc: KernelAccumulator.merged of three, other block sizes", group=G_ACC)
def _(ctx):
    parts = [acc_with(draws(4 + i, seed=i), block_size=1 + 2 * i) for i in range(3)]
    merged = KernelAccumulator.merged(parts)
    return compare(merged.compute().covariance, rows_of(*(draws(4 + i, seed=i) for i in range(3))),
                   num_draws=merged.count)


@case("acc: KernelAccumulator.merged([a, a])", "itself", "twice", "already", group=G_ACC)
def _(ctx):
    a = acc_with(draws(6))
    m = KernelAccumulator.merged([a, a])
    return compare(m.compute().covariance, rows_of(draws(6)), num_draws=m.count)


@case("acc: merge into c of a and of b, where b already holds a", "twice", "already", group=G_ACC)
def _(ctx):
    a, b, c = acc_with(draws(5, seed=1)), acc_with(draws(5, seed=2)), acc_with(draws(5, seed=3))
    b.merge(a)
    c.merge(a)
    c.merge(b)
    return compare(c.compute().covariance, rows_of(draws(5, seed=1), draws(5, seed=2), draws(5, seed=3)),
                   num_draws=c.count)


@case("acc: an empty accumulator merged both ways", group=G_ACC)
def _(ctx):
    a, e1, e2 = acc_with(draws(6)), KernelAccumulator(8), KernelAccumulator(8)
    a.merge(e1)
    e2.merge(a)
    c1 = compare(a.compute().covariance, rows_of(draws(6)), num_draws=a.count)
    c2 = compare(e2.compute().covariance, rows_of(draws(6)), num_draws=e2.count)
    return c1 if not c1.ok else c2


@case("acc: merge with another num_samples", "num_samples", group=G_ACC)
def _(ctx):
    acc_with(draws(4)).merge(acc_with(draws(4, n=9)))
    return wrong("merged")


@case("acc: merge with other rows", "rows", group=G_ACC)
def _(ctx):
    acc_with(draws(4), rows=[0, 1]).merge(acc_with(draws(4, seed=1), rows=[0, 2]))
    return wrong("merged")


@case("acc: merge of a square into a rectangular accumulator", "rows", group=G_ACC)
def _(ctx):
    acc_with(draws(4), rows=[0, 1]).merge(acc_with(draws(4, seed=1)))
    return wrong("merged")


@case("acc: merge with another dtype", "dtype", group=G_ACC)
def _(ctx):
    acc_with(draws(4)).merge(acc_with(draws(4, seed=1), dtype=torch.float32))
    return wrong("merged")


@case("acc: merge with an accumulator of another probe fingerprint", "probe", group=G_ACC)
def _(ctx):
    acc_with(draws(4), probe="aaaa").merge(acc_with(draws(4, seed=1), probe="bbbb"))
    return wrong("merged")


@case("acc: merge with a plain dict", "KernelAccumulator", group=G_ACC)
def _(ctx):
    acc_with(draws(4)).merge(acc_with(draws(4)).state_dict())
    return wrong("merged")


@case("acc: state_dict() then more draws (snapshot must not change)", group=G_ACC)
def _(ctx):
    a = acc_with(draws(6, seed=1))
    state = a.state_dict()
    frozen = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    a.update(draws(5, seed=2))
    a.compute()
    changed = [k for k, v in frozen.items() if not torch.equal(state[k], v)]
    if changed or state["count"] != 6:
        return wrong(f"snapshot changed: {changed}, count {state['count']}")
    b = KernelAccumulator(8, block_size=4)
    b.load_state_dict(state)
    return compare(b.compute().covariance, rows_of(draws(6, seed=1)), num_draws=b.count,
                   what="K of the reloaded snapshot")


@case("acc: state_dict() -> load into a new accumulator -> more draws", group=G_ACC)
def _(ctx):
    a = acc_with(draws(6, seed=1), block_size=5)
    b = KernelAccumulator(8, block_size=3)
    b.load_state_dict(a.state_dict())
    b.update(draws(4, seed=2))
    return compare(b.compute().covariance, rows_of(draws(6, seed=1), draws(4, seed=2)), num_draws=b.count)


@case("acc: state_dict() through torch.save / torch.load(weights_only=True)", group=G_ACC)
def _(ctx):
    a = acc_with(draws(6, seed=1), rows=[1, 3], dtype=torch.float32)
    path = ctx.tmpdir() / "acc.pt"
    torch.save(a.state_dict(), path)
    b = KernelAccumulator(8, rows=[1, 3], dtype=torch.float32)
    b.load_state_dict(torch.load(path, weights_only=True))
    b.update(draws(3, seed=2, dtype=torch.float32))
    return compare(b.compute().covariance, rows_of(draws(6, seed=1, dtype=torch.float32),
                                                   draws(3, seed=2, dtype=torch.float32)),
                   num_draws=b.count, sel=[1, 3], rtol=1e-5)


@case("acc: load_state_dict with other rows", "rows", group=G_ACC)
def _(ctx):
    KernelAccumulator(8, rows=[0, 2]).load_state_dict(acc_with(draws(4), rows=[0, 1]).state_dict())
    return wrong("loaded")


@case("acc: load_state_dict of a square state into a rectangular accumulator", "rows", group=G_ACC)
def _(ctx):
    KernelAccumulator(8, rows=[0, 2]).load_state_dict(acc_with(draws(4)).state_dict())
    return wrong("loaded")


@case("acc: load_state_dict with another num_samples", "num_samples", group=G_ACC)
def _(ctx):
    KernelAccumulator(9).load_state_dict(acc_with(draws(4)).state_dict())
    return wrong("loaded")


@case("acc: load_state_dict with another dtype", "dtype", group=G_ACC)
def _(ctx):
    KernelAccumulator(8, dtype=torch.float32).load_state_dict(acc_with(draws(4)).state_dict())
    return wrong("loaded")


@case("acc: load_state_dict of a model's state_dict", "state", group=G_ACC)
def _(ctx):
    KernelAccumulator(8).load_state_dict(MLP().state_dict())
    return wrong("loaded")


@case("acc: one state loaded into two accumulators, each fed more, then merged", "twice", "already",
      group=G_ACC)
def _(ctx):
    state = acc_with(draws(5, seed=1)).state_dict()
    a, b = KernelAccumulator(8), KernelAccumulator(8)
    a.load_state_dict(state)
    b.load_state_dict(state)
    a.update(draws(3, seed=2))
    b.update(draws(3, seed=3))
    a.merge(b)
    return wrong(f"merged: the 5 shared draws are in twice (count {a.count})")


@case("acc: update with NaN", "nan", group=G_ACC)
def _(ctx):
    block = draws(4)
    block[2, 3] = float("nan")
    acc_with(block)
    return wrong("accepted")


@case("acc: update with -Inf", "inf", group=G_ACC)
def _(ctx):
    block = draws(4)
    block[0, 0] = -float("inf")
    acc_with(block)
    return wrong("accepted")


@case("acc: update with the wrong shape", "shape", group=G_ACC)
def _(ctx):
    KernelAccumulator(8).update(draws(4, n=7))
    return wrong("accepted")


@case("acc: update with 3-D losses", "shape", group=G_ACC)
def _(ctx):
    KernelAccumulator(8).update(draws(4).reshape(2, 2, 8))
    return wrong("accepted")


@case("acc: update with integer losses", "floating", group=G_ACC)
def _(ctx):
    KernelAccumulator(8).update(torch.randint(0, 3, (4, 8)))
    return wrong("accepted")


@case("acc: update with bool losses", "floating", group=G_ACC)
def _(ctx):
    KernelAccumulator(8).update(torch.rand(4, 8) > 0.5)
    return wrong("accepted")


@case("acc: update with a numpy float64 array", group=G_ACC)
def _(ctx):
    a = KernelAccumulator(8, block_size=3)
    a.update(draws(7).numpy())
    return compare(a.compute().covariance, rows_of(draws(7)), num_draws=a.count)


@case("acc: update with float16 losses", group=G_ACC)
def _(ctx):
    block = draws(7, dtype=torch.float16)
    a = KernelAccumulator(8, block_size=3)
    a.update(block)
    return compare(a.compute().covariance, rows_of(block), num_draws=a.count, rtol=1e-6)


@case("acc: update one draw at a time as [n] vectors", group=G_ACC)
def _(ctx):
    a = KernelAccumulator(8, block_size=3)
    for row in draws(7):
        a.update(row)
    return compare(a.compute().covariance, rows_of(draws(7)), num_draws=a.count)


@case("acc: update with an empty [0, n] block", group=G_ACC)
def _(ctx):
    a = acc_with(draws(5))
    a.update(torch.empty(0, 8))
    return compare(a.compute().covariance, rows_of(draws(5)), num_draws=a.count)


@case("acc: update with losses that require grad (no torch.no_grad)", group=G_ACC)
def _(ctx):
    w = torch.ones(8, requires_grad=True)
    block = draws(6) * w
    a = KernelAccumulator(8, block_size=4)
    a.update(block)
    k = a.compute()
    check = compare(k.covariance.detach(), rows_of(draws(6)), num_draws=k.num_draws)
    if not check.ok:
        return check
    try:
        k.covariance.numpy()
    except RuntimeError as e:
        raise RuntimeError(f"values right, but the kernel carries an autograd graph; kernel.covariance.numpy(): {e}") \
            from None
    return check


def _precision(dtype_in, merge=False):
    g = torch.Generator().manual_seed(4)
    n, t = 10, 400
    factors = torch.randn(n, 3, generator=g, dtype=torch.float64)
    latent = torch.randn(t, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(t, n, generator=g, dtype=torch.float64)
    block = (1e4 + 1e-3 * (latent @ factors.T + 0.5 * noise) / 2).to(dtype_in)  # variance ~1e-6
    rows = rows_of(block)
    if merge:
        a = acc_with(block[:150], dtype=torch.float32, block_size=32)
        b = acc_with(block[150:], dtype=torch.float32, block_size=32)
        a.merge(b)
    else:
        a = acc_with(block, dtype=torch.float32, block_size=32)
    k = a.compute()
    ref, _ = reference(rows)
    sd = np.sqrt(np.diag(ref))
    ref_corr = ref / np.outer(sd, sd)
    err = float(np.abs(k.correlation.double().numpy() - ref_corr).max())
    var_err = float(np.abs(k.variance.double().numpy() / np.diag(ref) - 1).max())
    detail = (f"float32 accumulator, mean 1e4, variance ~{np.diag(ref).mean():.1e}: max|ΔR| = {err:.1e}, "
              f"max rel Δvar = {var_err:.1e} vs float64 np.cov")
    return ok(detail) if err < 1e-3 and var_err < 1e-3 else wrong(detail)


@case("acc: float32 accumulator, losses of mean 1e4 and variance 1e-6 (float64 input)", group=G_ACC)
def _(ctx):
    return _precision(torch.float64)


@case("acc: the same, float32 input losses", group=G_ACC)
def _(ctx):
    return _precision(torch.float32)


@case("acc: the same, two float32 accumulators merged", group=G_ACC)
def _(ctx):
    return _precision(torch.float64, merge=True)


@case("acc: compute() after one draw", "at least 2", group=G_ACC)
def _(ctx):
    acc_with(draws(1)).compute()
    return wrong("a kernel of one draw")


for _name, _rows, _keys in [("out of range", [0, 8], ("rows",)), ("negative", [-1, 2], ("rows",)),
                            ("as floats", [0.0, 1.5], ("rows",)),
                            ("empty", [], ("empty", "at least one")),  # "rows" alone would not say what is wrong
                            ("as a bool mask", [True] * 8, ("rows",))]:
    case(f"acc: rows {_name}", *_keys, group=G_ACC)(
        lambda ctx, _rows=_rows: wrong(f"accepted: {KernelAccumulator(8, rows=_rows)!r}"))


@case("acc: rows with a duplicate index", group=G_ACC)
def _(ctx):
    a = acc_with(draws(6), rows=[2, 2, 5])
    return compare(a.compute().covariance, rows_of(draws(6)), num_draws=a.count, sel=[2, 2, 5])


for _name, _kw, _keys in [("num_samples=0", dict(num_samples=0), ("num_samples",)),
                          ("num_samples=True", dict(num_samples=True), ("num_samples",)),
                          ("num_samples=8.0", dict(num_samples=8.0), ("num_samples",)),
                          ("device='cuda' without CUDA", dict(num_samples=8, device="cuda"), ("device",)),
                          ("block_size=0", dict(num_samples=8, block_size=0), ("block_size",)),
                          ("dtype=torch.bfloat16", dict(num_samples=8, dtype=torch.bfloat16), ("dtype",))]:
    case(f"acc: KernelAccumulator({_name})", *_keys, group=G_ACC)(
        lambda ctx, _kw=_kw: wrong(f"accepted: {KernelAccumulator(**_kw)!r}"))


@case("acc: covariance_block with an index out of range", "indices", group=G_ACC)
def _(ctx):
    acc_with(draws(5)).covariance_block([0, 8])
    return wrong("accepted")


@case("acc: a clone fed more draws leaves the original alone", group=G_ACC)
def _(ctx):
    a = acc_with(draws(5, seed=1))
    b = a.clone()
    b.update(draws(5, seed=2))
    return compare(a.compute().covariance, rows_of(draws(5, seed=1)), num_draws=a.count)


# ============================================================================================
# LossKernel files
# ============================================================================================
G_FILE = "kernel file"


class _Odd:
    def __repr__(self):
        return "<odd object>"


@case("file: save metadata with NaN / +-Inf, then load", group=G_FILE)
def _(ctx):
    path = ctx.tmpdir() / "k.pt"
    small_kernel(metadata={"a": float("nan"), "b": float("inf"), "c": -float("inf"),
                           "nested": {"x": [1.0, float("nan")]}}).save(path)
    m = LossKernel.load(path).metadata
    good = (math.isnan(m["a"]) and m["b"] == float("inf") and m["c"] == -float("inf")
            and m["nested"]["x"][0] == 1.0 and math.isnan(m["nested"]["x"][1]))
    return ok("NaN and ±Inf come back as floats") if good else wrong(f"metadata came back as {m}")


@case("file: save int-keyed dicts, then load", group=G_FILE)
def _(ctx):
    path = ctx.tmpdir() / "k.pt"
    small_kernel(draws_per_chain={0: 3, 1: 3}, metadata={"per_chain": {0: 1.5, 1: 2.5}, 7: "seven"}).save(path)
    k = LossKernel.load(path)
    good = k.metadata["per_chain"] == {0: 1.5, 1: 2.5} and k.metadata[7] == "seven" and k.draws_per_chain == {0: 3, 1: 3}
    return ok("int keys stay ints") if good else wrong(f"came back as {k.metadata}, {k.draws_per_chain}")


@case("file: save tuples, numpy arrays/scalars, sets, tensors, odd objects", group=G_FILE)
def _(ctx):
    path = ctx.tmpdir() / "k.pt"
    meta = {"t": (1, 2), "arr": np.arange(3), "np": np.float32(1.5), "s": {3, 1}, "tensor": torch.ones(2),
            "odd": _Odd(), (1, 2): "tuple key"}
    small_kernel(metadata=meta).save(path)
    m = LossKernel.load(path).metadata
    expect = {"t": (1, 2), "arr": [0, 1, 2], "np": 1.5, "s": [1, 3], "odd": "<odd object>", "(1, 2)": "tuple key"}
    bad = {k: m.get(k) for k, v in expect.items() if m.get(k) != v or type(m.get(k)) is not type(v)}
    if bad or not torch.equal(m.get("tensor"), torch.ones(2)):
        return wrong(f"came back differently from the documented conversions: {bad}")
    return ok("as documented: tuples stay, arrays → lists, numpy scalars → floats, sets → sorted lists, repr")


@case("file: a few bytes flipped inside the covariance tensor", "k.pt", group=G_FILE, staged=True)
def _(ctx):
    path = ctx.tmpdir() / "k.pt"
    k0 = small_kernel()
    k0.save(path)
    flip_tensor_bytes(path)
    ctx.arm()
    k = LossKernel.load(path)
    return ok("loaded the same kernel") if torch.equal(k.covariance, k0.covariance) else wrong("loaded a damaged kernel")


@case("file: truncated kernel file", "k.pt", group=G_FILE, staged=True)
def _(ctx):
    path = ctx.tmpdir() / "k.pt"
    small_kernel().save(path)
    path.write_bytes(path.read_bytes()[:300])
    ctx.arm()
    LossKernel.load(path)
    return wrong("loaded")


@case("file: load a path that does not exist", "missing.pt", group=G_FILE)
def _(ctx):
    LossKernel.load(ctx.tmpdir() / "missing.pt")
    return wrong("loaded")


@case("file: load a checkpoint as a LossKernel", CHECKPOINT_NAME, group=G_FILE, staged=True)
def _(ctx):
    _, _, x, y = problem()
    d = interrupt_run(ctx, (x, y))
    ctx.arm()
    LossKernel.load(d / CHECKPOINT_NAME)
    return wrong("loaded")


@case("file: edited with torch.load/torch.save (metadata changed, checksum stale)", "k.pt", group=G_FILE,
      staged=True)
def _(ctx):
    path = ctx.tmpdir() / "k.pt"
    small_kernel(metadata={"note": "a"}).save(path)
    payload = torch.load(path, weights_only=True)
    payload["metadata"]["note"] = "b"
    torch.save(payload, path)
    ctx.arm()
    k = LossKernel.load(path)
    return wrong(f"loaded with note={k.metadata['note']!r}")


@case("file: a payload without its checksum", "checksum", group=G_FILE, staged=True)
def _(ctx):
    path = ctx.tmpdir() / "k.pt"
    small_kernel().save(path)
    payload = torch.load(path, weights_only=True)
    payload.pop("checksum")
    torch.save(payload, path)
    ctx.arm()
    LossKernel.load(path)
    return wrong("loaded an unverified file")


@case("file: a foreign torch file (a model state_dict)", "m.pt", group=G_FILE, staged=True)
def _(ctx):
    path = ctx.tmpdir() / "m.pt"
    torch.save(MLP().state_dict(), path)
    ctx.arm()
    LossKernel.load(path)
    return wrong("loaded")


@case("file: rectangular kernel with labels and string sample_ids round trip", group=G_FILE)
def _(ctx):
    path = ctx.tmpdir() / "sub" / "dir" / "k.pt"  # directories that do not exist yet
    g = torch.Generator().manual_seed(1)
    acc = KernelAccumulator(5, rows=[4, 1])
    acc.update(torch.randn(6, 5, generator=g))
    k0 = acc.compute(labels=[0, 1, 2, 1, 0], sample_ids=["a", "b", "c", "d", "e"])
    k0.save(path)
    k = LossKernel.load(path)
    good = (torch.equal(k.covariance, k0.covariance) and torch.equal(k.rows, k0.rows)
            and torch.equal(k.labels, k0.labels) and list(k.sample_ids) == ["a", "b", "c", "d", "e"])
    return ok("bit-exact, rows/labels/sample_ids kept") if good else wrong("changed in the round trip")


@case("file: load with map_location='cuda' without CUDA", "map_location", "cuda", group=G_FILE, staged=True)
def _(ctx):
    path = ctx.tmpdir() / "k.pt"
    small_kernel().save(path)
    ctx.arm()
    k = LossKernel.load(path, map_location="cuda")
    return wrong(f"loaded onto {k.covariance.device}")


@case("file: LossKernel built with a covariance of the wrong shape", "covariance", group=G_FILE)
def _(ctx):
    LossKernel(covariance=torch.zeros(4, 5), mean=torch.zeros(5), variance=torch.zeros(5), num_draws=3)
    return wrong("built")


# ============================================================================================
# LossKernelCallback: probes, labels, loss functions, arguments
# ============================================================================================
G_PROBE = "probe & constructor"


def _shuffling(make_loader):
    _, _, x, y = problem()
    cb = LossKernelCallback(make_loader(TensorDataset(x, y)))
    return wrong(f"accepted: {cb!r}")


class RandomOrder(Sampler):
    """A custom sampler with no `shuffle` flag."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(torch.randperm(self.n).tolist())

    def __len__(self):
        return self.n


class FixedOrder(Sampler):
    def __init__(self, order):
        self.order = list(order)

    def __iter__(self):
        return iter(self.order)

    def __len__(self):
        return len(self.order)


class LateShuffle(Sampler):
    """Natural order for the first ``calm`` passes, then reversed (or random): a sampler whose
    epoch-dependent order (set_epoch-style) changes after the callback has checked it."""

    def __init__(self, n, calm=2, random=False):
        self.n, self.calm, self.random, self.passes = n, calm, random, 0

    def __iter__(self):
        self.passes += 1
        if self.passes <= self.calm:
            return iter(range(self.n))
        if self.random:
            return iter(torch.randperm(self.n).tolist())
        return iter(reversed(range(self.n)))

    def __len__(self):
        return self.n


class Augmented(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.05 * torch.randn_like(self.x[i]), self.y[i]


for _name, _make, _keys in [
    ("DataLoader(shuffle=True)", lambda ds: DataLoader(ds, batch_size=8, shuffle=True), ("shuffle",)),
    ("DataLoader with a SubsetRandomSampler", lambda ds: DataLoader(ds, batch_size=8, sampler=SubsetRandomSampler(range(20))),
     ("SubsetRandomSampler",)),
    ("DataLoader with a BatchSampler over a RandomSampler",
     lambda ds: DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), 8, False)), ("RandomSampler",)),
    ("DataLoader with a WeightedRandomSampler",
     lambda ds: DataLoader(ds, batch_size=8, sampler=WeightedRandomSampler(torch.ones(20), 20)), ("WeightedRandomSampler",)),
    ("DataLoader with a custom random Sampler", lambda ds: DataLoader(ds, batch_size=8, sampler=RandomOrder(20)),
     ("same order",)),
    ("Dataset with random augmentation", lambda ds: Augmented(*ds.tensors), ("random", "same order")),
    ("DataLoader over an augmenting Dataset", lambda ds: DataLoader(Augmented(*ds.tensors), batch_size=8),
     ("random", "same order")),
    ("DataLoader with a DistributedSampler(shuffle=True)",
     lambda ds: DataLoader(ds, batch_size=8, sampler=torch.utils.data.distributed.DistributedSampler(
         ds, num_replicas=1, rank=0, shuffle=True)), ("shuffle",)),
]:
    case(f"probe: {_name}", *_keys, group=G_PROBE)(lambda ctx, _make=_make: _shuffling(_make))


def _probe_loop(probe, x, y, n_expect=N_PROBE, labels=None, **kw):
    """Run the callback on ``probe`` in a hand-written loop; the witness sees (x, y) in natural order."""
    model, _, _, _ = problem()
    cb, witness = LossKernelCallback(probe, labels=labels, **kw), Witness(x, y)
    loop(cb, model, witness=witness)
    k = cb.kernel
    if k.num_samples != n_expect:
        return wrong(f"kernel of {k.num_samples} samples, expected {n_expect}")
    return check_kernel(k, witness.rows, rtol=1e-6)


@case("probe: a fixed custom order (not shuffled) via a Sampler", group=G_PROBE)
def _(ctx):
    _, _, x, y = problem()
    order = list(reversed(range(20)))
    return _probe_loop(DataLoader(TensorDataset(x, y), batch_size=6, sampler=FixedOrder(order)), x[order], y[order])


@case("probe: Subset with a fixed index list", group=G_PROBE)
def _(ctx):
    x, y = data()
    idx = [5, 3, 40, 41, 7, 9, 11, 2, 0, 1]
    return _probe_loop(DataLoader(Subset(TensorDataset(x, y), idx), batch_size=4), x[idx], y[idx], n_expect=10)


@case("probe: a sampler that reverses its order after the callback's two check passes",
      "same order", "shuffl", group=G_PROBE)
def _(ctx):
    _, _, x, y = problem()
    return _probe_loop(DataLoader(TensorDataset(x, y), batch_size=8, sampler=LateShuffle(20)), x, y, labels=y)


@case("probe: a sampler turning random after the check passes, cache_probe_on_device=False",
      "same order", "shuffl", group=G_PROBE)
def _(ctx):
    _, _, x, y = problem()
    return _probe_loop(DataLoader(TensorDataset(x, y), batch_size=8, sampler=LateShuffle(20, random=True)), x, y,
                       cache_probe_on_device=False)


@case("probe: numpy arrays (x, y)", group=G_PROBE)
def _(ctx):
    _, _, x, y = problem()
    return _probe_loop((x.numpy(), y.numpy()), x, y)


@case("probe: a python list of (x_i, y_i) pairs", group=G_PROBE)
def _(ctx):
    _, _, x, y = problem()
    return _probe_loop([(x[i], y[i]) for i in range(20)], x, y)


@case("probe: float64 model, float32 probe (hand-written loop)", group=G_PROBE)
def _(ctx):
    model, _, x, y = problem()
    model = model.double()
    cb, witness = LossKernelCallback((x, y)), Witness(x.double(), y)
    loop(cb, model, witness=witness)
    return check_kernel(cb.kernel, witness.rows, rtol=1e-6)


@case("probe: float64 model, default loss_fn, posterior spread 1e-4 (K vs float64 losses)", group=G_PROBE)
def _(ctx):
    model, _, x, y = problem()
    model = model.double()
    cb, witness = LossKernelCallback((x.double(), y)), Witness(x.double(), y)
    for chain, draw, m in jitter_draws(model, 2, 8, scale=1e-4):
        cb(model=m, chain=chain, draw=draw)
        witness(model=m, chain=chain)
    check = check_kernel(cb.kernel, witness.rows, rtol=1e-6)
    if not check.ok:
        check.detail += " (a float64 model's losses are computed from float32 logits)"
    return check


@case("probe: a list of pre-made batches [(xb, yb), (xb, yb)]", "probe", group=G_PROBE)
def _(ctx):
    _, _, x, y = problem()
    model = MLP()
    LossKernelCallback([(x[:10], y[:10]), (x[10:], y[10:])], reference_model=model)
    return wrong("accepted")


@case("probe: an iterator over a DataLoader", "probe", group=G_PROBE)
def _(ctx):
    _, _, x, y = problem()
    LossKernelCallback(iter(DataLoader(TensorDataset(x, y), batch_size=8)))
    return wrong("accepted")


@case("probe: inputs only (no targets) with the default loss_fn", "loss_fn", group=G_PROBE)
def _(ctx):
    _, _, x, y = problem()
    LossKernelCallback(x, reference_model=MLP())
    return wrong("accepted")


@case("probe: a dict without 'input_ids' with the default loss_fn", "input_ids", group=G_PROBE)
def _(ctx):
    _, _, x, y = problem()
    LossKernelCallback({"x": x, "y": y}, reference_model=MLP())
    return wrong("accepted")


@case("probe: tuple of mismatched lengths", "first dimension", group=G_PROBE)
def _(ctx):
    _, _, x, y = problem()
    LossKernelCallback((x, y[:7]))
    return wrong("accepted")


@case("probe: empty tensors", "empty", group=G_PROBE)
def _(ctx):
    _, _, x, y = problem()
    LossKernelCallback((x[:0], y[:0]))
    return wrong("accepted")


def _labels(labels, expect):
    _, _, x, y = problem()
    cb = LossKernelCallback((x, y), labels=labels)
    if expect is None:
        return wrong(f"accepted labels {labels!r:.60}")
    good = cb.labels is not None and cb.labels.dtype == torch.long and torch.equal(cb.labels, expect)
    return ok("labels as int64 [20]") if good else wrong(f"labels became {cb.labels}")


_, _, _x0, _y0 = problem()
for _name, _value, _expect, _keys in [
    ("wrong length", _y0[:12], None, ("labels",)),
    ("float, whole numbers", _y0.double(), _y0, ("labels",)),
    ("float, not whole (0.5)", _y0.double() + 0.5, None, ("labels",)),
    ("strings", ["cat", "dog"] * 10, None, ("labels",)),
    ("numpy int64", _y0.numpy(), _y0, ("labels",)),
    ("python list", _y0.tolist(), _y0, ("labels",)),
    ("int32 tensor", _y0.int(), _y0, ("labels",)),
    ("2-D [20, 1]", _y0[:, None], None, ("labels",)),
    ("float NaN", torch.full((20,), float("nan")), None, ("labels",)),
]:
    case(f"labels: {_name}", *_keys, group=G_PROBE)(lambda ctx, _v=_value, _e=_expect: _labels(_v, _e))


@case("labels: sample_ids of the wrong length", "sample_ids", group=G_PROBE)
def _(ctx):
    _, _, x, y = problem()
    LossKernelCallback((x, y), sample_ids=list(range(19)))
    return wrong("accepted")


def _bad_loss_constructor(loss_fn):
    _, _, x, y = problem()
    LossKernelCallback((x, y), loss_fn, reference_model=MLP())
    return wrong("accepted")


for _name, _fn, _keys in [
    ("returning integers", lambda m, b: (m(b[0]).argmax(1) != b[1]).long(), ("floating",)),
    ("returning a scalar mean", lambda m, b: F.cross_entropy(m(b[0]), b[1]), ("shape",)),
    ("returning [batch, 1]", lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")[:, None], ("shape",)),
    ("returning one loss too few", lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")[1:], ("shape",)),
    ("returning a python list", lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none").tolist(), ("loss_fn",)),
    ("= F.cross_entropy", F.cross_entropy, ("loss_fn",)),
    ("= nn.CrossEntropyLoss(reduction='none') (a module, (input, target))", nn.CrossEntropyLoss(reduction="none"),
     ("loss_fn",)),
]:
    case(f"loss_fn (reference_model given) {_name}", *_keys, group=G_PROBE)(
        lambda ctx, _fn=_fn: _bad_loss_constructor(_fn))


@case("loss_fn returning float64 and float16 losses", group=G_PROBE)
def _(ctx):
    model, _, x, y = problem()
    checks = []
    for dt in (torch.float64, torch.float16):
        cb = LossKernelCallback((x, y), lambda m, b, dt=dt: classification_loss(m, b).to(dt))
        witness = Witness(x, y)
        loop(cb, model, witness=witness)
        checks.append(check_kernel(cb.kernel, [np.asarray(torch.tensor(r).to(dt).double()) for r in witness.rows],
                                   rtol=1e-6))
    bad = [c for c in checks if not c.ok]
    return bad[0] if bad else ok("float64 and float16 losses: " + checks[1].detail)


for _name, _kw, _keys in [
    ("device='cuda' without CUDA", dict(device="cuda"), ("device",)),
    ("rows out of range", dict(rows=[0, 20]), ("rows",)),
    ("dtype=torch.float16", dict(dtype=torch.float16), ("dtype",)),
    ("num_draws=2.0", dict(num_draws=2.0), ("num_draws",)),
    ("an unknown keyword", dict(colour="red"), ("colour",)),
    ("block_size=-1", dict(block_size=-1), ("block_size",)),
    ("divergence_tolerance=nan", dict(divergence_tolerance=float("nan")), ("divergence_tolerance",)),
    ("snapshot_every=0", dict(snapshot_every=0), ("snapshot_every",)),
    ("reference_model that is a state_dict", dict(reference_model=MLP().state_dict()), ("reference_model",)),
    ("probe_train_mask of the wrong length", dict(probe_train_mask=torch.ones(19, dtype=torch.bool)),
     ("probe_train_mask",)),
]:
    case(f"callback: {_name}", *_keys, group=G_PROBE)(
        lambda ctx, _kw=_kw: wrong(f"accepted: {LossKernelCallback((_x0, _y0), **_kw)!r}"))


@case("callback: rows= as a numpy int32 array", group=G_PROBE)
def _(ctx):
    return _rect_loop(np.array([4, 2], dtype=np.int32))


def _rect_loop(rows):
    model, _, x, y = problem()
    cb, witness = LossKernelCallback((x, y), rows=rows), Witness(x, y)
    loop(cb, model, witness=witness)
    return check_kernel(cb.kernel, witness.rows, sel=[int(r) for r in rows], rtol=1e-6)


@case("callback: pickled (as devinterp's cores>1 would)", "cores", group=G_PROBE)
def _(ctx):
    _, _, x, y = problem()
    pickle.dumps(LossKernelCallback((x, y)))
    return wrong("pickled")


@case("callback: cb.kernel before any draw", "no draws", group=G_PROBE)
def _(ctx):
    _, _, x, y = problem()
    return wrong(f"a kernel: {LossKernelCallback((x, y)).kernel!r}")


# ============================================================================================
# LossKernelCallback in a hand-written loop: state, new runs, chains
# ============================================================================================
G_LOOP = "hand-written loop"


def loop_chains(cb, model, chains, num_draws=4, seed=0, witness=None, **call):
    """Like loop() but for the given global chain numbers (one jitter stream per chain)."""
    for chain in chains:
        for _, draw, m in jitter_draws(model, 1, num_draws, seed=seed + 101 * chain):
            cb(model=m, chain=chain, draw=draw, **call)
            if witness is not None:
                witness(model=m, chain=chain)


@case("loop: callback state_dict -> load into a callback with other rows", "rows", group=G_LOOP, staged=True)
def _(ctx):
    model, _, x, y = problem()
    cb = LossKernelCallback((x, y), rows=[0, 1])
    loop(cb, model)
    state = cb.state_dict()
    ctx.arm()
    LossKernelCallback((x, y), rows=[0, 2]).load_state_dict(state, model)
    return wrong("loaded")


@case("loop: callback state_dict -> load into a callback with another probe", "probe", group=G_LOOP, staged=True)
def _(ctx):
    model, _, x, y = problem()
    cb = LossKernelCallback((x, y))
    loop(cb, model)
    state = cb.state_dict()
    ctx.arm()
    LossKernelCallback((x, (y + 1) % 3)).load_state_dict(state, model)
    return wrong("loaded")


@case("loop: callback state_dict() then more draws (snapshot must not change)", group=G_LOOP)
def _(ctx):
    model, _, x, y = problem()
    cb, witness = LossKernelCallback((x, y), divergence_window=2), Witness(x, y)
    loop_chains(cb, model, [0], witness=witness)
    state = cb.state_dict()
    frozen = copy.deepcopy(state)
    loop_chains(cb, model, [1])
    cb.kernel
    acc_same = all(torch.equal(state["accumulator"][k], frozen["accumulator"][k])
                   for k in ("m2", "m2_diag", "mean", "shift"))
    held_same = all(torch.equal(state["held"][c], frozen["held"][c]) for c in frozen["held"])
    if not (acc_same and held_same and state["draws_per_chain"] == frozen["draws_per_chain"]):
        return wrong("the saved state changed when more draws arrived")
    twin = LossKernelCallback((x, y), divergence_window=2)
    twin.load_state_dict(state, model)
    return check_kernel(twin.kernel, witness.rows)


@case("loop: callback state through torch.save/torch.load(weights_only), resumed in a new callback",
      group=G_LOOP)
def _(ctx):
    model, _, x, y = problem()
    witness = Witness(x, y)
    cb = LossKernelCallback((x, y), reference_model=model, divergence_window=3, num_draws=4)
    loop_chains(cb, model, [0], witness=witness)
    path = ctx.tmpdir() / "cb.pt"
    torch.save(cb.state_dict(), path)
    twin = LossKernelCallback((x, y), reference_model=model, divergence_window=3, num_draws=4)
    twin.load_state_dict(torch.load(path, weights_only=True), model)
    loop_chains(twin, model, [1], witness=witness)
    twin.finalize()
    k = twin.kernel
    if k.draws_per_chain != {0: 4, 1: 4}:
        return wrong(f"draws_per_chain {k.draws_per_chain}")
    return check_kernel(k, witness.rows)


@case("loop: reading cb.kernel mid-run, then more draws of the same chain", group=G_LOOP)
def _(ctx):
    model, _, x, y = problem()
    cb, witness = LossKernelCallback((x, y)), Witness(x, y)
    gen = jitter_draws(model, 2, 4)
    for i, (chain, draw, m) in enumerate(gen):
        cb(model=m, chain=chain, draw=draw)
        witness(model=m, chain=chain)
        if i in (1, 2, 5):
            cb.kernel  # a progress read
    return check_kernel(cb.kernel, witness.rows)


@case("loop: cb.finalize() called mid-run (as a 'flush'), then more draws", "new run", group=G_LOOP, staged=True)
def _(ctx):
    model, _, x, y = problem()
    cb = LossKernelCallback((x, y))
    loop_chains(cb, model, [0])
    cb.finalize()
    witness = Witness(x, y)
    ctx.arm()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop_chains(cb, model, [1], witness=witness)
    if not any("new run" in str(w.message) for w in caught):
        return wrong("no 'new run' warning")
    check = check_kernel(cb.kernel, witness.rows)
    return ok("documented: warned 'a new run started (draws arrived after finalize())', fresh kernel; "
              + check.detail) if check.ok else check


@case("loop: reused for a second run, calls without chain=/draw= and no finalize()", "new run",
      group=G_LOOP, staged=True)
def _(ctx):
    model, _, x, y = problem()
    cb = LossKernelCallback((x, y))
    for _, _, m in jitter_draws(model, 1, 4, seed=1):
        cb(model=m)
    witness = Witness(x, y)
    ctx.arm()
    for _, _, m in jitter_draws(model, 1, 4, seed=2):
        cb(model=m)
        witness(model=m)
    return check_kernel(cb.kernel, witness.rows)


@case("loop: chains interleaved (lock-step), num_draws=4 given", "interleav", group=G_LOOP)
def _(ctx):
    model, _, x, y = problem()
    models = [copy.deepcopy(model) for _ in range(2)]
    streams = [jitter_draws(models[c], 1, 4, seed=10 + c) for c in range(2)]
    cb, witness = LossKernelCallback((x, y), num_draws=4), Witness(x, y)
    for _ in range(4):
        for chain in range(2):
            _, draw, m = next(streams[chain])
            cb(model=m, chain=chain, draw=draw)
            witness(model=m, chain=chain)
    cb.finalize()
    return check_kernel(cb.kernel, witness.rows)


@case("loop: chains interleaved (lock-step), no num_draws", "interleav", group=G_LOOP)
def _(ctx):
    model, _, x, y = problem()
    models = [copy.deepcopy(model) for _ in range(2)]
    streams = [jitter_draws(models[c], 1, 4, seed=10 + c) for c in range(2)]
    cb, witness = LossKernelCallback((x, y)), Witness(x, y)
    for _ in range(4):
        for chain in range(2):
            _, draw, m = next(streams[chain])
            cb(model=m, chain=chain, draw=draw)
            witness(model=m, chain=chain)
    cb.finalize()
    return check_kernel(cb.kernel, witness.rows)


@case("loop: three chains all passed as chain=0 (draw restarts at 0)", "new run", group=G_LOOP, staged=True)
def _(ctx):
    model, _, x, y = problem()
    cb = LossKernelCallback((x, y))
    witness = Witness(x, y)
    ctx.arm()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for c in range(3):
            if c == 2:
                witness = Witness(x, y)
            for _, draw, m in jitter_draws(model, 1, 4, seed=c):
                cb(model=m, chain=0, draw=draw)
                witness(model=m, chain=0)
    if sum("new run" in str(w.message) for w in caught) != 2:
        return wrong("the three 'chains' were mixed without a warning")
    check = check_kernel(cb.kernel, witness.rows)
    return ok("documented: each restart warned as a new run, kernel = the last 'chain'; " + check.detail) \
        if check.ok else check


@case("loop: NaN weights in chain 1 at draw 2", "diverged", group=G_LOOP)
def _(ctx):
    model, _, x, y = problem()
    cb, witness = LossKernelCallback((x, y)), Witness(x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for chain, draw, m in jitter_draws(model, 3, 4):
            if chain == 1 and draw == 2:
                with torch.no_grad():
                    m.net[0].weight[0, 0] = float("nan")
            cb(model=m, chain=chain, draw=draw)
            if chain != 1:
                witness(model=m, chain=chain)
    if not any("diverged" in str(w.message) for w in caught):
        return wrong("no warning")
    check = check_kernel(cb.kernel, witness.rows)
    return ok("documented: warned, chain 1 cut off; " + check.detail) if check.ok else check


@case("loop: a finite blow-up (last layer x1e4) in chain 0 with reference_model", "diverged", group=G_LOOP)
def _(ctx):
    model, _, x, y = problem()
    cb, witness = LossKernelCallback((x, y), reference_model=model, divergence_window=1), Witness(x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for chain, draw, m in jitter_draws(model, 2, 4):
            if chain == 0 and draw == 3:
                with torch.no_grad():
                    m.net[-1].weight.mul_(1e4)
            cb(model=m, chain=chain, draw=draw)
            if chain == 1 or draw < 2:  # draw 2 was held back (window 1), draw 3 diverged
                witness(model=m, chain=chain)
    if not any("diverged" in str(w.message) for w in caught):
        return wrong("no warning")
    check = check_kernel(cb.kernel, witness.rows)
    return ok("documented: warned, blow-up and the held draw left out; " + check.detail) if check.ok else check


@case("loop: a probe sample with a NaN feature", "non-finite", "nan", group=G_LOOP)
def _(ctx):
    model, _, x, y = problem()
    x = x.clone()
    x[5, 0] = float("nan")
    cb = LossKernelCallback((x, y))
    loop(cb, model)
    return wrong(f"kernel: {cb.kernel!r}")


# ============================================================================================
# devinterp_losskernel.distributed
# ============================================================================================
G_DIST = "distributed"


@case("dist: all_reduce() without init_process_group", "init_process_group", group=G_DIST)
def _(ctx):
    acc_with(draws(4)).all_reduce()
    return wrong("ran")


@case("dist: all_reduce_accumulator() of a LossKernel", "KernelAccumulator", group=G_DIST)
def _(ctx):
    dist_api.all_reduce_accumulator(small_kernel())
    return wrong("ran")


@case("dist: shard_chains(rank=2, world_size=2)", "rank", group=G_DIST)
def _(ctx):
    return wrong(f"returned {dist_api.shard_chains(4, 2, 2)}")


@case("dist: shard_chains(num_chains=4.0)", "num_chains", group=G_DIST)
def _(ctx):
    return wrong(f"returned {dist_api.shard_chains(4.0, 0, 2)}")


@case("dist: world-size-1 gloo group, all_reduce() twice", "twice", group=G_DIST, staged=True)
def _(ctx):
    import torch.distributed as dist

    store = ctx.tmpdir() / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        a = acc_with(draws(6))
        ctx.arm()
        a.all_reduce()
        a.all_reduce()
        return compare(a.compute().covariance, rows_of(draws(6)), num_draws=a.count)
    finally:
        dist.destroy_process_group()


_DIST_RESULTS: dict = {}


def _dist_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    res = {}

    def attempt(key, fn):
        try:
            res[key] = {"ran": fn()}
        except Exception as e:  # noqa: BLE001
            res[key] = {"error": f"{type(e).__name__}: {e}"}

    block = draws(5 + rank, seed=100 + rank, mean=1.0 + rank)
    acc = acc_with(block, block_size=3)
    attempt("merge", lambda: acc.all_reduce().compute().covariance.tolist())
    attempt("twice", lambda: acc.all_reduce().compute().covariance.tolist())
    rect = acc_with(block, rows=[0, 1 + rank])
    attempt("rows", lambda: rect.all_reduce().compute().covariance.tolist())
    empty = KernelAccumulator(8)
    if rank == 0:
        empty.update(block)
    attempt("empty_rank", lambda: empty.all_reduce().compute().covariance.tolist())
    with open(Path(out_dir) / f"rank{rank}.json", "w") as fh:
        json.dump(res, fh)
    dist.destroy_process_group()


def _dist_results(ctx) -> dict:
    if not _DIST_RESULTS:
        import torch.multiprocessing as mp

        d = ctx.tmpdir()
        procs = mp.start_processes(_dist_worker, args=(2, str(d / "store"), str(d)), nprocs=2, join=False,
                                   start_method="spawn")
        deadline = time.time() + 120
        while not procs.join(timeout=2):
            if time.time() > deadline:
                for p in procs.processes:
                    p.kill()
                raise HarnessError("the 2-rank gloo run did not finish in 120 s")
        for r in range(2):
            _DIST_RESULTS[r] = json.loads((d / f"rank{r}.json").read_text())
    return _DIST_RESULTS


def _dist_case(ctx, key, rows_fn, sel=None):
    res = _dist_results(ctx)
    ctx.arm()
    for r in range(2):
        if "error" in res[r][key]:
            raise ValueError(f"[rank {r}] {res[r][key]['error']}")
    expect = rows_fn()
    checks = [compare(torch.tensor(res[r][key]["ran"], dtype=torch.float64), expect, sel=sel) for r in range(2)]
    bad = [c for c in checks if not c.ok]
    return bad[0] if bad else ok("every rank: " + checks[0].detail)


@case("dist: 2 gloo ranks, all_reduce()", group=G_DIST)
def _(ctx):
    return _dist_case(ctx, "merge", lambda: rows_of(draws(5, seed=100, mean=1.0), draws(6, seed=101, mean=2.0)))


@case("dist: 2 gloo ranks, all_reduce() called twice", "twice", group=G_DIST)
def _(ctx):
    return _dist_case(ctx, "twice", lambda: rows_of(draws(5, seed=100, mean=1.0), draws(6, seed=101, mean=2.0)))


@case("dist: 2 gloo ranks with other rows=", "rows", group=G_DIST)
def _(ctx):
    return _dist_case(ctx, "rows", lambda: rows_of(draws(5, seed=100, mean=1.0), draws(6, seed=101, mean=2.0)),
                      sel=[0, 1])


@case("dist: 2 gloo ranks, one rank without draws", group=G_DIST)
def _(ctx):
    return _dist_case(ctx, "empty_rank", lambda: rows_of(draws(5, seed=100, mean=1.0)))


# ============================================================================================
# presets and provenance
# ============================================================================================
G_MISC = "presets & provenance"


@case("preset: inception_imagenet.scaled(lr=nan)", "lr", group=G_MISC)
def _(ctx):
    return wrong(f"built {preset('inception_imagenet').scaled(lr=float('nan'))}")


@case("preset: sampler_kwargs(num_draws=2.0)", "num_draws", group=G_MISC)
def _(ctx):
    return wrong(f"built {preset('inception_imagenet').sampler_kwargs(num_draws=2.0)}")


@case("preset: an unknown name", "name", group=G_MISC)
def _(ctx):
    return wrong(f"got {preset('imagenet')}")


@case("preset: SGLDSettings(batch_size=0)", "batch_size", group=G_MISC)
def _(ctx):
    return wrong(f"built {SGLDSettings(0, 2, 4, 0, 1e-3, 10.0, 100.0)}")


@case("provenance: KernelIdentity.check_matches of other n and rows", "num_samples", group=G_MISC)
def _(ctx):
    a = provenance.KernelIdentity(8, rows=[0, 1])
    a.check_matches(provenance.KernelIdentity(9, rows=[0, 2]), what="merge")
    return wrong("matched")


@case("provenance: load_verified of a kernel file as another kind", "k.pt", group=G_MISC, staged=True)
def _(ctx):
    path = ctx.tmpdir() / "k.pt"
    small_kernel().save(path)
    ctx.arm()
    provenance.load_verified(path, kind="devinterp_losskernel.Checkpoint")
    return wrong("loaded")


# ============================================================================================
# main
# ============================================================================================
def lost_text(o: Outcome) -> str:
    return f"yes ({o.steps_lost} steps)" if o.lost else "no"


def render(outcomes: List[Outcome]) -> str:
    headers = ("#", "case", "class", "lost work", "message excerpt")
    rows = [(str(i + 1), o.case.name, o.klass, lost_text(o), one_line(o.message, 110))
            for i, o in enumerate(outcomes)]
    widths = [max(len(h), *(len(r[j]) for r in rows)) if rows else len(h) for j, h in enumerate(headers)]
    widths[1] = min(widths[1], 70)

    def cut(text, w):
        return text if len(text) <= w else text[: w - 1] + "…"

    lines = ["  ".join(cut(h, w).ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    for r in rows:
        lines.append("  ".join(cut(c, w).ljust(w) for c, w in zip(r, widths)))
    return "\n".join(lines)


def summary(outcomes: List[Outcome]) -> dict:
    counts = {k: 0 for k in CLASSES}
    for o in outcomes:
        counts[o.klass] = counts.get(o.klass, 0) + 1
    return counts


def results_section(outcomes: List[Outcome], counts: dict, seconds: float) -> str:
    try:
        sys.path.insert(0, str(HERE))
        from _common import command_line

        command = command_line()
    except Exception:  # noqa: BLE001
        command = " ".join([os.path.relpath(sys.executable, REPO), "benchmarks/fault_cases.py", *sys.argv[1:]])
    try:
        from importlib.metadata import version

        devinterp = version("devinterp")
    except Exception:  # noqa: BLE001
        devinterp = "not installed"
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Fault cases: a careless user and a faulty environment (benchmarks/fault_cases.py)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {MACHINE} (torch {torch.__version__}, devinterp {devinterp}); date: {date}; "
        f"{len(outcomes)} cases in {seconds:.0f} s.",
        "",
        "| class | cases |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in counts.items()],
        "",
    ]
    flagged = [o for o in outcomes if o.klass not in ("clear error", "correct") or o.lost]
    if flagged:
        lines.append("Cases that are not a clear error or correct, or whose error came after sampling:")
        lines.append("")
        for o in flagged:
            lines.append(f"- {o.case.name} — **{o.klass}**, lost work: {lost_text(o)} — {one_line(o.message, 200)}")
    else:
        lines.append("Every case was a clear error or correct, and no error came after sampling.")
    return "\n".join(lines) + "\n"


# ============================================================================================
# the edges catalogue (issue 18): one file a area, each with register(harness) adding its cases
# ============================================================================================
EDGE_MODULES = ("edges_explore", "edges_files", "edges_analysis", "edges_host")


def _register_edges() -> None:
    import importlib

    harness = sys.modules[__name__]
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    for name in EDGE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            continue
        module.register(harness)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--append", action="store_true", help="append a section to benchmarks/RESULTS.md")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="the markdown file for --append")
    parser.add_argument("-k", dest="pattern", default=None, help="only cases whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    args = parser.parse_args(argv)
    _register_edges()

    if args.list:
        for i, c in enumerate(CASES):
            print(f"{i + 1:3d}  [{c.group}] {c.name}")
        return 0
    torch.set_num_threads(args.threads)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(_count_step)
    selected = [c for c in CASES if args.pattern is None or args.pattern.lower() in c.name.lower()]
    try:
        from importlib.metadata import version

        major = int(version("devinterp").split(".")[0])
    except Exception:  # noqa: BLE001
        major = None
    if major != 1:  # the devinterp-1 group drives devinterp 1.x's own sampler
        skipped = [c for c in selected if c.group == G_DV1]
        selected = [c for c in selected if c.group != G_DV1]
        print(f"devinterp {major}.x installed: skipping the {len(skipped)} '{G_DV1}' cases "
              "(run in the devinterp 1.x venv for those)", file=sys.stderr)
    outcomes: List[Outcome] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fault_cases_") as tmp:
        for i, c in enumerate(selected):
            root = Path(tmp) / f"case{i}"
            root.mkdir()
            o = run_case(c, root)
            outcomes.append(o)
            print(f"[{i + 1:3d}/{len(selected)}] {o.seconds:5.2f}s  {o.klass:14s} {c.name}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start

    print()
    for g in dict.fromkeys(o.case.group for o in outcomes):
        part = [o for o in outcomes if o.case.group == g]
        print(f"\n### {g} ({len(part)} cases)")
        print(render(part))
    counts = summary(outcomes)
    print(f"\nSummary ({len(outcomes)} cases, {seconds:.0f} s on {MACHINE}):")
    for k, v in counts.items():
        print(f"  {k:15s} {v}")
    lost = [o for o in outcomes if o.lost]
    print(f"  {'lost work':15s} {len(lost)} (an error after SGLD steps of the call under test)")
    flagged = [o for o in outcomes if o.klass not in ("clear error", "correct") or o.lost]
    if flagged:
        print("\nNot a clear error / correct, or an error after sampling:")
        for o in flagged:
            print(f"  - {o.case.name}: {o.klass}; lost work {lost_text(o)}\n      {one_line(o.message, 400)}")
    if args.append:
        section = results_section(outcomes, counts, seconds)
        with open(args.results, "a") as fh:
            fh.write("\n" + section)
        print(f"\nappended to {args.results}")
    return 1 if counts.get("HARNESS") else 0


if __name__ == "__main__":
    sys.exit(main())
