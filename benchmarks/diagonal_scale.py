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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-train", type=int, default=60_000)
    parser.add_argument("--chains", type=int, default=1)
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--burnin", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--probe-batch-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    apply_common_arguments(args)

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


if __name__ == "__main__":
    main()
