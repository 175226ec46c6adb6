"""Random-weight Stable Diffusion models for tests and benchmarks, built offline from configs.

- `tiny_random_pipeline()`: a miniature SD 1.5 (same classes and block structure, tiny channels) that
  builds in a fraction of a second. Images are noise; it exists to check that code paths agree.
- `sd15_random_pipeline()`: SD 1.5's real architecture (UNet 859.5 M params, CLIP ViT-L/14 text encoder,
  the real VAE) with random weights. Compute and memory cost equal the real model's, so timings are real;
  the images are noise.
Both use the project's own CLIP tokenizer (`helpers.core.tokenizer`), since the hub's is out of reach.
"""

from __future__ import annotations

import copy

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from helpers.core.tokenizer import build_clip_tokenizer

# --- SD 1.5's configs, as in stable-diffusion-v1-5/stable-diffusion-v1-5 on the hub -------------------
SD15_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_TEXT_ENCODER_CONFIG = {  # CLIP ViT-L/14's text tower
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}
SD15_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
SD15_UNET_PARAMS = 859_520_964  # the real UNet's parameter count

# --- the tiny model: SD's block structure (4 levels, 2 layers per block), tiny channels ---------------
TINY_UNET_CONFIG = {
    **SD15_UNET_CONFIG,
    "block_out_channels": [16, 16, 32, 32],
    "attention_head_dim": 2,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "sample_size": 8,
}
TINY_VAE_CONFIG = {
    **SD15_VAE_CONFIG,
    "block_out_channels": [8, 8, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
}
TINY_TEXT_ENCODER_CONFIG = {
    **SD15_TEXT_ENCODER_CONFIG,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 32,
}


def sd15_configs() -> dict[str, dict]:
    """Deep copies of SD 1.5's component configs, keyed by the pipeline's component names."""
    return copy.deepcopy(
        {
            "unet": SD15_UNET_CONFIG,
            "vae": SD15_VAE_CONFIG,
            "text_encoder": SD15_TEXT_ENCODER_CONFIG,
            "scheduler": SD15_SCHEDULER_CONFIG,
        }
    )


def _text_encoder(config: dict, tokenizer) -> CLIPTextModel:
    # The vocabulary keeps the config's size (49408 for SD 1.5) so the embedding table has the real shape;
    # our tokenizer only ever produces the first few hundred ids.
    vocab_size = max(config["vocab_size"], len(tokenizer))
    text_config = CLIPTextConfig(
        **{**config, "vocab_size": vocab_size},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(text_config)


def build_pipeline(
    unet_config: dict,
    vae_config: dict,
    text_encoder_config: dict,
    scheduler_config: dict = SD15_SCHEDULER_CONFIG,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline with random weights (seeded) from the given component configs."""
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_config),
        text_encoder=_text_encoder(text_encoder_config, tokenizer),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**unet_config),
        scheduler=PNDMScheduler.from_config(scheduler_config),  # from_config: SD keeps DDIM-only keys
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    return pipe


def tiny_random_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """A tiny SD (64×64 images, 8×8×4 latents, 77×32 embeddings) with random weights, built in < 1 s."""
    return build_pipeline(TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TEXT_ENCODER_CONFIG, seed=seed, dtype=dtype)


def sd15_random_pipeline(seed: int = 0, dtype: torch.dtype = torch.float16) -> StableDiffusionPipeline:
    """SD 1.5's architecture at full size with random weights (~1.07 B params; ~2 GB in fp16)."""
    return build_pipeline(SD15_UNET_CONFIG, SD15_VAE_CONFIG, SD15_TEXT_ENCODER_CONFIG, seed=seed, dtype=dtype)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sd15_unet_on_meta() -> UNet2DConditionModel:
    """SD 1.5's UNet on the meta device: real shapes, no memory, built in a moment (for shape checks)."""
    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET_CONFIG)
