"""What a rung is: a `RungConfig` (how one generation runs), read from the ladder's names ("dpm++ 6 + cfg_cutoff +
openvino + bf16", "lcm 2 + openvino + bf16 + tiny_vae"), and the `Inputs` every rung generates."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.schedulers import AysSchedules

from helpers.core import accelerator
from helpers.core.models import DEFAULT_SCHEDULER, SCHEDULERS

HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LCM = "lcm"  # "lcm 4": the LCM-LoRA and LCMScheduler at 4 steps
# An LCM samples at guidance 1: the teacher's guidance (7.5) was distilled into the LoRA, so the unconditional half of
# each step (CFG's second UNet pass) would only pull away from it; diffusers' docs sample LCM-LoRA at 1.0 (1-2 at most)
LCM_GUIDANCE_SCALE = 1.0
# "ays 10": Align Your Steps (Sabour et al. 2024), the 10 timesteps NVIDIA optimised for SD 1.5, as diffusers ships
# them, run by DPM-Solver++ (the sampler they were optimised for). They are defined for 10 steps only.
AYS = "ays"
AYS_TIMESTEPS = tuple(AysSchedules["StableDiffusionTimesteps"])
AYS_SCHEDULER = "dpm++"


def half_name(dtype: torch.dtype) -> str | None:
    """`RungConfig.half` of a pipeline loaded in `dtype`: "fp16", "bf16", or None for fp32."""
    return {v: k for k, v in HALF_DTYPES.items()}.get(dtype)


class RungSkipped(Exception):
    """A rung this platform cannot run; the message says why (it is recorded, never a crash)."""


@dataclass(frozen=True)
class RungConfig:
    """How one rung generates: its scheduler and steps, and which speed-ups it applies at what strength. The
    defaults are the fp32 baseline with every speed-up off; `STRENGTHS` holds the strengths the ladder's names turn on
    (the notebook's CFG_CUTOFF, DEEPCACHE_INTERVAL, TOME_RATIO, CONTROL_GUIDANCE_END)."""

    scheduler: str = "default"  # a name of helpers.core.models.SCHEDULERS, or the pipeline's own
    steps: int = 50
    timesteps: tuple[int, ...] | None = None  # a schedule of its own (Align Your Steps'); `steps` is its length
    lcm: bool = False  # the LCM-LoRA with LCMScheduler at `steps` steps, guidance LCM_GUIDANCE_SCALE
    half: str | None = None  # "bf16" or "fp16" weights and activations; None: fp32
    channels_last: bool = False
    attention: str = "sdpa"  # "sdpa" (torch's fused attention, diffusers' default), "slicing" or "classic"
    fuse_qkv: bool = False
    compile: bool = False
    cfg_cutoff: float | None = None  # guidance for the first share of the steps only
    deepcache_interval: int = 1  # N > 1: the full UNet every N steps, cached deep features in between
    tgate_gate: float | None = None  # T-GATE: cross-attention (and guidance) for the first share of the steps only
    tome_ratio: float = 0.0  # share of tokens merged by tomesd in the highest-resolution attention
    control_guidance_end: float = 1.0  # ControlNet acts on the first share of the steps
    tiny_vae: bool = False
    engine: str = "torch"  # "torch" or "openvino"
    # int8 weights and activations in the UNet and ControlNet: with openvino, NNCF's static quantization of the graph;
    # in torch, torchao's dynamic quantization of their linear layers (fast under compile)
    int8: bool = False

    def generate_kwargs(self) -> dict:
        """What `helpers.core.stages.generate` needs from this config (the rest is applied to the pipeline)."""
        kwargs = {"num_inference_steps": self.steps, "control_guidance_end": self.control_guidance_end}
        if self.timesteps is not None:
            kwargs["timesteps"] = list(self.timesteps)
        if self.lcm:
            kwargs["guidance_scale"] = LCM_GUIDANCE_SCALE  # the guidance is in the weights
        if self.cfg_cutoff is not None:
            kwargs["cfg_cutoff"] = self.cfg_cutoff
        if self.tgate_gate is not None:  # guidance ends where T-GATE caches the cross-attention, as its pipeline does
            kwargs["cfg_cutoff"] = self.tgate_gate
        return kwargs

    def tgate_gate_step(self) -> int:
        """T-GATE's gate_step: the first step that reuses the cached cross-attention, the first one after the last
        guided step of `generate(..., cfg_cutoff=tgate_gate)` (guided while i <= int(steps * cfg_cutoff))."""
        return int(self.steps * self.tgate_gate) + 1

    def changes(self) -> dict:
        """The settings that differ from the fp32 baseline's defaults."""
        default = RungConfig()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}


# T-GATE's gate at 0.4: its default, gate_step 10 of 25 steps
STRENGTHS = RungConfig(cfg_cutoff=0.5, deepcache_interval=3, tome_ratio=0.5, control_guidance_end=0.5, tgate_gate=0.4)

OPTIMISATIONS: dict[str, Callable[[RungConfig], dict]] = {  # a name: the changes it makes, given the strengths
    "bf16": lambda s: {"half": "bf16"},
    "fp16": lambda s: {"half": "fp16"},
    "half": lambda s: {"half": half_name(accelerator.fast_half_dtype())},  # fp16 on CUDA, bf16 on a CPU
    "channels_last": lambda s: {"channels_last": True},
    "attention_slicing": lambda s: {"attention": "slicing"},
    "classic_attention": lambda s: {"attention": "classic"},
    "fused_qkv": lambda s: {"fuse_qkv": True},
    "compile": lambda s: {"compile": True},
    "cfg_cutoff": lambda s: {"cfg_cutoff": s.cfg_cutoff},
    "deepcache": lambda s: {"deepcache_interval": s.deepcache_interval},
    "tgate": lambda s: {"tgate_gate": s.tgate_gate},
    "tome": lambda s: {"tome_ratio": s.tome_ratio},
    "control_end": lambda s: {"control_guidance_end": s.control_guidance_end},
    "tiny_vae": lambda s: {"tiny_vae": True},
    "openvino": lambda s: {"engine": "openvino"},
    "int8": lambda s: {"int8": True},
}


# Speed-ups that change how the same arithmetic runs (memory layout, fused kernels, the attention kernel, the compiler,
# another engine at the same precision), not what is computed: a rung made of them and a rung already priced differs
# from that rung's pictures by rounding only, which an equality check on a few images shows (`Ladder.equality_images`).
SAME_ARITHMETIC = ("channels_last", "attention", "fuse_qkv", "compile", "engine")


def same_arithmetic_reference(config: RungConfig) -> RungConfig | None:
    """`config` without its SAME_ARITHMETIC speed-ups: the rung that computes the same numbers the plain way; None
    when `config` has none of them. An int8 rung keeps its engine: each engine quantizes its own way."""
    default = RungConfig()
    names = [name for name in SAME_ARITHMETIC if not (config.int8 and name == "engine")]
    reference = dataclasses.replace(config, **{name: getattr(default, name) for name in names})
    return None if reference == config else reference


def parse_rung(name: str, strengths: RungConfig = STRENGTHS, baseline: RungConfig | None = None) -> RungConfig:
    """"baseline", "dpm++ 10" (a scheduler and its steps), "ays 10" (Align Your Steps' schedule with DPM-Solver++),
    "lcm 4" (the LCM-LoRA at 4 steps), an optimisation name,
    or several joined with " + ", applied to `baseline`; a name with a strength (cfg_cutoff, deepcache, tgate, tome,
    control_end) takes it from `strengths`. "lcm N" replaces the baseline's scheduler; named beside another scheduler
    it keeps both, and `why_not` refuses the pair."""
    config = baseline or RungConfig()
    named_scheduler = False
    for part in (p.strip() for p in name.split(" + ")):  # " + " with spaces: "dpm++" has pluses of its own
        words = part.split()
        if part == "baseline":
            continue
        if len(words) == 2 and (words[0] in SCHEDULERS or words[0] == DEFAULT_SCHEDULER) and words[1].isdigit():
            config = dataclasses.replace(config, scheduler=words[0], steps=int(words[1]))
            named_scheduler = True
        elif len(words) == 2 and words[0] == AYS:
            if words[1] != str(len(AYS_TIMESTEPS)):
                raise ValueError(f"rung {name!r}: Align Your Steps' SD 1.5 schedule has {len(AYS_TIMESTEPS)} steps "
                                 f"(diffusers' AysSchedules): write '{AYS} {len(AYS_TIMESTEPS)}'")
            config = dataclasses.replace(config, scheduler=AYS_SCHEDULER, steps=len(AYS_TIMESTEPS),
                                         timesteps=AYS_TIMESTEPS)
            named_scheduler = True
        elif len(words) == 2 and words[0] == LCM and words[1].isdigit():
            config = dataclasses.replace(config, lcm=True, steps=int(words[1]),
                                         scheduler=config.scheduler if named_scheduler else DEFAULT_SCHEDULER)
        elif part in OPTIMISATIONS:
            config = dataclasses.replace(config, **OPTIMISATIONS[part](strengths))
        else:
            raise ValueError(f"rung {name!r}: {part!r} is neither 'baseline', '<scheduler> <steps>' with a scheduler "
                             f"of {[DEFAULT_SCHEDULER, *sorted(SCHEDULERS)]}, '{AYS} 10', '{LCM} <steps>', nor an "
                             f"optimisation {sorted(OPTIMISATIONS)}")
    return config


def decided_as(device: torch.device | str) -> str:
    """The kind of device ("cuda", "mps", "cpu") a rung on `device` is decided for: on the compute device, the
    accelerator's (the rehearsal's pretended T4 decides as CUDA while the CPU computes); elsewhere, its own."""
    device = torch.device(device)
    return accelerator.accelerator().kind if device.type == accelerator.compute_device().type else device.type


# ---------------------------------------------------------------------------------------------------
# What every rung generates


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
        return self.slice(0, n)

    def slice(self, start: int, stop: int) -> Inputs:
        return dataclasses.replace(
            self, prompts=self.prompts[start:stop], seeds=self.seeds[start:stop],
            control_images=None if self.control_images is None else self.control_images[start:stop],
            depth_maps=None if self.depth_maps is None else self.depth_maps[start:stop])


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
