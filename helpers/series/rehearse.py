"""`python -m helpers rehearse`: the series as a Colab/Kaggle user meets it, offline, on this CPU.

A badge user opens a notebook, leaves `MODEL = "auto"` and presses "run all" on a T4 with SD 1.5 from the hub. The
rehearsal does exactly that, with three stand-ins, each said out loud:
- the hub is a local hub cache (`checkpoints.hub`: random weights at SD 1.5's real shapes and configs, under the real
  repo ids), read through the code a user runs (`from_pretrained`, `hf_hub_download`, `snapshot_download`) with
  `HF_HUB_OFFLINE=1`;
- the device answers "a T4" (`SD_PRETEND_ACCELERATOR=t4`): the model `auto` picks, the dtype (fp16), the settings,
  the latency rungs and every memory decision are a T4's; the arithmetic runs on this CPU;
- a device memory budget (`--memory`, 15 GiB) caps every memory check (`SD_MEMORY_BUDGET_GIB`).
Each notebook runs from a working directory outside the repository with no parameter passed: its parameters cell as
written. What a CPU cannot afford is shrunk (the image size, steps and counts of `helpers.series.profiles.REHEARSAL`),
and recorded as such. `outputs/rehearsal.json` holds, per notebook, its status, seconds, model, device, dtype, the
parameters in force, what was shrunk and the peak memory (the kernel's peak resident set on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from helpers.core.accelerator import MEMORY_BUDGET_ENV, PRETEND_ENV, REHEARSAL_ENV
from helpers.core.results import format_table, outputs_dir
from helpers.series.profiles import notebook_number, rehearsal_shrinks
from helpers.series.progress import NotebookProgress
from helpers.series.run import find_notebooks, run_notebook

NOT_COVERED = [
    "fp16 CUDA kernels: tensors were fp16, but convolutions and linear layers computed in fp32 on the CPU and were "
    "rounded to fp16 (helpers.core.accelerator.compute_fp16_in_fp32_on_cpu); cuDNN, cuBLAS, flash attention and CUDA "
    "graphs never ran",
    "real speed: a T4 runs SD 1.5 at ~7.6 it/s; minutes here say nothing about minutes there",
    "real weights: random weights at the real shapes, so pictures are noise and the safety checker flags nothing",
    "the full size: images capped at --size pixels a side; steps and counts shrunk where listed under 'shrunk'",
    "the real tokenizer (the project's own CLIP BPE with a small vocabulary) and the real download times",
    "Colab's and Kaggle's preinstalled packages: this machine's versions ran",
]


def rehearse(only: list[str] | None = None, *, memory_gib: float = 15.0, size: int = 64, steps: int = 2,
             cache: Path | None = None, out_dir: Path | None = None, workdir: Path | None = None) -> dict:
    """Run the notebooks as a badge user on a T4 would, against the local hub; the record it writes."""
    from helpers.checkpoints.hub import build_local_hub

    out_dir = Path(out_dir or outputs_dir() / "rehearsal").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = build_local_hub(Path(cache) if cache else None)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="sd-rehearsal-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    plan = {"memory_gib": memory_gib, "size": size, "steps": steps, "hub_cache": str(cache),
            "workdir": str(workdir), "accelerator": "t4", "not_covered": NOT_COVERED, "notebooks": []}
    environment = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), PRETEND_ENV: "t4",
                   MEMORY_BUDGET_ENV: str(memory_gib)}
    saved = {key: os.environ.get(key) for key in [*environment, REHEARSAL_ENV, "SD_OUTPUTS"]}
    os.environ.update(environment)
    notebooks = find_notebooks(only)
    print(f"Rehearsing {len(notebooks)} notebook(s) as on a T4 ({memory_gib:g} GiB), SD 1.5 from the local hub "
          f"{cache}, in {workdir}", flush=True)
    try:
        for index, notebook in enumerate(notebooks, 1):
            plan["notebooks"].append(_rehearse_one(notebook, out_dir, workdir, size, steps, index, len(notebooks)))
            _write(plan, out_dir)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return plan


def _rehearse_one(notebook: Path, out_dir: Path, workdir: Path, size: int, steps: int, index: int = 1,
                  total: int = 1) -> dict:
    number = notebook_number(notebook)
    record_path = out_dir / f"{number}_rehearsal_record.json"
    record_path.unlink(missing_ok=True)
    os.environ[REHEARSAL_ENV] = json.dumps({"size": size, "record": str(record_path),
                                            "shrink": {number: rehearsal_shrinks(number, steps, size)}})
    start = time.perf_counter()
    progress = NotebookProgress(notebook, index, total, None)
    run = run_notebook(notebook, None, out_dir, cwd=workdir, progress=progress)  # no parameters: the cell as written
    entry = {"notebook": notebook.stem, "status": run.status, "seconds": round(time.perf_counter() - start, 1),
             "error": run.error}
    if record_path.exists():
        entry.update({k: v for k, v in json.loads(record_path.read_text()).items() if k != "notebook"})
        record_path.unlink()
    elif run.status == "ok":
        entry.update(status="failed", error="the notebook never called helpers.series.settings.use_settings")
    print(f"  model {entry.get('model')}, {entry.get('dtype')}, peak {entry.get('peak_memory_gib')} GiB", flush=True)
    return entry


def _write(plan: dict, out_dir: Path) -> Path:
    path = out_dir.parent / "rehearsal.json"
    path.write_text(json.dumps(plan, indent=2, default=str) + "\n")
    return path


def summary_table(plan: dict, width: int | None = None) -> str:
    """The table (status, seconds, model, dtype, peak memory), then what each notebook had shrunk and what the
    rehearsal does not cover, wrapped to the terminal."""
    width = width or shutil.get_terminal_size((120, 24)).columns
    rows = [{"notebook": n["notebook"], "status": n["status"], "seconds": n["seconds"], "model": n.get("model"),
             "dtype": n.get("dtype"), "peak GiB": n.get("peak_memory_gib")} for n in plan["notebooks"]]
    lines = [format_table(rows), "shrunk (a CPU cannot afford more):"]
    for n in plan["notebooks"]:
        shrunk = ", ".join(f"{k}={v}" for k, v in (n.get("shrunk") or {}).items()) or "nothing"
        lines += textwrap.wrap(shrunk, width, initial_indent=f"  {n['notebook']}: ", subsequent_indent="      ")
    lines += [f"{n['notebook']} failed at {n['error']}" for n in plan["notebooks"] if n["status"] != "ok"]
    lines.append("Not covered by this rehearsal:")
    for item in NOT_COVERED:
        lines += textwrap.wrap(item, width, initial_indent="  - ", subsequent_indent="    ")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", nargs="+", help="notebook numbers, e.g. 03")
    parser.add_argument("--memory", type=float, default=15.0, help="the device memory budget in GiB (a T4: 15)")
    parser.add_argument("--size", type=int, default=64, help="largest image side a CPU computes (SD 1.5: 512)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps a CPU computes per picture")
    parser.add_argument("--cache", help="the local hub cache (default outputs/cache/hub, built once)")
    parser.add_argument("--workdir", help="the working directory the notebooks run in (default: a new temp folder)")


def run_from_args(args: argparse.Namespace) -> int:
    plan = rehearse(args.only, memory_gib=args.memory, size=args.size, steps=args.steps, cache=args.cache,
                    workdir=args.workdir)
    print(summary_table(plan))
    print(f"Wrote {outputs_dir() / 'rehearsal.json'}; executed notebooks in {outputs_dir() / 'rehearsal'}")
    if not args.workdir:
        shutil.rmtree(plan["workdir"], ignore_errors=True)
    return 0 if all(n["status"] == "ok" for n in plan["notebooks"]) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m helpers rehearse", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run_from_args(parser.parse_args()))
