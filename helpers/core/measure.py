"""Timers that tell the truth on a GPU, and repeated measurements (results and tables: `helpers.core.results`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch


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
    """Wall times of repeated calls of one thing, warm-up excluded."""

    name: str
    seconds: list[float]
    items_per_call: int = 1
    extra: dict = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def per_item(self) -> float:
        return self.median / self.items_per_call

    def as_dict(self) -> dict:
        return {**asdict(self), "median": self.median, "per_item": self.per_item}


def measure(
    name: str,
    fn: Callable[[], object],
    *,
    repeats: int = 3,
    warmup: int = 1,
    items_per_call: int = 1,
    device: str | torch.device | None = None,
) -> Measurement:
    """Call `fn` `warmup` times untimed, then `repeats` times timed (synchronized, under inference_mode)."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be at least 1")
    seconds = []
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        for _ in range(repeats):
            timings: dict[str, float] = {}
            with timed(timings, name, device):
                fn()
            seconds.append(timings[name])
    return Measurement(name, seconds, items_per_call)
