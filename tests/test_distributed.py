"""Exact merge of accumulators across torch.distributed ranks: two gloo processes on CPU."""

import os
import socket
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from devinterp_losskernel import KernelAccumulator
from devinterp_losskernel.distributed import all_reduce_accumulator, shard_chains

WORLD = 2
N = 24  # probe samples
DRAWS = (173, 91)  # per rank: unequal, and not multiples of the block size
ROWS = [3, 0, 17, 17, 22]  # rectangular case: repeated and unsorted rows are allowed


def all_traces():
    """Every rank's draws: losses ≈ 1e4 (offset) with variance ≈ 1e-6, correlated, with a
    per-rank shift of the mean so the merge's mean correction matters."""
    rng = np.random.default_rng(1234)
    mixing = rng.normal(size=(N, N)) / np.sqrt(N)
    offset = 1e4 + rng.normal(size=N)
    traces = []
    for rank, draws in enumerate(DRAWS):
        noise = rng.normal(size=(draws, N)) @ mixing * 1e-3
        traces.append(offset + noise + 3e-4 * rank)
    return traces


def float32_scale(traces):
    return (traces - 1e4) * 1e3


def feed(acc, traces):
    """Ragged update sizes, leaving draws in the buffer (all_reduce must flush them)."""
    sizes = [1, 5, 40, 2] * 100
    start = 0
    for size in sizes:
        if start >= len(traces):
            break
        acc.update(torch.from_numpy(traces[start : start + size]))
        start += size


def _worker(rank, port, out_dir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        mine = all_traces()[rank]
        results = {}
        for name, kwargs in (("square", {}), ("rect", {"rows": ROWS}),
                             ("float32", {"dtype": torch.float32})):
            acc = KernelAccumulator(N, block_size=16, **kwargs)
            feed(acc, float32_scale(mine) if name == "float32" else mine)
            all_reduce_accumulator(acc)
            results[name] = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                             for k, v in acc.state_dict().items()}

        # A rank without draws takes part with count 0.
        acc = KernelAccumulator(N, block_size=16)
        if rank == 0:
            feed(acc, mine)
        acc.all_reduce()  # the method form
        results["one_empty"] = acc.state_dict()

        # Mismatched shapes raise on every rank instead of hanging.
        bad = KernelAccumulator(N + rank)
        try:
            all_reduce_accumulator(bad)
            results["mismatch"] = None
        except ValueError as error:
            results["mismatch"] = str(error)

        results["shard"] = shard_chains(5)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out_dir = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def relative_error(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def reference_cov(traces):
    """Two-pass float64 np.cov of the draws, shifted by the exact offset 1e4 (subtracting it is
    exact for these values, and covariance is shift-invariant)."""
    return np.cov(traces - 1e4, rowvar=False, ddof=1)


# Input rounding alone is 1e4 · 2⁻⁵³ ≈ 1e-12 absolute on 1e-3-scale deviations, so 1e-8
# relative is float64 grade here; the textbook Σℓℓᵀ − Nμμᵀ gets no digit right.
TOL = 1e-8


def single_process(**kwargs):
    acc = KernelAccumulator(N, block_size=16, **kwargs)
    for traces in all_traces():
        feed(acc, traces)
    return acc.state_dict()


def test_all_reduce_matches_single_accumulator_and_numpy(rank_results):
    traces = np.concatenate(all_traces())
    reference = reference_cov(traces)
    single = single_process()
    naive = (traces.T @ traces - len(traces) * np.outer(traces.mean(0), traces.mean(0)))
    assert relative_error(naive / (len(traces) - 1), reference) > 1e-3, "the check must be able to fail"
    for results in rank_results:
        state = results["square"]
        assert state["count"] == sum(DRAWS)
        cov = (state["m2"] / (state["count"] - 1)).numpy()
        # variances are ~1e-6 on top of a 1e4 mean: any cancellation would show here
        assert relative_error(cov, reference) < TOL
        assert relative_error(state["m2"].numpy(), single["m2"].numpy()) < TOL
        np.testing.assert_allclose(state["mean"].numpy(), traces.mean(0), rtol=1e-14)
        np.testing.assert_allclose((state["m2_diag"] / (state["count"] - 1)).numpy(),
                                   np.diag(reference), rtol=TOL)
        np.testing.assert_allclose(state["m2_diag"].numpy(), np.diag(state["m2"].numpy()), rtol=TOL)
    # every rank holds the same merged state, bit for bit
    for key in ("mean", "m2", "m2_diag"):
        assert torch.equal(rank_results[0]["square"][key], rank_results[1]["square"][key])


def test_all_reduce_rectangular(rank_results):
    traces = np.concatenate(all_traces())
    full = reference_cov(traces)
    single = single_process(rows=ROWS)
    for results in rank_results:
        state = results["rect"]
        assert state["m2"].shape == (len(ROWS), N)
        assert state["rows"].tolist() == ROWS
        cov = (state["m2"] / (state["count"] - 1)).numpy()
        assert relative_error(cov, full[ROWS]) < TOL
        assert relative_error(state["m2"].numpy(), single["m2"].numpy()) < TOL
        np.testing.assert_allclose((state["m2_diag"] / (state["count"] - 1)).numpy(),
                                   np.diag(full), rtol=TOL)


def test_all_reduce_float32(rank_results):
    # float32 cannot resolve 1e-3 deviations on a 1e4 mean (its spacing there is 1e-3), so
    # the float32 case gets O(1e3) losses with O(1) deviations: float32 grade is ~1e-6.
    traces = np.concatenate([float32_scale(t) for t in all_traces()])
    traces = traces.astype(np.float32).astype(np.float64)
    reference = np.cov(traces, rowvar=False, ddof=1)
    for results in rank_results:
        state = results["float32"]
        assert state["m2"].dtype == torch.float32 and state["count"] == sum(DRAWS)
        cov = (state["m2"].double() / (state["count"] - 1)).numpy()
        assert relative_error(cov, reference) < 1e-4


def test_rank_without_draws(rank_results):
    reference = reference_cov(all_traces()[0])
    for results in rank_results:
        state = results["one_empty"]
        assert state["count"] == DRAWS[0]
        assert relative_error((state["m2"] / (state["count"] - 1)).numpy(), reference) < TOL


def test_mismatch_raises_on_every_rank(rank_results):
    for results in rank_results:
        assert results["mismatch"] is not None and "num_samples" in results["mismatch"]
    assert [r["shard"] for r in rank_results] == [[0, 1, 2], [3, 4]]


def test_shard_chains_partitions():
    for chains in range(0, 20):
        for world in range(1, 7):
            shards = [shard_chains(chains, r, world) for r in range(world)]
            assert sum(shards, []) == list(range(chains))
            sizes = [len(s) for s in shards]
            assert max(sizes) - min(sizes) <= 1
    assert shard_chains(7) == list(range(7))  # not initialized: one rank
    with pytest.raises(ValueError, match="rank"):
        shard_chains(4, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        shard_chains(4, 0, 0)


def test_requires_initialized_process_group():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialized")
    with pytest.raises(RuntimeError, match="init_process_group"):
        all_reduce_accumulator(KernelAccumulator(3))
