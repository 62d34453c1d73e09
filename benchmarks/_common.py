"""Helpers shared by the benchmark scripts: machine description, timing, peak memory,
tables, and appending a section to benchmarks/RESULTS.md.

Only the standard library and torch (optional) are needed, so the scripts run in both the
devinterp 1.x venv (.venv) and the devinterp 2.x venv (.venv2).
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
REPO = HERE.parent

# Let the scripts import the package (and the tutorials' pipelines, examples/losskernel_examples)
# from the source tree even when they are not installed.
for _path in (REPO / "src", REPO / "examples"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


# -- the machine --------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def total_memory_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def machine_description() -> dict:
    """CPU model, cores, memory, torch/numpy/devinterp versions, GPU (if any), date."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": f"{usable_cores()} usable ({os.cpu_count()} online)",
        "python": platform.python_version(),
    }
    memory = total_memory_gib()
    if memory is not None:
        info["memory"] = f"{memory:.1f} GiB"
    try:
        import torch

        info["torch"] = f"{torch.__version__} ({torch.get_num_threads()} intra-op threads)"
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB (CUDA {torch.version.cuda})"
    except ImportError:
        pass
    try:
        import numpy

        info["numpy"] = numpy.__version__
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        info["devinterp"] = version("devinterp")
    except Exception:
        pass
    return info


def describe_machine_lines() -> List[str]:
    return [f"- {key}: {value}" for key, value in machine_description().items()]


def command_line() -> str:
    """How this script was run, with paths relative to the repository root where possible."""
    exe = sys.executable
    try:
        exe = os.path.relpath(exe, REPO) if exe.startswith(str(REPO)) else exe
    except ValueError:
        pass
    script = sys.argv[0]
    try:
        script = os.path.relpath(os.path.abspath(script), REPO)
    except ValueError:
        pass
    return " ".join(shlex.quote(part) for part in [exe, script, *sys.argv[1:]])


# -- timing -------------------------------------------------------------------------------
def synchronize(device=None) -> None:
    try:
        import torch

        if torch.cuda.is_available() and (device is None or "cuda" in str(device)):
            torch.cuda.synchronize()
    except ImportError:
        pass


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall clock, CUDA synchronized) and
    ``t.cpu_seconds`` (CPU time of this process, all threads: on a shared machine it counts
    the work done, not the time spent waiting for a core)."""

    def __init__(self, device=None):
        self.device = device
        self.seconds = float("nan")
        self.cpu_seconds = float("nan")

    def __enter__(self):
        synchronize(self.device)
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start
        self.cpu_seconds = time.process_time() - self._cpu_start
        return False


def time_call(fn: Callable[[], object], *, repeat: int = 3, warmup: int = 1,
              device=None) -> List[float]:
    """Wall seconds of ``repeat`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        with Timer(device) as t:
            fn()
        times.append(t.seconds)
    return times


def time_until(fn: Callable[[], object], *, min_time: float = 1.0, min_calls: int = 2,
               max_calls: int = 10_000, device=None) -> tuple:
    """Call ``fn`` until ``min_time`` seconds and ``min_calls`` calls have passed; returns
    (calls, seconds)."""
    calls, start = 0, None
    synchronize(device)
    start = time.perf_counter()
    while True:
        fn()
        calls += 1
        if calls >= max_calls:
            break
        if calls >= min_calls:
            synchronize(device)
            if time.perf_counter() - start >= min_time:
                break
    synchronize(device)
    return calls, time.perf_counter() - start


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


# -- memory -------------------------------------------------------------------------------
def cuda_reset_peak(device) -> int:
    """On a CUDA device, reset torch's peak-allocation statistic and return the bytes allocated
    now (the baseline of the next peak); 0 elsewhere."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def cuda_peak_bytes(device, baseline: int = 0) -> Optional[int]:
    """Peak bytes allocated by torch on a CUDA device since :func:`cuda_reset_peak`, above
    ``baseline``; None elsewhere (measure the CPU with :class:`PeakRSS`)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) - baseline


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_bytes() -> Optional[int]:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so that a
    following measurement starts from a clean baseline."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; Linux ≥ 4.0."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak resident memory of this process above its level at entry, in bytes.

    Uses the kernel's own high-water mark (VmHWM, reset at entry through
    /proc/self/clear_refs) where possible, and a sampling thread (every ``interval``
    seconds) otherwise — no psutil needed. tracemalloc is not used because torch's
    allocations bypass it. ``peak_bytes`` is set on exit; GPU memory is measured separately
    with torch.cuda.max_memory_allocated.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak_bytes: Optional[int] = None
        self.method = "none"

    def _sample(self):
        while not self._stop.is_set():
            rss = current_rss_bytes()
            if rss is not None and rss > self._sampled:
                self._sampled = rss
            self._stop.wait(self.interval)

    def __enter__(self):
        release_freed_memory()
        self._baseline = current_rss_bytes() or 0
        self._hwm_ok = _reset_peak_rss()
        self._sampled = self._baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        peak = self._sampled
        self.method = "sampled RSS"
        if self._hwm_ok:
            hwm = _status_kib("VmHWM")
            if hwm is not None:
                peak = max(peak, hwm * 1024)
                self.method = "VmHWM"
        self.peak_bytes = max(0, peak - self._baseline)
        return False


def measure(fn: Callable[[], object], device=None) -> tuple:
    """(result, wall seconds, peak RSS above baseline in bytes) of one call of ``fn``."""
    with PeakRSS() as mem, Timer(device) as t:
        result = fn()
    return result, t.seconds, mem.peak_bytes


def mib(nbytes: Optional[float]) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:,.1f}"


def directory_bytes(path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


# -- output -------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    def line(row):
        return "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def print_table(headers: Sequence[str], rows: Sequence[Sequence], title: str = "") -> str:
    table = markdown_table(headers, rows)
    if title:
        print(f"\n{title}")
    print(table, flush=True)
    return table


def append_results(title: str, body: str, *, path: Path = RESULTS, write: bool = True) -> None:
    """Append a section to RESULTS.md: title, command, machine, then ``body`` (tables, notes)."""
    section = "\n".join([
        f"## {title}",
        "",
        f"Command: `{command_line()}`",
        "",
        "Machine:",
        *describe_machine_lines(),
        "",
        body.rstrip(),
        "",
        "",
    ])
    if not write:
        return
    new = not path.exists()
    with open(path, "a") as fh:
        if new:
            fh.write("# Benchmark results\n\nEach section is appended by a script in this "
                     "folder; see README.md for how to run them.\n\n")
        fh.write(section)
    print(f"\nappended to {path}")


def add_common_arguments(parser) -> None:
    parser.add_argument("--no-record", action="store_true",
                        help="print the tables but do not append them to RESULTS.md")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help=f"markdown file to append the section to (default {RESULTS.relative_to(REPO)})")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's default)")


def apply_common_arguments(args) -> None:
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
