"""The toy model: a miniature Stable Diffusion trained by this project on a synthetic world of shapes.

Shipped weights (diffusers layout, loadable with the same classes as SD 1.5):
    TOY_SD_DIR          StableDiffusionPipeline folder (model_index.json, DDIM scheduler, no safety checker)
    TOY_CONTROLNET_DIR  ControlNetModel folder trained on the world's depth maps
    TOY_LDM_FILE        the same pipeline as one checkpoint in the original LDM key layout

    sample_scenes(n, seed, split="heldout", max_objects=1) -> prompts, depth maps and scene specs
    load_oracle()                                           -> the classifier behind the quality metrics
    prompt_adherence(images, prompts_or_scenes), control_adherence(images, depth_maps)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from helpers.toy import world
from helpers.toy.oracle import control_adherence, load_oracle, parse_prompt, prompt_adherence, read_images

WEIGHTS_DIR = Path(__file__).parent / "weights"
TOY_SD_DIR = WEIGHTS_DIR / "sd"
TOY_CONTROLNET_DIR = WEIGHTS_DIR / "controlnet-depth"
TOY_LDM_FILE = WEIGHTS_DIR / "toy-sd-ldm.safetensors"


@dataclass
class SceneSample:
    """n scenes: their captions (prompts), rendered images, depth maps and specs."""

    prompts: list[str]
    images: np.ndarray  # (n, 64, 64, 3) uint8: what the prompt describes, rendered
    depth_maps: np.ndarray  # (n, 64, 64) float32 in [0, 1], bright = near
    scenes: list[world.Scene]

    def control_images(self) -> list:
        """Depth maps as 3-channel PIL images, the `image=` argument of a ControlNet pipeline."""
        from PIL import Image

        return [Image.fromarray(world.depth_to_control_image(d)) for d in self.depth_maps]


def sample_scenes(
    n: int, seed: int = 0, split: str = "heldout", max_objects: int = 1, min_objects: int = 1
) -> SceneSample:
    """n deterministic scenes of `split` ("heldout" never appears in training) with 1..max_objects objects."""
    scenes = world.make_scenes(n, seed=seed, split=split, max_objects=max_objects, min_objects=min_objects)
    images, depth_maps = world.render_batch(scenes)
    return SceneSample([s.caption for s in scenes], images, depth_maps, scenes)


def load_pipeline(controlnet: bool = False, sd_dir: Path = TOY_SD_DIR, controlnet_dir: Path = TOY_CONTROLNET_DIR):
    """The shipped toy StableDiffusionPipeline (or StableDiffusionControlNetPipeline with the depth
    ControlNet), float32 on CPU, progress bars off."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    if not (Path(sd_dir) / "model_index.json").exists():
        raise FileNotFoundError(f"no toy pipeline in {sd_dir}; build it with `python -m helpers.toy.train`")
    if controlnet:
        pipe = StableDiffusionControlNetPipeline.from_pretrained(
            sd_dir, controlnet=ControlNetModel.from_pretrained(controlnet_dir), local_files_only=True
        )
    else:
        pipe = StableDiffusionPipeline.from_pretrained(sd_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cfg_cutoff_callback(cutoff_step_ratio: float):
    """diffusers' `SDCFGCutoffCallback` (classifier-free guidance off after int(steps * ratio) steps) for a batch:
    diffusers' own keeps `prompt_embeds[-1:]`, one prompt's embedding, so a batch of two fails in the UNet."""
    from diffusers.callbacks import SDCFGCutoffCallback

    class BatchCFGCutoffCallback(SDCFGCutoffCallback):
        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            cutoff_step = int(pipeline.num_timesteps * self.config.cutoff_step_ratio)
            if step_index == cutoff_step and pipeline.do_classifier_free_guidance:
                prompt_embeds = callback_kwargs["prompt_embeds"]  # (2B, 77, hidden): negative half, then prompts
                callback_kwargs["prompt_embeds"] = prompt_embeds.chunk(2)[1]  # -> (B, 77, hidden)
                pipeline._guidance_scale = 0.0
            return callback_kwargs

    return BatchCFGCutoffCallback(cutoff_step_ratio=cutoff_step_ratio)


def generate(
    pipe,
    prompts: list[str],
    seed: int = 0,
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    control_images: list | None = None,
    batch_size: int = 64,
    cfg_cutoff: float | None = None,
) -> np.ndarray:
    """Images (N, H, W, 3) uint8 for `prompts`; image i uses torch.Generator seeded seed + i, so results
    do not depend on batch_size. Pass `control_images` with a ControlNet pipeline. `cfg_cutoff` in [0, 1]:
    guidance only for the first int(num_inference_steps * cfg_cutoff) + 1 steps (see `cfg_cutoff_callback`)."""
    import torch

    if control_images is not None and len(control_images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(control_images)} control images")
    if cfg_cutoff is not None and not 0.0 <= cfg_cutoff <= 1.0:
        raise ValueError(f"cfg_cutoff={cfg_cutoff} must be in [0, 1]: the share of steps that use guidance")
    if cfg_cutoff is not None and control_images is not None:
        raise ValueError("cfg_cutoff works with the plain pipeline only: the ControlNet pipeline doubles its "
                         "control images for guidance, and the callback cannot halve them")
    callback = {} if cfg_cutoff is None else {"callback_on_step_end": cfg_cutoff_callback(cfg_cutoff)}
    images = []
    for start in range(0, len(prompts), batch_size):
        stop = min(start + batch_size, len(prompts))
        kwargs = {} if control_images is None else {"image": list(control_images[start:stop])}
        out = pipe(
            list(prompts[start:stop]),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=[torch.Generator().manual_seed(seed + i) for i in range(start, stop)],
            output_type="np",
            **kwargs,
            **callback,
        )
        images.append(np.round(out.images * 255).astype(np.uint8))  # (b, H, W, 3) float [0, 1] -> uint8
    return np.concatenate(images)


__all__ = [
    "cfg_cutoff_callback", "generate", "load_pipeline",
    "TOY_CONTROLNET_DIR", "TOY_LDM_FILE", "TOY_SD_DIR", "SceneSample", "control_adherence", "load_oracle",
    "parse_prompt", "prompt_adherence", "read_images", "sample_scenes", "world",
]
