"""Command line: ``losskernel demo`` runs the embedded default job (no downloads)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from .demo import DemoConfig, run_demo


def _demo_parser(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="train a memorizing MLP on scikit-learn's digits, run SGLD with the loss-kernel "
             "callback, write kernel.pt, summary.json and correlation.png",
    )
    demo.add_argument("--out", default="losskernel_demo", help="output folder (default: %(default)s)")
    demo.add_argument("--quick", action="store_true", help="a smaller run (2 chains × 60 draws) for smoke tests")
    for f in fields(DemoConfig):
        demo.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None,
                          help=f"(default: {f.default})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="losskernel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
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
        print(f"wrote {args.out}/kernel.pt, {args.out}/summary.json, {args.out}/correlation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
