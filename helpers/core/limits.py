"""Will it fit, and will it finish? Sizes are refused before anything is allocated when they cannot.

An image far too large (say width=100000) would otherwise be accepted, and the process killed for memory or left
running for hours: a notebook kernel dies, a server too. Two checks:
- `check_size_is_sane`: at most `MAX_PIXEL_FACTOR` times the pixels the UNet was trained on (8× per side for a
  square; SD 1.5: 4096×4096). Attention costs grow with the square of the pixel count (the toy UNet at 64×100000
  was still in its first step after two minutes), and past ~2× per side the model repeats objects anyway.
- `check_fits_in_memory`: the estimated peak activations of the stage against the free memory. The estimate is
  deliberately simple: peak activation memory grows with batch × pixels × the channels of the first block; the
  factors were measured on the toy model on CPU (fp32, peak RSS): the UNet holds ~41 and the VAE decoder ~10 such
  tensors at its peak (SDPA attention keeps no n² matrix). They are rounded up (48, 12).
"""

from __future__ import annotations

import math

import torch

from helpers.core import accelerator

MAX_PIXEL_FACTOR = 64
UNET_LIVE_TENSORS = 48  # measured ~41 on the toy UNet (fp32, CPU, SDPA attention)
DECODER_LIVE_TENSORS = 12  # measured ~10 on the toy VAE decoder


def is_offloaded(module) -> bool:
    """Whether accelerate's or diffusers' offloading hooks decide where the module's weights are when it runs."""
    return hasattr(module, "_diffusers_hook") or hasattr(module, "_hf_hook")


def placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a network's weights. diffusers' `model.device` and `.dtype` walk every submodule looking for
    group-offloading hooks on each call (0.2-0.7 ms on the toy's networks; with `pipe._execution_device`, a tenth of
    an optimised toy request): a network without hooks answers from its first floating-point weight instead."""
    weight = None if is_offloaded(module) else next((p for p in module.parameters() if p.is_floating_point()), None)
    return (module.device, module.dtype) if weight is None else (weight.device, weight.dtype)


def available_bytes(device: torch.device) -> int:
    """Free memory where the tensors will live, within any memory budget (`helpers.core.accelerator.free_memory_bytes`:
    on CUDA it counts PyTorch's cached blocks as free)."""
    return accelerator.free_memory_bytes(device)


def check_size_is_sane(unet, latent_height: int, latent_width: int, scale: int) -> None:
    """Refuse latents with more than MAX_PIXEL_FACTOR × the pixels of `unet.config.sample_size`."""
    sample_size = unet.config.sample_size
    trained_h, trained_w = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    factor = latent_height * latent_width / (trained_h * trained_w)
    if factor > MAX_PIXEL_FACTOR:
        raise ValueError(
            f"{latent_height * scale}×{latent_width * scale} is {factor:.0f}× the pixels this UNet was trained on "
            f"({trained_h * scale}×{trained_w * scale}); the attention cost grows with the square of that, so it "
            f"would run for hours. At most {MAX_PIXEL_FACTOR}× is accepted (e.g. up to "
            f"{trained_h * scale * 8}×{trained_w * scale * 8}); the model draws best near its trained size."
        )


def _bytes_per_pixel(module, stage: str, dtype: torch.dtype) -> int:
    """Estimated peak bytes per pixel (of the stage's input: latent pixels for the UNet, image pixels for the
    decoder) per sample."""
    live = UNET_LIVE_TENSORS if stage == "unet" else DECODER_LIVE_TENSORS
    return module.config.block_out_channels[0] * dtype.itemsize * live


def estimate_bytes(module, batch_size: int, height: int, width: int, stage: str,
                   dtype: torch.dtype | None = None) -> int:
    """Estimated peak activation bytes of `stage`: "unet" (one step of `module`, a UNet, on (height, width)
    latents) or "decode" (`module`, a VAE, decoding to (height, width) pixels)."""
    return batch_size * height * width * _bytes_per_pixel(module, stage, dtype or placement(module)[1])


def check_fits_in_memory(module, batch_size: int, height: int, width: int, stage: str, scale: int = 1) -> None:
    """Raise MemoryError, before allocating, when `stage`'s estimated peak exceeds the free memory. `height` and
    `width` are the stage's input size (latents for "unet"); `scale` turns them into image pixels for the message
    (the VAE factor). The message gives the size asked, the estimate, and the largest square and batch that fit."""
    device, dtype = placement(module)
    free = available_bytes(device)
    needed = estimate_bytes(module, batch_size, height, width, stage, dtype)
    if needed <= free:
        return
    per_sample_pixel = _bytes_per_pixel(module, stage, dtype)
    side = int(math.sqrt(free / (batch_size * per_sample_pixel))) * scale // 8 * 8
    max_batch = int(free // estimate_bytes(module, 1, height, width, stage, dtype))
    fits = f"about {side}×{side} at batch {batch_size}" if side >= 8 else "no image at this batch size"
    raise MemoryError(
        f"{height * scale}×{width * scale} at batch {batch_size} needs about {needed / 2**30:.1f} GiB for the {stage} "
        f"stage's activations, but the {device.type} has {free / 2**30:.1f} GiB free. What would fit: {fits}"
        + (f", or batch {max_batch} at this size" if max_batch >= 1 else "")
        + ". Lower the size or the batch (sizes stay multiples of the VAE factor)."
    )
