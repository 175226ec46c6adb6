"""Generation latency (notebook 07): measure it part by part, find the bottlenecks, cut it, and price each cut in
quality.

- A `Config` says how a generation runs (scheduler and steps, precision, memory layout, attention, fused QKV,
  `torch.compile`, guidance cut-off, DeepCache, token merging, ControlNet window, tiny decoder, OpenVINO).
  `parse_rung("dpm++ 10 + bf16 + deepcache", knobs)` builds one from the ladder's names (`OPTIMISATIONS`).
- `configure(base_pipe, config)` returns a configured copy of the pipeline, or raises `RungSkipped` saying why this
  platform cannot run it (fp16 on a CPU, no compiler, a package missing): each `Feature` applies one setting and
  says whether it can run here. The copy shares the base's weights; only what a rung changes (a cast, a re-laid or
  fused weight, a scheduler, a tiny decoder) is its own, and it is freed when the rung is done: SD 1.5 with a
  ControlNet and a copy of every network per rung did not fit a 16 GB T4.
- Device decisions (which half, bf16, compile, OpenVINO) ask `helpers.core.accelerator`: under the rehearsal's pretended
  T4 the rungs are a T4's while the CPU computes, and a rung that cannot run on the compute device says so.
- `part_timers(pipe)` times every part of a generation without touching the loop: forward hooks on the text
  encoder, ControlNet and UNet, wrappers around `scheduler.step`, `vae.decode`, the control-image preprocessing
  and the image postprocessing.
- `run_rung` times a rung end to end (warm-up excluded, median of repeats, through `helpers.core.stages.generate`) and
  generates its quality images; `quality` scores them (oracle prompt and control adherence on the toy,
  PSNR/SSIM against the baseline of the same seed with scikit-image); `pareto_front` and `recommend` close, after
  `Ladder.head_to_head` times the finalists and the baseline again in turn (a busy machine drifts between rungs).
- Bottlenecks: `profile_top_ops` (torch.profiler), `count_flops` (torch.utils.flop_counter) and
  `matmul_roofline` (the same-dtype matmul rate, measured in the same run).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import importlib.util
import itertools
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from helpers.core import accelerator
from helpers.core.timing import measure, more_runs, synchronize, timed

PARTS = ("preprocess", "text_encoder", "controlnet", "unet", "scheduler", "vae_decode", "postprocess")
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def half_name(dtype: torch.dtype) -> str | None:
    """`Config.half` of a pipeline loaded in `dtype`: "fp16", "bf16", or None for fp32."""
    return {v: k for k, v in HALF_DTYPES.items()}.get(dtype)


class RungSkipped(Exception):
    """A rung this platform cannot run; the message says why (it is recorded, never a crash)."""


# ---------------------------------------------------------------------------------------------------
# What a generation is configured with


@dataclass(frozen=True)
class Config:
    scheduler: str = "default"  # a name of helpers.core.models.SCHEDULERS, or the pipeline's own
    steps: int = 50
    half: str | None = None  # "bf16" or "fp16" weights and activations; None: fp32
    channels_last: bool = False
    attention: str = "sdpa"  # "sdpa" (torch's fused attention, diffusers' default), "slicing" or "classic"
    fuse_qkv: bool = False
    compile: bool = False
    cfg_cutoff: float | None = None  # guidance for the first share of the steps only
    deepcache_interval: int = 1  # N > 1: the full UNet every N steps, cached deep features in between
    tome_ratio: float = 0.0  # share of tokens merged by tomesd in the highest-resolution attention
    control_guidance_end: float = 1.0  # ControlNet acts on the first share of the steps
    tiny_vae: bool = False
    engine: str = "torch"  # "torch" or "openvino"

    def generate_kwargs(self) -> dict:
        """What `helpers.core.stages.generate` needs from this config (the rest is applied to the pipeline)."""
        kwargs = {"num_inference_steps": self.steps, "control_guidance_end": self.control_guidance_end}
        if self.cfg_cutoff is not None:
            kwargs["cfg_cutoff"] = self.cfg_cutoff
        return kwargs

    def changes(self) -> dict:
        """The settings that differ from the fp32 baseline's defaults."""
        default = Config()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}


@dataclass
class Knobs:
    """The values behind the ladder's names (the notebook's parameters)."""

    cfg_cutoff: float = 0.5
    deepcache_interval: int = 3
    tome_ratio: float = 0.5
    control_guidance_end: float = 0.5


OPTIMISATIONS: dict[str, Callable[[Knobs], dict]] = {
    "bf16": lambda k: {"half": "bf16"},
    "fp16": lambda k: {"half": "fp16"},
    "half": lambda k: {"half": half_name(accelerator.fast_half_dtype())},  # fp16 on CUDA, bf16 on a CPU
    "channels_last": lambda k: {"channels_last": True},
    "attention_slicing": lambda k: {"attention": "slicing"},
    "classic_attention": lambda k: {"attention": "classic"},
    "fused_qkv": lambda k: {"fuse_qkv": True},
    "compile": lambda k: {"compile": True},
    "cfg_cutoff": lambda k: {"cfg_cutoff": k.cfg_cutoff},
    "deepcache": lambda k: {"deepcache_interval": k.deepcache_interval},
    "tome": lambda k: {"tome_ratio": k.tome_ratio},
    "control_end": lambda k: {"control_guidance_end": k.control_guidance_end},
    "tiny_vae": lambda k: {"tiny_vae": True},
    "openvino": lambda k: {"engine": "openvino"},
}


def parse_rung(name: str, knobs: Knobs | None = None, baseline: Config | None = None) -> Config:
    """"baseline", "dpm++ 10" (a scheduler and its steps), an optimisation name, or several joined with " + "."""
    from helpers.core.models import DEFAULT_SCHEDULER, SCHEDULERS

    knobs = knobs or Knobs()
    config = baseline or Config()
    for part in (p.strip() for p in name.split(" + ")):  # " + " with spaces: "dpm++" has pluses of its own
        words = part.split()
        if part == "baseline":
            continue
        if len(words) == 2 and (words[0] in SCHEDULERS or words[0] == DEFAULT_SCHEDULER) and words[1].isdigit():
            config = dataclasses.replace(config, scheduler=words[0], steps=int(words[1]))
        elif part in OPTIMISATIONS:
            config = dataclasses.replace(config, **OPTIMISATIONS[part](knobs))
        else:
            raise ValueError(f"rung {name!r}: {part!r} is neither 'baseline', '<scheduler> <steps>' with a scheduler "
                             f"of {[DEFAULT_SCHEDULER, *sorted(SCHEDULERS)]}, nor an optimisation "
                             f"{sorted(OPTIMISATIONS)}")
    return config


# ---------------------------------------------------------------------------------------------------
# Features: each applies one setting to a pipeline copy and says whether this platform can run it


@dataclass(frozen=True)
class Feature:
    name: str
    wanted: Callable[[Config], bool]
    why_not: Callable[[Config, torch.device], str | None]
    apply: Callable[[object, Config], None]


def _never(config, device) -> None:
    return None


def _missing(module: str, package: str) -> str | None:
    return None if importlib.util.find_spec(module) else f"{package} is not installed (pip install {package})"


def decided_as(device: torch.device | str) -> str:
    """The kind of device ("cuda", "mps", "cpu") a rung on `device` is decided for: on the compute device, the
    accelerator's (the rehearsal's pretended T4 decides as CUDA while the CPU computes); elsewhere, its own."""
    device = torch.device(device)
    return accelerator.accelerator().kind if device.type == accelerator.compute_device().type else device.type


def _half_why_not(config: Config, device: torch.device) -> str | None:
    kind = decided_as(device)
    if config.half not in HALF_DTYPES:
        return f"half={config.half!r} is not one of {sorted(HALF_DTYPES)}"
    if config.half == "fp16" and kind == "cpu":
        return "fp16 on a CPU has no fast kernels (it is slower than fp32 there); the CPU's half is bf16"
    if config.half == "bf16" and kind == "cuda" and not accelerator.bf16_supported():
        return (f"{accelerator.accelerator().name} has no native bf16 (before Ampere, sm_80, it is emulated and slow): "
                "its half is fp16")
    if config.half == "bf16" and kind == "cpu" and config.engine == "torch":
        return slow_bf16_reason()
    return None


@functools.cache
def slow_bf16_reason(min_ratio: float = 0.5) -> str | None:
    """Why bf16 is not worth running on this CPU (measured: its matmul rate against fp32's), or None. CPUs without
    bf16 units (AMX, AVX512-BF16) emulate it, tens of times slower than fp32."""
    fp32, bf16 = matmul_roofline(torch.float32, n=512), matmul_roofline(torch.bfloat16, n=512)
    if bf16 >= min_ratio * fp32:
        return None
    return (f"bf16 matmul runs at {bf16 / 1e9:.1f} GFLOP/s here against fp32's {fp32 / 1e9:.1f}: this CPU has no "
            "bf16 units (AMX or AVX512-BF16) and emulates it")


def _apply_half(pipe, config: Config) -> None:
    if config.engine == "openvino":
        return  # OpenVINO converts from fp32 and takes the precision as a hint (see _apply_openvino)
    for module in _networks(pipe):
        module.to(dtype=HALF_DTYPES[config.half])


def _apply_scheduler(pipe, config: Config) -> None:
    from helpers.core.models import make_scheduler

    pipe.scheduler = make_scheduler(config.scheduler, pipe.scheduler)
    pipe.scheduler.set_timesteps(config.steps)  # DeepCache reads pipe.scheduler.timesteps (denoise uses a copy)


def _apply_channels_last(pipe, config: Config) -> None:
    for module in _networks(pipe, text=False):
        module.to(memory_format=torch.channels_last)


def _apply_attention(pipe, config: Config) -> None:
    from diffusers.models.attention_processor import AttnProcessor

    if config.attention == "slicing":
        for module in _networks(pipe, text=False):
            if hasattr(module, "set_attention_slice"):
                # as helpers.core.models.enable_attention_slicing: "auto" (half the heads) needs two heads or more
                heads = [m.sliceable_head_dim for m in module.modules() if hasattr(m, "sliceable_head_dim")]
                module.set_attention_slice("auto" if heads and min(heads) >= 2 else "max")
    elif config.attention == "classic":
        for module in _networks(pipe, text=False):
            if hasattr(module, "set_attn_processor"):
                module.set_attn_processor(AttnProcessor())
    elif config.attention != "sdpa":
        raise ValueError(f"attention={config.attention!r} must be 'sdpa', 'slicing' or 'classic'")


def _apply_fuse_qkv(pipe, config: Config) -> None:
    for module in (pipe.unet, getattr(pipe, "controlnet", None)):
        if module is not None and hasattr(module, "fuse_qkv_projections"):
            module.fuse_qkv_projections()


def _apply_tome(pipe, config: Config) -> None:
    import tomesd

    tomesd.apply_patch(pipe.unet, ratio=config.tome_ratio, use_rand=False)  # no random draws: same seed, same image


def _apply_deepcache(pipe, config: Config) -> None:
    from DeepCache.extension.deepcache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=config.deepcache_interval, cache_branch_id=0)
    helper.enable()
    _refresh_deepcache_on_batch_change(pipe, helper)
    pipe._deepcache_helper = helper  # keep it alive with the pipeline


def _refresh_deepcache_on_batch_change(pipe, helper) -> None:
    """After a guidance cut-off the UNet batch halves, and DeepCache's cached features (of the old batch) would
    not fit: make the step where the batch changes a full step, and restart the cache phase there."""
    inner = pipe.unet.forward
    last_batch = {}

    def forward(sample, timestep, *args, **kwargs):
        index = list(pipe.scheduler.timesteps).index(timestep.item())
        if index == 0 or last_batch.get("size") != sample.shape[0]:
            helper.start_timestep = index
        last_batch["size"] = sample.shape[0]
        return inner(sample, timestep, *args, **kwargs)

    pipe.unet.forward = forward


def _apply_tiny_vae(pipe, config: Config) -> None:
    from diffusers import AutoencoderTiny

    from helpers.core.models import hub_offline, tiny_vae_source

    source = tiny_vae_source(pipe.vae)
    if source is None:
        raise RungSkipped("no tiny decoder for this VAE here: TAESD (madebyollin/taesd) comes from the hub, which "
                          "is not reachable (the toy's own is built by `python -m helpers.toy.train --stage tiny-vae`)")
    tiny = AutoencoderTiny.from_pretrained(source, dtype=pipe.vae.dtype, local_files_only=hub_offline())
    pipe.vae = tiny.to(pipe.vae.device)


def _compile_why_not(config: Config, device: torch.device) -> str | None:
    if decided_as(device) == "cuda":
        if device.type != "cuda":
            return (f"torch.compile for a GPU (Triton kernels) cannot run on the compute device ({device.type}): "
                    "the rehearsal decides as on a T4 but computes on the CPU")
        return None if importlib.util.find_spec("triton") else "torch.compile on CUDA needs triton, not installed"
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "torch.compile on a CPU needs a C++ compiler (g++ or clang++), and none is on PATH"
    return None


def _apply_compile(pipe, config: Config) -> None:
    compiled = torch.compile(pipe.unet)  # the first call compiles (minutes on a CPU): the warm-up
    if next(pipe.unet.parameters()).device.type == "cpu":
        _freeze_when_compiling(compiled)
    pipe.unet = compiled


def _freeze_when_compiling(compiled: torch.nn.Module) -> None:
    """Inductor's freezing folds the weights in as constants and prepacks them for oneDNN: on a CPU the SD 1.5-shaped
    bf16 UNet step went from 1.53 s (eager) to 1.04 s with it, against 1.39 s compiled without (one AMD EPYC thread).
    Dynamo reads the flag from the global config when it traces, which happens inside the calls (the first, and any
    recompile, e.g. when a guidance cut-off halves the batch): `torch.compile(options={"freezing": True})` alone leaves
    the weights unfrozen, so each call sets it for its own duration."""
    trace = compiled.forward

    def forward(*args, **kwargs):
        with torch._inductor.config.patch(freezing=True):
            return trace(*args, **kwargs)

    compiled.forward = forward


def _openvino_why_not(config: Config, device: torch.device) -> str | None:
    if decided_as(device) != "cpu":
        return "the OpenVINO peer is measured on a CPU (it is the engine a CPU user would pick)"
    clashes = [name for name, on in (("compile", config.compile), ("deepcache", config.deepcache_interval > 1),
                                     ("tome", config.tome_ratio > 0), ("channels_last", config.channels_last),
                                     ("attention " + config.attention, config.attention != "sdpa")) if on]
    if clashes:
        return f"{clashes} patch PyTorch modules; OpenVINO runs its own graph"
    return _missing("openvino", "openvino")


def _apply_openvino(pipe, config: Config) -> None:
    """Every network in OpenVINO (as optimum-intel's OVStableDiffusionPipeline): after the steps are cut, the text
    encoder and the decode are a fifth of the toy's request (the decoder: 2.3 ms in OpenVINO bf16 against 6.6 ms)."""
    from helpers.studies.openvino_engine import OpenVINOControlNet, OpenVINOTextEncoder, OpenVINOUNet, OpenVINOVAE

    precision = "bf16" if config.half == "bf16" else "f32"
    engines = {"unet": OpenVINOUNet, "controlnet": OpenVINOControlNet, "text_encoder": OpenVINOTextEncoder,
               "vae": OpenVINOVAE}
    for name, engine in engines.items():
        if isinstance(getattr(pipe, name, None), torch.nn.Module):
            setattr(pipe, name, engine(getattr(pipe, name), precision))


def _combination_why_not(config: Config, device: torch.device) -> str | None:
    if config.compile and config.deepcache_interval > 1:
        return "DeepCache swaps Python forwards between steps, which torch.compile would trace; not combined"
    if config.fuse_qkv and config.attention != "sdpa":
        # fuse_qkv_projections sets every processor to FusedAttnProcessor2_0, silently undoing the other setting
        return (f"fused QKV runs diffusers' fused SDPA processor, which would replace {config.attention} attention; "
                "not combined")
    return None


FEATURES: tuple[Feature, ...] = (  # in the order they are applied
    Feature("combination", lambda c: False, _combination_why_not, lambda p, c: None),
    Feature("scheduler", lambda c: True, _never, _apply_scheduler),
    Feature("half", lambda c: c.half is not None, _half_why_not, _apply_half),
    Feature("attention", lambda c: c.attention != "sdpa", _never, _apply_attention),
    Feature("fused_qkv", lambda c: c.fuse_qkv, _never, _apply_fuse_qkv),
    Feature("channels_last", lambda c: c.channels_last, _never, _apply_channels_last),
    Feature("tome", lambda c: c.tome_ratio > 0, lambda c, d: _missing("tomesd", "tomesd"), _apply_tome),
    Feature("deepcache", lambda c: c.deepcache_interval > 1, lambda c, d: _missing("DeepCache", "DeepCache"),
            _apply_deepcache),
    Feature("tiny_vae", lambda c: c.tiny_vae, _never, _apply_tiny_vae),  # the source depends on the VAE: apply
    Feature("openvino", lambda c: c.engine == "openvino", _openvino_why_not, _apply_openvino),
    Feature("compile", lambda c: c.compile, _compile_why_not, _apply_compile),
)


def why_not(config: Config, device: torch.device | str) -> str | None:
    """Why this platform cannot run `config` (None when it can)."""
    device = torch.device(device)
    if config.engine not in ("torch", "openvino"):
        return f"engine={config.engine!r} must be 'torch' or 'openvino'"
    reasons = [f.why_not(config, device) for f in FEATURES if f.name == "combination" or f.wanted(config)]
    reasons = [r for r in reasons if r]
    return "; ".join(reasons) if reasons else None


def _networks(pipe, text: bool = True) -> list[torch.nn.Module]:
    names = ("text_encoder", "unet", "controlnet", "vae") if text else ("unet", "controlnet", "vae")
    return [m for m in (getattr(pipe, name, None) for name in names) if isinstance(m, torch.nn.Module)]


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


def owned_bytes(pipe, base) -> int:
    """Bytes of weights `pipe` (a configured copy) holds of its own, beyond those it shares with `base`."""
    def storages(p) -> dict[int, int]:
        tensors = itertools.chain.from_iterable(
            itertools.chain(m.parameters(), m.buffers()) for m in _networks(p))
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}

    shared = storages(base)
    return sum(nbytes for ptr, nbytes in storages(pipe).items() if ptr not in shared)


def release_memory(device: torch.device | str | None = None) -> None:
    """Collect what a finished rung left (DeepCache's helper and its pipeline form a cycle) and hand CUDA's cached
    blocks back, so that the next rung starts from the base's memory."""
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


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


def configure(base_pipe, config: Config):
    """A copy of `base_pipe` set up as `config` says; raises RungSkipped (with the reason) where it cannot run."""
    reason = why_not(config, base_pipe.device)
    if reason:
        raise RungSkipped(reason)
    pipe = copy_pipeline(base_pipe)
    for feature in FEATURES:
        if feature.wanted(config):
            feature.apply(pipe, config)
    return pipe


# ---------------------------------------------------------------------------------------------------
# Timing every part of a generation


@contextmanager
def part_timers(pipe, device: torch.device | str | None = None) -> Iterator[dict[str, list[float]]]:
    """`with part_timers(pipe) as calls: generate(pipe, ...)`: `calls[part]` lists the seconds of each call of
    that part (PARTS), synchronized on a GPU. Hooks and wrappers are removed on exit."""
    device = device or pipe.device
    calls: dict[str, list[float]] = {part: [] for part in PARTS}
    undo: list[Callable[[], None]] = []
    try:
        for part in ("text_encoder", "controlnet", "unet"):
            module = getattr(pipe, part, None)
            if isinstance(module, torch.nn.Module):
                undo += _hook_module(module, calls[part], device)
        undo.append(_wrap_method(pipe.vae, "decode", calls["vae_decode"], device))
        undo.append(_wrap_method(_image_processor(pipe), "postprocess", calls["postprocess"], device))
        if getattr(pipe, "control_image_processor", None) is not None:
            undo.append(_wrap_method(pipe.control_image_processor, "preprocess", calls["preprocess"], device))
        undo.append(_wrap_method(type(pipe.scheduler), "step", calls["scheduler"], device))
        yield calls
    finally:
        for restore in reversed(undo):
            restore()


def _image_processor(pipe):
    from helpers.core.stages import _image_processor

    return _image_processor(pipe)


def _hook_module(module: torch.nn.Module, seconds: list[float], device) -> list[Callable[[], None]]:
    starts: list[float] = []

    def before(mod, args):
        synchronize(device)
        starts.append(time.perf_counter())

    def after(mod, args, output):
        synchronize(device)
        seconds.append(time.perf_counter() - starts.pop())

    handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    return [handle.remove for handle in handles]


def _timed_call(fn: Callable, seconds: list[float], device) -> Callable:
    def call(*args, **kwargs):
        synchronize(device)
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        return result

    return call


def _wrap_method(owner, name: str, seconds: list[float], device) -> Callable[[], None]:
    """Time `owner.name(...)` by shadowing it on `owner`: an instance, or a class (denoise steps a deep copy of
    the pipeline's scheduler, so its `step` is timed on the class). Undo puts back what `owner` itself held."""
    had_own = name in vars(owner)
    original = vars(owner)[name] if had_own else getattr(owner, name)
    setattr(owner, name, _timed_call(original, seconds, device))

    def restore():
        if had_own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)

    return restore


# ---------------------------------------------------------------------------------------------------
# Running a rung: end-to-end latency, per-part times, and the images for its quality


@dataclass
class Inputs:
    """What every rung generates: prompts, seeds, control images (ControlNet) and the size."""

    prompts: list[str]
    seeds: list[int]
    control_images: list | None = None
    depth_maps: list | None = None  # for control adherence on the toy
    height: int | None = None
    width: int | None = None
    guidance_scale: float = 7.5

    def subset(self, n: int) -> Inputs:
        return dataclasses.replace(self, prompts=self.prompts[:n], seeds=self.seeds[:n],
                                   control_images=None if self.control_images is None else self.control_images[:n],
                                   depth_maps=None if self.depth_maps is None else self.depth_maps[:n])


# SD 1.5 draws the toy's depth maps (shapes standing on a floor) as real things: the prompt names what fits each.
SD15_OBJECTS = {"circle": "ball", "square": "wooden crate", "triangle": "pyramid-shaped paper lantern",
                "diamond": "kite"}
SD15_PLACES = {"left": "on the left", "center": "in the middle", "right": "on the right"}


def sd15_prompts(scenes) -> list[str]:
    """A real prompt per toy scene (`helpers.toy.sample_scenes`), for SD 1.5 with the scene's depth map: its objects'
    colours and places, as photographed things instead of flat shapes ("a red circle" is a toy-world prompt)."""
    prompts = []
    for scene in scenes.scenes:
        things = " and ".join(f"a {o.size} {o.colour} {SD15_OBJECTS[o.shape]} {SD15_PLACES[o.position]}"
                              for o in scene.objects)
        prompts.append(f"a photo of {things} in a room with {scene.background} walls, soft daylight, detailed")
    return prompts


@dataclass
class RungResult:
    name: str
    config: Config
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
                "quality": self.quality}


def generate_config(pipe, config: Config, inputs: Inputs, output_type: str = "pil"):
    """One `helpers.core.stages.generate` call with the config's arguments (the one way this project generates)."""
    from helpers.core.stages import generate

    control = {} if inputs.control_images is None else {"image": list(inputs.control_images)}
    return generate(pipe, inputs.prompts, seeds=inputs.seeds, guidance_scale=inputs.guidance_scale,
                    height=inputs.height, width=inputs.width, output_type=output_type, progress=False,
                    **config.generate_kwargs(), **control)


def time_request(pipe, config: Config, request: Inputs) -> tuple[float, dict, dict, dict]:
    """One timed request: (end-to-end seconds, seconds per part, generate's stage timings, calls per part)."""
    device = pipe.device
    with part_timers(pipe, device) as calls:
        synchronize(device)
        start = time.perf_counter()
        generation = generate_config(pipe, config, request)
        synchronize(device)
        total = time.perf_counter() - start
    parts = {part: sum(seconds) for part, seconds in calls.items()}
    parts["other"] = max(total - sum(parts.values()), 0.0)  # the loop's own glue: latents, guidance arithmetic
    return total, parts, generation.timings, {part: len(seconds) for part, seconds in calls.items()}


def run_rung(base_pipe, name: str, config: Config, inputs: Inputs, *, request_size: int = 1, repeats: int = 3,
             min_time_s: float = 0.0, warmup: int = 1, quality_batch: int = 8) -> RungResult:
    """Configure a copy, warm it up, time requests of `request_size` images (at least `repeats`, and until
    `min_time_s` is spent: a 0.1 s rung gets many; median kept), then generate every prompt of `inputs` for its
    quality. A platform that cannot run it, or memory that cannot hold it, gives status "skipped" with the reason;
    the copy is freed either way."""
    result = RungResult(name, config, "ok")
    pipe = None
    try:
        start = time.perf_counter()
        pipe = configure(base_pipe, config)
        result.setup_s = time.perf_counter() - start
        request = inputs.subset(request_size)
        for _ in range(warmup):  # compiling / converting happens here: a failure means the platform cannot
            start = time.perf_counter()
            generate_config(pipe, config, request)
            result.first_call_s = time.perf_counter() - start
        timed = []
        with torch.inference_mode():
            while more_runs([t[0] for t in timed], repeats, min_time_s):
                timed.append(time_request(pipe, config, request))
        result.latency_s = [t[0] for t in timed]
        result.parts_s = {part: statistics.median(t[1][part] for t in timed) for part in timed[0][1]}
        result.stages_s = {stage: statistics.median(t[2][stage] for t in timed) for stage in timed[0][2]}
        result.calls = timed[0][3]
        result.images = quality_images(pipe, config, inputs, quality_batch)
    except Exception as error:  # noqa: BLE001 - whatever this platform cannot do is recorded, never a crash
        return RungResult(name, config, "skipped", _reason(error), setup_s=result.setup_s)
    finally:
        pipe = None
        release_memory(base_pipe.device)
    return result


def out_of_memory(error: BaseException) -> bool:
    """A refusal before allocating (helpers.core.limits' MemoryError) or an allocation that failed (CUDA's OOM)."""
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(error).lower()


def _in_turn(runs: dict[str, Callable[[], float]], rounds: int, warmup: bool = True) -> dict[str, list[float]]:
    """Each run once untimed (OpenVINO converts, compile compiles; skipped with `warmup=False` when the caller warmed
    them), then `rounds` rounds of each in turn (A, B, C, A, B, C, ...), so that each sees the same moments of a
    machine whose speed drifts. A run returns its own seconds."""
    for run in runs.values() if warmup else ():
        run()
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, run in runs.items():
                times[name].append(run())
    return times


def interleaved_times(base_pipe, configs: dict[str, Config], request: Inputs, rounds: int,
                      skipped: dict[str, str] | None = None) -> dict[str, list[float]]:
    """Seconds of one request of each config, timed in turn (`_in_turn`): what a ratio of two latencies on a busy
    machine needs. The copies are configured and warmed up one at a time, each sharing the base's weights; one that
    runs out of memory beside the others is freed and left out (its reason in `skipped`), except the first config
    (the reference), whose failure is raised."""
    device = base_pipe.device

    def request_timer(pipe, config: Config) -> Callable[[], float]:
        def run() -> float:
            seconds: dict[str, float] = {}
            with timed(seconds, "request", device):
                generate_config(pipe, config, request)
            return seconds["request"]
        return run

    runs = {}
    for name, config in configs.items():
        try:
            runs[name] = request_timer(configure(base_pipe, config), config)
            runs[name]()  # the warm-up: compile compiles, and memory that cannot hold this copy tells now
        except Exception as error:
            if not runs or not out_of_memory(error):
                raise
            runs.pop(name, None)
            release_memory(device)
            if skipped is not None:
                skipped[name] = _reason(error)
    return _in_turn(runs, rounds, warmup=False)


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    return first if isinstance(error, RungSkipped) else f"{type(error).__name__}: {first[:300]}"


def quality_images(pipe, config: Config, inputs: Inputs, batch_size: int) -> list:
    """Every prompt of `inputs`, generated in batches (one generator per seed: a batch equals single calls). A batch
    that does not fit raises RungSkipped naming QUALITY_BATCH."""
    images = []
    for start in range(0, len(inputs.prompts), batch_size):
        chunk = dataclasses.replace(
            inputs, prompts=inputs.prompts[start:start + batch_size], seeds=inputs.seeds[start:start + batch_size],
            control_images=None if inputs.control_images is None else inputs.control_images[start:start + batch_size])
        try:
            images += generate_config(pipe, config, chunk).images
        except Exception as error:
            if not out_of_memory(error):
                raise
            raise RungSkipped(f"out of memory generating the quality images {len(chunk.prompts)} at a time (lower "
                              f"QUALITY_BATCH): {_reason(error)}") from error
    return images


@dataclass
class Ladder:
    """The rungs of one run, side by side with the baseline: `ladder.run("dpm++ 10 + deepcache")` times a rung,
    scores its images against the prompt, the control map and the baseline's image of the same seed."""

    pipe: object
    inputs: Inputs
    baseline: Config
    knobs: Knobs
    on_toy: bool
    request_size: int = 1
    repeats: int = 3
    min_time_s: float = 0.0
    quality_batch: int = 8
    results: dict[str, RungResult] = field(default_factory=dict)

    def run(self, name: str) -> RungResult:
        if name in self.results:
            return self.results[name]
        if "baseline" not in self.results and name != "baseline":
            self.run("baseline")
        config = parse_rung(name, self.knobs, self.baseline)
        result = run_rung(self.pipe, name, config, self.inputs, request_size=self.request_size,
                          repeats=self.repeats, min_time_s=self.min_time_s, quality_batch=self.quality_batch)
        if name == "baseline" and result.status != "ok":
            raise RuntimeError(f"the baseline could not run ({result.reason}), and every rung is priced against it: "
                               "lower what it needs (QUALITY_BATCH, REQUEST_SIZE, the image size) or free memory")
        if result.status == "ok":
            reference = self.results["baseline"].images if name != "baseline" else result.images
            result.quality = quality(result.images, self.inputs, reference, self.on_toy)
        self.results[name] = result
        return result

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
                                  self.inputs.subset(self.request_size), rounds, skipped)
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
# Quality: against the prompt, the control map, and the baseline image of the same seed


def image_similarity(images: Sequence, references: Sequence) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of each image against its reference (same seed), with scikit-image."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if len(images) != len(references):
        raise ValueError(f"{len(images)} images but {len(references)} reference images: give one per image")
    psnrs, ssims = [], []
    for image, reference in zip(images, references):
        a, b = _uint8(image), _uint8(reference)
        if a.shape != b.shape:
            raise ValueError(f"an image of shape {a.shape} cannot be compared with a reference of shape {b.shape}")
        psnrs.append(peak_signal_noise_ratio(b, a, data_range=255) if not np.array_equal(a, b) else float("inf"))
        ssims.append(structural_similarity(b, a, channel_axis=-1, data_range=255))
    finite = [p for p in psnrs if np.isfinite(p)]
    return {"psnr_db": float(np.mean(finite)) if len(finite) == len(psnrs) else float("inf"),
            "ssim": float(np.mean(ssims))}


def _uint8(image) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.dtype != np.uint8:
        raise ValueError(f"images must be PIL or uint8 arrays (got {array.dtype}): scale [0, 1] floats by 255")
    return array


def quality(images: Sequence, inputs: Inputs, baseline_images: Sequence | None, on_toy: bool) -> dict:
    """Prompt and control adherence (toy oracle) and PSNR/SSIM against the baseline images of the same seeds."""
    scores: dict[str, float] = {}
    if on_toy:
        from helpers.toy import control_adherence, prompt_adherence

        scores["prompt_adherence"] = prompt_adherence(images, inputs.prompts)
        if inputs.depth_maps is not None:
            scores["control_adherence"] = control_adherence(images, inputs.depth_maps)
    if baseline_images is not None:
        scores.update(image_similarity(images, baseline_images))
    return scores


# ---------------------------------------------------------------------------------------------------
# The trade-off: Pareto front and a recommendation


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names whose (latency, quality) no other point beats on both (lower latency, higher quality), fastest first."""
    front = []
    for name, (latency, score) in points.items():
        dominated = any(other_latency <= latency and other_score >= score
                        and (other_latency, other_score) != (latency, score)
                        for other, (other_latency, other_score) in points.items() if other != name)
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n][0])


def within_bars(rows: list[dict], baseline: str, *, quality_key: str, max_loss: float,
                second_key: str | None = None, max_second_loss: float | None = None) -> list[dict]:
    """The rungs that ran whose `quality_key` is at most `max_loss` below the baseline's (and `second_key` at most
    `max_second_loss` below, when given), fastest first; empty if the baseline has no score."""
    by_name = {row["rung"]: row for row in rows if row.get("status") == "ok"}
    base = by_name.get(baseline)
    if base is None or base.get(quality_key) is None:
        return []

    def acceptable(row) -> bool:
        if row.get(quality_key) is None or base[quality_key] - row[quality_key] > max_loss + 1e-9:
            return False
        if second_key and max_second_loss is not None and base.get(second_key) is not None:
            return base[second_key] - row.get(second_key, -np.inf) <= max_second_loss + 1e-9
        return True

    return sorted((row for row in by_name.values() if acceptable(row)), key=lambda row: row["latency s"])


def recommend(rows: list[dict], baseline: str, *, quality_key: str, max_loss: float,
              second_key: str | None = None, max_second_loss: float | None = None) -> dict | None:
    """The fastest rung `within_bars`, with its speed-up and quality cost; None if the baseline has no score."""
    fastest = within_bars(rows, baseline, quality_key=quality_key, max_loss=max_loss, second_key=second_key,
                          max_second_loss=max_second_loss)
    if not fastest:
        return None
    best, base = fastest[0], next(row for row in rows if row["rung"] == baseline)
    return {"rung": best["rung"], "latency_s": best["latency s"], "baseline_latency_s": base["latency s"],
            "speedup": base["latency s"] / best["latency s"], quality_key: best[quality_key],
            f"{quality_key}_loss": base[quality_key] - best[quality_key],
            **({f"{second_key}_loss": base[second_key] - best[second_key]}
               if second_key and base.get(second_key) is not None and best.get(second_key) is not None else {})}


# ---------------------------------------------------------------------------------------------------
# Bottlenecks: loading, operators, FLOPs and the roofline


def time_loads(load: Callable[[], object], device=None) -> tuple[object, dict[str, float]]:
    """Call `load` twice: the first ("cold": first load in this process; the OS may still cache the files) and the
    second ("warm") are timed. Returns the second result and both times. The first is let go before the second
    loads (two copies of SD 1.5 and a ControlNet at once would double the memory)."""
    times = {}
    loaded = None
    for kind in ("cold", "warm"):
        loaded = None
        release_memory(device)
        synchronize(device)
        start = time.perf_counter()
        loaded = load()
        synchronize(device)
        times[f"load_{kind}_s"] = time.perf_counter() - start
    return loaded, times


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call of `fn` (torch.utils.flop_counter: matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_roofline(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", n: int = 2048,
                    repeats: int = 5) -> float:
    """The rate (FLOP/s) of an n×n @ n×n matmul in `dtype` on `device` through torch, median of repeats. n=2048:
    smaller products stay below the peak on a CPU (bf16 on one EPYC thread: 152 GFLOP/s at n=1024, 258 at 2048).
    fp16 on a CPU (the rehearsal's pretended T4) has no fast kernels (~1 GFLOP/s): n=256 measures it in a moment."""
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        n = min(n, 256)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / measure("matmul", lambda: torch.matmul(a, b), repeats=repeats, device=device).median


OPENVINO_PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16"}


def rooflines(device: torch.device | str = "cpu", dtypes=None, n: int = 2048) -> tuple[dict, dict]:
    """The ceiling per dtype that a network's dense layers can reach here, with these threads: the faster of torch's
    matmul and, on a CPU with OpenVINO installed, OpenVINO's (oneDNN's kernels beat torch's fp32 matmul on some
    CPUs). `dtypes`: fp32 and the accelerator's fast half (fp16 on CUDA, where the baseline runs; bf16 on a CPU).
    Returns ({dtype: FLOP/s}, {dtype: {engine: FLOP/s}}), the second to record where each came from."""
    fast_half = torch.float16 if decided_as(device) == "cuda" else torch.bfloat16
    sources = {}
    for dtype in dtypes or (torch.float32, fast_half):
        sources[dtype] = {"torch": matmul_roofline(dtype, device, n)}
        if decided_as(device) == "cpu" and importlib.util.find_spec("openvino") and dtype in OPENVINO_PRECISIONS:
            from helpers.studies.openvino_engine import matmul_rate

            sources[dtype]["openvino"] = matmul_rate(OPENVINO_PRECISIONS[dtype])
    return {dtype: max(rates.values()) for dtype, rates in sources.items()}, sources


def profile_top_ops(fn: Callable[[], object], k: int = 8, device: torch.device | str = "cpu") -> list[dict]:
    """torch.profiler's top `k` operators of one call of `fn` by self time, with their share of the total."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        fn()
        synchronize(device)
    on_gpu = torch.device(device).type == "cuda"
    events = [e for e in prof.key_averages() if e.key != "ProfilerStep*"]
    self_us = [(e.key, (e.self_device_time_total if on_gpu else e.self_cpu_time_total), e.count) for e in events]
    total = sum(us for _, us, _ in self_us) or 1.0
    top = sorted(self_us, key=lambda item: -item[1])[:k]
    return [{"op": key, "self ms": us / 1e3, "share": us / total, "calls": count} for key, us, count in top]


def unet_step_inputs(unet, batch_size: int, latent_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (sample, encoder_hidden_states) for one UNet step: (batch, in_channels, size, size) latents and
    (batch, 77, cross_attention_dim) text embeddings, in the UNet's dtype."""
    generator = torch.Generator("cpu").manual_seed(0)
    sample = torch.randn(batch_size, unet.config.in_channels, latent_size, latent_size, generator=generator)
    encoder_hidden_states = torch.randn(batch_size, 77, unet.config.cross_attention_dim, generator=generator)
    dtype = getattr(unet, "dtype", torch.float32)
    return sample.to(unet.device, dtype), encoder_hidden_states.to(unet.device, dtype)


def time_unet_steps(holder: UNetOnly, config: Config, batch_size: int, latent_size: int, *, repeats: int = 3,
                    warmup: int = 1) -> dict:
    """Median seconds per UNet step of a configured `holder`. A timed call runs `deepcache_interval` consecutive
    steps (one full, the rest cached), so cached rungs report their average step."""
    sample, encoder_hidden_states = unet_step_inputs(holder.unet, batch_size, latent_size)
    holder.scheduler.set_timesteps(max(config.steps, config.deepcache_interval))
    timesteps = holder.scheduler.timesteps[:config.deepcache_interval]
    device = holder.unet.device

    def cycle():
        for t in timesteps:
            holder.unet(sample, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)

    seconds = []
    with torch.inference_mode():
        for _ in range(warmup + repeats):
            synchronize(device)
            start = time.perf_counter()
            cycle()
            synchronize(device)
            seconds.append((time.perf_counter() - start) / len(timesteps))
    return {"first_call_s": seconds[0] if warmup else None, "step_s": statistics.median(seconds[warmup:]),
            "repeats": repeats}


def interleaved_step_times(base: UNetOnly, configs: dict[str, Config], batch_size: int, latent_size: int,
                           rounds: int) -> dict[str, list[float]]:
    """Seconds per UNet step of each config, timed in turn (`_in_turn`, as `interleaved_times` does for whole
    requests): the torch-against-OpenVINO ratio on a machine that drifts."""
    def step_timer(holder: UNetOnly, config: Config) -> Callable[[], float]:
        return lambda: time_unet_steps(holder, config, batch_size, latent_size, repeats=1, warmup=0)["step_s"]

    return _in_turn({name: step_timer(configure(base, config), config) for name, config in configs.items()}, rounds)


# ---------------------------------------------------------------------------------------------------
# Per-stage bottlenecks of a configured pipeline: the stages' own calls, replayed


STAGE_MODULES = {"text_encoder": "text_encoder", "controlnet": "controlnet", "unet": "unet", "vae_decode": "vae"}


def capture_stage_calls(pipe, config: Config, request: Inputs) -> dict[str, Callable[[], object]]:
    """Run one request and keep each network's first call (its real arguments), to replay it alone:
    {"text_encoder": fn, "controlnet": fn, "unet": fn, "vae_decode": fn} (parts the pipeline has)."""
    captured: dict[str, Callable[[], object]] = {}
    handles = []
    for part in ("text_encoder", "controlnet", "unet"):
        module = getattr(pipe, part, None)
        if isinstance(module, torch.nn.Module):
            def keep(mod, args, kwargs, part=part):
                captured.setdefault(part, lambda: mod(*args, **kwargs))
            handles.append(module.register_forward_pre_hook(keep, with_kwargs=True))
    decode = pipe.vae.decode

    def keep_decode(*args, **kwargs):
        captured.setdefault("vae_decode", lambda: decode(*args, **kwargs))
        return decode(*args, **kwargs)

    pipe.vae.decode = keep_decode
    try:
        generate_config(pipe, config, request)
    finally:
        del pipe.vae.decode
        for handle in handles:
            handle.remove()
    return captured


def stage_bottlenecks(pipe, config: Config, request: Inputs, result: RungResult, rooflines: dict,
                      top_k: int = 5) -> list[dict]:
    """Per stage: FLOPs of one call, seconds per call (from `result`, the same config's timed run), achieved rate
    against the matmul roofline of the stage's dtype (`rooflines[dtype]`), and torch.profiler's top operators."""
    rows = []
    for part, fn in capture_stage_calls(pipe, config, request).items():
        calls = result.calls.get(part, 0)
        if not calls:
            continue
        flops = count_flops(fn)
        seconds = result.parts_s[part] / calls
        dtype = getattr(pipe, STAGE_MODULES[part]).dtype
        rate = flops / seconds
        rows.append({"stage": part, "calls": calls, "GFLOP per call": flops / 1e9, "s per call": seconds,
                     "share of request": result.parts_s[part] / result.median_s, "GFLOP/s": rate / 1e9,
                     "roofline share": rate / rooflines[dtype] if dtype in rooflines else None,
                     "dtype": str(dtype).removeprefix("torch."),
                     "top ops": profile_top_ops(fn, top_k, pipe.device)})
    return rows
