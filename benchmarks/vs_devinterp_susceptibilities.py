"""Our streaming susceptibilities() vs devinterp 2.x's, on the same runs.

devinterp 2.x: ``susceptibilities(model, dataset, observables, weight_restrictions, sampling_task=…)``
runs ``sample()`` once per weight restriction (WR); each run writes every draw's per-token
losses of every observable (and every SGLD step's minibatch losses and token ids) to a zarr
store — ``output_path`` or, without it, a temporary folder that is left behind — and
``compute_susceptibilities`` loads the stored losses back whole (``.values``) and multiplies
them by φ (another array of that size).

Ours (``devinterp_losskernel.susceptibilities``): the same chains (devinterp's sampler, seeded
as ``sample()`` seeds it, the observables evaluated by devinterp's ``Observable``), each
draw's per-token losses folded into float64 running moments (16 · Σ n_obs · T bytes per WR)
and dropped; nothing written.

``--end-to-end`` (default): both, end to end, each in a fresh process (model trained and
modules imported before the clock starts), on a tiny LM (embedding, one mixing layer,
readout) with WRs ``full`` and ``readout``::

    .venv2/bin/python benchmarks/vs_devinterp_susceptibilities.py --n 1024 --chains 2 --draws 200 --seq-len 16

``--from-samples --synthetic``: stored runs far larger than an SGLD run here can make in
minutes: one zarr store per WR in devinterp's layout (``loss_<obs>`` [chain, draw, batch_<obs>,
token_pos] float32 in chunks of 50 draws, ``input_ids_<obs>``, ``init_loss``) filled with
random factor-model losses; devinterp's ``compute_susceptibilities`` against ours
(``compute_susceptibilities`` on the same DataTrees, read 50 draws of one chain at a time)::

    .venv2/bin/python benchmarks/vs_devinterp_susceptibilities.py --from-samples --synthetic \\
        --n 1024 --chains 4 --draws 1000 --seq-len 32

``--with-bif``: when ``devinterp_losskernel.bif`` exists, also time devinterp's ``bif()``
(token and sequence methods) against it on the same end-to-end run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # devinterp's per-chain progress bars

import numpy as np
import torch
from vs_devinterp_bif import TinyLM, make_tokens, require_devinterp2, train_briefly

import _common  # noqa: F401  (puts src/ on sys.path)
from _common import (
    PeakRSS,
    Timer,
    add_common_arguments,
    append_results,
    apply_common_arguments,
    directory_bytes,
    print_table,
)

FORWARDED = ("n", "n_sampling", "bif_n", "chains", "draws", "burnin", "batch_size", "seq_len", "vocab", "width", "num_train",
             "train_steps", "lr", "nbeta", "localization", "seed")
WR_READOUT = ("out.weight", "out.bias")


def inputs(args):
    """The tiny LM (briefly trained), the SGLD dataset and the two observables, built
    identically in every worker."""
    from datasets import Dataset

    length = args.seq_len + 1
    train_ids = make_tokens(args.num_train, length, args.vocab, seed=1)
    probe_ids = make_tokens(args.n, length, args.vocab, seed=2)
    train_ds = Dataset.from_dict({"input_ids": train_ids.tolist()}).with_format("torch")
    probe_ds = Dataset.from_dict({"input_ids": probe_ids.tolist()}).with_format("torch")
    torch.manual_seed(args.seed)
    model = train_briefly(TinyLM(args.vocab, args.width), train_ids, args.train_steps, args.batch_size, args.seed)
    observables = {"train": (train_ds, args.n_sampling // args.batch_size),
                   "probe": (probe_ds, args.n // args.batch_size)}
    restrictions = {"full": None, "readout": {name: None for name in WR_READOUT}}
    return model, train_ds, observables, restrictions


def sampler_kwargs(args):
    return dict(lr=args.lr, n_beta=args.nbeta, localization=args.localization, num_chains=args.chains,
                num_draws=args.draws, batch_size=args.batch_size, num_burnin_steps=args.burnin,
                num_init_loss_batches=1, init_seed=args.seed, device="cpu")


def worker_end_to_end(method: str, args, out: str) -> None:
    import devinterp.slt.bif  # noqa: F401  (imports are not part of the measurement)
    import devinterp.slt.susceptibilities  # noqa: F401
    import xarray  # noqa: F401
    import zarr  # noqa: F401

    import devinterp_losskernel.devinterp2_susceptibilities  # noqa: F401

    model, train_ds, observables, restrictions = inputs(args)
    root = Path(out).parent / f"store_{method}"
    root.mkdir()
    with PeakRSS() as mem, Timer() as t:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if method == "devinterp":
                from devinterp.slt.susceptibilities import susceptibilities

                tree = susceptibilities(model, train_ds, observables, restrictions, sampling_task="train",
                                        output_path=str(root / "samples.zarr"), **sampler_kwargs(args))
                values = np.asarray(tree["/susceptibilities"].sus.values)
            elif method == "ours":
                from devinterp_losskernel.devinterp2_susceptibilities import susceptibilities

                tree = susceptibilities(model, train_ds, observables, restrictions, sampling_task="train",
                                        **sampler_kwargs(args))
                values = np.asarray(tree["/susceptibilities"].sus.values)
            else:  # bif twins: devinterp's bif() or ours, token or sequence method, on the probe
                kind, correlation = method.split("-")
                if kind == "devinterp":
                    from devinterp.slt.bif import bif
                else:
                    from devinterp_losskernel.devinterp2_bif import bif
                probe = (observables["probe"][0], args.bif_n // args.batch_size)  # token kernels: (n·T)² entries
                result = bif(model, train_ds, {"probe": probe}, correlation_method=correlation,
                             output_path=str(root / "samples.zarr") if kind == "devinterp" else None,
                             **sampler_kwargs(args))
                values = np.asarray(result["influences"].values)
    disk = directory_bytes(root)
    shutil.rmtree(root, ignore_errors=True)
    np.save(out, values.astype(np.float64))
    print(json.dumps({"seconds": t.seconds, "cpu_seconds": t.cpu_seconds, "peak_bytes": mem.peak_bytes,
                      "method": mem.method, "disk_bytes": disk}))


def run_worker(flag: str, method: str, out: Path, args, extra=()) -> tuple:
    command = [sys.executable, __file__, flag, method, "--out", str(out), *extra]
    for name in FORWARDED:
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"worker {method} failed:\n{done.stderr[-3000:]}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    values = np.load(out)
    out.unlink()
    print(f"{method}: {info}", flush=True)
    return info, values


def main_end_to_end(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="sus_e2e_", dir=args.workdir))
    methods = ["devinterp", "ours"]
    if args.with_bif:
        try:
            from devinterp_losskernel.devinterp2_bif import bif  # noqa: F401
        except ImportError:
            print("devinterp_losskernel.bif does not exist yet: --with-bif skipped", flush=True)
        else:
            methods += ["devinterp-token", "ours-token", "devinterp-sequence", "ours-sequence"]
    results = {}
    try:
        for method in methods:
            results[method] = run_worker("--end-to-end-worker", method, root / f"{method}.npy", args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    names = {"devinterp": "devinterp susceptibilities(output_path=…)",
             "ours": "devinterp_losskernel.susceptibilities (streaming)",
             "devinterp-token": "devinterp bif(correlation_method='token')",
             "ours-token": "devinterp_losskernel.bif (token)",
             "devinterp-sequence": "devinterp bif(correlation_method='sequence')",
             "ours-sequence": "devinterp_losskernel.bif (sequence)"}
    rows = []
    for method, (info, values) in results.items():
        reference = results[method.replace("ours", "devinterp")][1]
        scale = float(np.abs(reference).max())
        rows.append([names[method], f"{info['seconds']:.1f}", f"{info['cpu_seconds']:.1f}",
                     f"{info['peak_bytes'] / 2**20:,.0f}", f"{info['disk_bytes'] / 2**20:,.1f}",
                     "—" if method.startswith("devinterp") else f"{np.abs(values - reference).max():.1e}",
                     "—" if method.startswith("devinterp") else f"{np.abs(values - reference).max() / scale:.1e}"])
    headers = ["method", "wall s", "CPU s", "peak RSS MiB", "disk written MiB", "max |Δ| vs devinterp",
               "max |Δ| / max |devinterp|"]
    title = (f"susceptibilities() end to end: WRs full + readout, observables 'train' (sampling task, "
             f"{args.n_sampling} sequences) and 'probe' ({args.n:,} sequences) × {args.seq_len} predicted tokens, "
             f"{args.chains} chains × {args.draws} draws (burn-in {args.burnin}), tiny LM (embedding, one "
             f"{args.width}-wide layer, vocab {args.vocab})")
    table = print_table(headers, rows, title)
    state = 16 * (args.n + args.n_sampling) * args.seq_len
    stored = 4 * args.chains * args.draws * (args.n + args.n_sampling + args.batch_size) * args.seq_len
    notes = "\n".join([
        title + ".",
        f"SGLD (SGMCMC.sgld): lr={args.lr}, nβ={args.nbeta}, localization={args.localization}, batch "
        f"{args.batch_size}, seed {args.seed}, num_init_loss_batches=1; {args.train_steps} Adam steps on "
        f"{args.num_train:,} bigram sequences before sampling; CPU.",
        "Each row is a fresh process (model trained, modules imported before the clock starts); peak RSS is the "
        "process high-water mark above its level at the start. devinterp's run writes one store per WR "
        f"(per WR {stored / 2**20:,.1f} MiB of float32 draw losses, 4·C·D·(n_probe + n_train + B)·T, plus every "
        "step's minibatch losses and int64 token ids: 'disk written'; without output_path the same goes to a "
        "temporary folder that is not removed), then loads them back. Ours keeps float64 moments "
        f"(16·Σn·T = {state / 2**20:,.2f} MiB per WR) and writes nothing. The chains are the same (same seeds, "
        "sampler and observables; the LM has no dropout): the difference is devinterp's float32 arithmetic.",
    ])
    if len(results) > 2:
        notes += (f"\nbif() rows: the same model and sampler, one observable 'probe' of {args.bif_n} sequences "
                  f"(token method: a ({args.bif_n}·{args.seq_len})² = {(args.bif_n * args.seq_len) ** 2:,}-entry "
                  "influence array); devinterp's bif() writes its store and loads it back, ours "
                  "(devinterp_losskernel.bif) folds the draws into moments.")
    print("\n" + notes)
    append_results("Streaming susceptibilities() vs devinterp 2.x end to end "
                   "(benchmarks/vs_devinterp_susceptibilities.py)", table + "\n\n" + notes, path=args.results,
                   write=not args.no_record)


# -- stored runs -------------------------------------------------------------------------------
def synthetic_stores(root: Path, args) -> float:
    """One store per WR in devinterp's sample() layout, random factor-model losses: the draw's
    sampling-task loss moves a shared factor that the probe tokens load on. Returns seconds."""
    import time

    import zarr

    start = time.perf_counter()
    g = np.random.default_rng(args.seed)
    T, C, D, chunk = args.seq_len, args.chains, args.draws, 50
    loadings = g.standard_normal((args.n, T)).astype(np.float32) * 0.05
    for wr, spread in (("full", 1.0), ("readout", 0.5)):
        group = zarr.open_group(str(root / f"samples_{wr}.zarr"), mode="w", zarr_format=3)
        init = group.create_array("init_loss", shape=(C, T), dtype="float32", fill_value=np.nan,
                                  dimension_names=("chain", "token_pos"))
        init[:] = 2.0 + 0.01 * g.standard_normal((C, T), dtype=np.float32)
        arrays = {}
        for obs, n in (("train", args.n_sampling), ("probe", args.n)):
            arrays[obs] = group.create_array(f"loss_{obs}", shape=(C, D, n, T), chunks=(1, chunk, n, T),
                                             dtype="float32", fill_value=np.nan,
                                             dimension_names=("chain", "draw", f"batch_{obs}", "token_pos"),
                                             compressors=zarr.codecs.ZstdCodec(level=0))
            ids = group.create_array(f"input_ids_{obs}", shape=(n, T + 1), dtype="int64",
                                     dimension_names=(f"batch_{obs}", "token"))
            ids[:] = g.integers(0, args.vocab, (n, T + 1))
        for c in range(C):
            for d in range(0, D, chunk):
                b = min(chunk, D - d)
                z = (spread * g.standard_normal(b)).astype(np.float32)
                arrays["train"][c, d:d + b] = 2.05 + 0.02 * z[:, None, None] + 0.01 * g.standard_normal(
                    (b, args.n_sampling, T), dtype=np.float32)
                arrays["probe"][c, d:d + b] = 2.5 + z[:, None, None] * loadings + 0.02 * g.standard_normal(
                    (b, args.n, T), dtype=np.float32)
        group.attrs["completed"] = 1
    return time.perf_counter() - start


def float64_reference(trees, chunk: int = 50) -> np.ndarray:
    """devinterp's estimator written out in float64 with plain (uncentred) sums, read in chunks:
    χ = E[φ·a] − E[φ·b] − E[φ]·(ā_full − b̄_full), φ = a − c. Independent of our moments code."""
    sums = {}
    for wr, tree in trees.items():
        ds = tree.dataset
        C, D = ds["loss_train"].shape[:2]
        n, a1, a2, b1, ab = 0, 0.0, 0.0, 0.0, 0.0
        for c in range(C):
            for d in range(0, D, chunk):
                window = dict(chain=c, draw=slice(d, min(d + chunk, D)))
                a = np.asarray(ds["loss_train"].isel(window).values, np.float64).mean(axis=(1, 2))
                b = np.asarray(ds["loss_probe"].isel(window).values, np.float64)
                n, a1, a2 = n + len(a), a1 + a.sum(), a2 + (a * a).sum()
                b1, ab = b1 + b.sum(axis=0), ab + np.einsum("d,dij->ij", a, b)
        sums[wr] = (n, a1, a2, b1, ab, np.asarray(ds["init_loss"].values, np.float64).mean())
    n, a1, a2, b1, ab, c = sums["full"]
    full_delta = a1 / n - b1 / n
    n, a1, a2, b1, ab, _ = sums["readout"]
    e_phi = a1 / n - c
    chi = (a2 / n - c * a1 / n) - (ab / n - c * b1 / n) - e_phi * full_delta
    return chi.reshape(-1, 1)


def worker_from_samples(method: str, store_root: str, out: str) -> None:
    import devinterp.slt.susceptibilities  # noqa: F401
    import xarray as xr

    import devinterp_losskernel.devinterp2_susceptibilities  # noqa: F401

    trees = {wr: xr.open_datatree(str(Path(store_root) / f"samples_{wr}.zarr"), engine="zarr", consolidated=False)
             for wr in ("full", "readout")}
    with PeakRSS() as mem, Timer() as t:
        if method == "reference":
            values = float64_reference(trees)
        else:
            if method == "devinterp":
                from devinterp.slt.susceptibilities import compute_susceptibilities
            else:
                from devinterp_losskernel.devinterp2_susceptibilities import compute_susceptibilities
            tree = compute_susceptibilities(trees, "train")
            values = np.asarray(tree["/susceptibilities"].sus.values)
    np.save(out, values.astype(np.float64))
    print(json.dumps({"seconds": t.seconds, "cpu_seconds": t.cpu_seconds, "peak_bytes": mem.peak_bytes,
                      "method": mem.method, "disk_bytes": 0}))


def main_from_samples(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="sus_samples_", dir=args.workdir))
    try:
        seconds = synthetic_stores(root, args)
        disk = directory_bytes(root)
        results = {method: run_worker("--samples-worker", method, root / f"{method}.npy", args,
                                      extra=("--store", str(root)))
                   for method in ("devinterp", "ours", "reference")}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    theirs, exact = results["devinterp"][1], results.pop("reference")[1]
    scale = float(np.abs(theirs).max())
    rows = []
    for method, (info, values) in results.items():
        rows.append(["devinterp compute_susceptibilities" if method == "devinterp"
                     else "devinterp_losskernel.compute_susceptibilities (50 draws at a time)",
                     f"{info['seconds']:.1f}", f"{info['cpu_seconds']:.1f}", f"{info['peak_bytes'] / 2**20:,.0f}",
                     "—" if method == "devinterp" else f"{np.abs(values - theirs).max() / scale:.1e}",
                     f"{np.abs(values - exact).max() / scale:.1e}"])
    headers = ["method", "wall s", "CPU s", "peak RSS MiB", "max |Δ| vs devinterp / max |χ|",
               "max |Δ| vs float64 reference / max |χ|"]
    title = (f"compute_susceptibilities on stored runs: 2 WRs (full, readout) × {args.chains} chains × "
             f"{args.draws:,} draws; observables 'train' ({args.n_sampling} sequences) and 'probe' ({args.n:,}) "
             f"× {args.seq_len} tokens; {disk / 2**30:,.2f} GiB of stores")
    table = print_table(headers, rows, title)
    notes = "\n".join([
        title + f" (synthetic, written in {seconds:.0f} s by `synthetic_stores` in devinterp's layout and "
        "chunking: a real SGLD run of this many draws takes hours on this machine).",
        "Each row is a fresh process; peak RSS above its level after imports. devinterp loads every stored loss "
        "of each observable whole and forms φ·loss (another array that size); ours reads one chain's 50-draw "
        "chunk at a time into float64 moments (16·Σn·T bytes per WR). The float64 reference is devinterp's "
        "formula with plain float64 sums over the same stored draws (`float64_reference`, not our code): the "
        f"difference from devinterp is devinterp's float32 arithmetic (max |χ| = {scale:.2e}).",
    ])
    print("\n" + notes)
    append_results("compute_susceptibilities on stored runs, chunked vs devinterp 2.x "
                   "(benchmarks/vs_devinterp_susceptibilities.py --from-samples --synthetic)",
                   table + "\n\n" + notes, path=args.results, write=not args.no_record)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1024, help="probe sequences (multiple of --batch-size)")
    parser.add_argument("--n-sampling", type=int, default=128, help="sampling-task observable sequences")
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--draws", type=int, default=200, help="draws per chain")
    parser.add_argument("--burnin", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32, help="SGLD and observable batch size")
    parser.add_argument("--seq-len", type=int, default=16, help="predicted positions per sequence")
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--num-train", type=int, default=2048)
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--nbeta", type=float, default=30.0)
    parser.add_argument("--localization", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--workdir", default=None, help="where the stores go (default: the temp folder)")
    parser.add_argument("--from-samples", action="store_true", help="compute_susceptibilities on stored runs")
    parser.add_argument("--synthetic", action="store_true", help="with --from-samples: synthetic stores")
    parser.add_argument("--with-bif", action="store_true", help="also bif() token/sequence against our bif twin")
    parser.add_argument("--bif-n", type=int, default=128, help="with --with-bif: probe sequences for bif()")
    parser.add_argument("--end-to-end-worker", help=argparse.SUPPRESS)
    parser.add_argument("--samples-worker", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    apply_common_arguments(args)
    require_devinterp2()
    if args.n % args.batch_size or args.n_sampling % args.batch_size or args.bif_n % args.batch_size:
        raise SystemExit("--n, --n-sampling and --bif-n must be multiples of --batch-size (devinterp's observables are "
                         "whole batches)")
    if args.end_to_end_worker:
        return worker_end_to_end(args.end_to_end_worker, args, args.out)
    if args.samples_worker:
        return worker_from_samples(args.samples_worker, args.store, args.out)
    if args.from_samples:
        if not args.synthetic:
            raise SystemExit("--from-samples needs --synthetic (stores of this size take hours to sample here)")
        return main_from_samples(args)
    return main_end_to_end(args)


if __name__ == "__main__":
    main()
