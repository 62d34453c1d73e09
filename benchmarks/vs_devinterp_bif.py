"""Our streaming loss kernel vs devinterp 2.x's BIF on the same language model and draws.

devinterp 2.x: ``bif(model, dataset, observables={"probe": ...}, correlation_method="sequence")``
runs SGLD through ``sample()``, which writes every draw's per-token probe losses (and the
SGLD minibatch losses and input ids of every step) to a zarr store, then
``compute_bif()`` loads all stored losses, averages them over token positions and takes
torch.corrcoef over the (chain, draw) axis: an n×n sequence-level correlation matrix.

Ours: the same SGLD chains through devinterp 2.x's ``sample_single_chain(callbacks=[cb])``
with ``cb = LossKernelCallback({"input_ids": probe})``, whose default loss is the mean
next-token cross-entropy per sequence, folded into a float64 accumulator; R = K/√(K_ii K_jj).

Like-for-like: the same tiny GPT-2 (built locally from a config, dropout 0 — devinterp's
observable evaluates the chain's model in train mode while our probe pass uses eval mode,
so dropout would make the two differ), the same probe sequences in the same order (taken
from devinterp's own Observable), the same sampler (SGMCMC.sgld with the kwargs sample()
builds), seeds (chain c: seed init_seed + c, data order init_seed) and probe batch size.
The chains are therefore identical and the correlation matrices differ only by rounding;
the stored losses are also re-correlated in float64 to show where the difference comes
from. Run with the devinterp 2.x venv:

    .venv2/bin/python benchmarks/vs_devinterp_bif.py                          # full
    .venv2/bin/python benchmarks/vs_devinterp_bif.py --n 128 --chains 2 --draws 20 --train-steps 20

``--from-samples``: the kernel of a *stored* run. One devinterp ``sample()`` run writes its
zarr store (n probe sequences, chains × draws); then, each in a fresh process (so that
peak RSS is its own), devinterp's ``compute_bif(correlation_method="sequence",
compute_covariance=True)`` — which loads every stored draw — and our
``LossKernel.from_samples`` — which reads one chunk of draws at a time into the n×n
co-moment — on the first 1, 2, … chains of that store (N = chains × draws)::

    .venv2/bin/python benchmarks/vs_devinterp_bif.py --from-samples --n 256 --chains 2 --draws 200 --seq-len 8
    .venv2/bin/python benchmarks/vs_devinterp_bif.py --from-samples --synthetic --n 4096 --chains 4 --draws 2000 --seq-len 8

(``--synthetic`` writes the store in devinterp's layout from random losses: a real run of
8,000 draws on a 4,096-sequence observable takes hours on a 2-core CPU.)

``--end-to-end``: our in-run callback against devinterp's ``bif()`` end to end, on a tiny LM
(an embedding, one mixing layer, a readout; the same briefly trained model and data in every
process). Each of these runs in a fresh process, the model trained and everything imported
before the measurement starts: ``bif(..., correlation_method="sequence", compute_covariance=True,
output_path=…)`` (``sample()`` writes the zarr store, ``compute_bif`` loads it back);
``sample_single_chain`` per chain with ``LossKernelCallback`` (float64 and float32 state: the
same chains, nothing written); and our ``llc()`` twin (devinterp's LLC and the kernel of the
same draws)::

    .venv2/bin/python benchmarks/vs_devinterp_bif.py --end-to-end --n 4096 --chains 2 --draws 100 --seq-len 8
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # devinterp's per-chain progress bars

import numpy as np
import torch

from devinterp_losskernel import LossKernelCallback

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


def require_devinterp2():
    try:
        from importlib.metadata import version

        v = version("devinterp")
    except Exception:
        raise SystemExit("devinterp is not installed; run with .venv2/bin/python")
    if not v.startswith("2."):
        raise SystemExit(f"vs_devinterp_bif.py needs devinterp 2.x (found {v}): "
                         "run it with .venv2/bin/python")


def make_tokens(count: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    """Sequences from a fixed random bigram chain: learnable structure for a tiny LM."""
    g = torch.Generator().manual_seed(1000)
    transition = torch.softmax(torch.randn(vocab, vocab, generator=g) * 3, dim=1)
    g.manual_seed(seed)
    ids = torch.empty(count, length, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (count,), generator=g)
    for t in range(1, length):
        ids[:, t] = torch.multinomial(transition[ids[:, t - 1]], 1, generator=g).squeeze(1)
    return ids


def build_model(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=args.vocab, n_positions=args.seq_len + 1, n_embd=args.width,
        n_layer=args.layers, n_head=args.heads, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # see the module docstring
    )
    torch.manual_seed(args.seed)
    return GPT2LMHeadModel(config)


def train_briefly(model, ids, steps: int, batch_size: int, seed: int):
    """A few Adam steps, so SGLD starts near a (local) minimum as it would in practice."""
    from devinterp.slt.lm_loss import compute_per_token_loss

    if steps <= 0:
        return model
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = ids[torch.randint(0, len(ids), (batch_size,), generator=g)]
        loss = compute_per_token_loss(model, batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def run_bif(model, train_ds, probe_ds, args, out_dir: Path, compute_covariance: bool = False):
    """devinterp 2.x end to end: bif() = sample() (zarr on disk) + compute_bif()."""
    from devinterp.slt.bif import bif

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = bif(
            model, train_ds, {"probe": (probe_ds, args.n // args.batch_size)},
            lr=args.lr, n_beta=args.nbeta, localization=args.localization,
            correlation_method="sequence", num_chains=args.chains, num_draws=args.draws,
            batch_size=args.batch_size, num_burnin_steps=args.burnin,
            num_init_loss_batches=1, init_seed=args.seed, output_path=str(out_dir),
            device="cpu", bif_device="cpu", compute_covariance=compute_covariance,
        )
    return np.asarray(result["influences"].values)


def run_ours(model, train_ds, probe_ids, args, dtype=torch.float64, return_kernel=False):
    """The same chains through sample_single_chain, with LossKernelCallback."""
    from devinterp.slt.config import SAMPLING_METHODS
    from devinterp.slt.lm_loss import make_evaluate_fn
    from devinterp.slt.sampler import sample_single_chain

    cb = LossKernelCallback({"input_ids": probe_ids}, batch_size=args.batch_size, dtype=dtype)
    kwargs = dict(nbeta=args.nbeta, lr=args.lr, localization=args.localization,
                  noise_level=1.0, weight_decay=0.0, bounding_box_size=None, save_metrics=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for chain in range(args.chains):
            sample_single_chain(
                ref_model=model, dataset=train_ds, evaluate=make_evaluate_fn(None),
                param_masks={name: None for name, _ in model.named_parameters()},
                num_draws=args.draws, num_burnin_steps=args.burnin, num_steps_bw_draws=1,
                sampling_method=SAMPLING_METHODS["sgmcmc_sgld"], sampling_method_kwargs=kwargs,
                chain=chain, seed=args.seed + chain, dataloader_seed=args.seed, device="cpu",
                callbacks=[cb], batch_size=args.batch_size, shuffle=True, epoch_mode="cycle",
            )
    kernel = cb.kernel
    if return_kernel:
        return kernel
    return kernel.correlation.numpy(), kernel.mean.numpy(), kernel.num_draws


def stored_sequence_losses(out_dir: Path) -> np.ndarray:
    """devinterp's stored per-token probe losses → per-sequence means, [chains·draws, n], float64."""
    import xarray as xr

    tree = xr.open_datatree(str(out_dir), engine="zarr", consolidated=False)
    losses = np.asarray(tree.dataset["loss_probe"].values, dtype=np.float64)  # [C, T, n, L]
    return losses.mean(axis=-1).reshape(-1, losses.shape[2])


class TinyLM(torch.nn.Module):
    """An embedding, one mixing layer and a readout: cheap enough to store thousands of draws."""

    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, vocab)

    def forward(self, input_ids):
        return self.out(torch.tanh(self.mix(self.embed(input_ids))))


def store_run(args, store: Path) -> float:
    """devinterp's sample() on a tiny LM with one observable of n sequences; returns seconds."""
    import time

    from datasets import Dataset
    from devinterp.slt.sampling import sample

    length = args.seq_len + 1
    train_ids = make_tokens(args.num_train, length, args.vocab, seed=1)
    probe_ids = make_tokens(args.n, length, args.vocab, seed=2)
    train_ds = Dataset.from_dict({"input_ids": train_ids.tolist()}).with_format("torch")
    probe_ds = Dataset.from_dict({"input_ids": probe_ids.tolist()}).with_format("torch")
    torch.manual_seed(args.seed)
    model = train_briefly(TinyLM(args.vocab, args.width), train_ids, args.train_steps, args.batch_size, args.seed)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sample(model, train_ds, {"probe": (probe_ds, args.n // args.batch_size)}, lr=args.lr, n_beta=args.nbeta,
               localization=args.localization, num_chains=args.chains, num_draws=args.draws,
               batch_size=args.batch_size, num_init_loss_batches=1, init_seed=args.seed,
               output_path=str(store), device="cpu")
    return time.perf_counter() - start


def synthetic_store(path: Path, chains: int, draws: int, n: int, tokens: int, seed: int = 0, chunk: int = 50):
    """A zarr store in the layout of devinterp 2's sample() (the arrays compute_bif and
    from_samples read: ``loss_probe`` [chain, draw, batch_probe, token_pos] float32 in chunks of
    (1, 50 draws, n, tokens), zstd level 0, NaN fill; ``input_ids_probe``), filled with
    losses of a random 16-factor model plus noise — for draw counts whose real SGLD run would
    take too long here. Returns seconds."""
    import time

    import zarr

    start = time.perf_counter()
    g = np.random.default_rng(seed)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    losses = root.create_array("loss_probe", shape=(chains, draws, n, tokens), chunks=(1, chunk, n, tokens),
                               dtype="float32", fill_value=np.nan,
                               dimension_names=("chain", "draw", "batch_probe", "token_pos"),
                               compressors=zarr.codecs.ZstdCodec(level=0))
    ids = root.create_array("input_ids_probe", shape=(n, tokens + 1), dtype="int64",
                            dimension_names=("batch_probe", "token"))
    ids[:] = g.integers(0, 16, (n, tokens + 1))
    factors = g.standard_normal((n, 16)).astype(np.float32) * 0.05
    for c in range(chains):
        for d in range(0, draws, chunk):
            b = min(chunk, draws - d)
            z = g.standard_normal((b, 16)).astype(np.float32)
            noise = 0.02 * g.standard_normal((b, n, tokens), dtype=np.float32)
            losses[c, d:d + b] = 2.0 + (z @ factors.T)[:, :, None] + noise
    root.attrs["metadata"] = {"config": {"sampler": {"lr": 1e-4, "n_beta": 30.0, "localization": 100.0}}}
    return time.perf_counter() - start


def worker(method: str, store: str, chains: int, out: str, dtype: str) -> None:
    """One measurement in this (fresh) process: prints {"seconds", "cpu_seconds",
    "peak_bytes"} as JSON. Imports happen before the measurement."""
    import json

    import devinterp.slt.bif  # noqa: F401  (transformers etc.: not part of the measurement)
    import devinterp.slt.observables  # noqa: F401
    import xarray as xr

    from devinterp_losskernel import LossKernel

    tree = xr.open_datatree(store, engine="zarr", consolidated=False)
    with PeakRSS() as mem, Timer() as t:
        if method == "bif":
            from devinterp.slt.bif import compute_bif

            sub = xr.DataTree(dataset=tree.dataset.isel(chain=slice(0, chains)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = compute_bif(sub, correlation_method="sequence", compute_covariance=True, device="cpu")
            matrix = np.asarray(result["influences"].values)
        else:
            kernel = LossKernel.from_samples(tree, "probe", chains=range(chains),
                                             dtype=getattr(torch, dtype))
            matrix = kernel.covariance.numpy()
    np.save(out, matrix.astype(np.float64))
    print(json.dumps({"seconds": t.seconds, "cpu_seconds": t.cpu_seconds, "peak_bytes": mem.peak_bytes,
                      "method": mem.method}))


def main_from_samples(args) -> None:
    import json
    import subprocess
    import sys

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bif_samples_"))
    root.mkdir(parents=True, exist_ok=True)
    store = root / "samples.zarr"
    try:
        if store.exists():
            shutil.rmtree(store)
        sample_seconds = (synthetic_store(store, args.chains, args.draws, args.n, args.seq_len)
                          if args.synthetic else store_run(args, store))
        disk = directory_bytes(store)
        rows, chain_counts = [], [c for c in (1, 2, 4, 8, 16) if c < args.chains] + [args.chains]
        for chains in chain_counts:
            results = {}
            for method, dtype in (("bif", "float32"), ("ours", "float64"), ("ours", "float32")):
                out = root / f"{method}_{dtype}_{chains}.npy"
                command = [sys.executable, __file__, "--worker", method, "--store", str(store), "--use-chains",
                           str(chains), "--out", str(out), "--dtype", dtype]
                if args.threads is not None:
                    command += ["--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                results[method, dtype] = (json.loads(done.stdout.strip().splitlines()[-1]), np.load(out))
                out.unlink()
            (bif_info, k_bif) = results["bif", "float32"]
            scale = float(np.abs(k_bif).max())
            for (method, dtype), (info, matrix) in results.items():
                name = ("devinterp compute_bif(sequence, covariance)" if method == "bif"
                        else f"LossKernel.from_samples ({dtype} state)")
                rows.append([f"{chains * args.draws:,}", name, f"{info['seconds']:.2f}", f"{info['cpu_seconds']:.2f}",
                             f"{info['peak_bytes'] / 2**20:,.0f}",
                             "0" if method == "bif" else f"{np.abs(matrix - k_bif).max() / scale:.1e}"])
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    headers = ["draws N", "method", "wall s", "CPU s", "peak RSS MiB", "max |K − K_bif| / max |K_bif|"]
    title = (f"Kernel of a stored devinterp 2.x run: n={args.n:,} probe sequences × {args.seq_len} predicted "
             f"tokens, up to {args.chains} chains × {args.draws:,} draws")
    table = print_table(headers, rows, title)
    stored_probe = 4 * args.chains * args.draws * args.n * args.seq_len
    source = (f"written in {sample_seconds:.0f} s by `synthetic_store` in devinterp's layout and chunking "
              "(random 16-factor losses: a real SGLD run of this size takes ~0.1–0.3 s per draw on this "
              "machine, hours for these draws)" if args.synthetic else
              f"written by one `sample()` run in {sample_seconds:.0f} s (tiny LM: embedding, one "
              f"{args.width}-wide layer, vocab {args.vocab}; lr={args.lr}, nβ={args.nbeta}, "
              f"γ={args.localization}, batch {args.batch_size})")
    notes = "\n".join([
        title + f"; the store ({disk / 2**20:,.0f} MiB on disk, zstd level 0) was {source}.",
        "Each row is a fresh process reading the first chains of that store (N = chains × draws); peak RSS "
        "is the process high-water mark above its level after imports. compute_bif loads all stored losses "
        f"of the observable (4·N·n·tokens bytes: {stored_probe / 2**20:,.0f} MiB at the largest N), averages "
        "them over tokens and takes torch.cov of the [2n, N] float32 stack (a 2n×2n matrix); from_samples "
        "reads one stored chunk (50 draws) at a time into the n×n co-moment (8n² bytes in float64, "
        "4n² in float32) and returns K (another n²): its memory does not grow with N.",
        "The difference is compute_bif's float32 arithmetic: from_samples in float64 is exact to rounding "
        "(tested against numpy.cov of the stored losses).",
    ])
    print("\n" + notes)
    append_results("LossKernel.from_samples vs compute_bif on a stored devinterp 2.x run "
                   "(benchmarks/vs_devinterp_bif.py --from-samples)",
                   table + "\n\n" + notes, path=args.results, write=not args.no_record)


E2E_FORWARDED = ("n", "chains", "draws", "burnin", "batch_size", "seq_len", "vocab", "width", "num_train",
                 "train_steps", "lr", "nbeta", "localization", "seed")
E2E_METHODS = (("bif", "float32"), ("ours", "float64"), ("ours", "float32"), ("llc", "float64"))


def end_to_end_inputs(args):
    """The tiny LM (briefly trained), the training set, the probe observable and its sequences
    in devinterp's own order: built identically in every worker process."""
    from datasets import Dataset
    from devinterp.slt.observables import Observable

    length = args.seq_len + 1
    train_ids = make_tokens(args.num_train, length, args.vocab, seed=1)
    probe_pool = make_tokens(args.n, length, args.vocab, seed=2)
    train_ds = Dataset.from_dict({"input_ids": train_ids.tolist()}).with_format("torch")
    probe_ds = Dataset.from_dict({"input_ids": probe_pool.tolist()}).with_format("torch")
    probe_ids = Observable(  # sample()'s observable: the same sequences in the same order
        dataset=probe_ds, task_name="probe", batches_per_draw=args.n // args.batch_size,
        batch_size=args.batch_size, context_length=args.seq_len, device=torch.device("cpu"),
    ).input_ids
    torch.manual_seed(args.seed)
    model = train_briefly(TinyLM(args.vocab, args.width), train_ids, args.train_steps, args.batch_size, args.seed)
    return model, train_ds, probe_ds, probe_ids


def worker_end_to_end(method: str, args, out: str, dtype: str) -> None:
    """One end-to-end run in this (fresh) process; prints {"seconds", "cpu_seconds",
    "peak_bytes", "disk_bytes", "llc_mean"} as JSON and saves the kernel (covariance) to ``out``."""
    import json

    import devinterp.slt.bif  # noqa: F401  (imports are not part of the measurement)
    import devinterp.slt.sampling  # noqa: F401
    import xarray  # noqa: F401
    import zarr  # noqa: F401

    from devinterp_losskernel import llc

    model, train_ds, probe_ds, probe_ids = end_to_end_inputs(args)
    store = Path(out).with_suffix(".zarr")
    llc_mean = None
    with PeakRSS() as mem, Timer() as t:
        if method == "bif":
            matrix = run_bif(model, train_ds, probe_ds, args, store, compute_covariance=True)
        elif method == "ours":
            matrix = run_ours(model, train_ds, probe_ids, args, dtype=getattr(torch, dtype),
                              return_kernel=True).covariance.numpy()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = llc(model, train_ds, {"probe": (probe_ds, args.n // args.batch_size)}, lr=args.lr,
                         n_beta=args.nbeta, localization=args.localization, num_chains=args.chains,
                         num_draws=args.draws, batch_size=args.batch_size, num_burnin_steps=args.burnin,
                         num_init_loss_batches=1, init_seed=args.seed, device="cpu",
                         # the probe is held-out sequences, not training samples: no singular fluctuation
                         callback_kwargs=dict(dtype=getattr(torch, dtype), probe_train_mask=False))
            matrix = ds.covariance.values
            llc_mean = float(ds.llc_mean)
    disk = directory_bytes(store) if store.exists() else 0
    shutil.rmtree(store, ignore_errors=True)
    np.save(out, np.asarray(matrix, dtype=np.float64))
    print(json.dumps({"seconds": t.seconds, "cpu_seconds": t.cpu_seconds, "peak_bytes": mem.peak_bytes,
                      "method": mem.method, "disk_bytes": disk, "llc_mean": llc_mean}))


def main_end_to_end(args) -> None:
    import json
    import subprocess
    import sys

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bif_e2e_"))
    root.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        for method, dtype in E2E_METHODS:
            out = root / f"e2e_{method}_{dtype}.npy"
            command = [sys.executable, __file__, "--end-to-end-worker", method, "--out", str(out), "--dtype", dtype]
            for name in E2E_FORWARDED:
                command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            if args.threads is not None:
                command += ["--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"worker {method} ({dtype}) failed:\n{done.stderr[-3000:]}")
            results[method, dtype] = (json.loads(done.stdout.strip().splitlines()[-1]), np.load(out))
            out.unlink()
            print(f"{method} ({dtype}): {results[method, dtype][0]}", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    bif_info, k_bif = results["bif", "float32"]
    scale = float(np.abs(k_bif).max())
    names = {"bif": "devinterp bif(sequence, compute_covariance=True)",
             "ours": "LossKernelCallback + sample_single_chain ({} state)",
             "llc": "devinterp_losskernel.llc() twin ({} state; + devinterp's LLC)"}
    rows = []
    for (method, dtype), (info, matrix) in results.items():
        rows.append([names[method].format(dtype), f"{info['seconds']:.1f}", f"{info['cpu_seconds']:.1f}",
                     f"{info['peak_bytes'] / 2**20:,.0f}", f"{info['disk_bytes'] / 2**20:,.1f}",
                     "0" if method == "bif" else f"{np.abs(matrix - k_bif).max() / scale:.1e}"])
    headers = ["method", "wall s", "CPU s", "peak RSS MiB", "disk written MiB", "max |K − K_bif| / max |K_bif|"]
    title = (f"End to end: n={args.n:,} probe sequences × {args.seq_len} predicted tokens, {args.chains} chains "
             f"× {args.draws} draws (burn-in {args.burnin}), tiny LM (embedding, one {args.width}-wide layer, "
             f"vocab {args.vocab})")
    table = print_table(headers, rows, title)
    t_bif, m_bif = bif_info["seconds"], bif_info["peak_bytes"]
    verdicts = []
    for (method, dtype), (info, _) in results.items():
        if method == "bif":
            continue
        verdicts.append(f"{names[method].format(dtype)}: {info['seconds'] / t_bif:.2f}× bif()'s wall time, "
                        f"{info['peak_bytes'] / m_bif:.2f}× its peak RSS — target "
                        + ("met" if info["seconds"] < t_bif and info["peak_bytes"] <= m_bif else "NOT met"))
    llc_info = results["llc", "float64"][0]
    notes = "\n".join([
        title + ".",
        f"SGLD (SGMCMC.sgld): lr={args.lr}, nβ={args.nbeta}, localization={args.localization}, batch "
        f"{args.batch_size} (also the probe batch size on every side), seed {args.seed} (chain c: {args.seed} + c; "
        f"data order {args.seed}); bif() and llc() with num_init_loss_batches=1; {args.train_steps} Adam steps "
        f"on {args.num_train:,} bigram sequences before sampling; CPU.",
        "Each row is a fresh process (model trained and modules imported before the clock starts); peak RSS is "
        "the process high-water mark above its level at the start of the measurement. bif() = sample() "
        "(every draw's per-token probe losses, the per-step SGLD losses and input ids written to a zarr store: "
        "'disk written') + compute_bif() (loads the stored losses, torch.cov in float32 of the stacked "
        f"[2n, N] matrix). The callback keeps the mean and co-moment (8n² = {8 * args.n**2 / 2**20:,.1f} MiB in "
        f"float64, {4 * args.n**2 / 2**20:,.1f} MiB in float32) and writes nothing; the kernel it returns "
        "holds K and R (two more n² matrices).",
        f"The chains are the same on every side (same seeds, same sampler; the LM has no dropout): the "
        f"differences are float32 rounding. llc() twin's llc_mean = {llc_info['llc_mean']:.4f}.",
        *verdicts,
    ])
    print("\n" + notes)
    append_results("In-run loss kernel vs devinterp 2.x bif() end to end (benchmarks/vs_devinterp_bif.py "
                   "--end-to-end)", table + "\n\n" + notes, path=args.results, write=not args.no_record)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1024, help="probe sequences (multiple of --batch-size)")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--draws", type=int, default=200, help="draws per chain")
    parser.add_argument("--burnin", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32, help="SGLD and probe batch size")
    parser.add_argument("--seq-len", type=int, default=32, help="predicted positions per sequence")
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--num-train", type=int, default=2048)
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--nbeta", type=float, default=30.0)
    parser.add_argument("--localization", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--workdir", default=None, help="where the zarr store goes (default: a temp dir)")
    parser.add_argument("--from-samples", action="store_true",
                        help="LossKernel.from_samples vs compute_bif on one stored sample() run")
    parser.add_argument("--synthetic", action="store_true",
                        help="with --from-samples: write the store in devinterp's layout from random losses "
                             "instead of running sample() (for large draw counts)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="our in-run callback (and llc() twin) vs bif() end to end, each in a fresh process")
    parser.add_argument("--end-to-end-worker", choices=["bif", "ours", "llc"], help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["bif", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--use-chains", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float64", help=argparse.SUPPRESS)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    apply_common_arguments(args)
    require_devinterp2()
    if args.worker:
        return worker(args.worker, args.store, args.use_chains, args.out, args.dtype)
    if args.end_to_end_worker:
        return worker_end_to_end(args.end_to_end_worker, args, args.out, args.dtype)
    if args.end_to_end:
        if args.n % args.batch_size:
            raise SystemExit("--n must be a multiple of --batch-size (devinterp's observables are whole batches)")
        return main_end_to_end(args)
    if args.from_samples:
        if args.n % args.batch_size:
            raise SystemExit("--n must be a multiple of --batch-size")
        return main_from_samples(args)
    if args.n % args.batch_size:
        raise SystemExit("--n must be a multiple of --batch-size (devinterp's observables are whole batches)")

    from datasets import Dataset
    from devinterp.slt.observables import Observable

    length = args.seq_len + 1
    train_ids = make_tokens(args.num_train, length, args.vocab, seed=1)
    probe_pool = make_tokens(args.n, length, args.vocab, seed=2)
    train_ds = Dataset.from_dict({"input_ids": train_ids.tolist()}).with_format("torch")
    probe_ds = Dataset.from_dict({"input_ids": probe_pool.tolist()}).with_format("torch")
    # devinterp's own Observable picks (and orders) the probe sequences; we use the same ones
    probe_ids = Observable(
        dataset=probe_ds, task_name="probe", batches_per_draw=args.n // args.batch_size,
        batch_size=args.batch_size, context_length=args.seq_len, device=torch.device("cpu"),
    ).input_ids
    model = train_briefly(build_model(args), train_ids, args.train_steps, args.batch_size, args.seed)

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bif_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        # untimed warm-up of both code paths (lazy imports, first-call allocations)
        small = argparse.Namespace(**{**vars(args), "chains": 1, "draws": 2})
        run_bif(model, train_ds, probe_ds, small, root / "warmup.zarr")
        run_ours(model, train_ds, probe_ids, small)
        shutil.rmtree(root / "warmup.zarr", ignore_errors=True)

        store = root / "samples.zarr"
        with PeakRSS() as mem_bif, Timer() as t_bif:
            r_bif = run_bif(model, train_ds, probe_ds, args, store)
        disk_bif = directory_bytes(store)
        with PeakRSS() as mem_ours, Timer() as t_ours:
            r_ours, mean_ours, num_draws = run_ours(model, train_ds, probe_ids, args)

        stored = stored_sequence_losses(store)
        r_ref = np.corrcoef(stored, rowvar=False)  # float64, on devinterp's stored float32 losses
        same_chains = float(np.abs(mean_ours - stored.mean(axis=0)).max())
        probe_bytes = 4 * args.chains * args.draws * args.n * args.seq_len
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)

    assert num_draws == stored.shape[0] == args.chains * args.draws
    headers = ["method", "wall s", "peak RSS MiB", "disk written MiB", "max |R − R_bif|",
               "max |R − R_float64(stored)|"]
    rows = [
        ["devinterp 2.x bif(correlation_method='sequence')", f"{t_bif.seconds:.2f}",
         f"{mem_bif.peak_bytes / 2**20:,.1f}", f"{disk_bif / 2**20:,.1f}", "0",
         f"{np.abs(r_bif - r_ref).max():.1e}"],
        ["LossKernelCallback + sample_single_chain", f"{t_ours.seconds:.2f}",
         f"{mem_ours.peak_bytes / 2**20:,.1f}", "0", f"{np.abs(r_ours - r_bif).max():.1e}",
         f"{np.abs(r_ours - r_ref).max():.1e}"],
    ]
    title = (f"n={args.n} probe sequences × {args.seq_len} predicted tokens, {args.chains} chains "
             f"× {args.draws} draws, tiny GPT-2 ({args.layers} layers, width {args.width}, "
             f"vocab {args.vocab})")
    table = print_table(headers, rows, title)
    notes = "\n".join([
        title + ".",
        f"SGLD: lr={args.lr}, nβ={args.nbeta}, localization={args.localization}, batch "
        f"{args.batch_size}, burn-in {args.burnin}, seed {args.seed}; bif() with "
        "num_init_loss_batches=1; probe batch size = SGLD batch size on both sides; CPU.",
        f"Same chains on both sides: max |mean probe loss (ours) − mean of devinterp's stored "
        f"losses| = {same_chains:.1e}.",
        f"devinterp writes every draw's per-token probe losses (float32, "
        f"{probe_bytes / 2**20:,.1f} MiB here = 4·chains·draws·n·tokens, growing with the "
        "draws) plus per-step SGLD losses and input ids to the zarr store ('disk written' is "
        "its size), and compute_bif() loads all of them back. We keep the float64 mean and "
        f"co-moment in memory: 8n² = {8 * args.n**2 / 2**20:,.1f} MiB whatever the draws, "
        "and write nothing.",
        "'R_float64(stored)' is np.corrcoef in float64 of devinterp's stored losses averaged "
        "over tokens: it shows how much of the difference is devinterp's float32 corrcoef "
        "and how much our float32 probe losses. Peak RSS is the process high-water mark above "
        "the level before each run.",
    ])
    print("\n" + notes)
    append_results("Loss kernel vs devinterp 2.x BIF (benchmarks/vs_devinterp_bif.py)",
                   table + "\n\n" + notes, path=args.results, write=not args.no_record)


if __name__ == "__main__":
    main()
