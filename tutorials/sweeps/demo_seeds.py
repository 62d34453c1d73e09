"""Does ``losskernel demo`` hold across seeds? ROC-AUC of K(x,x) against the loss at w* for
the flipped digits, per SGLD setting and seed (the seed draws the data subset, the flipped
labels, the MLP's initialisation and the chains).

    python tutorials/sweeps/demo_seeds.py --configs 1e-4,1000 3e-4,200 --seeds 0 1 2 3 4

Each config is ``lr,localization`` (nβ and the sizes are the demo's defaults). One thread;
about 10 s per run on a 2-core VM.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile

import torch

from devinterp_losskernel.demo import DemoConfig, run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["1e-4,1000", "3e-4,300", "3e-4,200", "3e-4,100"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default=None, help="append one JSON line per run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'lr':>7} {'gamma':>6} {'seed':>4} {'AUC K(x,x)':>10} {'AUC loss':>8} {'loss draws':>10} {'LLC':>6}")
    for spec in args.configs:
        lr, gamma = (float(v) for v in spec.split(","))
        wins = 0
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as out, contextlib.redirect_stderr(io.StringIO()):
                s = run_demo(out, DemoConfig(lr=lr, localization=gamma, seed=seed), verbose=False)
            auc, auc_loss = s["memorization_auc/variance"], s["memorization_auc/loss_at_w_star"]
            wins += auc > auc_loss
            print(f"{lr:7.0e} {gamma:6.0f} {seed:4d} {auc:10.3f} {auc_loss:8.3f} "
                  f"{s['mean probe loss/over draws']:10.3f} {s['llc/mean (devinterp, minibatch)']:6.1f}", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({k: v for k, v in s.items() if k != "config"} | {"lr": lr, "localization": gamma,
                                                                                    "seed": seed}) + "\n")
        print(f"{lr:7.0e} {gamma:6.0f}  K(x,x) beats the loss at w* on {wins} of {len(args.seeds)} seeds", flush=True)


if __name__ == "__main__":
    main()
