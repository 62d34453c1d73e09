"""Multitask modular arithmetic (paper, Section 3 and Appendix C).

A two-layer transformer in the style of Power et al. (2022) learns two tasks modulo a prime
p at once:

- addition ``a + b mod p``,
- division ``a · b⁻¹ mod p`` (b ≠ 0),

each with its own vocabulary: the sequence is ``a, b, result`` and the model reads ``a, b``
and predicts ``result`` at the last position. Addition uses tokens ``0 … p−1``, division
tokens ``p … 2p−1`` (for its operands and its results alike), so the only thing the tasks
share is the transformer's weights between embedding and unembedding. The per-sample loss
is the cross-entropy of the result token over all 2p tokens.

The division inputs with ``a = 0`` are trivial (``0 / b = 0`` for every b); the paper finds
them as a small satellite cluster of the kernel (Fig. 3A). :class:`ModularData` flags them.

Everything needed for the tutorial lives here: the data (:func:`modular_dataset`), the
model (:class:`ModularTransformer`), training (:func:`train_modular`), the shipped
checkpoint (:func:`load_checkpoint`), the probe (:func:`modular_probe`) and the whole
kernel run as a script (:func:`run_modular_kernel`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._metrics import accuracy
from ._scale import SamplingScale

__all__ = [
    "ADD",
    "DIV",
    "TASK_NAMES",
    "CHECKPOINT_PATH",
    "ModelConfig",
    "TrainConfig",
    "ModularData",
    "ModularTransformer",
    "KernelScale",
    "SCALES",
    "modular_inverse",
    "modular_dataset",
    "modular_probe",
    "train_modular",
    "accuracy",
    "save_checkpoint",
    "load_checkpoint",
    "train_and_save",
    "training_loader",
    "pool_kernels",
    "split_half_agreement",
    "ModularKernelResult",
    "run_modular_kernel",
]

ADD, DIV = 0, 1
TASK_NAMES = ("addition", "division")
CHECKPOINT_PATH = Path(__file__).resolve().parent / "data" / "modular_p97.pt"


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def modular_inverse(b: int, p: int) -> int:
    """b⁻¹ mod p for a prime p and b ≢ 0 (Fermat: b^(p−2))."""
    if b % p == 0:
        raise ValueError(f"b must be non-zero mod p={p} to have an inverse, got b={b}")
    return pow(int(b), p - 2, p)


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % k for k in range(2, int(math.isqrt(p)) + 1))


@dataclass
class ModularData:
    """Every input of both tasks, with its split.

    Attributes (all tensors of length N = p² + p(p−1), addition first):
        inputs: [N, 2] token ids ``(a, b)``, offset by ``p`` for division.
        targets: [N] the result token (offset by ``p`` for division).
        task: [N] ``ADD`` (0) or ``DIV`` (1).
        a, b, result: [N] the plain integers in ``0 … p−1``.
        is_train: [N] bool, the training split (the same fraction of each task).
        p: the prime.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    task: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    result: torch.Tensor
    is_train: torch.Tensor
    p: int

    @property
    def a_zero_division(self) -> torch.Tensor:
        """[N] bool: the trivial division inputs 0 / b (= 0 for every b)."""
        return (self.task == DIV) & (self.a == 0)

    @property
    def vocab_size(self) -> int:
        return 2 * self.p

    def __len__(self) -> int:
        return int(self.task.shape[0])

    def train(self):
        """``(inputs, targets)`` of the training split."""
        return self.inputs[self.is_train], self.targets[self.is_train]

    def test(self):
        """``(inputs, targets)`` of the held-out split."""
        return self.inputs[~self.is_train], self.targets[~self.is_train]


def modular_dataset(p: int = 97, train_fraction: float = 0.5, seed: int = 0) -> ModularData:
    """All ``a + b`` (a, b in 0…p−1) and ``a / b`` (b ≠ 0) inputs mod p, split at random.

    Each task's inputs are split separately, so both have ``train_fraction`` of their
    inputs in the training set. Deterministic given ``seed``.
    """
    if not _is_prime(p):
        raise ValueError(f"p must be a prime (division needs inverses), got {p}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    grid = torch.arange(p)
    a_add, b_add = torch.meshgrid(grid, grid, indexing="ij")
    a_add, b_add = a_add.reshape(-1), b_add.reshape(-1)
    a_div, b_div = torch.meshgrid(grid, grid[1:], indexing="ij")
    a_div, b_div = a_div.reshape(-1), b_div.reshape(-1)
    inverse = torch.tensor([0] + [modular_inverse(int(b), p) for b in grid[1:]])
    r_add = (a_add + b_add) % p
    r_div = (a_div * inverse[b_div]) % p

    a = torch.cat([a_add, a_div])
    b = torch.cat([b_add, b_div])
    result = torch.cat([r_add, r_div])
    task = torch.cat([torch.full_like(a_add, ADD), torch.full_like(a_div, DIV)])
    offset = task * p
    inputs = torch.stack([a + offset, b + offset], dim=1)
    targets = result + offset

    generator = torch.Generator().manual_seed(seed)
    is_train = torch.zeros(len(task), dtype=torch.bool)
    for t in (ADD, DIV):
        members = torch.nonzero(task == t).squeeze(1)
        chosen = members[torch.randperm(len(members), generator=generator)[: round(train_fraction * len(members))]]
        is_train[chosen] = True
    return ModularData(inputs=inputs, targets=targets, task=task, a=a, b=b, result=result,
                       is_train=is_train, p=p)


def modular_probe(data: ModularData, num_probe: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``num_probe`` inputs drawn at random from all inputs (train and test),
    half from each task, sorted by task and then by index (addition first)."""
    if num_probe < 2 or num_probe % 2:
        raise ValueError(f"num_probe must be an even number ≥ 2 (half per task), got {num_probe}")
    generator = torch.Generator().manual_seed(seed + 1)
    picked = []
    for t in (ADD, DIV):
        members = torch.nonzero(data.task == t).squeeze(1)
        if num_probe // 2 > len(members):
            raise ValueError(f"num_probe/2 = {num_probe // 2} exceeds the {len(members)} inputs "
                             f"of task {TASK_NAMES[t]}")
        picked.append(members[torch.randperm(len(members), generator=generator)[: num_probe // 2]].sort().values)
    return torch.cat(picked)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """The transformer: Power et al. (2022) width (d_model 128, 4 heads, 2 layers), MLP 4×."""

    p: int = 97
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    n_layers: int = 2
    n_ctx: int = 2
    layer_norm: bool = True


class _Block(nn.Module):
    """Pre-LayerNorm decoder block with causal self-attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        norm = (lambda: nn.LayerNorm(cfg.d_model)) if cfg.layer_norm else nn.Identity
        self.ln1 = norm()
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = norm()
        self.mlp_in = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.mlp_out = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        batch, ctx, d = x.shape
        heads = lambda t: t.view(batch, -1, self.n_heads, d // self.n_heads).transpose(1, 2)  # noqa: E731
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        if last_only:
            # Only the last position feeds the prediction: its query attends to every key,
            # so no mask is needed and the other positions' outputs are not computed.
            attended = F.scaled_dot_product_attention(heads(q[:, -1:]), heads(k), heads(v))
            x = x[:, -1:]
        else:
            attended = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, x.shape[1], d))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.ln2(x))))


class ModularTransformer(nn.Module):
    """Two-layer decoder-only transformer over the 2p-token vocabulary.

    ``model(inputs)`` with ``inputs`` [B, 2] (tokens ``a, b``) returns the logits [B, 2p] of
    the result token, read at the last position.
    """

    def __init__(self, cfg: Optional[ModelConfig] = None):
        super().__init__()
        cfg = cfg or ModelConfig()
        self.cfg = cfg
        vocab = 2 * cfg.p
        self.embed = nn.Embedding(vocab, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.n_ctx, cfg.d_model))
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model) if cfg.layer_norm else nn.Identity()
        self.unembed = nn.Linear(cfg.d_model, vocab, bias=False)
        nn.init.normal_(self.embed.weight, std=cfg.d_model ** -0.5)
        nn.init.normal_(self.pos, std=cfg.d_model ** -0.5)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.embed(inputs) + self.pos[: inputs.shape[1]]
        for i, block in enumerate(self.blocks):
            x = block(x, last_only=i == len(self.blocks) - 1)
        return self.unembed(self.ln_f(x[:, -1]))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """AdamW with strong weight decay (grokking), minibatches of the training split."""

    train_fraction: float = 0.5
    lr: float = 1e-3
    weight_decay: float = 1.0
    betas: tuple = (0.9, 0.98)
    batch_size: int = 512
    warmup_steps: int = 10
    max_steps: int = 30_000
    eval_every: int = 250
    stop_test_accuracy: float = 0.995  # stop once train is 100% and test at least this
    extra_steps: int = 1_000  # keep training after the stop criterion, to settle the loss
    seed: int = 0


def train_modular(
    model_cfg: Optional[ModelConfig] = None,
    train_cfg: Optional[TrainConfig] = None,
    *,
    device: Union[str, torch.device] = "cpu",
    verbose: bool = True,
) -> tuple:
    """Train the transformer on both tasks until it fits the training split (100%) and
    generalizes (test accuracy ≥ ``stop_test_accuracy``), then ``extra_steps`` more.

    Returns ``(model, data, history)``; ``history`` is a list of dicts (step, loss,
    train/test accuracy per task, seconds).
    """
    model_cfg = model_cfg or ModelConfig()
    train_cfg = train_cfg or TrainConfig()
    data = modular_dataset(model_cfg.p, train_cfg.train_fraction, seed=train_cfg.seed)
    torch.manual_seed(train_cfg.seed)
    model = ModularTransformer(model_cfg).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train_cfg.lr, betas=train_cfg.betas,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / train_cfg.warmup_steps))
    x_train, y_train = (t.to(device) for t in data.train())
    generator = torch.Generator().manual_seed(train_cfg.seed)
    history: List[Dict[str, Any]] = []
    started = time.perf_counter()
    stop_at = None
    for step in range(1, train_cfg.max_steps + 1):
        batch = torch.randint(len(x_train), (train_cfg.batch_size,), generator=generator).to(device)
        loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % train_cfg.eval_every == 0 or step == train_cfg.max_steps:
            record = {"step": step, "loss": float(loss.detach()), "seconds": time.perf_counter() - started}
            record.update(_split_accuracies(model, data))
            history.append(record)
            if verbose:
                print(f"step {step:6d}  loss {record['loss']:.3g}  "
                      + "  ".join(f"{k} {v:.3f}" for k, v in record.items() if "acc" in k)
                      + f"  {record['seconds']:.0f}s", flush=True)
            fitted = min(record["train_acc/addition"], record["train_acc/division"]) == 1.0
            general = min(record["test_acc/addition"], record["test_acc/division"]) >= train_cfg.stop_test_accuracy
            if stop_at is None and fitted and general:
                stop_at = step + train_cfg.extra_steps
            if stop_at is not None and step >= stop_at:
                break
    model.eval()
    return model, data, history


def _split_accuracies(model: nn.Module, data: ModularData) -> Dict[str, float]:
    out = {}
    for split, mask in (("train", data.is_train), ("test", ~data.is_train)):
        for t, name in enumerate(TASK_NAMES):
            sel = mask & (data.task == t)
            out[f"{split}_acc/{name}"] = accuracy(model, data.inputs[sel], data.targets[sel])
    return out


# ---------------------------------------------------------------------------------------------
# The shipped checkpoint
# ---------------------------------------------------------------------------------------------
# The tag written into every checkpoint (the shipped one too): the module's name when the format
# was fixed (it lived in the library as devinterp_losskernel.tasks); a file tag, not an import path.
CHECKPOINT_FORMAT = "devinterp_losskernel.tasks.modular"


def save_checkpoint(model: ModularTransformer, path: Union[str, Path], *, train_cfg: TrainConfig,
                    history: Optional[List[Dict[str, Any]]] = None) -> Path:
    """Write the float32 weights with the model and training configuration (enough to
    rebuild the model and the exact train/test split)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = asdict(train_cfg)
    cfg["betas"] = list(cfg["betas"])
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": asdict(model.cfg),
        "train_config": cfg,
        "history": history or [],
        "state_dict": {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()},
    }
    torch.save(payload, path)
    return path


def load_checkpoint(path: Union[str, Path, None] = None, device: Union[str, torch.device] = "cpu"):
    """The trained transformer and its data: ``(model, data, info)``.

    Args:
        path: a file written by :func:`save_checkpoint`; default the shipped checkpoint
            (p = 97, trained by ``python -m losskernel_examples.modular train``).
        device: where to put the model.

    Returns:
        ``model`` in eval mode, ``data`` (:class:`ModularData` with the split it was trained
        on) and ``info`` (``model_config``, ``train_config``, training ``history``).
    """
    path = Path(path) if path is not None else CHECKPOINT_PATH
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; train one with train_modular() and save_checkpoint()")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"path {str(path)!r} is not a checkpoint written by save_checkpoint()")
    model_cfg = ModelConfig(**payload["model_config"])
    train_cfg = dict(payload["train_config"])
    train_cfg["betas"] = tuple(train_cfg["betas"])
    model = ModularTransformer(model_cfg)
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()
    data = modular_dataset(model_cfg.p, train_cfg["train_fraction"], seed=train_cfg["seed"])
    info = {"model_config": model_cfg, "train_config": TrainConfig(**train_cfg), "history": payload["history"]}
    return model, data, info


def train_and_save(path: Union[str, Path, None] = None, *, threads: int = 1, verbose: bool = True) -> Path:
    """Train with the default configuration on the CPU and write the checkpoint (this is how
    the shipped one was made: ``python -m losskernel_examples.modular train``)."""
    torch.set_num_threads(threads)
    train_cfg = TrainConfig()
    model, data, history = train_modular(ModelConfig(), train_cfg, verbose=verbose)
    return save_checkpoint(model, path or CHECKPOINT_PATH, train_cfg=train_cfg, history=history)


# ---------------------------------------------------------------------------------------------
# The loss kernel of the trained model
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class KernelScale(SamplingScale):
    """Probe size and SGLD settings of one run (the paper's symbols: m, C, T, b, ε, nβ, γ).

    ``num_steps_bw_draws`` thins each chain (one draw every so many SGLD steps).
    """

    note: str = ""


# Table 1 (Section 3): m=512, C=30, T=800, b=200, ε=2e-7, nβ=500, γ=30,000 for p=97.
# Scaled to this model: weight decay 1.0 under LayerNorm leaves its weight matrices small
# (RMS ≈ 0.01, against ≈ 0.05 for a freshly initialised 128-wide layer), and Table 1's γ
# spreads every weight by 1/√γ ≈ 0.006, about its own size: the probe loss jumps from 1e-4
# to ~1 and R̂ is noise. γ is scaled by the square of the weight-scale ratio, (0.05/0.009)²
# ≈ 30, to 10⁶ (spread 0.001, ≈ 10% of a weight, as 0.006 is of 0.05). ε is raised so that
# εγ/2 = 0.3: SGLD relaxes in a few steps, and draws 3 steps apart are nearly independent
# (lag-1 autocorrelation of the probe losses ≈ 0.2) instead of hundreds of steps apart.
# nβ stays 500. The minibatch size made no measurable difference (m=128 and 512 gave the
# same separation and mean correlations), and 128 is 4× cheaper on a CPU.
_SGLD = dict(lr=6e-7, nbeta=500.0, localization=1_000_000.0)

SCALES: Dict[str, KernelScale] = {
    "ci": KernelScale(num_probe=1000, num_chains=4, num_draws=200, num_burnin_steps=100,
                      num_steps_bw_draws=3, batch_size=128, **_SGLD,
                      note="test suite: about a minute on 2 CPU cores"),
    "cpu": KernelScale(num_probe=3000, num_chains=8, num_draws=250, num_burnin_steps=100,
                       num_steps_bw_draws=3, batch_size=128, **_SGLD,
                       note="the tutorial's default: minutes on a laptop CPU"),
    "paper": KernelScale(num_probe=10_000, num_chains=30, num_draws=800, num_burnin_steps=200,
                         num_steps_bw_draws=3, batch_size=512, **_SGLD,
                         note="the paper's sizes (n=10,000, C×T = 24,000 draws, m=512, b=200); GPU, or "
                              "2 CPU processes with --half 0 / --half 1 (1 h 40 min on a 2-core VM)"),
}


def _identity(batch):
    return batch


class _TensorBatches(torch.utils.data.TensorDataset):
    """A TensorDataset that a DataLoader reads one whole batch at a time (one index per
    tensor instead of a Python loop over samples and a collate)."""

    def __getitems__(self, indices):
        index = torch.as_tensor(indices)
        return tuple(t[index] for t in self.tensors)


def training_loader(data: ModularData, batch_size: int) -> torch.utils.data.DataLoader:
    """Shuffled minibatches ``(inputs, targets)`` of the training split, for SGLD."""
    x, y = data.train()
    return torch.utils.data.DataLoader(_TensorBatches(x, y), batch_size=batch_size, shuffle=True,
                                       collate_fn=_identity)


def pool_kernels(first, second):
    """The kernel of the draws of two runs on the same probe, as if from one run (pooled
    mean and co-moment, Chan et al.): K = [(N₁−1)K₁ + (N₂−1)K₂ + N₁N₂/N · δδᵀ] / (N−1)."""
    from devinterp_losskernel.kernel import LossKernel

    n1, n2 = first.num_draws, second.num_draws
    total = n1 + n2
    delta = (second.mean - first.mean).to(first.covariance.dtype)
    comoment = (n1 - 1) * first.covariance + (n2 - 1) * second.covariance
    comoment.addr_(delta, delta, alpha=n1 * n2 / total)
    covariance = comoment.div_(total - 1)
    offset = len(first.draws_per_chain)
    metadata = dict(first.metadata)
    per_chain = list(first.metadata.get("llc/per_chain", [])) + list(second.metadata.get("llc/per_chain", []))
    finite = np.array([v for v in per_chain if v is not None], dtype=float)
    metadata.update({"llc/per_chain": per_chain,
                     "llc/mean": float(finite.mean()) if finite.size else None,
                     "llc/std": float(finite.std(ddof=1)) if finite.size > 1 else None,
                     "pooled_from": [first.metadata.get("settings"), second.metadata.get("settings")]})
    for key in ("probe_llc", "singular_fluctuation", "empirical_variance"):
        metadata.pop(key, None)  # of one half; recomputed below where possible
    kernel = LossKernel(
        covariance=covariance, mean=(n1 * first.mean + n2 * second.mean) / total,
        variance=covariance.diagonal().clone(), num_draws=total, init_loss=first.init_loss,
        draws_per_chain={**first.draws_per_chain, **{offset + c: v for c, v in second.draws_per_chain.items()}},
        rejected_per_chain={**first.rejected_per_chain,
                            **{offset + c: v for c, v in second.rejected_per_chain.items()}},
        sample_ids=first.sample_ids, labels=first.labels, metadata=metadata,
    )
    return kernel


def split_half_agreement(first, second, block_rows: int = 1024) -> float:
    """Pearson correlation, over all pairs i < j, of R̂ from two independent halves of the
    draws. Near 0 when R̂ is sampling noise, near 1 when both halves agree."""
    r1, r2 = first.correlation, second.correlation
    n = r1.shape[0]
    sums = torch.zeros(5, dtype=torch.float64)
    for start in range(0, n, block_rows):
        rows = torch.arange(start, min(n, start + block_rows))
        keep = torch.arange(n)[None, :] > rows[:, None]
        x = r1[rows].double()[keep]
        y = r2[rows].double()[keep]
        sums += torch.stack([x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()]).cpu()
    count = n * (n - 1) / 2
    sx, sy, sxx, syy, sxy = (s / count for s in sums.tolist())
    return float((sxy - sx * sy) / math.sqrt(max((sxx - sx * sx) * (syy - sy * sy), 1e-300)))


@dataclass
class ModularKernelResult:
    """What :func:`run_modular_kernel` computed.

    Attributes:
        kernel: the :class:`~devinterp_losskernel.LossKernel` over the probe (all draws).
        data: every input, with the split the model was trained on.
        probe_index: [n] indices into ``data`` of the probe inputs (addition first).
        task: [n] 0 (addition) / 1 (division) per probe input.
        a_zero_division: [n] bool, the trivial division inputs 0 / b.
        pc1: the :func:`~devinterp_losskernel.analysis.pc1_separation` result (``.auc``).
        split_half: agreement of R̂ between the two halves of the chains (None if not run).
        numbers: the key numbers as a flat dict (JSON-ready).
    """

    kernel: Any
    data: ModularData
    probe_index: np.ndarray
    task: np.ndarray
    a_zero_division: np.ndarray
    pc1: Any
    split_half: Optional[float]
    numbers: Dict[str, Any] = field(default_factory=dict)

    @property
    def auc(self) -> float:
        return self.pc1.auc


def _mean_offdiagonal(matrix: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> float:
    block = matrix[np.ix_(rows, cols)] if isinstance(matrix, np.ndarray) else matrix[rows][:, cols]
    block = torch.as_tensor(block, dtype=torch.float64)
    if rows is cols or (len(rows) == len(cols) and np.array_equal(rows, cols)):
        k = len(rows)
        return float((block.sum() - block.diagonal().sum()) / max(1, k * (k - 1)))
    return float(block.mean())


def run_modular_kernel(
    scale: Union[str, KernelScale] = "cpu",
    *,
    checkpoint: Union[str, Path, None] = None,
    device: Union[str, torch.device, None] = None,
    seed: int = 0,
    split_half: bool = True,
    dtype: torch.dtype = torch.float64,
    verbose: bool = True,
    checkpoint_dir: Union[str, Path, None] = None,
    only_half: Optional[int] = None,
) -> Optional[ModularKernelResult]:
    """The tutorial as a script: load the trained model, sample the loss kernel over a probe
    split evenly between the tasks, and measure how well it separates them.

    Args:
        scale: ``"ci"``, ``"cpu"`` (default) or ``"paper"`` (see :data:`SCALES`), or a
            :class:`KernelScale`.
        checkpoint: model file; default the shipped one.
        device: default ``"cuda"`` when available, else the CPU.
        seed: seeds the probe choice and the chains.
        split_half: run the chains as two halves (seeds ``seed`` and ``seed + 1``) and report
            the agreement of their R̂; the kernel returned pools both halves.
        dtype: accumulator dtype (float32 halves the memory of a 10,000-sample kernel).
        checkpoint_dir: resume a killed run (one sub-folder per half).
        only_half: sample just this half (0 or 1) into ``checkpoint_dir`` and return None.
            Two processes with ``only_half=0`` and ``only_half=1`` and the same
            ``checkpoint_dir`` use two cores (or two GPUs); a last call without it then finds
            both halves finished and only pools and measures them (same result as one call).

    Returns:
        A :class:`ModularKernelResult`; ``result.numbers`` holds accuracy, PC1 AUC,
        split-half agreement, mean R̂ within/across tasks and among the 0 / b inputs, LLC
        and wall times.
    """
    from devinterp_losskernel.analysis import pc1_separation, probe_llc, singular_fluctuation
    from devinterp_losskernel.estimate import estimate_loss_kernel

    cfg = SCALES[scale] if isinstance(scale, str) else scale
    if not isinstance(cfg, KernelScale):
        raise ValueError(f"scale must be one of {sorted(SCALES)} or a KernelScale, got {scale!r}")
    if split_half and cfg.num_chains < 2:
        raise ValueError("split_half needs num_chains ≥ 2 (one half per seed)")
    if only_half is not None and (only_half not in (0, 1) or not split_half or checkpoint_dir is None):
        raise ValueError(f"only_half must be 0 or 1, with split_half=True and a checkpoint_dir "
                         f"to leave the half in; got only_half={only_half!r}, split_half={split_half}, "
                         f"checkpoint_dir={checkpoint_dir!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.perf_counter()
    model, data, _ = load_checkpoint(checkpoint, device=device)
    index = modular_probe(data, cfg.num_probe, seed=seed)
    probe = (data.inputs[index], data.targets[index])
    task = data.task[index].numpy()
    a_zero = data.a_zero_division[index].numpy()
    loader = training_loader(data, cfg.batch_size)
    common = dict(loss_fn=None, device=device, probe_batch_size=4096, sample_ids=index.tolist(),
                  labels=data.task[index], dtype=dtype, verbose=verbose,
                  probe_train_mask=data.is_train[index])
    halves = [cfg.num_chains // 2, cfg.num_chains - cfg.num_chains // 2] if split_half else [cfg.num_chains]
    kernels = []
    for half, chains in enumerate(halves):
        if only_half is not None and half != only_half:
            continue
        sub_dir = None if checkpoint_dir is None else Path(checkpoint_dir) / f"half{half}"
        kernels.append(estimate_loss_kernel(model, loader, probe, seed=seed + half, checkpoint_dir=sub_dir,
                                            **common, **cfg.sampler_kwargs(num_chains=chains)))
    if only_half is not None:
        return None
    sampled = time.perf_counter()
    agreement = split_half_agreement(*kernels) if split_half else None
    kernel = pool_kernels(*kernels) if split_half else kernels[0]
    del kernels
    if split_half:  # the SLT numbers of the pooled draws (estimate_loss_kernel's, per half, were dropped)
        kernel.metadata["probe_llc"] = probe_llc(kernel, nbeta=cfg.nbeta)
        fluctuation = singular_fluctuation(kernel, nbeta=cfg.nbeta, num_train=int(data.is_train.sum()),
                                           train_mask=data.is_train[index].numpy())
        kernel.metadata["singular_fluctuation"] = fluctuation.nu
        kernel.metadata["empirical_variance"] = fluctuation.V
    pc1 = pc1_separation(kernel, task)
    R = kernel.correlation
    add, div, zero = np.flatnonzero(task == ADD), np.flatnonzero(task == DIV), np.flatnonzero(a_zero)
    accuracies = _split_accuracies(model, data)
    numbers = {
        "scale": asdict(cfg),
        "device": str(device),
        "num_probe": int(kernel.num_samples),
        "num_draws": int(kernel.num_draws),
        "train_accuracy": min(accuracies["train_acc/addition"], accuracies["train_acc/division"]),
        "test_accuracy": min(accuracies["test_acc/addition"], accuracies["test_acc/division"]),
        "pc1_auc": float(pc1.auc),
        "split_half_agreement": agreement,
        "mean_R/within_addition": _mean_offdiagonal(R, add, add),
        "mean_R/within_division": _mean_offdiagonal(R, div, div),
        "mean_R/cross_task": _mean_offdiagonal(R, add, div),
        "mean_R/a_zero_division": _mean_offdiagonal(R, zero, zero) if len(zero) > 1 else None,
        "num_a_zero_division": int(len(zero)),
        "probe_loss/at_w_star": float(kernel.init_loss.mean()),
        "probe_loss/mean_over_draws": float(kernel.mean.mean()),
        "llc/mean": kernel.metadata.get("llc/mean"),
        "probe_llc": kernel.metadata.get("probe_llc"),
        "seconds/sampling": sampled - started,
        "seconds/total": time.perf_counter() - started,
    }
    return ModularKernelResult(kernel=kernel, data=data, probe_index=index.numpy(), task=task,
                               a_zero_division=a_zero, pc1=pc1, split_half=agreement, numbers=numbers)


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m losskernel_examples.modular {train,kernel} …``"""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m losskernel_examples.modular")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the p=97 transformer and write the checkpoint")
    train.add_argument("--out", default=str(CHECKPOINT_PATH))
    train.add_argument("--threads", type=int, default=1)
    kernel = sub.add_parser("kernel", help="sample the loss kernel and print the key numbers")
    kernel.add_argument("--scale", default="cpu", choices=sorted(SCALES))
    kernel.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    kernel.add_argument("--device", default=None)
    kernel.add_argument("--seed", type=int, default=0)
    kernel.add_argument("--float32", action="store_true", help="float32 accumulator (half the memory)")
    kernel.add_argument("--out", default=None, help="folder for kernel.pt and numbers.json")
    kernel.add_argument("--resume-dir", default=None)
    kernel.add_argument("--half", type=int, default=None, choices=(0, 1),
                        help="sample only this half of the chains into --resume-dir and exit; run "
                             "--half 0 and --half 1 in two processes, then the same command "
                             "without --half to pool them")
    args = parser.parse_args(argv)
    if args.command == "train":
        print(train_and_save(args.out, threads=args.threads))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_modular_kernel(args.scale, device=args.device, seed=args.seed,
                                dtype=torch.float32 if args.float32 else torch.float64,
                                checkpoint_dir=args.resume_dir, only_half=args.half)
    if result is None:
        print(f"half {args.half} sampled into {args.resume_dir}")
        return
    print(json.dumps(result.numbers, indent=2))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result.kernel.save(out / "kernel.pt")
        (out / "numbers.json").write_text(json.dumps(result.numbers, indent=2))


if __name__ == "__main__":
    main()
