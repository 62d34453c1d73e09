"""One GPU check, < 8 minutes: accumulator throughput at large n, GoogLeNet probe throughput,
and an extrapolated wall time for the paper's Inception-v1/ImageNet configuration.

1. KernelAccumulator on cuda at n = 10k, 20k, 50k (float64 and float32, block 128):
   draws/s, GFLOP/s against torch.mm of the same [n, B]ᵀ[B, n] shapes, and peak GPU memory
   against estimate_kernel_memory (configurations that cannot fit are skipped).
2. GoogLeNet (torchvision.models.googlenet(weights=None, aux_logits=False,
   init_weights=True)) probe throughput at 256×256 through evaluate_probe_losses: float32,
   bf16 autocast, channels_last, and both.
3. One SGLD step (devinterp's SGLD when installed, else the same update written out) on a
   batch of 256, float32 and bf16 autocast.
4. Extrapolation to the paper's configuration: 10,000 probe images, 15 chains × (500 draws
   + 100 burn-in) SGLD steps on batches of 256, i.e. 9,000 steps, 7,500 probe passes of
   10,000 images and 7,500 folds at n = 10,000.

Without a CUDA GPU it prints a message and exits with status 0; without torchvision it
runs part 1 only. On a device machine, write the results where they come back:

    python benchmarks/gpu_check.py --results "$OUT/RESULTS_gpu.md"
    python benchmarks/gpu_check.py --quick          # smaller sizes, ~2 minutes

``--device cpu`` runs every part on the CPU at whatever sizes are given (memory columns
then read "n/a"): a smoke run, so that the one call on a lent GPU does not fail on a bug
(tests/test_benchmarks.py runs it at tiny sizes). Its numbers are not GPU numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import _common  # noqa: F401  (puts src/ on sys.path)
from _common import (
    add_common_arguments,
    append_results,
    apply_common_arguments,
    cuda_peak_bytes,
    cuda_reset_peak,
    print_table,
    time_until,
)

PAPER = dict(probe_images=10_000, chains=15, draws=500, burnin=100, batch=256, image=256)


def ints(text: str):
    return [int(float(x)) for x in text.split(",") if x]


class Budget:
    """Wall-clock budget: sections check it and skip what would not finish in time."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def timed(fn, device, *, min_time: float = 1.0, min_calls: int = 3, warmup: int = 1):
    """Seconds per call of fn (CUDA synchronized), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    calls, seconds = time_until(fn, min_time=min_time, min_calls=min_calls, device=device)
    return seconds / calls


# -- device memory: CUDA's allocator statistics; on the CPU (smoke runs) only free memory --
def empty_cache(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_gib(device, baseline: int = 0) -> str:
    peak = cuda_peak_bytes(device, baseline)
    return "n/a" if peak is None else f"{peak / 2**30:.2f}"


def free_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def titled_table(headers, rows, title: str) -> str:
    """Print the table under its title; return both for RESULTS.md."""
    return f"**{title}**\n\n" + print_table(headers, rows, title)


# -- 1. accumulator ----------------------------------------------------------------------
def accumulator_section(device, sizes, block, budget, min_time):
    import torch

    from devinterp_losskernel import KernelAccumulator
    from devinterp_losskernel.accumulator import estimate_kernel_memory

    rows, fold_seconds = [], {}
    for dtype in (torch.float64, torch.float32):
        name = str(dtype).removeprefix("torch.")
        for n in sizes:
            if budget.left() < 60:
                rows.append([name, n, block, "skipped: time budget", "", "", "", "", ""])
                continue
            itemsize = torch.empty((), dtype=dtype).element_size()
            # the state (n² + buffers) plus the n×n product each flush allocates, plus slack
            need = 2 * itemsize * n * n + 64 * 2**20
            empty_cache(device)
            free = free_bytes(device)
            if need > free:
                rows.append([name, n, block, f"skipped: needs ~{need / 2**30:.1f} GiB, "
                             f"{free / 2**30:.1f} GiB free", "", "", "", "", ""])
                continue
            base = cuda_reset_peak(device)
            try:
                acc = KernelAccumulator(n, block_size=block, dtype=dtype, device=device)
                pool = torch.randn(block, n, device=device, dtype=torch.float32)
                per_block = timed(lambda: acc.update(pool), device, min_time=min_time)  # noqa: F821
                peak = peak_gib(device, base)
                del acc
                empty_cache(device)
                a = torch.randn(block, n, device=device, dtype=dtype)
                out = torch.empty(n, n, device=device, dtype=dtype)
                per_mm = timed(lambda: torch.mm(a.T, a, out=out), device, min_time=min_time)  # noqa: F821
                del a, out, pool
            except torch.cuda.OutOfMemoryError as error:
                rows.append([name, n, block, f"out of memory: {str(error).splitlines()[0][:60]}",
                             "", "", "", "", ""])
                empty_cache(device)
                continue
            empty_cache(device)
            flops = 2.0 * n * n * block
            fold_seconds[(name, n)] = per_block / block
            rows.append([name, n, block, f"{block / per_block:,.0f}", f"{flops / per_block / 1e9:,.0f}",
                         f"{flops / per_mm / 1e9:,.0f}", f"{per_mm / per_block:.2f}",
                         peak,
                         f"{estimate_kernel_memory(n, dtype=dtype, block_size=block) / 2**30:.2f}"])
            print("  ".join(str(c) for c in rows[-1]), flush=True)
    headers = ["dtype", "n", "B", "draws/s", "GFLOP/s", "matmul GFLOP/s", "fraction",
               "peak GiB", "estimate GiB"]
    return headers, rows, fold_seconds


# -- 2. probe throughput -----------------------------------------------------------------
def googlenet(device):
    import torchvision

    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    return model.to(device)


def probe_section(device, num_images, batch_size, image, budget, min_time):
    import torch

    from devinterp_losskernel.probe import ProbeSet, evaluate_probe_losses

    torch.backends.cudnn.benchmark = device.type == "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(num_images, 3, image, image, device=device, generator=g)
    labels = torch.randint(0, 1000, (num_images,), device=device, generator=g)
    rows, rates = [], {}
    variants = [("float32", None, False), ("bf16 autocast", torch.bfloat16, False),
                ("float32 + channels_last", None, True),
                ("bf16 autocast + channels_last", torch.bfloat16, True)]
    for label, autocast, channels_last in variants:
        if budget.left() < 45:
            rows.append([label, batch_size, "skipped: time budget", "", ""])
            continue
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = googlenet(device).to(memory_format=fmt)
        data = images.contiguous(memory_format=fmt)
        probe = ProbeSet((data, labels), batch_size=batch_size)
        cuda_reset_peak(device)
        seconds = timed(lambda: evaluate_probe_losses(model, probe, autocast_dtype=autocast),  # noqa: F821
                        device, min_time=min_time, min_calls=2)
        rates[label] = num_images / seconds
        rows.append([label, batch_size, f"{num_images / seconds:,.0f}",
                     f"{1e3 * seconds / num_images * PAPER['probe_images']:,.0f}",
                     peak_gib(device)])
        print("  ".join(str(c) for c in rows[-1]), flush=True)
        del model, data, probe
        empty_cache(device)
    del images, labels
    empty_cache(device)
    headers = ["variant", "probe batch", "images/s", "ms per 10k-image pass", "peak GiB"]
    return headers, rows, rates


# -- 3. SGLD step ------------------------------------------------------------------------
def make_sgld(model, lr, nbeta, localization):
    """devinterp's SGLD if installed, else the same update: Δw = −ε/2 (nβ ∇L + γ (w − w₀))
    + N(0, ε)."""
    import torch

    try:
        from devinterp.optim import SGLD

        return SGLD(model.parameters(), lr=lr, nbeta=nbeta, localization=localization), "devinterp SGLD"
    except Exception:
        pass

    class _SGLD(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, dict(lr=lr, nbeta=nbeta, localization=localization))
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["initial"] = p.detach().clone()

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    drift = p.grad * group["nbeta"] + (p - self.state[p]["initial"]) * group["localization"]
                    p.add_(drift, alpha=-0.5 * group["lr"])
                    p.add_(torch.randn_like(p), alpha=group["lr"] ** 0.5)

    return _SGLD(model.parameters()), "SGLD update written out (devinterp not installed)"


def sgld_section(device, batch_size, image, budget, min_time):
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(batch_size, 3, image, image, device=device, generator=g)
    y = torch.randint(0, 1000, (batch_size,), device=device, generator=g)
    rows, step_seconds, which = [], {}, ""
    for label, autocast, channels_last in (("float32", None, False),
                                           ("bf16 autocast + channels_last", torch.bfloat16, True)):
        if budget.left() < 30:
            rows.append([label, batch_size, "skipped: time budget", ""])
            continue
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = googlenet(device).to(memory_format=fmt).train()
        data = x.contiguous(memory_format=fmt)
        optimizer, which = make_sgld(model, lr=5e-5, nbeta=20.0, localization=4000.0)

        def step():
            optimizer.zero_grad(set_to_none=True)  # noqa: F821
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss = F.cross_entropy(model(data).float(), y)  # noqa: F821
            loss.backward()
            optimizer.step()  # noqa: F821

        cuda_reset_peak(device)
        seconds = timed(step, device, min_time=min_time, min_calls=5, warmup=2)
        step_seconds[label] = seconds
        rows.append([label, batch_size, f"{1e3 * seconds:.1f}", peak_gib(device)])
        print("  ".join(str(c) for c in rows[-1]), flush=True)
        del model, data, optimizer
        empty_cache(device)
    headers = ["variant", "batch", "ms per SGLD step", "peak GiB"]
    return headers, rows, step_seconds, which


# -- 4. extrapolation --------------------------------------------------------------------
def extrapolate(fold_seconds, probe_rates, step_seconds):
    steps = PAPER["chains"] * (PAPER["draws"] + PAPER["burnin"])
    draws = PAPER["chains"] * PAPER["draws"]
    rows = []
    for sgld_label, probe_label in (("float32", "float32"),
                                    ("bf16 autocast + channels_last", "bf16 autocast + channels_last")):
        for fold_dtype in ("float64", "float32"):
            fold = fold_seconds.get((fold_dtype, PAPER["probe_images"]))
            rate = probe_rates.get(probe_label)
            step = step_seconds.get(sgld_label)
            if fold is None or rate is None or step is None:
                continue
            t_steps = steps * step
            t_probe = draws * PAPER["probe_images"] / rate
            t_fold = draws * fold
            total = t_steps + t_probe + t_fold
            rows.append([f"{probe_label}, fold {fold_dtype}", f"{t_steps / 3600:.2f}",
                         f"{t_probe / 3600:.2f}", f"{t_fold / 3600:.3f}", f"{total / 3600:.2f}",
                         f"{100 * t_fold / total:.1f}%"])
    headers = ["setting", "SGLD steps h", "probe passes h", "folds h", "total h", "fold share"]
    return headers, rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=ints, default=[10_000, 20_000, 50_000],
                        help="accumulator n; default 10000,20000,50000")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--probe-images", type=int, default=2048,
                        help="images per timed probe pass (the rate is extrapolated to 10,000)")
    parser.add_argument("--probe-batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=PAPER["image"])
    parser.add_argument("--sgld-batch-size", type=int, default=PAPER["batch"])
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="wall-clock budget in seconds; later sections are skipped past it")
    parser.add_argument("--quick", action="store_true",
                        help="n = 10k, 20k; 1,024 probe images; 1 s per measurement")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a smoke run of every part (not GPU numbers); default %(default)s")
    add_common_arguments(parser)
    args = parser.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("gpu_check.py: torch is not installed; nothing measured.")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA GPU is available on this machine; nothing measured. "
              "Run it on a machine with an NVIDIA GPU.")
        return 0
    apply_common_arguments(args)
    if args.quick:
        args.sizes = [n for n in args.sizes if n <= 20_000] or [10_000]
        args.probe_images, args.min_time = 1024, 1.0
    budget = Budget(args.budget)
    if args.device == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        device_name = torch.cuda.get_device_name(device)
    else:
        device, device_name = torch.device("cpu"), "the CPU (smoke run: not GPU numbers)"
    sections = [] if device.type == "cuda" else ["**CPU smoke run (--device cpu): not GPU numbers.**"]

    print("1. accumulator throughput on", device_name, flush=True)
    headers, rows, fold_seconds = accumulator_section(device, args.sizes, args.block_size,
                                                      budget, args.min_time)
    sections.append(titled_table(headers, rows, f"KernelAccumulator.update() on {device_name}"))
    sections.append("GFLOP/s counts the 2·n²·B flops of each block's product; 'fraction' is "
                    "against torch.mm of the same shapes into a preallocated output (TF32 "
                    f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'} on CUDA). 'peak GiB' "
                    "is torch.cuda.max_memory_allocated while feeding; 'estimate GiB' is "
                    "estimate_kernel_memory().")

    try:
        import torchvision  # noqa: F401
    except ImportError:
        message = ("torchvision is not installed: GoogLeNet probe throughput, SGLD step and "
                   "the ImageNet extrapolation were skipped (pip install torchvision).")
        print("\n" + message)
        sections.append(message)
    else:
        print("\n2. GoogLeNet probe throughput", flush=True)
        headers, rows, rates = probe_section(device, args.probe_images, args.probe_batch_size,
                                             args.image_size, budget, args.min_time)
        sections.append(titled_table(headers, rows, f"GoogLeNet probe pass, {args.image_size}×"
                                    f"{args.image_size}, {args.probe_images} images (evaluate_probe_losses)"))
        print("\n3. SGLD step", flush=True)
        headers, rows, steps, which = sgld_section(device, args.sgld_batch_size, args.image_size,
                                                   budget, args.min_time)
        sections.append(titled_table(headers, rows, f"GoogLeNet SGLD step ({which})"))
        headers, rows = extrapolate(fold_seconds, rates, steps)
        if rows:
            sections.append(titled_table(
                headers, rows,
                f"Extrapolated: paper's ImageNet run ({PAPER['probe_images']:,} probe images, "
                f"{PAPER['chains']} chains × ({PAPER['draws']} draws + {PAPER['burnin']} burn-in), "
                f"batch {PAPER['batch']}, {args.image_size}×{args.image_size}), one {device.type} device"))
            sections.append("Total = 9,000 SGLD steps + 7,500 probe passes of 10,000 images + "
                            "7,500 folds at n = 10,000 (per-draw fold time from part 1). Data "
                            "loading is not included: the probe set is assumed resident on the "
                            "GPU (10,000 × 3 × 256² float32 = 7.3 GiB; uint8 would be 1.8 GiB).")
        else:
            sections.append("Extrapolation skipped: a needed measurement is missing (n = 10,000 "
                            "must be among --sizes).")
    append_results("GPU check (benchmarks/gpu_check.py)", "\n\n".join(sections),
                   path=args.results, write=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
