"""Fault cases for files, stores and the devinterp-2 ``llc()`` twin (loaded by fault_cases.py).

Four kinds of fault, each a class rather than one example:

- counted twice or mixed: duplicate / negative / out-of-range / non-integer chain, draw and row
  selections; files of another format version; metadata types lost through an export;
- messages that name the wrong thing or nothing: a path that is not a store, a damaged store
  (a deleted or truncated chunk), ragged input, a batch larger than the dataset, observables of
  the wrong type or size;
- silently smaller than asked: the probe sequences devinterp's Observable leaves out;
- outputs that destroy inputs: a save below a regular file, onto a folder or onto an input,
  and temp files left by a failed write.

Names start with "files:", "store:" or "llc:" so ``-k`` selects them. The "store:" cases that
need a real run and the "llc:" cases need devinterp 2.x and are registered only there; the
others need xarray (and zarr for the zarr stores) and are left out where it is missing.

    .venv-ci2/bin/python benchmarks/fault_cases.py -k store
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import io
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

GROUP = "files & stores"
GROUP_LLC = "devinterp-2 llc() twin"

# metadata of every type a user puts there, and the types it must come back with
EVERY_TYPE = {"none": None, "true": True, "int": 7, "big": 2**40, "float": 1.5, "nan": float("nan"),
              "inf": float("inf"), "-inf": -float("inf"), "str": "s", "list": [1, None, "a", float("nan")],
              "nested": {"a": {"b": [float("inf"), {"c": None}]}, "flag": False}, "tuple": (1, 2),
              "int_keys": {0: 1.0, 3: "x"}}


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _type_differences(metadata) -> dict:
    return {k: metadata.get(k, "<missing>") for k, v in EVERY_TYPE.items() if not _same(metadata.get(k), v)}


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _devinterp_major():
    try:
        from importlib.metadata import version

        return int(version("devinterp").split(".")[0])
    except Exception:  # noqa: BLE001
        return None


# -- data: a store laid out as devinterp 2's sample() writes it --------------------------------
def fake_store(chains=3, draws=11, n=6, tokens=4, seed=1):
    """(an xarray Dataset in devinterp 2's layout, its float32 losses [chain, draw, n, T])."""
    import xarray as xr

    g = np.random.default_rng(seed)
    losses = (2.0 + 0.1 * g.standard_normal((chains, draws, n, tokens))).astype(np.float32)
    ds = xr.Dataset(
        {"loss_probe": (("chain", "draw", "batch_probe", "token_pos"), losses),
         "input_ids_probe": (("batch_probe", "token"), g.integers(0, 9, (n, tokens + 1))),
         "sampling_loss": (("chain", "draw", "batch", "token_pos"), np.ones((chains, draws, 2, tokens), np.float32))},
        attrs={"completed": 1, "metadata": {"config": {"sampler": {"lr": 1e-3, "n_beta": 20.0}}}})
    return ds, losses


def zarr_store(root: Path, completed: bool = True):
    """fake_store() on disk as devinterp writes it: zarr v3, one chain and 4 draws a chunk."""
    ds, losses = fake_store()
    if not completed:
        del ds.attrs["completed"]
    enc = {v: {"chunks": tuple(1 if d == "chain" else 4 if d == "draw" else s for d, s in zip(ds[v].dims, ds[v].shape))}
           for v in ds.data_vars}
    path = root / "run.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.to_zarr(path, mode="w", encoding=enc, consolidated=False, zarr_format=3)
    return path, losses


def per_sequence(losses) -> np.ndarray:
    return np.asarray(losses, np.float64).mean(-1).reshape(-1, losses.shape[-2])


class TinyLM(nn.Module):
    def __init__(self, vocab=13, width=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.out = nn.Linear(width, vocab)

    def forward(self, input_ids):
        return self.out(torch.tanh(self.embed(input_ids)))


def tokens(n=80, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": row} for row in torch.randint(0, 13, (n, length), generator=g)]


_RUN = {}


def devinterp_run(root: Path, aborted: bool = False) -> Path:
    """A copy under ``root`` of a real devinterp 2 sample() store (2 chains × 60 draws, chunks of
    50 draws; with ``aborted`` chain 1 fails a few steps in), made once per process."""
    if aborted not in _RUN:
        from devinterp.slt.lm_loss import compute_per_token_loss
        from devinterp.slt.sampling import sample

        calls = {"n": 0}

        def loss_fn(model, input_ids):
            loss = compute_per_token_loss(model, input_ids)
            if aborted and torch.is_grad_enabled():
                calls["n"] += 1
                if calls["n"] > 61 + 20:  # chain 0 (61 steps) whole, chain 1 fails at its step 21
                    return loss * float("nan")
            return loss

        folder = tempfile.mkdtemp(prefix="edges_files_run_")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        where = Path(folder) / "run.zarr"
        torch.manual_seed(0)
        data = tokens()
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):  # devinterp's progress bars
            warnings.simplefilter("ignore")
            sample(TinyLM(), data, {"probe": data[:40]}, lr=1e-3, n_beta=20.0, num_chains=2, num_draws=60,
                   batch_size=8, num_burnin_steps=1, num_init_loss_batches=1, localization=50.0, loss_fn=loss_fn,
                   device="cpu", output_path=str(where))
        _RUN[aborted] = where
    target = root / "run.zarr"
    shutil.copytree(_RUN[aborted], target)
    return target


def register(h):  # noqa: C901  (one function per case, registered here)
    from devinterp_losskernel import LossKernel, loss_kernel
    from devinterp_losskernel.estimate import CHECKPOINT_FORMAT, CHECKPOINT_NAME, _Checkpoint
    from devinterp_losskernel.provenance import save_verified
    from devinterp_losskernel.validation import check_output_path

    have_xarray, have_zarr = _has("xarray"), _has("zarr")
    major = _devinterp_major()
    case = h.case

    # -- selections: each chain, draw and row counted once ------------------------------------
    if have_xarray:
        for label, kwargs, keys in (
            ("chains=[0, 0]", dict(chains=[0, 0]), ("chains",)),
            ("chains=[-1] (no counting from the end)", dict(chains=[-1]), ("chains",)),
            ("chains=[3] of 3", dict(chains=[3]), ("chains",)),
            ("chains=[1.5]", dict(chains=[1.5]), ("chains",)),
            ("chains=[True]", dict(chains=[True]), ("chains",)),
            ("draws=[3, 3]", dict(draws=[3, 3]), ("draws",)),
            ("draws=slice(20, None) selects none of 11", dict(draws=slice(20, None)), ("draws",)),
            ("rows=[2, 2]", dict(rows=[2, 2]), ("rows",)),
            ("draws_per_read=0", dict(draws_per_read=0), ("draws_per_read",)),
            ("observable=0 (not a name)", dict(observable=0), ("observable",)),
        ):
            def _(ctx, kwargs=kwargs):
                ds, _losses = fake_store()
                args = dict(kwargs)
                observable = args.pop("observable", "probe")
                ctx.arm()
                k = LossKernel.from_samples(ds, observable, **args)
                return h.wrong(f"accepted: {k.num_draws} draws, draws_per_chain={k.draws_per_chain}")
            case(f"files: from_samples {label}", *keys, group=GROUP, staged=True)(_)

        @case("store: a store with 0 draws", "empty", group=GROUP, staged=True)
        def _(ctx):
            ds, _losses = fake_store(draws=0)
            ctx.arm()
            LossKernel.from_samples(ds, "probe")
            return h.wrong("read")

        @case("files: from_samples chains=[2, 0], draws=slice(3, None)", group=GROUP)
        def _(ctx):
            ds, losses = fake_store()
            k = LossKernel.from_samples(ds, "probe", chains=[2, 0], draws=slice(3, None), draws_per_read=4)
            ref = np.cov(per_sequence(losses[[0, 2], 3:]), rowvar=False)
            good = np.allclose(k.covariance.numpy(), ref, rtol=1e-12, atol=1e-16) and k.num_draws == 16
            return h.ok("exactly the 16 selected draws") if good else \
                h.wrong(f"{k.num_draws} draws, not the 16 selected")

    @case("files: loss_kernel rows=[1, 1]", "rows", group=GROUP)
    def _(ctx):
        k = loss_kernel(np.random.default_rng(0).normal(size=(20, 5)), rows=[1, 1])
        return h.wrong(f"accepted: covariance {tuple(k.covariance.shape)}")

    @case("files: loss_kernel chains of different n (ragged)", "losses[1]", group=GROUP)
    def _(ctx):
        g = np.random.default_rng(0)
        loss_kernel([g.normal(size=(10, 6)), g.normal(size=(12, 5))])
        return h.wrong("accepted")

    @case("files: loss_kernel chains of different lengths", group=GROUP)
    def _(ctx):
        g = np.random.default_rng(0)
        a, b = g.normal(size=(10, 6)), g.normal(size=(17, 6))
        k = loss_kernel([a, b])
        good = np.allclose(k.covariance.numpy(), np.cov(np.concatenate([a, b]), rowvar=False), rtol=1e-12) \
            and k.draws_per_chain == {0: 10, 1: 17}
        return h.ok("each chain whole, draws_per_chain recorded") if good else h.wrong(f"{k.draws_per_chain}")

    @case("files: loss_kernel init_loss of the wrong length (streamed)", "init_loss", group=GROUP)
    def _(ctx):
        g = np.random.default_rng(0)
        k = loss_kernel((g.normal(size=(5, 6)) for _ in range(4)), init_loss=np.zeros(5))
        return h.wrong(f"accepted: {k}")

    # -- files: format versions, types, output paths ------------------------------------------
    def payload_file(ctx, **changes) -> Path:
        path = ctx.tmpdir() / "k.pt"
        h.small_kernel().save(path)
        payload = torch.load(path, weights_only=True)
        payload.update(changes)
        save_verified(payload, path)  # a valid checksum: only the version is off
        return path

    @case("files: kernel file of format version 99", "format version 99", group=GROUP, staged=True)
    def _(ctx):
        path = payload_file(ctx, format_version=99, written_by="devinterp-losskernel 7.0.0")
        ctx.arm()
        k = LossKernel.load(path)
        return h.wrong(f"loaded without a word: {k}")

    @case("files: kernel file with format_version '2' (a str)", "format_version", group=GROUP, staged=True)
    def _(ctx):
        path = payload_file(ctx, format_version="2")
        ctx.arm()
        LossKernel.load(path)
        return h.wrong("loaded")

    @case("files: checkpoint of format version 99", "format version 99", group=GROUP, staged=True)
    def _(ctx):
        d = ctx.tmpdir()
        save_verified({"format": CHECKPOINT_FORMAT, "format_version": 99, "arguments": {}}, d / CHECKPOINT_NAME)
        ctx.arm()
        _Checkpoint(d, None, None, devinterp_major=major or 1)
        return h.wrong("checkpoint accepted")

    @case("files: save/load keeps None, bool, int, NaN/±Inf, str, lists, nested dicts", group=GROUP)
    def _(ctx):
        path = ctx.tmpdir() / "k.pt"
        h.small_kernel(metadata=dict(EVERY_TYPE)).save(path)
        bad = _type_differences(LossKernel.load(path).metadata)
        return h.ok("every type back as written") if not bad else h.wrong(f"came back as {bad}")

    if have_xarray:
        exports = [("netCDF", "nc", _has("scipy") or _has("netCDF4") or _has("h5netcdf"))]
        exports.append(("zarr", "zarr", have_zarr))
        for label, suffix, available in exports:
            if not available:
                continue

            def _(ctx, suffix=suffix):
                import xarray as xr

                path = ctx.tmpdir() / f"k.{suffix}"
                ds = h.small_kernel(metadata=dict(EVERY_TYPE)).to_xarray()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if suffix == "zarr":
                        ds.to_zarr(path, consolidated=False)
                        back = xr.open_zarr(path, consolidated=False).load()
                    else:
                        ds.to_netcdf(path)
                        back = xr.open_dataset(path).load()
                attrs = {k: back.attrs[f"meta_{k}"] for k in ("nan", "inf", "-inf")}
                if any(not isinstance(v, (float, np.floating)) for v in attrs.values()):
                    return h.wrong(f"NaN/Inf attributes came back as {attrs}")
                bad = _type_differences(LossKernel.from_xarray(back).metadata)
                return h.ok("NaN/±Inf attributes stay floats; from_xarray gives every type back") if not bad \
                    else h.wrong(f"came back as {bad}")
            case(f"files: to_xarray through {label} keeps metadata types", group=GROUP)(_)

    @case("files: numpy int sample_ids through save/load", group=GROUP)
    def _(ctx):
        k = h.small_kernel(sample_ids=list(np.arange(5, dtype=np.int64)))
        ids = LossKernel.load(k.save(ctx.tmpdir() / "k.pt")).sample_ids
        good = ids == [0, 1, 2, 3, 4] and all(type(i) is int for i in ids)
        return h.ok("ints stay ints") if good else h.wrong(f"came back as {ids!r}")

    @case("files: save below a regular file", "regular file", group=GROUP, staged=True)
    def _(ctx):
        d = ctx.tmpdir()
        (d / "notes.txt").write_text("keep")
        ctx.arm()
        h.small_kernel().save(d / "notes.txt" / "k.pt")
        return h.wrong("saved")

    @case("files: save onto an existing folder", "folder", group=GROUP, staged=True)
    def _(ctx):
        d = ctx.tmpdir()
        ctx.arm()
        h.small_kernel().save(d)
        return h.wrong("saved")

    @case("files: a failed save keeps the old file and leaves no temp file", group=GROUP)
    def _(ctx):
        d = ctx.tmpdir()
        path = h.small_kernel().save(d / "k.pt")
        before = path.read_bytes()
        real = torch.save

        def dying(obj, f, *args, **kwargs):
            with open(f, "wb") as handle:
                handle.write(b"half")
            raise OSError("disk full")

        torch.save = dying
        try:
            h.small_kernel(metadata={"new": 1}).save(path)
        except OSError:
            pass
        finally:
            torch.save = real
        left = sorted(p.name for p in d.iterdir())
        good = path.read_bytes() == before and left == ["k.pt"]
        return h.ok("old file intact, no temp file") if good else h.wrong(f"folder holds {left}")

    @case("files: check_output_path with the output one of the inputs", "input", group=GROUP)
    def _(ctx):
        d = ctx.tmpdir()
        (d / "k.pt").write_bytes(b"input")
        os.symlink(d / "k.pt", d / "alias.pt")
        check_output_path(d / "alias.pt", "out", inputs=[d / "k.pt"])
        return h.wrong("accepted an output that is the input")

    @case("files: load a folder as a kernel file", "folder", group=GROUP)
    def _(ctx):
        LossKernel.load(ctx.tmpdir())
        return h.wrong("loaded")

    # -- stores --------------------------------------------------------------------------------
    if have_xarray and have_zarr:
        @case("store: a path that is not a zarr store", "zarr store", group=GROUP)
        def _(ctx):
            LossKernel.from_samples(ctx.tmpdir(), "probe")
            return h.wrong("read")

        @case("store: a kernel file given as the store", "a file", group=GROUP, staged=True)
        def _(ctx):
            path = h.small_kernel().save(ctx.tmpdir() / "k.pt")
            ctx.arm()
            LossKernel.from_samples(path, "probe")
            return h.wrong("read")

        for label, chunk in (("a deleted chunk mid-chain", "c/0/1/0/0"), ("a deleted last chunk", "c/2/2/0/0")):
            def _(ctx, chunk=chunk):
                path, _losses = zarr_store(ctx.tmpdir())
                (path / "loss_probe" / chunk).unlink()
                ctx.arm()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    k = LossKernel.from_samples(path, "probe")
                said = "; ".join(str(w.message) for w in caught)
                return h.wrong(f"read {k.num_draws} draws (draws_per_chain={k.draws_per_chain}); said: {said[:120]}")
            case(f"store: {label} (xarray-written)", chunk, group=GROUP, staged=True)(_)

        @case("store: a truncated chunk (xarray-written)", "damaged", group=GROUP, staged=True)
        def _(ctx):
            path, _losses = zarr_store(ctx.tmpdir())
            chunk = path / "loss_probe" / "c" / "1" / "1" / "0" / "0"
            chunk.write_bytes(chunk.read_bytes()[:10])
            ctx.arm()
            LossKernel.from_samples(path, "probe")
            return h.wrong("read")

        @case("store: an interrupted run (no 'completed' flag)", group=GROUP)
        def _(ctx):
            path, losses = zarr_store(ctx.tmpdir(), completed=False)
            for array in ("loss_probe", "sampling_loss"):
                for chunk in ("1", "2"):  # chain 1 stopped after 4 draws
                    (path / array / "c" / "1" / chunk / "0" / "0").unlink()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                k = LossKernel.from_samples(path, "probe")
            said = " ".join(str(w.message) for w in caught)
            ref = np.cov(per_sequence(losses[[0, 2]]), rowvar=False)
            good = np.allclose(k.covariance.numpy(), ref, rtol=1e-12) and k.rejected_per_chain == {1: 11}
            if good and "interrupted" in said:
                return h.ok("chain 1 dropped, said as interrupted, recorded in rejected_per_chain")
            return h.wrong(f"draws_per_chain={k.draws_per_chain}; said: {said[:120]}")

    if major == 2:
        for label, damage, keys in (
            ("a deleted chunk of a devinterp run", "delete", ("damaged",)),
            ("a truncated chunk of a devinterp run", "truncate", ("damaged",)),
            ("a deleted last chunk of a devinterp run", "delete-last", ("damaged",)),
        ):
            def _(ctx, damage=damage):
                path = devinterp_run(ctx.tmpdir())
                chunk = path / "loss_probe" / "c" / "0" / ("1" if damage == "delete-last" else "0") / "0" / "0"
                if damage == "truncate":
                    chunk.write_bytes(chunk.read_bytes()[: len(chunk.read_bytes()) // 2])
                else:
                    chunk.unlink()
                ctx.arm()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    k = LossKernel.from_samples(path, "probe")
                said = "; ".join(str(w.message) for w in caught)
                return h.wrong(f"read {k.num_draws} draws (draws_per_chain={k.draws_per_chain}); said: {said[:120]}")
            case(f"store: {label}", *keys, group=GROUP, staged=True)(_)

        @case("store: a chain devinterp aborted is dropped, not called damaged", group=GROUP, staged=True)
        def _(ctx):
            import xarray as xr

            path = devinterp_run(ctx.tmpdir(), aborted=True)
            ctx.arm()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                k = LossKernel.from_samples(path, "probe")
            said = " ".join(str(w.message) for w in caught)
            stored = np.asarray(xr.open_zarr(path, consolidated=False)["loss_probe"].values, np.float64).mean(-1)
            good = np.allclose(k.covariance.numpy(), np.cov(stored[0], rowvar=False), rtol=1e-10) \
                and k.rejected_per_chain == {1: 60} and "aborted by devinterp" in said
            return h.ok("chain 1 dropped whole, said, recorded") if good else \
                h.wrong(f"draws_per_chain={k.draws_per_chain}; said: {said[:120]}")

        # -- llc(): checked at the entry, before any SGLD step ---------------------------------
        from devinterp_losskernel import llc

        run_args = dict(lr=1e-3, n_beta=10.0, num_chains=1, num_draws=2, batch_size=8, num_init_loss_batches=1,
                        device="cpu")
        data = tokens(40)
        for label, changes, keys in (
            ("batch_size=12 on a 10-item dataset", dict(dataset=data[:10], batch_size=12), ("batch_size",)),
            ("observable given as {'input_ids': tensor}",
             dict(observables={"probe": {"input_ids": torch.zeros(40, 9, dtype=torch.long)}}),
             ("observables['probe']",)),
            ("observable (dataset, 0) batches_per_draw", dict(observables={"probe": (data, 0)}), ("batches_per_draw",)),
            ("observable (dataset, 2.5) batches_per_draw", dict(observables={"probe": (data, 2.5)}),
             ("batches_per_draw",)),
            ("observable smaller than batch_size × batches_per_draw", dict(observables={"probe": data[:10]}),
             ("observables['probe']",)),
            ("observable=0", dict(observable=0), ("observable",)),
            ("param_masks names a missing parameter", dict(param_masks={"nope": None}), ("param_masks",)),
            ("probe sequences of another length", dict(observables={"probe": tokens(40, length=5)}), ("length",)),
            ("callback_kwargs rows=[1, 1]", dict(callback_kwargs={"rows": [1, 1]}), ("rows",)),
        ):
            def _(ctx, changes=changes):
                args = dict(model=TinyLM(), dataset=data, observables={"probe": data}, **run_args)
                args.update(changes)
                ctx.arm()
                ds = llc(**args)
                return h.wrong(f"ran: {dict(ds.sizes)}")
            case(f"llc: {label}", *keys, group=GROUP_LLC, staged=True)(_)

        @case("llc: README probe of 64 sequences gives a 24 × 24 kernel", group=GROUP_LLC)
        def _(ctx):
            probe = tokens(256)[:64]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ds, k = llc(TinyLM(), tokens(256), {"probe": probe}, return_kernel=True, **run_args)
            said = " ".join(str(w.message) for w in caught)
            dropped = k.metadata.get("dropped", {}).get("probe_samples", {})
            if ds.sizes["sample"] == 24 and dropped.get("count") == 40 and "24 of the 64" in said \
                    and ds.attrs.get("probe_samples_used") == 24:
                return h.ok("24 of 64 kept: said in a warning, recorded in metadata['dropped'] and ds.attrs")
            return h.wrong(f"{ds.sizes['sample']} of 64 sequences, metadata['dropped']={dropped}, said: {said[:100]}")
