"""What `python -m helpers run` shows while it works: notebook i of n, the section it is in, the time spent, and an
estimate of what is left from that notebook's last recorded duration (`outputs/run.json`).

A terminal gets one live tqdm bar per notebook; a log file (stdout not a terminal) gets one plain line each time a
notebook enters a new section, never a redraw. Sections are the notebook's markdown headings (`#`/`##`/`###`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from tqdm import tqdm


def sections_by_cell(notebook: Path) -> dict[str, str]:
    """cell id → the title of the last markdown heading above it (papermill keeps the ids of the cells it runs)."""
    cells = nbformat.read(notebook, as_version=4).cells
    section, out = "setup", {}
    for cell in cells:
        if cell.cell_type == "markdown":
            headings = [line.lstrip("#").strip() for line in cell.source.splitlines() if line.startswith("#")]
            section = headings[-1] if headings else section
        elif "id" in cell:
            out[cell.id] = section
    return out


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class NotebookProgress:
    """The progress of one notebook; `on_cell_start` is given to papermill (nbclient calls it before each cell)."""

    def __init__(self, notebook: Path, index: int, total: int, expected_s: float | None, stream=None):
        self.name, self.expected_s = notebook.stem, expected_s
        self.prefix = f"[{index}/{total}] {self.name}"
        self.sections = sections_by_cell(notebook)
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.start = time.perf_counter()
        self.section = None
        self.bar = tqdm(total=len(self.sections) + 1, desc=self.prefix, file=self.stream, unit="cell", leave=True,
                        bar_format="{desc} {n_fmt}/{total_fmt} cells [{elapsed}] {postfix}") if self.live else None

    def left(self) -> str:
        if not self.expected_s:
            return "no earlier run to estimate from"
        remaining = self.expected_s - (time.perf_counter() - self.start)
        return f"~{duration(remaining)} left" if remaining > 0 else f"over its last {duration(self.expected_s)}"

    def on_cell_start(self, cell=None, cell_index=None, **_) -> None:
        section = self.sections.get(getattr(cell, "id", None), self.section or "parameters")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{section} · {self.left()}")
        elif section != self.section:
            elapsed = duration(time.perf_counter() - self.start)
            print(f"{self.prefix} · {section} · {elapsed} in, {self.left()}", file=self.stream, flush=True)
        self.section = section

    def close(self, status: str, seconds: float, error: str = "") -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(status)
            self.bar.close()
        print(f"{self.prefix}: {status} in {duration(seconds)}" + (f": {error}" if error else ""), file=self.stream,
              flush=True)
