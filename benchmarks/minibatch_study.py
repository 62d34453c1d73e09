"""Minibatch mode against the exact diagonal mode, judged against a converged reference (issue 19's
validation study, item 4).

**Digits MLP** (``--part mlp``, devinterp 1.3 venv): the README's digits MLP (memorizes 10% flipped
labels, N = 1,797), devinterp 1.3's ``estimate_learning_coeff_with_summary`` with
``num_steps_bw_draws=1``, and, in the same run, for each of the two samplers (a RandomSampler with
replacement; the usual epoch-wise shuffling DataLoader):

- ``MinibatchVariance``: the losses of each step's minibatch (m = 64), no extra forward pass; its
  per-chain moments are snapshotted every ``--every`` draws, so one long run gives every shorter one;
- the exact side: every training sample evaluated at every draw; the per-draw losses are kept
  (float32 [chains, draws, N]) so that any prefix of the chains can be scored, and their
  autocorrelation measured. ``LossKernelCallback(train_set, mode="diagonal")`` runs beside it and
  its variances are checked against the trace's at full length (they must agree to rounding).

The converged reference: the exact per-sample variances pooled over all chains of both runs at full
length (2 × ``--chains`` chains × ``--draws`` draws). Reported, as visits per sample grow:

- at **equal steps** (the same chains, prefixes of d draws a chain): ν (± a jackknife standard error
  over chains) of both sides and of the reference, Spearman of the per-sample variances (minibatch vs
  exact, each vs the reference), memorization ROC-AUC against the flipped labels;
- at **equal wall time**: the exact side at d draws against the minibatch side at ρ·d draws, ρ =
  (time of LLC + exact diagonal mode) / (time of LLC + minibatch mode), measured by interleaved timing
  runs (``--timing-draws``);
- the exact side's **short-chain bias**: ν_exact(d) / ν_ref against the bias the integrated
  autocorrelation time τ of the per-sample loss traces predicts (≈ −τ/d).

**Tiny LM** (``--part lm``, devinterp 2 venv): a 1-layer GPT-2 trained briefly on 288 sequences of 17
tokens (90% follow a rule, 10% random: memorized), ``devinterp_losskernel.llc`` with the training
dataset as its probe observable (all 288 sequences every draw: the exact per-sequence variances, and
ν exact) beside its ``train_*`` variables (the minibatch mode, devinterp's own loader order), at two
lengths, and at equal wall time against a run whose probe is one batch.

    /work/venvs/.venv-ci1/bin/python benchmarks/minibatch_study.py --part mlp   # ~5 CPU min (2 samplers × 4 × 1,600 draws)
    /work/venvs/.venv-ci2/bin/python benchmarks/minibatch_study.py --part lm    # ~2 CPU min
    .../python benchmarks/minibatch_study.py --part mlp --chains 2 --draws 200 --timing-draws 50 --no-record
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from _common import add_common_arguments, append_results, apply_common_arguments, print_table

SGLD = dict(lr=3e-4, nbeta=100.0, localization=200.0)
BATCH = 64
BURNIN = 100


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    keep = np.isfinite(scores)
    return float(roc_auc_score(positive[keep], scores[keep]))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    keep = np.isfinite(a) & np.isfinite(b)
    return float(spearmanr(a[keep], b[keep]).statistic)


def _jackknife(estimate, chains) -> float:
    """Leave-one-chain-out jackknife standard error of ``estimate(list of chains)``."""
    chains = list(chains)
    if len(chains) < 2:
        return float("nan")
    values = [estimate([c for c in chains if c != out]) for out in chains]
    mean = sum(values) / len(values)
    return math.sqrt((len(values) - 1) / len(values) * sum((v - mean) ** 2 for v in values))


def _pooled_variance(trace: np.ndarray) -> np.ndarray:
    """Per-sample variance over all (chain, draw) pairs of a [chains, draws, N] trace (ddof 1)."""
    flat = trace.reshape(-1, trace.shape[-1]).astype(np.float64)
    return flat.var(axis=0, ddof=1)


def _iat(series: np.ndarray, c: float = 5.0) -> np.ndarray:
    """Integrated autocorrelation time of each column of [draws, K] (Sokal's window, c = 5)."""
    x = series - series.mean(axis=0)
    n = len(x)
    f = np.fft.rfft(x, n=2 * n, axis=0)
    acf = np.fft.irfft(f * np.conj(f), axis=0)[:n]
    acf /= np.where(acf[0] > 0, acf[0], 1.0)
    taus = 1 + 2 * np.cumsum(acf[1:], axis=0)
    taus = np.vstack([np.ones((1, x.shape[1])), taus])
    out = np.empty(x.shape[1])
    for k in range(x.shape[1]):
        window = np.nonzero(np.arange(n) >= c * taus[:, k])[0]
        out[k] = taus[window[0] if len(window) else n - 1, k]
    return out


# -- digits MLP, devinterp 1.3 -------------------------------------------------------------------------
class ExactTrace:
    """devinterp 1.x callback: every training sample's loss at every draw, kept per chain."""

    def __init__(self, x, y, chains: int, draws: int):
        self.x, self.y = x, y
        self.trace = np.full((chains, draws, len(y)), np.nan, dtype=np.float32)

    def __call__(self, *, model, chain, draw, **_ignored):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            losses = F.cross_entropy(model(self.x), self.y, reduction="none")
        model.train(was_training)
        self.trace[int(chain), int(draw)] = losses.numpy()


class Snapshots:
    """devinterp 1.x callback after a MinibatchVariance: its per-chain moments every ``every`` draws."""

    def __init__(self, recorder, every: int):
        self.recorder, self.every, self.at = recorder, every, {}

    def __call__(self, *, chain, draw, **_ignored):
        if (int(draw) + 1) % self.every == 0:
            self.recorder.moments()  # folds what is buffered
            self.at[(int(chain), int(draw) + 1)] = self.recorder.chains[int(chain)]  # immutable: never changed


def _plain_evaluate(model, batch):
    _, (x, y) = batch
    return F.cross_entropy(model(x), y, reduction="none").mean(), {}


def _run_mlp(model, data, sampler: str, chains: int, draws: int, *, minibatch: bool, exact: str, every: int = 25,
             seed: int = 0):
    """exact: "" (none), "trace" (ExactTrace + LossKernelCallback) or "diagonal" (LossKernelCallback only)."""
    from devinterp.optim.sgld import SGLD as SGLDOptim
    from devinterp.slt.sampler import estimate_learning_coeff_with_summary
    from torch.utils.data import DataLoader, RandomSampler

    from devinterp_losskernel import LossKernelCallback
    from devinterp_losskernel.minibatch import MinibatchVariance, WithIndices

    indexed = WithIndices(data)
    if sampler == "replacement":
        loader = DataLoader(indexed, batch_size=BATCH, sampler=RandomSampler(indexed, replacement=True,
                                                                              num_samples=len(indexed)))
    else:
        loader = DataLoader(indexed, batch_size=BATCH, shuffle=True)
    x, y = data.tensors
    recorder = MinibatchVariance(num_train=len(data)) if minibatch else None
    snapshots = Snapshots(recorder, every) if minibatch and exact == "trace" else None
    trace = ExactTrace(x, y, chains, draws) if exact == "trace" else None
    diagonal = LossKernelCallback((x, y), mode="diagonal", batch_size=2048) if exact else None
    callbacks = [c for c in (recorder, snapshots, trace, diagonal) if c is not None]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the shuffling loader's warning is the point of the comparison
        start, cpu_start = time.perf_counter(), time.process_time()
        results = estimate_learning_coeff_with_summary(
            model, loader=loader, evaluate=recorder.evaluate if recorder else _plain_evaluate,
            sampling_method=SGLDOptim, optimizer_kwargs=dict(SGLD), num_chains=chains, num_draws=draws,
            num_burnin_steps=BURNIN, num_steps_bw_draws=1, cores=1, seed=seed, device="cpu", callbacks=callbacks,
            verbose=False)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return dict(results=results, recorder=recorder, snapshots=snapshots, trace=trace, diagonal=diagonal,
                seconds=seconds, cpu=cpu)


def part_mlp(args) -> None:
    from torch.utils.data import TensorDataset

    from devinterp_losskernel.demo import DemoConfig, digits_with_flipped_labels, train_memorizing_mlp
    from devinterp_losskernel.sample_moments import merge_moments

    cfg = DemoConfig(num_train=1797)
    x, _, y_train, flipped = digits_with_flipped_labels(cfg)
    model = train_memorizing_mlp(x, y_train, cfg)
    data = TensorDataset(x, y_train)
    n = len(data)
    positive = flipped.numpy()
    half_beta = SGLD["nbeta"] / n / 2
    C, D, every = args.chains, args.draws, args.every

    # 1. timing: LLC alone / + minibatch / + exact diagonal, interleaved
    timing = {"LLC alone": [], "LLC + minibatch mode": [], "LLC + exact diagonal mode": []}
    cpu = {k: [] for k in timing}
    for r in range(args.timing_repeat):
        order = list(timing.items()) if r % 2 == 0 else list(timing.items())[::-1]
        for label, times in order:
            run = _run_mlp(model, data, "replacement", C, args.timing_draws, minibatch="minibatch" in label,
                           exact="diagonal" if "exact" in label else "")
            times.append(run["seconds"])
            cpu[label].append(run["cpu"])
        print(f"timing repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s (CPU {cpu[k][-1]:.1f} s)"
                                                      for k, v in timing.items()), flush=True)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    # on a shared machine the CPU time of this single-threaded process is the cost; wall time waits for a core
    rho = med["LLC + exact diagonal mode"] / med["LLC + minibatch mode"]

    # 2. the long runs, both samplers
    runs = {}
    for sampler in ("replacement", "shuffle"):
        run = _run_mlp(model, data, sampler, C, D, minibatch=True, exact="trace", every=every)
        runs[sampler] = run
        check = np.nanmax(np.abs(run["diagonal"].kernel.variance.numpy() / _pooled_variance(run["trace"].trace) - 1))
        run["check"] = check
        print(f"{sampler}: {run['seconds']:.0f} s; LossKernelCallback diagonal vs trace variance: max rel diff "
              f"{check:.1e}", flush=True)
    full = np.concatenate([runs[s]["trace"].trace for s in runs])  # [2C, D, N]
    ref_var = _pooled_variance(full)
    ref_nu = half_beta * ref_var.sum()
    ref_se = _jackknife(lambda cs: half_beta * _pooled_variance(full[cs]).sum(), range(len(full)))

    def exact_at(run, d, chains=None):
        trace = run["trace"].trace[list(range(C)) if chains is None else chains, :d]
        return _pooled_variance(trace)

    def mb_at(run, d, chains=None):
        merged = None
        for c in (range(C) if chains is None else chains):
            m = run["snapshots"].at[(c, d)]
            merged = m if merged is None else merge_moments(merged, m)
        return merged

    def mb_nu(run, d, chains=None):
        return run["recorder"].singular_fluctuation(mb_at(run, d, chains))

    checkpoints = [d for d in args.checkpoints if d <= D and d % every == 0]
    headers = ["sampler", "draws / chain", "visits / sample", "ν minibatch", "ν exact", "ν mb / ref", "ν exact / ref",
               "Spearman mb–exact", "Spearman mb–ref", "Spearman exact–ref", "AUC mb", "AUC exact"]
    rows_steps, rows_wall = [], []
    for sampler, run in runs.items():
        for d in checkpoints:
            mb_var = mb_at(run, d).variance().numpy()
            ex_var = exact_at(run, d)
            nu_mb, nu_ex = mb_nu(run, d), half_beta * ex_var.sum()
            se_mb = _jackknife(lambda cs, d=d: mb_nu(run, d, cs), range(C))
            se_ex = _jackknife(lambda cs, d=d: half_beta * exact_at(run, d, cs).sum(), range(C))
            visits = float(mb_at(run, d).count.double().mean())
            rows_steps.append([sampler, d, f"{visits:.0f}", f"{nu_mb:.1f} ± {se_mb:.1f}", f"{nu_ex:.1f} ± {se_ex:.1f}",
                               f"{nu_mb / ref_nu:.3f}", f"{nu_ex / ref_nu:.3f}", f"{_spearman(mb_var, ex_var):.3f}",
                               f"{_spearman(mb_var, ref_var):.3f}", f"{_spearman(ex_var, ref_var):.3f}",
                               f"{_auc(mb_var, positive):.3f}", f"{_auc(ex_var, positive):.3f}"])
        for d_ex in checkpoints:
            d_mb = int(round(rho * d_ex / every)) * every
            if d_mb > D or d_mb < every:
                continue
            mb_var = mb_at(run, d_mb).variance().numpy()
            ex_var = exact_at(run, d_ex)
            nu_mb, nu_ex = mb_nu(run, d_mb), half_beta * ex_var.sum()
            se_mb = _jackknife(lambda cs, d=d_mb: mb_nu(run, d, cs), range(C))
            se_ex = _jackknife(lambda cs, d=d_ex: half_beta * exact_at(run, d, cs).sum(), range(C))
            rows_wall.append([sampler, f"{d_ex} / {d_mb}", f"{float(mb_at(run, d_mb).count.double().mean()):.0f}",
                              f"{nu_mb:.1f} ± {se_mb:.1f}", f"{nu_ex:.1f} ± {se_ex:.1f}", f"{nu_mb / ref_nu:.3f}",
                              f"{nu_ex / ref_nu:.3f}", f"{_spearman(mb_var, ex_var):.3f}",
                              f"{_spearman(mb_var, ref_var):.3f}", f"{_spearman(ex_var, ref_var):.3f}",
                              f"{_auc(mb_var, positive):.3f}", f"{_auc(ex_var, positive):.3f}"])

    # 3. the exact side's autocorrelation and short-chain bias
    taus = np.concatenate([_iat(full[c]) for c in range(len(full))])  # per (chain, sample)
    tau_total = statistics.median(float(_iat(full[c].sum(axis=1, keepdims=True))[0]) for c in range(len(full)))
    tau_med = float(np.median(taus))
    rows_bias = []
    for d in checkpoints:
        # a variance pooled over C chains of d autocorrelated draws each (common target) is low by ≈ τ_i/(C·d)
        # (the variance of the grand mean); ν weights the samples by Var_i
        tau_i = np.median(taus.reshape(len(full), n), axis=0)
        predicted = float(np.sum(ref_var * np.clip(1 - tau_i / (C * d), 0, None)) / ref_var.sum())
        within = float(np.sum(ref_var * np.clip(1 - tau_i / d, 0, None)) / ref_var.sum())
        observed = statistics.median(half_beta * exact_at(runs[s], d).sum() / ref_nu for s in runs)
        rows_bias.append([d, f"{observed:.3f}", f"{predicted:.3f}", f"{within:.3f}"])

    t_rows = [[k, f"{statistics.median(v):.2f} ({min(v):.2f}–{max(v):.2f})",
               f"{statistics.median(cpu[k]):.2f} ({min(cpu[k]):.2f}–{max(cpu[k]):.2f})",
               f"{statistics.median(cpu[k]) / med['LLC alone']:.2f}"] for k, v in timing.items()]
    title = f"Digits MLP, N = {n:,}, m = {BATCH}, {C} chains"
    t_table = print_table(["run", "wall s, median (min–max)", "CPU s, median (min–max)", "CPU / LLC alone"], t_rows,
                          f"Cost, {C} chains × {args.timing_draws} draws, {args.timing_repeat} interleaved repeats")
    s_table = print_table(headers, rows_steps, f"{title}: equal steps (the same chains)")
    w_table = print_table(["sampler", "draws / chain exact / minibatch"] + headers[2:], rows_wall,
                          f"{title}: equal wall time (ρ = {rho:.2f})")
    b_table = print_table(["draws / chain", "ν exact / ν ref (median of the 2 runs)",
                           f"predicted by τ, pooled over {C} chains: Σ Var_i (1 − τ_i/(C·d)) / Σ Var_i",
                           "one chain alone: Σ Var_i (1 − τ_i/d) / Σ Var_i"],
                          rows_bias, "Exact side's short-chain bias")
    notes = "\n".join([
        f"Reference: exact per-sample variances pooled over both runs' {2 * C} chains × {D} draws: ν_ref = "
        f"{ref_nu:.2f} ± {ref_se:.2f} (jackknife over the {2 * C} chains); its memorization AUC "
        f"{_auc(ref_var, positive):.3f}. Integrated autocorrelation time of the exact per-sample loss traces "
        f"(in draws = SGLD steps): median τ = {tau_med:.1f} (10–90%: {np.percentile(taus, 10):.1f}–"
        f"{np.percentile(taus, 90):.1f}); of the total training loss τ = {tau_total:.1f}. A minibatch visit "
        f"comes every ~N/m = {n / BATCH:.0f} steps, so successive visits of a sample are nearly independent.",
        f"LossKernelCallback(mode='diagonal') against the stored exact trace at full length: max relative "
        f"difference of the per-sample variances {max(r['check'] for r in runs.values()):.1e} (the exact side "
        "here is the diagonal mode).",
        f"Equal wall time: the exact side's run costs ρ = {rho:.2f}× the minibatch side's CPU time (timing table, "
        f"{C} × {args.timing_draws} draws, both with the sampler's 100 burn-in steps, one thread: on this shared "
        "machine CPU time is the cost, wall time mostly waiting for a core), so the minibatch side "
        "gets ρ·d draws a chain for the exact side's d (a prefix of the same long run).",
        f"SGLD ε = {SGLD['lr']}, nβ = {SGLD['nbeta']}, γ = {SGLD['localization']}, burn-in {BURNIN}, every step a "
        f"draw, minibatch {BATCH}; torch threads: {torch.get_num_threads()}. ν = nβ/(2N)·Σ_i Var_w[ℓ_i]; "
        "'± ' = jackknife over the chains; ref = the reference. Long runs: "
        + ", ".join(f"{s} {r['seconds']:.0f} s" for s, r in runs.items()) + ".",
    ])
    print("\n" + notes)
    append_results("Minibatch mode vs the exact diagonal mode, against a converged reference "
                   "(benchmarks/minibatch_study.py --part mlp)",
                   "\n\n".join([s_table, w_table, b_table, t_table, notes]), path=args.results,
                   write=not args.no_record)


# -- tiny LM, devinterp 2 llc() twin ---------------------------------------------------------------------
def _lm_data(n: int, length: int, vocab: int, flip: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    rows, seen = [], set()
    random_rows = set(torch.randperm(n, generator=gen)[: int(round(flip * n))].tolist())
    while len(rows) < n:
        if len(rows) in random_rows:
            row = torch.randint(0, vocab, (length,), generator=gen)
        else:  # x_{t+1} = x_t + k (mod vocab)
            start, step = int(torch.randint(0, vocab, (1,), generator=gen)), int(torch.randint(1, 4, (1,), generator=gen))
            row = (start + step * torch.arange(length)) % vocab
            if tuple(row.tolist()) in seen:  # few rule rows exist: add one random token at the end
                row[-1] = int(torch.randint(0, vocab, (1,), generator=gen))
        if tuple(row.tolist()) not in seen:
            seen.add(tuple(row.tolist()))
            rows.append(row)
    positive = np.array([i in random_rows for i in range(n)])
    return torch.stack(rows), positive


def part_lm(args) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from devinterp_losskernel import llc

    n, length, vocab = 288, 17, 16
    ids, positive = _lm_data(n, length, vocab, 0.1, args.seed)
    torch.manual_seed(args.seed)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=1, n_head=2,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    opt = torch.optim.Adam(lm.parameters(), lr=3e-3)
    for _ in range(args.lm_train_steps):
        opt.zero_grad()
        lm(ids, labels=ids).loss.backward()
        opt.step()
    lm.eval()
    tokens = [{"input_ids": row} for row in ids]
    row_of = {tuple(row.tolist()): i for i, row in enumerate(ids)}
    sgld = dict(lr=1e-3, n_beta=20.0, localization=50.0, batch_size=32, num_burnin_steps=50, num_chains=args.lm_chains)

    def run(draws, probe, per_draw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.process_time()  # CPU time of this one-thread process: the cost on a shared machine
            ds = llc(lm, tokens, {"probe": (probe, per_draw)}, num_draws=draws, device="cpu", **sgld)
            return ds, time.process_time() - start

    rows, times, variances = [], {}, []
    for draws in args.lm_draws:
        ds, seconds = run(draws, tokens, n // 32)
        times[("exact", draws)] = seconds
        exact = np.full(n, np.nan)
        # probe rows come in the Observable's order: map them back to dataset indices by their tokens
        order = [row_of[tuple(r)] for r in ds["probe_input_ids"].values.tolist()]
        exact[order] = ds.variance.values
        mb = ds.train_variance.values
        variances.append((mb, exact))
        rows.append(["same run", draws, f"{float(ds.train_visits.mean()):.0f}",
                     f"{float(ds.train_singular_fluctuation):.3f} ± {float(ds.train_singular_fluctuation_se):.3f}",
                     f"{float(ds.singular_fluctuation):.3f}", f"{_spearman(mb, exact):.3f}",
                     f"{_auc(mb, positive):.3f} / {_auc(exact, positive):.3f}", f"{seconds:.1f}"])
        print(rows[-1], flush=True)
    # equal wall time: the minibatch side alone (a one-batch probe) at ρ × the shortest exact run's draws
    short = min(args.lm_draws)
    ds_small, t_small = run(short, tokens[:32], 1)
    rho = times[("exact", short)] / t_small
    d_mb = int(round(rho * short))
    ds_eq, t_eq = run(d_mb, tokens[:32], 1)
    long_exact = max(args.lm_draws)
    rows.append([f"minibatch side alone at equal wall time to {short} exact draws", d_mb,
                 f"{float(ds_eq.train_visits.mean()):.0f}",
                 f"{float(ds_eq.train_singular_fluctuation):.3f} ± {float(ds_eq.train_singular_fluctuation_se):.3f}",
                 "—", "—", f"{_auc(ds_eq.train_variance.values, positive):.3f} / —", f"{t_eq:.1f}"])
    variances.append((ds_eq.train_variance.values, None))
    long_var = variances[int(np.argmax(args.lm_draws))][1]
    for row, (mb, exact) in zip(rows, variances):
        row.insert(6, f"{_spearman(mb, long_var):.3f} / " + ("—" if exact is None else f"{_spearman(exact, long_var):.3f}"))
    headers = ["run", "draws / chain", "visits / sequence", "ν minibatch (train_*, ± SE)", "ν exact (probe = dataset)",
               "Spearman of per-sequence variances", f"Spearman vs the {max(args.lm_draws)}-draw exact, mb / exact",
               "memorization AUC mb / exact", "CPU s"]
    table = print_table(headers, rows, "Tiny LM through devinterp_losskernel.llc")
    notes = (f"1-layer GPT-2 (n_embd 32, 2 heads, dropout 0), vocab {vocab}, {n} unique sequences of {length} tokens: "
             f"90% follow x_(t+1) = x_t + k mod {vocab}, 10% random (the memorization positives); Adam "
             f"{args.lm_train_steps} full-batch steps. llc(): ε = {sgld['lr']}, nβ = {sgld['n_beta']}, "
             f"γ = {sgld['localization']}, batch 32, {sgld['num_chains']} chains, burn-in 50; minibatch order "
             f"devinterp's own loader (shuffle, epoch_mode='cycle', without replacement). The exact side is the "
             f"probe observable = the training dataset, {n // 32} batches a draw (all {n} sequences). "
             f"Cost (CPU time, one thread): with a one-batch probe the run took {t_small:.1f} s at {short} draws, against "
             f"{times[('exact', short)]:.1f} s with the whole dataset as probe: ρ = {rho:.2f}. The "
             f"{long_exact}-draw run is the nearest to a converged reference here.")
    print("\n" + notes)
    append_results("Minibatch mode in devinterp 2's llc() twin: a tiny LM (benchmarks/minibatch_study.py --part lm)",
                   table + "\n\n" + notes, path=args.results, write=not args.no_record)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["mlp", "lm"], default="mlp")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--draws", type=int, default=1600, help="draws a chain of the long runs")
    parser.add_argument("--every", type=int, default=25, help="minibatch snapshots every this many draws")
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[50, 100, 200, 400, 800, 1600])
    parser.add_argument("--timing-draws", type=int, default=100)
    parser.add_argument("--timing-repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lm-chains", type=int, default=4)
    parser.add_argument("--lm-draws", type=int, nargs="+", default=[100, 400])
    parser.add_argument("--lm-train-steps", type=int, default=300)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = 1  # stable timing on a shared machine
    apply_common_arguments(args)
    if args.part == "mlp":
        part_mlp(args)
    else:
        part_lm(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
