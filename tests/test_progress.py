"""Progress bars: quiet in a log file, the usual bar on a terminal, devinterp's bars tamed."""
import io
import sys
import types

import pytest

from devinterp_losskernel import progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_python_process_is_not_taken_for_a_notebook():
    assert progress._in_notebook() is False  # else a log file would get the widget's fast updates


def test_a_log_file_gets_rare_updates_not_a_flood(monkeypatch):
    monkeypatch.delenv("LOSSKERNEL_PROGRESS", raising=False)
    monkeypatch.delenv("LOSSKERNEL_PROGRESS_INTERVAL", raising=False)
    log = io.StringIO()
    bar = progress.progress_bar(2000, "loss kernel draws", file=log)
    for _ in range(2000):
        bar.update(1)
    bar.close()
    # tqdm's default would redraw on every update that follows 0.1 s; here: the first and the last line
    assert log.getvalue().count("\r") <= 3
    assert "2000/2000" in log.getvalue()


def test_a_terminal_gets_the_usual_bar_and_the_switch_hides_it(monkeypatch):
    monkeypatch.setattr(progress, "_in_notebook", lambda: False)
    monkeypatch.delenv("LOSSKERNEL_PROGRESS", raising=False)
    assert progress.bar_settings(_Terminal()) == {"mininterval": 0.5}
    assert progress.bar_settings(io.StringIO())["mininterval"] == 60.0
    monkeypatch.setenv("LOSSKERNEL_PROGRESS_INTERVAL", "5")
    assert progress.bar_settings(io.StringIO())["mininterval"] == 5.0
    monkeypatch.setenv("LOSSKERNEL_PROGRESS", "0")
    assert progress.bar_settings(_Terminal()) == {"disable": True}


def test_devinterp_bars_are_patched_inside_and_restored_after(monkeypatch):
    calls = []

    def trange(*args, **kwargs):
        calls.append(kwargs)
        return range(*args)

    fake = types.ModuleType("devinterp.slt.sampler")
    fake.trange = trange
    monkeypatch.setitem(sys.modules, "devinterp.slt.sampler", fake)
    import devinterp.slt as slt
    monkeypatch.setattr(slt, "sampler", fake, raising=False)
    with progress.devinterp_bars(show=False):
        list(fake.trange(0, 3, desc="Chain 0"))
    assert calls[-1]["disable"] is True and calls[-1]["desc"] == "Chain 0"
    assert fake.trange is trange
    monkeypatch.setattr(progress, "_in_notebook", lambda: False)
    with progress.devinterp_bars():
        fake.trange(0, 3)
    assert calls[-1].get("mininterval", 0) >= 0.5


def test_devinterp2_sampler_still_has_the_bar_we_patch():
    """If devinterp renames its trange, devinterp_bars would silently stop working."""
    from devinterp_losskernel.estimate import devinterp_major

    if devinterp_major() != 2:
        pytest.skip("devinterp 2.x only")
    from devinterp.slt import sampler
    assert callable(sampler.trange)


def test_a_run_logged_to_a_file_writes_a_few_lines_not_one_per_draw(capsys, monkeypatch):
    """estimate_loss_kernel's bar (and, under devinterp 2, devinterp's per-chain bars) in a log."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from devinterp_losskernel import estimate_loss_kernel

    monkeypatch.delenv("LOSSKERNEL_PROGRESS", raising=False)
    monkeypatch.delenv("LOSSKERNEL_PROGRESS_INTERVAL", raising=False)
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    model = torch.nn.Linear(4, 2)
    estimate_loss_kernel(model, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True), (x[:16], y[:16]),
                         num_chains=2, num_draws=150, num_burnin_steps=5, lr=1e-4, nbeta=10.0,
                         localization=100.0, seed=0)
    err = capsys.readouterr().err
    assert "loss kernel draws" in err and "300/300" in err
    assert err.count("\r") <= 6, err.count("\r")
    assert "Chain 0" not in err  # devinterp 2's own bars are covered by ours
