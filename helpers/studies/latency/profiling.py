"""Where the time goes: timers on every part of a generation, FLOPs, torch.profiler's top operators, and the
roofline (the faster of a large matmul and a large convolution) a network's rate is set against."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from helpers.core.measure import measure, synchronize, timed
from helpers.studies.latency.rungs import decided_as
from helpers.studies.openvino_engine import layer_rate

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


# SD 1.5's 640-channel 3×3 convolution at batch 2 (CFG) on a 512² picture's 32² level: a UNet step is about half
# convolutions, and oneDNN runs them faster than a 2048² matmul on some CPUs (OpenVINO's bf16 UNet step reached 118%
# of the matmul roofline on an AMD EPYC)
CONV_SHAPE = (2, 640, 32, 32)
OPENVINO_PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16"}


class _MatMul(torch.nn.Module):
    def forward(self, a, b):
        return a @ b


def _conv_and_input(dtype: torch.dtype, device, shape=CONV_SHAPE) -> tuple[torch.nn.Conv2d, torch.Tensor, float]:
    """A 3×3 convolution at `shape` in channels_last (oneDNN's layout), its input and its FLOPs."""
    batch, channels, height, width = shape
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(device, dtype).to(memory_format=torch.channels_last)
    x = torch.randn(shape, device=device).to(dtype).to(memory_format=torch.channels_last)
    return conv, x, 2 * batch * height * width * channels * channels * 9


def conv_roofline(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", shape=CONV_SHAPE,
                  repeats: int = 5) -> float:
    """The rate (FLOP/s) of a 3×3 convolution at `shape` (CONV_SHAPE) in `dtype` on `device` through torch (oneDNN
    on a CPU, cuDNN on a GPU), median of repeats; fp16 on a CPU (no fast kernels) at a small shape."""
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        shape = (1, 64, 16, 16)
    conv, x, flops = _conv_and_input(dtype, device, shape)
    with torch.inference_mode():
        return flops / measure("conv", lambda: conv(x), repeats=repeats, device=device).median


def rooflines(device: torch.device | str = "cpu", dtypes=None, n: int = 2048, int8: bool = False,
              conv_shape=CONV_SHAPE) -> tuple[dict, dict]:
    """The ceiling per dtype that a network's dense layers can reach here, with these threads: the fastest of a large
    matmul and a large convolution (CONV_SHAPE), through torch and, on a CPU with OpenVINO installed, OpenVINO
    (oneDNN's kernels beat torch's fp32 matmul on some CPUs). `dtypes`: fp32 and the accelerator's fast half (fp16 on
    CUDA, where the baseline runs; bf16 on a CPU). `int8`: also torch.int8, OpenVINO's matmul and convolution
    quantized by NNCF. Returns ({dtype: FLOP/s}, {dtype: {"engine layer": FLOP/s}}), the second to record where each
    came from."""
    on_cpu_with_openvino = decided_as(device) == "cpu" and importlib.util.find_spec("openvino")
    fast_half = torch.float16 if decided_as(device) == "cuda" else torch.bfloat16
    sources = {}
    for dtype in dtypes or (torch.float32, fast_half):
        sources[dtype] = {"torch matmul": matmul_roofline(dtype, device, n),
                          "torch conv": conv_roofline(dtype, device, conv_shape)}
        if on_cpu_with_openvino and dtype in OPENVINO_PRECISIONS:
            sources[dtype] |= _openvino_rates(n, conv_shape, OPENVINO_PRECISIONS[dtype])
    if int8 and on_cpu_with_openvino and importlib.util.find_spec("nncf"):
        sources[torch.int8] = _openvino_rates(n, conv_shape, "f32", int8=True)
    return {dtype: max(rates.values()) for dtype, rates in sources.items()}, sources


def _openvino_rates(n: int, conv_shape, precision: str, int8: bool = False) -> dict[str, float]:
    a, b = torch.randn(n, n), torch.randn(n, n)
    conv, x, conv_flops = _conv_and_input(torch.float32, "cpu", conv_shape)
    matmul = (torch.nn.Linear(n, n, bias=False), (a,)) if int8 else (_MatMul(), (a, b))  # int8: a weight to quantize
    return {"openvino matmul": layer_rate(*matmul, 2 * n**3, precision, int8),
            "openvino conv": layer_rate(conv, (x.contiguous(),), conv_flops, precision, int8)}


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
