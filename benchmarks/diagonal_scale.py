"""Diagonal mode at training-set scale: memorization scores and ν for all 60,000 Fashion-MNIST
training images, beside devinterp's LLC, in O(n) memory.

One devinterp 1.x ``estimate_learning_coeff_with_summary`` run per variant, same seed:

- "llc only": devinterp's LLC estimator alone;
- "forward only": plus a callback that evaluates the whole training set at every draw (the
  same ProbeSet / evaluate_probe_losses as LossKernelCallback) and discards the losses;
- "diagonal kernel": plus ``LossKernelCallback(train_set, mode="diagonal")``.

Reported: wall time per draw, peak RSS above the start of each run, the state the diagonal
accumulator holds (3·8·n bytes: mean, diagonal and shift) against the n×n co-moment a full
kernel would need (8n² bytes), and the singular fluctuation summed over all n (method
"exact"), beside devinterp's LLC.

    .venv-ci1/bin/python benchmarks/diagonal_scale.py                       # n = 60,000
    .venv-ci1/bin/python benchmarks/diagonal_scale.py --num-train 5000 --draws 5 --no-record
"""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from devinterp_losskernel import LossKernelCallback, SLTSummary
from devinterp_losskernel.accumulator import estimate_kernel_memory
from devinterp_losskernel.probe import ProbeSet, evaluate_probe_losses
from losskernel_examples.fashion_mnist import load_fashion_mnist

import _common  # noqa: F401  (puts src/ on sys.path)
from _common import PeakRSS, Timer, add_common_arguments, append_results, apply_common_arguments, mib, print_table


def evaluate(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


class ForwardOnly:
    """The same probe passes as LossKernelCallback; the losses are discarded."""

    def __init__(self, probe, batch_size):
        self.probe = ProbeSet(probe, batch_size=batch_size)

    def __call__(self, *, model, **_ignored):
        evaluate_probe_losses(model, self.probe, None)


def trained_mlp(x, y, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(256):
            opt.zero_grad()
            evaluate(model, (x[idx], y[idx])).backward()
            opt.step()
    return model


class _Shift(nn.Module):
    """ℓ(x; w) = (x − w)²: one weight, so a draw costs one O(n) pass and the memory measured is the callback's."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return (x[:, 0] - self.w) ** 2


def working_memory(n: int, draws: int, seed: int = 0, batch_size: int = 4096, blocked: bool = False):
    """The diagonal mode's own working memory: LossKernelCallback(mode="diagonal") fed ``draws``
    draws of an n-sample probe whose forward is trivial (so neither a model nor a data loader
    is measured), peak RSS above the level after the probe is built; per sample, against the
    3 · 8 bytes of state. ``blocked``: the diagonal mode as it was before 2026-12-03, a block of
    ``block_size`` (256) draws buffered and folded at once."""
    from devinterp_losskernel import accumulator

    original = accumulator._block_rows
    if blocked:
        accumulator._block_rows = lambda block_size, mode: block_size
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=gen)
    model = _Shift()
    cb = LossKernelCallback((x,), loss_fn=lambda m, batch: m(batch[0]), mode="diagonal", batch_size=batch_size,
                            num_train=n)
    try:
        with torch.no_grad(), PeakRSS() as mem, Timer() as t:
            for draw in range(draws):
                model.w.fill_(float(torch.randn((), generator=gen)) * 0.1)
                cb(model=model, chain=0, draw=draw)
            cb.finalize()
    finally:
        accumulator._block_rows = original
    return mem.peak_bytes, t.seconds, cb.kernel


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-train", type=int, default=60_000)
    parser.add_argument("--chains", type=int, default=1)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--burnin", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--probe-batch-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--working-memory", action="store_true",
                        help="measure only the diagonal mode's own working memory (no model, no Fashion-MNIST): "
                             "--num-train samples (default here 200,000), --draws (default here 300)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    apply_common_arguments(args)
    if args.working_memory:
        return main_working_memory(args, sys.argv[1:] if argv is None else argv)

    images, labels = load_fashion_mnist(split="train")
    x = torch.from_numpy(images[: args.num_train].reshape(-1, 784).astype(np.float32) / 255.0)
    y = torch.from_numpy(labels[: args.num_train])
    n = len(y)
    model = trained_mlp(x, y, args.epochs, args.seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=256, shuffle=True)
    sgld = dict(lr=1e-4, nbeta=100.0, localization=200.0)

    def run(callbacks):
        from devinterp.slt.sampler import estimate_learning_coeff_with_summary

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with PeakRSS() as mem, Timer() as t:
                results = estimate_learning_coeff_with_summary(
                    model, loader, callbacks=callbacks, evaluate=evaluate, optimizer_kwargs=dict(sgld),
                    num_chains=args.chains, num_draws=args.draws, num_burnin_steps=args.burnin,
                    seed=args.seed, verbose=False, device="cpu", cores=1)
        return results, t.seconds, mem.peak_bytes

    draws = args.chains * args.draws
    rows = []
    _, t_llc, m_llc = run([])
    rows.append(["llc only", n, draws, f"{t_llc:.1f}", "", mib(m_llc), ""])
    _, t_fwd, m_fwd = run([ForwardOnly((x, y), args.probe_batch_size)])
    rows.append(["forward only", n, draws, f"{t_fwd:.1f}", f"{1e3 * (t_fwd - t_llc) / draws:.0f}", mib(m_fwd), ""])
    cb = LossKernelCallback((x, y), mode="diagonal", batch_size=args.probe_batch_size)
    results, t_diag, m_diag = run([cb, SLTSummary(cb)])
    state = sum(t.numel() * t.element_size()
                for t in (cb.accumulator._moments.shift, cb.accumulator._moments.mean, cb.accumulator._moments.m2_diag))
    rows.append(["diagonal kernel", n, draws, f"{t_diag:.1f}", f"{1e3 * (t_diag - t_llc) / draws:.0f}", mib(m_diag),
                 mib(state)])
    headers = ["variant", "n", "draws", "wall s", "probe ms/draw", "peak RSS MiB", "kernel state MiB"]
    table = print_table(headers, rows, f"Diagonal mode on {n:,} Fashion-MNIST training images")
    full = estimate_kernel_memory(n)
    method = results.get("loss_kernel/singular_fluctuation_method")
    notes = "\n".join([
        f"devinterp llc/mean = {results['llc/mean']:.3f}; singular fluctuation ν = "
        f"{results['loss_kernel/singular_fluctuation']:.3f} (V = {results['loss_kernel/empirical_variance']:.4g}, "
        f"summed over all {n:,} training samples: method '{method}'); "
        f"diagonal state {state:,} bytes = 3·8·n exactly; a full kernel would need "
        f"{full / 2**30:,.1f} GiB for its co-moment (estimate_kernel_memory).",
        f"MLP 784-256-10 trained {args.epochs} epochs (Adam); SGLD ε {sgld['lr']}, nβ {sgld['nbeta']}, "
        f"γ {sgld['localization']}, minibatch 256, {args.chains} chain(s) × {args.draws} draws after "
        f"{args.burnin} burn-in; probe = the whole training set, batch {args.probe_batch_size}; "
        "'probe ms/draw' = (variant − llc only) / draws; peak RSS above the start of each run "
        "(VmHWM), which includes devinterp's own per-chain model copy.",
    ])
    print("\n" + notes)
    append_results("Diagonal mode at training-set scale (benchmarks/diagonal_scale.py)",
                   table + "\n\n" + notes, path=args.results, write=not args.no_record)


def main_working_memory(args, argv) -> None:
    n = args.num_train if "--num-train" in " ".join(argv) else 200_000
    draws = args.draws if "--draws" in " ".join(argv) else 300
    rows = []
    for blocked in (True, False):
        for samples in sorted({n // 4, n}):
            peak, seconds, kernel = working_memory(samples, draws, args.seed, args.probe_batch_size, blocked)
            rows.append(["before: blocks of 256 draws" if blocked else "now: each draw folded", samples, draws,
                         f"{seconds:.1f}", mib(peak), f"{peak / samples:,.0f}", 24, f"{peak / samples / 24:.1f}"])
    headers = ["diagonal fold", "n", "draws", "wall s", "peak RSS rise MiB", "bytes / sample", "state bytes / sample",
               "× state"]
    table = print_table(headers, rows, "Diagonal mode's own working memory")
    notes = (f"LossKernelCallback(mode='diagonal', batch_size={args.probe_batch_size}) fed draws of ℓ(x; w) = (x − w)² over n one-feature "
             "samples, called directly as devinterp 1.x calls it (one chain); peak RSS above the level after the "
             "probe and callback are built (VmHWM), so it is the accumulator, the held-back draws of the "
             "divergence window (16 float32 draws: 64 B a sample) and the per-draw temporaries; state = mean, M2 and shift, "
             "3 · 8 bytes a sample. 'before' is the same code with the diagonal mode's old [256, n] block buffer "
             "patched back in (accumulator._block_rows).")
    print("\n" + notes)
    append_results("Diagonal mode's working memory (benchmarks/diagonal_scale.py --working-memory)",
                   table + "\n\n" + notes, path=args.results, write=not args.no_record)


if __name__ == "__main__":
    main()
