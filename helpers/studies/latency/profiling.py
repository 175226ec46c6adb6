"""Where the time goes: timers on every part of a generation, FLOPs, torch.profiler's top operators, and the matmul
roofline a network's rate is set against."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from helpers.core.measure import measure, synchronize, timed
from helpers.studies.latency.rungs import decided_as
from helpers.studies.openvino_engine import matmul_rate

PARTS = ("preprocess", "text_encoder", "controlnet", "unet", "scheduler", "vae_decode", "postprocess")


# ---------------------------------------------------------------------------------------------------
# Timing every part of a generation, without touching the loop


@contextmanager
def part_timers(pipe, device: torch.device | str | None = None) -> Iterator[dict[str, list[float]]]:
    """`with part_timers(pipe) as calls: generate(pipe, ...)`: `calls[part]` lists the seconds of each call of
    that part (PARTS), synchronized on a GPU. Forward hooks on the text encoder, ControlNet and UNet; wrappers
    around `scheduler.step`, `vae.decode` and the image processors. Hooks and wrappers are removed on exit."""
    device = device or pipe.device
    calls: dict[str, list[float]] = {part: [] for part in PARTS}
    undo: list[Callable[[], None]] = []
    try:
        for part in ("text_encoder", "controlnet", "unet"):
            module = getattr(pipe, part, None)
            if isinstance(module, torch.nn.Module):
                undo += _hook_module(module, calls[part], device)
        undo.append(_wrap_method(pipe.vae, "decode", calls["vae_decode"], device))
        undo.append(_wrap_method(pipe.image_processor, "postprocess", calls["postprocess"], device))
        if getattr(pipe, "control_image_processor", None) is not None:
            undo.append(_wrap_method(pipe.control_image_processor, "preprocess", calls["preprocess"], device))
        undo.append(_wrap_method(type(pipe.scheduler), "step", calls["scheduler"], device))
        yield calls
    finally:
        for restore in reversed(undo):
            restore()


def _hook_module(module: torch.nn.Module, seconds: list[float], device) -> list[Callable[[], None]]:
    """A pre-hook enters `timed` and the forward hook leaves it (a stack: a module may call itself)."""
    timers: list[tuple] = []

    def before(mod, args):
        timings: dict[str, float] = {}
        timer = timed(timings, "call", device)
        timer.__enter__()
        timers.append((timer, timings))

    def after(mod, args, output):
        timer, timings = timers.pop()
        timer.__exit__(None, None, None)
        seconds.append(timings["call"])

    handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    return [handle.remove for handle in handles]


def _timed_call(fn: Callable, seconds: list[float], device) -> Callable:
    def call(*args, **kwargs):
        timings: dict[str, float] = {}
        with timed(timings, "call", device):
            result = fn(*args, **kwargs)
        seconds.append(timings["call"])
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
# Operators, FLOPs and the roofline


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call of `fn` (torch.utils.flop_counter: matmuls, convolutions, attention)."""
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
            sources[dtype]["openvino"] = matmul_rate(OPENVINO_PRECISIONS[dtype])
    return {dtype: max(rates.values()) for dtype, rates in sources.items()}, sources


def profile_top_ops(fn: Callable[[], object], k: int = 8, device: torch.device | str = "cpu") -> list[dict]:
    """torch.profiler's top `k` operators of one call of `fn` by self time, with their share of the total."""
    on_gpu = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        fn()
        synchronize(device)
    events = [e for e in prof.key_averages() if e.key != "ProfilerStep*"]
    self_us = [(e.key, (e.self_device_time_total if on_gpu else e.self_cpu_time_total), e.count) for e in events]
    total = sum(us for _, us, _ in self_us) or 1.0
    top = sorted(self_us, key=lambda item: -item[1])[:k]
    return [{"op": key, "self ms": us / 1e3, "share": us / total, "calls": count} for key, us, count in top]
