"""Streaming KernelAccumulator vs storing every draw's losses and calling numpy.cov.

Both receive the same float32 loss vectors one draw at a time, as a sampler callback does.
"stored" appends a copy of each draw to a list, then stacks the list and calls
np.cov(rowvar=False) in float64 at the end (what tools that keep all traces do);
"streaming" folds each draw into a float64 KernelAccumulator and calls compute().
Reported: wall time, peak memory above the baseline (process RSS high-water mark), and the
largest absolute difference between the two covariance matrices. The accumulator's memory
is 8n² bytes whatever the number of draws; storing grows as 4·n·draws (plus the float64
copies np.cov makes).

    .venv/bin/python benchmarks/vs_numpy_cov.py                                  # full: n=2000, 500..8000 draws
    .venv/bin/python benchmarks/vs_numpy_cov.py --n 500 --draws 200,800
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from devinterp_losskernel import KernelAccumulator

import _common  # noqa: F401  (puts src/ on sys.path)
from _common import (
    add_common_arguments,
    append_results,
    apply_common_arguments,
    measure,
    median,
    print_table,
    release_freed_memory,
)


def ints(text: str):
    return [int(float(x)) for x in text.split(",") if x]


def make_draws(n: int, draws: int, seed: int = 0, rank: int = 16) -> torch.Tensor:
    """[draws, n] float32 losses: a positive mean plus correlated (low-rank + diagonal)
    fluctuations, like probe losses under SGLD."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.rand(n, generator=g) * 3 + 0.1
    factors = torch.randn(n, rank, generator=g) * 0.05
    latent = torch.randn(draws, rank, generator=g)
    noise = torch.randn(draws, n, generator=g) * 0.01
    return (mean + latent @ factors.T + noise).float().contiguous()


def stored_numpy_cov(pool: torch.Tensor) -> np.ndarray:
    traces = []
    for draw in pool:                       # one callback call per draw
        traces.append(draw.numpy().copy())  # the losses must outlive the draw
    stacked = np.stack(traces)
    del traces
    return np.cov(stacked, rowvar=False, ddof=1)  # float64 result


def streaming(pool: torch.Tensor, block_size: int) -> np.ndarray:
    acc = KernelAccumulator(pool.shape[1], block_size=block_size)
    for draw in pool:
        acc.update(draw)
    return acc.compute().covariance.numpy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="probe samples (default 2000)")
    parser.add_argument("--draws", type=ints, default=[500, 1000, 2000, 4000, 8000],
                        help="comma-separated total draws; default 500,1000,2000,4000,8000")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=1,
                        help="repetitions per point; the median time is reported")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    apply_common_arguments(args)

    headers = ["n", "draws", "stored: time s", "stored: peak MiB", "streaming: time s",
               "streaming: peak MiB", "time ratio", "max |ΔK|", "max |K|"]
    rows = []
    n = args.n
    for draws in args.draws:
        pool = make_draws(n, draws)
        release_freed_memory()
        stored_times, stream_times, stored_peaks, stream_peaks = [], [], [], []
        for _ in range(args.repeat):
            reference, t_stored, p_stored = measure(lambda: stored_numpy_cov(pool))  # noqa: F821
            stored_times.append(t_stored)
            stored_peaks.append(p_stored)
            ours, t_stream, p_stream = measure(lambda: streaming(pool, args.block_size))  # noqa: F821
            stream_times.append(t_stream)
            stream_peaks.append(p_stream)
        diff = float(np.abs(ours - reference).max())
        row = [n, draws, f"{median(stored_times):.2f}", f"{max(stored_peaks) / 2**20:,.0f}",
               f"{median(stream_times):.2f}", f"{max(stream_peaks) / 2**20:,.0f}",
               f"{median(stream_times) / median(stored_times):.2f}",
               f"{diff:.1e}", f"{float(np.abs(reference).max()):.1e}"]
        rows.append(row)
        print("  ".join(str(c) for c in row), flush=True)
        del pool, reference, ours
        release_freed_memory()

    table = print_table(headers, rows, "Streaming accumulator vs stored traces + numpy.cov")
    notes = (
        f"Both sides get the same float32 draws one at a time. 'stored' keeps a copy of each "
        f"draw, then np.stack + np.cov (float64). 'streaming' is KernelAccumulator(n, "
        f"block_size={args.block_size}, dtype=float64).update(draw) per draw + compute(). "
        f"Peak MiB is the process RSS high-water mark above the level before the call "
        f"(so the input pool, {n}·draws·4 bytes, is not counted for either). Theory: "
        f"streaming holds 8n² = {8 * n * n / 2**20:,.0f} MiB of co-moment (plus one n×n "
        f"product temporary per block flush) whatever the draws; stored holds 4·n·draws in "
        f"the list and stacked copy, np.cov then makes float64 centred copies (16·n·draws) "
        f"and the 8n² result. Time ratio = streaming / stored ({args.repeat} repetition(s), "
        f"median)."
    )
    print("\n" + notes)
    append_results("Streaming accumulator vs numpy.cov on stored traces (benchmarks/vs_numpy_cov.py)",
                   table + "\n\n" + notes, path=args.results, write=not args.no_record)


if __name__ == "__main__":
    main()
