"""The health report against runs whose quality is known (issue 22): where the thresholds of
``devinterp_losskernel.diagnostics`` come from.

The README's digits MLP (its first recipe: 64-256-10, 10% of the labels flipped, Adam 400 full-batch
steps), 400-sample probe, devinterp's SGLD through ``estimate_loss_kernel`` with nβ 100, γ 200,
4 chains × 200 draws after 50 burn-in steps, seed 0, at ε = 3e-4 (the README's), 3e-3, 1e-2 and
1e-6, and the README's ε with 2 chains × 8 draws; then tutorial 02's loose posterior (its
Fashion-MNIST MLP on 2,000 images, ε 3e-4, nβ 100, γ = 20, 4 × 300 draws after 100 burn-in
steps; ``--no-tutorial02`` leaves it out, it needs the Fashion-MNIST files and ~3–6 min;
``--tutorial02-gammas 200 20`` adds its default γ = 200). For each run: the mean probe loss at w* and over the draws, devinterp's LLC, the
memorization ROC-AUC of K(x,x) for the flipped labels, the report's numbers and its verdict.

    python benchmarks/health_report.py --threads 1            # prints the table, appends to RESULTS.md
    python benchmarks/health_report.py --no-tutorial02 --no-record
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import replace

import _common

CONFIGS = [  # name, changes to the README's settings
    ("ε 3e-4 (README)", {}),
    ("ε 3e-3", dict(lr=3e-3)),
    ("ε 1e-2", dict(lr=1e-2)),
    ("ε 1e-6", dict(lr=1e-6)),
    ("2 × 8 draws", dict(num_chains=2, num_draws=8)),
    ("γ 20 (digits)", dict(localization=20.0)),
]
README_SGLD = dict(lr=3e-4, nbeta=100.0, localization=200.0, num_chains=4, num_draws=200, num_burnin_steps=50,
                   seed=0)


def readme_model():
    """The README's first block: the digits MLP, its loader, the 400-sample probe and the flips."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    flipped = torch.rand(len(y)) < 0.1
    y[flipped] = (y[flipped] + torch.randint(1, 10, (int(flipped.sum()),))) % 10
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    return model, loader, (x[:400], y[:400]), flipped[:400]


def row(name, kernel, flipped, seconds):
    from devinterp_losskernel.analysis import detection_auc

    report = kernel.diagnostics()
    num = report.numbers
    fmt = lambda key, spec=".3g": "–" if key not in num else format(num[key], spec)  # noqa: E731
    llc = kernel.metadata.get("llc/mean")
    verdict = "OK" if report.ok else "not judgeable" if not report.judgeable else "problems"
    cells = [name, f"{num['probe_loss_w_star']:.3g} → {num['probe_loss_draws']:.3g}",
             "–" if llc is None else f"{llc:.3g}", f"{detection_auc(kernel.variance.numpy(), flipped.numpy()):.3f}",
             fmt("step_localization", ".2g"), fmt("trend_z_max", ".2f"), fmt("split_rhat", ".3f"),
             fmt("ess_per_chain_min", ".1f"), fmt("autocorrelation_time_max", ".1f"),
             fmt("reliability_variance", ".2f"), fmt("reliability_correlation", ".2f"),
             fmt("draws_for_target_reliability", ".0f"), verdict, f"{seconds:.0f}"]
    sentences = [f"- **{name}** ({verdict}): " + " / ".join(
        [f"problem: {p}" for p in report.problems] + [f"note: {s}" for s in report.notes])]
    return cells, sentences


HEADERS = ["run", "probe loss w* → draws", "devinterp LLC", "memorization AUC", "εγ/2", "trend |z| max",
           "split-R̂", "ESS/chain min", "τ max", "reliability log K(x,x)", "reliability R̂",
           "draws for 0.9", "verdict", "s"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-tutorial02", action="store_true", help="leave out tutorial 02's γ = 20 runs")
    parser.add_argument("--tutorial02-gammas", nargs="+", type=float, default=[20.0],
                        help="tutorial 02's localizations to run (default: its loose γ = 20)")
    parser.add_argument("--only", nargs="*", default=None, help="names of the digits runs to do (default: all)")
    _common.add_common_arguments(parser)
    args = parser.parse_args(argv)
    _common.apply_common_arguments(args)
    from devinterp_losskernel import estimate_loss_kernel

    warnings.simplefilter("ignore", RuntimeWarning)  # the drift warnings of the bad settings are expected
    model, loader, probe, flipped = readme_model()
    rows, sentences = [], []
    for name, changes in CONFIGS:
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        kernel = estimate_loss_kernel(model, loader, probe, labels=probe[1], verbose=False,
                                      **{**README_SGLD, **changes})
        cells, text = row(name, kernel, flipped, time.perf_counter() - started)
        rows.append(cells)
        sentences += text
        print(" | ".join(cells), flush=True)
    if not args.no_tutorial02:
        from losskernel_examples import memorization as task

        cfg = task.get_config("full", num_train=2000, seed=0)
        data = task.memorization_data(cfg, verbose=False)
        trained = task.train_to_memorization(data, cfg, verbose=False).model
        for gamma in args.tutorial02_gammas:
            started = time.perf_counter()
            run = replace(cfg, localization=gamma, num_chains=4, num_draws=300)
            kernel = task.sample_kernel(trained, data, run, device="cpu", verbose=False)
            cells, text = row(f"tutorial 02, γ {gamma:g} ({data.dataset}, 2,000 images, 4 × 300)", kernel,
                              data.flipped, time.perf_counter() - started)
            rows.append(cells)
            sentences += text
            print(" | ".join(cells), flush=True)
    table = _common.print_table(HEADERS, rows, "health report against known runs")
    print("\n".join(sentences))
    body = (table + "\n\nThe report's sentences:\n\n" + "\n".join(sentences) + "\n\n"
            "reliability: split-half correlation (even vs odd chains) of log K̂(x,x) over the probe and of R̂ "
            "over 64 evenly spaced rows × all columns, projected to all draws (Spearman–Brown); draws for 0.9: "
            "the draws in all that would bring R̂'s to 0.9. ESS and τ: Geyer's initial positive sequence on "
            "each chain's mean-probe-loss trace; trend: last third − first third of a chain in standard errors.")
    if not args.no_record:
        _common.append_results("Health report against known runs (issue 22)", body, path=args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
