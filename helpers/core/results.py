"""Where results go and how they look: output paths, JSON result records, and plain-text tables.

The one place for these, used by notebooks, benchmarks and the command line alike:
- `outputs_dir()`: `$SD_OUTPUTS`, else `./outputs` of the working directory (so a non-editable install works);
- `record_results(name, data)`: `outputs/<name>.json` with when and where it was measured;
- `format_table(rows)`: a table that reads the same in a notebook and a terminal.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

PROGRESS_EVERY_S = 10  # how often a progress bar in a long cell redraws: a log file gets a line, not a thousand


def outputs_dir() -> Path:
    """Where executed notebooks, images and results go (created if missing): $SD_OUTPUTS, else `./outputs`;
    a notebook opened in the clone's notebooks/ folder writes to the clone's outputs/ beside it."""
    cwd = Path.cwd()
    default = cwd.parent / "outputs" if cwd.name == "notebooks" else cwd / "outputs"
    path = Path(os.environ.get("SD_OUTPUTS") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux): benchmarks differ between machines, so record it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """What the numbers were measured on."""
    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else cpu_model(),
        "cpu": cpu_model(),
        "cuda": cuda,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def json_object(line: str, where: str) -> dict:
    """One line of a JSON-lines file (prompt files, the metadata folder) read as a JSON object; `where` (a file and
    line) starts the error."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg}); each line must be one JSON object") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: a {type(value).__name__}, but each line must be a JSON object")
    return value


def refusals(bad_calls: dict[str, Callable[[], object]],
             errors: tuple[type[BaseException], ...] = (ValueError, TypeError), width: int = 30) -> dict[str, str]:
    """Each bad call made once, for a notebook's "bad input gets a clear error" cell: {case: "ErrorType: message"},
    printed a line each. A call that raises none of `errors` reads "accepted (should have been refused)"."""
    messages = {}
    for case, call in bad_calls.items():
        try:
            call()
            messages[case] = "accepted (should have been refused)"
        except errors as error:
            messages[case] = f"{type(error).__name__}: {error}"
        print(f"{case:{width}s} {messages[case]}")
    return messages


def record_results(name: str, data: dict, out_dir: str | Path | None = None) -> Path:
    """Write `data` (plus when and where) to `<outputs>/<name>.json`; tests and the run summary read it."""
    path = Path(out_dir or outputs_dir()) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"name": name, "recorded_at": datetime.now(UTC).isoformat(), "environment": environment()}
    payload.update(data)
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "as_dict"):
        return value.as_dict()
    raise TypeError(f"record_results cannot store a {type(value).__name__} as JSON")


def format_cell(value) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {format_cell(v)}" for k, v in value.items())
    return str(value)


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain-text table (floats to 4 significant digits, numbers right-aligned); columns default to the
    keys of all rows, in order of first appearance."""
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[format_cell(row.get(c)) for c in columns] for row in rows]
    numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows) for c in columns]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns), "  ".join("-" * w for w in widths), *(line(r) for r in cells)])
