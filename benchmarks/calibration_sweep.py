"""The calibration sweep (devinterp_losskernel.calibration.calibrate) on the tutorials' models,
against what the kernel actually gives and against the setting found by hand.

For each model: the default grid (γ from the weight scale, ε from the relaxation rate; nβ as
the tutorial uses it), short chains, one health report per setting; then, from the same
kernels, the number the tutorial judges a kernel by — memorization ROC-AUC of K(x,x) against
the relabelled samples (digits MLP of the README, tutorial 02's MLP), PC1 ROC-AUC between the
tasks (modular arithmetic) — and the same short run at the tutorial's hand-tuned setting.

    python benchmarks/calibration_sweep.py --models digits memorization modular [--no-record]
"""

from __future__ import annotations

import argparse
import time
from math import nan

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from _common import add_common_arguments, append_results, apply_common_arguments, print_table

# the tutorials' hand-tuned settings (tutorials/README.md): (ε, γ, nβ)
HAND = {"digits": (3e-4, 200.0, 100.0), "memorization": (3e-4, 300.0, 100.0), "modular": (6e-7, 1e6, 500.0),
        "fashion_cnn": (3e-4, 200.0, 100.0)}


def digits():
    from devinterp_losskernel.demo import DemoConfig, digits_with_flipped_labels, train_memorizing_mlp

    cfg = DemoConfig()
    x, _, y, flipped = digits_with_flipped_labels(cfg)
    model = train_memorizing_mlp(x, y, cfg)
    loader = DataLoader(TensorDataset(x, y), batch_size=cfg.batch_size, shuffle=True)
    n = 400
    return model, loader, (x[:n], y[:n]), y[:n], ("memorization AUC", flipped[:n].numpy())


def memorization():
    from losskernel_examples.memorization import get_config, memorization_data, train_to_memorization

    cfg = get_config("ci")
    data = memorization_data(cfg, verbose=False)
    trained = train_to_memorization(data, cfg, verbose=False)
    loader = DataLoader(TensorDataset(data.x, data.y_train), batch_size=cfg.sgld_batch_size, shuffle=True)
    n = 500
    return (trained.model, loader, (data.x[:n], data.y_train[:n]), data.y_train[:n],
            ("memorization AUC", data.flipped[:n].numpy()))


def modular():
    from losskernel_examples.modular import load_checkpoint, modular_probe, training_loader

    model, data, _ = load_checkpoint()
    index = modular_probe(data, 300, seed=0)
    probe = (data.inputs[index], data.targets[index])
    # labels: the result tokens, so that the report knows chance (log of the 194-token vocabulary)
    return model, training_loader(data, 128), probe, probe[1], ("PC1 AUC (tasks)", data.task[index].numpy())


def fashion_cnn():
    """A model no tutorial tuned: a small CNN on 2,000 Fashion-MNIST images, 10% relabelled."""
    from losskernel_examples.memorization import load_images, relabel

    pixels, labels, _ = load_images("fashion_mnist", verbose=False)
    rng = np.random.default_rng(0)
    order = np.sort(rng.choice(len(labels), 2000, replace=False))
    noisy, flipped = relabel(labels[order], 0.1, num_classes=10, seed=1)
    x = torch.tensor(pixels[order].reshape(-1, 1, 28, 28), dtype=torch.float32)
    x = torch.nn.functional.avg_pool2d((x - x.mean()) / x.std(), 2)  # 14×14
    y = torch.tensor(noisy)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(32 * 3 * 3, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        train = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)
        for _ in range(60):
            for xb, yb in train:
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
                optimizer.step()
    accuracy = float((model(x).argmax(1) == y).float().mean())
    print(f"fashion CNN: training accuracy on the noisy labels {accuracy:.3f}")
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)
    n = 500
    return model, loader, (x[:n], y[:n]), y[:n], ("memorization AUC", flipped[:n])


MODELS = {"digits": digits, "memorization": memorization, "modular": modular, "fashion_cnn": fashion_cnn}


def truth(kernel, name, target) -> float:
    from devinterp_losskernel.analysis import detection_auc, memorization_scores, pc1_separation

    if name.startswith("PC1"):
        return float(pc1_separation(kernel, target).auc)
    return float(detection_auc(memorization_scores(kernel), np.asarray(target, dtype=bool)))


def run(name: str, args) -> tuple:
    from devinterp_losskernel.calibration import calibrate
    from devinterp_losskernel.estimate import estimate_loss_kernel

    started = time.perf_counter()
    model, loader, probe, labels, (metric, target) = MODELS[name]()
    sizes = dict(num_chains=args.chains, num_draws=args.draws, num_burnin_steps=args.burnin, seed=0)
    lr, gamma, nbeta = HAND[name]
    prepared = time.perf_counter()
    result = calibrate(model, loader, probe, nbeta=nbeta, labels=labels, keep_kernels=True,
                       verbose=not args.quiet, **sizes)
    swept = time.perf_counter()
    hand = estimate_loss_kernel(model, loader, probe, lr=lr, localization=gamma, nbeta=nbeta, labels=labels,
                                verbose=False, **sizes)
    from devinterp_losskernel.calibration import _diagnose, _usable

    hand_report = _diagnose(hand)
    rows = []
    for row in result.rows:
        n = row.numbers
        verdict = "ok" if row.ok else "; ".join(p.split(":")[0].split(". ")[0] for p in row.problems)
        if any(note.startswith("loose posterior") for note in row.notes):
            verdict += " (loose posterior)"
        mark = "**→**" if row.setting == result.recommended else ""
        rows.append([mark, f"{row.setting.lr:.2g}", f"{row.setting.localization:.3g}", f"{n['loss_at_w_star']:.3g}",
                     f"{n['loss_over_draws']:.3g}", f"{n['llc']:.3g}", f"{n.get('report/fluctuation_ratio', nan):.3g}",
                     f"{n['ess']:.3g}", f"{n['reliability']:.2f}", f"{n.get('report/reliability_variance', nan):.2f}",
                     f"{truth(row.kernel, metric, target):.3f}", "yes" if row.usable else "", verdict[:90],
                     f"{row.seconds:.0f}"])
    hn = hand_report.numbers
    rows.append(["hand", f"{lr:.2g}", f"{gamma:.3g}", f"{float(hand.init_loss.mean()):.3g}",
                 f"{float(hand.mean.mean()):.3g}", f"{hand.metadata['llc/mean']:.3g}",
                 f"{hn.get('fluctuation_ratio', nan):.3g}", f"{hn.get('ess_per_chain_min', nan):.3g}",
                 f"{hn.get('reliability_correlation', nan):.2f}", f"{hn.get('reliability_variance', nan):.2f}",
                 f"{truth(hand, metric, target):.3f}", "yes" if _usable(hand, False) else "",
                 "ok" if hand_report.ok else "; ".join(p.split(":")[0] for p in hand_report.problems)[:90], ""])
    headers = ["", "ε", "γ", "loss at w*", "loss over draws", "LLC", "h", "ESS/chain", "reliability R̂",
               "reliability log K(x,x)", metric, "usable", "report", "s"]
    title = (f"{name}: nβ {nbeta:g}, {args.chains} chains × {args.draws} draws after {args.burnin} burn-in, "
             f"sweep {swept - prepared:.0f} s (model and data {prepared - started:.0f} s)")
    table = print_table(headers, rows, title)
    print("recommended:", result.recommended, "\n", result.reason)
    if args.figures:
        result.figure(f"{args.figures}/calibration_{name}.png")
    return title, table, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["digits"])
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--burnin", type=int, default=50)
    parser.add_argument("--figures", help="folder to write calibration_<model>.png to")
    parser.add_argument("--quiet", action="store_true")
    add_common_arguments(parser)
    args = parser.parse_args()
    apply_common_arguments(args)
    sections = []
    for name in args.models:
        title, table, result = run(name, args)
        sections.append(f"**{title}**\n\n{table}\n\nRecommended: {result.reason}\n")
    append_results("Calibration sweep: recommended setting vs the kernel's quality (benchmarks/calibration_sweep.py)",
                   "\n".join(sections), path=args.results, write=not args.no_record)


if __name__ == "__main__":
    main()
