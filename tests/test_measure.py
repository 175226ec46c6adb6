"""core.measure: the one peak-memory reader (MiB), peak memory of a block, the load timer, repeats, the in-turn rule,
and that the studies and benchmarks measure through it."""

import re
import time
from pathlib import Path

import psutil
import pytest
import torch

from helpers import PACKAGE_DIR
from helpers.core import measure

ALLOCATION = 50_000_000  # float32s: 200 MB = 190.7 MiB, every page written


def _vm_hwm_kib() -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1])


def test_peak_memory_is_the_process_peak_rss_in_mib():
    peak = measure.peak_memory_MiB("cpu")
    assert peak == pytest.approx(_vm_hwm_kib() / 1024, rel=0.05), "VmHWM (kB) read as MiB, not MB"
    assert peak >= psutil.Process().memory_info().rss / 2**20 * 0.95, "a peak is at least what is held now"


def test_peak_memory_sees_an_allocation_of_200_MB_in_MiB():
    with measure.peak_memory("cpu") as memory:
        block = torch.ones(ALLOCATION)
        del block
    assert 150 <= memory["added_MiB"] <= 400, memory
    assert memory["peak_MiB"] >= memory["added_MiB"]
    with measure.peak_memory("cpu") as small:
        torch.ones(1000)
    assert small["added_MiB"] < 50, f"each measurement has its own peak, not the last one's: {small}"
    assert small["method"].startswith("peak RSS") and set(small) == {"method", "peak_MiB", "added_MiB"}


def test_time_load_times_one_load_and_the_memory_it_keeps():
    def load():
        time.sleep(0.05)
        return torch.ones(ALLOCATION)

    loaded, timing = measure.time_load(load, "cpu")
    assert isinstance(loaded, torch.Tensor) and loaded.numel() == ALLOCATION, "what the load returned"
    assert isinstance(timing, measure.Measurement) and timing.name == "load" and len(timing.seconds) == 1
    assert 0.05 <= timing.median < 5
    assert 150 <= timing.memory["added_MiB"] <= 400, timing.memory


def test_measure_repeats_short_runs_and_weighs_only_the_first():
    calls = []
    timing = measure.measure("short", lambda: calls.append(1), repeats=2, warmup=1, min_time_s=0.02, memory=True)
    assert len(calls) == len(timing.seconds) + 1, "one warm-up, untimed"
    assert len(timing.seconds) >= 2 and (sum(timing.seconds) >= 0.02 or len(timing.seconds) == measure.MAX_RUNS)
    assert set(timing.memory) == {"method", "peak_MiB", "added_MiB"}
    exact = measure.measure("three", lambda: None, repeats=3)
    assert len(exact.seconds) == 3 and exact.memory == {}, "without min_time_s: exactly `repeats` runs, no memory"
    long = measure.measure("long", lambda: time.sleep(0.03), repeats=3, warmup=0, min_time_s=0.02, long_run_once=True)
    assert len(long.seconds) == 1, "a first run that alone lasts min_time_s is enough with long_run_once"
    record = measure.Measurement("x", [3.0, 1.0, 2.0], items_per_call=2).as_dict()
    assert record["median"] == 2.0 and record["per_item"] == 1.0
    with pytest.raises(ValueError, match="repeats=0"):
        measure.measure("none", lambda: None, repeats=0)


def test_in_turn_times_each_run_once_a_round_after_one_warm_up():
    order = []

    def run(name):
        def call():
            order.append(name)
            return float(len(order))
        return call

    times = measure.in_turn({"a": run("a"), "b": run("b")}, rounds=3)
    assert order == ["a", "b"] + ["a", "b"] * 3, "a warm-up of each, then rounds of each in turn"
    assert times == {"a": [3.0, 5.0, 7.0], "b": [4.0, 6.0, 8.0]}
    order.clear()
    measure.in_turn({"a": run("a")}, rounds=2, warmup=False)
    assert order == ["a", "a"]


# the studies and benchmarks that measure, and what only core/measure.py may do
MEASURING = ["studies/batching.py", "studies/partial.py", "bench/stages.py", "bench/load.py", "bench/batching.py",
             "bench/toy.py"]


@pytest.mark.parametrize("module", MEASURING)
def test_studies_and_benchmarks_measure_through_core_measure(module):
    source = (PACKAGE_DIR / module).read_text()
    found = re.findall(r"VmHWM|ru_maxrss|max_memory_allocated|clear_refs|perf_counter|\b1e6\b|MB\b", source)
    assert not found, f"{module} measures by hand ({found}): use helpers.core.measure (one timer, one reader, MiB)"
