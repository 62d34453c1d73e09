"""Probe-pass throughput: which of the fast-path options pays on this machine.

The probe pass (n forward passes per draw) is the cost a loss kernel cannot avoid, so its
options are measured here through the library's own path, ``evaluate_probe_losses``:

- float32 (plain, NCHW);
- ``channels_last=True`` (model weights and image batches in NHWC layout);
- ``autocast_dtype=torch.bfloat16`` (losses returned in float32, accumulated in float64);
- both.

Each variant reports images/s (the fastest of ``--repeat`` timed passes after one warm-up),
its speed relative to float32, and the largest change of a per-sample loss against the
float32 pass (so the price of bf16 is visible next to its gain). The probe is kept on the
device (``ProbeSet`` caches it), as in a real run.

Models: a small CNN on 28×28 grey images (the Fashion-MNIST tutorial's size) and, when
torchvision is installed, GoogLeNet (Inception-v1, untrained) at ``--image`` pixels.

    .venv3/bin/python benchmarks/probe_throughput.py                      # CPU, ~3 min
    python benchmarks/probe_throughput.py --device cuda --image 256 --images 2048
"""

from __future__ import annotations

import argparse
import importlib.util

import torch
from torch import nn

from devinterp_losskernel.probe import ProbeSet, evaluate_probe_losses

import _common  # noqa: F401  (puts src/ on sys.path)
from _common import add_common_arguments, append_results, apply_common_arguments, print_table, time_call

VARIANTS = [
    ("float32", None, False),
    ("channels_last", None, True),
    ("bf16 autocast", torch.bfloat16, False),
    ("bf16 autocast + channels_last", torch.bfloat16, True),
]


def small_cnn(classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, classes),
    )


def googlenet() -> nn.Module:
    import torchvision

    return torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)


def measure_model(name, build, shape, classes, args, device):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, *shape, generator=g).to(device)
    labels = torch.randint(0, classes, (args.images,), generator=g).to(device)
    reference, base_rate, rows = None, None, []
    for label, autocast, channels_last in VARIANTS:
        if autocast is not None and args.no_bf16:
            continue
        torch.manual_seed(0)
        model = build().to(device).eval()
        probe = ProbeSet((images, labels), batch_size=args.batch_size)

        def run():
            return evaluate_probe_losses(model, probe, autocast_dtype=autocast, channels_last=channels_last)

        losses = run()
        times = time_call(run, repeat=args.repeat, warmup=1, device=device)
        rate = args.images / min(times)  # the fastest pass: other jobs only ever add time
        if reference is None:
            reference, base_rate = losses.double(), rate
        delta = float((losses.double() - reference).abs().max())
        rows.append([name, label, args.batch_size, f"{rate:,.0f}", f"{rate / base_rate:.2f}", f"{delta:.1e}"])
        print("  ".join(str(c) for c in rows[-1]), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=512, help="probe images per pass")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image", type=int, default=128, help="GoogLeNet input size (paper: 256)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast variants")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    apply_common_arguments(args)
    device = torch.device(args.device)

    rows = measure_model("small CNN 28×28", small_cnn, (1, 28, 28), 10, args, device)
    if importlib.util.find_spec("torchvision") is not None:
        rows += measure_model(f"GoogLeNet {args.image}×{args.image}", googlenet,
                              (3, args.image, args.image), 1000, args, device)
    else:
        print("torchvision is not installed: GoogLeNet skipped")
    headers = ["model", "variant", "probe batch", "images/s", "vs float32", "max |Δℓ| vs float32"]
    table = print_table(headers, rows, title="Probe-pass throughput")
    notes = (
        f"Device: {device}. {args.images} random images per pass, probe batch {args.batch_size}, "
        f"torch threads {torch.get_num_threads()}, fastest of {args.repeat} passes after one warm-up, through evaluate_probe_losses (eval mode, "
        "inference mode, probe cached on the device). Untrained weights (speed does not depend "
        "on them). 'max |Δℓ|' is the largest per-sample loss change against the float32 pass."
    )
    append_results("Probe-pass throughput (benchmarks/probe_throughput.py)", table + "\n\n" + notes + "\n",
                   path=args.results, write=not args.no_record)


if __name__ == "__main__":
    main()
