"""Small models and data shared by the callback tests."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from devinterp_losskernel.probe import ProbeSet, evaluate_probe_losses


def classification_data(n=64, dim=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


class MLP(nn.Module):
    def __init__(self, dim=6, hidden=16, classes=3, dropout=0.0, batchnorm=False):
        super().__init__()
        layers = [nn.Linear(dim, hidden)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class TinyLM(nn.Module):
    def __init__(self, vocab=13, width=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab)

    def forward(self, input_ids):
        return self.out(torch.tanh(self.mix(self.embed(input_ids))))


class LMDataset(torch.utils.data.Dataset):
    """Dict items, as devinterp 2.x's sampler requires."""

    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


def loader_for(x, y, batch_size=16, shuffle=True):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


class ProbeRecorder:
    """An independent witness: records every draw's probe losses, to recompute the kernel."""

    def __init__(self, probe, loss_fn=None):
        self.probe = ProbeSet(probe, cache_on_device=False)
        self.loss_fn = loss_fn
        self.rows = []
        self.chains = []

    def __call__(self, *, model, chain, **_):
        self.rows.append(evaluate_probe_losses(model, self.probe, self.loss_fn).double())
        self.chains.append(int(chain))

    def traces(self):
        return torch.stack(self.rows).numpy()


# devinterp 1.x cloudpickles `evaluate` for every chain, so a counter in a closure would be
# copied; module-level state is shared (cloudpickle refers to importable functions by name).
DIVERGE = {"calls": 0, "from_call": None}


def diverging_evaluate(model, batch):
    """Cross-entropy that turns NaN from call DIVERGE['from_call'] on."""
    DIVERGE["calls"] += 1
    loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
    if DIVERGE["from_call"] is not None and DIVERGE["calls"] >= DIVERGE["from_call"]:
        return loss * float("nan")
    return loss
