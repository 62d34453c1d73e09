"""benchmarks/gpu_check.py: the script a lent GPU gets one call of must not fail on a bug.

Its CPU smoke mode runs every part at tiny sizes; its extrapolation is checked by hand.
(The other benchmarks are run by hand and record their numbers in benchmarks/RESULTS.md.)
"""

import importlib
import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("gpu_check")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_gpu_check_smoke_run_on_cpu_measures_every_part(gpu_check, tmp_path):
    pytest.importorskip("torchvision")
    results = tmp_path / "RESULTS_gpu.md"
    rc = gpu_check.main(["--device", "cpu", "--sizes", "256", "--block-size", "16", "--probe-images", "8",
                         "--probe-batch-size", "4", "--image-size", "64", "--sgld-batch-size", "4",
                         "--min-time", "0", "--threads", "1", "--results", str(results)])
    assert rc == 0
    text = results.read_text()
    assert "CPU smoke run (--device cpu): not GPU numbers" in text
    # every part measured something: no row was skipped, none ran out of memory
    assert not re.search(r"\|\s*(skipped|out of memory)", text)
    for heading in ("KernelAccumulator.update() on the CPU", "GoogLeNet probe pass, 64×64, 8 images",
                    "GoogLeNet SGLD step"):
        assert f"**{heading}" in text
    for variant in ("float32", "bf16 autocast", "float32 + channels_last", "bf16 autocast + channels_last"):
        assert re.search(rf"\|\s*{re.escape(variant)}\s*\|", text), variant
    # the paper extrapolation needs the fold time at n = 10,000, which this run did not measure
    assert "Extrapolation skipped" in text


def test_gpu_check_extrapolation_adds_steps_probe_passes_and_folds(gpu_check):
    fold = {("float64", 10_000): 2e-3, ("float32", 10_000): 1e-3}
    rates = {"float32": 1_000.0, "bf16 autocast + channels_last": 4_000.0}
    steps = {"float32": 0.1, "bf16 autocast + channels_last": 0.05}
    headers, rows = gpu_check.extrapolate(fold, rates, steps)
    assert headers[-2:] == ["total h", "fold share"]
    by_setting = {row[0]: row[1:] for row in rows}
    # 15 chains × 600 steps = 9,000 SGLD steps; 7,500 draws, each a 10,000-image pass and a fold
    steps_h, probe_h, fold_h, total_h, share = by_setting["float32, fold float64"]
    assert float(steps_h) == pytest.approx(9_000 * 0.1 / 3600, abs=0.005)
    assert float(probe_h) == pytest.approx(7_500 * 10_000 / 1_000 / 3600, abs=0.005)
    assert float(fold_h) == pytest.approx(7_500 * 2e-3 / 3600, abs=0.0005)
    assert float(total_h) == pytest.approx((900 + 75_000 + 15) / 3600, abs=0.005)
    assert float(share.rstrip("%")) == pytest.approx(100 * 15 / 75_915, abs=0.05)
    assert float(by_setting["bf16 autocast + channels_last, fold float32"][3]) == pytest.approx(
        (9_000 * 0.05 + 7_500 * 10_000 / 4_000 + 7_500 * 1e-3) / 3600, abs=0.005)
    # a missing measurement leaves its rows out instead of inventing them
    assert gpu_check.extrapolate({}, rates, steps)[1] == []
