"""Command line: ``losskernel demo`` runs the embedded default job (no downloads);
``losskernel explore kernel.pt`` writes the interactive kernel explorer (one offline HTML file)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import List, Optional, Tuple

from .demo import DemoConfig, require_demo_modules, run_demo
from .hierarchy import WordNetNotFoundError

# what a bad command line raises inside the package: each message names the argument or file
_USER_ERRORS = (ValueError, TypeError, WordNetNotFoundError)


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int ≥ {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an int ≥ {low}, got {value}")
    return value


def _demo_parser(sub) -> argparse.ArgumentParser:
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
    return demo


def _explore_parser(sub) -> argparse.ArgumentParser:
    ex = sub.add_parser(
        "explore",
        help="write the interactive kernel explorer of a saved kernel: one self-contained, offline HTML file",
        description="Arrays are read from .npy, .npz (holding one array) or .pt files (one torch tensor); "
                    "texts and label names from UTF-8 text files, one line per entry. The output must not "
                    "be one of the inputs and must be in an existing folder.",
    )
    ex.add_argument("kernel", help="a kernel file written by LossKernel.save (kernel.pt)")
    ex.add_argument("-o", "--out", default="kernel.html", help="the HTML file to write (default: %(default)s)")
    ex.add_argument("--images", help="[n, H, W] / [n, H, W, C] / [n, C, H, W] images, one per probe sample")
    ex.add_argument("--image-layout", choices=["NHWC", "NCHW"],
                    help="the layout of --images when the shape leaves it open (e.g. [n, 3, 4, 4])")
    ex.add_argument("--texts", help="a text file with one line per probe sample (shown on hover)")
    ex.add_argument("--labels", help="[n] integer labels (default: the kernel's)")
    ex.add_argument("--label-names", help="a text file with one class name per line (label i = line i)")
    ex.add_argument("--embedding", help="[n, 2] coordinates (default: UMAP of 1 − R, same-label edges removed)")
    ex.add_argument("--hierarchy", choices=["imagenet", "fashion-mnist"],
                    help="a WordNet hierarchy for paths, colours and search (needs WordNet installed)")
    ex.add_argument("--score", action="append", default=[], metavar="NAME=FILE",
                    help="a per-sample score to colour by (repeatable, one NAME each)")
    ex.add_argument("-k", type=_positive_int, default=15, help="neighbours per sample (default: %(default)s)")
    ex.add_argument("--title", help="the page title")
    ex.add_argument("--seed", type=_non_negative_int, default=0, help="UMAP's random_state (default: %(default)s)")
    return ex


# --------------------------------------------------------------------------------------------
# reading the inputs
# --------------------------------------------------------------------------------------------

def _input_file(path: str, flag: str) -> Path:
    """An existing regular file, else ValueError naming the flag."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"{flag}: no such file {path!r}")
    if not p.is_file():
        raise ValueError(f"{flag}: expected a file, got {path!r}, which is a folder")
    return p


def _read_array(path: str, flag: str):
    """One array from a .npy, .npz (one array) or .pt (one tensor) file."""
    import numpy as np

    p = _input_file(path, flag)
    suffix = p.suffix.lower()
    if suffix not in (".npy", ".npz", ".pt", ".pth"):
        raise ValueError(f"{flag}: {path!r} must be a .npy, .npz or .pt file")
    try:
        if suffix == ".npy":
            return np.load(p, allow_pickle=False)
        if suffix == ".npz":
            return _single_npz_array(p, path, flag)
        return _single_tensor(p, path, flag)
    except ValueError as error:
        if str(error).startswith(flag):
            raise
        raise ValueError(f"{flag}: cannot read {path!r} as a {suffix} array file ({error})") from None
    except Exception as error:  # a foreign or damaged file: pickle, zip and torch errors
        raise ValueError(f"{flag}: cannot read {path!r} as a {suffix} array file "
                         f"({type(error).__name__}: {error})") from None


def _single_npz_array(p: Path, path: str, flag: str):
    import numpy as np

    with np.load(p, allow_pickle=False) as z:
        if len(z.files) != 1:
            raise ValueError(f"{flag}: {path!r} holds {len(z.files)} arrays {z.files[:6]}; give a .npz "
                             "with one array, or a .npy")
        return z[z.files[0]]


def _single_tensor(p: Path, path: str, flag: str):
    import torch

    value = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{flag}: {path!r} must hold one tensor, got {type(value).__name__}")
    return value.numpy()


def _read_lines(path: str, flag: str) -> List[str]:
    p = _input_file(path, flag)
    try:
        return p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{flag}: {path!r} must be a UTF-8 text file (one entry per line), "
                         f"got undecodable bytes at position {error.start}") from None


def _per_sample(arr, n: int, flag: str, path: str):
    """``arr`` must hold one entry per probe sample along its first axis."""
    if arr.ndim == 0 or arr.shape[0] != n:
        raise ValueError(f"{flag}: {path!r} must hold one entry per probe sample (n={n}) along its first "
                         f"axis, got shape {tuple(arr.shape)}")
    return arr


def _scores(items: List[str]) -> List[Tuple[str, str]]:
    """--score NAME=FILE items → [(name, file)], each name once."""
    pairs: List[Tuple[str, str]] = []
    for item in items:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise ValueError(f"--score must be NAME=FILE, got {item!r}")
        if name in (seen for seen, _ in pairs):
            raise ValueError(f"--score: the name {name!r} is given twice; give each score its own NAME")
        pairs.append((name, file))
    return pairs


def _load_kernel(path: str):
    from .kernel import LossKernel

    p = _input_file(path, "kernel")
    try:
        return LossKernel.load(p)
    except ValueError as error:  # FileIntegrityError names the file; torch's part spans lines
        raise ValueError("kernel: " + " ".join(str(error).split())) from None


def _hierarchy(name: Optional[str]):
    if name == "imagenet":
        from .hierarchy import wordnet_imagenet

        return wordnet_imagenet()
    if name == "fashion-mnist":
        from .hierarchy import fashion_mnist_hierarchy

        return fashion_mnist_hierarchy()
    return None


def _run_explore(args) -> str:
    from .explore import explore
    from .validation import check_output_path

    scores = _scores(args.score)
    files = {"kernel": args.kernel, "--images": args.images, "--texts": args.texts, "--labels": args.labels,
             "--label-names": args.label_names, "--embedding": args.embedding,
             **{f"--score {name}": file for name, file in scores}}
    for flag, file in files.items():
        if file is not None:
            _input_file(file, flag)
    out = check_output_path(args.out, "--out", inputs=[f for f in files.values() if f is not None], expect="file")
    kernel = _load_kernel(args.kernel)
    n = kernel.num_samples
    kwargs = {}
    if args.images:
        kwargs["images"] = _per_sample(_read_array(args.images, "--images"), n, "--images", args.images)
        kwargs["image_layout"] = args.image_layout
    elif args.image_layout:
        raise ValueError("--image-layout was given without --images")
    if args.texts:
        kwargs["texts"] = _read_lines(args.texts, "--texts")
        if len(kwargs["texts"]) != n:
            raise ValueError(f"--texts: {args.texts!r} must have one line per probe sample (n={n}), "
                             f"got {len(kwargs['texts'])} lines")
    if args.labels:
        kwargs["labels"] = _per_sample(_read_array(args.labels, "--labels"), n, "--labels", args.labels)
    if args.label_names:
        kwargs["label_names"] = _read_lines(args.label_names, "--label-names")
    if args.embedding:
        kwargs["embedding"] = _per_sample(_read_array(args.embedding, "--embedding"), n, "--embedding",
                                          args.embedding)
    score_arrays = {name: _per_sample(_read_array(file, f"--score {name}"), n, f"--score {name}", file)
                    for name, file in scores}
    return explore(kernel, scores=score_arrays or None, k=args.k, path=out, title=args.title,
                   hierarchy=_hierarchy(args.hierarchy), random_state=args.seed, **kwargs)


def _run_demo(args, demo_parser) -> None:
    from .validation import check_output_path

    base = dict(num_chains=2, num_draws=60, num_burnin_steps=40) if args.quick else {}
    given = {f.name: getattr(args, f.name) for f in fields(DemoConfig) if getattr(args, f.name) is not None}
    try:
        cfg = DemoConfig(**{**base, **given})  # validated here, before any training
        check_output_path(args.out, "--out", expect="folder", make_parents=True)
    except _USER_ERRORS as error:
        demo_parser.error(str(error))
    try:
        require_demo_modules()
    except ImportError as error:  # the [demo] extra is missing: say which
        sys.exit(f"losskernel demo: {error}")
    from .diagnostics import HealthReport

    summary = run_demo(args.out, cfg)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("config", "health report")}, indent=2))
    print(f"wrote {args.out}/kernel.pt, {args.out}/summary.json, {args.out}/correlation.png, "
          f"{args.out}/explorer.html")
    print(HealthReport.from_dict(summary["health report"]))  # last: can these draws be trusted?


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="losskernel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo_parser = _demo_parser(sub)
    explore_parser = _explore_parser(sub)
    args = parser.parse_args(argv)

    if args.command == "demo":
        _run_demo(args, demo_parser)
    elif args.command == "explore":
        try:
            page = _run_explore(args)
        except _USER_ERRORS as error:
            explore_parser.error(str(error))
        except ImportError as error:  # the [explore] extra is missing: say which
            sys.exit(f"losskernel explore: {error}")
        print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
