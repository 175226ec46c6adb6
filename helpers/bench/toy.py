"""The toy model's quality bars: `python -m helpers bench toy` (or `python -m helpers.bench.toy`).

Prints a table and writes outputs/bench_toy.json:
  oracle accuracy on rendered held-out scenes,
  prompt adherence on held-out single- and two-object prompts at guidance 7.5 and 1.0 (20 steps),
  ControlNet control adherence (mask IoU) on held-out depth maps, for the depth, normal and Canny nets (the normal
  map and the edges derived from the same depth maps, as notebook 06 derives them),
  seconds per 20-step guided image (batch 1, median of repeats, warm-up excluded).
"""

from __future__ import annotations

import argparse

import torch

from helpers.core.measure import measure
from helpers.core.models import load_controlnet, load_pipeline
from helpers.core.results import format_table, record_results
from helpers.core.stages import generate
from helpers.studies.control import control_images
from helpers.toy import control_adherence, load_oracle, prompt_adherence, sample_scenes
from helpers.toy.oracle import adherence, attribute_accuracy, read_images, reading_accuracy, scene_spec

CFG_CUTOFF = 0.4  # share of steps with guidance in the cfg-cutoff run (denoise(cfg_cutoff=...))

BARS = {  # the bars (tests check looser ones)
    "oracle_accuracy": (">=", 0.99),
    "prompt_adherence_single_cfg7.5": (">=", 0.90),
    "control_iou": (">=", 0.80),
    "control_iou_normal": (">=", 0.80),
    "control_iou_canny": (">=", 0.80),
    "seconds_per_image": ("<", 1.0),
}


def oracle_accuracy(n: int, seed: int) -> float:
    """Share of rendered held-out scenes (1 or 2 objects) the oracle reads exactly right."""
    sample = sample_scenes(n, seed=seed, split="heldout", max_objects=2)
    return reading_accuracy(sample.images, sample.scenes)


def seconds_per_image(pipe, steps: int, guidance_scale: float, repeats: int) -> float:
    """Median wall time of one 20-step image through `helpers.core.stages.generate` (warm-up excluded)."""
    run = lambda: generate(pipe, ["a red circle on the left"], seeds=[0], num_inference_steps=steps,
                           guidance_scale=guidance_scale, progress=False)
    return measure("seconds_per_image", run, repeats=repeats, warmup=1).median


def generate_images(pipe, prompts: list[str], seed: int, batch_size: int = 64, **generate_kwargs) -> list:
    """PIL images of `prompts` through `helpers.core.stages.generate`, image i seeded `seed + i` (so the result does
    not depend on `batch_size`), in batches of `batch_size` to bound memory. Control images, if any, are sliced
    along with the prompts."""
    control_images = generate_kwargs.pop("image", None)
    images = []
    for start in range(0, len(prompts), batch_size):
        stop = min(start + batch_size, len(prompts))
        control = {} if control_images is None else {"image": list(control_images[start:stop])}
        result = generate(pipe, prompts[start:stop], seeds=range(seed + start, seed + stop), progress=False,
                          **control, **generate_kwargs)
        images += result.images
    return images


def adherence_by_stated_position(key: str, readings: list, specs: list, scenes: list) -> dict[str, float]:
    """Single-object adherence split by whether the caption names the position or implies the centre: with
    positions anywhere, unplaced objects were the toy model's main miss (two objects drawn, one per slot)."""
    results = {}
    for stated, label in ((True, "with_position"), (False, "without_position")):
        picked = [i for i, scene in enumerate(scenes) if ("position" in scene.mentions) == stated]
        if picked:
            results[f"{key}_{label}"] = adherence([readings[i] for i in picked], [specs[i] for i in picked])
    return results


def run(n_single: int, n_two: int, n_control: int, steps: int, seed: int, repeats: int,
        scheduler: str = "default") -> dict:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    results: dict = {"steps": steps, "scheduler": scheduler, "n_single": n_single, "n_two": n_two,
                     "n_control": n_control}
    # a scheduler that cannot run the model fails here, before any work
    pipe, oracle = load_pipeline("toy", scheduler=scheduler), load_oracle()
    results["oracle_accuracy"] = oracle_accuracy(1000, seed)
    single = sample_scenes(n_single, seed=seed, split="heldout", max_objects=1)
    two = sample_scenes(n_two, seed=seed, split="heldout", min_objects=2, max_objects=2)

    def score(key: str, sample, **generate_kwargs) -> tuple[list, list]:
        """Generate `sample`'s prompts, record every-attribute adherence and per-attribute accuracy under `key`."""
        images = generate_images(pipe, sample.prompts, seed, num_inference_steps=steps, **generate_kwargs)
        readings, specs = read_images(oracle, images), [scene_spec(s) for s in sample.scenes]
        results[key] = adherence(readings, specs)
        # which stated attributes the images get right, one at a time
        results[f"{key}_by_attribute"] = attribute_accuracy(readings, specs)
        return readings, specs

    with torch.inference_mode():
        for guidance_scale in (7.5, 1.0):
            for name, sample in (("single", single), ("two", two)):
                if not sample.prompts:
                    continue
                key = f"prompt_adherence_{name}_cfg{guidance_scale:g}"
                readings, specs = score(key, sample, guidance_scale=guidance_scale)
                # looser readings: right number of objects with the right colours (and shapes)
                results[f"{key}_colour_only"] = adherence(readings, specs, attributes=("colour",))
                results[f"{key}_shape_colour"] = adherence(readings, specs, attributes=("shape", "colour"))
                if name == "single":
                    results.update(adherence_by_stated_position(key, readings, specs, sample.scenes))
                print(f"{key}: {results[key]:.3f}", flush=True)
        if single.prompts:
            # guidance for the first int(CFG_CUTOFF * steps) + 1 steps, then the prompt alone (a smaller batch)
            key = f"prompt_adherence_single_cfg7.5_cutoff{CFG_CUTOFF:g}"
            score(key, single, guidance_scale=7.5, cfg_cutoff=CFG_CUTOFF)
            print(f"{key}: {results[key]:.3f}", flush=True)
    results["seconds_per_image"] = seconds_per_image(pipe, steps, 7.5, repeats)
    control = sample_scenes(n_control, seed=seed + 1, split="heldout", max_objects=2)
    depth = load_controlnet("toy", "depth", pipe.unet.dtype)
    with torch.inference_mode():
        images = generate_images(pipe, control.prompts, seed, num_inference_steps=steps, guidance_scale=7.5,
                                 controlnet=depth, image=control.control_images())
    results["control_iou"] = control_adherence(images, control.depth_maps)
    results["control_prompt_adherence"] = prompt_adherence(images, control.scenes)
    print(f"control_iou: {results['control_iou']:.3f}", flush=True)
    results.update(derived_control_iou(pipe, control, seed, steps))
    return results


def derived_control_iou(pipe, control, seed: int, steps: int) -> dict[str, float]:
    """Mask IoU of the toy's normal and Canny ControlNets on the same held-out scenes as the depth one, their maps
    derived from the 8-bit depth maps as notebook 06 derives them (helpers.studies.control.control_images)."""
    results = {}
    for kind in ("normal", "canny"):
        controlnet = load_controlnet("toy", kind, pipe.unet.dtype)
        maps = [control_images(depth, *depth.shape, [kind])[kind] for depth in control.depth_maps]  # 64×64 RGB
        with torch.inference_mode():
            images = generate_images(pipe, control.prompts, seed, num_inference_steps=steps, guidance_scale=7.5,
                                     controlnet=controlnet, image=maps)
        results[f"control_iou_{kind}"] = control_adherence(images, control.depth_maps)
        print(f"control_iou_{kind}: {results[f'control_iou_{kind}']:.3f}", flush=True)
    return results


def table_rows(results: dict) -> list[dict]:
    """One row per measured number, with its bar and verdict where the issue set one."""
    rows = []
    for key, value in results.items():
        bar = BARS.get(key)
        verdict = ""
        if bar and isinstance(value, float):
            ok = value >= bar[1] if bar[0] == ">=" else value < bar[1]
            verdict = f"{bar[0]} {bar[1]:g}  {'PASS' if ok else 'FAIL'}"
        rows.append({"metric": key, "value": value, "bar": verdict})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers bench toy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-single", type=int, default=200, help="held-out single-object prompts")
    parser.add_argument("--n-two", type=int, default=100, help="held-out two-object prompts")
    parser.add_argument("--n-control", type=int, default=100, help="held-out depth maps for ControlNet")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheduler", default="default",
                        help="the model's own (DDIM), or a helpers.core.models.SCHEDULERS name, e.g. euler_a")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs for seconds per image")
    args = parser.parse_args(argv)
    results = run(args.n_single, args.n_two, args.n_control, args.steps, args.seed, args.repeats, args.scheduler)
    print(format_table(table_rows(results)))
    print(f"wrote {record_results('bench_toy', results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
