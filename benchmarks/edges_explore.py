"""Fault cases for the explorer page and the CLI (``explore:`` / ``cli:``), for fault_cases.py.

``benchmarks/fault_cases.py`` imports this file and calls :func:`register` with itself (the
harness); ``fault_cases.py -k explore`` and ``-k cli:`` run these cases. Each case stands for
a class of failure:

* work destroyed: an output path that is an input, a folder, in a missing folder or under a
  regular file; a write that fails half-way (the old page and no temp file must remain);
* values put into the page: user strings that could end a ``<script>`` (label names, title,
  texts, score names, hierarchy names, U+2028) must reach the page as data;
* label names looked up only for labels that name them (no Python negative indexing);
* index arrays checked for dtype, sign and range before they are packed into uint16;
* images: ambiguous layouts refused unless stated, non-finite pixels refused;
* messages that name the right thing: one distinct label, a path given as the kernel, wrong
  files given to the CLI.

The pages are checked statically (the hostile strings must appear nowhere verbatim, and
read back intact from the page's data); tests/test_explore.py opens them in Chromium.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
from pathlib import Path

import numpy as np
import torch

G_EXPLORE = "explorer & CLI"
N = 20
HOSTILE = "<!--<script>x</script><b>&amp;</b>\u2028\u2029"


class CliError(Exception):
    """``losskernel`` exited with a non-zero status; the message is what it printed."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def small_kernel(n: int = N, num_labels: int = 4, seed: int = 0):
    """A LossKernel from random losses of n samples with labels 0 … num_labels − 1."""
    from devinterp_losskernel import LossKernel

    rng = np.random.default_rng(seed)
    losses = np.abs(rng.normal(size=(50, n)) + rng.normal(size=(50, 1)))
    cov = np.cov(losses, rowvar=False)
    return LossKernel(covariance=torch.tensor(cov), mean=torch.tensor(losses.mean(0)),
                      variance=torch.tensor(np.diag(cov).copy()), num_draws=50,
                      labels=torch.tensor(np.arange(n) % num_labels))


def coords(n: int = N) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, 2))


def run_explore(ctx, kernel=None, **kwargs):
    """explore() with a given embedding (no UMAP) into a fresh folder, unless overridden."""
    from devinterp_losskernel.explore import explore

    kernel = small_kernel() if kernel is None else kernel
    kwargs.setdefault("embedding", coords(kernel.num_samples if hasattr(kernel, "num_samples") else N))
    kwargs.setdefault("path", ctx.tmpdir() / "k.html")
    kwargs.setdefault("k", 3)
    return explore(kernel, **kwargs)


def run_cli(*argv) -> str:
    """``losskernel`` in-process; CliError with its stderr on a non-zero exit, else its stdout."""
    from devinterp_losskernel.cli import main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    if code not in (0, None):  # argparse prints usage, then "losskernel explore: error: …"
        lines = err.getvalue().strip().splitlines()
        raise CliError(next((line for line in lines if ": error: " in line), lines[-1] if lines else
                            f"exit status {code}"))
    return out.getvalue()


def saved_kernel(folder: Path, n: int = N) -> Path:
    path = folder / "kernel.pt"
    small_kernel(n).save(path)
    return path


def leftovers(folder: Path, keep=()) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def page_strings(path) -> tuple:
    """(raw page text, the page's data read back)."""
    from devinterp_losskernel.explore import read_explorer

    return Path(path).read_text(encoding="utf-8"), read_explorer(path)


def hostile_check(path, where: str, found_in) -> "object":
    """The hostile string appears nowhere verbatim in the page and reads back intact."""
    text, data = page_strings(path)
    if "<!--<script>" in text or "\u2028" in text or "\u2029" in text:
        return None, f"{where}: the raw string (<!--<script> / U+2028) is in the page's HTML"
    if not found_in(data):
        return None, f"{where}: the string did not read back from the page's data"
    return True, f"{where}: embedded escaped, reads back intact"


def thumbnail_pixels(uri: str) -> np.ndarray:
    import base64

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGBA"))


# --------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------

def register(h) -> None:  # noqa: C901  (one block of small cases)
    case, ok, wrong = h.case, h.ok, h.wrong

    def verdict(result):
        good, detail = result
        return ok(detail) if good else wrong(detail)

    # -- 1. work destroyed ------------------------------------------------------------------
    @case("cli: explore k.pt -o k.pt (the output is the kernel)", "input", group=G_EXPLORE)
    def _(ctx):
        folder = ctx.tmpdir()
        kernel = saved_kernel(folder)
        np.save(folder / "emb.npy", coords())
        try:
            run_cli("explore", kernel, "--embedding", folder / "emb.npy", "-o", kernel)
        finally:
            from devinterp_losskernel import LossKernel
            try:
                LossKernel.load(kernel)
                intact = True
            except Exception:  # noqa: BLE001
                intact = False
        return ok("refused") if intact else wrong("kernel.pt was overwritten with the HTML page")

    @case("cli: -o is the --texts file, spelled through another path", "input", group=G_EXPLORE)
    def _(ctx):
        folder = ctx.tmpdir()
        kernel = saved_kernel(folder)
        np.save(folder / "emb.npy", coords())
        (folder / "sub").mkdir()
        texts = folder / "texts.txt"
        original = "\n".join(f"sample {i}" for i in range(N)) + "\n"
        texts.write_text(original)
        run_cli("explore", kernel, "--embedding", folder / "emb.npy", "--texts", texts,
                "-o", folder / "sub" / ".." / "texts.txt")
        return ok("kept") if texts.read_text() == original else wrong("texts.txt was replaced by the page")

    @case("explore: path= an existing kernel file (not a page)", "html", "overwrite", group=G_EXPLORE)
    def _(ctx):
        folder = ctx.tmpdir()
        kernel_file = saved_kernel(folder)
        before = kernel_file.read_bytes()
        run_explore(ctx, path=kernel_file)
        return ok("kept") if kernel_file.read_bytes() == before else wrong("kernel.pt overwritten by explore()")

    @case("cli: -o names an existing folder", "folder", group=G_EXPLORE)
    def _(ctx):
        folder = ctx.tmpdir()
        kernel = saved_kernel(folder)
        np.save(folder / "emb.npy", coords())
        (folder / "pages").mkdir()
        run_cli("explore", kernel, "--embedding", folder / "emb.npy", "-o", folder / "pages")
        return wrong("exit 0 with a folder as the output")

    @case("cli: -o in a folder that does not exist", "does not exist", group=G_EXPLORE)
    def _(ctx):
        folder = ctx.tmpdir()
        kernel = saved_kernel(folder)
        np.save(folder / "emb.npy", coords())
        run_cli("explore", kernel, "--embedding", folder / "emb.npy", "-o", folder / "typo" / "k.html")
        return wrong(f"exit 0; a folder was created: {leftovers(folder)}")

    @case("explore: path under a regular file (parent is a file)", "regular file", group=G_EXPLORE)
    def _(ctx):
        folder = ctx.tmpdir()
        (folder / "notes.txt").write_text("x")
        run_explore(ctx, path=folder / "notes.txt" / "k.html")
        return wrong("wrote under a regular file?")

    @case("explore: path=42 (not a path)", "path", group=G_EXPLORE)
    def _(ctx):
        run_explore(ctx, path=42)
        return wrong("accepted path=42")

    @case("explore: the disk fills while writing: old page kept, no temp file", group=G_EXPLORE)
    def _(ctx):
        folder = ctx.tmpdir()
        page = run_explore(ctx, path=folder / "k.html")
        before = Path(page).read_bytes()
        real_fsync = os.fsync

        def full(fd):
            raise OSError(28, "No space left on device")

        os.fsync = full
        try:
            run_explore(ctx, path=folder / "k.html", title="second")
            os.fsync = real_fsync
            return wrong("no error although the write failed")
        except OSError:
            pass
        finally:
            os.fsync = real_fsync
        if Path(page).read_bytes() != before:
            return wrong("the old page was changed by the failed write")
        left = leftovers(folder, keep=("k.html",))
        return wrong(f"left behind {left}") if left else ok("old page intact, no temp file")

    # -- 2. values put into the page -----------------------------------------------------------
    @case("explore: a label name containing <!--<script>", group=G_EXPLORE)
    def _(ctx):
        page = run_explore(ctx, label_names=[HOSTILE, "dog", "car", "bus"])
        return verdict(hostile_check(page, "label name", lambda d: any(
            HOSTILE == item[0] for c in d["colourings"] for item in c["legend"].get("items", []))
            and d["points"]["label_name"][0] == HOSTILE))

    @case("explore: hostile title, texts, score name and hierarchy node names", group=G_EXPLORE)
    def _(ctx):
        from devinterp_losskernel.hierarchy import Hierarchy

        tree = Hierarchy.from_parents({HOSTILE + "node": "root", "a": HOSTILE + "node", "b": "root",
                                       "c": "root", "d": "root"}, classes=["a", "b", "c", "d"])
        page = run_explore(ctx, title=HOSTILE, texts=[HOSTILE + str(i) for i in range(N)], hierarchy=tree,
                           scores={HOSTILE + "score": np.arange(N, dtype=float)})
        return verdict(hostile_check(page, "title/texts/score/hierarchy", lambda d: (
            d["title"] == HOSTILE and d["points"]["text"][1] == HOSTILE + "1"
            and HOSTILE + "score" in d["scores"] and HOSTILE + "node" in d["points"]["path"][0])))

    # -- 3. label names --------------------------------------------------------------------------
    @case("explore: label -1 with label_names=['cat', 'dog']", "label", group=G_EXPLORE)
    def _(ctx):
        labels = np.where(np.arange(N) % 3 == 0, -1, np.arange(N) % 2)
        page = run_explore(ctx, labels=labels, label_names=["cat", "dog"])
        shown = page_strings(page)[1]["points"]["label_name"][0]
        return wrong(f"label -1 shown as {shown!r}")

    @case("explore: label 2 with only two label_names", "label_names", group=G_EXPLORE)
    def _(ctx):
        page = run_explore(ctx, labels=np.arange(N) % 3, label_names=["cat", "dog"])
        shown = page_strings(page)[1]["points"]["label_name"][2]
        return wrong(f"label 2 shown as {shown!r} without a word")

    @case("explore: label_names mapping without one of the labels", "label_names", group=G_EXPLORE)
    def _(ctx):
        page = run_explore(ctx, label_names={0: "cat", 1: "dog", 2: "car"})
        shown = page_strings(page)[1]["points"]["label_name"][3]
        return wrong(f"label 3 shown as {shown!r} without a word")

    @case("explore: label_names given as one string", "label_names", group=G_EXPLORE)
    def _(ctx):
        page = run_explore(ctx, label_names="cdab")
        shown = page_strings(page)[1]["points"]["label_name"][:4]
        return wrong(f"label names taken from the characters of a string: {shown}")

    # -- 4. index arrays -------------------------------------------------------------------------
    def given_lists(kernel, change):
        from devinterp_losskernel.analysis import top_correlated

        idx, val = top_correlated(kernel, None, 3)
        idx = change(idx.copy())
        return {"most": (idx, val)}

    @case("explore: neighbours= holding -1", "neighbours", group=G_EXPLORE)
    def _(ctx):
        kernel = small_kernel()
        lists = given_lists(kernel, lambda i: (i.__setitem__((0, 0), -1), i)[1])
        page = run_explore(ctx, kernel, neighbours=lists)
        return wrong(f"shipped as {page_strings(page)[1]['neighbours']['most'][0][0, 0]}")

    @case("explore: neighbours= holding n (one past the end)", "neighbours", group=G_EXPLORE)
    def _(ctx):
        kernel = small_kernel()
        lists = given_lists(kernel, lambda i: (i.__setitem__((4, 1), N), i)[1])
        page = run_explore(ctx, kernel, neighbours=lists)
        return wrong(f"shipped as {page_strings(page)[1]['neighbours']['most'][0][4, 1]}")

    @case("explore: neighbours= indices as floats, R values NaN", "neighbours", group=G_EXPLORE)
    def _(ctx):
        kernel = small_kernel()
        lists = given_lists(kernel, lambda i: i.astype(float) + 0.5)
        lists["most"] = (lists["most"][0], np.full_like(lists["most"][1], np.nan))
        run_explore(ctx, kernel, neighbours=lists)
        return wrong("fractional indices and NaN R accepted")

    @case("explore: neighbours= 'most_other' list holding same-label samples", "neighbours", "same label",
          group=G_EXPLORE)
    def _(ctx):
        from devinterp_losskernel.analysis import top_correlated

        kernel = small_kernel()
        lists = {"most": top_correlated(kernel, None, 3), "most_other": top_correlated(kernel, None, 3)}
        run_explore(ctx, kernel, neighbours=lists)
        return wrong("a 'different-label' list with same-label neighbours was shipped")

    # -- 5. images -------------------------------------------------------------------------------
    @case("explore: images [n, 3, 4, 4] (RGB CHW or 3×4 RGBA?)", "ambiguous", "layout", group=G_EXPLORE)
    def _(ctx):
        page = run_explore(ctx, images=np.random.default_rng(0).random((N, 3, 4, 4)))
        return wrong(f"read as {thumbnail_pixels(page_strings(page)[1]['points']['thumb'][0]).shape} image")

    @case("explore: images [n, 4, 4, 3] (HWC or CHW?)", "ambiguous", "layout", group=G_EXPLORE)
    def _(ctx):
        run_explore(ctx, images=np.random.default_rng(0).random((N, 4, 4, 3)))
        return wrong("a guessed layout was used")

    @case("explore: images [n, 3, 4, 4] with image_layout='NCHW'", group=G_EXPLORE)
    def _(ctx):
        images = np.zeros((N, 3, 4, 4), dtype=np.uint8)
        images[:, 0] = 255  # every image pure red
        page = run_explore(ctx, images=images, image_layout="NCHW", thumbnail_size=4, thumbnail_format="png")
        pixels = thumbnail_pixels(page_strings(page)[1]["points"]["thumb"][0])
        if pixels.shape[:2] != (4, 4) or not np.all(pixels[..., :3] == [255, 0, 0]):
            return wrong(f"thumbnail {pixels.shape} with colours {np.unique(pixels[..., :3].reshape(-1, 3), axis=0)}")
        return ok("4×4 red thumbnails")

    @case("explore: one NaN pixel", "finite", group=G_EXPLORE)
    def _(ctx):
        images = np.random.default_rng(0).random((N, 8, 8))
        images[5, 2, 2] = np.nan
        run_explore(ctx, images=images)
        return wrong("a NaN pixel became some colour")

    @case("cli: --images [n, 3, 4, 4] with --image-layout NCHW", group=G_EXPLORE)
    def _(ctx):
        folder = ctx.tmpdir()
        kernel = saved_kernel(folder)
        np.save(folder / "emb.npy", coords())
        images = np.zeros((N, 3, 4, 4), dtype=np.uint8)
        images[:, 2] = 255  # blue
        np.save(folder / "img.npy", images)
        run_cli("explore", kernel, "--embedding", folder / "emb.npy", "--images", folder / "img.npy",
                "--image-layout", "NCHW", "-o", folder / "k.html")
        pixels = thumbnail_pixels(page_strings(folder / "k.html")[1]["points"]["thumb"][0])
        blue = np.abs(pixels[..., :3].astype(int) - [0, 0, 255]).max() <= 8  # WebP is lossy
        if pixels.shape[:2] != (32, 32) or not blue:
            return wrong(f"thumbnail {pixels.shape}, colours {np.unique(pixels[..., :3].reshape(-1, 3), axis=0)[:4]}")
        return ok("blue 4×4 images (32 px thumbnails)")

    # -- 6. messages that name the right thing ---------------------------------------------------
    @case("explore: every sample has the same label (default UMAP map)", "same label", group=G_EXPLORE)
    def _(ctx):
        from devinterp_losskernel import LossKernel

        k = small_kernel()
        one = LossKernel(covariance=k.covariance, mean=k.mean, variance=k.variance, num_draws=50,
                         labels=torch.zeros(N, dtype=torch.long))
        run_explore(ctx, one, embedding=None)
        return wrong("no error")

    @case("explore: a kernel file path given as the kernel", "LossKernel.load", group=G_EXPLORE)
    def _(ctx):
        folder = ctx.tmpdir()
        run_explore(ctx, str(saved_kernel(folder)), embedding=coords())
        return wrong("a path was taken as a kernel")

    @case("cli: the kernel argument is an HTML page", "kernel", group=G_EXPLORE)
    def _(ctx):
        folder = ctx.tmpdir()
        page = run_explore(ctx, path=folder / "k.html")
        run_cli("explore", page, "-o", folder / "k2.html")
        return wrong("exit 0")

    @case("cli: --labels .npy of the wrong length", "--labels", group=G_EXPLORE)
    def _(ctx):
        folder = ctx.tmpdir()
        kernel = saved_kernel(folder)
        np.save(folder / "emb.npy", coords())
        np.save(folder / "labels.npy", np.arange(N + 1) % 4)
        run_cli("explore", kernel, "--embedding", folder / "emb.npy", "--labels", folder / "labels.npy",
                "-o", folder / "k.html")
        return wrong("exit 0")

    @case("cli: --images .npz holding two arrays", "--images", group=G_EXPLORE)
    def _(ctx):
        folder = ctx.tmpdir()
        kernel = saved_kernel(folder)
        np.save(folder / "emb.npy", coords())
        np.savez(folder / "img.npz", labels=np.arange(N), images=np.zeros((N, 8, 8)))
        run_cli("explore", kernel, "--embedding", folder / "emb.npy", "--images", folder / "img.npz",
                "-o", folder / "k.html")
        return wrong("exit 0: one of the two arrays silently chosen")

    @case("cli: --texts a binary file", "--texts", group=G_EXPLORE)
    def _(ctx):
        folder = ctx.tmpdir()
        kernel = saved_kernel(folder)
        np.save(folder / "emb.npy", coords())
        (folder / "t.bin").write_bytes(bytes(range(256)))
        run_cli("explore", kernel, "--texts", folder / "t.bin", "--embedding", folder / "emb.npy",
                "-o", folder / "k.html")
        return wrong("exit 0")

    @case("cli: --embedding file missing, --labels a folder", "--embedding", "--labels", group=G_EXPLORE)
    def _(ctx):
        folder = ctx.tmpdir()
        kernel = saved_kernel(folder)
        run_cli("explore", kernel, "--embedding", folder / "missing.npy", "-o", folder / "k.html")
        return wrong("exit 0")

    @case("cli: --score twice with the same name", "--score", group=G_EXPLORE)
    def _(ctx):
        folder = ctx.tmpdir()
        kernel = saved_kernel(folder)
        np.save(folder / "emb.npy", coords())
        np.save(folder / "a.npy", np.arange(N, dtype=float))
        np.save(folder / "b.npy", -np.arange(N, dtype=float))
        run_cli("explore", kernel, "--embedding", folder / "emb.npy", "--score", f"s={folder / 'a.npy'}",
                "--score", f"s={folder / 'b.npy'}", "-o", folder / "k.html")
        return wrong("exit 0: one score silently replaced the other")

    @case("explore: scores holding strings", "scores", group=G_EXPLORE)
    def _(ctx):
        run_explore(ctx, scores={"s": ["a"] * N})
        return wrong("no error")

    @case("explore: embedding holding NaN", "embedding", group=G_EXPLORE)
    def _(ctx):
        emb = coords()
        emb[3] = np.nan
        run_explore(ctx, embedding=emb)
        return wrong("a point without coordinates was drawn nowhere")

    @case("explore: neighbours= R values above 1 (a covariance, not R)", "neighbours", group=G_EXPLORE)
    def _(ctx):
        kernel = small_kernel()
        idx, val = given_lists(kernel, lambda i: i)["most"]
        run_explore(ctx, kernel, neighbours={"most": (idx, val * 7)})
        return wrong("R values clipped to ±1 without a word")

    @case("explore: a hierarchy that lacks one of the labels", "hierarchy", group=G_EXPLORE)
    def _(ctx):
        from devinterp_losskernel.hierarchy import Hierarchy

        tree = Hierarchy.from_parents({"a": "root", "b": "root", "c": "root"}, classes=["a", "b", "c"])
        page = run_explore(ctx, hierarchy=tree)
        return wrong(f"label 3 drawn with path {page_strings(page)[1]['points']['path'][3]!r}")

    @case("explore: one label and embedding= given (no different-label lists)", "label", group=G_EXPLORE)
    def _(ctx):
        import warnings

        from devinterp_losskernel import LossKernel

        k = small_kernel()
        one = LossKernel(covariance=k.covariance, mean=k.mean, variance=k.variance, num_draws=50,
                         labels=torch.zeros(N, dtype=torch.long))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            page = run_explore(ctx, one)
        data = page_strings(page)[1]
        said = [str(w.message) for w in caught if "label" in str(w.message)]
        if "most_other" in data["neighbours"]:
            return wrong("a 'most_other' list was shipped for a single label")
        if not said or not data.get("unavailable"):
            return wrong("the hide-same-label lists were dropped without a word (the checkbox falls back "
                         "to same-label neighbours)")
        return ok(f"warned and recorded: {said[0][:80]}")

    @case("explore: random_state=None leaves the global RNGs alone", group=G_EXPLORE)
    def _(ctx):
        np_state, py_state, torch_state = np.random.get_state()[1].copy(), random.getstate(), torch.get_rng_state()
        run_explore(ctx, embedding=None, random_state=None)
        same = (np.array_equal(np_state, np.random.get_state()[1]) and py_state == random.getstate()
                and torch.equal(torch_state, torch.get_rng_state()))
        return ok("global RNGs untouched") if same else wrong("explore drew from a global RNG")


__all__ = ["register", "run_cli", "run_explore", "small_kernel"]
