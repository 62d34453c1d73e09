"""estimate_loss_kernel: resumable runs, diverged chains, argument checks."""

import subprocess
import sys
from pathlib import Path

import _resume_run
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from devinterp_losskernel import estimate_loss_kernel, preset
from devinterp_losskernel.estimate import CHECKPOINT_NAME

from _models import DIVERGE, MLP, classification_data, diverging_evaluate, loader_for
from conftest import require_devinterp

HERE = Path(__file__).parent


def test_killed_run_resumes_to_the_same_kernel(tmp_path):
    require_devinterp(1)
    # probe pass 1 is w*; chain c's draws are passes 2+6c … 7+6c: pass 10 is inside chain 1
    proc = subprocess.run([sys.executable, str(HERE / "_resume_run.py"), str(tmp_path), "10",
                           str(tmp_path / "never.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (tmp_path / CHECKPOINT_NAME).exists() and not (tmp_path / "never.pt").exists()
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert sorted(state["progress"]["llc_per_chain"]) == [0], "only chain 0 had finished"

    resumed = _resume_run.run(checkpoint_dir=tmp_path)
    uninterrupted = _resume_run.run()
    assert resumed.num_draws == uninterrupted.num_draws == 18
    assert resumed.draws_per_chain == {0: 6, 1: 6, 2: 6}
    torch.testing.assert_close(resumed.covariance, uninterrupted.covariance, rtol=1e-12, atol=1e-15)
    assert resumed.metadata["llc/per_chain"] == pytest.approx(uninterrupted.metadata["llc/per_chain"])
    # kernel snapshots taken before the kill survive it: the same CKA convergence curve
    assert [t for t, _ in resumed.metadata["cka_convergence"]] == [4, 8, 12, 16]
    np.testing.assert_allclose(resumed.metadata["cka_convergence"], uninterrupted.metadata["cka_convergence"],
                               rtol=1e-10)


def test_checkpoint_with_other_settings_is_refused(tmp_path):
    require_devinterp(1)
    model, loader, probe = _resume_run.problem()
    kwargs = dict(_resume_run.SETTINGS, num_chains=1, num_draws=3)
    estimate_loss_kernel(model, loader, probe, checkpoint_dir=tmp_path, **kwargs)
    with pytest.raises(ValueError, match="checkpoint_dir holds a run with other settings"):
        estimate_loss_kernel(model, loader, probe, checkpoint_dir=tmp_path, **dict(kwargs, lr=2e-3))


def test_diverged_chain_does_not_poison_the_kernel():
    require_devinterp(1)
    torch.manual_seed(0)
    x, y = classification_data(64)
    model = MLP()
    # 2 init-loss batches, 12 steps of chain 0, then chain 1 turns NaN at its 6th step
    DIVERGE.update(calls=0, from_call=2 + 12 + 6)
    with pytest.warns(RuntimeWarning, match="chain 1: devinterp stopped it: NaN .*the chain has diverged"):
        k = estimate_loss_kernel(model, loader_for(x, y), (x[:16], y[:16]), evaluate=diverging_evaluate,
                                 num_chains=2, num_draws=10, num_burnin_steps=2, lr=1e-3,
                                 nbeta=10.0, localization=100.0, seed=0, verbose=False)
    assert torch.isfinite(k.covariance).all()
    # chain 1's 3 draws before the NaN minibatch loss were held back (window 16) and dropped
    assert k.draws_per_chain == {0: 10} and k.rejected_per_chain == {1: 3} and k.num_draws == 10
    assert k.metadata["diverged_chains"] == [1]
    assert k.metadata["llc/per_chain"][1] is None and np.isfinite(k.metadata["llc/mean"])


def test_real_sgld_blow_up_gives_a_clear_error_not_a_kernel_of_huge_numbers():
    # lr 3 with no localization: the mean probe loss passes 100 × (1 + loss at w*) within a
    # few SGLD steps in both chains, so no draw survives (before divergence_tolerance, the
    # finite draws of the blow-up made a kernel with variances up to 1.6e46)
    torch.manual_seed(0)
    x, y = classification_data(64)
    with pytest.warns(RuntimeWarning, match="chain 0: draw .* has mean probe loss .* the chain has diverged"):
        with pytest.raises(ValueError, match=r"only 0 draws were kept: chains \[0, 1\] diverged.*Lower lr"):
            estimate_loss_kernel(MLP(), loader_for(x, y), (x[:16], y[:16]), num_chains=2, num_draws=30,
                                 num_burnin_steps=0, lr=3.0, nbeta=10.0, localization=0.0, seed=0, verbose=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_chains=0), "num_chains must be a positive int"),
    (dict(num_draws=1, num_chains=1), "at least 2"),
    (dict(lr=-1.0), "lr must be a positive number"),
    (dict(localization=-1.0), "localization must be a non-negative number"),
    (dict(num_burnin_steps=-1), "num_burnin_steps"),
    # non-finite values pass `> 0` checks; they must be refused by name, before sampling
    (dict(lr=float("nan")), r"lr must be a positive number \(finite"),
    (dict(nbeta=float("inf")), r"nbeta must be a positive number \(finite"),
    (dict(localization=float("nan")), "localization must be a non-negative number"),
    (dict(num_draws=2.0), "num_draws must be a positive int"),
    (dict(device="cuda:7" if not torch.cuda.is_available() else "nope"), "device must be"),
])
def test_bad_arguments(kwargs, match):
    x, y = classification_data(16)
    base = dict(num_chains=2, num_draws=3, num_burnin_steps=0, lr=1e-3, nbeta=1.0, localization=1.0)
    with pytest.raises(ValueError, match=match):
        estimate_loss_kernel(MLP(), loader_for(x, y), (x, y), **{**base, **kwargs})


def test_presets_match_table_1():
    ma = preset("modular_arithmetic")
    assert (ma.batch_size, ma.num_chains, ma.num_draws, ma.num_burnin_steps) == (512, 30, 800, 200)
    assert (ma.lr, ma.nbeta, ma.localization) == (2e-7, 500.0, 30_000.0)
    inc = preset("inception_imagenet").sampler_kwargs(num_chains=4)
    assert inc == dict(num_chains=4, num_draws=500, num_burnin_steps=100, lr=5e-5, nbeta=20.0, localization=4000.0)
    with pytest.raises(ValueError, match="pass localization="):
        preset("inception_gamma_sweep").sampler_kwargs()
    with pytest.raises(ValueError, match="name must be one of"):
        preset("nope")


# -- resumes that would mix runs, and what a checkpoint must hold -----------------------------
from devinterp_losskernel.provenance import FileIntegrityError, IdentityMismatchError  # noqa: E402


def _small_run(tmp_path, probe=None, **changes):
    model, loader, default_probe = _resume_run.problem()
    kwargs = dict(_resume_run.SETTINGS, num_chains=2, num_draws=3, callback_kwargs=None)
    kwargs.update(changes)
    return estimate_loss_kernel(model, loader, default_probe if probe is None else probe,
                                checkpoint_dir=tmp_path, **kwargs)


@pytest.mark.parametrize("change, field", [
    ("probe", "callback.probe"), ("labels", "callback.labels"), ("rows", "callback.rows"),
    ("dtype", "callback.dtype"), ("seed", "sgld.seed"),
])
def test_resume_with_other_arguments_of_the_same_size_is_refused(tmp_path, change, field):
    model, loader, (x, y) = _resume_run.problem()
    base = dict(labels=y, callback_kwargs=dict(rows=[0, 1, 2]))
    _small_run(tmp_path, **base)
    probe, other = None, dict(base)
    if change == "probe":
        probe = (x.flip(0), y.flip(0))  # the same samples in another order
    elif change == "labels":
        other["labels"] = (y + 1) % 3
    elif change == "rows":
        other["callback_kwargs"] = dict(rows=[0, 1, 3])
    elif change == "dtype":
        other["dtype"] = torch.float32
    else:
        other["seed"] = 12
    with pytest.raises(IdentityMismatchError, match=rf"(?s)other settings.*{field}: checkpoint = .* now = .*delete"):
        _small_run(tmp_path, probe=probe, **other)


def test_a_finished_run_called_again_reports_everything(tmp_path):
    first = _small_run(tmp_path)
    again = _small_run(tmp_path)  # nothing left to sample: everything comes from the checkpoint
    torch.testing.assert_close(again.covariance, first.covariance)
    for key in ("sampler", "probe_llc", "singular_fluctuation", "llc/mean", "llc/per_chain", "settings"):
        assert again.metadata[key] == first.metadata[key], key
    assert again.metadata["sampler"]["nbeta"] == 30.0


def test_seed_none_resumes_with_the_seed_it_drew(tmp_path):
    first = _small_run(tmp_path, seed=None)
    again = _small_run(tmp_path, seed=None)
    assert again.metadata["settings"]["seed"] == first.metadata["settings"]["seed"]
    torch.testing.assert_close(again.covariance, first.covariance)


def test_a_damaged_checkpoint_is_refused_by_name(tmp_path):
    _small_run(tmp_path)
    path = tmp_path / CHECKPOINT_NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(FileIntegrityError, match=CHECKPOINT_NAME):
        _small_run(tmp_path)


def test_bad_labels_fail_before_any_sampling():
    x, y = classification_data(16)
    calls = {"n": 0}

    def evaluate(model, batch):
        calls["n"] += 1
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    with pytest.raises(ValueError, match="labels must have one entry per probe sample"):
        estimate_loss_kernel(MLP(), loader_for(x, y), (x, y), labels=y[:3], evaluate=evaluate, num_chains=2,
                             num_draws=3, num_burnin_steps=0, lr=1e-3, nbeta=1.0, localization=1.0)
    assert calls["n"] == 0


@pytest.mark.parametrize("change", ["model", "loss_fn", "evaluate", "data"])
def test_resume_with_another_model_loss_or_data_is_refused(tmp_path, change):
    model, loader, probe = _resume_run.problem()
    kwargs = dict(_resume_run.SETTINGS, num_chains=2, num_draws=3, callback_kwargs=None)
    estimate_loss_kernel(model, loader, probe, checkpoint_dir=tmp_path, **kwargs)
    x, y = loader.dataset.tensors
    if change == "model":
        with torch.no_grad():
            model.net[0].weight.add_(0.01)
    elif change == "loss_fn":
        kwargs["loss_fn"] = lambda m, b: 2 * torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
    elif change == "evaluate":
        kwargs["evaluate"] = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]) + 0.1
    else:
        loader = loader_for(x + 0.01, y)
    with pytest.raises(IdentityMismatchError, match=r"(?s)other settings.*run\.[^:\n]+: checkpoint = "):
        estimate_loss_kernel(model, loader, probe, checkpoint_dir=tmp_path, **kwargs)


def test_checkpoint_dir_that_is_a_file_and_colliding_callback_kwargs_fail_first(tmp_path):
    model, loader, probe = _resume_run.problem()
    kwargs = dict(_resume_run.SETTINGS, num_chains=2, num_draws=3, callback_kwargs=None)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="checkpoint_dir must be a folder"):
        estimate_loss_kernel(model, loader, probe, checkpoint_dir=tmp_path / "notes.txt", **kwargs)
    with pytest.raises(ValueError, match=r"callback_kwargs must not hold \['num_draws'\]"):
        estimate_loss_kernel(model, loader, probe, **dict(kwargs, callback_kwargs=dict(num_draws=10)))
    with pytest.raises(ValueError, match="evaluate must return the minibatch loss as a scalar"):
        estimate_loss_kernel(model, loader, probe, **dict(
            kwargs, evaluate=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")))
    with pytest.raises(ValueError, match="non-finite minibatch loss at w"):
        estimate_loss_kernel(model, loader, probe, **dict(kwargs, evaluate=lambda m, b: m(b[0]).sum() * float("nan")))


def test_a_checkpoint_from_before_the_draw_schedule_was_recorded_is_refused(tmp_path):
    """A checkpoint whose draws were taken on another schedule (older versions ran devinterp 2
    chains on 1.x's) must not be continued on the current one."""
    from devinterp_losskernel.estimate import CHECKPOINT_FORMAT, DRAW_SCHEDULES, devinterp_major
    from devinterp_losskernel.provenance import load_verified, save_verified

    _small_run(tmp_path, num_steps_bw_draws=3)
    path = tmp_path / CHECKPOINT_NAME
    saved = load_verified(path, kind=CHECKPOINT_FORMAT)
    assert saved["arguments"]["draw_schedule"] == DRAW_SCHEDULES[devinterp_major()]
    del saved["arguments"]["draw_schedule"]
    save_verified(saved, path)
    with pytest.raises(IdentityMismatchError, match=r"draw_schedule: checkpoint = None"):
        _small_run(tmp_path, num_steps_bw_draws=3)


def test_the_sgld_settings_come_as_one_record_or_by_name_not_both():
    from devinterp_losskernel import SGLDSettings, preset

    model = MLP()
    x, y = classification_data(32)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    record = SGLDSettings(None, 2, 3, 1, 1e-3, 10.0, 100.0, seed=0)
    kernel = estimate_loss_kernel(model, loader, (x[:10], y[:10]), record, verbose=False)
    by_name = estimate_loss_kernel(model, loader, (x[:10], y[:10]), num_chains=2, num_draws=3, num_burnin_steps=1,
                                   lr=1e-3, nbeta=10.0, localization=100.0, seed=0, verbose=False)
    assert torch.equal(kernel.covariance, by_name.covariance)
    assert kernel.metadata["sgld"]["batch_size"] == 8  # the loader's m, recorded
    with pytest.raises(TypeError, match="either as sgld=SGLDSettings"):
        estimate_loss_kernel(model, loader, x[:10], record, lr=1e-3)
    with pytest.raises(TypeError, match=r"needs the SGLD settings \['localization'\]"):
        estimate_loss_kernel(model, loader, x[:10], num_chains=2, num_draws=3, num_burnin_steps=1, lr=1e-3, nbeta=1.0)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['nbta'\\]"):
        estimate_loss_kernel(model, loader, x[:10], num_chains=2, num_draws=3, num_burnin_steps=1, lr=1e-3,
                             nbta=1.0, localization=1.0)
    with pytest.raises(ValueError, match="localization must be set"):
        estimate_loss_kernel(model, loader, x[:10], preset("inception_gamma_sweep"))


# -- mode="minibatch": no probe, the SGLD minibatches' own losses (issue 19) -----------------------
MB = dict(num_chains=2, num_draws=6, num_burnin_steps=2, num_steps_bw_draws=2, lr=1e-3, nbeta=10.0,
          localization=100.0, seed=3)
N_MB, BS_MB = 40, 8


def _indexed_data():
    """x[:, 0] is the sample's index, so a logging loss_fn knows which samples a batch holds."""
    x, y = classification_data(N_MB)
    x[:, 0] = torch.arange(N_MB, dtype=x.dtype)
    return x, y


class LoggingLoss:
    """Per-sample cross-entropy that logs every SGLD-step call (grad on; the w* batches run under no_grad)."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, batch):
        x, y = batch
        losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        if torch.is_grad_enabled():
            self.calls.append((x[:, 0].long().tolist(), losses.detach().double().tolist()))
        return losses


def test_minibatch_mode_is_every_post_burn_in_step_of_every_chain_beside_devinterps_llc():
    from devinterp_losskernel.analysis import (
        detection_auc,
        label_issue_scores,
        memorization_scores,
        singular_fluctuation,
    )

    x, y = _indexed_data()
    torch.manual_seed(0)
    model, log = MLP(), LoggingLoss()
    before = torch.get_rng_state()
    with pytest.warns(RuntimeWarning, match="no score"):  # few visits: some samples have no variance
        kernel = estimate_loss_kernel(model, loader_for(x, y, batch_size=BS_MB), None, mode="minibatch",
                                      loss_fn=log, labels=y, verbose=False, **MB)
        auc = detection_auc(memorization_scores(kernel), np.arange(N_MB) % 5 == 0)
    assert torch.equal(torch.get_rng_state(), before)
    assert kernel.metadata["mode"] == "minibatch" and kernel.is_diagonal and kernel.init_loss is None

    # the float64 reference: per chain, its steps after burn-in (chains run one after another)
    steps = len(log.calls) // MB["num_chains"]
    values = [[] for _ in range(N_MB)]
    for chain in range(MB["num_chains"]):
        for indices, losses in log.calls[chain * steps + MB["num_burnin_steps"]:(chain + 1) * steps]:
            for i, v in zip(indices, losses):
                values[i].append(v)
    reference = np.array([np.var(v, ddof=1) if len(v) > 1 else np.nan for v in values])
    np.testing.assert_allclose(kernel.variance.numpy(), reference, rtol=1e-10, equal_nan=True)
    assert kernel.visits.tolist() == [len(v) for v in values]
    assert int(kernel.visits.sum()) == MB["num_chains"] * (steps - MB["num_burnin_steps"]) * BS_MB
    assert kernel.metadata["unseen"] == int(np.isnan(reference).sum()) > 0
    assert kernel.draws_per_chain == {0: steps - MB["num_burnin_steps"], 1: steps - MB["num_burnin_steps"]}

    # ν: the recorder's and the analysis's agree (one rule: the seen samples, extrapolated to all N)
    nu = MB["nbeta"] / 2 * np.nanmean(reference)
    assert kernel.metadata["singular_fluctuation"] == pytest.approx(nu, rel=1e-10)
    f = singular_fluctuation(kernel)
    assert f.nu == pytest.approx(nu, rel=1e-10) and f.unseen == kernel.metadata["unseen"]
    assert f.method == "extrapolated" and "Watanabe" in kernel.metadata["singular_fluctuation_meaning"]
    assert np.isfinite(kernel.metadata["singular_fluctuation_se"])
    assert np.isfinite(kernel.metadata["llc/mean"]) and len(kernel.metadata["llc/per_chain"]) == 2
    assert kernel.metadata["settings"]["num_train"] == N_MB and "replacement" in kernel.metadata["minibatch_sampler"]
    assert kernel.metadata["allow_train_mode_noise"] is False and kernel.metadata["loss_scale"] == 1.0

    # the analyses take it unchanged: NaN where there is no variance, AUC over the others
    scores = memorization_scores(kernel)
    assert np.array_equal(np.isnan(scores), np.isnan(reference)) and 0 <= auc <= 1
    issues = label_issue_scores(kernel)
    assert set(issues) == {"posterior mean loss", "variance"}
    assert np.array_equal(np.isnan(issues["posterior mean loss"]), kernel.visits.numpy() == 0)
    pytest.importorskip("xarray")
    ds = kernel.to_xarray()
    assert ds.visits.values.tolist() == kernel.visits.tolist() and np.isnan(ds.variance.values).sum() > 0


def test_minibatch_mode_draws_its_own_batches_with_replacement_from_its_own_generator():
    from devinterp_losskernel.minibatch import loader_with_replacement

    x, y = _indexed_data()
    loader = loader_for(x, y, batch_size=BS_MB)
    before = torch.get_rng_state()
    first = [b for _, b in zip(range(20), loader_with_replacement(loader, seed=5))]
    again = [b for _, b in zip(range(20), loader_with_replacement(loader, seed=5))]
    assert torch.equal(torch.get_rng_state(), before)
    indices = torch.cat([i for i, _ in first])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert torch.equal(first[0][1][0][:, 0].long(), first[0][0])  # (indices, the loader's own batch)
    assert any(len(set(i.tolist())) < len(i) for i, _ in first) or len(set(indices.tolist())) < len(indices)


@pytest.mark.parametrize("model, kwargs, match", [
    (MLP(), dict(probe="x"), "probe must be None for mode='minibatch'"),
    (MLP(), dict(evaluate=lambda m, b: 0), "evaluate is not used with mode='minibatch'"),
    (MLP(), dict(callback_kwargs={}), "callback_kwargs is not used"),
    (MLP(), dict(loss_scale=0.0), "loss_scale must be a positive finite number"),
    (MLP(), dict(labels=[0, 1]), "labels"),
    (MLP(dropout=0.1), {}, r"Dropout, p=0.1.*allow_train_mode_noise=True"),
    (MLP(batchnorm=True), {}, "BatchNorm1d: batch statistics"),
    (torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.MultiheadAttention(3, 1, dropout=0.2)), {},
     r"MultiheadAttention, dropout=0.2"),
    (MLP(), dict(allow_train_mode_noise="yes"), "allow_train_mode_noise must be True or False"),
])
def test_minibatch_mode_refuses_before_sampling(model, kwargs, match):
    x, y = _indexed_data()
    probe = kwargs.pop("probe", None)
    log = LoggingLoss()
    with pytest.raises((ValueError, TypeError), match=match):
        estimate_loss_kernel(model, loader_for(x, y, batch_size=BS_MB), probe, mode="minibatch", loss_fn=log,
                             **kwargs, **MB)
    assert log.calls == []  # nothing was sampled


def test_minibatch_mode_on_a_noisy_model_needs_the_opt_in_and_records_it():
    x, y = _indexed_data()
    torch.manual_seed(0)
    kernel = estimate_loss_kernel(MLP(dropout=0.1), loader_for(x, y, batch_size=BS_MB), None, mode="minibatch",
                                  allow_train_mode_noise=True, loss_scale=2.0, verbose=False, **MB)
    assert kernel.metadata["allow_train_mode_noise"] is True and "Dropout" in kernel.metadata["train_mode_noise"]
    assert kernel.metadata["loss_scale"] == 2.0
    with pytest.raises(ValueError, match="allow_train_mode_noise is for mode='minibatch' only"):
        estimate_loss_kernel(MLP(), loader_for(x, y), (x, y), allow_train_mode_noise=True, **MB)
    with pytest.raises(ValueError, match="probe must be given for mode='full'"):
        estimate_loss_kernel(MLP(), loader_for(x, y), None, **MB)


# -- train_variance=True: the probe kernel and the training set's minibatch variances, one run (issue 19) --
def _replacement_loader(x, y, batch_size=BS_MB):
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=batch_size, sampler=torch.utils.data.RandomSampler(data, replacement=True))


def _post_burn_in_reference(calls, num_chains, burn_in):
    """Per-sample float64 variances of the SGLD steps' logged losses after burn-in, per chain."""
    steps = len(calls) // num_chains
    values = [[] for _ in range(N_MB)]
    for chain in range(num_chains):
        for indices, losses in calls[chain * steps + burn_in:(chain + 1) * steps]:
            for i, v in zip(indices, losses):
                values[i].append(v)
    return np.array([np.var(v, ddof=1) if len(v) > 1 else np.nan for v in values]), [len(v) for v in values], steps


def test_train_variance_folds_the_same_chains_minibatches_beside_an_unchanged_probe_kernel(tmp_path):
    from devinterp_losskernel.estimate import train_kernel

    x, y = _indexed_data()
    torch.manual_seed(0)
    model = MLP()
    plain_log, log = LoggingLoss(), LoggingLoss()
    plain = estimate_loss_kernel(model, _replacement_loader(x, y), (x[:12], y[:12]), loss_fn=plain_log,
                                 verbose=False, **MB)
    before = torch.get_rng_state()
    kernel = estimate_loss_kernel(model, _replacement_loader(x, y), (x[:12], y[:12]), loss_fn=log,
                                  train_variance=True, verbose=False, **MB)
    assert torch.equal(torch.get_rng_state(), before)
    # the same chains, bit for bit: the probe kernel, devinterp's LLC and every SGLD minibatch loss
    assert torch.equal(kernel.covariance, plain.covariance) and torch.equal(kernel.mean, plain.mean)
    assert kernel.metadata["llc/per_chain"] == plain.metadata["llc/per_chain"]
    assert kernel.metadata["probe_llc"] == plain.metadata["probe_llc"]
    assert "train_kernel" not in plain.metadata  # (devinterp 1 pickles the plain run's evaluate: its log is a copy's)

    reference, visits, steps = _post_burn_in_reference(log.calls, MB["num_chains"], MB["num_burnin_steps"])
    train = train_kernel(kernel)
    assert train.metadata["mode"] == "minibatch" and train.is_diagonal and train.num_samples == N_MB
    np.testing.assert_allclose(train.variance.numpy(), reference, rtol=1e-10, equal_nan=True)
    assert train.visits.tolist() == visits
    assert train.draws_per_chain == {0: steps - MB["num_burnin_steps"], 1: steps - MB["num_burnin_steps"]}
    nu = MB["nbeta"] / 2 * np.nanmean(reference)
    assert kernel.metadata["train_singular_fluctuation"] == pytest.approx(nu, rel=1e-10)
    assert kernel.metadata["train_singular_fluctuation"] == train.metadata["singular_fluctuation"]
    assert kernel.metadata["train_unseen"] == int(np.isnan(reference).sum())
    assert kernel.metadata["train_minibatch_sampler"] == "with replacement"
    assert train.metadata["llc/per_chain"] == kernel.metadata["llc/per_chain"]

    # it survives save/load with the probe kernel
    loaded = train_kernel(type(kernel).load(kernel.save(tmp_path / "k.pt")))
    assert torch.equal(loaded.variance.nan_to_num(-1), train.variance.nan_to_num(-1))
    assert torch.equal(loaded.visits, train.visits) and loaded.metadata == train.metadata
    with pytest.raises(ValueError, match="train_variance=True"):
        train_kernel(plain)


@pytest.mark.parametrize("mode, extra", [("diagonal", {}), ("combined", dict(callback_kwargs=dict(rows=[0, 3, 5])))])
def test_train_variance_with_a_shuffling_loader_warns_and_works_in_the_other_probe_modes(mode, extra):
    from devinterp_losskernel.estimate import train_kernel

    x, y = _indexed_data()
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match=r"train_variance=True\): the training loader draws .* RandomSampler, not "
                                            "with replacement"):
        kernel = estimate_loss_kernel(MLP(), loader_for(x, y, batch_size=BS_MB), (x, y), mode=mode,
                                      train_variance=True, verbose=False, **extra, **MB)
    assert kernel.metadata["train_minibatch_sampler"] == "RandomSampler"
    train = train_kernel(kernel)
    assert int(train.visits.sum()) == sum(train.draws_per_chain.values()) * BS_MB
    assert np.isfinite(kernel.metadata["train_singular_fluctuation"])
    pytest.importorskip("xarray")
    back = train_kernel(type(kernel).from_xarray(kernel.to_xarray()))
    assert back.visits.tolist() == train.visits.tolist()
    np.testing.assert_array_equal(back.variance.numpy(), train.variance.numpy())


@pytest.mark.parametrize("model, kwargs, match", [
    (MLP(), dict(train_variance="yes"), "train_variance must be True or False"),
    (MLP(), dict(train_variance=True, mode="minibatch", probe=None), "train_variance=True is for the probe modes"),
    (MLP(), dict(train_variance=True, evaluate=lambda m, b: 0), "train_variance=True does not take evaluate"),
    (MLP(), dict(train_variance=True, checkpoint_dir="unused"), "train_variance=True does not take checkpoint_dir"),
    (MLP(), dict(train_variance=True, batch_size=None), "train_variance=True needs a loader that batches"),
    (MLP(dropout=0.1), dict(train_variance=True), r"train_variance=True\): .*Dropout, p=0.1"),
    (MLP(), dict(allow_train_mode_noise=True), r"allow_train_mode_noise is for mode='minibatch' only \(or "
                                               "train_variance=True\\)"),
])
def test_train_variance_is_refused_before_sampling(tmp_path, model, kwargs, match):
    x, y = _indexed_data()
    probe = kwargs.pop("probe", (x[:8], y[:8]))
    loader = DataLoader(TensorDataset(x, y), batch_size=kwargs.pop("batch_size", BS_MB))
    if kwargs.get("checkpoint_dir"):
        kwargs["checkpoint_dir"] = tmp_path
    log = LoggingLoss()
    with pytest.raises((ValueError, TypeError), match=match):
        estimate_loss_kernel(model, loader, probe, loss_fn=log, **kwargs, **MB)
    assert log.calls == []  # nothing was sampled


def test_minibatch_mode_shows_the_progress_bar_and_the_same_numbers(capsys, monkeypatch):
    monkeypatch.delenv("LOSSKERNEL_PROGRESS", raising=False)
    monkeypatch.delenv("LOSSKERNEL_PROGRESS_INTERVAL", raising=False)
    x, y = _indexed_data()
    torch.manual_seed(0)
    model = MLP()
    runs = {}
    for verbose in (False, True):
        runs[verbose] = estimate_loss_kernel(model, loader_for(x, y, batch_size=BS_MB), None, mode="minibatch",
                                             verbose=verbose, **MB)
    err = capsys.readouterr().err
    total = MB["num_chains"] * MB["num_draws"]
    assert "minibatch variance draws" in err and f"{total}/{total}" in err and "nu=" in err and "visits=" in err
    assert torch.equal(runs[True].variance.nan_to_num(-1), runs[False].variance.nan_to_num(-1))
    assert runs[True].metadata["singular_fluctuation"] == runs[False].metadata["singular_fluctuation"]
