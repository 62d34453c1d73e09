"""Minibatch mode against the exact diagonal mode, on the same chains (issue 19's study, first part).

The README's digits MLP (memorizes 10% flipped labels), devinterp 1.3's
``estimate_learning_coeff_with_summary`` with ``num_steps_bw_draws=1``, and two recorders in
the same run: ``MinibatchVariance`` (the losses of each step's minibatch, no extra forward) and
``LossKernelCallback(train_set, mode="diagonal")`` (every training sample at every draw: the
exact per-sample variance over the chain's states). Both samplers: the usual epoch-wise
shuffling DataLoader and a RandomSampler with replacement. Reports ν (with the jackknife
standard error over chains for the minibatch side), the Spearman correlation of the per-sample
variances and the memorization ROC-AUC of each against the flipped labels, and the run time of
the LLC alone, + minibatch mode, + exact diagonal mode.

    .venv-ci1/bin/python benchmarks/minibatch_study.py              # 2 × 300 and 2 × 1500 draws
    .venv-ci1/bin/python benchmarks/minibatch_study.py --draws 300 --no-record
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from _common import add_common_arguments, append_results, apply_common_arguments, print_table

from devinterp_losskernel import LossKernelCallback
from devinterp_losskernel.demo import DemoConfig, digits_with_flipped_labels, train_memorizing_mlp
from devinterp_losskernel.minibatch import MinibatchVariance, WithIndices

SGLD = dict(lr=3e-4, nbeta=100.0, localization=200.0)


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    keep = np.isfinite(scores)
    return float(roc_auc_score(positive[keep], scores[keep]))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    keep = np.isfinite(a) & np.isfinite(b)
    return float(spearmanr(a[keep], b[keep]).statistic)


def _plain_evaluate(model, batch):
    _, (x, y) = batch
    return F.cross_entropy(model(x), y, reduction="none").mean(), {}


def run(model, data, sampler: str, chains: int, draws: int, *, minibatch: bool, exact: bool, seed: int = 0):
    from devinterp.optim.sgld import SGLD as SGLDOptim
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary

    indexed = WithIndices(data)
    if sampler == "replacement":
        loader = DataLoader(indexed, batch_size=64, sampler=RandomSampler(indexed, replacement=True,
                                                                           num_samples=len(indexed)))
    else:
        loader = DataLoader(indexed, batch_size=64, shuffle=True)
    recorder = MinibatchVariance(num_train=len(data)) if minibatch else None
    x, y = data.tensors
    diagonal = LossKernelCallback((x, y), mode="diagonal", batch_size=2048) if exact else None
    callbacks = [c for c in (recorder, diagonal) if c is not None]
    start = time.perf_counter()
    results = estimate_learning_coeff_with_summary(
        model, loader=loader, evaluate=recorder.evaluate if recorder else _plain_evaluate,
        sampling_method=SGLDOptim, optimizer_kwargs=dict(SGLD), num_chains=chains, num_draws=draws,
        num_burnin_steps=100, num_steps_bw_draws=1, cores=1, seed=seed, device="cpu", callbacks=callbacks,
        verbose=False)
    return results, recorder, diagonal, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, nargs="+", default=[300, 1500])
    parser.add_argument("--chains", type=int, default=2)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    apply_common_arguments(args)

    cfg = DemoConfig(num_train=1797)
    x, _, y_train, flipped = digits_with_flipped_labels(cfg)
    model = train_memorizing_mlp(x, y_train, cfg)
    data = TensorDataset(x, y_train)
    positive = flipped.numpy()
    beta = SGLD["nbeta"] / len(data)

    rows, timing = [], []
    for draws in args.draws:
        for sampler in ("shuffle", "replacement"):
            results, recorder, diagonal, seconds = run(model, data, sampler, args.chains, draws,
                                                       minibatch=True, exact=True)
            mb_var = results["minibatch/variance"]
            exact_var = diagonal.kernel.variance.numpy()
            exact_nu = beta / 2 * exact_var.sum()
            rows.append([f"{args.chains} × {draws}", sampler, f"{results['minibatch/visits'].mean():.0f}",
                         f"{results['minibatch/singular_fluctuation']:.3f} ± {results['minibatch/singular_fluctuation_se']:.3f}",
                         f"{exact_nu:.3f}", f"{_spearman(mb_var, exact_var):.3f}",
                         f"{_auc(mb_var, positive):.3f} / {_auc(exact_var, positive):.3f}",
                         str(results["minibatch/unseen"])])
        for label, minibatch, exact in (("LLC alone", False, False), ("LLC + minibatch mode", True, False),
                                        ("LLC + exact diagonal mode", False, True)):
            _, _, _, seconds = run(model, data, "shuffle", args.chains, draws, minibatch=minibatch, exact=exact)
            timing.append([f"{args.chains} × {draws}", label, f"{seconds:.1f}"])

    table = print_table(["chains × draws", "sampler", "visits / sample", "ν minibatch (± SE over chains)",
                         "ν exact", "Spearman of variances", "memorization AUC minibatch / exact",
                         "samples < 2 visits"], rows,
                        "Minibatch mode vs exact diagonal mode, same chains (digits MLP, N = 1,797, m = 64)")
    times = print_table(["chains × draws", "run", "wall s"], timing, "Cost, same settings (shuffling loader)")
    append_results("Minibatch mode vs the exact diagonal mode (benchmarks/minibatch_study.py)",
                   f"{table}\n\n{times}\n\nSGLD ε = 3e-4, nβ = 100, γ = 200, burn-in 100, every step a draw; the "
                   "exact side evaluates all 1,797 training samples at every draw (eval mode); the minibatch "
                   "side keeps the 64 losses devinterp computes at each step (train mode; the MLP has no "
                   "dropout or BatchNorm, so the two modes give the same losses).",
                   path=args.results, write=not args.no_record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
