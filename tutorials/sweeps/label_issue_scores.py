"""Label-issue scores of the one trained model (tutorial 02's data) against its relabelled images:
the loss kernel's diagonal and the posterior predictive from the same SGLD draws, per SGLD
setting, with cleanlab's cross-validated self-confidence beside them where cleanlab is installed.

    python tutorials/sweeps/label_issue_scores.py --num-train 2000 --seed 0 \\
        --configs 3e-4,100,200,4,300 3e-4,100,20,4,300 --cleanlab --results tutorials/sweeps/RESULTS_label_issues.md

Each config is ``lr,nbeta,localization,chains,draws`` (ε, nβ, γ, C, T; burn-in and minibatch as in
the tutorial's full config). ``--seed`` changes the image subset, the relabelling, the training
and the chains (``get_config("full", num_train=..., seed=...)``). The model is trained once per
run (``--model``: keep/reuse its weights). Prints one table per config (ROC-AUC for the relabelled
images, seconds); ``--results`` appends it as Markdown; ``--out`` appends JSON lines. One thread.
No score uses ``data.flipped`` except through ``detection_auc``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from devinterp_losskernel.analysis import detection_auc
from devinterp_losskernel.analysis.memorization import label_issue_scores
from losskernel_examples import memorization as task


def rank_mean(*scores: np.ndarray) -> np.ndarray:
    """Mean of the scores' ranks (a combination fitted to nothing)."""
    return np.mean([np.argsort(np.argsort(s, kind="stable")) for s in scores], axis=0).astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", nargs="+", default=["3e-4,100,20,4,300"])
    parser.add_argument("--model", default=None, help="weights file: written if absent, else loaded")
    parser.add_argument("--cleanlab", action="store_true", help="add cleanlab's 5-fold CV logistic regression")
    parser.add_argument("--results", default=None, help="append a Markdown table here")
    parser.add_argument("--out", default=None, help="append one JSON line per config")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = task.get_config("full", num_train=args.num_train, seed=args.seed)
    data = task.memorization_data(cfg, verbose=False)
    flipped = data.flipped.numpy()
    started = time.perf_counter()
    path = Path(args.model) if args.model else None
    if path is not None and path.exists():
        model = task.make_mlp(data.x.shape[1], cfg.hidden, cfg.depth, data.num_classes)
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        note = f"loaded {path}"
    else:
        trained = task.train_to_memorization(data, cfg, verbose=False)
        model = trained.model
        note = f"trained: accuracy on the noisy labels {trained.train_accuracy:.4f}"
        if path is not None:
            torch.save(model.state_dict(), path)
    train_seconds = time.perf_counter() - started
    print(f"{data.dataset}: {len(flipped)} images, {int(flipped.sum())} relabelled, seed {args.seed}; "
          f"{note} ({train_seconds:.0f} s)", flush=True)
    baseline = {}
    with torch.no_grad():
        baseline["loss at w*"] = (task.loss_at_w_star(model, data.x, data.y_train), 0.0)
    if args.cleanlab:
        started = time.perf_counter()
        try:
            values = task.cleanlab_self_confidence(data, cfg)
            baseline["cleanlab self-confidence, 5-fold CV logistic regression (retrains 5×)"] = (
                values, time.perf_counter() - started)
        except task.MissingOptionalDependency as error:
            print(f"NOTE: cleanlab skipped ({error})")
    for spec in args.configs:
        values = spec.split(",")
        lr, nbeta, gamma = (float(v) for v in values[:3])
        chains, draws = int(values[3]), int(values[4])
        run = replace(cfg, lr=lr, nbeta=nbeta, localization=gamma, num_chains=chains, num_draws=draws)
        started = time.perf_counter()
        kernel, probs = task.sample_kernel_and_predictive(model, data, run, device="cpu", verbose=False)
        seconds = time.perf_counter() - started
        scores = label_issue_scores(kernel, data.y_train, posterior_probs=probs)
        scores["rank mean of posterior self-confidence and variance"] = rank_mean(
            scores["posterior self-confidence"], scores["variance"])
        rows = [(f"loss-kernel {name}", detection_auc(s, flipped), seconds) for name, s in scores.items()]
        rows += [(name, detection_auc(s, flipped), sec) for name, (s, sec) in baseline.items()]
        rows.sort(key=lambda r: -r[1])
        settings = (f"ε {lr:g}, nβ {nbeta:g}, γ {gamma:g}, {chains} × {draws} draws, burn-in "
                    f"{run.num_burnin_steps}, minibatch {run.sgld_batch_size}")
        head = (f"{len(flipped)} images ({int(flipped.sum())} relabelled), seed {args.seed}; {settings}; "
                f"mean probe loss over the draws {float(kernel.mean.mean()):.3g} (at w* "
                f"{float(kernel.init_loss.mean()):.2g}); diverged chains {kernel.metadata.get('diverged_chains')}")
        print(head)
        for name, auc, sec in rows:
            print(f"  {auc:.4f}  {sec:7.0f} s  {name}")
        if args.results:
            with open(args.results, "a") as f:
                f.write(f"\n#### {head}\n\n`python tutorials/sweeps/label_issue_scores.py --num-train "
                        f"{args.num_train} --seed {args.seed} --configs {spec}` "
                        f"({time.strftime('%Y-%m-%d', time.gmtime())}, {platform.machine()}, torch "
                        f"{torch.__version__}, {args.threads} thread; kernel seconds include burn-in)\n\n"
                        "| score | ROC-AUC | wall s |\n|---|---|---|\n")
                for name, auc, sec in rows:
                    f.write(f"| {name} | {auc:.4f} | {sec:.0f} |\n")
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(dict(num_train=args.num_train, seed=args.seed, lr=lr, nbeta=nbeta,
                                        localization=gamma, chains=chains, draws=draws,
                                        mean_loss=float(kernel.mean.mean()), seconds=seconds,
                                        auc={name: auc for name, auc, _ in rows})) + "\n")


if __name__ == "__main__":
    main()
