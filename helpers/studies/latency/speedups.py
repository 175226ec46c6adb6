"""How each speed-up is applied: one function per speed-up, each taking a pipeline (a rung's copy) and changing one
thing in it, in diffusers' terms. `speedups(config)` lists the calls a `RungConfig` makes, in order; `why_not(config,
device)` says why this platform cannot run it (fp16 on a CPU, no compiler, a package missing), or None.

    pipe = latency.copy_pipeline(base)             # shares the base's weights
    latency.use_scheduler(pipe, "dpm++", 6)        # "dpm++ 6"
    latency.use_lcm(pipe, 2)                       # "lcm 2" (instead of a scheduler; generate at guidance 1)
    latency.use_openvino(pipe, precision="bf16")   # "openvino + bf16"
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderTiny, LCMScheduler
from diffusers.models.attention_processor import AttnProcessor

from helpers.core import accelerator
from helpers.core.models import (
    DEFAULT_SCHEDULER,
    hub_offline,
    in_hub_cache,
    lcm_lora_source,
    make_scheduler,
    tiny_vae_source,
)
from helpers.studies.latency.profiling import matmul_roofline
from helpers.studies.latency.rungs import HALF_DTYPES, LCM_GUIDANCE_SCALE, RungConfig, RungSkipped, decided_as
from helpers.studies.openvino_engine import OpenVINOControlNet, OpenVINOTextEncoder, OpenVINOUNet, OpenVINOVAE


def networks(pipe, text: bool = True) -> list[torch.nn.Module]:
    """The pipeline's networks (text encoder, UNet, ControlNet, VAE) that it has; `text=False` leaves out the text
    encoder (no convolutions, no diffusers attention)."""
    names = ("text_encoder", "unet", "controlnet", "vae") if text else ("unet", "controlnet", "vae")
    return [m for m in (getattr(pipe, name, None) for name in names) if isinstance(m, torch.nn.Module)]


# ---------------------------------------------------------------------------------------------------
# The speed-ups, in the order a rung applies them


def use_scheduler(pipe, name: str, steps: int) -> None:
    """Another scheduler from the pipeline's config ("dpm++", "euler", ...; "default": its own), set to `steps`."""
    pipe.scheduler = make_scheduler(name, pipe.scheduler)
    pipe.scheduler.set_timesteps(steps)  # DeepCache reads pipe.scheduler.timesteps (denoise uses a copy)


LCM_ADAPTER = "lcm"
LCM_LORA_FILE = "pytorch_lora_weights.safetensors"  # the name LCM-LoRA ships under, which load_lora_weights reads


def use_lcm_lora(pipe, source: str | Path | None = None):
    """Load an LCM-LoRA into `pipe` (`pipe.load_lora_weights`, as LCM-LoRA ships; adapter "lcm") and swap in
    `LCMScheduler` on the model's own noise schedule (the toy's zero-SNR v-prediction schedule carries over:
    LCMScheduler implements both; its timesteps come from the distillation grid, original_inference_steps=50, and
    start at t=999 whatever the model's timestep_spacing). `source`: a folder or hub id; default the model's own
    (`helpers.core.models.lcm_lora_source`: the toy's shipped folder, or `latent-consistency/lcm-lora-sdv1-5` for SD
    1.5). Returns the pipeline, changed in place; sample it at guidance_scale 1 (`LCM_GUIDANCE_SCALE`)."""
    source = lcm_lora_source(pipe.unet) if source is None else source
    if isinstance(source, Path) or Path(source).is_dir():
        if not (Path(source) / LCM_LORA_FILE).exists():
            raise FileNotFoundError(f"no LCM-LoRA in {source}: restore helpers/toy/weights/lcm-lora/ from git or "
                                    "rebuild it with `python -m helpers.toy.train --stage lcm`")
    elif hub_offline() and not in_hub_cache(str(source), LCM_LORA_FILE):
        raise RungSkipped(f"the LCM-LoRA {source} comes from the hub, and HF_HUB_OFFLINE=1 with no copy in the hub "
                          "cache (HF_HUB_CACHE)")
    # the file named: offline (HF_HUB_OFFLINE=1, a Kaggle dataset of a cache, the rehearsal) diffusers cannot guess it
    pipe.load_lora_weights(str(source), weight_name=LCM_LORA_FILE, adapter_name=LCM_ADAPTER)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return pipe


def use_lcm(pipe, steps: int) -> None:
    """A latent consistency model in `steps` steps (1-4): the LCM-LoRA (`use_lcm_lora`) fused into the copy's
    weights, then LCMScheduler set to `steps`. Sampled at guidance 1 (`generate(..., guidance_scale=1.0)`, which the
    rung passes): one UNet pass a step instead of CFG's two. Fused (`safe_fusing`: new tensors, so the base's shared
    weights stay as they were) and the LoRA layers removed, the UNet is a plain one again: no extra matmuls per step,
    and OpenVINO, `torch.compile`, DeepCache and the casts see the layers they know."""
    use_lcm_lora(pipe)
    pipe.fuse_lora(adapter_names=[LCM_ADAPTER], safe_fusing=True)
    pipe.unload_lora_weights()
    pipe.scheduler.set_timesteps(steps)  # DeepCache reads pipe.scheduler.timesteps (denoise uses a copy)


def use_half(pipe, dtype: torch.dtype) -> None:
    """Half-precision weights and activations (diffusers' `pipe.to(dtype)`): fp16 on a GPU, bf16 on a CPU."""
    for module in networks(pipe):
        module.to(dtype=dtype)


def use_attention_slicing(pipe) -> None:
    """Attention computed a slice of heads at a time (diffusers' `enable_attention_slicing`): less memory."""
    for module in networks(pipe, text=False):
        if hasattr(module, "set_attention_slice"):
            # as helpers.core.models.enable_attention_slicing: "auto" (half the heads) needs two heads or more
            heads = [m.sliceable_head_dim for m in module.modules() if hasattr(m, "sliceable_head_dim")]
            module.set_attention_slice("auto" if heads and min(heads) >= 2 else "max")


def use_classic_attention(pipe) -> None:
    """Attention as three plain matmuls and a softmax (`AttnProcessor`), instead of torch's fused SDPA."""
    for module in networks(pipe, text=False):
        if hasattr(module, "set_attn_processor"):
            module.set_attn_processor(AttnProcessor())


def fuse_qkv(pipe) -> None:
    """Query, key and value projections as one matmul (diffusers' `fuse_qkv_projections`)."""
    for module in (pipe.unet, getattr(pipe, "controlnet", None)):
        if module is not None and hasattr(module, "fuse_qkv_projections"):
            module.fuse_qkv_projections()


def use_channels_last(pipe) -> None:
    """Convolution weights laid out as NHWC (`torch.channels_last`), the layout oneDNN and tensor cores prefer."""
    for module in networks(pipe, text=False):
        module.to(memory_format=torch.channels_last)


def use_tome(pipe, ratio: float) -> None:
    """Token merging (tomesd): `ratio` of the tokens merged in the highest-resolution attention."""
    import tomesd  # optional: why_not says when it is missing

    tomesd.apply_patch(pipe.unet, ratio=ratio, use_rand=False)  # no random draws: same seed, same image


def use_deepcache(pipe, interval: int) -> None:
    """DeepCache: the full UNet every `interval` steps, its deep features cached and reused in between."""
    from DeepCache.extension.deepcache import DeepCacheSDHelper  # optional: why_not says when it is missing

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    _refresh_deepcache_on_batch_change(pipe, helper)
    pipe._deepcache_helper = helper  # keep it alive with the pipeline


def use_tgate(pipe, gate_step: int) -> None:
    """T-GATE (Liu et al. 2024, the `tgate` package's hooks): the UNet's cross-attention runs until `gate_step`, where
    its output (the mean of the unconditional and prompt halves) is cached and reused for every later step, which
    then runs without guidance (`RungConfig.generate_kwargs` ends it there); before the gate the self-attention is
    computed every `sp_interval` steps and reused in between, after it every step (the package's defaults). The
    step counter restarts when the timestep rises: a new request."""
    from tgate.tgate_utils import register_forward, tgate_scheduler  # optional: why_not says when it is missing

    unet, inner = pipe.unet, pipe.unet.forward
    state = {"step": -1, "timestep": None}

    def forward(sample, timestep, *args, **kwargs):
        t = float(timestep)
        state["step"] = 0 if state["timestep"] is None or t > state["timestep"] else state["step"] + 1
        state["timestep"] = t
        ca_kward, sa_kward, keep_shape = tgate_scheduler(cur_step=state["step"], gate_step=gate_step)
        register_forward(unet, "Attention", ca_kward=ca_kward, sa_kward=sa_kward, keep_shape=keep_shape)
        return inner(sample, timestep, *args, **kwargs)

    pipe.unet.forward = forward


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


def use_tiny_decoder(pipe) -> None:
    """A tiny decoder (`AutoencoderTiny`) in place of the VAE: TAESD for SD 1.5, the project's own for the toy."""
    source = tiny_vae_source(pipe.vae)
    if source is None:
        raise RungSkipped("no tiny decoder for this VAE here: TAESD (madebyollin/taesd) comes from the hub, which "
                          "is not reachable (the toy's own is built by `python -m helpers.toy.train --stage tiny-vae`)")
    tiny = AutoencoderTiny.from_pretrained(source, dtype=pipe.vae.dtype, local_files_only=hub_offline())
    pipe.vae = tiny.to(pipe.vae.device)


def use_openvino(pipe, precision: str = "f32", int8: bool = False) -> None:
    """Every network in OpenVINO (as optimum-intel's OVStableDiffusionPipeline), converted from fp32 with
    `precision` ("f32" or "bf16") as a hint: after the steps are cut, the text encoder and the decode are a fifth of
    the toy's request (the decoder: 2.3 ms in OpenVINO bf16 against 6.6 ms). `int8`: the UNet and the ControlNet
    quantized by NNCF (`nncf.quantize`, weights and activations), calibrated on the first request's calls: run one,
    then `finish_calibration(pipe)`."""
    engines = {"unet": OpenVINOUNet, "controlnet": OpenVINOControlNet, "text_encoder": OpenVINOTextEncoder,
               "vae": OpenVINOVAE}
    for name, engine in engines.items():
        if isinstance(getattr(pipe, name, None), torch.nn.Module):
            quantized = int8 and name in ("unet", "controlnet")  # the decode and the text encoder stay in precision
            setattr(pipe, name, engine(getattr(pipe, name), precision, int8=quantized))


def finish_calibration(pipe) -> None:
    """Quantize the int8 OpenVINO networks of `pipe` on what the requests so far gave them (`use_openvino`)."""
    for name in ("unet", "controlnet"):
        network = getattr(pipe, name, None)
        if hasattr(network, "finish_calibration"):
            network.finish_calibration()


def quantize_int8(pipe) -> None:
    """torchao's int8 dynamic quantization (`quantize_` with `Int8DynamicActivationInt8WeightConfig`) of every linear
    layer in the UNet and the ControlNet: int8 weights (a scale per output channel) and activations quantized per
    token as they come. Convolutions keep their precision (torchao quantizes linear layers). Eager, the quantize
    steps cost about what the int8 matmuls save; under `torch.compile` Inductor fuses them into int8 GEMMs."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_  # optional: see why_not

    for name in ("unet", "controlnet"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            quantize_(module, Int8DynamicActivationInt8WeightConfig())


def compile_unet(pipe) -> None:
    """`torch.compile` the UNet (the first call compiles: minutes on a CPU, the warm-up); on a CPU with Inductor's
    freezing, which folds and prepacks the weights."""
    compiled = torch.compile(pipe.unet)
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


def speedups(config: RungConfig) -> list[tuple[Callable, dict]]:
    """The calls that set a pipeline copy up as `config` says, in order: [(function, keyword arguments)]. The guidance
    cut-off and the ControlNet window are no change to the pipeline: they are `generate`'s arguments."""
    calls: list[tuple[Callable, dict]] = [  # the LoRA is fused first, into the fp32 weights a cast then halves
        (use_lcm, {"steps": config.steps}) if config.lcm else
        (use_scheduler, {"name": config.scheduler, "steps": config.steps})]
    if config.half is not None and config.engine == "torch":  # OpenVINO converts from fp32, the half as its hint
        calls.append((use_half, {"dtype": HALF_DTYPES[config.half]}))
    if config.attention == "slicing":
        calls.append((use_attention_slicing, {}))
    elif config.attention == "classic":
        calls.append((use_classic_attention, {}))
    elif config.attention != "sdpa":
        raise ValueError(f"attention={config.attention!r} must be 'sdpa', 'slicing' or 'classic'")
    if config.fuse_qkv:
        calls.append((fuse_qkv, {}))
    if config.channels_last:
        calls.append((use_channels_last, {}))
    if config.tome_ratio > 0:
        calls.append((use_tome, {"ratio": config.tome_ratio}))
    if config.deepcache_interval > 1:
        calls.append((use_deepcache, {"interval": config.deepcache_interval}))
    if config.tgate_gate is not None:
        calls.append((use_tgate, {"gate_step": config.tgate_gate_step()}))
    if config.tiny_vae:
        calls.append((use_tiny_decoder, {}))
    if config.engine == "openvino":
        calls.append((use_openvino, {"precision": "bf16" if config.half == "bf16" else "f32", "int8": config.int8}))
    if config.int8 and config.engine == "torch":
        calls.append((quantize_int8, {}))
    if config.compile:
        calls.append((compile_unet, {}))
    return calls


def apply_speedups(pipe, config: RungConfig) -> None:
    """Make every call of `speedups(config)` on `pipe` (a copy: `copy_pipeline`)."""
    for function, kwargs in speedups(config):
        function(pipe, **kwargs)


def recipe(config: RungConfig) -> str:
    """`speedups(config)` as the code a reader would write: one call per line, then generate's own arguments."""
    lines = ["pipe = latency.copy_pipeline(base)"]
    for function, kwargs in speedups(config):
        lines.append(f"latency.{function.__name__}(pipe{''.join(f', {k}={v!r}' for k, v in kwargs.items())})")
    arguments = ", ".join(f"{k}={v!r}" for k, v in config.generate_kwargs().items())
    return "\n".join([*lines, f"generate(pipe, prompts, seeds=seeds, {arguments})"])


# ---------------------------------------------------------------------------------------------------
# What this platform can run


def why_not(config: RungConfig, device: torch.device | str) -> str | None:
    """Why this platform cannot run `config` (None when it can): every reason, joined."""
    device = torch.device(device)
    if config.engine not in ("torch", "openvino"):
        return f"engine={config.engine!r} must be 'torch' or 'openvino'"
    reasons = [_combination_why_not(config)]
    if config.half is not None:
        reasons.append(_half_why_not(config, device))
    if config.tome_ratio > 0:
        reasons.append(_missing("tomesd", "tomesd"))
    if config.deepcache_interval > 1:
        reasons.append(_missing("DeepCache", "DeepCache"))
    if config.tgate_gate is not None:
        reasons.append(_tgate_why_not(config) or _missing("tgate", "tgate"))
    if config.engine == "openvino":
        reasons.append(_openvino_why_not(config, device))
    if config.int8:
        reasons.append(_int8_why_not(config, device))
    if config.compile:
        reasons.append(_compile_why_not(device))
    reasons = [r for r in reasons if r]
    return "; ".join(reasons) if reasons else None


def _missing(module: str, package: str) -> str | None:
    return None if importlib.util.find_spec(module) else f"{package} is not installed (pip install {package})"


def _combination_why_not(config: RungConfig) -> str | None:
    if config.lcm:
        reason = _lcm_why_not(config)
        if reason:
            return reason
    if config.deepcache_interval > 1 and config.steps < 2:
        return "DeepCache reuses a step's deep features in the next steps: a 1-step rung has no next step"
    if config.control_guidance_end < 1 and int(config.steps * config.control_guidance_end) == 0:
        return (f"control_end {config.control_guidance_end} of {config.steps} step(s) leaves the ControlNet no step "
                "to act on")
    if config.compile and config.deepcache_interval > 1:
        return "DeepCache swaps Python forwards between steps, which torch.compile would trace; not combined"
    if config.fuse_qkv and config.attention != "sdpa":
        # fuse_qkv_projections sets every processor to FusedAttnProcessor2_0, silently undoing the other setting
        return (f"fused QKV runs diffusers' fused SDPA processor, which would replace {config.attention} attention; "
                "not combined")
    return None


def _lcm_why_not(config: RungConfig) -> str | None:
    if config.scheduler != DEFAULT_SCHEDULER:
        return (f"LCM samples with LCMScheduler, on the timesteps it was distilled for; the {config.scheduler!r} "
                "scheduler would replace it: not combined (the step count is the lcm rung's)")
    if config.cfg_cutoff is not None:
        return (f"LCM samples at guidance {LCM_GUIDANCE_SCALE} (the guidance is distilled into the LoRA): there is "
                "no classifier-free guidance to cut off")
    if config.steps < 1:
        return f"lcm {config.steps}: an LCM takes 1 step or more"
    return None


def _tgate_why_not(config: RungConfig) -> str | None:
    if not 0.0 <= config.tgate_gate < 1.0:
        return f"tgate's gate {config.tgate_gate} must be in [0, 1): the share of steps with cross-attention"
    if config.lcm:
        return ("T-GATE caches the mean of the guided batch's two halves; an LCM samples without guidance, so there "
                "are no halves to average: not combined")
    if config.cfg_cutoff is not None:
        return "T-GATE ends the guidance at its own gate: not combined with cfg_cutoff"
    clashes = [name for name, on in (("deepcache", config.deepcache_interval > 1), ("tome", config.tome_ratio > 0),
                                     ("attention " + config.attention, config.attention != "sdpa"),
                                     ("compile", config.compile), ("openvino", config.engine == "openvino")) if on]
    if clashes:
        return (f"T-GATE replaces the forward of every attention layer with its own (SDPA, caches kept in Python), "
                f"which {clashes} would skip, undo or trace: not combined")
    return None


def _int8_why_not(config: RungConfig, device: torch.device) -> str | None:
    if config.engine == "openvino":
        return _missing("nncf", "nncf")
    if decided_as(device) != "cpu":
        return ("int8 is a CPU's rung here (torchao's dynamic int8, or NNCF's with openvino): a GPU's half is fp16, "
                "and int8 matmuls on a T4 need kernels this ladder does not measure")
    return _missing("torchao", "torchao")


def _half_why_not(config: RungConfig, device: torch.device) -> str | None:
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


def _openvino_why_not(config: RungConfig, device: torch.device) -> str | None:
    if decided_as(device) != "cpu":
        return "the OpenVINO peer is measured on a CPU (it is the engine a CPU user would pick)"
    clashes = [name for name, on in (("compile", config.compile), ("deepcache", config.deepcache_interval > 1),
                                     ("tome", config.tome_ratio > 0), ("channels_last", config.channels_last),
                                     ("attention " + config.attention, config.attention != "sdpa")) if on]
    if clashes:
        return f"{clashes} patch PyTorch modules; OpenVINO runs its own graph"
    return _missing("openvino", "openvino")


def _compile_why_not(device: torch.device) -> str | None:
    if decided_as(device) == "cuda":
        if device.type != "cuda":
            return (f"torch.compile for a GPU (Triton kernels) cannot run on the compute device ({device.type}): "
                    "the rehearsal decides as on a T4 but computes on the CPU")
        return None if importlib.util.find_spec("triton") else "torch.compile on CUDA needs triton, not installed"
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "torch.compile on a CPU needs a C++ compiler (g++ or clang++), and none is on PATH"
    return None
