"""Run a small estimate_loss_kernel, optionally killing this process mid-way (SIGKILL).

Usage: python _resume_run.py CHECKPOINT_DIR KILL_AT_PROBE_PASS OUT_FILE
"""

import os
import signal
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from devinterp_losskernel import classification_loss, estimate_loss_kernel  # noqa: E402

from _models import MLP, classification_data, loader_for  # noqa: E402

SETTINGS = dict(num_chains=3, num_draws=6, num_burnin_steps=2, lr=1e-3, nbeta=30.0,
                localization=100.0, seed=11, verbose=False,
                callback_kwargs=dict(snapshot_every=4, snapshot_rows=10))


def problem():
    torch.manual_seed(0)
    x, y = classification_data(64)
    return MLP(dropout=0.1), loader_for(x, y), (x[:20], y[:20])


def run(checkpoint_dir=None, kill_at=None):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if kill_at is not None and calls["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return classification_loss(model, batch)

    model, loader, probe = problem()
    def evaluate(model, batch):  # the SGLD minibatch loss, apart from the counted probe passes
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    return estimate_loss_kernel(model, loader, probe, loss_fn=loss_fn, evaluate=evaluate,
                                checkpoint_dir=checkpoint_dir, **SETTINGS)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    kernel = run(sys.argv[1], int(sys.argv[2]))
    kernel.save(sys.argv[3])
