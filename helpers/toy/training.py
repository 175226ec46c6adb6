"""The toy's training functions as a library: the noise schedule, the loss, the noising, the learning-rate schedule
and the optimizer step that `python -m helpers.toy.train` trains the toy with, and that notebook 08's fine-tune
(`helpers.studies.dreambooth`) and the local hub (`helpers.checkpoints.hub`) reuse. The command line is `train.py`."""

from __future__ import annotations

import math

import numpy as np
import torch

from helpers.core.pictures import canny_edges, normal_map
from helpers.toy import world

# SD 1.5's training noise schedule (scheduler_config.json of stable-diffusion-v1-5), with two changes from
# SD 2 and "Common Diffusion Noise Schedules and Sample Steps are Flawed" (Lin et al. 2024):
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    # SD's schedule leaves sqrt(alphas_cumprod) ~ 0.07 of the image in the "pure" noise at t=999. Over a
    # 16x16 latent that is enough to see where a blob and its background colour are, so a model trained on
    # it learns to keep the layout it finds in the starting noise: the seed, not the prompt, decides shape,
    # size and position. Rescaled to zero terminal SNR, t=999 is pure noise and the prompt has to decide.
    "rescale_betas_zero_snr": True,
    # At zero SNR an epsilon-predicting UNet has nothing to learn at t=999 (the noise *is* its input);
    # v = sqrt(a) * noise - sqrt(1 - a) * x0 is -x0 there, the layout itself. Every diffusers scheduler and
    # pipeline reads this setting.
    "prediction_type": "v_prediction",
}
# The shipped inference scheduler: DDIM, which supports the zero-SNR schedule (PNDM, SD 1.5's default,
# does not), with "trailing" timesteps so the first of the 20 steps starts from t=999, pure noise.
SD_DDIM_CONFIG = {
    **SD_SCHEDULE,
    "timestep_spacing": "trailing",
    "clip_sample": False,  # latents are not in [-1, 1]
    "set_alpha_to_one": False,
    "steps_offset": 1,  # unused by "trailing"; SD's value, and diffusers warns about any other
}

# Objects cover 4-11% of an image; a plain MSE spends the few CPU steps on the backdrop and learns the
# average shape (a blob). Latent pixels on an object weigh this much more in the UNet's loss.
OBJECT_LOSS_WEIGHT = 5.0


def cosine_lr(progress: float, warmup: float = 0.05) -> float:
    """Learning-rate factor at `progress` in [0, 1]: linear warm-up, then cosine decay to 0.

    Not diffusers' `get_cosine_schedule_with_warmup`: that one is a step counter (a LambdaLR), while `train_loop`'s
    progress is the further along of steps and time, so a run cut short by its time cap still anneals; and its
    first step trains at 0, where ours is floored at 0.01 (the two agree on every other step of a 100-step run,
    checked numerically). Switching would change the shipped weights and notebook 08's recorded results."""
    if progress < warmup:
        return max(progress / warmup, 0.01)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(optimizer, loss: torch.Tensor, max_grad_norm: float | None = 1.0) -> float:
    """Backpropagate `loss` and step, with the gradient norm of the optimizer's parameters clipped to
    `max_grad_norm` (None: not clipped)."""
    optimizer.zero_grad()
    loss.backward()
    if max_grad_norm is not None:
        params = [param for group in optimizer.param_groups for param in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return loss.item()


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Captions -> (N, 77) token ids, padded like SD."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids


def noisy_latents_batch(
    latents: dict, idx: torch.Tensor, scaling_factor: float, scheduler, generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Take the cached latents, noise them at random timesteps (DDPM forward process);
    returns the noisy latents, the target the scheduler's `prediction_type` asks for, and the timesteps."""
    # posterior means, not samples: the VAE decoder was trained on means (see vae_loss)
    clean = latents["mean"][idx] * scaling_factor  # (B, 4, 16, 16)
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=generator)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(clean, noise, timesteps)  # v = sqrt(a) * noise - sqrt(1 - a) * clean
    else:
        target = noise
    return scheduler.add_noise(clean, noise, timesteps), target, timesteps


def diffusion_loss(
    prediction: torch.Tensor, target: torch.Tensor, pixel_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE on the scheduler's target, as SD 2 trains, optionally weighted per latent pixel ((B, 1, h, w)).
    For v this weighs the clean image's error by SNR + 1: never below 1, so the noisiest timesteps, where
    the prompt sets the layout, count in full. (Min-SNR weights, min(SNR, gamma) / (SNR + 1) for v, would
    weigh them by SNR, i.e. 0 at t=999.)"""
    if pixel_weight is None:
        return torch.nn.functional.mse_loss(prediction, target)
    squared_error = (prediction - target).pow(2)  # (B, 4, h, w)
    return (pixel_weight * squared_error).sum() / (pixel_weight.sum() * prediction.shape[1])


def object_pixel_weight(depths: torch.Tensor, latent_size: int, object_weight: float) -> torch.Tensor:
    """(B, H, W) depth maps -> (B, 1, h, w) loss weights: `object_weight` on latent pixels an object
    touches, 1 elsewhere."""
    masks = (depths.float() > world.OBJECT_DEPTH_THRESHOLD).float()[:, None]  # (B, 1, H, W)
    touched = torch.nn.functional.adaptive_max_pool2d(masks, latent_size)  # (B, 1, h, w)
    return 1.0 + (object_weight - 1.0) * touched


def control_condition(depths: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, H, W) depth maps -> (B, 3, H, W) control images in [0, 1], as the ControlNet pipeline feeds them.
    Normal maps and edges are derived from the depth map rounded to 8 bits, as it comes from a PNG."""
    if kind == "depth":
        return depths.float()[:, None].expand(-1, 3, -1, -1)  # (B, H, W) -> (B, 3, H, W)
    make_map = {"normal": normal_map, "canny": canny_edges}[kind]
    depths_uint8 = (depths.float().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    maps = np.stack([make_map(depth) for depth in depths_uint8])  # (B, H, W, 3) uint8
    return torch.from_numpy(maps).permute(0, 3, 1, 2).float() / 255.0

# every conv and linear layer of the blocks, LCM-LoRA's list
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
