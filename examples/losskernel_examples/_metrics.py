"""Small measurements the tutorials share."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 4096) -> float:
    """Top-1 accuracy of ``model`` on ``inputs`` [N, …] against integer ``targets`` [N], in
    batches on the model's device (eval mode; the model's mode is restored)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(inputs), batch_size):
        logits = model(inputs[start:start + batch_size].to(device))
        correct += int((logits.argmax(-1).cpu() == targets[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(inputs))
