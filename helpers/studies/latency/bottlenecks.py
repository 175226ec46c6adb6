"""Bottlenecks: each stage of a configured pipeline replayed alone (its FLOPs, its rate against the roofline, its top
operators), and one UNet step timed alone (what `python -m helpers bench latency` ladders on SD 1.5's shapes)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from helpers.core.measure import in_turn, measure
from helpers.studies.latency.ladder import RungResult, UNetOnly, configure, generate_config
from helpers.studies.latency.profiling import count_flops, profile_top_ops
from helpers.studies.latency.rungs import Inputs, RungConfig
from helpers.studies.latency.speedups import finish_calibration

STAGE_MODULES = {"text_encoder": "text_encoder", "controlnet": "controlnet", "unet": "unet", "vae_decode": "vae"}


def capture_stage_calls(pipe, config: RungConfig, request: Inputs) -> dict[str, Callable[[], object]]:
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


def stage_bottlenecks(pipe, config: RungConfig, request: Inputs, result: RungResult, rooflines: dict,
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


# ---------------------------------------------------------------------------------------------------
# One UNet step alone


def unet_step_inputs(unet, batch_size: int, latent_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (sample, encoder_hidden_states) for one UNet step: (batch, in_channels, size, size) latents and
    (batch, 77, cross_attention_dim) text embeddings, in the UNet's dtype."""
    generator = torch.Generator("cpu").manual_seed(0)
    sample = torch.randn(batch_size, unet.config.in_channels, latent_size, latent_size, generator=generator)
    encoder_hidden_states = torch.randn(batch_size, 77, unet.config.cross_attention_dim, generator=generator)
    dtype = getattr(unet, "dtype", torch.float32)
    return sample.to(unet.device, dtype), encoder_hidden_states.to(unet.device, dtype)


CALIBRATION_STEPS = 4  # an NNCF int8 step is calibrated on this many UNet calls at the schedule's first timesteps


def configure_for_steps(base: UNetOnly, config: RungConfig, batch_size: int, latent_size: int) -> UNetOnly:
    """`configure(base, config)`, ready to time one UNet step: an NNCF int8 rung is calibrated on CALIBRATION_STEPS
    calls at the schedule's first timesteps (PyTorch answers them) and quantized, as the ladder's warm-up request
    does for whole pictures; until then its steps would be PyTorch's."""
    holder = configure(base, config)
    if config.int8 and config.engine == "openvino":
        sample, encoder_hidden_states = unet_step_inputs(holder.unet, batch_size, latent_size)
        holder.scheduler.set_timesteps(max(config.steps, CALIBRATION_STEPS))
        for t in holder.scheduler.timesteps[:CALIBRATION_STEPS]:
            holder.unet(sample, t, encoder_hidden_states=encoder_hidden_states)
        finish_calibration(holder)
    return holder


def time_unet_steps(holder: UNetOnly, config: RungConfig, batch_size: int, latent_size: int, *, repeats: int = 3,
                    warmup: int = 1) -> dict:
    """Median seconds per UNet step of a configured `holder`. A timed call runs `deepcache_interval` consecutive
    steps (one full, the rest cached), so cached rungs report their average step."""
    sample, encoder_hidden_states = unet_step_inputs(holder.unet, batch_size, latent_size)
    holder.scheduler.set_timesteps(max(config.steps, config.deepcache_interval))
    timesteps = holder.scheduler.timesteps[:config.deepcache_interval]

    def cycle():
        for t in timesteps:
            holder.unet(sample, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)

    # the warm-up is timed too (its first call is where compile compiles): measured as repeats, split off below
    calls = measure("unet steps", cycle, repeats=warmup + repeats, warmup=0, device=holder.unet.device)
    seconds = [s / len(timesteps) for s in calls.seconds]
    return {"first_call_s": seconds[0] if warmup else None, "step_s": statistics.median(seconds[warmup:]),
            "repeats": repeats}


def interleaved_step_times(base: UNetOnly, configs: dict[str, RungConfig], batch_size: int, latent_size: int,
                           rounds: int) -> dict[str, list[float]]:
    """Seconds per UNet step of each config, timed `in_turn` (as `interleaved_times` does for whole requests): the
    torch-against-OpenVINO ratio on a machine that drifts."""
    def step_timer(holder: UNetOnly, config: RungConfig) -> Callable[[], float]:
        return lambda: time_unet_steps(holder, config, batch_size, latent_size, repeats=1, warmup=0)["step_s"]

    return in_turn({name: step_timer(configure_for_steps(base, config, batch_size, latent_size), config)
                    for name, config in configs.items()}, rounds)
