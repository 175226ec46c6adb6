"""`python -m helpers run`: execute the notebooks headless with papermill and summarise what they measured."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers.profiles import parameters_for, resolve_profile
from helpers.results import format_table, outputs_dir

# The series lives beside the package in a clone (editable install); a non-editable install runs the
# notebooks/ folder of the working directory, or $SD_NOTEBOOKS.
SOURCE_NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS_DIR: Path | None = None  # set to pin the folder (tests do)


def notebooks_dir() -> Path:
    """$SD_NOTEBOOKS, else ./notebooks, else the clone's notebooks/ beside the package."""
    if NOTEBOOKS_DIR is not None:
        return NOTEBOOKS_DIR
    for folder in (os.environ.get("SD_NOTEBOOKS"), Path.cwd() / "notebooks", SOURCE_NOTEBOOKS_DIR):
        if folder and any(Path(folder).glob("[0-9][0-9]_*.ipynb")):
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
        return self.notebook[:2]

    def key_numbers(self) -> str:
        summary = {k: v for result in self.results.values() for k, v in result.get("summary", {}).items()}
        return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())


def find_notebooks(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks, in order; `only` picks some by number ("02") or name."""
    notebooks = sorted(notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
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


def run_notebook(notebook: Path, profile: str | None, out_dir: Path, *, cwd: Path | None = None) -> NotebookRun:
    """Execute one notebook with papermill into `out_dir`. `profile`: the parameters papermill passes (None: none,
    the parameters cell as written, as a badge user runs it); `cwd`: the kernel's working directory (default the
    notebook's folder). Results are read from `out_dir`, where the kernel writes them ($SD_OUTPUTS)."""
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
        )
        run.status = "ok"
    except PapermillExecutionError as error:
        run.status, run.error = "failed", _failing_cell(error)
    except Exception as error:  # the kernel died, a timeout, a malformed notebook...
        run.status, run.error = "failed", f"{type(error).__name__}: {error}"
    run.seconds = time.perf_counter() - start
    run.results = {p.stem: json.loads(p.read_text()) for p in sorted(out_dir.glob(f"{run.number}_*.json"))}
    if run.status == "ok" and not run.results:
        run.status, run.error = "failed", f"the notebook recorded no outputs/{run.number}_*.json"
    return run


def run_series(profile: str = "auto", only: list[str] | None = None, out_dir: Path | None = None) -> list[NotebookRun]:
    profile = resolve_profile(profile)
    out_dir = Path(out_dir) if out_dir else outputs_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    notebooks = find_notebooks(only)
    print(f"Running {len(notebooks)} notebook(s), profile {profile!r}, into {out_dir}", flush=True)
    runs = []
    for notebook in notebooks:
        print(f"  {notebook.name} ...", flush=True)
        runs.append(run_notebook(notebook, profile, out_dir))
        print(f"  {notebook.name}: {runs[-1].status} in {runs[-1].seconds:.1f}s {runs[-1].error}", flush=True)
    return runs


def summary_table(runs: list[NotebookRun]) -> str:
    rows = [
        {"notebook": r.notebook, "status": r.status, "seconds": round(r.seconds, 1), "key numbers": r.key_numbers()}
        for r in runs
    ]
    failures = [f"{r.notebook} failed at {r.error}" for r in runs if r.status != "ok"]
    return "\n".join([format_table(rows), *failures])
