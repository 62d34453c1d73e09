"""The health report (diagnostics.py): the trace statistics against float64 references with known
answers, the split-half record against numpy, the verdicts on synthetic runs whose faults are
known, and the record's way through the callback, checkpoints, files and xarray."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from devinterp_losskernel import LossKernel, LossKernelCallback, loss_kernel
from devinterp_losskernel.diagnostics import (
    THRESHOLDS,
    HealthRecorder,
    HealthReport,
    block_indices,
    diagnose,
    draws_for_reliability,
    effective_sample_size,
    merge_health_records,
    record_from_draws,
    spearman_brown,
    split_rhat,
)


# -- the statistics, against answers known in closed form -----------------------------------------
def ar1(rng, length, phi, chains=1, offsets=None):
    """AR(1) traces x_t = φ x_{t−1} + √(1−φ²) ε_t (unit stationary variance), float64 [chains, length]."""
    x = np.empty((chains, length))
    x[:, 0] = rng.standard_normal(chains)
    noise = rng.standard_normal((chains, length)) * math.sqrt(1 - phi * phi)
    for t in range(1, length):
        x[:, t] = phi * x[:, t - 1] + noise[:, t]
    return x + (0 if offsets is None else np.asarray(offsets)[:, None])


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
def test_ess_of_ar1_matches_its_autocorrelation_time(phi):
    rng = np.random.default_rng(1)
    length = 40_000
    ess, tau = effective_sample_size(ar1(rng, length, phi)[0])
    true_tau = (1 + phi) / (1 - phi)  # 1 + 2 Σ φ^t
    assert tau == pytest.approx(true_tau, rel=0.12)
    assert ess == pytest.approx(length / true_tau, rel=0.12)


def test_ess_of_a_constant_or_tiny_trace_is_its_length():
    assert effective_sample_size(np.ones(50)) == (50.0, 1.0)
    assert effective_sample_size([1.0, 2.0]) == (2.0, 1.0)


def test_split_rhat_is_one_for_agreeing_chains_and_known_for_offset_ones():
    rng = np.random.default_rng(2)
    length = 20_000
    agreeing = ar1(rng, length, 0.0, chains=4)
    assert split_rhat(list(agreeing)) == pytest.approx(1.0, abs=0.003)
    delta = 0.3
    offsets = delta * np.array([-1.5, -0.5, 0.5, 1.5])
    shifted = ar1(rng, length, 0.0, chains=4, offsets=offsets)
    # 8 half-chains, each chain's offset twice: B/T' = var(offsets, ddof=1 over 8) = 10 δ²/7; W = 1
    expected = math.sqrt((length // 2 - 1) / (length // 2) + 10 * delta**2 / 7)
    assert split_rhat(list(shifted)) == pytest.approx(expected, abs=0.01)


def test_split_rhat_by_hand_on_a_small_example():
    chains = [np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 2.0, 5.0, 5.0])]
    halves = np.array([[1, 2], [3, 4], [2, 2], [5, 5]], dtype=float)
    within = halves.var(axis=1, ddof=1).mean()
    between = halves.mean(axis=1).var(ddof=1)
    assert split_rhat(chains) == pytest.approx(math.sqrt((0.5 * within + between) / within), rel=1e-12)
    assert math.isnan(split_rhat([np.ones(3)]))  # halves of one draw: nothing to compare


def test_spearman_brown_and_its_inverse():
    assert spearman_brown(0.5, 2) == pytest.approx(2 / 3)
    needed = draws_for_reliability(0.5, 100, 0.9)
    assert needed == pytest.approx(900)
    assert spearman_brown(0.5, needed / 100) == pytest.approx(0.9)
    assert draws_for_reliability(-0.1, 100, 0.9) == math.inf


# -- the record ------------------------------------------------------------------------------------
def draws(rng, chains=4, length=60, n=70, phi=0.5, level=1.0, trend=0.0):
    """Synthetic probe losses [chains, length, n]: per-sample levels, a shared AR(1) factor with
    per-sample loadings, per-sample noise, and an optional linear trend."""
    base = level * (1 + rng.random(n))
    loading = rng.random(n)
    shared = ar1(rng, length, phi, chains=chains)
    own = ar1(rng, length * n, phi, chains=chains).reshape(chains, length, n)
    ramp = trend * np.linspace(0, 1, length)[None, :, None]
    return 0.1 * (shared[:, :, None] * loading + 0.5 * own) + base + ramp


def test_block_indices_are_evenly_spaced_and_deterministic():
    assert block_indices(10, 4).tolist() == [0, 2, 5, 7]
    assert block_indices(3, 64).tolist() == [0, 1, 2]


def test_recorder_moments_equal_numpy_on_each_half_and_merge_exactly():
    rng = np.random.default_rng(3)
    x = draws(rng, chains=3, length=10, n=600)
    rec = HealthRecorder(600, expected_draws=10)
    for c in range(3):
        for t in range(0, 10, 3):  # blocks of 3 and a single draw: folds of any size
            rec.update(c, t, torch.from_numpy(x[c, t:t + 3]))
    record = rec.record()
    rows, cols = record["block_rows"].numpy(), record["block_columns"].numpy()
    assert len(rows) == 64 and len(cols) == 512
    for g, group in enumerate(record["groups"]):
        parity, half = divmod(g, 2)
        chosen = np.concatenate([x[c, :5] if half == 0 else x[c, 5:] for c in range(3) if c % 2 == parity])
        assert group["count"] == len(chosen)
        np.testing.assert_allclose(group["mean"].numpy(), chosen.mean(0), rtol=1e-12)
        np.testing.assert_allclose(group["m2_diag"].numpy(), chosen.var(0) * len(chosen), rtol=1e-9)
        cov = np.cov(chosen, rowvar=False) * (len(chosen) - 1)
        np.testing.assert_allclose(group["m2_block"].numpy(), cov[np.ix_(rows, cols)], rtol=1e-9, atol=1e-12)
    # the per-process form: chains 0, 2 here and chain 1 elsewhere merge to the same record
    a, b = HealthRecorder(600, 10), HealthRecorder(600, 10)
    for c in range(3):
        (b if c == 1 else a).update(c, 0, torch.from_numpy(x[c]))
    merged = merge_health_records([{**a.record(), "trace": {0: [0.0], 2: [0.0]}}, {**b.record(), "trace": {1: [0.0]}}])
    for mine, whole in zip(merged["groups"], record["groups"]):
        assert mine["count"] == whole["count"]
        torch.testing.assert_close(mine["m2_block"], whole["m2_block"], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="share chains"):
        merge_health_records([{**a.record(), "trace": {0: [0.0]}}, {**b.record(), "trace": {0: [0.0]}}])


def test_recorder_state_dict_round_trip_and_unknown_t_blocks():
    rng = np.random.default_rng(4)
    x = torch.from_numpy(draws(rng, chains=1, length=70, n=5)[0])
    rec = HealthRecorder(5)  # T unknown: alternating blocks of 32 draws
    rec.update(0, 0, x)
    counts = [g["count"] for g in rec.groups]
    assert counts == [32 + 6, 32, 0, 0]  # draws 0–31 and 64–69 in half 0, 32–63 in half 1
    again = HealthRecorder.from_state_dict(rec.state_dict())
    for g, h in zip(rec.groups, again.groups):
        assert g["count"] == h["count"] and torch.equal(g["mean"], h["mean"])
        assert torch.equal(g["m2_block"], h["m2_block"])
    assert again.time_split == rec.time_split


# -- verdicts on synthetic runs ----------------------------------------------------------------------
def kernel_of(x, *, init=None, labels=None, sampler=None, mode="full", llc=None):
    chains = {c: torch.from_numpy(x[c]) for c in range(x.shape[0])}
    metadata = {"sampler": sampler or {"lr": 1e-4, "nbeta": 100.0, "localization": 100.0}}
    if llc is not None:
        metadata["llc/mean"] = llc
    kernel = loss_kernel([chains[c] for c in sorted(chains)], mode=mode, metadata=metadata,
                         init_loss=None if init is None else torch.as_tensor(init), labels=labels)
    kernel.health_record = record_from_draws(chains)
    return kernel


def test_a_healthy_run_passes():
    rng = np.random.default_rng(5)
    x = draws(rng, chains=4, length=200, n=80, phi=0.3)
    report = kernel_of(x, init=x.mean((0, 1)) - 0.5).diagnostics()
    assert report.judgeable and report.ok, report
    assert report.problems == []
    assert report.numbers["split_rhat"] < 1.05 and report.numbers["ess_per_chain_min"] > 50
    assert report.numbers["reliability_correlation"] > 0.8


def test_a_trending_run_is_told_to_burn_in_longer():
    rng = np.random.default_rng(6)
    x = draws(rng, chains=4, length=200, n=80, phi=0.3, trend=0.3)
    report = kernel_of(x, init=x.mean((0, 1)) - 0.5).diagnostics()
    assert not report.ok
    assert any("not stationary" in p and "num_burnin_steps" in p for p in report.problems), report.problems
    assert report.numbers["trend_z_max"] > THRESHOLDS["trend_z_max"]


def test_disagreeing_chains_are_flagged():
    rng = np.random.default_rng(7)
    x = draws(rng, chains=4, length=200, n=80, phi=0.3)
    x += np.array([0.0, 0.0, 0.3, 0.3])[:, None, None]  # two chains in another place
    report = kernel_of(x, init=x.mean((0, 1)) - 0.5).diagnostics()
    assert any("disagree" in p and "num_draws" in p for p in report.problems), report.problems
    assert report.numbers["split_rhat"] > THRESHOLDS["rhat_max"]


def test_too_few_draws_are_not_judged_and_say_what_to_change():
    rng = np.random.default_rng(8)
    x = draws(rng, chains=2, length=8, n=40)
    report = kernel_of(x, init=x.mean((0, 1)) - 0.5).diagnostics()
    assert not report.judgeable and not report.ok
    assert "more draws" in report.problems[0] and "num_draws" in report.problems[0]


def test_chains_that_did_not_move_are_told_to_raise_lr():
    rng = np.random.default_rng(9)
    x = draws(rng, chains=4, length=100, n=40)
    report = kernel_of(x, init=x.mean((0, 1)), llc=-1.6).diagnostics()
    assert any("hardly moved" in p and "Raise lr" in p for p in report.problems), report.problems


def test_above_chance_is_a_note_for_a_stationary_loose_posterior_and_a_problem_for_a_large_step():
    rng = np.random.default_rng(10)
    x = draws(rng, chains=4, length=200, n=60, phi=0.3, level=4.0)  # chance for 10 classes: 2.30
    labels = torch.arange(60) % 10
    loose = kernel_of(x, init=np.full(60, 0.1), labels=labels,
                      sampler={"lr": 3e-4, "nbeta": 100.0, "localization": 20.0}).diagnostics()
    assert loose.ok and any("loose posterior" in s for s in loose.notes), loose
    assert loose.numbers["chance_fraction"] > 1
    large = kernel_of(x, init=np.full(60, 0.1), labels=labels,
                      sampler={"lr": 1e-2, "nbeta": 100.0, "localization": 200.0}).diagnostics()
    assert not large.ok
    assert any("left the basin" in p and "Lower lr" in p for p in large.problems), large.problems
    assert any("εγ/2" in p for p in large.problems)


def test_diagonal_kernels_are_judged_on_their_variances():
    rng = np.random.default_rng(11)
    x = draws(rng, chains=4, length=100, n=50)
    report = kernel_of(x, init=x.mean((0, 1)) - 0.5, mode="diagonal").diagnostics()
    assert any("variances" in s for s in report.notes + report.problems)
    assert report.numbers["reliability_variance"] > 0.5


def test_a_kernel_without_a_record_is_not_judgeable_never_an_error():
    kernel = loss_kernel(np.random.default_rng(12).normal(size=(30, 5)))
    kernel.health_record, kernel.metadata["diagnostics"] = None, None   # e.g. a kernel from an older version
    report = diagnose(kernel)
    assert not report.judgeable and not report.ok and "no health record" in report.problems[0]


def test_thresholds_by_name_and_unknown_names_refused():
    rng = np.random.default_rng(13)
    x = draws(rng, chains=4, length=100, n=40)
    kernel = kernel_of(x, init=x.mean((0, 1)) - 0.5)
    strict = kernel.diagnostics(min_ess_per_chain=1e6)
    assert any("poor mixing" in p for p in strict.problems)
    with pytest.raises(ValueError, match="unknown health-report thresholds"):
        kernel.diagnostics(rhat=1.0)
    with pytest.raises(ValueError, match="rhat_max must be a finite number"):
        kernel.diagnostics(rhat_max=float("nan"))


def test_report_forms():
    report = HealthReport(ok=False, problems=["lower lr (ε)"], notes=["n"], numbers={"split_rhat": 1.5})
    d = report.to_dict()
    assert d == {"ok": False, "judgeable": True, "problems": ["lower lr (ε)"], "notes": ["n"],
                 "numbers": {"split_rhat": 1.5}}
    assert HealthReport.from_dict(d) == report
    assert "problem: lower lr (ε)" in str(report) and "split_rhat=1.5" in str(report)
    assert "<li><b>problem:</b> lower lr (ε)</li>" in report._repr_html_()


# -- through the callback ------------------------------------------------------------------------------
def run_callback(cb, model, chains=2, length=40, scale=0.05, start=0):
    """A stand-in for a sampler: draws w = w* + noise (a private generator), delivered as devinterp does."""
    generator = torch.Generator().manual_seed(0)
    w_star = [p.detach().clone() for p in model.parameters()]
    for c in range(start, start + chains):
        for t in range(length):
            with torch.no_grad():
                for p, w in zip(model.parameters(), w_star):
                    p.copy_(w + scale * torch.randn(w.shape, generator=generator))
            cb(model=model, chain=c, draw=t, num_draws=length)
    with torch.no_grad():
        for p, w in zip(model.parameters(), w_star):
            p.copy_(w)


@pytest.fixture()
def small():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(30, 4, generator=generator)
    y = torch.arange(30) % 3
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return model, (x, y), y


def test_the_callback_records_the_trace_and_moments_of_exactly_the_kept_draws(small, tmp_path):
    model, probe, labels = small
    cb = LossKernelCallback(probe, labels=labels, reference_model=model)
    before = torch.random.get_rng_state()
    run_callback(cb, model)
    kernel = cb.kernel
    assert torch.equal(torch.random.get_rng_state(), before)  # no global generator was touched
    record = kernel.health_record
    assert {c: len(v) for c, v in record["trace"].items()} == kernel.draws_per_chain == {0: 40, 1: 40}
    assert sum(g["count"] for g in record["groups"]) == kernel.num_draws
    # the trace's mean is the mean probe loss over the draws
    whole = torch.cat([record["trace"][0], record["trace"][1]]).mean()
    assert float(whole) == pytest.approx(float(kernel.mean.double().mean()), rel=1e-9)
    # the merged halves' variances are the kernel's
    from devinterp_losskernel.diagnostics import _merge_group

    g = record["groups"]
    rows, cols = record["block_rows"], record["block_columns"]
    total = _merge_group(_merge_group(g[0], g[1], rows, cols), _merge_group(g[2], g[3], rows, cols), rows, cols)
    torch.testing.assert_close(total["m2_diag"] / (kernel.num_draws - 1), kernel.variance.double(), rtol=1e-9,
                               atol=1e-12)
    torch.testing.assert_close(total["m2_block"] / (kernel.num_draws - 1), kernel.covariance.double()[rows][:, cols],
                               rtol=1e-9, atol=1e-12)
    summary = kernel.metadata["diagnostics"]
    assert summary == kernel.diagnostics().to_dict()
    assert kernel.metadata["probe_loss"] == "cross_entropy"
    # a file keeps the record; a subset and xarray keep the summary
    kernel.save(tmp_path / "k.pt")
    loaded = LossKernel.load(tmp_path / "k.pt")
    assert loaded.diagnostics().to_dict() == summary
    pytest.importorskip("xarray")
    ds = kernel.to_xarray()
    assert ds.attrs["health_ok"] == summary["ok"] and ds["probe_loss_trace"].shape == (2, 40)
    assert LossKernel.from_xarray(ds).diagnostics().problems == summary["problems"]


def test_a_checkpointed_callback_resumes_with_its_record(small):
    model, probe, labels = small
    first = LossKernelCallback(probe, labels=labels, reference_model=model)
    run_callback(first, model, chains=2)
    first.end_chain()
    resumed = LossKernelCallback(probe, labels=labels, reference_model=model)
    resumed.load_state_dict(first.state_dict())
    mine, theirs = resumed.kernel.health_record, first.kernel.health_record
    assert all(torch.equal(mine["trace"][c], theirs["trace"][c]) for c in (0, 1))
    assert all(torch.equal(a["m2_block"], b["m2_block"]) for a, b in zip(mine["groups"], theirs["groups"]))
    run_callback(resumed, model, chains=1, start=2)  # the run goes on after the resume
    kernel = resumed.kernel
    assert kernel.draws_per_chain == {0: 40, 1: 40, 2: 40}
    assert sum(g["count"] for g in kernel.health_record["groups"]) == 120
    # a state from before the record existed: the kernel has no record, and its report says so
    state = first.state_dict()
    state.pop("health")
    state.pop("mean_trace")
    old = LossKernelCallback(probe, labels=labels, reference_model=model)
    old.load_state_dict(state)
    kernel = old.kernel
    assert kernel.health_record is None
    assert kernel.metadata["diagnostics"]["judgeable"] is False


def test_from_samples_reads_the_record_from_the_store():
    xr = pytest.importorskip("xarray")
    rng = np.random.default_rng(14)
    x = draws(rng, chains=3, length=40, n=6)  # [chains, draws, sequences]
    tokens = np.repeat(x[..., None], 4, axis=-1).astype(np.float32)  # per-token losses, mean = x
    ds = xr.Dataset({"loss_probe": (("chain", "draw", "batch_probe", "token_pos"), tokens)},
                    attrs={"metadata": {"config": {"sampler": {"lr": 1e-3, "n_beta": 20.0, "localization": 5.0}}}})
    kernel = LossKernel.from_samples(ds, "probe", draws=slice(10, None))
    record = kernel.health_record
    assert {c: len(v) for c, v in record["trace"].items()} == kernel.draws_per_chain == {0: 30, 1: 30, 2: 30}
    np.testing.assert_allclose(record["trace"][1].numpy(), x[1, 10:].astype(np.float32).astype(np.float64).mean(1),
                               rtol=1e-6)
    assert kernel.metadata["diagnostics"] == kernel.diagnostics().to_dict()
    assert kernel.diagnostics().judgeable


def test_a_diverged_chain_is_a_problem_and_its_short_trace_is_left_out():
    rng = np.random.default_rng(15)
    x = draws(rng, chains=4, length=100, n=30, phi=0.3)
    chains = {c: torch.from_numpy(x[c] if c else x[c, :5]) for c in range(4)}  # chain 0 cut off after 5 draws
    kernel = loss_kernel([chains[c] for c in range(4)], init_loss=torch.from_numpy(x.mean((0, 1)) - 0.5),
                         metadata={"sampler": {"lr": 1e-4, "nbeta": 100.0, "localization": 100.0},
                                   "diverged_chains": [0],
                                   "chain_failures": {0: "draw 5 has 3 non-finite probe losses"}})
    kernel.health_record = record_from_draws(chains)
    report = kernel.diagnostics()
    assert report.judgeable
    assert any("chains [0] diverged" in p and "non-finite" in p and "Lower lr" in p for p in report.problems)
    assert any("chains [0] have fewer than" in s for s in report.notes)
    assert report.numbers["split_rhat"] < 1.1  # from chains 1–3 only


@pytest.mark.parametrize("storage", [dict(mode="diagonal"), dict(rows=[0, 3, 7]), dict(mode="combined", rows=[1, 2])])
def test_every_mode_gets_a_record_and_a_report(small, storage):
    model, probe, labels = small
    cb = LossKernelCallback(probe, labels=labels, reference_model=model, **storage)
    run_callback(cb, model, chains=2, length=40)
    kernel = cb.kernel
    assert sum(g["count"] for g in kernel.health_record["groups"]) == 80
    report = kernel.diagnostics()
    assert report.judgeable
    key = "reliability_variance" if storage.get("mode") == "diagonal" else "reliability_correlation"
    assert math.isfinite(report.numbers[key])


def test_loss_kernel_of_a_trace_carries_its_health_record():
    """``loss_kernel(losses)`` feeds the same split-half record as a run: a trace with real
    structure (two latent factors shared by groups of samples) is reproducible between halves,
    pure noise is not, and a streamed trace (blocks) is judged as well."""
    from devinterp_losskernel import loss_kernel

    rng = np.random.default_rng(0)
    factors = rng.normal(size=(4, 300, 2))                           # [chains, draws, 2]
    loadings = np.repeat(np.eye(2), 20, axis=0)                      # [40, 2]: samples 0-19, 20-39
    structured = factors @ loadings.T + 0.3 * rng.normal(size=(4, 300, 40))
    report = loss_kernel(structured).diagnostics()
    assert report.judgeable
    assert report.numbers["reliability_correlation"] > 0.9
    assert not any("not reproducible" in p for p in report.problems)
    noise = loss_kernel(rng.normal(size=(4, 300, 40))).diagnostics()
    assert any("not reproducible" in p for p in noise.problems)
    streamed = loss_kernel(iter(list(structured.reshape(-1, 40).reshape(40, 30, 40))))
    assert streamed.metadata["diagnostics"] is not None and streamed.health_record is not None


def test_a_minibatch_mode_kernel_is_judged_from_its_visits_llc_and_nu_spread():
    """A minibatch-mode kernel has no probe trace: its report says so in a note and judges the
    visits per sample (too few here: 2 chains × 20 draws of 32 out of 300), the LLC and ν's
    between-chain standard error, each problem naming what to change."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from devinterp_losskernel import estimate_loss_kernel

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 8, generator=g), torch.randint(0, 3, (300,), generator=g)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    kernel = estimate_loss_kernel(model, DataLoader(TensorDataset(x, y), batch_size=32), None, mode="minibatch",
                                  num_chains=2, num_draws=20, num_burnin_steps=5, lr=1e-4, nbeta=30.0,
                                  localization=100.0, seed=0, verbose=False)
    report = kernel.diagnostics()
    assert report.judgeable and not report.ok
    assert report.numbers["visits_median"] == float(kernel.visits.double().median())
    visits = [p for p in report.problems if p.startswith("too few visits")]
    assert len(visits) == 1 and "num_draws" in visits[0]
    assert any("minibatch mode" in note for note in report.notes)
    loose = kernel.diagnostics(min_median_visits=1)
    assert not any(p.startswith("too few visits") for p in loose.problems)


# -- movement and basin on the model's own scale (the modular transformer's case) -------------------
MODULAR_LIKE = {"lr": 6e-7, "nbeta": 500.0, "localization": 1e6, "num_burnin_steps": 50, "num_draws": 200,
                "num_steps_bw_draws": 1}


def test_a_tight_posterior_of_a_near_zero_loss_model_is_not_told_it_has_not_moved():
    """The modular transformer's hand-tuned run: loss ~1e-4 at w*, LLC ~0.2 (below the absolute
    2 the report used to ask for), 45 relaxation times of the localization: its best kernel. The
    report judges movement by the sampler's clock, not the LLC's size."""
    rng = np.random.default_rng(21)
    x = 1e-3 * draws(rng, chains=4, length=200, n=60, phi=0.3)
    report = kernel_of(x, init=x.mean((0, 1)) - 5e-4, sampler=MODULAR_LIKE).diagnostics()
    assert report.numbers["probe_llc"] == pytest.approx(0.25)
    assert report.numbers["relaxations"] == pytest.approx(250 * 6e-7 * 1e6 / 2)
    assert report.numbers["fluctuation_ratio"] < 0.1
    assert report.ok, report


def test_chains_that_ran_less_than_one_relaxation_time_have_not_moved_whatever_their_llc():
    rng = np.random.default_rng(22)
    x = draws(rng, chains=4, length=200, n=60, phi=0.3)
    slow = {**MODULAR_LIKE, "lr": 1e-6, "localization": 200.0, "nbeta": 100.0}  # README's ε = 1e-6: 0.025
    report = kernel_of(x, init=x.mean((0, 1)) - 0.5, sampler=slow).diagnostics()
    assert report.numbers["relaxations"] == pytest.approx(0.025)
    assert any("hardly moved" in p and "relaxation" in p and "Raise lr" in p for p in report.problems), report


def test_chains_far_out_of_the_basin_below_chance_are_caught_by_the_fluctuation_ratio():
    """The modular transformer at γ = 4e4: probe loss 1e-4 → 0.79, only 0.15× chance, but
    fluctuating ~20× more than a tempered posterior in one basin does. Settled chains: a loose
    posterior (a note, not a default); with a step the localization does not allow: a problem."""
    rng = np.random.default_rng(23)
    x = 0.3 * draws(rng, chains=4, length=200, n=60, phi=0.3)  # mean ≈ 0.45 = 0.2× chance for 10 classes
    labels = torch.arange(60) % 10
    init = x.mean((0, 1)) - 0.01
    loose = kernel_of(x, init=init, labels=labels, sampler={**MODULAR_LIKE, "localization": 4e4,
                                                             "lr": 2e-6}).diagnostics()
    assert loose.numbers["chance_fraction"] < 0.3
    assert loose.numbers["fluctuation_ratio"] > THRESHOLDS["fluctuation_ratio_max"]
    assert loose.ok and any(s.startswith("loose posterior") and "fluctuating" in s for s in loose.notes), loose
    large = kernel_of(x, init=init, labels=labels, sampler={**MODULAR_LIKE, "localization": 4e4,
                                                             "lr": 3e-5}).diagnostics()
    assert any("left the basin" in p and "fluctuating" in p and "Lower lr" in p for p in large.problems), large
    inside = kernel_of(x, init=x.mean((0, 1)) - 0.5, labels=labels,
                       sampler={**MODULAR_LIKE, "localization": 4e4, "lr": 2e-6}).diagnostics()
    assert inside.numbers["fluctuation_ratio"] < 1 and not any("loose" in s for s in inside.notes)


@pytest.mark.parametrize("scale", [1e-4, 1.0, 100.0])
def test_the_verdicts_do_not_depend_on_the_loss_scale(scale):
    """Losses × s with nβ / s (the same posterior in other units): the same numbers that judge
    movement and basin, the same verdict."""
    rng = np.random.default_rng(24)
    x = draws(rng, chains=4, length=200, n=60, phi=0.3)
    for rise, loose in ((0.5, False), (0.01, True)):
        sampler = {**MODULAR_LIKE, "localization": 1e4, "lr": 1e-5, "nbeta": 500.0 / scale}
        report = kernel_of(scale * x, init=scale * (x.mean((0, 1)) - rise), sampler=sampler).diagnostics()
        assert report.ok
        assert report.numbers["fluctuation_ratio"] == pytest.approx(
            500.0 * np.mean([x[c].mean(1).var(ddof=1) for c in range(4)]) / rise, rel=1e-6)
        assert any(s.startswith("loose posterior") for s in report.notes) == loose
