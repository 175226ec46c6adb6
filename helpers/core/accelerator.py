"""Which accelerator is this, and what may we decide from it? The one place that asks.

Every decision a notebook takes from the device (the model `"auto"` picks, the dtype, the settings, the latency
rungs, the memory checks) asks `accelerator()` here, never `torch.cuda` directly. That is what lets
`python -m helpers rehearse` run the series as a Colab/Kaggle user would meet it: with `SD_PRETEND_ACCELERATOR=t4`
the answers are a T4's (CUDA, fp16, no native bf16, 15 GiB) while the arithmetic runs on this CPU
(`compute_device()`), and `SD_MEMORY_BUDGET_GIB` caps the memory every check may count on.

Kaggle's P100 (sm_60) is a trap: current CUDA wheels ship no kernels for it, yet `torch.cuda.is_available()` says
True and the first kernel fails. `accelerator()` notices (the arch list of the installed torch) and
`check_usable()` says which accelerator to pick instead.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache

import psutil
import torch

PRETEND_ENV = "SD_PRETEND_ACCELERATOR"  # "t4": decide as on a T4 (the rehearsal sets it)
MEMORY_BUDGET_ENV = "SD_MEMORY_BUDGET_GIB"  # cap on the device memory every check counts on (the rehearsal: 15)
REHEARSAL_ENV = "SD_REHEARSAL"  # JSON from the rehearsal: {"shrink": {"NN": {knob: value}}, "size": px, ...}
GIB = 2**30

# What the rehearsal pretends to be. A T4 has 16 GB (15.1 GiB usable); published SD 1.5 rate ~7.6 it/s at 512² fp16.
PRETEND_SPECS = {
    "t4": {"name": "Tesla T4 (pretended: the arithmetic runs on this CPU)", "memory_gib": 15.0,
           "capability": (7, 5), "sd15_it_per_s": 7.6},
}
T4_SD15_IT_PER_S = PRETEND_SPECS["t4"]["sd15_it_per_s"]  # one UNet step of batch 2 (CFG) at 64×64 latents


def rehearsal() -> dict:
    """The rehearsal's instructions to this process ({} outside `python -m helpers rehearse`)."""
    value = os.environ.get(REHEARSAL_ENV)
    return json.loads(value) if value else {}


class UnsupportedGPUError(RuntimeError):
    """A GPU that torch sees but has no kernels for (Kaggle's P100 with current CUDA wheels)."""


@dataclass(frozen=True)
class Accelerator:
    name: str
    kind: str  # "cuda", "mps" or "cpu": what decisions are taken as
    memory_bytes: int  # total device memory (capped by SD_MEMORY_BUDGET_GIB); the machine's RAM on a CPU
    capability: tuple[int, int] | None = None  # CUDA compute capability
    supported: bool = True  # False: torch has no kernels for this GPU
    pretended: bool = False  # True under the rehearsal: decide as on `name`, compute on the CPU

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda" and self.supported

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB

    def describe(self) -> str:
        if self.kind == "cpu":
            return f"CPU ({self.memory_gib:.0f} GiB RAM)"
        capability = f", sm_{self.capability[0]}{self.capability[1]}" if self.capability else ""
        return f"{self.name} ({self.memory_gib:.1f} GiB{capability})"


def memory_budget_bytes() -> int | None:
    value = os.environ.get(MEMORY_BUDGET_ENV)
    if not value:
        return None
    try:
        gib = float(value)
    except ValueError:
        raise ValueError(f"{MEMORY_BUDGET_ENV}={value!r} must be a number of GiB, e.g. 15") from None
    if gib <= 0:
        raise ValueError(f"{MEMORY_BUDGET_ENV}={value!r} must be positive")
    return int(gib * GIB)


def _capped(total: int) -> int:
    budget = memory_budget_bytes()
    return min(total, budget) if budget else total


@lru_cache(maxsize=1)
def accelerator() -> Accelerator:
    """The accelerator decisions are taken for (cached: call `accelerator.cache_clear()` after changing the env)."""
    pretend = os.environ.get(PRETEND_ENV, "").strip().lower()
    if pretend:
        if pretend not in PRETEND_SPECS:
            raise ValueError(f"{PRETEND_ENV}={pretend!r} is unknown; choose one of {sorted(PRETEND_SPECS)}")
        spec = PRETEND_SPECS[pretend]
        return Accelerator(spec["name"], "cuda", _capped(int(spec["memory_gib"] * GIB)), spec["capability"],
                           pretended=True)
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        capability = (properties.major, properties.minor)
        return Accelerator(properties.name, "cuda", _capped(properties.total_memory), capability,
                           supported=_has_kernels_for(capability))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return Accelerator("Apple MPS", "mps", _capped(psutil.virtual_memory().total))
    return Accelerator("CPU", "cpu", _capped(psutil.virtual_memory().total))


def _has_kernels_for(capability: tuple[int, int]) -> bool:
    """Whether the installed torch ships kernels (SASS, or PTX it can compile) for this compute capability."""
    arch_list = torch.cuda.get_arch_list()
    if not arch_list:
        return True  # unknown: let the first kernel tell
    major, minor = capability
    sm = major * 10 + minor
    built = [int(a.split("_")[1]) for a in arch_list if a.startswith(("sm_", "compute_")) and a.split("_")[1].isdigit()]
    # sm_XY kernels run on the same major with minor ≥ Y; PTX (compute_XY) is compiled for any newer GPU
    return any(b // 10 == major and b <= sm for b in built) or any(
        a.startswith("compute_") and int(a.split("_")[1]) <= sm for a in arch_list if a.split("_")[1].isdigit())


def check_usable() -> Accelerator:
    """The accelerator, or a clear error for a GPU torch has no kernels for (say which accelerator to pick)."""
    acc = accelerator()
    if acc.kind == "cuda" and not acc.supported:
        major, minor = acc.capability
        raise UnsupportedGPUError(
            f"This GPU ({acc.name}, sm_{major}{minor}) has no kernels in the installed torch {torch.__version__} "
            f"(it was built for {', '.join(torch.cuda.get_arch_list())}): the first computation would fail. "
            "On Kaggle pick Settings > Accelerator > 'GPU T4 x2' instead of 'GPU P100'; on Colab pick the T4."
        )
    return acc


def on_gpu() -> bool:
    """Decide as on a (usable) CUDA GPU: a real one, or the rehearsal's pretended T4."""
    return check_usable().is_gpu


def compute_device() -> torch.device:
    """Where tensors live: CUDA on a usable GPU, MPS on a Mac, else the CPU (the rehearsal computes on the CPU)."""
    acc = check_usable()
    if acc.pretended:
        return torch.device("cpu")
    return torch.device(acc.kind)


def default_dtype() -> torch.dtype:
    """fp16 on a CUDA GPU (half the memory, tensor cores), fp32 elsewhere (fp16 is slow or inexact on a CPU)."""
    return torch.float16 if on_gpu() else torch.float32


def bf16_supported() -> bool:
    """Native bf16: on CUDA only from Ampere (sm_80) on. `torch.cuda.is_bf16_supported()` answers True on a T4,
    where bf16 is emulated (slow): ask without emulation. On a CPU torch always runs bf16."""
    acc = accelerator()
    if acc.kind != "cuda":
        return True
    if acc.pretended:
        return acc.capability >= (8, 0)
    return torch.cuda.is_bf16_supported(including_emulation=False)


def fast_half_dtype() -> torch.dtype:
    """The half precision this accelerator runs fast: fp16 on CUDA, bf16 on a CPU."""
    return torch.float16 if on_gpu() else torch.bfloat16


# ---------------------------------------------------------------------------------------------------
# Memory

_RSS_AT_IMPORT = psutil.Process().memory_info().rss


def free_memory_bytes(device: torch.device | str | None = None) -> int:
    """Memory a new allocation may use on `device` (default: the compute device), within the budget.

    CUDA: `mem_get_info` counts PyTorch's own cached blocks as used, so after a `del` a size that fits would be
    refused: free for us = free + (reserved - allocated). The rehearsal (a pretended GPU computing on the CPU):
    the budget less what this process has grown by since it started (its resident set, an upper bound of what the
    GPU would hold). A CPU: the machine's available RAM."""
    device = torch.device(device) if device is not None else compute_device()
    budget = memory_budget_bytes()
    acc = accelerator()
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if budget:  # under a budget (e.g. playing a T4 on a bigger GPU) count only our own allocations
            free = min(free, budget - torch.cuda.memory_allocated(device))
        return max(0, free)
    available = psutil.virtual_memory().available
    if acc.pretended:
        used = max(0, psutil.Process().memory_info().rss - _RSS_AT_IMPORT)
        return max(0, min(available, acc.memory_bytes - used))
    return max(0, min(available, budget) if budget else available)


# ---------------------------------------------------------------------------------------------------
# The rehearsal's stand-in for fp16 kernels

_FP16_STAND_INS: dict[str, object] = {}


def compute_fp16_in_fp32_on_cpu() -> None:
    """Under the rehearsal (a pretended GPU computing on the CPU): fp16 convolutions and linear layers on the CPU
    compute in fp32 and round the result to fp16, as a GPU's fp16 kernels accumulate in fp32. The CPU's own fp16
    convolution is ~100x slower than fp32 without avx512_fp16 (5.2 s against 54 ms for a 640-channel 3×3 conv at
    16×16, one thread), which would make the SD 1.5-shaped rehearsal take hours. Tensors stay fp16 everywhere else,
    so every dtype a notebook sees is the T4's. Idempotent."""
    import torch.nn.functional as F

    if _FP16_STAND_INS:
        return
    for name in ("conv2d", "linear"):
        original = getattr(F, name)
        _FP16_STAND_INS[name] = original

        def in_fp32(input, weight, bias=None, *args, _original=original, **kwargs):
            if input.dtype == torch.float16 and input.device.type == "cpu":
                bias = None if bias is None else bias.float()
                return _original(input.float(), weight.float(), bias, *args, **kwargs).half()
            return _original(input, weight, bias, *args, **kwargs)

        setattr(F, name, in_fp32)


def restore_fp16_kernels() -> None:
    """Undo `compute_fp16_in_fp32_on_cpu` (the tests do)."""
    import torch.nn.functional as F

    for name, original in _FP16_STAND_INS.items():
        setattr(F, name, original)
    _FP16_STAND_INS.clear()
