"""The toy model: a miniature Stable Diffusion trained by this project on a synthetic world of shapes.

Shipped weights (diffusers layout, loadable with the same classes as SD 1.5; load them with
`helpers.core.models.load_pipeline("toy", controlnet="depth")` and generate with `helpers.core.stages.generate`):
    TOY_SD_DIR          StableDiffusionPipeline folder (model_index.json, DDIM scheduler, no safety checker)
    TOY_CONTROLNET_DIR  ControlNetModel folder trained on the world's depth maps
    TOY_LDM_FILE        the same pipeline as one checkpoint in the original LDM key layout
    TOY_LCM_LORA_DIR    a latent consistency LoRA on the UNet: 1-4 steps at guidance 1 (notebook 07's lcm rungs)

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
TOY_LCM_LORA_DIR = WEIGHTS_DIR / "lcm-lora"  # the toy's LCM-LoRA (`python -m helpers.toy.train --stage lcm`)


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


__all__ = [
    "TOY_CONTROLNET_DIR", "TOY_LDM_FILE", "TOY_SD_DIR", "SceneSample", "control_adherence", "load_oracle",
    "parse_prompt", "prompt_adherence", "read_images", "sample_scenes", "world",
]
