"""Batching per stage: N calls of batch 1 against one call of N, for encode_text, denoise, decode (and the chain).

    python -m helpers bench batching [--model sd15-random] [--n 4] [--steps 20] [--height 128] [--width 128]
                                     [--max-batch N] [--stages encode_text denoise decode] [--repeats 3]

The default `sd15-random` has SD 1.5's real architecture with random weights (fp32 on the CPU, fp16 on CUDA), so
its times are SD 1.5's times on this machine. Its CPU defaults (N=4 at 128×128, 20 steps) took 4.6 minutes on one
thread of an AMD EPYC: denoise 1.90× faster batched (38.5 s against 20.3 s an image: at 16×16 latents each layer's
matrices have a few hundred rows at most, far below what the kernels need to run at speed, and a batch multiplies
them), text encoding 1.17×, decode 0.80× (slower batched).
On a GPU the default is 512×512: try `--n 16`.
`--model toy` runs the shipped toy model. The same code as notebook 03 (`helpers.studies.batching.compare`): the same
seeds both ways, and the outputs' largest difference is reported. Prints the table and its rows as JSON, and
writes outputs/bench_batching.json.
"""

from __future__ import annotations

import argparse
import json

from helpers.core import accelerator
from helpers.core.measure import timed
from helpers.core.models import load_pipeline
from helpers.core.results import format_table, record_results
from helpers.studies.batching import (
    COMPARE_COLUMNS,
    MIN_RUN_S,
    STAGES,
    StageJob,
    check_count,
    compare,
    load_prompts,
    threads_report,
)

CPU_SD15_SIZE = 128  # pixels: SD 1.5-shaped compute at a size that fits ~10 minutes on 2 CPU cores


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m helpers bench batching", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-random", help="sd15-random (default), toy, a hub id or a path")
    parser.add_argument("--n", type=int, default=4, help="N: the number of inferences (prompts, one seed each)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--height", type=int, default=None, help=f"image height (default: {CPU_SD15_SIZE} for "
                        "sd15-random on a CPU, else the model's own size)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: as the height)")
    parser.add_argument("--max-batch", type=int, default=None, help="largest chunk of the batched call (default N)")
    parser.add_argument("--stages", nargs="+", default=["encode_text", "denoise", "decode"], choices=STAGES,
                        help="stages to time; 'generate' adds the whole chain (doubles the time)")
    parser.add_argument("--repeats", type=int, default=3, help="least repeats of a short run (median kept)")
    parser.add_argument("--min-time", type=float, default=MIN_RUN_S,
                        help="a run shorter than this many seconds is repeated until it is spent")
    parser.add_argument("--seed", type=int, default=0, help="seeds are seed, seed+1, ..., one per prompt")
    args = parser.parse_args(argv)
    for name in ("n", "steps", "repeats"):
        check_count(f"--{name}", getattr(args, name))
    for name in ("max_batch", "height", "width"):
        if getattr(args, name) is not None:
            check_count(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.model == "sd15-random" and not accelerator.on_gpu():  # 512×512 would take hours here
        args.height, args.width = args.height or CPU_SD15_SIZE, args.width or args.height or CPU_SD15_SIZE
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seconds: dict[str, float] = {}
    with timed(seconds, "bench", "cpu"):  # the whole run, for the record; each stage is timed by compare
        rows, threads = _run(args)
    print(format_table(rows, COMPARE_COLUMNS))
    print(json.dumps(rows))
    path = record_results("bench_batching", {"args": vars(args), "threads": threads, "rows": rows,
                                             "seconds": seconds["bench"]})
    print(f"wrote {path}")
    return 0


def _run(args) -> tuple[list[dict], dict]:
    pipe = load_pipeline(args.model)
    job = StageJob(pipe, load_prompts(args.n), range(args.seed, args.seed + args.n),
                   num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                   height=args.height, width=args.width)
    threads = threads_report()
    print(f"{args.model} on {job.device} ({pipe.unet.dtype}), N={args.n}, {args.steps} steps, "
          f"{job.height or 'default'}×{job.width or 'default'}, torch threads {threads['torch_threads']} "
          f"of {threads['cores_available']} cores", flush=True)
    rows = []
    for stage in args.stages:  # in order, so each stage's batched output feeds the next
        rows.append(compare(job, stage, args.max_batch or args.n, repeats=args.repeats, min_time_s=args.min_time))
        print(f"  {stage}: speed-up {rows[-1]['speedup']:.2f}x, max diff {rows[-1]['max_abs_diff']:.1e}", flush=True)
    return rows, threads


if __name__ == "__main__":
    raise SystemExit(main())
