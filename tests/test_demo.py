"""README command 1: ``losskernel demo`` (demo.py and cli.py), at its --quick size."""

import json

import numpy as np
import pytest
import torch

from devinterp_losskernel import LossKernel
from devinterp_losskernel.cli import main
from devinterp_losskernel.demo import DemoConfig, accuracy, digits_with_flipped_labels, flip_labels

from conftest import devinterp_major


def test_digits_relabel_exactly_the_fraction_to_another_class():
    cfg = DemoConfig(num_train=600, flip_fraction=0.2, seed=5)
    x, y_true, y_train, flipped = digits_with_flipped_labels(cfg)
    assert x.shape == (600, 64) and x.dtype == torch.float32
    assert int(flipped.sum()) == 120
    assert torch.equal(y_train != y_true, flipped)  # every flipped label changed, no other did
    assert abs(float(x.mean())) < 0.2 and abs(float(x.std()) - 1.0) < 0.2
    again = digits_with_flipped_labels(cfg)
    assert all(torch.equal(a, b) for a, b in zip((x, y_true, y_train, flipped), again))


def test_flip_labels_draws_as_the_memorization_tutorial_does():
    """demo.py keeps its own copy of the tutorial's relabel (the library imports no tutorial
    code): pinned to losskernel_examples.memorization.relabel's draws at this seed."""
    noisy, flipped = flip_labels(np.arange(12) % 4, 0.25, num_classes=4, seed=3)
    assert noisy.dtype == np.int64 and noisy.tolist() == [3, 1, 1, 3, 0, 1, 2, 3, 2, 1, 2, 3]
    assert np.flatnonzero(flipped).tolist() == [0, 2, 8]
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
        flip_labels(np.arange(4), 1.5, num_classes=4, seed=0)


def test_accuracy_counts_top1_hits():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    assert accuracy(model, x, torch.tensor([0, 1, 1])) == 2 / 3


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    if devinterp_major() is None:
        pytest.skip("the demo samples with devinterp, which is not installed")
    out = tmp_path_factory.mktemp("demo")
    rc = main(["demo", "--quick", "--out", str(out), "--num-chains", "3", "--num-probe", "300"])
    return rc, out


def test_quick_demo_writes_a_kernel_a_summary_and_a_picture(quick_demo, capsys):
    rc, out = quick_demo
    assert rc == 0
    assert {p.name for p in out.iterdir()} >= {"kernel.pt", "summary.json", "correlation.png"}
    summary = json.loads((out / "summary.json").read_text())
    kernel = LossKernel.load(out / "kernel.pt")

    # the command-line overrides reached the run: 3 chains (--num-chains) × 60 draws (--quick)
    assert summary["config"]["num_chains"] == 3 and summary["config"]["num_draws"] == 60
    assert summary["num_draws"] == kernel.num_draws == 180
    assert summary["num_probe"] == kernel.num_samples == 300
    assert summary["train_accuracy_on_noisy_labels"] == 1.0  # the MLP memorized the flipped labels

    # the summary is computed from the saved kernel, not written separately
    variances = np.diag(kernel.covariance.double().numpy())
    assert summary["trace (sum of probe variances)"] == pytest.approx(variances.sum(), rel=1e-6)
    assert np.isfinite(summary["llc/mean (devinterp, minibatch)"])
    assert summary["singular_fluctuation/nu"] > 0
    # even 180 draws rank the memorized samples well above chance
    assert summary["memorization_auc/variance"] > 0.75


@pytest.mark.parametrize("argv, message", [
    (["demo", "--chains", "3"], "unrecognized arguments: --chains"),
    (["demo", "--num-chains", "three"], "argument --num-chains: invalid int value: 'three'"),
])
def test_demo_rejects_bad_options_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_quick_demo_ends_with_the_health_report(quick_demo):
    """The summary, the kernel's metadata and the explorer page carry the run's health report,
    and the page opens on the memorization score, not on the labels its map mixes by design."""
    from devinterp_losskernel.explore import read_explorer

    _, out = quick_demo
    summary = json.loads((out / "summary.json").read_text())
    report = summary["health report"]
    assert list(summary)[-1] == "health report"
    assert set(report) == {"ok", "judgeable", "problems", "notes", "numbers"}
    assert report["numbers"]["probe_loss_draws"] == pytest.approx(summary["mean probe loss/over draws"])
    assert LossKernel.load(out / "kernel.pt").metadata["diagnostics"]["ok"] == report["ok"]
    page = read_explorer(out / "explorer.html")
    assert page["health"]["ok"] == report["ok"] and page["health"]["problems"] == report["problems"]
    assert page["initial"] == "score0" and "same-label" in page["about"]


def test_demo_command_prints_the_health_report_last(monkeypatch, tmp_path, capsys):
    import devinterp_losskernel.cli as cli

    report = {"ok": False, "judgeable": True, "problems": ["poor mixing: take more draws (num_draws)"],
              "notes": [], "numbers": {"ess_per_chain_min": 3.0}}
    monkeypatch.setattr(cli, "run_demo", lambda out, cfg: {"config": {}, "llc": 1.0, "health report": report})
    monkeypatch.setattr(cli, "require_demo_modules", lambda: None)
    assert main(["demo", "--quick", "--out", str(tmp_path / "d")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-3:] == ["health report: PROBLEMS", "  problem: poor mixing: take more draws (num_draws)",
                            "  numbers: ess_per_chain_min=3"]
    assert '"health report"' not in "\n".join(printed)  # shown as sentences, not as JSON
