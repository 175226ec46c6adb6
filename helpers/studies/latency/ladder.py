"""The ladder: rungs side by side with the baseline. Each rung runs on a copy of the pipeline that shares its weights
(`copy_pipeline`), set up by its speed-ups (`configure`), timed end to end and part by part (`run_rung`: warm-up
excluded, median of repeats, through `helpers.core.stages.generate`), and scored on its quality images
(`Ladder.run`); `Ladder.head_to_head` times the finalists and the baseline again in turn (a busy machine drifts
between rungs)."""

from __future__ import annotations

import copy
import dataclasses
import gc
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from helpers.core.measure import in_turn, more_runs, time_load, timed
from helpers.core.stages import generate
from helpers.studies.latency.profiling import part_timers
from helpers.studies.latency.quality import image_similarity, quality
from helpers.studies.latency.rungs import (
    STRENGTHS,
    Inputs,
    RungConfig,
    RungSkipped,
    parse_rung,
    same_arithmetic_reference,
)
from helpers.studies.latency.speedups import apply_speedups, finish_calibration, networks, why_not

# ---------------------------------------------------------------------------------------------------
# Copies that share the base's weights


@dataclass
class UNetOnly:
    """A UNet and its scheduler standing in for a pipeline: what the per-step benchmark configures."""

    unet: torch.nn.Module
    scheduler: object
    controlnet = None
    vae = None
    text_encoder = None

    @property
    def device(self) -> torch.device:
        return self.unet.device


def sharing_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module`'s structure (submodules, attention processors, forwards) around the same weights: new
    Parameter and buffer objects on the same storage. A rung may cast, re-lay, fuse or patch its copy (`.to()`
    gives the copy's Parameter new data, leaving the base's alone) while what it leaves unchanged costs no memory."""
    memo = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        alias = tensor.detach()
        memo[id(tensor)] = (torch.nn.Parameter(alias, requires_grad=tensor.requires_grad)
                            if isinstance(tensor, torch.nn.Parameter) else alias)
    return copy.deepcopy(module, memo)


def copy_pipeline(pipe):
    """The same pipeline class around `sharing_copy`s of its networks and a copy of its scheduler (tokenizer,
    processors and configs shared)."""
    if isinstance(pipe, UNetOnly):
        return UNetOnly(sharing_copy(pipe.unet), copy.deepcopy(pipe.scheduler))
    components = {name: sharing_copy(value) if isinstance(value, torch.nn.Module) else value
                  for name, value in pipe.components.items()}
    components["scheduler"] = copy.deepcopy(pipe.scheduler)
    new = type(pipe)(**components, requires_safety_checker=pipe.config.requires_safety_checker)  # no warning per copy
    new.set_progress_bar_config(disable=True)
    return new


def owned_bytes(pipe, base) -> int:
    """Bytes of weights `pipe` (a configured copy) holds of its own, beyond those it shares with `base`."""
    def storages(p) -> dict[int, int]:
        tensors = itertools.chain.from_iterable(
            itertools.chain(m.parameters(), m.buffers()) for m in networks(p))
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}

    shared = storages(base)
    return sum(nbytes for ptr, nbytes in storages(pipe).items() if ptr not in shared)


def release_memory(device: torch.device | str | None = None) -> None:
    """Collect what a finished rung left (DeepCache's helper and its pipeline form a cycle) and hand CUDA's cached
    blocks back, so that the next rung starts from the base's memory."""
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def configure(base_pipe, config: RungConfig):
    """A copy of `base_pipe` set up as `config` says (`speedups`); raises RungSkipped (with the reason) where this
    platform cannot run it."""
    reason = why_not(config, base_pipe.device)
    if reason:
        raise RungSkipped(reason)
    pipe = copy_pipeline(base_pipe)
    apply_speedups(pipe, config)
    return pipe


# ---------------------------------------------------------------------------------------------------
# Running a rung: end-to-end latency, per-part times, and the images for its quality


@dataclass
class RungResult:
    name: str
    config: RungConfig
    status: str  # "ok" or "skipped"
    reason: str = ""
    setup_s: float = 0.0  # configuring the copy (dtype, fusing, export, ...), once per process
    first_call_s: float = 0.0  # the warm-up call (compiles, converts, allocates)
    latency_s: list[float] = field(default_factory=list)  # end to end, one request, per repeat
    parts_s: dict[str, float] = field(default_factory=dict)  # median seconds per part in one request
    stages_s: dict[str, float] = field(default_factory=dict)  # generate's own timings (median)
    calls: dict[str, int] = field(default_factory=dict)  # calls per part in one request
    images: list = field(default_factory=list)  # the quality images (PIL), one per prompt
    quality: dict = field(default_factory=dict)
    wall_s: float = 0.0  # the whole rung: setup, warm-up, timed requests and quality images

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.latency_s) if self.latency_s else None

    def row(self) -> dict:
        row = {"rung": self.name, "status": self.status, "latency s": self.median_s, "setup s": self.setup_s,
               "first call s": self.first_call_s, **{f"{k} s": v for k, v in self.parts_s.items()},
               "unet calls": self.calls.get("unet", 0), "runs": len(self.latency_s), **self.quality}
        if self.status != "ok":
            row["reason"] = self.reason
        return row

    def as_dict(self) -> dict:
        return {"name": self.name, "config": dataclasses.asdict(self.config), "changes": self.config.changes(),
                "status": self.status, "reason": self.reason, "setup_s": self.setup_s,
                "first_call_s": self.first_call_s, "latency_s": self.latency_s, "median_s": self.median_s,
                "parts_s": self.parts_s, "stages_s": self.stages_s, "calls": self.calls,
                "quality": self.quality, "wall_s": self.wall_s}


def generate_config(pipe, config: RungConfig, inputs: Inputs, output_type: str = "pil"):
    """One `helpers.core.stages.generate` call with the config's arguments (the one way this project generates): the
    inputs' guidance scale, unless the rung has its own (an LCM's 1.0)."""
    control = {} if inputs.control_images is None else {"image": list(inputs.control_images)}
    kwargs = {"guidance_scale": inputs.guidance_scale, **config.generate_kwargs(), **control}
    return generate(pipe, inputs.prompts, seeds=inputs.seeds, height=inputs.height, width=inputs.width,
                    output_type=output_type, progress=False, **kwargs)


def time_request(pipe, config: RungConfig, request: Inputs) -> tuple[float, dict, dict, dict]:
    """One timed request: (end-to-end seconds, seconds per part, generate's stage timings, calls per part)."""
    device = pipe.device
    seconds: dict[str, float] = {}
    with part_timers(pipe, device) as calls:
        with timed(seconds, "request", device):
            generation = generate_config(pipe, config, request)
    total = seconds["request"]
    parts = {part: sum(times) for part, times in calls.items()}
    parts["other"] = max(total - sum(parts.values()), 0.0)  # the loop's own glue: latents, guidance arithmetic
    return total, parts, generation.timings, {part: len(times) for part, times in calls.items()}


def run_rung(base_pipe, name: str, config: RungConfig, inputs: Inputs, *, request_size: int = 1, repeats: int = 3,
             min_time_s: float = 0.0, warmup: int = 1, quality_batch: int = 8) -> RungResult:
    """Configure a copy, warm it up, time requests of `request_size` images (at least `repeats`, and until
    `min_time_s` is spent: a 0.1 s rung gets many; median kept), then generate every prompt of `inputs` for its
    quality. A platform that cannot run it, or memory that cannot hold it, gives status "skipped" with the reason;
    the copy is freed either way."""
    result = RungResult(name, config, "ok")
    pipe = None
    began = time.perf_counter()
    try:
        start = began
        pipe = configure(base_pipe, config)
        result.setup_s = time.perf_counter() - start
        request = inputs.subset(request_size)
        for _ in range(warmup):  # compiling / converting happens here: a failure means the platform cannot
            start = time.perf_counter()
            warm_up(pipe, config, request, inputs)
            result.first_call_s = time.perf_counter() - start
        runs = []
        with torch.inference_mode():
            while more_runs([run[0] for run in runs], repeats, min_time_s):
                runs.append(time_request(pipe, config, request))
        result.latency_s = [run[0] for run in runs]
        result.parts_s = {part: statistics.median(run[1][part] for run in runs) for part in runs[0][1]}
        result.stages_s = {stage: statistics.median(run[2][stage] for run in runs) for stage in runs[0][2]}
        result.calls = runs[0][3]
        result.images = quality_images(pipe, config, inputs, quality_batch)
        result.wall_s = time.perf_counter() - began
    except Exception as error:  # noqa: BLE001 - whatever this platform cannot do is recorded, never a crash
        return RungResult(name, config, "skipped", skip_reason(error), setup_s=result.setup_s,
                          wall_s=time.perf_counter() - began)
    finally:
        pipe = None
        release_memory(base_pipe.device)
    return result


CALIBRATION_IMAGES = 4  # an int8 rung's warm-up generates this many pictures, and NNCF calibrates on their calls


def warm_up(pipe, config: RungConfig, request: Inputs, inputs: Inputs) -> None:
    """The first request, untimed (compiling, converting and allocating happen here). An int8 rung's networks answer
    it in PyTorch for the first CALIBRATION_IMAGES pictures of `inputs` and are quantized on those calls after it."""
    generate_config(pipe, config, inputs.subset(CALIBRATION_IMAGES) if config.int8 else request)
    finish_calibration(pipe)


def out_of_memory(error: BaseException) -> bool:
    """A refusal before allocating (helpers.core.limits' MemoryError) or an allocation that failed (CUDA's OOM)."""
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(error).lower()


def skip_reason(error: Exception) -> str:
    """What a skipped rung records: a RungSkipped's own message, else the error's type and first line."""
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return first if isinstance(error, RungSkipped) else f"{type(error).__name__}: {first[:300]}"


def quality_images(pipe, config: RungConfig, inputs: Inputs, batch_size: int) -> list:
    """Every prompt of `inputs`, generated in batches (one generator per seed: a batch equals single calls). A batch
    that does not fit raises RungSkipped naming QUALITY_BATCH."""
    images = []
    for start in range(0, len(inputs.prompts), batch_size):
        chunk = inputs.slice(start, start + batch_size)
        try:
            images += generate_config(pipe, config, chunk).images
        except Exception as error:
            if not out_of_memory(error):
                raise
            raise RungSkipped(f"out of memory generating the quality images {len(chunk.prompts)} at a time (lower "
                              f"QUALITY_BATCH): {skip_reason(error)}") from error
    return images


# ---------------------------------------------------------------------------------------------------
# Timing in turn: ratios that hold on a machine whose speed drifts


def interleaved_times(base_pipe, configs: dict[str, RungConfig], request: Inputs, rounds: int,
                      skipped: dict[str, str] | None = None, inputs: Inputs | None = None) -> dict[str, list[float]]:
    """Seconds of one request of each config, timed `in_turn` (helpers.core.measure): what a ratio of two
    latencies on a busy machine needs. The copies are configured and warmed up one at a time, each sharing the base's
    weights; one that runs out of memory beside the others is freed and left out (its reason in `skipped`), except
    the first config (the reference), whose failure is raised."""
    device = base_pipe.device

    def request_timer(pipe, config: RungConfig) -> Callable[[], float]:
        def run() -> float:
            seconds: dict[str, float] = {}
            with timed(seconds, "request", device):
                generate_config(pipe, config, request)
            return seconds["request"]
        return run

    runs = {}
    for name, config in configs.items():
        try:
            pipe = configure(base_pipe, config)
            runs[name] = request_timer(pipe, config)
            # the warm-up: compile compiles, int8 calibrates (on `inputs`), memory that cannot hold this copy tells now
            warm_up(pipe, config, request, request if inputs is None else inputs)
        except Exception as error:
            if not runs or not out_of_memory(error):
                raise
            runs.pop(name, None)
            release_memory(device)
            if skipped is not None:
                skipped[name] = skip_reason(error)
    return in_turn(runs, rounds, warmup=False)


# ---------------------------------------------------------------------------------------------------
# The ladder of one run


@dataclass
class Ladder:
    """The rungs of one run, side by side with the baseline: `ladder.run("dpm++ 10 + deepcache")` times a rung,
    scores its images against the prompt, the control map and the baseline's image of the same seed. A name is read
    by `parse_rung` on `baseline`, with `strengths` for the speed-ups that have one.

    With `equality_images` > 0, a rung that only changes how the arithmetic of a rung already priced runs
    (`SAME_ARITHMETIC`: channels_last, fused QKV, compile, the attention kernel, OpenVINO at the same precision) is
    priced by an equality check instead: its first `equality_images` pictures against that rung's, and when they
    agree to `equality_min_psnr_db`, its oracle scores are that rung's ("quality_from" says which). Pictures that
    disagree get the full pricing on every prompt. 0: every rung is priced on every prompt."""

    pipe: object
    inputs: Inputs
    baseline: RungConfig
    on_toy: bool
    strengths: RungConfig = STRENGTHS
    request_size: int = 1
    repeats: int = 3
    min_time_s: float = 0.0
    quality_batch: int = 8
    equality_images: int = 0
    equality_min_psnr_db: float = 40.0
    results: dict[str, RungResult] = field(default_factory=dict)

    def config(self, name: str) -> RungConfig:
        """What the rung `name` runs."""
        return parse_rung(name, self.strengths, self.baseline)

    def run(self, name: str) -> RungResult:
        if name in self.results:
            return self.results[name]
        if "baseline" not in self.results and name != "baseline":
            self.run("baseline")
        reference = self.same_arithmetic_as(name)
        result = self._run(name, self.inputs.subset(self.equality_images) if reference else self.inputs)
        if result.status == "ok" and reference:
            equality = image_similarity(result.images, self.results[reference].images[:len(result.images)])
            if equality["lowest_psnr_db"] >= self.equality_min_psnr_db:
                result.quality = self._inherited_quality(result, reference, equality)
                self.results[name] = result
                return result
            checked_s = result.wall_s
            result = self._run(name, self.inputs)  # not the same pictures after all: priced in full
            result.wall_s += checked_s
        if name == "baseline" and result.status != "ok":
            raise RuntimeError(f"the baseline could not run ({result.reason}), and every rung is priced against it: "
                               "lower what it needs (QUALITY_BATCH, REQUEST_SIZE, the image size) or free memory")
        if result.status == "ok":
            reference_images = self.results["baseline"].images if name != "baseline" else result.images
            result.quality = quality(result.images, self.inputs, reference_images, self.on_toy)
        self.results[name] = result
        return result

    def _run(self, name: str, inputs: Inputs) -> RungResult:
        return run_rung(self.pipe, name, self.config(name), inputs, request_size=self.request_size,
                        repeats=self.repeats, min_time_s=self.min_time_s, quality_batch=self.quality_batch)

    def same_arithmetic_as(self, name: str) -> str | None:
        """The rung already priced on every prompt that computes what `name` computes (`same_arithmetic_reference`),
        when equality checks are on; else None."""
        reference = same_arithmetic_reference(self.config(name)) if self.equality_images else None
        return next((ran for ran, result in self.results.items() if result.config == reference
                     and result.status == "ok" and "quality_from" not in result.quality
                     and len(result.images) >= self.equality_images), None)

    def _inherited_quality(self, result: RungResult, reference: str, equality: dict) -> dict:
        """The reference's oracle scores, this rung's PSNR/SSIM against the baseline on its own pictures, and the
        equality check that allows it."""
        scores = {key: value for key, value in self.results[reference].quality.items()
                  if key not in ("psnr_db", "ssim", "lowest_psnr_db")}
        baseline_images = self.results["baseline"].images[:len(result.images)]
        return {**scores, **image_similarity(result.images, baseline_images), "quality_from": reference,
                "equality_images": len(result.images), "equality_lowest_psnr_db": equality["lowest_psnr_db"]}

    def rows(self) -> list[dict]:
        base = self.results["baseline"].median_s
        rows = []
        for result in self.results.values():
            row = result.row()
            if result.median_s:
                row["speed-up"] = base / result.median_s
            rows.append(row)
        return rows

    def head_to_head(self, names: Sequence[str], rounds: int) -> list[dict]:
        """The baseline and the rungs `names` timed again in turn, round after round: the ladder times each rung
        minutes apart, and a shared machine drifts 10-50% in that time; in turn, each sees the same moments, so
        their ratios hold. Returns their ladder rows with "latency s" and "speed-up" from this timing ("ladder
        latency s" keeps the ladder's)."""
        names = ["baseline", *(name for name in names if name != "baseline")]
        skipped: dict[str, str] = {}
        times = interleaved_times(self.pipe, {name: self.results[name].config for name in names},
                                  self.inputs.subset(self.request_size), rounds, skipped, self.inputs)
        medians = {name: statistics.median(seconds) for name, seconds in times.items()}
        rows = {row["rung"]: row for row in self.rows()}
        return [{**rows[name], "ladder latency s": rows[name]["latency s"], "latency s": medians[name],
                 "speed-up": medians["baseline"] / medians[name], "rounds": rounds} if name in medians else
                {"rung": name, "status": "skipped", "reason": skipped[name]} for name in names]

    def points(self, quality_key: str) -> dict[str, tuple[float, float]]:
        """(latency, quality) of every rung that ran, for the Pareto front."""
        return {r.name: (r.median_s, r.quality[quality_key]) for r in self.results.values()
                if r.status == "ok" and r.quality.get(quality_key) is not None}


# ---------------------------------------------------------------------------------------------------
# Loading, cold and warm


def time_loads(load: Callable[[], object], device=None) -> tuple[object, dict[str, float]]:
    """Call `load` twice: the first ("cold": first load in this process; the OS may still cache the files) and the
    second ("warm") are timed. Returns the second result and both times. The first is let go before the second
    loads (two copies of SD 1.5 and a ControlNet at once would double the memory)."""
    times = {}
    loaded = None
    for kind in ("cold", "warm"):
        loaded = None  # collected by time_load before the next load
        loaded, measurement = time_load(load, device)
        times[f"load_{kind}_s"] = measurement.median
    return loaded, times
