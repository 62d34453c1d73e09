"""calibration.py: the sweep's grid, its validation, its recommendation, and one real sweep."""

import math
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from devinterp_losskernel import calibration
from devinterp_losskernel.calibration import (
    GAMMA_FACTORS,
    STEP_FRACTIONS,
    CalibrationResult,
    CalibrationRow,
    CalibrationSetting,
    calibrate,
    default_grid,
    recommend,
    weight_rms,
)

from conftest import devinterp_major


def _data(n=120, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def _model(d=6, classes=3, seed=0, scale=None):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, classes))
    if scale is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(scale)
    return model


def _row(lr, gamma, ok=True, judgeable=True, problems=()):
    numbers = {"llc": 5.0, "loss_at_w_star": 0.1, "loss_over_draws": 0.3, "ess": 40.0, "reliability": 0.9}
    return CalibrationRow(CalibrationSetting(lr, gamma, 10.0), numbers, ok, judgeable, list(problems), [],
                          np.zeros((2, 3)), 0.0)


# -- the grid ------------------------------------------------------------------------------------

def test_default_grid_places_gamma_by_the_weight_scale_and_epsilon_by_the_relaxation_rate():
    model = _model(scale=0.1)  # every weight 0.1: rms² = 0.01
    assert weight_rms(model) == pytest.approx(0.1)
    pairs = default_grid(model)
    gammas = sorted({g for _, g in pairs})
    assert gammas == pytest.approx([c / 0.01 for c in GAMMA_FACTORS])
    assert len(pairs) == len(GAMMA_FACTORS) * len(STEP_FRACTIONS)
    for lr, gamma in pairs:  # εγ/2 is one of the step fractions (to one significant figure)
        assert min(abs(lr * gamma / 2 - k) / k for k in STEP_FRACTIONS) < 0.35
    # given grids are used as given: every ε with every γ
    assert default_grid(model, [10.0, 20.0], [1e-3]) == [(1e-3, 10.0), (1e-3, 20.0)]


def test_weight_rms_refuses_a_model_with_all_zero_weights():
    with pytest.raises(ValueError, match="localizations= and lrs="):
        weight_rms(_model(scale=0.0))


# -- validation before any sampling --------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(lrs=[]), "lrs must hold at least one value"),
    (dict(lrs=[1e-4, -1.0]), "lrs must hold positive finite numbers"),
    (dict(lrs="1e-4"), "lrs must be a sequence"),
    (dict(localizations=[100.0, 100.0]), "localizations must not repeat"),
    (dict(localizations=[float("nan")]), "localizations must hold positive finite numbers"),
    (dict(num_chains=1), "num_chains must be an int ≥ 2"),
    (dict(nbeta=-1.0), "nbeta must be a positive number"),
    (dict(num_draws=0), "num_draws must be a positive int"),
    (dict(seed=None), "seed must be an int"),
])
def test_bad_arguments_are_refused_naming_the_argument_before_any_sampling(monkeypatch, kwargs, match):
    import devinterp_losskernel.estimate as estimate

    def no_sampling(*args, **kw):
        raise AssertionError("sampled before the arguments were checked")

    monkeypatch.setattr(estimate, "estimate_loss_kernel", no_sampling)
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    with pytest.raises(ValueError, match=match):
        calibrate(_model(), loader, (x[:20], y[:20]), **{"nbeta": 10.0, **kwargs})


def test_model_and_loader_types_are_checked():
    x, y = _data()
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        calibrate(lambda v: v, DataLoader(TensorDataset(x, y)), (x, y))
    with pytest.raises(TypeError, match="loader must be a torch DataLoader"):
        calibrate(_model(), [(x, y)], (x, y))


# -- the recommendation ----------------------------------------------------------------------------

def test_recommend_takes_the_loosest_passing_gamma_at_its_smallest_passing_epsilon():
    rows = [_row(1e-3, 10.0, ok=False, problems=["the chains left the basin"]), _row(1e-4, 10.0, ok=False),
            _row(1e-5, 100.0, ok=False), _row(1e-4, 100.0), _row(1e-3, 100.0), _row(1e-3, 1000.0)]
    setting, reason = recommend(rows)
    assert setting == CalibrationSetting(1e-4, 100.0, 10.0)
    assert "loosest localization" in reason and "γ = 10 failed" in reason


def test_recommend_says_why_when_nothing_passed():
    setting, reason = recommend([_row(1e-3, 10.0, ok=False, problems=["not stationary. Raise num_burnin_steps"]),
                                 _row(1e-2, 10.0, ok=False, problems=["a", "b"])])
    assert setting is None and "no setting passed" in reason and "Raise num_burnin_steps" in reason
    setting, reason = recommend([_row(1e-3, 10.0, ok=False, judgeable=False)])
    assert setting is None and "raise num_draws" in reason


def test_result_gives_the_real_run_its_settings_and_refuses_without_a_recommendation():
    rows = [_row(1e-3, 100.0)]
    sizes = dict(num_chains=2, num_draws=50, num_burnin_steps=20, num_steps_bw_draws=1, seed=3)
    result = CalibrationResult(rows, rows[0].setting, "why", sizes)
    sgld = result.sgld(num_chains=8, num_draws=1000)
    assert (sgld.lr, sgld.localization, sgld.nbeta, sgld.num_chains, sgld.num_draws, sgld.seed) == \
        (1e-3, 100.0, 10.0, 8, 1000, 3)
    with pytest.raises(ValueError, match="no setting is recommended: nothing"):
        CalibrationResult(rows, None, "nothing", sizes).sgld()
    assert "**0.001**" in result.to_markdown()


# -- one real sweep --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep():
    if devinterp_major() is None:
        pytest.skip("the sweep samples with devinterp, which is not installed")
    x, y = _data()
    model = _model()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(200):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    result = calibrate(model, loader, (x[:40], y[:40]), lrs=[1e-6, 1e-3], localizations=[100.0], nbeta=30.0,
                       num_chains=2, num_draws=40, num_burnin_steps=20, labels=y[:40], keep_kernels=True,
                       verbose=False)
    after = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    return result, states, after


def test_sweep_runs_every_setting_and_leaves_the_global_generators_alone(sweep):
    result, before, after = sweep
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    assert [row.setting.lr for row in result.rows] == [1e-6, 1e-3]
    for row in result.rows:
        assert row.trace.shape == (2, 40) and np.all(np.isfinite(row.trace))
        # the recorded trace is the kernel's own draws: its mean is the kernel's mean probe loss
        assert row.trace.mean() == pytest.approx(row.numbers["loss_over_draws"], rel=1e-5)
        assert row.judgeable and math.isfinite(row.numbers["ess"])


def test_sweep_flags_the_chain_that_has_not_moved(sweep):
    result, _, _ = sweep
    still, moving = result.rows
    assert not still.ok and any("hardly moved" in p and "Raise lr" in p for p in still.problems)
    assert moving.numbers["loss_over_draws"] > still.numbers["loss_over_draws"]
    assert result.recommended in (None, moving.setting)
    assert result.recommended != still.setting


def test_sweep_table_and_figure(sweep, tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    result, _, _ = sweep
    table = result.table()
    assert isinstance(table, pd.DataFrame) and len(table) == 2
    assert {"lr", "localization", "nbeta", "llc", "loss_at_w_star", "loss_over_draws", "ess", "reliability",
            "ok", "problems"} <= set(table.columns)
    fig = result.figure(tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    assert len(fig.axes) == 2 + 4  # one trace panel per setting, four number panels


def test_draw_recorder_refuses_to_guess_when_a_chain_was_cut_off():
    recorder = calibration._DrawRecorder(lambda model, batch: batch)
    for t in range(3 + 2 * 4):  # three check/reference passes, then 2 chains × 4 draws, n = 5
        recorder(None, torch.full((5,), float(t)))
    draws = recorder.draws(5, 2, {0: 4, 1: 4}, 4)
    assert draws[0][:, 0].tolist() == [3, 4, 5, 6] and draws[1][:, 0].tolist() == [7, 8, 9, 10]
    assert recorder.draws(5, 2, {0: 4, 1: 2}, 4) == {}


def test_refinement_tries_the_gamma_halfway_to_the_looser_one_that_failed():
    rows = [_row(2e-3, 100.0, ok=False), _row(2e-4, 1000.0), _row(2e-5, 1000.0)]
    extra = calibration._refinement(rows, CalibrationSetting(2e-5, 1000.0, 10.0))
    assert [g for _, g in extra] == [300.0, 300.0]  # γ' = √(100·1000) ≈ 300
    assert [lr for lr, _ in extra] == pytest.approx([7e-5, 7e-4])  # κ = εγ/2 of 0.01 and 0.1
    assert calibration._refinement(rows, None) == []
    assert calibration._refinement(rows[1:], CalibrationSetting(2e-4, 1000.0, 10.0)) == []  # nothing looser


def test_a_short_run_short_only_of_reliability_is_usable_but_a_loose_one_is_not():
    rows = [_row(1e-3, 10.0, ok=False), _row(1e-3, 100.0, ok=False)]
    rows[0].usable, rows[1].usable = False, True
    assert recommend(rows)[0] == rows[1].setting


# -- the usable rule leans on the report, on the model's own scale ---------------------------------

def _kernel(x, init, sampler):
    from devinterp_losskernel import loss_kernel
    from devinterp_losskernel.diagnostics import record_from_draws

    chains = {c: torch.from_numpy(x[c]) for c in range(x.shape[0])}
    kernel = loss_kernel([chains[c] for c in sorted(chains)], metadata={"sampler": sampler},
                         init_loss=torch.as_tensor(init), labels=torch.arange(x.shape[2]) % 10)
    kernel.health_record = record_from_draws(chains)
    return kernel


def _losses(seed, shared=0.1, own=0.05, chains=2, length=100, n=60):
    """[chains, length, n]: per-sample levels, a shared AR(1) factor with per-sample loadings
    (heterogeneous variances: log K(x,x) reproducible) and independent noise."""
    rng = np.random.default_rng(seed)
    factor = np.zeros((chains, length))
    for t in range(1, length):
        factor[:, t] = 0.3 * factor[:, t - 1] + rng.standard_normal(chains)
    loading = rng.random(n) * 2
    return (1 + rng.random(n)) + shared * factor[:, :, None] * loading + own * rng.standard_normal((chains, length, n))


SETTLED = {"lr": 2e-6, "nbeta": 500.0, "localization": 4e4, "num_burnin_steps": 50, "num_draws": 100,
           "num_steps_bw_draws": 1}


def test_usable_needs_the_basin_on_the_models_scale_and_a_reproducible_diagonal():
    """The modular transformer's failure: a setting below 0.3× chance whose chains fluctuate far more
    than a basin allows was recommended; now the report's loose-posterior note (fluctuation ratio)
    refuses it, and so does a diagonal log K(x,x) that the short run cannot reproduce."""
    x = 0.15 * _losses(0)  # ≈ 0.23 mean probe loss: 0.1× chance for 10 classes
    inside = _kernel(x, x.mean((0, 1)) - 0.2, SETTLED)
    assert calibration._usable(inside, False)
    out = _kernel(x, x.mean((0, 1)) - 0.002, SETTLED)  # same draws, rise 100× smaller: h ≈ 40
    report = calibration._diagnose(out)
    assert report.ok and report.numbers["chance_fraction"] < 0.3
    assert report.numbers["fluctuation_ratio"] > 5
    assert not calibration._usable(out, False)
    flat = _losses(1, shared=0.0)  # equal per-sample variances: log K(x,x) does not reproduce
    noisy = _kernel(flat, flat.mean((0, 1)) - 0.5, SETTLED)
    assert calibration._diagnose(noisy).numbers["reliability_variance"] < calibration.VARIANCE_RELIABILITY_MIN
    assert not calibration._usable(noisy, False)
    assert not calibration._usable(inside, True)  # a diverged chain


def test_usable_does_not_ask_a_near_zero_loss_model_for_an_absolute_llc():
    """The modular transformer's hand-tuned setting (LLC 0.18, loss 1e-4 at w*) is usable."""
    x = 1e-3 * _losses(2)
    tight = _kernel(x, x.mean((0, 1)) - 4e-4, {**SETTLED, "lr": 6e-7, "localization": 1e6})
    report = calibration._diagnose(tight)
    assert report.numbers["probe_llc"] == pytest.approx(0.2)
    assert report.ok, report  # not "hardly moved": 150 steps at εγ/2 = 0.3 are 45 relaxation times
    assert calibration._usable(tight, False)
