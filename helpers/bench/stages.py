"""Time the three stages: `python -m helpers bench stages [--models toy sd15-random] [--steps 20]`.

For each model: encode_text, denoise and decode are timed separately (warm-up excluded, median of
repeats, synchronized on a GPU), with the shapes each stage hands on. `sd15-random` has SD 1.5's real
architecture with random weights, so its times are SD 1.5's times on this machine (its images are noise).
Prints a table and writes outputs/bench_stages.json.
"""

from __future__ import annotations

import argparse

import torch

from helpers.core import accelerator
from helpers.core.measure import measure
from helpers.core.models import load_pipeline
from helpers.core.results import format_table, record_results
from helpers.core.stages import decode, default_size, denoise, encode_text

PROMPT = "a large red circle on the left on a white background"


def bench_model(model: str, steps: int, batch_size: int, repeats: int) -> list[dict]:
    pipe = load_pipeline(model)
    device = pipe.device
    height, width = default_size(pipe)
    prompts = [PROMPT] * batch_size
    prompt_embeds, negative_prompt_embeds = encode_text(pipe, prompts)
    latents = denoise(pipe, prompt_embeds, negative_prompt_embeds, num_inference_steps=steps, progress=False)
    images = decode(pipe, latents, output_type="pt")
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    timesteps = len(scheduler.timesteps)  # UNet evaluations: PNDM (SD 1.5) runs steps + 1

    runs = {
        "encode_text": (lambda: encode_text(pipe, prompts), prompt_embeds),
        "denoise": (lambda: denoise(pipe, prompt_embeds, negative_prompt_embeds, num_inference_steps=steps,
                                    progress=False), latents),
        "decode": (lambda: decode(pipe, latents, output_type="pt"), images),
    }
    rows = []
    for stage, (fn, output) in runs.items():
        m = measure(stage, fn, repeats=repeats, warmup=1, items_per_call=batch_size, device=device)
        rows.append({"model": model, "stage": stage, "output shape": "×".join(map(str, output.shape)),
                     "median s": m.median, "s per image": m.per_item, "repeats": repeats})
    total = sum(r["median s"] for r in rows)
    for row in rows:
        row["share"] = row["median s"] / total
    rows[1]["s per UNet step"] = rows[1]["median s"] / timesteps
    print(f"{model}: {height}×{width}, batch {batch_size}, {steps} steps, {device}, {pipe.unet.dtype}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers bench stages", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["toy", "sd15-random"])
    parser.add_argument("--steps", type=int, default=20, help="denoising steps for the toy model")
    parser.add_argument("--sd15-steps", type=int, default=2, help="steps for SD 1.5-sized models (slow on CPU)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    rows = []
    with torch.inference_mode():
        for model in args.models:
            big = model.startswith("sd15") or "/" in model
            repeats = 1 if big and not accelerator.on_gpu() else args.repeats
            rows += bench_model(model, args.sd15_steps if big else args.steps, args.batch_size, repeats)
    columns = ["model", "stage", "output shape", "median s", "s per image", "share", "s per UNet step", "repeats"]
    print(format_table(rows, columns))
    path = record_results("bench_stages", {"rows": rows, "args": vars(args)})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
