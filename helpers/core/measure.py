"""Measuring, the one way: time (synchronised, warm-up excluded, the median of repeats, runs in turn), loads, and
peak memory (CUDA's max allocated, or the process's peak RSS), in one record (`Measurement`) and one unit (MiB).

- `timed(timings, name, device)`: one block's wall time; `measure(name, fn, ...)`: warm-up, then repeats (and, with
  `min_time_s`, more while the runs are short), the median kept; `in_turn(runs, rounds)`: several things timed in
  rounds (A, B, C, A, B, C, ...), for a ratio of two times on a machine whose speed drifts.
- `peak_memory_MiB(device)`: the one reader of peak memory; `peak_memory(device)`: the peak of one block and what
  it added; `time_load(load, device)`: one load, timed, with the memory it added.
Results and tables: `helpers.core.results`.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import psutil
import torch

from helpers.core import accelerator

MiB = 2**20  # the one unit of memory in every record


# ---------------------------------------------------------------------------------------------------
# Time


def synchronize(device: str | torch.device | None = None) -> None:
    """Wait for queued GPU work, so that a timer measures the work and not just its launch."""
    kind = torch.device(device).type if device is not None else None
    if kind in (None, "cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()


@contextmanager
def timed(timings: dict[str, float], name: str, device: str | torch.device | None = None):
    """`with timed(timings, "decode", device): ...` stores the block's wall time in `timings["decode"]`."""
    synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        synchronize(device)
        timings[name] = time.perf_counter() - start


MIN_RUN_S = 2.0  # a shorter run is repeated until this much time is spent, and its median kept
MAX_RUNS = 200  # repeats of a very short run stop here


def more_runs(seconds: list[float], repeats: int, min_time_s: float, *, long_run_once: bool = False) -> bool:
    """Whether to time another run after `seconds`: at least `repeats` runs, and until `min_time_s` is spent
    (at most MAX_RUNS): a few milliseconds are noise on a busy machine, a median of many is not. With
    `long_run_once`, a first run that alone lasts `min_time_s` is not repeated (N inferences in one run)."""
    if not seconds:
        return True
    if len(seconds) >= MAX_RUNS or (long_run_once and seconds[0] >= min_time_s):
        return False
    return len(seconds) < repeats or sum(seconds) < min_time_s


@dataclass
class Measurement:
    """Wall times of repeated calls of one thing, warm-up excluded; `memory`: the first timed call's peak
    (`peak_MiB`, `added_MiB`, `method`) when it was measured; `extra`: what the caller keeps beside (not recorded)."""

    name: str
    seconds: list[float]
    items_per_call: int = 1
    memory: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def per_item(self) -> float:
        return self.median / self.items_per_call

    def as_dict(self) -> dict:
        return {"name": self.name, "seconds": list(self.seconds), "items_per_call": self.items_per_call,
                "memory": dict(self.memory), "median": self.median, "per_item": self.per_item}


def measure(
    name: str,
    fn: Callable[[], object],
    *,
    repeats: int = 3,
    warmup: int = 1,
    items_per_call: int = 1,
    device: str | torch.device | None = None,
    min_time_s: float = 0.0,
    long_run_once: bool = False,
    memory: bool = False,
) -> Measurement:
    """Call `fn` `warmup` times untimed, then at least `repeats` times timed (synchronised, under inference_mode),
    and more while less than `min_time_s` is spent (`more_runs`). With `memory`, the first timed call's peak
    memory is measured too (`peak_memory`)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} must be a whole number of at least 1")
    seconds: list[float] = []
    first_memory: dict = {}
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        while more_runs(seconds, repeats, min_time_s, long_run_once=long_run_once):
            with peak_memory(device) if memory and not seconds else nullcontext({}) as memory_used:
                timings: dict[str, float] = {}
                with timed(timings, name, device):
                    fn()
            seconds.append(timings[name])
            first_memory = first_memory or memory_used
    return Measurement(name, seconds, items_per_call, memory=first_memory)


def in_turn(runs: dict[str, Callable[[], float]], rounds: int, warmup: bool = True) -> dict[str, list[float]]:
    """The in-turn rule: each run once untimed (OpenVINO converts, compile compiles; skipped with `warmup=False`
    when the caller warmed them), then `rounds` rounds of each in turn (A, B, C, A, B, C, ...), so that each sees
    the same moments of a machine whose speed drifts. A run returns its own seconds (time it with `timed`)."""
    for run in runs.values() if warmup else ():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, run in runs.items():
                times[name].append(run())
    return times


# ---------------------------------------------------------------------------------------------------
# Memory


def _memory_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else accelerator.compute_device()


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise OSError("no VmHWM in /proc/self/status")


def peak_memory_MiB(device: str | torch.device | None = None) -> float:
    """The peak since `reset_peak_memory` (or since the process started), in MiB: on CUDA
    `torch.cuda.max_memory_allocated`; elsewhere the process's peak RSS (`VmHWM`: unlike `ru_maxrss` it does not
    count the RSS of the parent that forked this process; `ru_maxrss` where there is no /proc)."""
    device = _memory_device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MiB
    try:
        return _vm_hwm_bytes() / MiB
    except OSError:
        import resource  # no /proc (macOS counts bytes, Linux KiB)

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss / MiB if psutil.MACOS else maxrss / 1024


def memory_in_use_MiB(device: str | torch.device | None = None) -> float:
    """What is held now, in MiB: CUDA's allocated memory, or the process's RSS."""
    device = _memory_device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MiB
    return psutil.Process().memory_info().rss / MiB


def reset_peak_memory(device: str | torch.device | None = None) -> bool:
    """Start a new peak at what is in use now (CUDA's peak stats; the RSS high-water mark through
    /proc/self/clear_refs, Linux >= 4.0). False where the RSS peak cannot be reset."""
    device = _memory_device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        _vm_hwm_bytes()
        return True
    except OSError:
        return False


def memory_method(device: str | torch.device | None = None) -> str:
    """How `peak_memory` measures on `device`, in words (for tables and notebooks)."""
    if _memory_device(device).type == "cuda":
        return "torch.cuda.max_memory_allocated"
    if reset_peak_memory(device):
        return "peak RSS (VmHWM, reset through /proc/self/clear_refs before each call)"
    return "peak RSS (sampled every 1 ms)"


class _RssSampler(threading.Thread):
    """The highest RSS seen, sampled every millisecond (where the RSS peak cannot be reset)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.process, self.peak, self.done = psutil.Process(), 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.done.wait(0.001)

    def stop(self) -> float:
        self.done.set()
        self.join()
        return max(self.peak, self.process.memory_info().rss) / MiB


@contextmanager
def peak_memory(device: str | torch.device | None = None) -> Iterator[dict]:
    """`with peak_memory(device) as memory: ...` fills `memory` with `peak_MiB` (the block's peak), `added_MiB`
    (peak minus what was in use before it) and `method` (how it was measured, as `memory_method` says)."""
    device = _memory_device(device)
    memory: dict = {"method": memory_method(device)}
    synchronize(device)
    before = memory_in_use_MiB(device)
    if reset_peak_memory(device):
        yield memory
        synchronize(device)
        peak = peak_memory_MiB(device)
    else:
        sampler = _RssSampler()
        sampler.start()
        try:
            yield memory
        finally:
            peak = sampler.stop()
    memory.update(peak_MiB=peak, added_MiB=peak - before)


def time_load(load: Callable[[], object], device: str | torch.device | None = None) -> tuple[object, Measurement]:
    """Call `load()` once (after collecting garbage, so that memory freed earlier is not counted), timed
    (synchronised) with its peak memory. Returns what it loaded and a Measurement named "load" (`.median`: its
    seconds; `.memory`: `peak_MiB`, `added_MiB`)."""
    gc.collect()
    if _memory_device(device).type == "cuda":
        torch.cuda.empty_cache()
    seconds: dict[str, float] = {}
    with peak_memory(device) as memory, timed(seconds, "load", device):
        loaded = load()
    return loaded, Measurement("load", [seconds["load"]], memory=memory)
