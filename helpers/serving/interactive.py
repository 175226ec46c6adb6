"""What the widget panel (`serving.ui`) and the web page (`serving.app`) share: the models they offer, a cache that
loads each model once, the checks on a request, and one generation call with progress and previews.

Both front ends call `run_generation`, which calls `helpers.core.stages.generate`: the one way this project generates.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from helpers.core import accelerator
from helpers.core.models import (
    DEFAULT_SCHEDULER,
    RANDOM_MODELS,
    SD15_HUB_ID,
    hub_offline,
    load_pipeline,
    make_scheduler,
)
from helpers.core.stages import Generation, decode, default_size, generate

# (label, MODEL value): the toy model and SD 1.5-compatible checkpoints in diffusers layout on the hub
MODEL_CHOICES: tuple[tuple[str, str], ...] = (
    ("toy (offline, CPU)", "toy"),
    ("Stable Diffusion 1.5", SD15_HUB_ID),
    ("DreamShaper 8 (SD 1.5)", "Lykon/dreamshaper-8"),
    ("Openjourney v4 (SD 1.5)", "prompthero/openjourney-v4"),
)
MAX_STEPS = 150  # more gives no better image with these schedulers, only a longer wait
MAX_BATCH_SIZE = 8
MAX_SIDE_FACTOR = 4  # largest side: 4 x the model's trained size (2048 px for SD 1.5); beyond that only memory fails
GUIDANCE_RANGE = (1.0, 30.0)
SEED_RANGE = 2**31  # seeds in [0, 2**31): what torch.Generator.manual_seed and a widget's IntText both hold


def random_seed() -> int:
    return random.randrange(SEED_RANGE)


# ---------------------------------------------------------------------------------------------------
# Loading: each model once per process


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do (internet, hub token, a path)."""


def explain_load_error(model: str, error: Exception) -> str:
    """The loader's error plus what the user can do about it."""
    text = f"{type(error).__name__}: {error}"
    lowered = text.lower()
    if any(word in lowered for word in ("401", "403", "gated", "unauthorized", "access to model")):
        hint = "the hub asks for a token: `huggingface_hub.login()` or set HF_TOKEN (Colab: Secrets; Kaggle: Add-ons)"
    elif hub_offline():
        hint = "the hub is switched off here (HF_HUB_OFFLINE=1): choose 'toy', or go online and unset HF_HUB_OFFLINE"
    elif any(word in lowered for word in ("connect", "resolve", "timed out", "network", "offline")):
        hint = "no internet: on Kaggle switch Settings -> Internet on; or choose 'toy', which is shipped"
    else:
        hint = "check the model name (a hub id, a diffusers folder, a .safetensors file, or 'toy')"
    return f"Cannot load MODEL={model!r}: {hint}. ({text[:300]})"


def memory_settings(model: str) -> dict:
    """`load_pipeline` options that fit SD 1.5 on the GPU there is (a T4 has 15 GiB: fp16 alone fits)."""
    if model == "toy" or model in RANDOM_MODELS or not accelerator.on_gpu():
        return {}
    total_gib = accelerator.accelerator().memory_gib
    if total_gib < 6:
        return {"cpu_offload": True, "attention_slicing": True}
    return {"attention_slicing": True} if total_gib < 12 else {}


class PipelineCache:
    """`cache.get(model)` loads a pipeline with `load_pipeline` the first time and returns the same one after."""

    def __init__(self, loader: Callable = load_pipeline):
        self.loader = loader
        self._pipelines: dict[tuple[str, str | None], object] = {}
        self._lock = threading.Lock()  # the web page serves requests from worker threads

    def put(self, model: str, pipe, controlnet: str | None = None) -> None:
        self._pipelines[(model, controlnet)] = pipe

    def get(self, model: str, controlnet: str | None = None):
        key = (model, controlnet)
        with self._lock:
            if key not in self._pipelines:
                try:
                    self._pipelines[key] = self.loader(model, controlnet=controlnet, **memory_settings(model))
                except (OSError, ValueError, RuntimeError, ImportError) as error:
                    raise ModelLoadError(explain_load_error(model, error)) from error
            return self._pipelines[key]


PIPELINES = PipelineCache()  # the process's cache, shared by every panel and the web page


# ---------------------------------------------------------------------------------------------------
# A request and its checks


@dataclass
class Request:
    """One generation as a user asks for it (widget values or the web form)."""

    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 42
    height: int = 0  # 0: the model's trained size
    width: int = 0
    batch_size: int = 1
    scheduler: str = DEFAULT_SCHEDULER
    extra: dict = field(default_factory=dict)  # more `generate` arguments (a ControlNet's scale, latents...)

    @property
    def seeds(self) -> list[int]:
        """One seed per image: seed, seed + 1, ...; image i is the same whatever the batch size."""
        return [self.seed + i for i in range(self.batch_size)]


def check_request(request: Request, pipe) -> tuple[int, int]:
    """The (height, width) to generate at; a ValueError naming the field and the allowed range if one is off."""
    if not request.prompt.strip():
        raise ValueError("prompt is empty: describe the picture, e.g. 'a large red circle on a white background'")
    _check_range("steps", request.num_inference_steps, 1, MAX_STEPS)
    _check_range("guidance", request.guidance_scale, *GUIDANCE_RANGE)
    _check_range("seed", request.seed, 0, SEED_RANGE - request.batch_size)
    _check_range("batch size", request.batch_size, 1, MAX_BATCH_SIZE)
    default_height, default_width = default_size(pipe)
    factor = pipe.vae_scale_factor
    height, width = request.height or default_height, request.width or default_width
    for name, value, default in (("height", height, default_height), ("width", width, default_width)):
        _check_range(name, value, factor, MAX_SIDE_FACTOR * default)
        if value % factor:
            lower = value // factor * factor
            raise ValueError(f"{name}={value} must be a multiple of {factor} (the VAE's scale factor for this model): "
                             f"try {max(factor, lower)} or {lower + factor}")
    make_scheduler(request.scheduler, pipe.scheduler)  # raises, naming the choices, for one this model cannot run
    return height, width


def _check_range(name: str, value, low, high) -> None:
    if not low <= value <= high:  # also refuses NaN
        raise ValueError(f"{name}={value} is out of range: choose {low} to {high}")


# ---------------------------------------------------------------------------------------------------
# One generation, with progress and previews


def count_timesteps(pipe, scheduler: str, num_inference_steps: int) -> int:
    """How many denoising steps the loop will run (a scheduler may run more than num_inference_steps, e.g. PNDM)."""
    scheduler = make_scheduler(scheduler, pipe.scheduler)
    scheduler.set_timesteps(num_inference_steps)
    return len(scheduler.timesteps)


def run_generation(
    pipe,
    request: Request,
    *,
    progress: Callable[[int, int], None] | None = None,
    preview: Callable[[int, list], None] | None = None,
    preview_every: int = 0,
) -> Generation:
    """`generate` for one request. `progress(done, total)` after each denoising step; `preview(step, images)` with
    the decoded latents every `preview_every` steps (0: never). Preview decoding is timed apart ("previews") and
    taken out of "denoise", so the stage times stay those of a plain generation."""
    height, width = check_request(request, pipe)
    total = count_timesteps(pipe, request.scheduler, request.num_inference_steps)
    preview_seconds = 0.0

    def on_step_end(_pipe, step_index: int, _timestep, callback_kwargs: dict) -> dict:
        nonlocal preview_seconds
        if progress is not None:
            progress(step_index + 1, total)
        if preview is not None and preview_every and (step_index + 1) % preview_every == 0 and step_index + 1 < total:
            start = time.perf_counter()
            preview(step_index + 1, decode(pipe, callback_kwargs["latents"]))
            preview_seconds += time.perf_counter() - start
        return callback_kwargs

    result = generate(
        pipe,
        [request.prompt] * request.batch_size,
        [request.negative_prompt] * request.batch_size if request.negative_prompt else None,
        seeds=request.seeds,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        height=height,
        width=width,
        scheduler=request.scheduler,
        callback_on_step_end=on_step_end,
        progress=False,
        **request.extra,
    )
    if preview_seconds:
        result.timings["denoise"] -= preview_seconds
        result.timings["previews"] = preview_seconds
    return result

