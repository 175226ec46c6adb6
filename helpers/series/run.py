"""`python -m helpers run`: execute the notebooks headless with papermill and summarise what they measured."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers import SOURCE_NOTEBOOKS_DIR
from helpers.core.results import format_table, outputs_dir
from helpers.series.profiles import NOTEBOOK_GLOB, notebook_number, parameters_for, resolve_profile
from helpers.series.progress import NotebookProgress
from helpers.series.report import write_index

# The series lives beside the package in a clone (editable install); a non-editable install runs the
# notebooks/ folder of the working directory, or $SD_NOTEBOOKS.
NOTEBOOKS_DIR: Path | None = None  # set to pin the folder (tests do)


def notebooks_dir() -> Path:
    """$SD_NOTEBOOKS, else ./notebooks, else the clone's notebooks/ beside the package."""
    if NOTEBOOKS_DIR is not None:
        return NOTEBOOKS_DIR
    for folder in (os.environ.get("SD_NOTEBOOKS"), Path.cwd() / "notebooks", SOURCE_NOTEBOOKS_DIR):
        if folder and any(Path(folder).glob(NOTEBOOK_GLOB)):
            return Path(folder)
    raise FileNotFoundError(
        "no notebooks found: run from the project's root (it has notebooks/), or set SD_NOTEBOOKS to the folder"
    )


@dataclass
class NotebookRun:
    notebook: str
    status: str = "not run"
    seconds: float = 0.0
    error: str = ""
    results: dict = field(default_factory=dict)  # the notebook's outputs/NN_*.json, by file stem

    @property
    def number(self) -> str:
        return notebook_number(self.notebook)

    def key_numbers(self) -> str:
        summary = {k: v for result in self.results.values() for k, v in result.get("summary", {}).items()}
        return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())


def find_notebooks(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks, in order; `only` picks some by number ("02") or name."""
    notebooks = sorted(notebooks_dir().glob(NOTEBOOK_GLOB))
    if only:
        picked = [nb for nb in notebooks if any(nb.name.startswith(o) or nb.stem == o for o in only)]
        unknown = [o for o in only if not any(nb.name.startswith(o) or nb.stem == o for nb in notebooks)]
        if unknown:
            raise ValueError(f"--only {unknown}: no such notebook; there are {[nb.stem for nb in notebooks]}")
        notebooks = picked
    return notebooks


def _failing_cell(error) -> str:
    """'cell 7 (`lat = denoise(...`): ValueError: ...' from papermill's execution error."""
    source = (getattr(error, "source", "") or "").strip().splitlines()
    first_line = source[0][:80] if source else "?"
    return f"cell {getattr(error, 'exec_count', '?')} (`{first_line}`): {error.ename}: {error.evalue}"


# The kernel talks to us over local sockets (IPC) rather than loopback TCP: over TCP every kernel warns that its
# traffic is unencrypted, a line no user of this series can act on.
IPC_KERNEL_MANAGER = "helpers.series.run.IPCKernelManager"


def _ipc_kernel_manager():
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import CaselessStrEnum

    class IPCKernelManager(AsyncKernelManager):
        transport = CaselessStrEnum(["tcp", "ipc"], default_value="ipc", config=True)

    return IPCKernelManager


def __getattr__(name: str):  # IPCKernelManager, built on first use (jupyter_client is a harness extra)
    if name == "IPCKernelManager":
        return _ipc_kernel_manager()
    raise AttributeError(name)


def run_notebook(notebook: Path, profile: str | None, out_dir: Path, *, cwd: Path | None = None,
                 progress: NotebookProgress | None = None) -> NotebookRun:
    """Execute one notebook with papermill into `out_dir`. `profile`: the parameters papermill passes (None: none,
    the parameters cell as written, as a badge user runs it); `cwd`: the kernel's working directory (default the
    notebook's folder); `progress` is told of each cell. Results are read from `out_dir`, where the kernel writes
    them ($SD_OUTPUTS), and each gets the notebook's `run_seconds`."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    run = NotebookRun(notebook.stem)
    for stale in out_dir.glob(f"{run.number}_*.json"):
        stale.unlink()  # results must come from this run
    os.environ["SD_OUTPUTS"] = str(out_dir.resolve())  # the kernel inherits it: record_results writes there
    start = time.perf_counter()
    try:
        pm.execute_notebook(
            str(notebook),
            str(out_dir / notebook.name),
            parameters=parameters_for(run.number, profile) if profile else {},
            cwd=str(cwd or notebook.parent),
            kernel_name="python3",
            progress_bar=False,
            kernel_manager_class=IPC_KERNEL_MANAGER,
            **({"on_cell_start": progress.on_cell_start} if progress else {}),
        )
        run.status = "ok"
    except PapermillExecutionError as error:
        run.status, run.error = "failed", _failing_cell(error)
    except Exception as error:  # the kernel died, a timeout, a malformed notebook...
        run.status, run.error = "failed", f"{type(error).__name__}: {error}"
    run.seconds = time.perf_counter() - start
    run.results = {p.stem: json.loads(p.read_text()) for p in sorted(out_dir.glob(f"{run.number}_*.json"))}
    for stem, result in run.results.items():
        result["run_seconds"] = round(run.seconds, 1)
        (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    if run.status == "ok" and not run.results:
        run.status, run.error = "failed", f"the notebook recorded no outputs/{run.number}_*.json"
    if progress:
        progress.close(run.status, run.seconds, run.error)
    return run


def run_series(profile: str = "auto", only: list[str] | None = None, out_dir: Path | None = None) -> list[NotebookRun]:
    """Run the notebooks in order, showing progress; `outputs/run.json` records each one's seconds and the total
    (the next run estimates what is left from it)."""
    profile = resolve_profile(profile)
    out_dir = Path(out_dir) if out_dir else outputs_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    notebooks = find_notebooks(only)
    expected = last_durations(out_dir, profile)
    print(f"Running {len(notebooks)} notebook(s), profile {profile!r}, into {out_dir}", flush=True)
    runs = []
    start = time.perf_counter()
    try:
        for index, notebook in enumerate(notebooks, 1):
            progress = NotebookProgress(notebook, index, len(notebooks), expected.get(notebook.stem))
            runs.append(run_notebook(notebook, profile, out_dir, progress=progress))
            record_run(out_dir, profile, runs, time.perf_counter() - start)
    finally:  # an interrupted run still leaves the page of what it ran
        if runs:
            index_page = write_index(runs, out_dir, profile, time.perf_counter() - start)
            print(f"Report: {index_page}", flush=True)
    return runs


RUN_RECORD = "run.json"


def last_durations(out_dir: Path, profile: str) -> dict[str, float]:
    """Each notebook's seconds in the last run of this profile that finished it ({} when there is none)."""
    path = Path(out_dir) / RUN_RECORD
    if not path.exists():
        return {}
    record = json.loads(path.read_text())
    notebooks = record.get("notebooks", {}) if record.get("profile") == profile else {}
    return {name: entry["seconds"] for name, entry in notebooks.items() if entry.get("status") == "ok"}


def record_run(out_dir: Path, profile: str, runs: list[NotebookRun], total_seconds: float) -> Path:
    """`outputs/run.json`: the profile, each notebook's status and seconds, the total. Notebooks of an earlier run
    that this one did not run (`--only`) keep their entries."""
    path = Path(out_dir) / RUN_RECORD
    earlier = json.loads(path.read_text()) if path.exists() else {}
    notebooks = earlier.get("notebooks", {}) if earlier.get("profile") == profile else {}
    notebooks.update({r.notebook: {"status": r.status, "seconds": round(r.seconds, 1), "error": r.error}
                      for r in runs})
    path.write_text(json.dumps({"profile": profile, "notebooks": notebooks,
                                "total_seconds": round(total_seconds, 1)}, indent=2) + "\n")
    return path


def summary_table(runs: list[NotebookRun], width: int | None = None) -> str:
    """The table of notebooks, status and seconds, then each notebook's key numbers wrapped to the terminal."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    rows = [{"notebook": r.notebook, "status": r.status, "seconds": round(r.seconds, 1)} for r in runs]
    lines = [format_table(rows), f"total: {sum(r.seconds for r in runs) / 60:.1f} min", "key numbers:"]
    for run in runs:
        lines += textwrap.wrap(run.key_numbers() or "(none)", width, initial_indent=f"  {run.notebook}: ",
                               subsequent_indent="      ", break_on_hyphens=False)
    lines += [f"{r.notebook} failed at {r.error}" for r in runs if r.status != "ok"]
    return "\n".join(lines)
