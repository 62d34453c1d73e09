"""Accumulator throughput: draws/s and GFLOP/s of KernelAccumulator.update() against the
number of probe samples n and the block size B, as a fraction of this machine's own matmul
rate for the same shapes ([n, B]ᵀ × [B, n], out= preallocated) in the same dtype.

A full block of B draws costs one [n, B]ᵀ[B, n] product (2 n² B flops, the useful work
counted in GFLOP/s) plus O(n²) memory passes to merge it into the co-moment (allocate the
product, add it, add the rank-one mean correction). For small B the n² passes dominate and
the fraction of the matmul rate is low; for B ≳ 32 the product dominates.

    .venv/bin/python benchmarks/accumulator_throughput.py                      # full: n = 1k..10k
    .venv/bin/python benchmarks/accumulator_throughput.py --sizes 500,1000 --blocks 1,32 --min-time 0.3
"""

from __future__ import annotations

import argparse

import torch

from devinterp_losskernel import KernelAccumulator
from devinterp_losskernel.accumulator import estimate_kernel_memory

import _common  # noqa: F401  (puts src/ on sys.path)
from _common import (
    PeakRSS,
    add_common_arguments,
    append_results,
    apply_common_arguments,
    cuda_peak_bytes,
    cuda_reset_peak,
    print_table,
    release_freed_memory,
    synchronize,
    time_until,
)

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def ints(text: str):
    return [int(float(x)) for x in text.split(",") if x]


def matmul_rate(n: int, block: int, dtype, device, min_time: float) -> float:
    """GFLOP/s of [n, B]ᵀ × [B, n] into a preallocated [n, n] on this machine."""
    a = torch.randn(block, n, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    torch.mm(a.T, a, out=out)  # warm-up
    calls, seconds = time_until(lambda: torch.mm(a.T, a, out=out), min_time=min_time,  # noqa: F821
                                device=device)
    del a, out
    return 2.0 * n * n * block * calls / seconds / 1e9


def peak_matmul_rate(dtype, device, size: int = 2048, min_time: float = 1.0) -> float:
    a = torch.randn(size, size, dtype=dtype, device=device)
    out = torch.empty_like(a)
    torch.mm(a, a, out=out)
    calls, seconds = time_until(lambda: torch.mm(a, a, out=out), min_time=min_time, device=device)
    return 2.0 * size**3 * calls / seconds / 1e9


def measure_accumulator(n: int, block: int, dtype, device, min_time: float) -> dict:
    """Time update() of whole blocks of float32 losses (what the probe produces)."""
    pool = torch.randn(block, n, dtype=torch.float32, device=device)
    release_freed_memory()
    base = cuda_reset_peak(device)
    with PeakRSS() as mem:
        acc = KernelAccumulator(n, block_size=block, dtype=dtype, device=device)
        acc.update(pool)  # warm-up: first block (allocations, page faults)
        calls, seconds = time_until(lambda: acc.update(pool), min_time=min_time, device=device)  # noqa: F821
        acc.flush()
        synchronize(device)
    peak = cuda_peak_bytes(device, base)
    if peak is None:
        peak = mem.peak_bytes
    draws = calls * block
    del acc, pool
    release_freed_memory()
    return {
        "draws_per_s": draws / seconds,
        "gflops": 2.0 * n * n * draws / seconds / 1e9,
        "peak_bytes": peak,
        "estimate_bytes": estimate_kernel_memory(n, dtype=dtype, block_size=block),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=ints, default=[1000, 2000, 5000, 10000],
                        help="comma-separated n (probe samples); default 1000,2000,5000,10000")
    parser.add_argument("--blocks", type=ints, default=[1, 8, 32, 64, 128],
                        help="comma-separated block sizes B; default 1,8,32,64,128")
    parser.add_argument("--dtypes", default="float64,float32",
                        help="comma-separated accumulator dtypes; default float64,float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-time", type=float, default=1.0,
                        help="seconds to time each configuration (at least 2 blocks)")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    apply_common_arguments(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is available")
    dtypes = [DTYPES[d.strip()] for d in args.dtypes.split(",") if d.strip()]

    headers = ["dtype", "n", "B", "draws/s", "GFLOP/s", "matmul GFLOP/s", "fraction",
               "peak MiB", "estimate MiB"]
    rows, peaks = [], []
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        peaks.append(f"{name}: {peak_matmul_rate(dtype, device):.1f} GFLOP/s")
        for n in args.sizes:
            for block in args.blocks:
                acc = measure_accumulator(n, block, dtype, device, args.min_time)
                rate = matmul_rate(n, block, dtype, device, args.min_time)
                row = [name, n, block, f"{acc['draws_per_s']:,.1f}", f"{acc['gflops']:.2f}",
                       f"{rate:.2f}", f"{acc['gflops'] / rate:.2f}",
                       f"{acc['peak_bytes'] / 2**20:,.0f}" if acc["peak_bytes"] is not None else "n/a",
                       f"{acc['estimate_bytes'] / 2**20:,.0f}"]
                rows.append(row)
                print("  ".join(str(c) for c in row), flush=True)

    table = print_table(headers, rows, "KernelAccumulator.update() throughput")
    notes = "\n".join([
        f"Device: {device}. Square 2048³ matmul peak on this machine: " + "; ".join(peaks) + ".",
        "GFLOP/s counts the useful 2·n²·B flops of each block's [n,B]ᵀ[B,n] product; "
        "'matmul GFLOP/s' is torch.mm of the same shapes into a preallocated output, and "
        "'fraction' is the ratio. Inputs are float32 loss blocks (as the probe produces), "
        "converted to the accumulator's dtype. 'peak MiB' is the peak memory above the "
        "baseline while the accumulator was created and fed (process RSS high-water mark on "
        "CPU, torch.cuda.max_memory_allocated on GPU); 'estimate MiB' is "
        "estimate_kernel_memory(n, dtype, block_size).",
    ])
    print("\n" + notes)
    append_results("Accumulator throughput (benchmarks/accumulator_throughput.py)",
                   table + "\n\n" + notes, path=args.results, write=not args.no_record)


if __name__ == "__main__":
    main()
