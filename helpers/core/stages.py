"""Stable Diffusion's three stages, written out: text → embedding, embedding → latents, latents → image.

Each function takes `pipe`: a diffusers StableDiffusionPipeline, or any object with the few components the
stage uses (`tokenizer` + `text_encoder`; `unet` + `scheduler`; `vae`), so a stage can run with only its
part of the model loaded. Variable names and numbered steps follow `StableDiffusionPipeline.__call__` so
the two can be read side by side; `tests/test_stages.py` checks that both give the same images.
"""

from __future__ import annotations

import copy
import inspect
import math
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

from helpers.core.accelerator import rehearsal
from helpers.core.limits import check_fits_in_memory, check_size_is_sane, is_offloaded, placement
from helpers.core.measure import timed
from helpers.core.models import make_scheduler

# ---------------------------------------------------------------------------------------------------
# Input checks: each names the argument that is wrong and says what would be right.


def _as_prompt_list(prompts: str | Sequence[str], name: str = "prompts") -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"{name} must be a string or a list of strings, got {type(prompts).__name__}")
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
    """Where the networks run: the UNet's weights' device, unless a network is offloaded (then diffusers'
    `_execution_device`, which walks every submodule of every network for the hooks: 3 ms a call on the toy)."""
    networks = getattr(pipe, "components", {"unet": pipe.unet}).values()
    if any(is_offloaded(m) for m in networks) and hasattr(pipe, "_execution_device"):
        return pipe._execution_device
    return placement(pipe.unet)[0]


def vae_scale_factor(model) -> int:
    """How many pixels one latent covers along each side (8 for SD 1.5): a pipeline's `vae_scale_factor`, else
    2 ** (number of VAE levels - 1) of `model`: a VAE, a bag of components holding one (`.vae`), or a VAE's config
    (a dict, e.g. `AutoencoderKL.load_config(...)`). An AutoencoderTiny's config names its levels
    `block_out_channels` too."""
    if hasattr(model, "vae_scale_factor"):
        return model.vae_scale_factor
    vae = getattr(model, "vae", model)
    config = vae if isinstance(vae, dict) else vae.config
    return 2 ** (len(config["block_out_channels"]) - 1)


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


SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed accepts: [low, high)


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample: sample i's noise depends only on seeds[i], whatever the batch."""
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed {seed!r} must be an integer, got {type(seed).__name__}")
        if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
            raise ValueError(f"seed {seed} is outside what a torch.Generator takes ({SEED_RANGE[0]} to "
                             f"{SEED_RANGE[1] - 1}, a 64-bit integer): pick a smaller seed, e.g. seed % 2**64")
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def check_guidance_scale(guidance_scale: float) -> None:
    """A finite number: inf makes every pixel NaN, and NaN > 1.0 is False, so NaN would silently run unguided."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(
            guidance_scale):
        raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite number (1.0 = no guidance; SD 1.5 "
                         "uses 7.5)")


def latent_shape(pipe, batch_size: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(batch, latent channels, height / factor, width / factor): the latents `denoise` draws for that image size."""
    factor = vae_scale_factor(pipe)
    return (batch_size, pipe.unet.config.in_channels, height // factor, width // factor)


def default_size(pipe) -> tuple[int, int]:
    """The size the UNet was trained at: `unet.config.sample_size` latents × the VAE scale factor (under
    `python -m helpers rehearse`, at most its `--size`: a CPU cannot afford SD 1.5's 512², and says so)."""
    sample_size = pipe.unet.config.sample_size
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    factor = vae_scale_factor(pipe)
    cap = rehearsal().get("size")
    if cap:
        return min(height * factor, cap), min(width * factor, cap)
    return height * factor, width * factor


@torch.inference_mode()
def denoise(
    pipe,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None = None,
    *,
    num_inference_steps: int = 20,
    timesteps: Sequence[int] | None = None,
    guidance_scale: float = 7.5,
    seeds: Sequence[int] | None = None,
    height: int | None = None,
    width: int | None = None,
    scheduler=None,
    latents: torch.Tensor | None = None,
    strength: float = 1.0,
    eta: float = 0.0,
    cfg_cutoff: float | None = None,
    controlnet=None,
    image=None,
    controlnet_conditioning_scale: float | Sequence[float] = 1.0,
    control_guidance_start: float | Sequence[float] = 0.0,
    control_guidance_end: float | Sequence[float] = 1.0,
    guess_mode: bool = False,
    callback_on_step_end: Callable[[object, int, torch.Tensor, dict], dict] | None = None,
    callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    progress: bool = True,
) -> torch.Tensor:
    """The UNet + scheduler loop with classifier-free guidance (and ControlNets, when given).
    Returns latents (batch, 4, height/8, width/8).

    - `seeds`: one per sample (default 0, 1, 2, ...), so a batch equals the same samples made one by one.
    - `scheduler`: a name from `helpers.core.models.SCHEDULERS`, a class or an instance; default: the pipeline's.
      A fresh copy is used, so calls never share scheduler state.
    - `timesteps`: the schedule itself (e.g. Align Your Steps' `AysSchedules["StableDiffusionTimesteps"]`), for a
      scheduler whose `set_timesteps` takes one; `num_inference_steps` is then its length, as in diffusers.
    - `latents`: the starting noise (default: drawn from the seeds); with `strength` < 1 (img2img) they are
      instead the clean latents of an image (`encode_image`), noised to `strength` and denoised from there.
    - `cfg_cutoff` in [0, 1]: guidance only for steps i <= int(len(timesteps) * cfg_cutoff), then the prompt alone
      (one UNet pass per step); diffusers' `SDCFGCutoffCallback` semantics, for any batch. None: every step.
    - ControlNet, as `StableDiffusionControlNetPipeline`: `controlnet` (a model or a list; default
      `pipe.controlnet` if the pipeline has one), control `image` (one per net: an image, or a list with one per
      prompt), `controlnet_conditioning_scale`, `control_guidance_start`/`end` (the share of steps a net acts on;
      a float, or one per net) and `guess_mode`. Lists of the wrong length are refused, not truncated.
    - `callback_on_step_end(pipe, step_index, t, callback_kwargs)` runs after every step, as in diffusers'
      pipelines: `callback_kwargs` holds the tensors named in `callback_on_step_end_tensor_inputs` (any of
      CALLBACK_TENSOR_INPUTS), and the dict it returns may replace the latents (e.g. keep or edit them).

    The body is the pipeline's numbered steps as an outline (longer than most functions here for that reason:
    one step, one line or two); each step's detail lives in the functions below it.
    """
    # 0. Default height and width to unet (and the steps to a given schedule's length)
    num_inference_steps = num_inference_steps if timesteps is None else len(timesteps)
    default_height, default_width = default_size(pipe)
    height = default_height if height is None else height
    width = default_width if width is None else width
    # 1. Check inputs
    do_classifier_free_guidance = guidance_scale > 1.0
    _check_denoise_inputs(pipe, prompt_embeds, negative_prompt_embeds, height, width, num_inference_steps, strength,
                          callback_on_step_end_tensor_inputs, guidance_scale, cfg_cutoff)
    batch_size = prompt_embeds.shape[0]
    factor = vae_scale_factor(pipe)
    unet_batch = batch_size * (2 if do_classifier_free_guidance else 1)
    check_size_is_sane(pipe.unet, height // factor, width // factor, scale=factor)
    check_fits_in_memory(pipe.unet, unet_batch, height // factor, width // factor, "unet", scale=factor)

    # 2. Define call parameters
    seeds = list(range(batch_size)) if seeds is None else list(seeds)
    _check_same_length("seeds", seeds, batch_size)
    generator = make_generators(seeds)
    device = _execution_device(pipe)

    # 3. Encode input prompt: done by encode_text. For guidance, stack [uncond; cond] into one UNet batch.
    text_embeddings = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_classifier_free_guidance else None

    # 4. Prepare the control image(s) (none without a ControlNet)
    controlnet = getattr(pipe, "controlnet", None) if controlnet is None else controlnet
    control = None
    if controlnet is not None:
        control = ControlNetInputs.prepare(pipe, controlnet, image, batch_size, height, width, device,
                                           controlnet_conditioning_scale, guess_mode)
    elif image is not None:
        raise ValueError("image= (a control image) was given but there is no controlnet: pass controlnet=, or load "
                         "the pipeline with load_pipeline(model, controlnet='depth')")

    # 5. Prepare timesteps
    scheduler, timesteps = prepare_timesteps(pipe, scheduler, num_inference_steps, strength, device, timesteps)

    # 6. Prepare latent variables
    latents = prepare_latents(pipe, scheduler, timesteps, batch_size, height, width, generator, device,
                              prompt_embeds.dtype, latents, strength)

    # 7. Prepare extra step kwargs (only some schedulers take eta and a generator)
    extra_step_kwargs = scheduler_step_kwargs(scheduler, generator, eta)

    # 7.1 Which steps use guidance, and which ControlNets act at each step
    guided_until = len(timesteps) if cfg_cutoff is None else int(len(timesteps) * cfg_cutoff)
    if control is not None:
        control.set_schedule(len(timesteps), control_guidance_start, control_guidance_end)

    # 8. Denoising loop
    for i, t in enumerate(tqdm(timesteps, desc="denoise", disable=not progress, leave=False)):
        guided = do_classifier_free_guidance and i <= guided_until
        # expand the latents if we are doing classifier free guidance
        latent_model_input = torch.cat([latents] * 2) if guided else latents
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        encoder_hidden_states = text_embeddings if guided else prompt_embeds

        # controlnet(s) inference: residuals added to the UNet's skip connections
        residuals = {} if control is None else control.residuals(
            i, t, latents, latent_model_input, encoder_hidden_states, scheduler, guided)

        # predict the noise residual
        noise_pred = pipe.unet(latent_model_input, t, encoder_hidden_states=encoder_hidden_states,
                               return_dict=False, **residuals)[0]

        # perform guidance: g = uncond + guidance_scale · (text − uncond)
        if guided:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)

        # compute the previous noisy sample x_t -> x_t-1
        latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

        if callback_on_step_end is not None:
            step_tensors = {"latents": latents, "prompt_embeds": prompt_embeds,
                            "negative_prompt_embeds": negative_prompt_embeds}
            callback_kwargs = {name: step_tensors[name] for name in callback_on_step_end_tensor_inputs}
            callback_outputs = callback_on_step_end(pipe, i, t, callback_kwargs) or {}
            latents = callback_outputs.pop("latents", latents)
    return latents


CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds")  # what a step-end callback can see


def _check_denoise_inputs(pipe, prompt_embeds, negative_prompt_embeds, height, width, num_inference_steps, strength,
                          callback_on_step_end_tensor_inputs, guidance_scale, cfg_cutoff) -> None:
    factor = vae_scale_factor(pipe)
    _check_size("height", height, factor)
    _check_size("width", width, factor)
    if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3:
        raise TypeError("prompt_embeds must be a (batch, tokens, hidden) tensor from encode_text, got "
                        f"{type(prompt_embeds).__name__}{tuple(getattr(prompt_embeds, 'shape', ()))}")
    check_guidance_scale(guidance_scale)
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps} must be at least 1")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength} must be in (0, 1]: the share of the noise schedule to run")
    unknown = [name for name in callback_on_step_end_tensor_inputs if name not in CALLBACK_TENSOR_INPUTS]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs has {unknown}; a step-end callback can see "
                         f"{list(CALLBACK_TENSOR_INPUTS)}")
    if cfg_cutoff is not None and not 0.0 <= cfg_cutoff <= 1.0:
        raise ValueError(f"cfg_cutoff={cfg_cutoff} must be in [0, 1]: the share of steps that use guidance")
    if guidance_scale > 1.0 and negative_prompt_embeds is None:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs negative_prompt_embeds (encode_text returns them); "
            "or use guidance_scale=1.0 for no guidance"
        )
    if negative_prompt_embeds is not None and negative_prompt_embeds.shape != prompt_embeds.shape:
        raise ValueError(
            f"negative_prompt_embeds has shape {tuple(negative_prompt_embeds.shape)} but prompt_embeds has "
            f"{tuple(prompt_embeds.shape)}: they must match"
        )


def prepare_timesteps(pipe, scheduler, num_inference_steps: int, strength: float, device,
                      timesteps: Sequence[int] | None = None):
    """A fresh scheduler set to `num_inference_steps` (or to the given `timesteps`, as diffusers' `retrieve_timesteps`
    does), and the timesteps to run (the last `strength` of them)."""
    scheduler = make_scheduler(scheduler or pipe.scheduler, pipe.scheduler)
    scheduler = copy.deepcopy(scheduler)  # schedulers keep state (e.g. PNDM's past noise): never share it
    if timesteps is None:
        scheduler.set_timesteps(num_inference_steps, device=device)
    elif "timesteps" in inspect.signature(scheduler.set_timesteps).parameters:
        scheduler.set_timesteps(timesteps=list(timesteps), device=device)
    else:
        raise ValueError(f"{type(scheduler).__name__} takes no custom timesteps: use a scheduler that does "
                         "(e.g. 'dpm++', DPMSolverMultistepScheduler) or pass num_inference_steps instead")
    timesteps = scheduler.timesteps
    if strength < 1.0:
        # img2img: skip the noisiest (1 - strength) of the schedule and start from the noised image
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        if init_timestep < 1:  # diffusers' img2img pipeline refuses this too
            raise ValueError(f"strength={strength} of num_inference_steps={num_inference_steps} leaves no step to run "
                             f"(int({num_inference_steps} × {strength}) = 0): raise the steps to at least "
                             f"{math.ceil(1 / strength)} or the strength")
        t_start = max(num_inference_steps - init_timestep, 0)
        timesteps = timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
    return scheduler, timesteps


def prepare_latents(pipe, scheduler, timesteps, batch_size, height, width, generator, device, dtype, latents,
                    strength) -> torch.Tensor:
    """The starting latents (batch, 4, height/8, width/8): seeded noise scaled to the scheduler's first sigma, or
    for img2img (`strength` < 1) the given clean latents noised to the first timestep."""
    shape = latent_shape(pipe, batch_size, height, width)
    if latents is not None and tuple(latents.shape) != shape:
        factor = vae_scale_factor(pipe)
        raise ValueError(
            f"latents have shape {tuple(latents.shape)} but {shape} is needed: (batch, unet.config.in_channels, "
            f"height/{factor}, width/{factor}) for {batch_size} prompts at {height}×{width}"
        )
    if strength < 1.0:
        if latents is None:
            raise ValueError(f"strength={strength} (img2img) needs latents: the encoded image (see encode_image)")
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latent_timestep = timesteps[:1].repeat(batch_size)
        return scheduler.add_noise(latents.to(device), noise, latent_timestep)
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    return latents.to(device) * scheduler.init_noise_sigma


# ---------------------------------------------------------------------------------------------------
# The ControlNet path of denoise, as StableDiffusionControlNetPipeline runs it


@dataclass
class ControlNetInputs:
    """One or more ControlNets with their prepared control images, scales and per-step schedule."""

    controlnet: torch.nn.Module  # a ControlNetModel, or a MultiControlNetModel for several
    image: torch.Tensor | list[torch.Tensor]  # (batch, 3, height, width) in [0, 1], one per net
    conditioning_scale: float | list[float]
    guess_mode: bool
    keep: list = field(default_factory=list)  # per step: 1.0/0.0 (or one per net) = does the net act

    @property
    def nets(self) -> list:
        return list(getattr(self.controlnet, "nets", [self.controlnet]))

    @classmethod
    def prepare(cls, pipe, controlnet, image, batch_size, height, width, device, conditioning_scale, guess_mode):
        """Wrap a list of nets as diffusers does, check every per-net list, and prepare the control images."""
        from diffusers.models.controlnets import MultiControlNetModel

        if isinstance(controlnet, (list, tuple)):
            controlnet = controlnet[0] if len(controlnet) == 1 else MultiControlNetModel(list(controlnet))
        nets = list(getattr(controlnet, "nets", [controlnet]))
        multi = len(nets) > 1
        if image is None:
            raise ValueError(f"a ControlNet needs image= (its control image{'s, one per net' if multi else ''})")
        images = _per_net("image", image, len(nets)) if multi else [image]
        scales = _per_net_values("controlnet_conditioning_scale", conditioning_scale, len(nets))
        processor = getattr(pipe, "control_image_processor", None) or VaeImageProcessor(
            vae_scale_factor=vae_scale_factor(pipe), do_convert_rgb=True, do_normalize=False)
        dtype = placement(nets[0])[1]
        prepared = [_prepare_control_image(processor, im, batch_size, height, width, device, dtype, f"image[{k}]"
                                           if multi else "image") for k, im in enumerate(images)]
        guess_mode = guess_mode or bool(nets[0].config.global_pool_conditions)
        return cls(controlnet, prepared if multi else prepared[0], scales if multi else scales[0], guess_mode)

    def set_schedule(self, num_steps: int, control_guidance_start, control_guidance_end) -> None:
        """keep[i]: 1.0 where step i lies within [start, end] of the schedule for a net, else 0.0 (the pipeline's
        rule)."""
        n = len(self.nets)
        starts = _per_net_values("control_guidance_start", control_guidance_start, n)
        ends = _per_net_values("control_guidance_end", control_guidance_end, n)
        for start, end in zip(starts, ends):
            if not 0.0 <= start < end <= 1.0:
                raise ValueError(f"control_guidance_start={start} and control_guidance_end={end} must satisfy "
                                 "0 <= start < end <= 1 (shares of the steps)")
        self.keep = []
        for i in range(num_steps):
            keeps = [1.0 - float(i / num_steps < s or (i + 1) / num_steps > e) for s, e in zip(starts, ends)]
            self.keep.append(keeps if n > 1 else keeps[0])

    def residuals(self, i, t, latents, latent_model_input, encoder_hidden_states, scheduler, guided: bool) -> dict:
        """The ControlNets' additions to the UNet's skip connections at step i, as UNet keyword arguments."""
        if self.guess_mode and guided:
            # Infer ControlNet only for the conditional batch (guess mode): the unconditional half gets zeros.
            control_model_input = scheduler.scale_model_input(latents, t)
            controlnet_prompt_embeds = encoder_hidden_states.chunk(2)[1]
        else:
            control_model_input = latent_model_input
            controlnet_prompt_embeds = encoder_hidden_states
        images = self.image if isinstance(self.image, list) else [self.image]
        if guided and not self.guess_mode:
            images = [torch.cat([im] * 2) for im in images]  # the same control for the uncond and cond halves
        image = images if isinstance(self.image, list) else images[0]
        if isinstance(self.keep[i], list):
            cond_scale = [c * s for c, s in zip(self.conditioning_scale, self.keep[i])]
        else:
            cond_scale = self.conditioning_scale * self.keep[i]
        down_block_res_samples, mid_block_res_sample = self.controlnet(
            control_model_input, t, encoder_hidden_states=controlnet_prompt_embeds, controlnet_cond=image,
            conditioning_scale=cond_scale, guess_mode=self.guess_mode, return_dict=False)
        if self.guess_mode and guided:
            down_block_res_samples = [torch.cat([torch.zeros_like(d), d]) for d in down_block_res_samples]
            mid_block_res_sample = torch.cat([torch.zeros_like(mid_block_res_sample), mid_block_res_sample])
        return {"down_block_additional_residuals": down_block_res_samples,
                "mid_block_additional_residual": mid_block_res_sample}


def _per_net(name: str, value, n_nets: int) -> list:
    if not isinstance(value, (list, tuple)) or len(value) != n_nets:
        got = f"{len(value)} entries" if isinstance(value, (list, tuple)) else f"a {type(value).__name__}"
        raise ValueError(f"{name} must be a list with one entry per ControlNet ({n_nets}), got {got}")
    return list(value)


def _per_net_values(name: str, value, n_nets: int) -> list[float]:
    """A float for every net, or a list with exactly one per net (diffusers silently drops nets on a short list)."""
    if isinstance(value, (int, float)):
        return [float(value)] * n_nets
    return [float(v) for v in _per_net(name, value, n_nets)]


def _prepare_control_image(processor, image, batch_size, height, width, device, dtype, name) -> torch.Tensor:
    """Control image(s) → (batch, 3, height, width) in [0, 1], stretched to height × width as the pipeline does;
    one image serves every prompt, a list must have one per prompt."""
    if isinstance(image, (list, tuple)) and len(image) not in (1, batch_size):
        raise ValueError(f"{name} has {len(image)} control images but there are {batch_size} prompts: "
                         "give one image for all, or one per prompt")
    _warn_if_stretched(image, height, width, name)
    try:
        image = processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{name} is not a usable control image ({error}); give PIL images, HWC arrays in [0, 1] "
                         "or (batch, 3, H, W) tensors") from error
    if image.shape[0] == 1:
        image = image.repeat_interleave(batch_size, dim=0)
    elif image.shape[0] != batch_size:
        raise ValueError(f"{name} holds {image.shape[0]} control images but there are {batch_size} prompts")
    return image.to(device=device, dtype=dtype)


def _warn_if_stretched(image, height: int, width: int, name: str) -> None:
    """Say so when a control image is not height × width: it is stretched, as the pipeline does (a changed aspect
    distorts what the ControlNet follows; helpers.studies.control.fit_control_image crops or pads instead)."""
    sizes = set()
    for im in image if isinstance(image, (list, tuple)) else [image]:
        if isinstance(im, PIL.Image.Image):  # (W, H)
            sizes.add(im.size)
        elif hasattr(im, "shape") and len(im.shape) >= 2:  # HWC array, or (B, C, H, W) / (C, H, W) tensor
            shape = tuple(im.shape)
            sizes.add((shape[-1], shape[-2]) if isinstance(im, torch.Tensor) else (shape[1], shape[0]))
    wrong = sorted(f"{w}×{h}" for w, h in sizes if (w, h) != (width, height))
    if wrong:
        warnings.warn(f"{name}: a control image of {', '.join(wrong)} (W×H) is stretched to the target "
                      f"{width}×{height} as StableDiffusionControlNetPipeline does; fit it first "
                      "(helpers.studies.control.fit_control_image: resize, crop or pad) to keep its aspect",
                      stacklevel=4)


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


def image_processor(pipe) -> VaeImageProcessor:
    """The pipeline's `image_processor` (pixels <-> [-1, 1] tensors), or one at its VAE factor for a bag of
    components."""
    return getattr(pipe, "image_processor", None) or VaeImageProcessor(vae_scale_factor=vae_scale_factor(pipe))


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
    factor = vae_scale_factor(pipe)
    check_fits_in_memory(vae, len(latents), latents.shape[2] * factor, latents.shape[3] * factor, "decode")
    # The UNet works on latents scaled to unit variance; undo that before the VAE decoder.
    device, dtype = placement(vae)
    latents = latents.to(device=device, dtype=dtype) / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]  # (batch, 3, h·8, w·8) in [-1, 1]
    return image_processor(pipe).postprocess(image, output_type=output_type, do_denormalize=[True] * len(image))


@torch.inference_mode()
def encode_image(pipe, images) -> torch.Tensor:
    """The VAE encoder, for img2img: images (PIL or [0, 1] tensors) → scaled latents (batch, 4, h/8, w/8).

    Takes the mean of the latent distribution (not a sample), so the result is deterministic.
    """
    vae = pipe.vae
    image = image_processor(pipe).preprocess(images).to(device=vae.device, dtype=vae.dtype)  # [-1, 1]
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
    """encode_text → denoise → decode, each stage timed (on a GPU, after synchronizing): the ONE way this project
    generates. `denoise_kwargs` go to `denoise` (scheduler, cfg_cutoff, ControlNet arguments, callback_on_step_end...).

    Inputs are checked before any work: a size that cannot fit in memory is refused up front (MemoryError
    with what would fit), not after minutes of denoising."""
    if output_type not in ("pil", "np", "pt"):
        raise ValueError(f"output_type={output_type!r} must be 'pil', 'np' or 'pt'")
    check_guidance_scale(guidance_scale)  # before encode_text, which decides from it whether to encode negatives
    if seeds is not None:
        make_generators(seeds)  # checks them now, before any work
    n_prompts = len(_as_prompt_list(prompts))
    default_height, default_width = default_size(pipe)
    height = default_height if height is None else height
    width = default_width if width is None else width
    factor = vae_scale_factor(pipe)
    _check_size("height", height, factor)
    _check_size("width", width, factor)
    check_size_is_sane(pipe.unet, height // factor, width // factor, scale=factor)
    check_fits_in_memory(pipe.vae, n_prompts, height, width, "decode")
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
