"""Batching, measured: call a stage N times with one input each, or once with all N, per stage.

- `load_prompts(n)`: N of the shipped 128 varied toy-world prompts (`helpers/data/prompts_128.txt`, from
  `make_prompts`); `default_prompts_file(model)`: those for the toy, ordinary SD prompts for a real SD.
- `StageJob`: the N inferences' inputs (prompts, seeds, embeddings, latents), so each stage runs alone on any
  slice: `job.call("denoise", start, stop)`. Stage "generate" is the whole chain.
- `run_in_chunks(call, n, max_batch)`: one "call with N inputs", in chunks of at most `max_batch`; an
  out-of-memory error (CUDA's, or `core.limits`' estimate against the free memory) halves the chunk and keeps the
  chunks already finished. The untimed warm-up goes through it too, and the timed runs start at the size it found.
- `compare(job, stage, max_batch)`: N calls of batch 1 against one chunked call: times, speed-up, max difference.
- `sweep(job, stage, batch_sizes)`: throughput and peak memory per batch size; a size whose one call does not fit in
  memory is skipped with the reason. `auto_batch_size` picks from the sizes that ran.
- `load_stage(model, stage)`: only the components one stage uses (a single file: only their tensors are read);

Timing and memory are `helpers.core.measure`'s: warm-up excluded, `torch.inference_mode()`, synchronised on a GPU,
the median of repeats while a run is short; the peak memory of each point on its own (`measure.peak_memory`), in MiB.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm.auto import tqdm

from helpers import DATA_DIR
from helpers.core import accelerator
from helpers.core.measure import MIN_RUN_S, Measurement, MiB, measure, time_load
from helpers.core.models import (
    TOY_MODELS,
    hub_offline,
    load_component,
    resolve_model,
    toy_paths,
)
from helpers.core.results import PROGRESS_EVERY_S
from helpers.core.stages import decode, denoise, encode_text, generate, vae_scale_factor
from helpers.toy import TOY_LDM_FILE, world

PROMPTS_FILE = DATA_DIR / "prompts_128.txt"  # the toy world's (make_prompts)
SD_PROMPTS_FILE = DATA_DIR / "sd_prompts_64.txt"  # ordinary prompts, for a real SD
STAGES = ("encode_text", "denoise", "decode", "generate")  # "generate": the three in series
STAGE_COMPONENTS = {  # what each stage reads of the model
    "encode_text": ("tokenizer", "text_encoder"),
    "denoise": ("unet", "scheduler"),
    "decode": ("vae",),
}
OUT_OF_MEMORY = (torch.cuda.OutOfMemoryError, MemoryError)  # errors that a smaller chunk may avoid


# ---------------------------------------------------------------------------------------------------
# Inputs: prompts, seeds, sizes. Each check names the argument and says what would be right.


def check_count(name: str, value) -> int:
    """`value` as a count of at least 1, or a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a whole number of at least 1")
    return int(value)


def make_prompts(n: int = 128, seed: int = 0, split: str = "heldout") -> list[str]:
    """`n` different captions of the toy world (one or two objects, worded in many ways), deterministic.

    Held-out captions by default: the toy model never saw them in training. `helpers/data/prompts_128.txt`
    is `make_prompts(128)`; a test checks that the shipped file still equals it.
    """
    check_count("n", n)
    prompts: list[str] = []
    start = seed
    while len(prompts) < n:  # a few captions repeat; draw more scenes until there are n different ones
        for scene in world.make_scenes(n, seed=start, split=split, max_objects=2):
            if scene.caption not in prompts:
                prompts.append(scene.caption)
        start += n
    return prompts[:n]


def load_prompts(n: int, path: str | Path | None = None) -> list[str]:
    """The first `n` prompts of a prompt file (one per line; default: the shipped 128)."""
    check_count("N", n)
    path = Path(path) if path else PROMPTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist: give a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if n > len(prompts):
        raise ValueError(f"N={n} but {path.name} holds {len(prompts)} prompts: "
                         f"use N <= {len(prompts)} or a longer file")
    return prompts[:n]


def default_prompts_file(model: str) -> Path:
    """The prompts a model is asked by default: the toy world's captions for the toy (and the tiny random test
    model, whose tokenizer is the toy's kind), ordinary Stable Diffusion prompts for a real SD."""
    return PROMPTS_FILE if model in TOY_MODELS else SD_PROMPTS_FILE


def check_seeds(seeds: Sequence[int], prompts: Sequence[str]) -> list[int]:
    seeds = [int(s) for s in seeds]
    if len(seeds) > len(prompts):
        raise ValueError(f"seeds has {len(seeds)} entries but there are only {len(prompts)} prompts: "
                         "give one seed per prompt")
    if len(seeds) < len(prompts):
        raise ValueError(f"seeds has {len(seeds)} entries for {len(prompts)} prompts: give one seed per prompt")
    return seeds


def sweep_sizes(n: int, largest: int | None = None) -> list[int]:
    """1, 2, 4, ... up to `largest` (default n), and `largest` itself when it is not a power of two."""
    largest = check_count("largest", largest if largest is not None else check_count("N", n))
    if largest > n:
        raise ValueError(f"largest={largest} is more than N={n}: a batch cannot hold more inputs than there are")
    sizes = [2**k for k in range(largest.bit_length()) if 2**k <= largest]
    return sizes if sizes[-1] == largest else [*sizes, largest]


# ---------------------------------------------------------------------------------------------------
# One call with N inputs, in chunks; CUDA out-of-memory halves the chunk.


@dataclass
class Chunked:
    """The outputs of one chunked call, and how it was cut."""

    output: object
    chunk_sizes: list[int]  # the chunks that ran, in order
    oom_halvings: list[int] = field(default_factory=list)  # chunk sizes that ran out of memory and were halved

    @property
    def calls(self) -> int:
        return len(self.chunk_sizes)


def concat_outputs(parts: list):
    """Join per-chunk outputs along the batch: tensors, arrays, lists, tuples of those, or None."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, np.ndarray):
        return np.concatenate(parts)
    if isinstance(first, tuple):
        return tuple(concat_outputs(list(items)) for items in zip(*parts))
    if isinstance(first, list):
        return [item for part in parts for item in part]
    raise TypeError(f"cannot join chunk outputs of type {type(first).__name__}: return tensors, arrays or lists")


def run_in_chunks(call: Callable[[int, int], object], n: int, max_batch: int) -> Chunked:
    """`call(start, stop)` over inputs 0..n-1 in chunks of at most `max_batch`, outputs joined.

    Running out of memory halves the chunk size and retries the failed chunk; the chunks that already finished
    are kept, and later chunks use the smaller size. A chunk of one that still runs out is re-raised. "Out of
    memory" is `torch.cuda.OutOfMemoryError` (CUDA ran out while allocating) or `MemoryError` (what
    `helpers.core.limits` raises when it estimates, before allocating, that a batch cannot fit).
    """
    n, max_batch = check_count("N", n), check_count("max_batch", max_batch)
    parts, sizes, halvings = [], [], []
    start, size = 0, min(max_batch, n)
    while start < n:
        stop = min(start + size, n)
        try:
            parts.append(call(start, stop))
        except OUT_OF_MEMORY as error:
            if stop - start == 1:
                raise type(error)(
                    f"out of memory with a batch of 1 (after {start} of {n} inputs in chunks {sizes}): the model "
                    f"itself does not fit; try cpu_offload=True or a smaller size. Original error: {error}"
                ) from error
            halvings.append(stop - start)
            size = (stop - start) // 2
            _release_cuda_cache()
            continue
        sizes.append(stop - start)
        start = stop
    return Chunked(concat_outputs(parts), sizes, halvings)


def _release_cuda_cache() -> None:
    if accelerator.compute_device().type == "cuda":
        torch.cuda.empty_cache()  # hand the failed chunk's blocks back before the smaller retry


# ---------------------------------------------------------------------------------------------------
# The job: N inferences' inputs, and each stage callable on a slice of them


@dataclass
class StageJob:
    """N prompts with one seed each, and the settings every stage runs with.

    `prompt_embeds`/`negative_prompt_embeds` (inputs of denoise) and `latents` (input of decode) are made when
    first needed, or set from a measured batched run so that no stage's work is done twice.
    """

    pipe: object
    prompts: list[str]
    seeds: list[int]
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    latents: torch.Tensor | None = None

    def __post_init__(self):
        self.prompts = list(self.prompts)
        check_count("N", len(self.prompts))
        self.seeds = check_seeds(self.seeds, self.prompts)
        check_count("num_inference_steps", self.num_inference_steps)

    @property
    def n(self) -> int:
        return len(self.prompts)

    @property
    def device(self) -> torch.device:
        part = getattr(self.pipe, "unet", None) or getattr(self.pipe, "vae", None) or self.pipe.text_encoder
        return part.device

    def call(self, stage: str, start: int, stop: int, pipe=None, *, warmup: bool = False):
        """Run `stage` on inputs start..stop-1 (with `pipe`, e.g. only the stage's part; default the job's).
        `warmup=True` denoises one step only: the same shapes and set-up at a twentieth of the cost."""
        pipe = pipe or self.pipe
        guidance = self.guidance_scale > 1.0
        steps = 1 if warmup else self.num_inference_steps
        if stage == "encode_text":
            return encode_text(pipe, self.prompts[start:stop], guidance=guidance)  # 2 × (b, 77, hidden)
        if stage == "denoise":
            negative = None if self.negative_prompt_embeds is None else self.negative_prompt_embeds[start:stop]
            return denoise(pipe, self.prompt_embeds[start:stop], negative, num_inference_steps=steps,
                           guidance_scale=self.guidance_scale, seeds=self.seeds[start:stop], height=self.height,
                           width=self.width, progress=False)  # (b, 4, h/8, w/8)
        if stage == "decode":
            return decode(pipe, self.latents[start:stop], output_type="pt")  # (b, 3, h, w) in [0, 1]
        if stage == "generate":
            return generate(pipe, self.prompts[start:stop], seeds=self.seeds[start:stop],
                            num_inference_steps=steps, guidance_scale=self.guidance_scale,
                            height=self.height, width=self.width, output_type="pt", progress=False).images
        raise ValueError(f"stage={stage!r} is unknown; choose one of {STAGES}")

    def ensure_inputs(self, stage: str, max_batch: int) -> None:
        """Make the inputs `stage` needs (embeddings for denoise, latents for decode), in chunks of max_batch."""
        if stage in ("denoise", "decode") and self.prompt_embeds is None:
            self.set_output("encode_text", run_in_chunks(lambda a, b: self.call("encode_text", a, b), self.n,
                                                         max_batch).output)
        if stage == "decode" and self.latents is None:
            self.set_output("denoise", run_in_chunks(lambda a, b: self.call("denoise", a, b), self.n,
                                                     max_batch).output)

    def set_output(self, stage: str, output) -> None:
        """Keep a stage's output over all N as the next stage's input."""
        if stage == "encode_text":
            self.prompt_embeds, self.negative_prompt_embeds = output
        elif stage == "denoise":
            self.latents = output


def max_abs_diff(a, b) -> float:
    """The largest absolute difference between two outputs (tensors, or tuples of tensors / None)."""
    if isinstance(a, tuple):
        return max((max_abs_diff(x, y) for x, y in zip(a, b) if x is not None), default=0.0)
    return float((a.float() - b.float()).abs().max())


# ---------------------------------------------------------------------------------------------------
# Timing one chunked call


def time_chunked(call: Callable[[int, int], object], n: int, max_batch: int, *, device, repeats: int = 3,
                 min_time_s: float = MIN_RUN_S, warmup: Callable[[int, int], object] | bool = True) -> Measurement:
    """`run_in_chunks(call, n, max_batch)` timed by `measure.measure`: warm-up excluded, synchronised, under
    inference_mode. A run shorter than `min_time_s` is repeated, at least `repeats` times and until `min_time_s` is
    spent (at most MAX_RUNS), and the median is kept: a few milliseconds are noise on a busy machine. The
    Measurement's `memory` is the first run's peak; `extra["chunked"]` the first run's output and chunking.

    The warm-up is one untimed call at the chunk size (first calls pay for lazy set-up and allocations), made
    with `warmup` when it is a callable (e.g. one denoising step instead of twenty), skipped when False. It runs
    through `run_in_chunks` like the timed runs: a chunk that does not fit is halved there, untimed, and the timed
    runs start at the size that fitted (the halvings are recorded with the first run's)."""
    check_count("repeats", repeats)
    halvings, runs = [], []
    if warmup:
        with torch.inference_mode():
            warm = run_in_chunks(warmup if callable(warmup) else call, min(max_batch, n), max_batch)
        max_batch, halvings = max(warm.chunk_sizes), warm.oom_halvings
    def run() -> None:
        chunked = run_in_chunks(call, n, max_batch)
        runs[:] = runs or [chunked]  # the first run's output is kept, the others' let go

    timing = measure(f"{n} inputs in chunks of {max_batch}", run, repeats=repeats, warmup=0, items_per_call=n,
                     device=device, min_time_s=min_time_s, long_run_once=True, memory=True)  # a long 1st run suffices
    first = runs[0]
    first.oom_halvings = halvings + first.oom_halvings
    timing.extra["chunked"] = first
    return timing


def time_stage(job: StageJob, stage: str, n: int, max_batch: int, *, repeats: int = 3,
               min_time_s: float = MIN_RUN_S, warmup: bool = True) -> Measurement:
    """`stage` on the job's first `n` inputs in chunks of `max_batch`, timed by `time_chunked`; the warm-up
    call runs at the chunk size with one denoising step (none with `warmup=False`)."""
    return time_chunked(lambda start, stop: job.call(stage, start, stop), n, max_batch, device=job.device,
                        repeats=repeats, min_time_s=min_time_s,
                        warmup=warmup and (lambda start, stop: job.call(stage, start, stop, warmup=True)))


# ---------------------------------------------------------------------------------------------------
# N calls of one against one call of N


def compare(job: StageJob, stage: str, max_batch: int, *, repeats: int = 3, min_time_s: float = MIN_RUN_S,
            keep_output: bool = True) -> dict:
    """One table row: `stage` as N calls of batch 1, then as one call of all N in chunks of `max_batch`.

    Both see the same inputs and seeds, so the outputs must agree (`max_abs_diff`); the batched output becomes
    the next stage's input when `keep_output`.
    """
    max_batch = check_count("max_batch", max_batch)
    job.ensure_inputs(stage, max_batch)
    single = time_stage(job, stage, job.n, 1, repeats=repeats, min_time_s=min_time_s)
    batched = time_stage(job, stage, job.n, max_batch, repeats=repeats, min_time_s=min_time_s)
    single_chunks, batched_chunks = single.extra["chunked"], batched.extra["chunked"]
    if keep_output:
        job.set_output(stage, batched_chunks.output)
    return {
        "stage": stage,
        "N": job.n,
        "single_calls": single_chunks.calls,
        "single_s": single.median,
        "single_s_per_inference": single.per_item,
        "batch_size": max(batched_chunks.chunk_sizes),
        "batched_calls": batched_chunks.calls,
        "batched_s": batched.median,
        "batched_s_per_inference": batched.per_item,
        "speedup": single.median / batched.median,
        "max_abs_diff": max_abs_diff(single_chunks.output, batched_chunks.output),
        "chunk_sizes": batched_chunks.chunk_sizes,
        "oom_halvings": batched_chunks.oom_halvings,
        "single_peak_MiB": single.memory["peak_MiB"],
        "batched_peak_MiB": batched.memory["peak_MiB"],
        "repeats": [len(single.seconds), len(batched.seconds)],
        "memory_method": batched.memory["method"],
    }


COMPARE_COLUMNS = ["stage", "N", "single_calls", "single_s", "single_s_per_inference", "batch_size", "batched_calls",
                   "batched_s", "batched_s_per_inference", "speedup", "max_abs_diff"]


# ---------------------------------------------------------------------------------------------------
# The sweep over batch sizes, and the "auto" batch size


def sweep(job: StageJob, stage: str, batch_sizes: Sequence[int], *, repeats: int = 3,
          min_time_s: float = MIN_RUN_S) -> list[dict]:
    """For each batch size b: one call of the first b inputs, timed (median while short), its throughput
    (inferences/s) and peak memory. Each point has its own warm-up call (of one denoising step).

    A point is one call of b, never chunks: a b whose call does not fit in memory (`helpers.core.limits` refuses it
    before allocating, or CUDA runs out) is skipped, and so are the larger ones; the row keeps the size with
    `skipped` ("out of memory") and `skipped_reason` (what was estimated against what was free) instead of times."""
    sizes = [check_count("batch size", b) for b in batch_sizes]
    if max(sizes) > job.n:
        raise ValueError(f"batch size {max(sizes)} is more than N={job.n}: sweep sizes up to N")
    job.ensure_inputs(stage, max(sizes))
    rows, too_big = [], None
    # a bar per sweep: a notebook shows a widget; a log gets a line every PROGRESS_EVERY_S, not a thousand redraws
    for b in tqdm(sizes, desc=f"sweep {stage}", unit="size", mininterval=PROGRESS_EVERY_S, leave=False):
        if too_big is not None:
            rows.append(_skipped(stage, b, f"larger than batch {too_big}, which did not fit in memory"))
            continue
        try:
            with torch.inference_mode():
                job.call(stage, 0, b, warmup=True)  # the warm-up, as one call of b: does it fit?
            run = time_stage(job, stage, b, b, repeats=repeats, min_time_s=min_time_s, warmup=False)
            chunked = run.extra["chunked"]
            if chunked.calls > 1:
                raise MemoryError(f"ran out of memory as one call of {b} (halved to {chunked.chunk_sizes})")
        except OUT_OF_MEMORY as error:
            _release_cuda_cache()
            rows.append(_skipped(stage, b, str(error)))
            too_big = b
            continue
        rows.append({"stage": stage, "batch_size": b, "call_s": run.median, "throughput": b / run.median,
                     "peak_MiB": run.memory["peak_MiB"], "added_MiB": run.memory["added_MiB"],
                     "repeats": len(run.seconds),
                     "skipped": None, "skipped_reason": None})
    best = max((r["throughput"] for r in measured(rows)), default=None)
    for row in rows:
        row["vs_best"] = None if row["skipped"] else row["throughput"] / best
    return rows


def _skipped(stage: str, batch_size: int, reason: str) -> dict:
    return {"stage": stage, "batch_size": batch_size, "call_s": None, "throughput": None, "peak_MiB": None,
            "added_MiB": None, "repeats": 0, "skipped": "out of memory", "skipped_reason": reason}


SWEEP_COLUMNS = ["stage", "batch_size", "call_s", "throughput", "vs_best", "peak_MiB", "added_MiB",
                 "repeats", "skipped"]


def measured(rows: Sequence[dict]) -> list[dict]:
    """The sweep rows that ran (not skipped for memory)."""
    return [r for r in rows if not r.get("skipped")]


def _none_fit(rows: Sequence[dict], limit: str = "in memory") -> ValueError:
    why = [f"batch {r['batch_size']}: {r['skipped_reason']}" for r in rows if r.get("skipped")]
    if measured(rows):
        why.append(f"the smallest measured peak was {min(r['peak_MiB'] for r in measured(rows)):.0f} MiB")
    return ValueError(f"no swept batch size fits {limit}: " + "; ".join(why or ["no sizes were swept"]))


def best_batch_size(rows: Sequence[dict]) -> int:
    """The swept batch size of the highest throughput, among those that ran."""
    if not measured(rows):
        raise _none_fit(rows)
    return max(measured(rows), key=lambda r: r["throughput"])["batch_size"]


def auto_batch_size(rows: Sequence[dict], tolerance: float = 0.10, memory_limit_MiB: float | None = None) -> int:
    """The smallest swept batch size within `tolerance` of the best throughput (less memory and latency for
    the same speed), among those that ran (a size skipped for memory never), and under `memory_limit_MiB` if given."""
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance={tolerance} must be in [0, 1): the share of the best throughput one may lose")
    fitting = [r for r in measured(rows) if memory_limit_MiB is None or r["peak_MiB"] <= memory_limit_MiB]
    if not fitting:
        raise _none_fit(rows, "in memory" if memory_limit_MiB is None else f"memory_limit_MiB={memory_limit_MiB}")
    best = max(r["throughput"] for r in fitting)
    return min(r["batch_size"] for r in fitting if r["throughput"] >= (1 - tolerance) * best)


PLATEAU = 0.01  # throughputs within 1% of the best count as the same plateau


def call_overhead(rows: Sequence[dict]) -> dict:
    """What a call of one pays beyond the work of its one inference. The machine is full at the end of the
    throughput plateau (the largest swept batch within PLATEAU of the best): `per_inference_s` is the marginal
    cost of one more inference over the last doubling up to there, and `fixed_s` = (time of a call of one) -
    per_inference_s is the part of it that batching can share out.

    Not the slope past the plateau: on a CPU, throughput falls there (the activations outgrow the caches, so each
    inference costs more than at the plateau), and that slope would make the fixed part come out negative.
    Sizes skipped for memory are left out."""
    if not measured(rows):
        raise _none_fit(rows)
    rows = sorted(measured(rows), key=lambda r: r["batch_size"])
    one = rows[0]["call_s"] / rows[0]["batch_size"]
    best = max(r["batch_size"] / r["call_s"] for r in rows)
    full = max(i for i, r in enumerate(rows) if r["batch_size"] / r["call_s"] >= (1 - PLATEAU) * best)
    if full == 0:  # batching never beat a call of the smallest batch: nothing fixed to share
        return {"fixed_s": 0.0, "per_inference_s": one, "fixed_share_at_batch_1": 0.0, "full_batch_size":
                rows[0]["batch_size"]}
    (b0, t0), (b1, t1) = ((r["batch_size"], r["call_s"]) for r in rows[full - 1 : full + 1])
    per_inference = (t1 - t0) / (b1 - b0)
    fixed = rows[0]["call_s"] - rows[0]["batch_size"] * per_inference
    return {"fixed_s": fixed, "per_inference_s": per_inference, "fixed_share_at_batch_1": fixed / rows[0]["call_s"],
            "full_batch_size": b1}


# ---------------------------------------------------------------------------------------------------
# Only a stage's part of the model


def threads_report() -> dict:
    """torch's threads against the cores this process may use: more threads than cores is oversubscription."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"torch_threads": torch.get_num_threads(), "cores_available": cores,
            "oversubscribed": torch.get_num_threads() > cores}


def load_stage(model: str, stage: str, *, device=None, dtype=None, config_dir: str | Path | None = None):
    """Only what `stage` uses (STAGE_COMPONENTS), each through `helpers.core.models.load_component`: one component
    of a folder or hub repo, or, from a single file, only that component's tensors. Returns an object with those
    attributes, which the stage functions accept in place of a pipeline."""
    if stage not in STAGE_COMPONENTS:
        raise ValueError(f"stage={stage!r}: only {list(STAGE_COMPONENTS)} run on a part of the model")
    single_file = Path(model).is_file()
    if single_file and config_dir is None:
        config_dir = toy_paths()[0] if Path(model).resolve() == _toy_ldm_file().resolve() else None
    parts = {}
    for component in STAGE_COMPONENTS[stage]:
        # the tokenizer and scheduler are not in an LDM file: they come from the config folder
        source = str(config_dir) if single_file and component in ("tokenizer", "scheduler") else model
        parts[component] = load_component(source, component, device=device, dtype=dtype, config_dir=config_dir)
    if stage == "denoise":  # latents are vae_scale_factor times smaller than images: read it from the VAE config
        parts["vae_scale_factor"] = _vae_scale_factor(str(config_dir) if single_file else model)
    return SimpleNamespace(**parts)


def _toy_ldm_file() -> Path:
    return Path(TOY_LDM_FILE)


def _vae_scale_factor(model: str) -> int:
    from diffusers import AutoencoderKL

    model = resolve_model(model)
    root = toy_paths()[0] if model == "toy" else model
    return vae_scale_factor(AutoencoderKL.load_config(root, subfolder="vae", local_files_only=hub_offline()))


def weights_MiB(*modules) -> float:
    """Bytes of the parameters and buffers of the torch modules among `modules`, in MiB."""
    total = 0
    for module in modules:
        if isinstance(module, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    return total / MiB


def load_row(loaded, load: Measurement) -> dict:
    """A load's row (`load` from `measure.time_load`): seconds, MiB of the networks it holds, memory it added."""
    modules = [getattr(loaded, name, None) for name in ("text_encoder", "unet", "vae")]
    return {"load_s": load.median, "weights_MiB": weights_MiB(*modules), "load_added_MiB": load.memory["added_MiB"]}


def stage_only_rows(job: StageJob, source: str, config_dir: str | None, whole_load: dict, check_n: int = 2,
                    ) -> list[dict]:
    """Each stage with only its own part loaded from `source` (a single file or the model's folder; `load_stage`):
    the load's seconds and memory against the whole pipeline's (`whole_load`, a `load_row`), and the largest
    difference between its outputs and the whole pipeline's on the first `check_n` inputs. The last row is the whole
    pipeline's."""
    device, dtype = job.pipe.device, job.pipe.unet.dtype
    rows = []
    for stage in STAGE_COMPONENTS:
        part, timing = time_load(lambda stage=stage: load_stage(source, stage, device=device, dtype=dtype,
                                                                config_dir=config_dir), device)
        load = load_row(part, timing)
        difference = max_abs_diff(job.call(stage, 0, check_n, pipe=part), job.call(stage, 0, check_n))
        rows.append({"stage": stage, "loads": "+".join(vars(part)), **load,
                     "weights_vs_whole": load["weights_MiB"] / whole_load["weights_MiB"],
                     "time_vs_whole": load["load_s"] / whole_load["load_s"], "max_abs_diff": difference})
        del part
    return rows + [{"stage": "(whole pipeline)", "loads": "everything", **whole_load, "weights_vs_whole": 1.0,
                    "time_vs_whole": 1.0}]


# ---------------------------------------------------------------------------------------------------
# Figures


def plot_sweeps(sweeps: dict[str, list[dict]], auto: dict[str, dict], title: str):
    """One panel a stage: throughput by batch size (left axis) and the peak memory each call added (right axis);
    ★ the best batch size, ◆ the auto one, ✕ sizes skipped for memory. Returns the figure."""
    import matplotlib.pyplot as plt  # only the notebook draws

    fig, axes = plt.subplots(1, len(sweeps), figsize=(4.2 * len(sweeps), 3.2), squeeze=False)
    for ax, (stage, rows) in zip(axes[0], sweeps.items()):
        sizes, ran = [r["batch_size"] for r in rows], measured(rows)
        ax.plot([r["batch_size"] for r in ran], [r["throughput"] for r in ran], "o-", color="C0")
        best = max(ran, key=lambda r: r["throughput"])
        ax.plot(best["batch_size"], best["throughput"], "*", color="C3", markersize=16,
                label=f"best: {best['batch_size']}")
        picked = next(r for r in rows if r["batch_size"] == auto[stage]["batch_size"])
        ax.plot(picked["batch_size"], picked["throughput"], "D", color="C2", markersize=8, fillstyle="none",
                label=f"auto: {picked['batch_size']}")
        skipped = [r["batch_size"] for r in rows if r["skipped"]]
        if skipped:
            ax.plot(skipped, [0] * len(skipped), "x", color="C3", markersize=10, clip_on=False,
                    label=f"out of memory: {', '.join(map(str, skipped))}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set(xlabel="batch size", title=stage, ylim=(0, None))
        ax.set_ylabel("inferences / s", color="C0")
        ax.legend(loc="lower right", fontsize=8)
        memory = ax.twinx()
        memory.plot([r["batch_size"] for r in ran], [r["added_MiB"] for r in ran], "s--", color="C1", alpha=0.7)
        memory.set_ylim(0, max(1.0, *(1.1 * r["added_MiB"] for r in ran)))
        memory.set_ylabel("peak memory added by the call, MiB", color="C1")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
