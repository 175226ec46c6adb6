"""Measure partial loading: read only the tensors one stage needs from a single LDM-layout checkpoint.

Each measurement runs in a fresh Python process so that peak memory of one load never hides in another's,
and the checkpoint is evicted from the page cache first (`posix_fadvise(POSIX_FADV_DONTNEED)`, after an
`fsync`), so the reads are cold reads from the disk, as on a first load.

What is measured, per load:
- `time_s`: wall time of the load itself (imports excluded), by `helpers.core.measure.time_load`;
- `read_bytes`: bytes the process made the kernel fetch from storage, from `/proc/self/io` (`read_bytes`;
  it counts mmap page faults too, which is how safetensors reads). The kernel's readahead
  (`/sys/block/*/queue/read_ahead_kb`) adds up to that much around each contiguous range read;
- `tensor_bytes`: bytes of the tensors asked for, from the safetensors header (the ideal `read_bytes`);
- `peak_rss_MiB`: the process's peak resident set during the load (`measure.peak_memory`, its peak reset
  after the imports), and `load_rss_MiB`, that peak less the resident set before the load: what the load itself cost.

Two modes:
- `tensors`: just the state dict. `component=None` reads every tensor (the full load); a component reads
  the keys under its prefix with `safe_open` (helpers.core.ldm.load_ldm_state_dict);
- `model`: a ready diffusers/transformers model. `partial=False` is diffusers' `from_single_file` on the
  path, which reads the whole checkpoint; `partial=True` reads only the component's tensors first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from helpers import PACKAGE_DIR
from helpers.core.ldm import (
    COMPONENTS,
    LDM_PREFIXES,
    component_byte_ranges,
    float_dtype,
    load_component_from_single_file,
    load_ldm_state_dict,
)
from helpers.core.measure import MiB, time_load


def evict_from_page_cache(path: str | Path) -> None:
    """Drop the file's pages from the page cache so the next read comes from the disk (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped; a freshly written file needs this
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def io_read_bytes() -> int:
    """Bytes this process caused to be read from storage so far (/proc/self/io), or -1 if not available."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def _touch_every_page(tensors) -> float:
    """Read one element per 4 KiB page of each tensor, so lazily mapped data is really in memory."""
    total = 0.0
    for v in tensors:
        flat = v.reshape(-1)
        step = max(1, 4096 // max(1, v.element_size()))
        total += float(flat[::step].double().sum()) if flat.numel() else 0.0
    return total


def tensor_bytes(path: str | Path, component: str | None) -> int:
    ranges = component_byte_ranges(path)
    return sum(r["bytes"] for r in ranges.values()) if component is None else ranges[component]["bytes"]


def measure_here(
    path: str | Path,
    component: str | None,
    mode: str = "tensors",
    partial: bool = True,
    config_dir: str | Path | None = None,
) -> dict:
    """One load in *this* process (the subprocess side of `measure`). Returns the measurements."""
    path = Path(path)
    if mode == "model":  # import everything the load needs now, so the timing holds only the load
        import diffusers.loaders.single_file_utils  # noqa: F401
        from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
        from transformers import CLIPTextModel  # noqa: F401
    read_before = io_read_bytes()
    if mode == "tensors":
        def load():
            state = load_ldm_state_dict(path, None if component is None else LDM_PREFIXES[component])
            _touch_every_page(state.values())  # safetensors maps the file lazily: make the bytes really arrive
            return state

        state, timing = time_load(load, "cpu")
        n_tensors = len(state)
        loaded = sum(v.numel() * v.element_size() for v in state.values())
    elif mode == "model":
        if component is None or config_dir is None:
            raise ValueError("mode='model' needs a component and config_dir")

        def load():
            model = load_component_from_single_file(path, component, config_dir, partial=partial,
                                                    dtype=float_dtype(path))
            _touch_every_page(model.state_dict().values())  # parameters may still point into the mapped file
            return model

        model, timing = time_load(load, "cpu")
        n_tensors = len(model.state_dict())
        loaded = sum(p.numel() * p.element_size() for p in model.parameters())
    else:
        raise ValueError(f"unknown mode {mode!r}; expected 'tensors' or 'model'")
    read = io_read_bytes() - read_before if read_before >= 0 else -1
    return {
        "component": component or "full",
        "mode": mode,
        "partial": partial if mode == "model" else component is not None,
        "time_s": timing.median,
        "read_bytes": read,
        "tensor_bytes": tensor_bytes(path, component) if (mode == "tensors" or partial) else tensor_bytes(path, None),
        "loaded_bytes": loaded,
        "tensors": n_tensors,
        "peak_rss_MiB": timing.memory["peak_MiB"],
        "load_rss_MiB": timing.memory["added_MiB"],
    }


def measure(
    path: str | Path,
    component: str | None,
    mode: str = "tensors",
    partial: bool = True,
    config_dir: str | Path | None = None,
    cold: bool = True,
    timeout: float = 600,
) -> dict:
    """One load in a fresh subprocess (cold page cache unless `cold=False`). Returns the measurements."""
    path = Path(path).resolve()
    if cold:
        evict_from_page_cache(path)
    cmd = [sys.executable, "-m", "helpers.studies.partial", "--path", str(path), "--mode", mode]
    if component:
        cmd += ["--component", component]
    if not partial:
        cmd += ["--whole-file"]
    if config_dir:
        cmd += ["--config-dir", str(Path(config_dir).resolve())]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"measurement subprocess failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["cold"] = cold
    return result


def compare(
    path: str | Path,
    config_dir: str | Path | None = None,
    modes: tuple[str, ...] = ("tensors",),
    components: tuple[str, ...] = COMPONENTS,
    repeats: int = 3,
    cold: bool = True,
    progress: bool = True,
) -> list[dict]:
    """For each mode and component: median time, bytes read, peak RSS, and ratios against the full load.

    The full load is: mode 'tensors' -> every tensor of the file; mode 'model' -> diffusers'
    `from_single_file` of that component on the path (which reads the whole checkpoint).
    """
    from tqdm.auto import tqdm

    path = Path(path)
    size = path.stat().st_size
    jobs = []
    for mode in modes:
        if mode == "tensors":
            jobs += [(mode, None, False)] + [(mode, c, True) for c in components]
        else:
            jobs += [(mode, c, p) for c in components for p in (False, True)]
    runs: dict[tuple, list[dict]] = {}
    bar = tqdm(total=len(jobs) * repeats, desc="loads", disable=not progress)
    for _ in range(repeats):  # interleave the repeats so drift affects every row alike
        for mode, component, partial in jobs:
            runs.setdefault((mode, component, partial), []).append(
                measure(path, component, mode, partial, config_dir, cold=cold)
            )
            bar.update()
    bar.close()

    rows = []
    for (mode, component, partial), results in runs.items():
        rows.append(
            {
                "mode": mode,
                "component": component or "full file",
                "load": ("partial" if partial else ("whole file" if mode == "model" else "all tensors")),
                "time_s": statistics.median(r["time_s"] for r in results),
                "read_MiB": statistics.median(r["read_bytes"] for r in results) / MiB,
                "read_share": statistics.median(r["read_bytes"] for r in results) / size,
                "tensor_share": results[0]["tensor_bytes"] / size,
                "peak_rss_MiB": max(r["peak_rss_MiB"] for r in results),
                "load_rss_MiB": max(r["load_rss_MiB"] for r in results),
                "repeats": len(results),
                "times_s": [r["time_s"] for r in results],
            }
        )
    for row in rows:  # ratios against the matching full load
        if row["mode"] == "tensors":
            full = next(r for r in rows if r["mode"] == "tensors" and r["component"] == "full file")
        else:
            full = next(
                r
                for r in rows
                if r["mode"] == "model" and r["component"] == row["component"] and r["load"] == "whole file"
            )
        row["time_vs_full"] = row["time_s"] / full["time_s"] if full["time_s"] else float("nan")
        row["read_vs_full"] = row["read_MiB"] / full["read_MiB"] if full["read_MiB"] else float("nan")
    return rows


TABLE_COLUMNS = [
    "mode",
    "component",
    "load",
    "time_s",
    "time_vs_full",
    "read_MiB",
    "read_share",
    "tensor_share",
    "peak_rss_MiB",
    "load_rss_MiB",
]


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one load of a single-file checkpoint, measured (internal)")
    parser.add_argument("--path", required=True)
    parser.add_argument("--component", choices=COMPONENTS, default=None)
    parser.add_argument("--mode", choices=["tensors", "model"], default="tensors")
    parser.add_argument("--whole-file", action="store_true", help="mode model: diffusers reads the whole file")
    parser.add_argument("--config-dir", default=None)
    args = parser.parse_args(argv)
    result = measure_here(args.path, args.component, args.mode, not args.whole_file, args.config_dir)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
