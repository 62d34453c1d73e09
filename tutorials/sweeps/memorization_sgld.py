"""SGLD settings sweep for the memorization tutorial (02): ROC-AUC of K(x,x) for the relabelled
images, mean probe loss over the draws and LLC, per (ε, nβ, γ, chains × draws).

    python tutorials/sweeps/memorization_sgld.py --model /tmp/mem_model.pt \
        --configs 3e-4,100,300,2,100 3e-4,100,200,2,100 --out sweep.jsonl

Trains the tutorial's model once (full scale, 100% accuracy on the noisy labels) and keeps
its weights in ``--model`` so that several processes (one per core) can share it. Each
config is ``lr,nbeta,localization,chains,draws[,steps_between_draws]``. One thread per process.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from devinterp_losskernel.analysis import detection_auc, memorization_scores
from losskernel_examples import memorization as task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="weights file: written if absent, else loaded")
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--out", default=None, help="append one JSON line per config")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = task.get_config("full")
    data = task.memorization_data(cfg, verbose=False)
    path = Path(args.model)
    if path.exists():
        model = task.make_mlp(data.x.shape[1], cfg.hidden, cfg.depth, data.num_classes)
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
    else:
        model = task.train_to_memorization(data, cfg).model
        torch.save(model.state_dict(), path)
    flipped = data.flipped.numpy()
    print(f"{'lr':>8} {'nbeta':>6} {'gamma':>7} {'C×T':>8} {'thin':>4} {'AUC':>6} {'loss':>7} {'LLC':>7} {'s':>6}")
    for spec in args.configs:
        values = spec.split(",")
        lr, nbeta, gamma = (float(v) for v in values[:3])
        chains, draws = int(values[3]), int(values[4])
        thin = int(values[5]) if len(values) > 5 else 1
        run = replace(cfg, lr=lr, nbeta=nbeta, localization=gamma, num_chains=chains, num_draws=draws,
                      num_steps_bw_draws=thin)
        started = time.perf_counter()
        kernel = task.sample_kernel(model, data, run, device="cpu", verbose=False)
        seconds = time.perf_counter() - started
        row = dict(lr=lr, nbeta=nbeta, localization=gamma, chains=chains, draws=draws, thin=thin,
                   auc=detection_auc(memorization_scores(kernel), flipped),
                   auc_cv=detection_auc(memorization_scores(kernel, normalize="cv"), flipped),
                   mean_loss_over_draws=float(kernel.mean.mean()), llc=kernel.metadata.get("llc/mean"),
                   self_cov_relabelled=float(kernel.variance[torch.from_numpy(flipped)].mean()),
                   self_cov_clean=float(kernel.variance[torch.from_numpy(~flipped)].mean()),
                   seconds=seconds)
        print(f"{lr:8.0e} {nbeta:6.0f} {gamma:7.0f} {chains:>3}×{draws:<4} {thin:4d} {row['auc']:6.3f} "
              f"{row['mean_loss_over_draws']:7.3f} {row['llc'] or float('nan'):7.1f} {seconds:6.0f}", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
