"""Token-level loss kernel of a tiny LM on a synthetic language with known structure (tutorial 05).

The language ("pairs, then copy"): a sequence is ::

    BOS  f1 g(f1)  f2 g(f2)  …  fk g(fk)  SEP  f1 f2 … fk

with f_i drawn uniformly from ``num_fillers`` symbols and g a fixed permutation of the same symbols;
a share ``noise`` (10%) of the g(f_i) and of the copies is replaced by a random symbol, so that
rule and copy tokens have the same best loss. Every predicted token belongs to one of four
known groups, each computed differently by a model that has learned the language:

* ``random`` — the f_i of the first half: unpredictable (the best loss is log num_fillers);
* ``rule`` — the g(f_i): a bigram, read off the previous token alone (best loss ≈ 0.46 nats);
* ``sep`` — SEP: fixed by the position;
* ``copy`` — the f_i of the second half: predictable only by attending back to where f_i was
  first seen (an attention head doing a positional look-up; the same best loss as rule tokens).

Random, rule and copy tokens are drawn from the same symbols, so token identity does not
separate the groups either.

A one-layer transformer (written here with its own initialisation from a private generator,
so nothing touches the global random generators) learns it on CPU in seconds. Then
``devinterp_losskernel.bif(…, correlation_method="token", return_kernel=True)`` runs SGLD from
the trained weights and returns the (n·T) × (n·T) token-level kernel of a probe set; its rows
are (sequence, position) pairs (``kernel.token_positions``). :func:`separation_numbers` measures
how well the token-level correlation R separates the four groups (ROC-AUC of same-group vs
different-group pairs, k-nearest-neighbour purity against the chance level of shuffled labels,
silhouette on 1 − R), over all four groups and over rule vs copy tokens alone, and compares
with the sequence-level kernel of the same draws (each token read through its sequence's row: it
cannot tell the tokens of one sequence apart) and with the per-token loss at w* (which tells
unpredictable from predictable tokens but not *how* they are predicted).

Run it: ``python -m losskernel_examples.token_kernel --scale ci``.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GROUPS", "Language", "TokenKernelScale", "SCALES", "TokenKernelResult", "TinyTransformer", "TokenDataset",
    "make_sequences", "target_groups", "train_lm", "per_token_loss", "loss_by_group", "token_level_kernel",
    "sequence_correlation",
    "separation_numbers", "classical_mds", "tsne_embedding", "run_token_kernel", "plot_token_kernel",
]

GROUPS = ("random", "rule", "sep", "copy")


@dataclass(frozen=True)
class Language:
    """The synthetic language: ``num_pairs`` (f, g(f)) pairs, SEP, then the f's again."""

    num_pairs: int = 6
    num_fillers: int = 8
    noise: float = 0.1  # share of rule and copy tokens replaced by a random symbol of their kind
    seed: int = 1234  # the bijection g

    @property
    def vocab(self) -> int:
        return self.num_fillers + 2  # the symbols, SEP, BOS

    @property
    def sep(self) -> int:
        return self.num_fillers

    @property
    def bos(self) -> int:
        return self.num_fillers + 1

    @property
    def length(self) -> int:
        return 1 + 2 * self.num_pairs + 1 + self.num_pairs

    @property
    def rule(self) -> torch.Tensor:
        """g: symbol f -> perm[f], a permutation of the same symbols (no fixed point)."""
        g = torch.Generator().manual_seed(self.seed)
        while True:
            perm = torch.randperm(self.num_fillers, generator=g)
            if not bool((perm == torch.arange(self.num_fillers)).any()):
                return perm


def make_sequences(count: int, language: Language = Language(), *, seed: int = 0) -> torch.Tensor:
    """``count`` sequences [count, length] of the language, from a private generator."""
    g = torch.Generator().manual_seed(seed)
    k = language.num_pairs
    fillers = torch.randint(0, language.num_fillers, (count, k), generator=g)
    ids = torch.empty(count, language.length, dtype=torch.long)
    ids[:, 0] = language.bos
    ids[:, 1:2 * k + 1:2] = fillers
    ids[:, 2:2 * k + 2:2] = language.rule[fillers]
    ids[:, 2 * k + 1] = language.sep
    ids[:, 2 * k + 2:] = fillers
    if language.noise > 0:  # the same noise floor for rule and copy tokens: equal best losses
        rule, copy = ids[:, 2:2 * k + 2:2], ids[:, 2 * k + 2:]
        flip = torch.rand(count, 2, k, generator=g) < language.noise
        other = torch.randint(0, language.num_fillers, (count, 2, k), generator=g)
        ids[:, 2:2 * k + 2:2] = torch.where(flip[:, 0], other[:, 0], rule)
        ids[:, 2 * k + 2:] = torch.where(flip[:, 1], other[:, 1], copy)
    return ids


def target_groups(language: Language = Language()) -> np.ndarray:
    """The group (index into :data:`GROUPS`) of each target position 1 … T (T = length − 1)."""
    k = language.num_pairs
    groups = np.empty(language.length - 1, dtype=np.int64)
    groups[0:2 * k:2] = GROUPS.index("random")  # positions 1, 3, …
    groups[1:2 * k:2] = GROUPS.index("rule")    # positions 2, 4, …
    groups[2 * k] = GROUPS.index("sep")
    groups[2 * k + 1:] = GROUPS.index("copy")
    return groups


class TokenDataset(torch.utils.data.Dataset):
    """``{"input_ids": sequence}`` items, as devinterp 2's ``sample()`` / ``bif()`` expect."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


class TinyTransformer(nn.Module):
    """A pre-LayerNorm causal transformer (token + learned position embeddings, ``layers``
    blocks of multi-head attention and a ReLU MLP, no dropout), initialised from a private
    generator (N(0, 0.02) weights, zero biases): constructing it draws nothing from torch's
    global generator. ``forward(input_ids [B, L]) -> logits [B, L, vocab]``."""

    def __init__(self, vocab: int, length: int, *, width: int = 48, heads: int = 4, layers: int = 1,
                 mlp: int = 96, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.heads = heads

        def weight(*shape):
            return nn.Parameter(torch.randn(*shape, generator=g) * 0.02)

        def zeros(*shape):
            return nn.Parameter(torch.zeros(*shape))

        self.embed, self.position = weight(vocab, width), weight(length, width)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.ln1_w, block.ln1_b = nn.Parameter(torch.ones(width)), zeros(width)
            block.qkv_w, block.qkv_b = weight(3 * width, width), zeros(3 * width)
            block.out_w, block.out_b = weight(width, width), zeros(width)
            block.ln2_w, block.ln2_b = nn.Parameter(torch.ones(width)), zeros(width)
            block.up_w, block.up_b = weight(mlp, width), zeros(mlp)
            block.down_w, block.down_b = weight(width, mlp), zeros(width)
            self.blocks.append(block)
        self.lnf_w, self.lnf_b = nn.Parameter(torch.ones(width)), zeros(width)
        self.unembed_w, self.unembed_b = weight(vocab, width), zeros(vocab)
        self.register_buffer("causal", torch.ones(length, length, dtype=torch.bool).tril(), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, L = input_ids.shape
        x = self.embed[input_ids] + self.position[:L]
        width = x.shape[-1]
        for b in self.blocks:
            h = F.layer_norm(x, (width,), b.ln1_w, b.ln1_b)
            q, k, v = F.linear(h, b.qkv_w, b.qkv_b).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            scores = scores.masked_fill(~self.causal[:L, :L], float("-inf"))
            a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, width)
            x = x + F.linear(a, b.out_w, b.out_b)
            h = F.layer_norm(x, (width,), b.ln2_w, b.ln2_b)
            x = x + F.linear(F.relu(F.linear(h, b.up_w, b.up_b)), b.down_w, b.down_b)
        x = F.layer_norm(x, (width,), self.lnf_w, self.lnf_b)
        return F.linear(x, self.unembed_w, self.unembed_b)


@dataclass(frozen=True)
class TokenKernelScale:
    """Sizes of one run: training set and steps, the probe (``num_probe`` sequences, a multiple
    of ``batch_size``), and devinterp 2's SGLD settings for ``bif()``."""

    num_train: int = 2048
    train_steps: int = 300
    train_batch: int = 32
    train_lr: float = 3e-3
    num_probe: int = 32
    num_chains: int = 2
    num_draws: int = 100
    num_burnin_steps: int = 20
    batch_size: int = 32
    lr: float = 3e-5
    n_beta: float = 30.0
    localization: float = 3000.0
    width: int = 32
    heads: int = 4
    layers: int = 1


SCALES: Dict[str, TokenKernelScale] = {
    "ci": TokenKernelScale(),
    "full": TokenKernelScale(num_probe=64, num_chains=4, num_draws=300),
}


def train_lm(language: Language, scale: TokenKernelScale, *, seed: int = 0, device="cpu"):
    """Train :class:`TinyTransformer` with Adam on ``scale.num_train`` sequences (minibatches
    drawn from a private generator). Returns ``(model, train_ids)``."""
    train_ids = make_sequences(scale.num_train, language, seed=seed + 1)
    model = TinyTransformer(language.vocab, language.length, width=scale.width, heads=scale.heads,
                            layers=scale.layers, seed=seed).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=scale.train_lr)
    g = torch.Generator().manual_seed(seed + 2)
    data = train_ids.to(device)
    for _ in range(scale.train_steps):
        batch = data[torch.randint(0, len(data), (scale.train_batch,), generator=g).to(device)]
        logits = model(batch)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, language.vocab), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, train_ids


@torch.no_grad()
def per_token_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every target token, [n, T] (devinterp's per-token LM loss)."""
    device = next(model.parameters()).device
    logits = model(ids.to(device))
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:].to(device), reduction="none").cpu()


def loss_by_group(losses: torch.Tensor, language: Language = Language()) -> Dict[str, float]:
    """Mean per-token loss of each group (``losses`` [n, T])."""
    groups = target_groups(language)
    return {name: float(losses[:, groups == i].mean()) for i, name in enumerate(GROUPS)}


def token_level_kernel(model: nn.Module, train_ids: torch.Tensor, probe_ids: torch.Tensor,
                       scale: TokenKernelScale, *, seed: int = 0, device="cpu"):
    """devinterp 2's ``bif()`` through the streaming twin: ``(dataset, kernel)``, the token-level
    kernel over the probe's n·T (sequence, position) rows."""
    from devinterp_losskernel import bif

    if scale.num_probe % scale.batch_size:
        raise ValueError(f"num_probe ({scale.num_probe}) must be a multiple of batch_size ({scale.batch_size})")
    observables = {"probe": (TokenDataset(probe_ids), scale.num_probe // scale.batch_size)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bif(model, TokenDataset(train_ids), observables, lr=scale.lr, n_beta=scale.n_beta,
                   localization=scale.localization, num_chains=scale.num_chains, num_draws=scale.num_draws,
                   num_burnin_steps=scale.num_burnin_steps, batch_size=scale.batch_size, init_seed=seed,
                   correlation_method="token", return_kernel=True, device=device, bif_device="cpu")


def sequence_correlation(kernel) -> np.ndarray:
    """The sequence-level correlation of the same draws, from the token-level kernel: the
    covariance of the sequence means is the mean of each T × T covariance block (devinterp's
    ``average_tokenwise_bif=True, compute_covariance=True``), normalised to R."""
    from devinterp_losskernel.devinterp2_bif import influences_from_kernel

    cov = influences_from_kernel(kernel, compute_covariance=True, average_tokenwise_bif=True).influences.values
    cov = cov.astype(np.float64)
    sd = np.sqrt(np.diag(cov))
    return cov / np.outer(sd, sd)


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    from devinterp_losskernel.analysis import detection_auc

    return float(detection_auc(scores, positive))


def _nearest(similarity: np.ndarray, k: int) -> np.ndarray:
    """Each row's k most similar other rows [N, k] (ties to the smaller index)."""
    s = similarity.astype(np.float64, copy=True)
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def _knn_purity(nearest: np.ndarray, labels: np.ndarray) -> float:
    """Share of each row's nearest rows (:func:`_nearest`) with its label."""
    return float((labels[nearest] == labels[:, None]).mean())


def _silhouette(distance: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import silhouette_score

    d = np.clip(distance, 0.0, None)
    np.fill_diagonal(d, 0.0)
    return float(silhouette_score(d, labels, metric="precomputed"))


def separation_numbers(R: np.ndarray, labels: np.ndarray, *, k: int = 10, seed: int = 0,
                       num_shuffles: int = 20) -> Dict[str, float]:
    """How well a similarity matrix R [N, N] separates the groups ``labels`` [N]:

    * ``pair_auc``: ROC-AUC of R for same-group vs different-group pairs (i < j);
    * ``knn_purity``: share of each row's k most similar rows in its group; ``knn_chance``
      its mean under ``num_shuffles`` shuffles of the labels (private generator);
    * ``silhouette`` of the groups on the distance 1 − R.
    """
    labels = np.asarray(labels)
    upper = np.triu_indices(len(labels), 1)
    same = labels[upper[0]] == labels[upper[1]]
    rng = np.random.default_rng(seed)
    nearest = _nearest(R, k)
    chance = [_knn_purity(nearest, rng.permutation(labels)) for _ in range(num_shuffles)]
    return {"pair_auc": _auc(R[upper], same), "knn_purity": _knn_purity(nearest, labels),
            "knn_chance": float(np.mean(chance)), "silhouette": _silhouette(1.0 - R, labels)}


def classical_mds(distance: np.ndarray, dims: int = 2) -> np.ndarray:
    """Classical (Torgerson) MDS of a distance matrix: deterministic, no random initialisation
    (each axis' sign fixed so that its largest coordinate is positive)."""
    d2 = np.asarray(distance, np.float64) ** 2
    n = len(d2)
    centre = np.eye(n) - 1.0 / n
    b = -0.5 * centre @ d2 @ centre
    values, vectors = np.linalg.eigh(b)
    top = np.argsort(values)[::-1][:dims]
    coords = vectors[:, top] * np.sqrt(np.clip(values[top], 0.0, None))
    signs = np.sign(coords[np.abs(coords).argmax(axis=0), np.arange(dims)])
    return coords * np.where(signs == 0, 1.0, signs)


@dataclass
class TokenKernelResult:
    """What :func:`run_token_kernel` measured (``numbers``) and what the figure needs."""

    language: Language
    scale: TokenKernelScale
    kernel: Any                       # the token-level LossKernel (n·T rows)
    dataset: Any                      # devinterp's bif() Dataset (influences, input_ids)
    R: np.ndarray                     # token-level correlation [n·T, n·T]
    R_sequence: np.ndarray            # sequence-level correlation [n, n]
    groups: np.ndarray                # group index of each token row
    init_loss: np.ndarray             # per-token loss at w*, one per row
    numbers: Dict[str, Any] = field(default_factory=dict)


def run_token_kernel(scale: Union[str, TokenKernelScale] = "ci", *, language: Language = Language(), seed: int = 0,
                     device="cpu", k: int = 10, verbose: bool = False) -> TokenKernelResult:
    """Train the tiny LM, run ``bif(correlation_method="token", return_kernel=True)`` on the
    probe, and measure the separation of the four groups by

    * the token-level R,
    * the sequence-level R of the same draws (each token given its sequence's row), and
    * the per-token loss at w* (similarity −|ℓ_i − ℓ_j|),

    each over all groups (``numbers["all/…"]``) and over rule vs copy tokens alone
    (``numbers["rule_vs_copy/…"]``: the same symbols and best loss, computed differently).
    Timings in ``numbers["seconds/…"]``."""
    cfg = SCALES[scale] if isinstance(scale, str) else scale
    numbers: Dict[str, Any] = {}
    start = time.perf_counter()
    model, train_ids = train_lm(language, cfg, seed=seed, device=device)
    numbers["seconds/train"] = time.perf_counter() - start
    probe_ids = make_sequences(cfg.num_probe, language, seed=seed + 100)
    losses = per_token_loss(model, probe_ids)
    numbers.update({f"loss/{name}": value for name, value in loss_by_group(losses, language).items()})
    start = time.perf_counter()
    ds, kernel = token_level_kernel(model, train_ids, probe_ids, cfg, seed=seed, device=device)
    numbers["seconds/bif"] = time.perf_counter() - start
    if kernel is None:
        raise RuntimeError("bif() returned no kernel (non-finite losses): lower lr or raise localization")
    positions = kernel.token_positions.numpy()           # (sequence, target position 1…T) per row
    groups = target_groups(language)[positions[:, 1] - 1]
    R = kernel.correlation.double().numpy()
    R_seq = sequence_correlation(kernel)
    R_seq_tokens = R_seq[np.ix_(positions[:, 0], positions[:, 0])]  # a token read through its sequence
    init = losses[positions[:, 0], positions[:, 1] - 1].numpy().astype(np.float64)
    loss_similarity = -np.abs(init[:, None] - init[None, :])
    # rule vs copy: both predictable, the same symbols and the same noise floor: neither the token
    # id nor the loss tells them apart, only how the model computes them
    pick = np.isin(groups, [GROUPS.index("rule"), GROUPS.index("copy")])
    for subset, rows in (("all", slice(None)), ("rule_vs_copy", pick)):
        for name, matrix in (("token", R), ("sequence", R_seq_tokens), ("loss", loss_similarity)):
            block = matrix[np.ix_(np.arange(len(R))[rows], np.arange(len(R))[rows])]
            for key, value in separation_numbers(block, groups[rows], k=k, seed=seed).items():
                if name == "loss" and key == "silhouette":
                    continue  # −|Δℓ| is not a 1 − R distance
                numbers[f"{subset}/{name}/{key}"] = value
    numbers["sizes"] = dict(num_probe=cfg.num_probe, context_length=language.length - 1, rows=len(R),
                            draws=int(sum(kernel.draws_per_chain.values())), memory_bytes=int(ds.attrs["memory_bytes"]))
    if verbose:
        for key, value in numbers.items():
            print(f"{key:32s} {value}")
    return TokenKernelResult(language, cfg, kernel, ds, R, R_seq, groups, init, numbers)


def tsne_embedding(R: np.ndarray, *, perplexity: float = 30.0, max_iter: int = 500, seed: int = 0) -> np.ndarray:
    """A 2-D map of the rows of R: scikit-learn's t-SNE of the distance 1 − R, with a private
    ``random_state`` (deterministic; no global generator) and one thread (on a shared CPU
    several OpenMP threads make it 10–20× slower: 2.4 s vs 42 s for 608 tokens)."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    distance = np.clip(1.0 - np.asarray(R, np.float64), 0.0, None)
    np.fill_diagonal(distance, 0.0)
    with threadpool_limits(1):
        return TSNE(2, metric="precomputed", init="random", perplexity=min(perplexity, (len(R) - 1) / 3),
                    random_state=seed, max_iter=max_iter, n_jobs=1).fit_transform(distance)


def plot_token_kernel(result: TokenKernelResult, path: Optional[str] = None, *, k: int = 10):
    """Four panels: the token-level R ordered by group (then target symbol, then sequence); the
    sequence-level R spread over the same token rows; a t-SNE map of 1 − R
    (:func:`tsne_embedding`) coloured by group; and the k-NN purity of the groups under each
    similarity against the shuffled-label chance level."""
    import matplotlib.pyplot as plt

    colors = {"random": "#7f7f7f", "rule": "#1f77b4", "sep": "#2ca02c", "copy": "#d62728"}
    positions = result.kernel.token_positions.numpy()
    symbols = result.kernel.input_ids.numpy()[positions[:, 0], positions[:, 1]]
    order = np.lexsort((positions[:, 0], symbols, result.groups))
    R_seq_tokens = result.R_sequence[np.ix_(positions[:, 0], positions[:, 0])]
    fig, axes = plt.subplots(2, 2, figsize=(12, 11))
    bounds = np.flatnonzero(np.diff(result.groups[order])) + 0.5
    ticks = [np.mean(np.flatnonzero(result.groups[order] == i)) for i in range(len(GROUPS))]
    for ax, matrix, title in ((axes[0, 0], result.R, "token-level R: tokens by group, then symbol"),
                              (axes[0, 1], R_seq_tokens, "sequence-level R, each token given its sequence's row")):
        image = ax.imshow(matrix[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        for b in bounds:
            ax.axhline(b, color="k", lw=0.6)
            ax.axvline(b, color="k", lw=0.6)
        ax.set_xticks(ticks, GROUPS)
        ax.set_yticks(ticks, GROUPS)
        ax.set_title(title, fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.75)
    xy = tsne_embedding(result.R)
    for i, name in enumerate(GROUPS):
        mask = result.groups == i
        axes[1, 0].scatter(xy[mask, 0], xy[mask, 1], s=9, alpha=0.7, color=colors[name], label=f"{name} ({mask.sum()})")
    axes[1, 0].legend(fontsize=8, markerscale=1.5)
    axes[1, 0].set_title("t-SNE of 1 − R (token level)", fontsize=10)
    axes[1, 0].set_xticks([])
    axes[1, 0].set_yticks([])
    n = result.numbers
    ax = axes[1, 1]
    width = 0.25
    for j, (name, label) in enumerate((("token", "token-level R"), ("sequence", "sequence-level R"),
                                       ("loss", "loss at w*"))):
        values = [n[f"all/{name}/knn_purity"], n[f"rule_vs_copy/{name}/knn_purity"]]
        bars = ax.bar(np.arange(2) + (j - 1) * width, values, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    for x, key in enumerate(("all", "rule_vs_copy")):
        chance = n[f"{key}/token/knn_chance"]
        ax.hlines(chance, x - 1.6 * width, x + 1.6 * width, colors="k", linestyles="--", lw=1)
    ax.set_xticks([0, 1], ["all four groups", "rule vs copy tokens"])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"{k}-NN purity (dashed: shuffled labels)")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("does a token's neighbourhood share its group?", fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="ci")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--figure", default=None, help="write the figure here (PNG)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_token_kernel(args.scale, seed=args.seed, verbose=True)
    print(asdict(result.scale))
    if args.figure:
        plot_token_kernel(result, args.figure)


if __name__ == "__main__":
    main()
