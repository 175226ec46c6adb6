"""Timers that tell the truth on a GPU, benchmark tables, and results recorded as JSON in outputs/."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def outputs_dir() -> Path:
    """Where executed notebooks, images and results go: $SD_OUTPUTS, else `<repo>/outputs`."""
    path = Path(os.environ.get("SD_OUTPUTS", REPO_ROOT / "outputs"))
    path.mkdir(parents=True, exist_ok=True)
    return path


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


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain-text table (floats to 4 significant digits) that reads the same in a notebook and a terminal."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def environment() -> dict:
    """What the numbers were measured on."""
    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
        "cuda": cuda,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def record_results(name: str, data: dict) -> Path:
    """Write `data` (plus when and where) to `outputs/<name>.json`; tests and the run summary read it."""
    path = outputs_dir() / f"{name}.json"
    payload = {"name": name, "recorded_at": datetime.now(timezone.utc).isoformat(), "environment": environment()}
    payload.update(data)
    path.write_text(json.dumps(payload, indent=2, default=_jsonable))
    return path


def _jsonable(value):
    if isinstance(value, (torch.Tensor,)) and value.numel() == 1:
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "as_dict"):
        return value.as_dict()
    raise TypeError(f"record_results cannot store a {type(value).__name__} as JSON")
