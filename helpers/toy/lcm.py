"""Scoring the toy's latent consistency LoRA (`helpers/toy/weights/lcm-lora/`, distilled by `python -m
helpers.toy.train --stage lcm`). Loading it is notebook 07's speed-up `helpers.studies.latency.use_lcm_lora`, one
code path for the toy and for SD 1.5's published `latent-consistency/lcm-lora-sdv1-5`, as diffusers documents
LCM-LoRA:

    pipe = use_lcm_lora(load_pipeline("toy"))            # load_lora_weights + LCMScheduler on the model's schedule
    generate(pipe, prompts, num_inference_steps=4, guidance_scale=LCM_GUIDANCE_SCALE)

The guidance is folded into the LoRA, so it samples with guidance_scale 1 (one UNet pass a step, no unconditional
half). `python -m helpers.toy.lcm` scores it on notebook 07's held-out prompts and seeds against the teacher at
DDIM 50 steps, guidance 7.5 (the toy oracle's prompt adherence).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from helpers.studies.latency.rungs import LCM_GUIDANCE_SCALE
from helpers.studies.latency.speedups import use_lcm_lora
from helpers.toy import TOY_LCM_LORA_DIR

__all__ = ["LCM_GUIDANCE_SCALE", "TOY_LCM_LORA_DIR", "evaluate", "main", "use_lcm_lora"]


def evaluate(n_prompts: int = 64, seed: int = 0, lcm_steps=(4, 2, 1), baseline_steps: int = 50,
             guidance_scale: float = 7.5, source: str | Path | None = None, controlnet: str | None = None,
             batch_size: int = 16, without_lora: bool = False) -> dict:
    """Prompt adherence (toy oracle) of the LCM-LoRA at `lcm_steps` against the teacher at DDIM `baseline_steps`,
    guidance `guidance_scale`, on notebook 07's requests: `sample_scenes(n_prompts, seed)`, image i seeded seed + i
    (and its depth map when `controlnet="depth"`, as notebook 07's baseline runs). `without_lora`: also the teacher
    under LCMScheduler at the same steps and guidance 1, without the adapter (what the distillation adds)."""
    from helpers.bench.toy import generate_images
    from helpers.core.models import load_pipeline
    from helpers.toy import control_adherence, prompt_adherence, sample_scenes

    scenes = sample_scenes(n_prompts, seed=seed)
    control = {} if controlnet is None else {"image": scenes.control_images()}
    results: dict = {"n_prompts": n_prompts, "seed": seed, "controlnet": controlnet, "rows": []}

    def score(name: str, pipe, steps: int, scale: float) -> None:
        started = time.perf_counter()
        with torch.inference_mode():
            images = generate_images(pipe, scenes.prompts, seed, batch_size=batch_size, num_inference_steps=steps,
                                     guidance_scale=scale, **control)
        row = {"sampler": name, "steps": steps, "guidance": scale, "unet calls": steps * (2 if scale > 1 else 1),
               "prompt adherence": prompt_adherence(images, scenes.scenes), "seconds": time.perf_counter() - started}
        if controlnet is not None:
            row["control IoU"] = control_adherence(images, scenes.depth_maps)
        results["rows"].append(row)
        print(row, flush=True)

    if baseline_steps:  # 0: the LCM rungs only
        score("ddim (teacher)", load_pipeline("toy", controlnet=controlnet), baseline_steps, guidance_scale)
    student = use_lcm_lora(load_pipeline("toy", controlnet=controlnet), source) if lcm_steps else None
    for steps in lcm_steps:
        score("lcm-lora", student, steps, LCM_GUIDANCE_SCALE)
    if without_lora:
        from diffusers import LCMScheduler

        bare = load_pipeline("toy", controlnet=controlnet)
        bare.scheduler = LCMScheduler.from_config(bare.scheduler.config)
        for steps in lcm_steps:
            score("LCMScheduler, no LoRA", bare, steps, LCM_GUIDANCE_SCALE)
    return results


def main(argv: list[str] | None = None) -> int:
    from helpers.core.results import format_table

    parser = argparse.ArgumentParser(prog="python -m helpers.toy.lcm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", default=None, help="an LCM-LoRA folder (default: the shipped toy one)")
    parser.add_argument("--controlnet", default=None, help="e.g. depth: notebook 07's baseline runs with it")
    parser.add_argument("--baseline-steps", type=int, default=50, help="the teacher's DDIM steps (0: skip it)")
    parser.add_argument("--lcm-steps", type=int, nargs="*", default=[4, 2, 1])
    parser.add_argument("--without-lora", action="store_true", help="also the teacher under LCMScheduler alone")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = evaluate(args.n_prompts, args.seed, args.lcm_steps, args.baseline_steps, source=args.source,
                       controlnet=args.controlnet, without_lora=args.without_lora)
    print(format_table(results["rows"]))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
