"""The kernel explorer in headless Chromium: file size, first render, hover, click, pan.

Two pages (issue 12's targets):

* n = 10,000 with 32×32 colour thumbnails: a LossKernel built from random low-rank losses
  (T draws × n samples, rank r, 100 labels each with a shared factor), the neighbour lists
  computed by ``explore`` itself (``top_correlated``), a given 2-D embedding (a UMAP of
  10,000 points is not what is timed here). Targets: file ≤ 25 MB, first render ≤ 3 s.
* n = 50,000 without thumbnails: too many samples for an n × n kernel in memory, so the
  top-k lists are computed here block by block from the same kind of low-rank losses and
  passed as ``explore(..., neighbours=...)``. It must render, pan and hover.

Times: "first render" is the page's own clock (``performance.now()``, from navigation
start) when Bokeh's document is idle (first frame drawn) and our panels are wired; "load
wall" is Selenium's view from ``driver.get`` to the same moment. Hover: from just before
Chromium is sent a mouse move (DevTools ``Input.dispatchMouseEvent``) until the tooltip with
that sample's thumbnail is in the DOM, polled every animation frame (an upper bound: it
includes the DevTools round trip); median / max over points. Click: until the neighbour
strip holds the sample's k cards. Pan: a 20-step drag with Bokeh's pan tool; the longest
gap between animation frames during it.

    .venv-ci1/bin/python benchmarks/explorer_render.py            # print the table
    .venv-ci1/bin/python benchmarks/explorer_render.py --append   # and append to RESULTS.md
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (puts src/ on sys.path)

OUT = Path(__file__).resolve().parent / "out"
MACHINE = "2-core x86_64 CPU VM, no GPU"


def low_rank_losses(n, draws, rank, num_labels, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_labels, n)
    losses = (rng.normal(size=(draws, rank)) @ rng.normal(size=(rank, n))
              + rng.normal(size=(draws, num_labels))[:, labels] * 0.8
              + rng.normal(size=(draws, n)) * 0.8)
    return np.abs(losses).astype(np.float32) * 0.1, labels


def smooth_images(n, size, seed):
    """Natural-ish thumbnails: random 4×4 colour fields, upsampled (compress like photos)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = (rng.random((n, 4, 4, 3)) * 255).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.BICUBIC)) for c in coarse])


def kernel_of(losses, labels):
    import torch

    from devinterp_losskernel import LossKernel

    cov = np.cov(losses, rowvar=False).astype(np.float32)
    return LossKernel(covariance=torch.from_numpy(cov), mean=torch.from_numpy(losses.mean(0)),
                      variance=torch.from_numpy(np.diag(cov).copy()), num_draws=losses.shape[0],
                      labels=torch.from_numpy(labels))


def blockwise_neighbours(losses, labels, k, block=2000):
    """Top-k (most / least, all / other labels) of R from the losses, without n × n."""
    z = losses - losses.mean(0)
    z /= np.linalg.norm(z, axis=0)
    n = z.shape[1]
    out = {name: (np.empty((n, k), np.int64), np.empty((n, k))) for name in
           ("most", "least", "most_other", "least_other")}
    for start in range(0, n, block):
        rows = np.arange(start, min(n, start + block))
        r = z[:, rows].T @ z
        r[np.arange(len(rows)), rows] = np.nan
        same = labels[rows][:, None] == labels[None, :]
        for name, low, other in (("most", False, False), ("least", True, False),
                                 ("most_other", False, True), ("least_other", True, True)):
            key = np.where(np.isnan(r), np.inf, r if low else -r)
            if other:
                key[same] = np.inf
            part = np.argpartition(key, k, axis=1)[:, :k]
            order = np.argsort(np.take_along_axis(key, part, 1), axis=1)
            idx = np.take_along_axis(part, order, 1)
            out[name][0][rows], out[name][1][rows] = idx, np.take_along_axis(r, idx, 1)
    return out


def measure_page(path, n, k, hovers, with_thumbs, pan):
    sys.path.insert(0, str(_common.REPO / "tests"))
    from test_explore import chromium_driver, mouse  # the tests' browser set-up

    profile = tempfile.mkdtemp(prefix="lk-bench-")
    driver = chromium_driver(profile)
    try:
        started = time.perf_counter()
        driver.get(Path(path).resolve().as_uri())
        while not driver.execute_script(
                "return !!(window.LK && LK.ready && Bokeh.documents[0] && Bokeh.documents[0].is_idle)"):
            time.sleep(0.01)
            if time.perf_counter() - started > 120:
                raise RuntimeError("the page did not render in 120 s")
        wall = time.perf_counter() - started
        first = driver.execute_script("return performance.now()") / 1000
        webgl = driver.execute_script("return LK.webgl()")
        rng = np.random.default_rng(0)
        targets = rng.choice(n, size=hovers, replace=False)
        hover_ms, click_ms = [], []
        for i in targets.tolist():
            x, y = driver.execute_script(f"return LK.screenPoint({i})")
            if not (0 < x < 900 and 0 < y < 800):
                continue
            # watcher: each animation frame, look for the tooltip of sample i (or, without
            # thumbnails, for LK.hover == i and a tooltip in the DOM)
            driver.execute_script("""
                const i = arguments[0], want = LK.source.data.thumb[i], sel = arguments[1];
                window.__done = null; window.__t0 = performance.now();
                function found(){ const out = [];
                  (function walk(r){ for (const el of r.querySelectorAll('*')){ if (el.matches(sel)) out.push(el);
                    if (el.shadowRoot) walk(el.shadowRoot); } })(document);
                  return out.some(el => want ? el.getAttribute('src') == want : (LK.hover === i)); }
                (function poll(){ if (found()) window.__done = performance.now(); else requestAnimationFrame(poll); })();
            """, i, "img.lk-tip-thumb" if with_thumbs else ".lk-tip")
            mouse(driver, "move", x, y)
            t = time.perf_counter()
            while driver.execute_script("return window.__done") is None and time.perf_counter() - t < 5:
                time.sleep(0.002)
            done = driver.execute_script("return window.__done === null ? null : window.__done - window.__t0")
            if done is not None and driver.execute_script("return LK.hover") == i:
                hover_ms.append(done)
            driver.execute_script("window.__t1 = performance.now(); window.__clicked = null;"
                                  "const i = arguments[0], k = arguments[1];"
                                  "(function poll(){ if (LK.selected === i && document.querySelectorAll('#lk-strip .lk-card').length == k)"
                                  " window.__clicked = performance.now() - window.__t1; else requestAnimationFrame(poll); })();",
                                  i, k)
            mouse(driver, "click", x, y)
            t = time.perf_counter()
            while driver.execute_script("return window.__clicked") is None and time.perf_counter() - t < 5:
                time.sleep(0.002)
            clicked = driver.execute_script("return window.__clicked")
            if clicked is not None:
                click_ms.append(clicked)
        pan_gap = None
        if pan:
            driver.execute_script("""window.__gaps = []; let last = performance.now(); window.__panning = true;
                (function frame(){ const now = performance.now(); window.__gaps.push(now - last); last = now;
                  if (window.__panning) requestAnimationFrame(frame); })();""")
            x0 = driver.execute_script("return LK.plot.x_range.start")
            mouse(driver, "move", 300, 300)
            driver.execute_cdp_cmd("Input.dispatchMouseEvent", {"type": "mousePressed", "x": 300, "y": 300,
                                                                "button": "left", "clickCount": 1})
            for step in range(1, 21):
                driver.execute_cdp_cmd("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": 300 + 10 * step,
                                                                    "y": 300 + 5 * step, "button": "left",
                                                                    "buttons": 1})
                time.sleep(0.016)
            driver.execute_cdp_cmd("Input.dispatchMouseEvent", {"type": "mouseReleased", "x": 500, "y": 400,
                                                                "button": "left", "clickCount": 1})
            time.sleep(0.3)
            driver.execute_script("window.__panning = false;")
            moved = driver.execute_script("return LK.plot.x_range.start") != x0
            gaps = driver.execute_script("return window.__gaps.slice(1)")
            pan_gap = (max(gaps) if gaps else float("nan"), moved)
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        shot = OUT / f"explorer_bench_{n}.png"
        OUT.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shot))
        return dict(first=first, wall=wall, webgl=webgl, hover=hover_ms, click=click_ms, pan=pan_gap,
                    errors=len(severe), shot=shot)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--append", action="store_true", help="append the results to benchmarks/RESULTS.md")
    parser.add_argument("--n-thumbs", type=int, default=10_000)
    parser.add_argument("--n-large", type=int, default=50_000)
    parser.add_argument("--k", type=int, default=15)
    parser.add_argument("--hovers", type=int, default=15)
    args = parser.parse_args(argv)
    from devinterp_losskernel.explore import explore

    rows, notes = [], []
    work = Path(tempfile.mkdtemp(prefix="lk-explorer-"))
    try:
        # -- n = 10,000 with thumbnails
        n = args.n_thumbs
        losses, labels = low_rank_losses(n, draws=200, rank=16, num_labels=100, seed=0)
        kernel = kernel_of(losses, labels)
        images = smooth_images(n, 32, seed=1)
        coords = np.random.default_rng(2).normal(size=(n, 2)) + np.random.default_rng(3).normal(size=(100, 2))[labels] * 4
        t = time.perf_counter()
        page = explore(kernel, embedding=coords, images=images, k=args.k, path=work / "thumbs.html",
                       scores={"K(x,x) rank": np.argsort(np.argsort(kernel.variance.numpy()))})
        write_s = time.perf_counter() - t
        del kernel
        m = measure_page(page, n, args.k, args.hovers, with_thumbs=True, pan=True)
        rows.append(_row(n, "32×32 WebP", page, write_s, m))
        # -- n = 50,000 without thumbnails
        n = args.n_large
        losses, labels = low_rank_losses(n, draws=100, rank=16, num_labels=100, seed=4)
        t = time.perf_counter()
        lists = blockwise_neighbours(losses, labels, args.k)
        nb_s = time.perf_counter() - t
        coords = np.random.default_rng(5).normal(size=(n, 2)) + np.random.default_rng(6).normal(size=(100, 2))[labels] * 4
        var = losses.var(0, ddof=1)
        t = time.perf_counter()
        page = explore({"variance": var, "mean": losses.mean(0), "labels": labels}, embedding=coords,
                       neighbours=lists, k=args.k, path=work / "large.html")
        write_s = time.perf_counter() - t
        m = measure_page(page, n, args.k, args.hovers, with_thumbs=False, pan=True)
        rows.append(_row(n, "none", page, write_s, m))
        notes.append(f"n = {n:,}: top-k lists computed block by block from the losses in {nb_s:.1f} s "
                     "(no n × n matrix), passed as explore(neighbours=…).")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    headers = ["n", "thumbnails", "file MB", "write s", "first render s (page)", "load wall s", "WebGL",
               "hover ms median / max", "click ms median / max", "pan: longest frame gap ms", "console errors"]
    table = _common.print_table(headers, rows, title="kernel explorer in headless Chromium")
    body = "\n".join([
        f"Machine: {MACHINE}. Chromium {_chromium_version()}, headless, SwiftShader WebGL, network off.",
        "", table, "",
        "Targets (issue 12): n = 10,000 with 32×32 thumbnails: file ≤ 25 MB, first render ≤ 3 s; "
        "n = 50,000 without thumbnails: renders, pans, hovers.",
        "'first render' = performance.now() when Bokeh's document is idle and the explorer is wired; "
        "hover / click = DevTools mouse event sent → tooltip with the sample's thumbnail (or hover state) / "
        "the k-card neighbour strip in the DOM, polled each animation frame (includes the DevTools round trip); "
        f"{args.hovers} random points per page, k = {args.k}. Synthetic kernels from random low-rank losses; "
        "the embedding is given (UMAP time is not measured here).",
        *notes,
    ])
    _common.append_results("Kernel explorer render (benchmarks/explorer_render.py)", body, write=args.append)
    return 0


def _stat(values):
    return f"{statistics.median(values):.0f} / {max(values):.0f}" if values else "—"


def _row(n, thumbs, page, write_s, m):
    pan = "—" if m["pan"] is None else f"{m['pan'][0]:.0f}" + ("" if m["pan"][1] else " (did not move!)")
    return [f"{n:,}", thumbs, f"{Path(page).stat().st_size / 1e6:.1f}", f"{write_s:.1f}", f"{m['first']:.2f}",
            f"{m['wall']:.2f}", "yes" if m["webgl"] else "no (2D canvas)", _stat(m["hover"]), _stat(m["click"]),
            pan, m["errors"]]


def _chromium_version():
    import subprocess

    try:
        return subprocess.run(["/usr/bin/chromium", "--version"], capture_output=True, text=True,
                              timeout=20).stdout.split()[1]
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
