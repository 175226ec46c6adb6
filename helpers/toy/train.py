"""Train the toy Stable Diffusion from scratch on 2 CPU cores: `python -m helpers.toy.train` (the command line;
the training functions other modules reuse are in `helpers.toy.training`).

Stages (each resumable from its checkpoint in --work-dir, each skipped when its result already exists):

  data        render the training scenes once (images, depth maps, captions)      -> work/data.pt
  oracle      the classifier behind the quality metrics                            -> weights/oracle/
  vae         AutoencoderKL on random crops (fully convolutional, so crops suffice) -> work/vae/
  latents     encode every training image once with the trained VAE                -> work/latents.pt
  decoder     sharpen the VAE decoder, encoder frozen (can run beside the unet stage) -> work/vae_decoder/
  clip        a tiny CLIPModel, trained contrastively on (image, caption) pairs; its text half is the
              pipeline's text encoder                                               -> work/text_encoder/
  unet        UNet2DConditionModel on the frozen text encoder, as SD trains: zero-terminal-SNR schedule,
              v-prediction, caption dropout, EMA
  pipeline    assemble the StableDiffusionPipeline folder (DDIM, zero-SNR schedule) -> weights/sd/
  controlnet  ControlNetModel.from_unet on depth maps, base model frozen           -> weights/controlnet-depth/
  controlnet-normal, controlnet-canny
              fine-tuned from the depth net on normal maps / Canny edges derived from the depth maps
              (helpers.studies.control, as notebook 06 derives them)
                                                                          -> weights/controlnet-normal/, -canny/
  tiny-vae    an AutoencoderTiny (TAESD's architecture) distilled from the shipped VAE: its encoder learns the
              VAE's scaled latents, its decoder the pictures from (noisy) latents; notebook 07's tiny decoder
                                                                          -> weights/tiny-vae/
  ldm         single-file export in the original LDM key layout (core.ldm)      -> weights/toy-sd-ldm.safetensors
  lcm         a latent consistency model distilled from the shipped UNet as a LoRA, the way LCM-LoRA ships for
              SD 1.5 (guidance folded in, sampled with diffusers' LCMScheduler in 1-4 steps; not in `all`)
                                                                          -> weights/lcm-lora/

Examples:
  python -m helpers.toy.train                          # everything, default budget (~62 min on 2 cores + ControlNets)
  python -m helpers.toy.train --stage unet --unet-steps 100 --work-dir scratch/try
  python -m helpers.toy.train --stage controlnet-canny   # one ControlNet alone, on the shipped pipeline
  python -m helpers.toy.train --stage lcm             # the LCM-LoRA, on the shipped pipeline (~3 min)

The ControlNet, tiny-vae and lcm stages need only the shipped weights/sd/: they render the scenes and encode them with
the shipped VAE when the work dir has neither (the VAE encoder is frozen after the vae stage, so its latents are the
same).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from helpers.core.ldm import export_ldm_checkpoint
from helpers.core.tokenizer import DEFAULT_WORDS, build_clip_tokenizer
from helpers.toy import world
from helpers.toy.oracle import Oracle, oracle_loss, save_oracle, scene_labels
from helpers.toy.training import (
    LCM_LORA_TARGETS,
    OBJECT_LOSS_WEIGHT,
    SD_DDIM_CONFIG,
    SD_SCHEDULE,
    control_condition,
    cosine_lr,
    diffusion_loss,
    noisy_latents_batch,
    object_pixel_weight,
    optimizer_step,
    set_lr,
    tokenize,
)

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_WORK_DIR = Path(__file__).resolve().parents[2] / "scratch" / "toy"
STAGES = ("data", "oracle", "vae", "latents", "clip", "unet", "decoder", "pipeline", "controlnet",
          "controlnet-normal", "controlnet-canny", "tiny-vae", "ldm", "lcm")
DEFAULT_STAGES = STAGES[:-1]  # the LCM-LoRA is distilled from the shipped UNet on demand: `--stage lcm`

UNET_LR = 2e-3  # peak; linear warm-up, cosine decay (the model is small: 2.5 M parameters)
CONTROLNET_LR = 1e-3
DERIVED_CONTROLNET_LR = 5e-4  # the normal and Canny nets start from the trained depth net: a fine-tune
CLIP_LR = 1e-3


@dataclass
class Budget:
    """Steps per stage; --max-minutes caps each stage in wall time too (a busy machine stops early)."""

    oracle_steps: int = 600
    clip_steps: int = 1200  # ~7 min; 800 left "circle" and "diamond" close: word-swap shape 0.71; 1200: 0.96
    clip_batch_size: int = 256  # contrastive: every other pair in the batch is a negative
    vae_steps: int = 2000
    unet_steps: int = 3000  # ~28 min; prompt adherence 0.900 (the bar), 0.945 for 5,000 steps of a 2-layer UNet
    decoder_steps: int = 1000  # ~4 min
    controlnet_steps: int = 1500  # ~9.5 min; held-out IoU 0.836 (an older UNet: 0.794 after 1,000 steps)
    max_minutes: float = 1e9
    batch_size: int = 64
    controlnet_batch_size: int = 32  # a ControlNet step runs the frozen UNet too: more, smaller steps
    # The normal and Canny ControlNets start from the depth one (the same object masks to steer; only what they read
    # changes), so they need fewer, smaller steps: a shared machine ran 8 s a step of batch 32 that day.
    derived_controlnet_steps: int = 600  # the normal net: held-out IoU 0.816
    # Thin 1-pixel edges are the hardest map to read at 64×64: 600 steps gave 0.778 IoU, 2,400 give 0.815 (10 min)
    canny_controlnet_steps: int = 2400
    derived_controlnet_batch_size: int = 16
    tiny_vae_steps: int = 1500
    # the shipped LoRA: the best of 600 steps scored every 100 (step 100), 2.8 min on 2 threads (0.25 s a step:
    # student, EMA target and the teacher's two passes); a 3,000-step run peaked at step 250 and drifted after
    lcm_steps: int = 600
    lcm_batch_size: int = 16
    lcm_target_ema: float = 0.95  # the LCM paper's EMA target; 0: the student is its own target (LCM-LoRA)
    lcm_full_unet: bool = False  # distil into every UNet weight (the LCM paper's way) instead of a LoRA
    # every N steps the student is scored (LCM_VALIDATION) and the best weights so far are kept; 0: the last are saved
    lcm_validate_every: int = 100
    n_scenes: int = 20000


# ------------------------------------------------------------------------------------------ models


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(  # 3 levels: 64x64x3 image <-> 16x16x4 latent (vae_scale_factor 4)
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=world.IMAGE_SIZE,
    )


def make_unet(cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(  # SD 1.5's block structure, shrunk channels and depth
        sample_size=world.IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        # Attention at 16x16 too, as SD has at its top level. Without it a step was 2.3x faster, but a full rebuild
        # missed the bars: prompt adherence 0.890 (size 0.86), ControlNet IoU 0.756 (see the weights README).
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        # SD has 2 (resnet + attention) layers a block. One makes a training step ~1.6x faster; in the ~60 min a
        # rebuild may take, 3,000 steps of it reach the bars (0.900, IoU 0.836), 5,000 steps of 2 layers (117 min)
        # reached 0.945 and 0.874.
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        # diffusers' (and SD 1.5's config) name for the number of heads: one head per block, 32-64 wide.
        # 4 heads of 8 channels followed about the same loss curve per step, but their CPU attention kernels made a
        # training step 1.6x slower (1.32 s against 0.81 s for batch 64): 1 head buys 25% more steps per hour.
        attention_head_dim=1,
        # SD's 32 groups over 320+ channels normalise 10 channels together; over 32 channels they would make
        # GroupNorm an InstanceNorm, which erases every per-channel offset (a background colour, the prompt's
        # share of a feature) before conv_out. 8 groups keep 4-8 channels per group.
        norm_num_groups=8,
    )


def make_tokenizer():
    return build_clip_tokenizer([*world.VOCABULARY, *DEFAULT_WORDS])


def text_encoder_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,  # 77, like SD
        hidden_act="quick_gelu",
        projection_dim=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_clip(tokenizer):
    """SD 1.5's text encoder is the text half of CLIP ViT-L/14: ours is the text half of a tiny CLIP."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    vision_config = CLIPVisionConfig(
        image_size=world.IMAGE_SIZE,
        patch_size=8,  # 64x64 -> 8x8 patches
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        hidden_act="quick_gelu",
        projection_dim=64,
    )
    config = CLIPConfig(
        text_config=text_encoder_config(tokenizer).to_dict(), vision_config=vision_config.to_dict(), projection_dim=64
    )
    return CLIPModel(config)


def make_controlnet(unet):
    from diffusers import ControlNetModel

    # 3 conditioning channels sizes = 2 downsamplings: 64x64 depth -> 16x16, the latent size
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64))


# ------------------------------------------------------------------------------------------ helpers


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1], the VAE's input range."""
    return images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Checkpointer:
    """A stage's training state (its modules, each under its keyword, the optimizer, the generator and the
    step), saved to `path` every `every_seconds` and at the end, and loaded back by `resume` after a kill."""

    def __init__(self, path: Path, optimizer, generator: torch.Generator, every_seconds: float = 180, **modules):
        self.path, self.optimizer, self.generator, self.modules = path, optimizer, generator, modules
        self.every_seconds, self.last = every_seconds, time.time()

    def resume(self) -> int:
        """Load the checkpoint, if any; returns the step to resume at (0 for a fresh start)."""
        if not self.path.exists():
            return 0
        log(f"resuming from {self.path}")
        state = torch.load(self.path, weights_only=False)
        for key, module in self.modules.items():
            module.load_state_dict(state[key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        return state["step"]

    def save(self, step: int) -> None:
        state = {key: module.state_dict() for key, module in self.modules.items()}
        state |= {"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(), "step": step}
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)  # atomic: a kill mid-save never corrupts the checkpoint
        self.last = time.time()

    def maybe_save(self, step: int) -> None:
        if time.time() - self.last > self.every_seconds:
            self.save(step)


def train_loop(
    name: str,
    steps: int,
    step_fn: Callable[[int, float], float],
    checkpointer: Checkpointer,
    max_minutes: float,
    after_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Run step_fn(step, progress) -> loss from the checkpoint's step (or 0) until `steps` or `max_minutes`,
    whichever comes first, with progress, checkpoints and a smoothed loss. `progress` in [0, 1) is the further
    along of the two, so learning-rate schedules still anneal fully when a busy machine hits the cap."""
    start_step = checkpointer.resume()
    started = time.time()
    running = None
    losses = []
    bar = tqdm(range(start_step, steps), desc=name, initial=start_step, total=steps, mininterval=20)
    for step in bar:
        progress = max(step / steps, (time.time() - started) / (max_minutes * 60))
        if progress >= 1.0:
            log(f"{name}: time cap of {max_minutes} min reached at step {step}/{steps}")
            break
        loss = step_fn(step, progress)
        losses.append(loss)
        running = loss if running is None else 0.98 * running + 0.02 * loss
        bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        checkpointer.maybe_save(step + 1)
        if after_step is not None:
            after_step(step + 1)
    bar.close()
    checkpointer.save(start_step + len(losses))
    log(f"{name}: done in {(time.time() - started) / 60:.1f} min, smoothed loss {running}")
    return losses


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled index batches over range(n)."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


# ------------------------------------------------------------------------------------------- stages


def stage_data(work: Path, budget: Budget) -> None:
    path = work / "data.pt"
    if path.exists():
        return
    scenes = world.make_scenes(budget.n_scenes, seed=0, split="train", max_objects=2)
    images, depths = [], []
    for scene in tqdm(scenes, desc="render", mininterval=20):
        image, depth = world.render(scene)
        images.append(image)
        depths.append(depth)
    data = {
        "images": torch.from_numpy(np.stack(images)),  # (N, 64, 64, 3) uint8
        "depths": torch.from_numpy(np.stack(depths)).half(),  # (N, 64, 64)
        "captions": [s.caption for s in scenes],
        "seeds": [s.seed for s in scenes],
        "n_objects": [len(s.objects) for s in scenes],
    }
    torch.save(data, path)
    log(f"rendered {len(scenes)} scenes -> {path}")


def augment_for_oracle(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mimic generated images: pixel noise and a slight blur, so the oracle reads samples as reliably
    as rendered scenes. (N, 3, H, W) in [0, 1] -> same."""
    n = len(images)
    noise_level = torch.rand(n, 1, 1, 1, generator=generator) * 0.06
    images = images + noise_level * torch.randn(images.shape, generator=generator)
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    use_blur = (torch.rand(n, 1, 1, 1, generator=generator) < 0.3).float()
    return (use_blur * blurred + (1 - use_blur) * images).clamp(0, 1)


def stage_oracle(work: Path, budget: Budget) -> None:
    if (WEIGHTS_DIR / "oracle" / "model.safetensors").exists():
        return
    torch.manual_seed(0)
    data = torch.load(work / "data.pt", weights_only=False)
    scenes = [
        world.make_scene(seed, "train", n) for seed, n in zip(data["seeds"], data["n_objects"])
    ]
    labels = scene_labels(scenes)
    oracle = Oracle()
    optimizer = torch.optim.AdamW(oracle.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    index_batches = batches(len(scenes), budget.batch_size, generator)
    checkpointer = Checkpointer(work / "oracle.ckpt", optimizer, generator, oracle=oracle)

    def step_fn(step: int, progress: float) -> float:
        set_lr(optimizer, 2e-3 * cosine_lr(progress))
        idx = next(index_batches)
        images = data["images"][idx].permute(0, 3, 1, 2).float() / 255.0  # (B, 3, 64, 64) in [0, 1]
        loss = oracle_loss(oracle(augment_for_oracle(images, generator)), {k: v[idx] for k, v in labels.items()})
        return optimizer_step(optimizer, loss, max_grad_norm=None)

    train_loop("oracle", budget.oracle_steps, step_fn, checkpointer, budget.max_minutes)
    save_oracle(oracle, WEIGHTS_DIR / "oracle")
    log(f"oracle saved to {WEIGHTS_DIR / 'oracle'}")


def vae_loss(vae, images: torch.Tensor, object_mask: torch.Tensor, object_weight: float = 10.0) -> torch.Tensor:
    """Reconstruction (L1 + MSE) + a small KL, as in SD's VAE minus the perceptual/GAN terms.

    Object pixels (a tenth of an image) weigh `object_weight` times more, or the few hundred CPU steps
    go to the background and objects come out in the wrong colour. Decodes the posterior mean: sampled
    latents (std ~1 at init) drown the colours early on, and the UNet is trained on means anyway."""
    posterior = vae.encode(images).latent_dist
    reconstruction = vae.decode(posterior.mode()).sample
    error = reconstruction - images  # (B, 3, h, w)
    weight = 1.0 + (object_weight - 1.0) * object_mask[:, None].float()  # (B, 1, h, w)
    pixel_loss = (weight * (error.abs() + error.pow(2))).sum() / (weight.sum() * images.shape[1])
    return pixel_loss + 1e-6 * posterior.kl().mean()


def object_crops(
    images: torch.Tensor, masks: torch.Tensor, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) images and (N, H, W) masks -> one random size×size crop of each, vertically placed
    where the world puts objects, so that most crops hold an object (4x cheaper VAE steps at size=H/2)."""
    n, _, h, w = images.shape
    lo, hi = int(world.VERTICAL_RANGE[0] * h - size / 2), int(world.VERTICAL_RANGE[1] * h - size / 2)
    ys = torch.randint(max(0, lo), min(h - size, hi) + 1, (n,), generator=generator)
    xs = torch.randint(0, w - size + 1, (n,), generator=generator)
    crops = [(im[:, y : y + size, x : x + size], m[y : y + size, x : x + size])
             for im, m, y, x in zip(images, masks, ys, xs)]
    return torch.stack([c[0] for c in crops]), torch.stack([c[1] for c in crops])


def stage_vae(work: Path, budget: Budget) -> list[float]:
    if (work / "vae" / "config.json").exists():
        return []

    torch.manual_seed(0)
    data = torch.load(work / "data.pt", weights_only=False)
    vae = make_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    checkpointer = Checkpointer(work / "vae.ckpt", optimizer, generator, model=vae)
    index_batches = batches(len(data["images"]), budget.batch_size // 2, generator)

    def step_fn(step: int, progress: float) -> float:
        set_lr(optimizer, 2e-3 * cosine_lr(progress, warmup=0.02))
        idx = next(index_batches)
        images = to_model_range(data["images"][idx])  # (B, 3, 64, 64)
        masks = data["depths"][idx].float() > world.OBJECT_DEPTH_THRESHOLD  # (B, 64, 64) object pixels
        crops, crop_masks = object_crops(images, masks, world.IMAGE_SIZE // 2, generator)  # (B, 3, 32, 32)
        return optimizer_step(optimizer, vae_loss(vae, crops, crop_masks))

    losses = train_loop("vae", budget.vae_steps, step_fn, checkpointer, budget.max_minutes)
    # SD's scaling_factor makes latents unit-variance for the UNet: measure it on the training set.
    with torch.inference_mode():
        sample = to_model_range(data["images"][:512])
        latents = vae.encode(sample).latent_dist.mean  # (512, 4, 16, 16)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.save_pretrained(work / "vae")
    log(f"vae saved, scaling_factor={vae.config.scaling_factor:.4f}")
    return losses


def stage_decoder(work: Path, budget: Budget) -> list[float]:
    """Sharpen the VAE decoder on full images, and make it robust to slightly-off latents, with the encoder
    (hence the latent space) frozen: it can run beside the UNet and ControlNet stages. Loss weighted on
    and around objects against halos."""
    if (work / "vae_decoder" / "config.json").exists():
        return []
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    data = torch.load(work / "data.pt", weights_only=False)
    vae = AutoencoderKL.from_pretrained(work / "vae")
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    optimizer = torch.optim.AdamW(params, lr=5e-4)
    generator = torch.Generator().manual_seed(4)
    checkpointer = Checkpointer(work / "decoder.ckpt", optimizer, generator, model=vae)
    index_batches = batches(len(data["images"]), budget.batch_size // 4, generator)

    def step_fn(step: int, progress: float) -> float:
        set_lr(optimizer, 5e-4 * cosine_lr(progress, warmup=0.02))
        idx = next(index_batches)
        images = to_model_range(data["images"][idx])  # (B, 3, 64, 64)
        masks = (data["depths"][idx].float() > world.OBJECT_DEPTH_THRESHOLD).float()[:, None]  # (B, 1, 64, 64)
        near_objects = torch.nn.functional.max_pool2d(masks, 5, stride=1, padding=2)  # objects + 2 px rim
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mode()  # (B, 4, 16, 16)
        # Denoised latents are never exact: noise of up to 0.2 (in the UNet's scaled units) teaches the
        # decoder to still give flat colours and clean edges for them.
        noise_level = 0.2 * torch.rand(len(latents), 1, 1, 1, generator=generator) / vae.config.scaling_factor
        latents = latents + noise_level * torch.randn(latents.shape, generator=generator)
        error = vae.decode(latents).sample - images
        weight = 1.0 + 9.0 * near_objects
        loss = (weight * (error.abs() + error.pow(2))).sum() / (weight.sum() * 3)
        return optimizer_step(optimizer, loss)

    losses = train_loop("decoder", budget.decoder_steps, step_fn, checkpointer, budget.max_minutes)
    vae.save_pretrained(work / "vae_decoder")
    log("vae with sharpened decoder saved")
    return losses


def stage_latents(work: Path, budget: Budget) -> None:
    path = work / "latents.pt"
    if path.exists():
        return
    from diffusers import AutoencoderKL

    data = torch.load(work / "data.pt", weights_only=False)
    # the shipped VAE when the work dir has none: its encoder is the vae stage's, frozen since (see stage_decoder)
    vae_dir = work / "vae" if (work / "vae" / "config.json").exists() else WEIGHTS_DIR / "sd" / "vae"
    vae = AutoencoderKL.from_pretrained(vae_dir, dtype=torch.float32).eval()
    means, stds = [], []
    with torch.inference_mode():
        for start in tqdm(range(0, len(data["images"]), 256), desc="encode", mininterval=20):
            dist = vae.encode(to_model_range(data["images"][start : start + 256])).latent_dist
            means.append(dist.mean)  # (b, 4, 16, 16)
            stds.append(dist.std)
    torch.save({"mean": torch.cat(means), "std": torch.cat(stds)}, path)
    log(f"latents cached -> {path}")


def drop_captions(token_ids: torch.Tensor, empty_ids: torch.Tensor, p: float, generator) -> torch.Tensor:
    """Replace a fraction p of the captions by the empty prompt "", so classifier-free guidance works."""
    drop = torch.rand(len(token_ids), generator=generator) < p
    return torch.where(drop[:, None], empty_ids[None, :], token_ids)


def caption_codes(scenes: list[world.Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each scene as attribute codes, (N, 9) each: what it is (`full`) and what its caption says
    (`stated`, -1 where the caption is silent; never for positions, which the world's captions imply).
    Per object slot: shape, colour, size, position (-2 for a missing second object); then the background."""
    names = {"shape": world.SHAPES, "colour": tuple(world.COLOURS), "size": tuple(world.SIZES),
             "position": tuple(world.POSITIONS)}
    full, stated = [], []
    for scene in scenes:
        said = {"shape", "colour", "position", *scene.mentions}  # an unstated position is implied (see world)
        is_codes, says_codes = [], []
        for k in range(2):
            if k < len(scene.objects):
                codes = {name: values.index(getattr(scene.objects[k], name)) for name, values in names.items()}
                is_codes += codes.values()
                says_codes += [code if name in said else -1 for name, code in codes.items()]
            else:
                is_codes += [-2] * 4
                says_codes += [-2] * 4
        background = tuple(world.BACKGROUNDS).index(scene.background)
        full.append([*is_codes, background])
        stated.append([*says_codes, background if "background" in said else -1])
    return torch.tensor(full), torch.tensor(stated)


def caption_matches(stated: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """(B, 9) stated codes of B captions, (B, 9) full codes of B images -> (B, B) bool: caption i
    describes image j. Captions state only some attributes, so "a red circle" fits many images."""
    return ((stated[:, None] == -1) | (stated[:, None] == full[None, :])).all(-1)


def clip_loss(logits_per_text: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over a batch, with every true pair a target (not just the diagonal)."""
    targets = matches.float()  # (B captions, B images)

    def cross_entropy(logits, targets):
        return -(targets / targets.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()

    return (cross_entropy(logits_per_text, targets) + cross_entropy(logits_per_text.T, targets.T)) / 2


@torch.no_grad()
def retrieval_accuracy(clip, tokenizer, n: int = 256, seed: int = 0) -> float:
    """On n held-out scenes: share of captions whose best-scoring image is one they describe."""
    scenes = world.make_scenes(n, seed=seed, split="heldout", max_objects=2)
    images = torch.from_numpy(np.stack([world.render(scene)[0] for scene in scenes]))
    clip.eval()
    logits = clip(input_ids=tokenize(tokenizer, [s.caption for s in scenes]),
                  pixel_values=to_model_range(images)).logits_per_text  # (n, n)
    clip.train()
    full, stated = caption_codes(scenes)
    best = logits.argmax(1)
    return caption_matches(stated, full)[torch.arange(n), best].float().mean().item()


SWAPPABLE_WORDS = {"shape": world.SHAPES, "colour": tuple(world.COLOURS), "size": tuple(world.SIZES),
                   "background": tuple(world.BACKGROUNDS)}


@torch.no_grad()
def word_swap_accuracy(clip, tokenizer, n: int = 256, seed: int = 0) -> dict[str, float]:
    """On n held-out single-object scenes, per attribute: the share of images that score their own caption
    above every copy of it with that attribute's word swapped ("a red circle" against "a red square", "a red
    triangle", "a red diamond"). Retrieval accuracy can stay high while the text encoder merges two words; the
    UNet cannot draw a difference the encoder does not carry, so this is the text encoder's check per word."""
    scenes = world.make_scenes(n, seed=seed, split="heldout", max_objects=1)
    pixel_values = to_model_range(torch.from_numpy(np.stack([world.render(scene)[0] for scene in scenes])))
    clip.eval()
    results = {}
    for attribute, values in SWAPPABLE_WORDS.items():
        picked, captions = [], []  # scenes whose caption states the attribute; per scene its caption, then the swaps
        for i, scene in enumerate(scenes):
            words = scene.caption.split()
            value = scene.background if attribute == "background" else getattr(scene.objects[0], attribute)
            if value in words:
                picked.append(i)
                captions += [" ".join(other if w == value else w for w in words)
                             for other in (value, *(v for v in values if v != value))]
        logits = clip(input_ids=tokenize(tokenizer, captions), pixel_values=pixel_values).logits_per_text  # (P*k, n)
        own = logits.view(len(picked), len(values), n)[torch.arange(len(picked)), :, picked]  # (P, k) own image
        results[attribute] = (own[:, 0] > own[:, 1:].max(1).values).float().mean().item()
    clip.train()
    return results


def stage_clip(work: Path, budget: Budget) -> list[float]:
    """Train a tiny CLIP on the world's (image, caption) pairs and keep its text half: SD's text encoder
    comes frozen from CLIP too. (Trained jointly with the UNet instead, the text encoder learned the easy
    words first and then merged the rest: "circle", "square" and "diamond" ended up the same vector.)"""
    if (work / "text_encoder" / "config.json").exists():
        return []
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    data = torch.load(work / "data.pt", weights_only=False)
    scenes = [world.make_scene(seed, "train", n) for seed, n in zip(data["seeds"], data["n_objects"])]
    full, stated = caption_codes(scenes)  # (N, 9) each
    tokenizer = make_tokenizer()
    token_ids = tokenize(tokenizer, data["captions"])  # (N, 77)
    # CLIP's text attention is causal and its pooled output is read at the first end token, so the padding
    # after it changes nothing in the loss: cut it (19 of 77 positions; a step 2x faster, same numbers).
    longest = int(((token_ids == tokenizer.eos_token_id).int().argmax(1) + 1).max())
    token_ids = token_ids[:, :longest]  # (N, longest)
    clip = make_clip(tokenizer)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=CLIP_LR, weight_decay=0.1)
    generator = torch.Generator().manual_seed(5)
    checkpointer = Checkpointer(work / "clip.ckpt", optimizer, generator, clip=clip)
    index_batches = batches(len(token_ids), budget.clip_batch_size, generator)

    def step_fn(step: int, progress: float) -> float:
        set_lr(optimizer, CLIP_LR * cosine_lr(progress))
        idx = next(index_batches)
        pixel_values = to_model_range(data["images"][idx])  # (B, 3, 64, 64)
        logits_per_text = clip(input_ids=token_ids[idx], pixel_values=pixel_values).logits_per_text  # (B, B)
        loss = clip_loss(logits_per_text, caption_matches(stated[idx], full[idx]))
        return optimizer_step(optimizer, loss)

    losses = train_loop("clip", budget.clip_steps, step_fn, checkpointer, budget.max_minutes)
    log(f"clip: held-out caption -> image top-1 accuracy {retrieval_accuracy(clip, tokenizer):.3f}")
    swaps = word_swap_accuracy(clip, tokenizer)
    log("clip: held-out image prefers its caption to one word swapped: "
        + ", ".join(f"{attribute} {share:.3f}" for attribute, share in swaps.items()))
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    text_encoder.save_pretrained(work / "text_encoder")
    tokenizer.save_pretrained(work / "tokenizer")
    log("clip text encoder saved")
    return losses


def stage_unet(work: Path, budget: Budget, caption_dropout: float = 0.1) -> list[float]:
    if (work / "unet" / "config.json").exists():
        return []
    from diffusers import AutoencoderKL, DDPMScheduler
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    data = torch.load(work / "data.pt", weights_only=False)
    latents = torch.load(work / "latents.pt")
    scaling_factor = AutoencoderKL.load_config(work / "vae")["scaling_factor"]
    tokenizer = CLIPTokenizer.from_pretrained(work / "tokenizer")
    token_ids = tokenize(tokenizer, data["captions"])  # (N, 77)
    empty_ids = tokenize(tokenizer, [""])[0]  # (77,)
    text_encoder = CLIPTextModel.from_pretrained(work / "text_encoder").eval().requires_grad_(False)
    unet = make_unet(text_encoder.config.hidden_size)
    scheduler = DDPMScheduler(**SD_SCHEDULE)
    params = list(unet.parameters())
    optimizer = torch.optim.AdamW(params, lr=UNET_LR, weight_decay=1e-2)
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True, power=3 / 4)
    generator = torch.Generator().manual_seed(2)
    checkpointer = Checkpointer(work / "unet.ckpt", optimizer, generator, unet=unet, ema=ema)
    index_batches = batches(len(token_ids), budget.batch_size, generator)

    def step_fn(step: int, progress: float) -> float:
        set_lr(optimizer, UNET_LR * cosine_lr(progress))
        idx = next(index_batches)
        noisy, target, timesteps = noisy_latents_batch(latents, idx, scaling_factor, scheduler, generator)
        ids = drop_captions(token_ids[idx], empty_ids, caption_dropout, generator)
        with torch.no_grad():
            prompt_embeds = text_encoder(ids)[0]  # (B, 77, hidden)
        model_pred = unet(noisy, timesteps, encoder_hidden_states=prompt_embeds).sample  # (B, 4, 16, 16)
        pixel_weight = object_pixel_weight(data["depths"][idx], model_pred.shape[-1], OBJECT_LOSS_WEIGHT)
        loss = optimizer_step(optimizer, diffusion_loss(model_pred, target, pixel_weight))
        ema.step(params)
        return loss

    losses = train_loop("unet", budget.unet_steps, step_fn, checkpointer, budget.max_minutes)
    ema.copy_to(params)  # ship the EMA weights
    unet.save_pretrained(work / "unet")
    log("unet saved (EMA weights)")
    return losses


def stage_pipeline(work: Path, budget: Budget) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    vae_dir = work / "vae_decoder" if (work / "vae_decoder").exists() else work / "vae"
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae_dir),
        text_encoder=CLIPTextModel.from_pretrained(work / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(work / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(work / "unet"),
        scheduler=DDIMScheduler(**SD_DDIM_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # Ship fp16 weights (half the bytes; diffusers upcasts them to the model's float32 on load). The
    # text encoder stays float32 on disk (transformers would load fp16 as fp16) but is rounded to fp16
    # values, so the fp16 single-file export holds exactly the same numbers as this folder.
    pipe.unet.to(torch.float16)
    pipe.vae.to(torch.float16)
    pipe.text_encoder.to(torch.float16).to(torch.float32)
    for model in (pipe.unet, pipe.vae):  # from_pretrained stamped the work dir in: the shipped config names none
        model.register_to_config(_name_or_path=None)
    target = WEIGHTS_DIR / "sd"
    if target.exists():
        shutil.rmtree(target)
    pipe.save_pretrained(target, safe_serialization=True)
    log(f"pipeline saved -> {target}")


CONTROL_SEEDS = {"depth": 3, "normal": 6, "canny": 7}


def stage_controlnet(work: Path, budget: Budget, caption_dropout: float = 0.1, kind: str = "depth") -> list[float]:
    """A ControlNet for `kind` (`helpers.core.pictures.CONTROL_KINDS`) on the frozen shipped pipeline. Depth starts
    from the UNet's encoder (`ControlNetModel.from_unet`), normal and Canny from the trained depth net."""
    target = WEIGHTS_DIR / f"controlnet-{kind}"
    if (target / "config.json").exists():
        return []
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    stage_data(work, budget)  # no-ops when the work dir has them (a full run made them already)
    stage_latents(work, budget)
    torch.manual_seed(0)
    sd = WEIGHTS_DIR / "sd"
    data = torch.load(work / "data.pt", weights_only=False)
    latents = torch.load(work / "latents.pt")
    scaling_factor = AutoencoderKL.load_config(sd / "vae")["scaling_factor"]
    tokenizer = CLIPTokenizer.from_pretrained(sd / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(sd / "text_encoder").eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(sd / "unet").eval().requires_grad_(False)
    derived = kind != "depth"
    if derived:
        depth_dir = WEIGHTS_DIR / "controlnet-depth"
        if not (depth_dir / "config.json").exists():
            raise FileNotFoundError(f"the {kind} ControlNet starts from the depth one, missing at {depth_dir}: "
                                    "run the controlnet stage first")
        controlnet = ControlNetModel.from_pretrained(depth_dir, dtype=torch.float32)
    else:
        controlnet = make_controlnet(unet)
    lr = DERIVED_CONTROLNET_LR if derived else CONTROLNET_LR
    steps = {"depth": budget.controlnet_steps, "canny": budget.canny_controlnet_steps}.get(
        kind, budget.derived_controlnet_steps)
    batch_size = budget.derived_controlnet_batch_size if derived else budget.controlnet_batch_size
    scheduler = DDPMScheduler(**SD_SCHEDULE)
    token_ids = tokenize(tokenizer, data["captions"])
    empty_ids = tokenize(tokenizer, [""])[0]
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(CONTROL_SEEDS[kind])
    checkpoint = work / ("controlnet.ckpt" if kind == "depth" else f"controlnet-{kind}.ckpt")
    checkpointer = Checkpointer(checkpoint, optimizer, generator, controlnet=controlnet)
    index_batches = batches(len(token_ids), batch_size, generator)

    def step_fn(step: int, progress: float) -> float:
        set_lr(optimizer, lr * cosine_lr(progress))
        idx = next(index_batches)
        noisy, target, timesteps = noisy_latents_batch(latents, idx, scaling_factor, scheduler, generator)
        ids = drop_captions(token_ids[idx], empty_ids, caption_dropout, generator)
        with torch.no_grad():
            prompt_embeds = text_encoder(ids)[0]  # (B, 77, hidden)
        control = control_condition(data["depths"][idx], kind)  # (B, 64, 64) -> (B, 3, 64, 64)
        down_residuals, mid_residual = controlnet(
            noisy, timesteps, encoder_hidden_states=prompt_embeds, controlnet_cond=control, return_dict=False
        )
        model_pred = unet(
            noisy, timesteps, encoder_hidden_states=prompt_embeds,
            down_block_additional_residuals=down_residuals, mid_block_additional_residual=mid_residual,
        ).sample
        pixel_weight = object_pixel_weight(data["depths"][idx], model_pred.shape[-1], OBJECT_LOSS_WEIGHT)
        loss = diffusion_loss(model_pred, target, pixel_weight)  # object masks are what control must get right
        return optimizer_step(optimizer, loss)

    name = "controlnet" if kind == "depth" else f"controlnet-{kind}"
    losses = train_loop(name, steps, step_fn, checkpointer, budget.max_minutes)
    controlnet.register_to_config(_name_or_path=None)  # from_pretrained stamped the depth folder in: ship none
    controlnet.to(torch.float16).save_pretrained(target, safe_serialization=True)  # upcast on load
    log(f"controlnet saved -> {target}")
    return losses


TINY_VAE_CHANNELS = 32  # TAESD has 64 channels and 3 blocks a level; the toy's VAE is 16/32/64 wide, 1 block a level


def make_tiny_vae():
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(  # the toy VAE's 4x downsampling: 3 levels, upsampling by 2 between them
        encoder_block_out_channels=(TINY_VAE_CHANNELS,) * 3, decoder_block_out_channels=(TINY_VAE_CHANNELS,) * 3,
        num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1), latent_channels=4, upsampling_scaling_factor=2,
        scaling_factor=1.0,  # like TAESD: it reads and writes the UNet's scaled latents directly
    )


def stage_tiny_vae(work: Path, budget: Budget) -> list[float]:
    """Distil an AutoencoderTiny from the shipped VAE. Its encoder matches the VAE's scaled latent means; its decoder
    turns those latents, with noise of up to 0.2 like stage_decoder's, into the training pictures (loss weighted on
    and around objects). One loss, both halves: the decoder never sees the tiny encoder's latents."""
    target = WEIGHTS_DIR / "tiny-vae"
    if (target / "config.json").exists():
        return []
    from diffusers import AutoencoderKL

    stage_data(work, budget)
    stage_latents(work, budget)
    torch.manual_seed(0)
    data = torch.load(work / "data.pt", weights_only=False)
    latents = torch.load(work / "latents.pt")["mean"]  # (N, 4, 16, 16), unscaled posterior means
    latents = latents * AutoencoderKL.load_config(WEIGHTS_DIR / "sd" / "vae")["scaling_factor"]  # the UNet's units
    tiny = make_tiny_vae()
    optimizer = torch.optim.AdamW(tiny.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(7)
    checkpointer = Checkpointer(work / "tiny-vae.ckpt", optimizer, generator, model=tiny)
    index_batches = batches(len(latents), budget.batch_size // 2, generator)

    def step_fn(step: int, progress: float) -> float:
        set_lr(optimizer, 2e-3 * cosine_lr(progress, warmup=0.02))
        idx = next(index_batches)
        images = to_model_range(data["images"][idx])  # (B, 3, 64, 64)
        masks = (data["depths"][idx].float() > world.OBJECT_DEPTH_THRESHOLD).float()[:, None]  # (B, 1, 64, 64)
        weight = 1.0 + 9.0 * torch.nn.functional.max_pool2d(masks, 5, stride=1, padding=2)  # objects + 2 px rim
        noise_level = 0.2 * torch.rand(len(idx), 1, 1, 1, generator=generator)
        noisy = latents[idx] + noise_level * torch.randn(latents[idx].shape, generator=generator)
        error = tiny.decode(noisy).sample - images
        decoder_loss = (weight * (error.abs() + error.pow(2))).sum() / (weight.sum() * 3)
        encoder_loss = torch.nn.functional.mse_loss(tiny.encode(images).latents, latents[idx])
        return optimizer_step(optimizer, decoder_loss + encoder_loss)

    losses = train_loop("tiny-vae", budget.tiny_vae_steps, step_fn, checkpointer, budget.max_minutes)
    tiny.register_to_config(_name_or_path=None)
    tiny.to(torch.float16).save_pretrained(target, safe_serialization=True)  # as the other weights; upcast on load
    config = json.loads((target / "config.json").read_text())
    config.pop("block_out_channels")  # diffusers' save adds it and loading then warns that it is not expected
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    log(f"tiny VAE saved -> {target}")
    return losses


def stage_ldm(work: Path, budget: Budget) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(WEIGHTS_DIR / "sd", local_files_only=True)
    path = WEIGHTS_DIR / "toy-sd-ldm.safetensors"
    export_ldm_checkpoint(pipe, path, dtype=torch.float16)  # the folder's weights are fp16 values too
    log(f"single-file LDM checkpoint -> {path}")


# ----------------------------------------------------------------------------------- latent consistency

# Latent consistency distillation (Luo et al. 2023) as LCM-LoRA trains it for SD 1.5 (diffusers'
# examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py): a LoRA on the teacher UNet learns to map any
# point of the teacher's guided probability-flow ODE to its end, so LCMScheduler samples in 1-4 steps.
# The skipping-step DDIM solver's grid, k = 1000 // 50 = 20 timesteps a step: LCMScheduler's original_inference_steps.
LCM_DDIM_STEPS = 50
# Guidance folded into the student, in diffusers' (Imagen) form: uncond + 7.5 (cond - uncond), the baseline's scale.
# LCM-LoRA samples w from a range without conditioning the student on it (the UNet has no w embedding); one w, the one
# the toy is sampled at, spends the short CPU budget on the guidance that is asked for.
LCM_GUIDANCE_SCALE = 7.5
LCM_TIMESTEP_SCALING = 10.0  # LCMScheduler's timestep_scaling: c_skip(0) = 1, c_out(0) = 0, ~(0, 1) from t = 20 on
LCM_HUBER_C = 0.001  # the LCM paper's pseudo-Huber constant
LCM_LR = 1e-3  # LoRA only (SD 1.5's LCM-LoRA: 1e-4 at rank 64, on a teacher 500x bigger)
LCM_LORA_RANK = 16  # the toy's layers are 32-64 wide (SD's LCM-LoRA: rank 64 on 320-1280)
LCM_LORA_FILE = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes and load_lora_weights reads
LCM_FULL_LR = 3e-4  # every UNet weight trains: a smaller step than the LoRA's (the UNet itself trained at 2e-3)
# Validation while distilling: held-out scenes other than notebook 07's (sample_scenes(64, seed=0)), sampled as 07's lcm
# rungs sample them (LCMScheduler, guidance 1, the depth ControlNet), scored by the toy oracle's prompt adherence.
LCM_VALIDATION = {"n_prompts": 64, "seed": 1, "steps": (4, 2, 1), "controlnet": "depth"}


def lcm_boundary_scalings(timesteps: torch.Tensor, timestep_scaling: float = LCM_TIMESTEP_SCALING,
                          sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip and c_out of the consistency function f(x, t) = c_skip x + c_out x0(x, t), as
    `LCMScheduler.get_scalings_for_boundary_condition_discrete` computes them: f(x, 0) = x (the boundary)."""
    scaled = timestep_scaling * timesteps.double()
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip.float(), c_out.float()


def _per_sample(values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    return values[timesteps].view(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1)


def predicted_x0_and_noise(model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor,
                           alphas_cumprod: torch.Tensor, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latents and the noise a UNet output implies at `timesteps` (LCMScheduler.step's step 4 and
    DDIMScheduler's). v-prediction (the toy): x0 = sqrt(a) x - sqrt(1 - a) v, eps = sqrt(a) v + sqrt(1 - a) x, which
    stays defined at zero terminal SNR (a = 0: x0 = -v, eps = x); epsilon (SD 1.5) divides by sqrt(a)."""
    alpha, sigma = _per_sample(alphas_cumprod, timesteps).sqrt(), _per_sample(1 - alphas_cumprod, timesteps).sqrt()
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha, model_output
    raise ValueError(f"prediction_type={prediction_type!r}: the LCM stage knows v_prediction and epsilon")


def consistency_function(model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor,
                         alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t): what LCMScheduler.step returns as `denoised`."""
    c_skip, c_out = lcm_boundary_scalings(timesteps)
    x0, _ = predicted_x0_and_noise(model_output, timesteps, sample, alphas_cumprod, prediction_type)
    return c_skip.view(-1, 1, 1, 1) * sample + c_out.view(-1, 1, 1, 1) * x0


def lcm_solver_timesteps(num_train_timesteps: int = 1000, ddim_steps: int = LCM_DDIM_STEPS) -> torch.Tensor:
    """The DDIM solver's grid, [k - 1, 2k - 1, ..., T - 1] (k = T // ddim_steps): the same timesteps LCMScheduler
    picks its 1-4 inference steps from, so the first is t = 999, pure noise on the zero-SNR schedule."""
    k = num_train_timesteps // ddim_steps
    return torch.arange(1, ddim_steps + 1) * k - 1


def ddim_solver_step(x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod_prev: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step of the teacher's ODE to the previous grid point, from its x0 and noise estimates."""
    alpha_prev = alphas_cumprod_prev.view(-1, 1, 1, 1)
    return alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * noise


def lcm_targets_step(student, teacher, clean: torch.Tensor, prompt_embeds: torch.Tensor, uncond_embeds: torch.Tensor,
                     alphas_cumprod: torch.Tensor, prediction_type: str, generator: torch.Generator,
                     guidance_scale: float = LCM_GUIDANCE_SCALE, target_net=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One consistency-distillation sample: (the student's f(x_{t+k}, t+k), the stop-gradient target f(x_t, t) at the
    teacher's guided DDIM step from x_{t+k}). The target network is `target_net` (an EMA copy, as in the LCM paper) or,
    by default, the student itself without gradients, as in LCM-LoRA."""
    target_net = student if target_net is None else target_net
    grid = lcm_solver_timesteps(len(alphas_cumprod))
    k = int(grid[1] - grid[0])
    index = torch.randint(0, len(grid), (len(clean),), generator=generator)
    start = grid[index]  # t_{n+k}, where the student is asked
    end = (start - k).clamp(min=0)  # t_n, one solver step later; the boundary t = 0 for the first grid point
    noise = torch.randn(clean.shape, generator=generator)
    a = _per_sample(alphas_cumprod, start)
    noisy = a.sqrt() * clean + (1 - a).sqrt() * noise  # DDPM forward process, as scheduler.add_noise
    prediction = consistency_function(student(noisy, start, encoder_hidden_states=prompt_embeds).sample, start, noisy,
                                      alphas_cumprod, prediction_type)
    with torch.no_grad():
        both = teacher(torch.cat([noisy, noisy]), torch.cat([start, start]),
                       encoder_hidden_states=torch.cat([uncond_embeds, prompt_embeds])).sample
        x0, eps = predicted_x0_and_noise(both, torch.cat([start, start]), torch.cat([noisy, noisy]), alphas_cumprod,
                                         prediction_type)
        (x0_uncond, x0_cond), (eps_uncond, eps_cond) = x0.chunk(2), eps.chunk(2)
        # guidance on x0 and noise alike (the LCM paper's w = guidance_scale - 1 on the conditional side)
        x0 = x0_uncond + guidance_scale * (x0_cond - x0_uncond)
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        prev_alphas = torch.where(index > 0, alphas_cumprod[grid[(index - 1).clamp(min=0)]], alphas_cumprod[0])
        x_prev = ddim_solver_step(x0, eps, prev_alphas)
        target = consistency_function(target_net(x_prev, end, encoder_hidden_states=prompt_embeds).sample, end, x_prev,
                                      alphas_cumprod, prediction_type)
    return prediction, target


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, pixel_weight: torch.Tensor,
                 c: float = LCM_HUBER_C) -> torch.Tensor:
    """The LCM paper's loss, sqrt(d^2 + c^2) - c, weighted per latent pixel ((B, 1, h, w)) like the UNet's."""
    error = ((prediction - target).pow(2) + c**2).sqrt() - c  # (B, 4, h, w)
    return (pixel_weight * error).sum() / (pixel_weight.sum() * prediction.shape[1])


def add_lcm_lora(unet, rank: int = LCM_LORA_RANK) -> list[torch.nn.Parameter]:
    """A LoRA adapter (peft, diffusers' `add_adapter`) on every block layer; returns its trainable parameters.
    lora_alpha = rank (scale 1), as LCM-LoRA: the saved file needs no alpha to load at the trained strength."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LCM_LORA_TARGETS, init_lora_weights=True))
    return [param for param in unet.parameters() if param.requires_grad]


def save_lcm_lora(unet, target: Path) -> None:
    """The adapter as `pipe.load_lora_weights(target)` reads it (fp16, like the other toy weights). The keys stay
    peft's (`...to_q.lora_A.weight`): diffusers 0.42 saves `convert_state_dict_to_diffusers`'s older names
    (`...to_q.lora.down.weight`) but loads them back without any attention layer's LoRA, silently (a warning)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    layers = {key: value.to(torch.float16) for key, value in get_peft_model_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(target, unet_lora_layers=layers, weight_name=LCM_LORA_FILE,
                                              safe_serialization=True)


class LCMValidation:
    """Scores the student every `every` steps on LCM_VALIDATION (the toy oracle's prompt adherence at each step
    count) and keeps a copy of the trainable weights with the best mean: a consistency distillation can drift away
    from its best few-step pictures while its loss still falls. `history` holds every score."""

    def __init__(self, student, params: list[torch.nn.Parameter], every: int):
        self.student, self.params, self.every = student, params, every
        self.history: list[dict] = []
        self.best: tuple[float, list[torch.Tensor]] | None = None
        self.last_step = 0
        self._pipe = self._scenes = self._control = None

    def __call__(self, step: int) -> None:
        self.last_step = step
        if self.every and step % self.every == 0:
            self.score(step)

    def score(self, step: int) -> None:
        self.record({"step": step, **self.adherence()})

    def adherence(self) -> dict[str, float]:
        """The student's prompt adherence at each of LCM_VALIDATION's step counts, sampled as notebook 07 does."""
        from diffusers import LCMScheduler

        from helpers.bench.toy import generate_images
        from helpers.core.models import load_pipeline
        from helpers.toy import prompt_adherence, sample_scenes

        if self._pipe is None:
            self._pipe = load_pipeline("toy", controlnet=LCM_VALIDATION["controlnet"])
            self._pipe.scheduler = LCMScheduler.from_config(self._pipe.scheduler.config)
            self._scenes = sample_scenes(LCM_VALIDATION["n_prompts"], seed=LCM_VALIDATION["seed"])
            self._control = self._scenes.control_images()
        training = self.student.training
        self._pipe.unet = self.student.eval()
        scores = {}
        with torch.inference_mode():
            for steps in LCM_VALIDATION["steps"]:
                images = generate_images(self._pipe, self._scenes.prompts, LCM_VALIDATION["seed"], batch_size=16,
                                         image=self._control, num_inference_steps=steps,
                                         guidance_scale=1.0)
                scores[f"adherence {steps}"] = prompt_adherence(images, self._scenes.scenes)
        self.student.train(training)  # back to the mode it trained in
        return scores

    def record(self, row: dict) -> None:
        """Log a score and keep the weights if their mean is the best so far."""
        row["mean"] = float(np.mean([value for key, value in row.items() if key.startswith("adherence")]))
        self.history.append(row)
        log(f"lcm validation {row}")
        if self.best is None or row["mean"] > self.best[0]:
            self.best = (row["mean"], [param.detach().clone() for param in self.params])

    def keep_best(self) -> None:
        """Score the last weights (unless just scored), then put the best weights seen back into the student."""
        if not self.every:
            return
        if not self.history or self.history[-1]["step"] != self.last_step:
            self.score(self.last_step)
        with torch.no_grad():
            for param, best in zip(self.params, self.best[1]):
                param.copy_(best)
        log(f"lcm: kept the weights of mean validation adherence {self.best[0]:.3f}")


def stage_lcm(work: Path, budget: Budget) -> list[float]:
    """Distil the shipped UNet into a latent consistency model (see lcm_targets_step): as a LoRA on it, the way
    LCM-LoRA ships, or with `budget.lcm_full_unet` into every weight, the way the LCM paper's models ship."""
    full = budget.lcm_full_unet
    target = WEIGHTS_DIR / ("lcm-unet" if full else "lcm-lora")
    if (target / ("config.json" if full else LCM_LORA_FILE)).exists():
        return []
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    stage_data(work, budget)  # no-ops when the work dir has them
    stage_latents(work, budget)
    torch.manual_seed(0)
    sd = WEIGHTS_DIR / "sd"
    data = torch.load(work / "data.pt", weights_only=False)
    latents = torch.load(work / "latents.pt")["mean"]  # posterior means, as the UNet was trained on
    scaling_factor = AutoencoderKL.load_config(sd / "vae")["scaling_factor"]
    tokenizer = CLIPTokenizer.from_pretrained(sd / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(sd / "text_encoder").eval().requires_grad_(False)
    teacher = UNet2DConditionModel.from_pretrained(sd / "unet", dtype=torch.float32).eval().requires_grad_(False)
    student = UNet2DConditionModel.from_pretrained(sd / "unet", dtype=torch.float32)
    params = list(student.parameters()) if full else add_lcm_lora(student)
    learning_rate = LCM_FULL_LR if full else LCM_LR
    target_net, target_params = None, []
    if budget.lcm_target_ema:  # the LCM paper's EMA target network; 0: the student itself (LCM-LoRA)
        target_net = copy.deepcopy(student).eval().requires_grad_(False)
        target_params = [param for name, param in target_net.named_parameters() if full or "lora_" in name]
    scheduler = DDPMScheduler.from_pretrained(sd / "scheduler")  # the teacher's own (zero-SNR) schedule
    alphas_cumprod, prediction_type = scheduler.alphas_cumprod, scheduler.config.prediction_type
    token_ids = tokenize(tokenizer, data["captions"])
    with torch.no_grad():
        uncond = text_encoder(tokenize(tokenizer, [""]))[0]  # (1, 77, hidden)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(8)
    ema_modules = {} if target_net is None else {"target": target_net}
    checkpointer = Checkpointer(work / "lcm.ckpt", optimizer, generator, unet=student, **ema_modules)
    index_batches = batches(len(token_ids), budget.lcm_batch_size, generator)

    def step_fn(step: int, progress: float) -> float:
        set_lr(optimizer, learning_rate * cosine_lr(progress))
        idx = next(index_batches)
        with torch.no_grad():
            prompt_embeds = text_encoder(token_ids[idx])[0]  # (B, 77, hidden)
        prediction, lcm_target = lcm_targets_step(student, teacher, latents[idx] * scaling_factor, prompt_embeds,
                                                  uncond.expand_as(prompt_embeds), alphas_cumprod, prediction_type,
                                                  generator, target_net=target_net)
        pixel_weight = object_pixel_weight(data["depths"][idx], prediction.shape[-1], OBJECT_LOSS_WEIGHT)
        loss = optimizer_step(optimizer, pseudo_huber(prediction, lcm_target, pixel_weight))
        with torch.no_grad():
            for ema_param, param in zip(target_params, params):
                ema_param.lerp_(param, 1 - budget.lcm_target_ema)
        return loss

    validation = LCMValidation(student, params, budget.lcm_validate_every)
    if budget.lcm_validate_every and not (work / "lcm.ckpt").exists():
        validation.score(0)  # the teacher itself under LCMScheduler (the adapter starts at zero)
    losses = train_loop("lcm", budget.lcm_steps, step_fn, checkpointer, budget.max_minutes, validation)
    validation.keep_best()
    (work / "lcm_validation.json").write_text(json.dumps(validation.history, indent=2))
    if full:
        student.to(torch.float16).save_pretrained(target)  # fp16, like the shipped UNet
    else:
        save_lcm_lora(student, target)
    log(f"LCM {'UNet' if full else 'LoRA'} saved -> {target}")
    return losses


STAGE_FUNCTIONS = {
    "data": stage_data,
    "oracle": stage_oracle,
    "vae": stage_vae,
    "latents": stage_latents,
    "clip": stage_clip,
    "decoder": stage_decoder,
    "unet": stage_unet,
    "pipeline": stage_pipeline,
    "controlnet": stage_controlnet,
    "controlnet-normal": lambda work, budget: stage_controlnet(work, budget, kind="normal"),
    "controlnet-canny": lambda work, budget: stage_controlnet(work, budget, kind="canny"),
    "tiny-vae": stage_tiny_vae,
    "ldm": stage_ldm,
    "lcm": lambda work, budget: stage_lcm(work, budget),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    defaults = Budget()
    parser = argparse.ArgumentParser(prog="python -m helpers.toy.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["all", *STAGES], action="append",
                        help="stage(s) to run (repeatable); default: all in order (all but lcm)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="checkpoints and caches")
    parser.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR, help="where shipped weights go")
    for name in ("oracle_steps", "clip_steps", "vae_steps", "unet_steps", "decoder_steps", "controlnet_steps",
                 "derived_controlnet_steps", "canny_controlnet_steps", "tiny_vae_steps", "lcm_steps", "batch_size",
                 "clip_batch_size", "controlnet_batch_size", "derived_controlnet_batch_size", "lcm_batch_size",
                 "n_scenes"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--max-minutes", type=float, default=defaults.max_minutes,
                        help="wall-time cap per training stage")
    parser.add_argument("--lcm-target-ema", type=float, default=defaults.lcm_target_ema,
                        help="the LCM stage's target network: EMA decay of the student (0: the student itself)")
    parser.add_argument("--lcm-validate-every", type=int, default=defaults.lcm_validate_every,
                        help="score the student every N steps and keep the best weights (0: keep the last)")
    parser.add_argument("--lcm-full-unet", action="store_true",
                        help="the LCM stage distils into every UNet weight (-> weights/lcm-unet/), not a LoRA")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    global WEIGHTS_DIR
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    WEIGHTS_DIR = args.weights_dir
    budget = Budget(**{k: getattr(args, k) for k in Budget.__dataclass_fields__})
    stages = [s for s in (args.stage or []) if s != "all"] or list(DEFAULT_STAGES)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    (args.work_dir / "budget.json").write_text(json.dumps(budget.__dict__, indent=2))
    for stage in stages:
        started = time.time()
        log(f"stage {stage}")
        STAGE_FUNCTIONS[stage](args.work_dir, budget)
        log(f"stage {stage} finished in {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
