"""Cost of the minibatch mode beside devinterp's LLC on all 60,000 Fashion-MNIST training images
(issue 19, item 5).

Three variants of one devinterp 1.x ``estimate_learning_coeff_with_summary`` call, each in a fresh
subprocess (so that each has its own peak RSS), repeats interleaved a, b, a, b, … (c less often: it
is slow) so that a drift of the shared machine's speed hits all variants alike:

- (a) "LLC alone": the user's call, ``DataLoader(TensorDataset(x, y), sampler=RandomSampler(…,
  replacement=True))`` and a plain mean cross-entropy ``evaluate``;
- (b) "+ minibatch mode": the same call with ``evaluate=recorder.evaluate, callbacks=[recorder]``
  (``MinibatchVariance``) and the loader over ``WithIndices(TensorDataset(x, y))`` — the one line
  added;
- (c) "+ exact diagonal mode": (a) plus ``LossKernelCallback((x, y), mode="diagonal")`` — all 60,000
  training images evaluated at every draw.

Each subprocess trains nothing: the MLP (784-512-512-10, trained ``--epochs`` epochs with Adam by
the driver, same seed) is loaded from a temporary file. torch runs with one intra-op thread in every
subprocess (``torch.set_num_threads(1)``) for stable timing on a shared machine. Reported per
variant: wall and CPU seconds of the ``estimate_learning_coeff_with_summary`` call (median, min–max),
the ratio to (a) pair by pair, the process's peak RSS (VmHWM) and the peak RSS above the level
before the call, and the bytes of state per training sample the recorder holds after the run.

    .venv-ci1/bin/python benchmarks/minibatch_cost.py                 # 2 × 100 draws, 7 pairs, (c) twice
    .venv-ci1/bin/python benchmarks/minibatch_cost.py --num-train 5000 --repeat 1 --exact-repeat 1 --no-record
    .venv-ci1/bin/python benchmarks/minibatch_cost.py --profile       # cProfile of (a) and (b), top entries
    .venv-ci1/bin/python benchmarks/minibatch_cost.py --digits --exact-repeat 0 --repeat 9
    .venv-ci1/bin/python benchmarks/minibatch_cost.py --before /tmp/minibatch_old.py   # + (o): an older recorder

``--digits``: the README's small digits MLP instead (1,797 images, 64-256-256-10, trained like
``devinterp_losskernel.demo``; SGLD as in ``benchmarks/minibatch_study.py``: ε = 3e-4, minibatch 64,
burn-in 100, 4 chains × 100 draws by default), where a step costs ~2 ms and the recorder's fixed
per-step work is a larger share. ``--before PATH``: also time (o), variant (b) with the
``MinibatchVariance`` / ``WithIndices`` of another copy of ``minibatch.py`` (e.g. the version before
a change, saved aside), interleaved with (a) and (b) — a before/after at the same moment's load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = {"a": "LLC alone", "b": "+ minibatch mode", "o": "+ minibatch mode, --before's recorder",
            "c": "+ exact diagonal mode"}
SGLD = dict(lr=1e-4, nbeta=100.0, localization=200.0)
SGLD_DIGITS = dict(lr=3e-4, nbeta=100.0, localization=200.0)  # benchmarks/minibatch_study.py's


def _sgld(args) -> dict:
    return dict(SGLD_DIGITS if args.digits else SGLD)


# -- the worker: one variant in this process -------------------------------------------------------
def _data(num_train: int, digits: bool = False):
    import numpy as np
    import torch

    if digits:
        from devinterp_losskernel.demo import DemoConfig, digits_with_flipped_labels

        x, _, y_train, _ = digits_with_flipped_labels(DemoConfig(num_train=1797))
        return x, y_train
    from losskernel_examples.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist(split="train")
    x = torch.from_numpy(images[:num_train].reshape(-1, 784).astype(np.float32) / 255.0)
    y = torch.from_numpy(labels[:num_train])
    return x, y


def _mlp(digits: bool = False):
    from torch import nn

    if digits:  # devinterp_losskernel.demo.train_memorizing_mlp's
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def _recorder_module(before: str | None):
    """``devinterp_losskernel.minibatch``, or (``before``) another copy of it loaded as a
    submodule of the package (its relative imports resolve against the installed package)."""
    if not before:
        from devinterp_losskernel import minibatch

        return minibatch
    import importlib.util

    import devinterp_losskernel  # noqa: F401  (the parent package, for the copy's relative imports)

    spec = importlib.util.spec_from_file_location("devinterp_losskernel._minibatch_before", before)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _evaluate(model, batch):
    import torch.nn.functional as F

    x, y = batch
    return F.cross_entropy(model(x), y)


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def worker(args) -> int:
    import torch
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    import _common  # noqa: F401  (src/ and examples/ on sys.path)
    from _common import PeakRSS, Timer, _status_kib

    torch.set_num_threads(1)
    x, y = _data(args.num_train, args.digits)
    model = _mlp(args.digits)
    model.load_state_dict(torch.load(args.model, weights_only=True))
    data = TensorDataset(x, y)
    n = len(data)
    recorder = diagonal = None
    callbacks, evaluate = [], _evaluate
    if args.variant in ("b", "o"):
        minibatch = _recorder_module(args.before if args.variant == "o" else None)
        recorder = minibatch.MinibatchVariance(num_train=n)
        data = minibatch.WithIndices(data)  # the one added line
        callbacks, evaluate = [recorder], recorder.evaluate
    elif args.variant == "c":
        from devinterp_losskernel import LossKernelCallback

        diagonal = LossKernelCallback((x, y), mode="diagonal", batch_size=args.probe_batch_size)
        callbacks = [diagonal]
    loader = DataLoader(data, batch_size=args.batch_size,
                        sampler=RandomSampler(data, replacement=True, num_samples=n))
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary

    def call():
        torch.manual_seed(args.seed)  # devinterp draws its init-loss batches before seeding the chains
        return estimate_learning_coeff_with_summary(
            model, loader, callbacks=callbacks, evaluate=evaluate, optimizer_kwargs=_sgld(args),
            num_chains=args.chains, num_draws=args.draws, num_burnin_steps=args.burnin, num_steps_bw_draws=1,
            seed=args.seed, verbose=False, device="cpu", cores=1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            start = time.perf_counter()
            profiler.enable()
            results = call()
            profiler.disable()
            seconds = time.perf_counter() - start
            stats = pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime")
            stats.print_stats(25)
            # what the minibatch mode adds: the recorder, the index wrapper, the index collation, the fold
            stats.sort_stats("cumulative").print_stats(r"minibatch\.py|sample_moments\.py|collate\.py", 20)
            print(json.dumps({"variant": args.variant, "wall": seconds}))
            return 0
        with PeakRSS() as mem, Timer() as t:
            results = call()
    out = {"variant": args.variant, "wall": t.seconds, "cpu": t.cpu_seconds, "peak_above": mem.peak_bytes,
           "hwm": (_status_kib("VmHWM") or 0) * 1024, "llc": float(results["llc/mean"]), "n": n,
           "steps": args.chains * (args.burnin + args.draws)}
    if recorder is not None:
        moments = recorder.moments()
        state = _tensor_bytes(t for m in recorder.chains.values() for t in (m.count, m.shift, m.mean, m.m2))
        out.update(state=state, state_merged=_tensor_bytes((moments.count, moments.shift, moments.mean, moments.m2)),
                   buffer_max=recorder.fold_every * (8 + 4), nu=results["minibatch/singular_fluctuation"],
                   nu_se=results["minibatch/singular_fluctuation_se"],
                   visits=float(results["minibatch/visits"].mean()))
    if diagonal is not None:
        m = diagonal.accumulator._moments
        out.update(state=_tensor_bytes((m.shift, m.mean, m.m2_diag)),
                   nu=_sgld(args)["nbeta"] / n / 2 * float(diagonal.kernel.variance.double().sum()))
    print(json.dumps(out))
    return 0


# -- the driver -------------------------------------------------------------------------------------
def train(args, path: str) -> float:
    import torch

    import _common  # noqa: F401

    torch.set_num_threads(1)
    x, y = _data(args.num_train, args.digits)
    start = time.perf_counter()
    if args.digits:
        from devinterp_losskernel.demo import DemoConfig, train_memorizing_mlp

        model = train_memorizing_mlp(x, y, DemoConfig(num_train=1797))
    else:
        torch.manual_seed(args.seed)
        model = _mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(args.epochs):
            for idx in torch.randperm(len(x)).split(256):
                opt.zero_grad()
                _evaluate(model, (x[idx], y[idx])).backward()
                opt.step()
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    torch.save(model.state_dict(), path)
    print(f"trained in {time.perf_counter() - start:.0f} s, train accuracy {accuracy:.3f}",
          flush=True)
    return accuracy


def _spawn(args, variant: str, model_path: str, profile: bool = False) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--model", model_path,
           "--num-train", str(args.num_train), "--chains", str(args.chains), "--draws", str(args.draws),
           "--burnin", str(args.burnin), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
           "--probe-batch-size", str(args.probe_batch_size)] + (["--profile"] if profile else []) + (
               ["--digits"] if args.digits else []) + (["--before", str(args.before)] if variant == "o" else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(HERE))
    if proc.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
    if profile:
        print(proc.stderr, flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _spread(values) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits", action="store_true",
                        help="the small digits MLP (1,797 images) instead of Fashion-MNIST; other defaults change")
    parser.add_argument("--before", help="a copy of minibatch.py to time as (o) beside (b)")
    parser.add_argument("--num-train", type=int, default=None, help="default 60,000 (--digits: 1,797, fixed)")
    parser.add_argument("--chains", type=int, default=None, help="default 2 (--digits: 4)")
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--burnin", type=int, default=None, help="default 0 (--digits: 100)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 (--digits: 64)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe-batch-size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=7, help="(a, b) pairs, interleaved")
    parser.add_argument("--exact-repeat", type=int, default=2, help="runs of (c), placed between pairs")
    parser.add_argument("--profile", action="store_true", help="cProfile one run of (a) and of (b); no table")
    parser.add_argument("--worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--no-record", action="store_true", help="print the tables but do not append them")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    for name, fashion, digits in (("num_train", 60_000, 1797), ("chains", 2, 4), ("burnin", 0, 100),
                                  ("batch_size", 256, 64)):
        if getattr(args, name) is None:
            setattr(args, name, digits if args.digits else fashion)
    if args.digits and args.num_train != 1797:
        parser.error("--digits uses all 1,797 digits: leave --num-train out")
    if args.before and not Path(args.before).is_file():
        parser.error(f"--before: no such file {args.before}")
    if args.worker:
        args.variant = args.worker
        return worker(args)

    sys.path.insert(0, str(HERE))
    from _common import append_results, print_table

    with tempfile.TemporaryDirectory() as tmp:
        model_path = os.path.join(tmp, "mlp.pt")
        accuracy = train(args, model_path)
        if args.profile:
            for variant in ("a", "b"):
                print(f"== profile of ({variant}) {VARIANTS[variant]}", flush=True)
                _spawn(args, variant, model_path, profile=True)
            return 0
        _spawn(args, "a", model_path)  # warm-up (file cache, imports), not counted
        runs = {v: [] for v in VARIANTS}
        loads = []
        exact_at = {round((k + 1) * args.repeat / (args.exact_repeat + 1)) for k in range(args.exact_repeat)}
        paired = ("a", "b", "o") if args.before else ("a", "b")
        for r in range(args.repeat):
            loads.append(os.getloadavg()[0])
            order = paired if r % 2 == 0 else paired[::-1]
            for variant in order:
                runs[variant].append(_spawn(args, variant, model_path))
            if r in exact_at and len(runs["c"]) < args.exact_repeat:
                runs["c"].append(_spawn(args, "c", model_path))
            print(f"round {r + 1}/{args.repeat}: "
                  + ", ".join(f"{v} {runs[v][-1]['wall']:.2f} s (CPU {runs[v][-1]['cpu']:.2f})" for v in paired)
                  + (f", c {runs['c'][-1]['wall']:.1f} s" if runs["c"] and len(runs["c"]) == len(
                      [k for k in exact_at if k <= r]) and r in exact_at else ""), flush=True)
        loads.append(os.getloadavg()[0])
        while len(runs["c"]) < args.exact_repeat:
            runs["c"].append(_spawn(args, "c", model_path))

    n = args.num_train
    a_wall = [run["wall"] for run in runs["a"]]
    a_cpu = [run["cpu"] for run in runs["a"]]
    rows = []
    for variant, label in VARIANTS.items():
        got = runs[variant]
        if not got:
            continue
        wall = [run["wall"] for run in got]
        cpu = [run["cpu"] for run in got]
        if variant in ("b", "o"):  # pair by pair (interleaved)
            ratio_wall = [b / a for a, b in zip(a_wall, wall)]
            ratio_cpu = [b / a for a, b in zip(a_cpu, cpu)]
        else:
            ratio_wall = [w / statistics.median(a_wall) for w in wall]
            ratio_cpu = [c / statistics.median(a_cpu) for c in cpu]
        state = got[0].get("state")
        rows.append([f"({variant}) {label}", len(got), _spread(wall), _spread(cpu), _spread(ratio_wall),
                     _spread(ratio_cpu),
                     f"{statistics.median(r['hwm'] for r in got) / 2**20:,.0f}",
                     f"{statistics.median(r['peak_above'] for r in got) / 2**20:,.1f}",
                     "—" if state is None else f"{state / n:.0f}"])
    headers = ["variant", "runs", "wall s, median (min–max)", "CPU s", "wall / (a)", "CPU / (a)",
               "process peak RSS MiB", "peak RSS above start of call MiB", "state B / sample"]
    title = f"Minibatch mode cost, {n:,} {'digits' if args.digits else 'Fashion-MNIST'} training images"
    table = print_table(headers, rows, title)
    b0 = runs["b"][0]
    c0 = runs["c"][0] if runs["c"] else {}
    steps = args.chains * (args.burnin + args.draws)
    per_draw = ((statistics.median(r["cpu"] for r in runs["c"]) - statistics.median(a_cpu)) / (args.chains * args.draws)
                if runs["c"] else float("nan"))
    sgld = _sgld(args)
    model_words = ("digits MLP 64-256-256-10 (85,002 parameters) trained as devinterp_losskernel.demo does (400 "
                   "full-batch Adam steps on 10% flipped labels" if args.digits else
                   f"MLP 784-512-512-10 (669,706 parameters) trained {args.epochs} epochs with Adam")
    notes = "\n".join([
        f"{model_words} (train accuracy "
        f"{accuracy:.3f}); devinterp 1.3 `estimate_learning_coeff_with_summary`, SGLD ε = {sgld['lr']}, "
        f"nβ = {sgld['nbeta']}, γ = {sgld['localization']}, {args.chains} chains × {args.draws} draws, burn-in "
        f"{args.burnin}, every step a draw ({steps} SGLD steps), minibatch {args.batch_size} drawn with "
        f"replacement (the same RandomSampler in all three), cores=1, torch.set_num_threads(1) in every "
        f"subprocess. Each run is a fresh subprocess; only the `estimate_learning_coeff_with_summary` call is "
        f"timed (CPU s = this process's CPU time over the call). (a) and (b) alternate a,b / b,a; 'wall / (a)' "
        f"of (b) is the median of the pair-by-pair ratios; of (c), against (a)'s median."
        + (f" (o) is (b) with the recorder and WithIndices of {args.before} (the minibatch.py before a change), in "
           "the same rounds (a,b,o / o,b,a), its ratios also pair by pair." if args.before else ""),
        f"Load average (1 min) over the repeats: {min(loads):.2f}–{max(loads):.2f} on "
        f"{os.cpu_count()} cores shared with other users: absolute seconds are noisy, ratios less so.",
        f"State per training sample: (b) count int64 + shift, mean, M2 float64 per chain = 32 B × {args.chains} "
        f"chains = {b0['state'] / n:.0f} B (merged at the end: {b0['state_merged'] / n:.0f} B), plus a loss buffer "
        f"of at most 4N losses per chain before each O(N) fold (12 B each: {b0['buffer_max'] / n:.0f} B / sample "
        f"per chain; with {args.draws} post-burn-in steps × {args.batch_size} a chain it "
        + ("never filled: folded once at the end" if args.draws * args.batch_size < b0["buffer_max"] / 12 else
           "filled and was folded during the run") + "); (c) shift, "
        f"mean and diagonal co-moment float64 = {c0.get('state', float('nan')) / n:.0f} B"
        + (f"; (c)'s peak RSS above the start of its call, less (a)'s (median): "
           f"{(c0['peak_above'] - statistics.median(r['peak_above'] for r in runs['a'])) / n:,.0f} B a sample."
           if c0 else "."),
        f"Results: devinterp llc/mean {statistics.median(r['llc'] for r in runs['a']):.2f} (a) / "
        f"{statistics.median(r['llc'] for r in runs['b']):.2f} (b) (the same chains; (a)'s evaluate is "
        f"F.cross_entropy's own mean, (b)'s the mean of the per-sample losses: equal up to float rounding); ν minibatch "
        f"{b0['nu']:.3f} ± {b0['nu_se']:.3f} at {b0['visits']:.2f} visits a sample (too few for per-sample "
        f"variances: this run measures cost only)"
        + (f", ν exact {c0['nu']:.3f}; the exact pass costs {per_draw:.2f} CPU s a draw ≈ "
           f"{per_draw / (statistics.median(a_cpu) / steps):.0f} SGLD steps' CPU time." if c0 else "."),
    ])
    print("\n" + notes)
    append_results(f"Minibatch mode cost on {n:,} {'digits' if args.digits else 'Fashion-MNIST'} images "
                   "(benchmarks/minibatch_cost.py)", table + "\n\n" + notes, path=args.results,
                   write=not args.no_record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
