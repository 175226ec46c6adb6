"""Stable Diffusion's three stages, written out: text → embedding, embedding → latents, latents → image.

Each function takes `pipe`: a diffusers StableDiffusionPipeline, or any object with the few components the
stage uses (`tokenizer` + `text_encoder`; `unet` + `scheduler`; `vae`), so a stage can run with only its
part of the model loaded. Variable names and numbered steps follow `StableDiffusionPipeline.__call__` so
the two can be read side by side; `tests/test_stages.py` checks that both give the same images.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from helpers.models import make_scheduler
from helpers.timing import timed

# ---------------------------------------------------------------------------------------------------
# Input checks: each names the argument that is wrong and says what would be right.


def _as_prompt_list(prompts: str | Sequence[str], name: str = "prompts") -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{name} is empty: pass at least one prompt")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{name} must be a string or a list of strings, got {[type(p).__name__ for p in prompts]}")
    return prompts


def _check_same_length(name: str, values: Sequence, batch_size: int) -> None:
    if len(values) != batch_size:
        raise ValueError(f"{name} has {len(values)} entries but there are {batch_size} prompts: give one per prompt")


def _check_size(name: str, value: int, vae_scale_factor: int) -> None:
    if value < vae_scale_factor or value % vae_scale_factor:
        lower = max(vae_scale_factor, value // vae_scale_factor * vae_scale_factor)
        raise ValueError(
            f"{name}={value} must be a positive multiple of the VAE's scale factor {vae_scale_factor} "
            f"(the latents are {vae_scale_factor}× smaller); try {lower} or {lower + vae_scale_factor}"
        )


def _execution_device(pipe) -> torch.device:
    return getattr(pipe, "_execution_device", None) or pipe.unet.device


def _pipe_scale_factor(pipe) -> int:
    """The pipeline's `vae_scale_factor`, or the VAE's own when `pipe` is a bag of components."""
    return pipe.vae_scale_factor if hasattr(pipe, "vae_scale_factor") else vae_scale_factor(pipe.vae)


def vae_scale_factor(vae) -> int:
    """How many pixels one latent covers along each side (8 for SD 1.5): 2 ** (number of VAE levels - 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


# ---------------------------------------------------------------------------------------------------
# Stage 1: text → embedding


def tokenize(tokenizer, prompts: list[str]):
    """Token ids padded to the tokenizer's 77 slots; warns (saying what was cut) if a prompt is longer."""
    text_inputs = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    untruncated_ids = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if untruncated_ids.shape[-1] > text_inputs.input_ids.shape[-1]:
        for prompt, ids in zip(prompts, untruncated_ids):
            removed = ids[tokenizer.model_max_length - 1 : -1]
            removed = removed[removed != tokenizer.pad_token_id]
            if len(removed):
                warnings.warn(
                    f"The prompt {prompt[:40]!r}... is over {tokenizer.model_max_length} tokens; CLIP only reads the "
                    f"first {tokenizer.model_max_length}, so this was cut: {tokenizer.decode(removed)!r}",
                    stacklevel=3,
                )
    return text_inputs


@torch.inference_mode()
def encode_text(
    pipe, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None, *, guidance: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CLIP embeddings of the prompts and of the negative prompts ("" when none are given).

    Returns `(prompt_embeds, negative_prompt_embeds)`, each (batch, 77, hidden) — 77×768 for SD 1.5.
    `negative_prompt_embeds` is None when `guidance=False` (no classifier-free guidance, no second pass).
    Equals `StableDiffusionPipeline.encode_prompt`.
    """
    prompts = _as_prompt_list(prompts)
    device = pipe.text_encoder.device
    text_inputs = tokenize(pipe.tokenizer, prompts)
    # (batch, 77) token ids → (batch, 77, hidden): the last hidden state, one vector per token slot
    prompt_embeds = pipe.text_encoder(text_inputs.input_ids.to(device))[0]
    if not guidance:
        return prompt_embeds, None

    if negative_prompts is None:
        negative_prompts = [""] * len(prompts)
    negative_prompts = _as_prompt_list(negative_prompts, "negative_prompts")
    _check_same_length("negative_prompts", negative_prompts, len(prompts))
    uncond_input = tokenize(pipe.tokenizer, negative_prompts)
    negative_prompt_embeds = pipe.text_encoder(uncond_input.input_ids.to(device))[0]
    return prompt_embeds, negative_prompt_embeds


# ---------------------------------------------------------------------------------------------------
# Stage 2: embedding → latents


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample: sample i's noise depends only on seeds[i], whatever the batch."""
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def latent_shape(pipe, batch_size: int, height: int, width: int) -> tuple[int, int, int, int]:
    factor = _pipe_scale_factor(pipe)
    return (batch_size, pipe.unet.config.in_channels, height // factor, width // factor)


def default_size(pipe) -> tuple[int, int]:
    """The size the UNet was trained at: `unet.config.sample_size` latents × the VAE scale factor."""
    sample_size = pipe.unet.config.sample_size
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    factor = _pipe_scale_factor(pipe)
    return height * factor, width * factor


@torch.inference_mode()
def denoise(
    pipe,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None = None,
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    seeds: Sequence[int] | None = None,
    height: int | None = None,
    width: int | None = None,
    scheduler=None,
    latents: torch.Tensor | None = None,
    strength: float = 1.0,
    eta: float = 0.0,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    callback_steps: int = 1,
    progress: bool = True,
) -> torch.Tensor:
    """The UNet + scheduler loop with classifier-free guidance. Returns latents (batch, 4, height/8, width/8).

    - `seeds`: one per sample (default 0, 1, 2, ...), so a batch equals the same samples made one by one.
    - `scheduler`: a name from `helpers.models.SCHEDULERS`, a class or an instance; default: the pipeline's.
      A fresh copy is used, so calls never share scheduler state.
    - `latents`: the starting noise (default: drawn from the seeds); with `strength` < 1 (img2img) they are
      instead the clean latents of an image (`encode_image`), noised to `strength` and denoised from there.
    - `callback(step_index, t, latents)` runs every `callback_steps` steps, e.g. to keep intermediate latents.
    """
    # 0. Default height and width to unet
    default_height, default_width = default_size(pipe)
    height = default_height if height is None else height
    width = default_width if width is None else width
    # 1. Check inputs
    factor = _pipe_scale_factor(pipe)
    _check_size("height", height, factor)
    _check_size("width", width, factor)
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps} must be at least 1")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength} must be in (0, 1]: the share of the noise schedule to run")
    if callback_steps < 1:
        raise ValueError(f"callback_steps={callback_steps} must be at least 1")
    do_classifier_free_guidance = guidance_scale > 1.0
    if do_classifier_free_guidance and negative_prompt_embeds is None:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs negative_prompt_embeds (encode_text returns them); "
            "or use guidance_scale=1.0 for no guidance"
        )
    if negative_prompt_embeds is not None and negative_prompt_embeds.shape != prompt_embeds.shape:
        raise ValueError(
            f"negative_prompt_embeds has shape {tuple(negative_prompt_embeds.shape)} but prompt_embeds has "
            f"{tuple(prompt_embeds.shape)}: they must match"
        )

    # 2. Define call parameters
    batch_size = prompt_embeds.shape[0]
    seeds = list(range(batch_size)) if seeds is None else list(seeds)
    _check_same_length("seeds", seeds, batch_size)
    generator = make_generators(seeds)
    device = _execution_device(pipe)
    shape = latent_shape(pipe, batch_size, height, width)

    # 3. Encode input prompt: done by encode_text. For guidance, stack [uncond; cond] into one UNet batch.
    if do_classifier_free_guidance:
        prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])  # (2·batch, 77, hidden)

    # 4. Prepare timesteps
    scheduler = make_scheduler(scheduler or pipe.scheduler, pipe.scheduler)
    scheduler = copy.deepcopy(scheduler)  # schedulers keep state (e.g. PNDM's past noise): never share it
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    if strength < 1.0:
        # img2img: skip the noisiest (1 - strength) of the schedule and start from the noised image
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init_timestep, 0)
        timesteps = timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)

    # 5. Prepare latent variables
    if latents is not None and tuple(latents.shape) != shape:
        raise ValueError(
            f"latents have shape {tuple(latents.shape)} but {shape} is needed: (batch, unet.config.in_channels, "
            f"height/{factor}, width/{factor}) for {batch_size} prompts at {height}×{width}"
        )
    if strength < 1.0:
        if latents is None:
            raise ValueError(f"strength={strength} (img2img) needs latents: the encoded image (see encode_image)")
        noise = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        latent_timestep = timesteps[:1].repeat(batch_size)
        latents = scheduler.add_noise(latents.to(device), noise, latent_timestep)
    elif latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        latents = latents * scheduler.init_noise_sigma  # (batch, 4, height/8, width/8)
    else:
        latents = latents.to(device) * scheduler.init_noise_sigma

    # 6. Prepare extra step kwargs (only some schedulers take eta and a generator)
    extra_step_kwargs = scheduler_step_kwargs(scheduler, generator, eta)

    # 7. Denoising loop
    for i, t in enumerate(tqdm(timesteps, desc="denoise", disable=not progress, leave=False)):
        # expand the latents if we are doing classifier free guidance
        latent_model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)

        # predict the noise residual
        noise_pred = pipe.unet(latent_model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]

        # perform guidance: g = uncond + guidance_scale · (text − uncond)
        if do_classifier_free_guidance:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)

        # compute the previous noisy sample x_t -> x_t-1
        latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

        if callback is not None and (i % callback_steps == 0 or i == len(timesteps) - 1):
            callback(i, t, latents)
    return latents


def scheduler_step_kwargs(scheduler, generator, eta: float = 0.0) -> dict:
    """`eta` and `generator` for the schedulers whose `step` takes them (DDIM, the ancestral samplers)."""
    import inspect

    parameters = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in parameters:
        kwargs["eta"] = eta
    if "generator" in parameters:
        kwargs["generator"] = generator
    return kwargs


# ---------------------------------------------------------------------------------------------------
# Stage 3: latents → image


def _image_processor(pipe) -> VaeImageProcessor:
    return getattr(pipe, "image_processor", None) or VaeImageProcessor(vae_scale_factor=vae_scale_factor(pipe.vae))


@torch.inference_mode()
def decode(pipe, latents: torch.Tensor, output_type: str = "pil"):
    """VAE-decode latents to images: a list of PIL images, or a numpy ("np") / torch ("pt") batch in [0, 1]."""
    if output_type not in ("pil", "np", "pt"):
        raise ValueError(f"output_type={output_type!r} must be 'pil', 'np' or 'pt'")
    vae = pipe.vae
    if latents.ndim != 4 or latents.shape[1] != vae.config.latent_channels:
        raise ValueError(
            f"latents have shape {tuple(latents.shape)}; decode needs (batch, {vae.config.latent_channels}, h, w)"
        )
    # The UNet works on latents scaled to unit variance; undo that before the VAE decoder.
    latents = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]  # (batch, 3, h·8, w·8) in [-1, 1]
    return _image_processor(pipe).postprocess(image, output_type=output_type, do_denormalize=[True] * len(image))


@torch.inference_mode()
def encode_image(pipe, images) -> torch.Tensor:
    """The VAE encoder, for img2img: images (PIL or [0, 1] tensors) → scaled latents (batch, 4, h/8, w/8).

    Takes the mean of the latent distribution (not a sample), so the result is deterministic.
    """
    vae = pipe.vae
    image = _image_processor(pipe).preprocess(images).to(device=vae.device, dtype=vae.dtype)  # [-1, 1]
    return vae.encode(image).latent_dist.mode() * vae.config.scaling_factor


# ---------------------------------------------------------------------------------------------------
# The three in series


@dataclass
class Generation:
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, and "total"

    def timing_report(self) -> str:
        n = len(self.latents)
        return "  ".join(f"{stage} {seconds:.3f}s" for stage, seconds in self.timings.items()) + f"  ({n} images)"


def generate(
    pipe,
    prompts: str | Sequence[str],
    negative_prompts: str | Sequence[str] | None = None,
    *,
    seeds: Sequence[int] | None = None,
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    output_type: str = "pil",
    **denoise_kwargs,
) -> Generation:
    """encode_text → denoise → decode, each stage timed (on a GPU, after synchronizing)."""
    device = _execution_device(pipe)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with timed(timings, "encode_text", device):
        prompt_embeds, negative_prompt_embeds = encode_text(
            pipe, prompts, negative_prompts, guidance=guidance_scale > 1.0
        )
    with timed(timings, "denoise", device):
        latents = denoise(
            pipe,
            prompt_embeds,
            negative_prompt_embeds,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seeds=seeds,
            height=height,
            width=width,
            **denoise_kwargs,
        )
    with timed(timings, "decode", device):
        images = decode(pipe, latents, output_type=output_type)
    timings["total"] = time.perf_counter() - start
    return Generation(images, latents, prompt_embeds, negative_prompt_embeds, timings)
