"""Command line: ``losskernel demo`` runs the embedded default job (no downloads);
``losskernel explore kernel.pt`` writes the interactive kernel explorer (one offline HTML file)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from .demo import DemoConfig, run_demo


def _demo_parser(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="train a memorizing MLP on scikit-learn's digits, run SGLD with the loss-kernel "
             "callback, write kernel.pt, summary.json, correlation.png and explorer.html",
    )
    demo.add_argument("--out", default="losskernel_demo", help="output folder (default: %(default)s)")
    demo.add_argument("--quick", action="store_true", help="a smaller run (2 chains × 60 draws) for smoke tests")
    for f in fields(DemoConfig):
        demo.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None,
                          help=f"(default: {f.default})")


def _explore_parser(sub) -> None:
    ex = sub.add_parser(
        "explore",
        help="write the interactive kernel explorer of a saved kernel: one self-contained, offline HTML file",
        description="Arrays are read from .npy, .npz (first array) or .pt files (torch tensors).",
    )
    ex.add_argument("kernel", help="a kernel file written by LossKernel.save (kernel.pt)")
    ex.add_argument("-o", "--out", default="kernel.html", help="the HTML file to write (default: %(default)s)")
    ex.add_argument("--images", help="[n, H, W] / [n, H, W, C] / [n, C, H, W] images, one per probe sample")
    ex.add_argument("--texts", help="a text file with one line per probe sample (shown on hover)")
    ex.add_argument("--labels", help="[n] integer labels (default: the kernel's)")
    ex.add_argument("--label-names", help="a text file with one class name per line (label i = line i)")
    ex.add_argument("--embedding", help="[n, 2] coordinates (default: UMAP of 1 − R, same-label edges removed)")
    ex.add_argument("--hierarchy", choices=["imagenet", "fashion-mnist"],
                    help="a WordNet hierarchy for paths, colours and search (needs WordNet installed)")
    ex.add_argument("--score", action="append", default=[], metavar="NAME=FILE",
                    help="a per-sample score to colour by (repeatable)")
    ex.add_argument("-k", type=int, default=15, help="neighbours per sample (default: %(default)s)")
    ex.add_argument("--title", help="the page title")
    ex.add_argument("--seed", type=int, default=0, help="UMAP's random_state (default: %(default)s)")


def _read_array(path: str, name: str):
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--{name}: no such file {path!r}")
    if p.suffix == ".npy":
        return np.load(p, allow_pickle=False)
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            return z[z.files[0]]
    if p.suffix in (".pt", ".pth"):
        import torch

        value = torch.load(p, map_location="cpu", weights_only=True)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"--{name}: {path!r} must hold one tensor, got {type(value).__name__}")
        return value.numpy()
    raise ValueError(f"--{name}: {path!r} must be a .npy, .npz or .pt file")


def _run_explore(args) -> str:
    from .explore import explore
    from .kernel import LossKernel

    kernel = LossKernel.load(args.kernel)
    kwargs = {}
    if args.images:
        kwargs["images"] = _read_array(args.images, "images")
    if args.texts:
        kwargs["texts"] = Path(args.texts).read_text(encoding="utf-8").splitlines()
    if args.labels:
        kwargs["labels"] = _read_array(args.labels, "labels")
    if args.label_names:
        kwargs["label_names"] = Path(args.label_names).read_text(encoding="utf-8").splitlines()
    if args.embedding:
        kwargs["embedding"] = _read_array(args.embedding, "embedding")
    if args.hierarchy == "imagenet":
        from .hierarchy import wordnet_imagenet

        kwargs["hierarchy"] = wordnet_imagenet()
    elif args.hierarchy == "fashion-mnist":
        from .hierarchy import fashion_mnist_hierarchy

        kwargs["hierarchy"] = fashion_mnist_hierarchy()
    scores = {}
    for item in args.score:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise ValueError(f"--score must be NAME=FILE, got {item!r}")
        scores[name] = _read_array(file, "score")
    return explore(kernel, scores=scores or None, k=args.k, path=args.out, title=args.title,
                   random_state=args.seed, **kwargs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="losskernel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    _explore_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "demo":
        base = dict(num_chains=2, num_draws=60, num_burnin_steps=40) if args.quick else {}
        given = {f.name: getattr(args, f.name) for f in fields(DemoConfig) if getattr(args, f.name) is not None}
        try:
            cfg = DemoConfig(**{**base, **given})  # validated here, before any training
        except ValueError as error:
            parser.error(str(error))
        summary = run_demo(args.out, cfg)
        print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
        print(f"wrote {args.out}/kernel.pt, {args.out}/summary.json, {args.out}/correlation.png, "
              f"{args.out}/explorer.html")
    elif args.command == "explore":
        try:
            page = _run_explore(args)
        except ValueError as error:
            parser.error(str(error))
        print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
