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
