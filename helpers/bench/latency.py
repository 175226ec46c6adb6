"""The per-step latency ladder: `python -m helpers bench latency [--model sd15-random] [--latent-size 32]`.

One UNet step (batch 2 at 32×32 latents by default: 343 GFLOP on SD 1.5's shapes) under each rung of the ladder
(fp32, attention variants, fused QKV, channels_last, bf16, token merging, DeepCache, torch.compile, OpenVINO f32 and
bf16, int8: OpenVINO's through NNCF, calibrated on a few steps, and with --compile torch's through torchao),
warm-up excluded, median of repeats. FLOPs come from torch.utils.flop_counter; each rung's rate is set against the
roofline of its dtype, measured in the same run with the same threads: the fastest of a 2048² matmul and SD 1.5's
640-channel 3×3 convolution at 32², through torch and OpenVINO (on an AMD EPYC torch's fp32 matmul ran at half of
OpenVINO's, and OpenVINO's bf16 UNet step ran at 118% of a matmul-only roofline). A rung
this machine cannot run (bf16 without bf16 units, no compiler, a package missing) is listed as skipped with the
reason. Published anchors are printed beside the table for context; compare ratios, not absolute times, across
machines. DeepCache and token merging skip work: their rate (a full step's FLOPs over their time) is "effective",
not achieved, so the summary's roofline share is the best full-step rung's. The best full-step PyTorch rung and
OpenVINO's best at the same precision are then timed again in turn (`--head-to-head` rounds), and the best int8
rung of each engine: their ratios, free of the machine's drift.
Prints a table and writes outputs/bench_latency.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch
from diffusers import PNDMScheduler

from helpers.core.measure import timed
from helpers.core.models import RANDOM_MODELS, load_component
from helpers.core.random_models import SD15_SCHEDULER_CONFIG
from helpers.core.results import cpu_model, format_table, record_results
from helpers.studies import latency

DEFAULT_RUNGS = ["baseline", "classic_attention", "attention_slicing", "fused_qkv", "channels_last",
                 "fused_qkv + channels_last", "bf16", "bf16 + channels_last", "bf16 + channels_last + fused_qkv",
                 "tome", "deepcache", "bf16 + channels_last + fused_qkv + deepcache", "openvino", "openvino + bf16",
                 "openvino + int8"]
# --compile adds these (a first call compiles: minutes on a CPU); torch's int8 (torchao) is only fast compiled
COMPILE_RUNGS = ["compile", "bf16 + channels_last + fused_qkv + compile", "int8 + channels_last + fused_qkv + compile",
                 "bf16 + int8 + channels_last + fused_qkv + compile"]
ANCHORS = [  # published numbers, for context only: other machines, other shapes
    {"source": "diffusers docs (A100, SD 1.5, 512×512, 30 steps)", "config": "fp32", "seconds": 1.53},
    {"source": "diffusers docs (A100, SD 1.5, 512×512, 30 steps)", "config": "bf16 + SDPA + fused QKV + compile",
     "seconds": 0.49},
    {"source": "Intel (Sapphire Rapids, SD 1.5, 20 steps)", "config": "PyTorch", "seconds": 32.3},
    {"source": "Intel (Sapphire Rapids, SD 1.5, 20 steps)", "config": "OpenVINO, static shapes", "seconds": 4.7},
    {"source": "this project (2-core Xeon with AMX, batch 2, 32×32)", "config": "PyTorch fp32 per step",
     "seconds": 2.04},
    {"source": "this project (2-core Xeon with AMX, batch 2, 32×32)", "config": "bf16 + channels_last per step",
     "seconds": 0.61},
    {"source": "this project (2-core Xeon with AMX, batch 2, 32×32)", "config": "OpenVINO bf16 per step",
     "seconds": 0.405},
]


def rung_dtype(config: latency.RungConfig) -> torch.dtype:
    if config.int8:
        return torch.int8
    return latency.HALF_DTYPES[config.half] if config.half else torch.float32


def bench_rung(base: latency.UNetOnly, name: str, args, flops: int, rooflines: dict) -> dict:
    strengths = dataclasses.replace(latency.STRENGTHS, deepcache_interval=args.deepcache_interval,
                                    tome_ratio=args.tome_ratio)
    config = latency.parse_rung(name, strengths)
    row = {"rung": name}
    try:
        seconds: dict[str, float] = {}
        with timed(seconds, "setup s", base.device):
            holder = latency.configure_for_steps(base, config, args.batch_size, args.latent_size)  # int8: calibrated
        row.update(seconds)
        timing = latency.time_unet_steps(holder, config, args.batch_size, args.latent_size, repeats=args.repeats)
    except (latency.RungSkipped, ImportError, RuntimeError, NotImplementedError) as error:
        return {**row, "status": "skipped", "reason": latency.skip_reason(error)}
    dtype = rung_dtype(config)
    precision = getattr(holder.unet, "inference_precision", None)  # OpenVINO's actual one
    if precision is not None and not config.int8:
        dtype = torch.bfloat16 if "bf16" in precision else torch.float32
    rate = flops / timing["step_s"]  # full-step FLOPs: cached or merged rungs show an effective rate
    del holder
    latency.release_memory(base.device)  # the next rung starts from the base's memory (CUDA's cache handed back)
    skips_work = config.deepcache_interval > 1 or config.tome_ratio > 0  # fewer FLOPs than a full step
    return {**row, "status": "ok", "rate": "effective" if skips_work else "measured", "s per step": timing["step_s"],
            "first call s": timing["first_call_s"], "GFLOP/s": rate / 1e9, "roofline share": rate / rooflines[dtype],
            "dtype": str(dtype).removeprefix("torch."), "repeats": timing["repeats"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers bench latency", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-random", help="whose UNet: sd15-random (real shapes), toy, ...")
    parser.add_argument("--batch-size", type=int, default=2, help="UNet batch (2 = one image with guidance)")
    parser.add_argument("--latent-size", type=int, default=32, help="latent side (SD 1.5 at 512 px: 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rungs", nargs="+", default=DEFAULT_RUNGS, help=f"ladder names, e.g. {DEFAULT_RUNGS[:3]}")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rungs (first call: minutes on CPU)")
    parser.add_argument("--deepcache-interval", type=int, default=3)
    parser.add_argument("--tome-ratio", type=float, default=0.5)
    parser.add_argument("--head-to-head", type=int, default=5, metavar="ROUNDS",
                        help="time the best full-step torch rung and OpenVINO's best again, in turn (0: don't)")
    args = parser.parse_args(argv)
    for name in ("batch_size", "latent_size", "repeats", "deepcache_interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    rungs = args.rungs + (COMPILE_RUNGS if args.compile else [])

    unet = load_component(args.model, "unet", dtype=torch.float32).eval()
    scheduler = _scheduler(args.model)
    base = latency.UNetOnly(unet, scheduler)
    sample, encoder_hidden_states = latency.unet_step_inputs(unet, args.batch_size, args.latent_size)
    scheduler.set_timesteps(20)
    t = scheduler.timesteps[0]
    flops = latency.count_flops(lambda: unet(sample, t, encoder_hidden_states=encoder_hidden_states))
    rooflines, roofline_sources = latency.rooflines(unet.device, int8=any(latency.parse_rung(name).int8
                                                                          for name in rungs))
    print(f"{args.model} UNet, batch {args.batch_size} at {args.latent_size}×{args.latent_size} latents: "
          f"{flops / 1e9:.0f} GFLOP per step; {cpu_model()}, {torch.get_num_threads()} threads; roofline "
          + ", ".join(f"{str(d).removeprefix('torch.')} {r / 1e9:.0f} GFLOP/s ("
                      + ", ".join(f"{engine} {rate / 1e9:.0f}" for engine, rate in roofline_sources[d].items()) + ")"
                      for d, r in rooflines.items()),
          flush=True)

    rows = []
    for name in rungs:
        rows.append(bench_rung(base, name, args, flops, rooflines))
        print(format_table(rows[-1:]), flush=True)
    baseline = next((r for r in rows if r["rung"] == "baseline" and r["status"] == "ok"), None)
    for row in rows:
        if baseline and row["status"] == "ok":
            row["speed-up"] = baseline["s per step"] / row["s per step"]
    columns = ["rung", "status", "dtype", "s per step", "speed-up", "GFLOP/s", "rate", "roofline share", "first call s",
               "setup s", "reason"]
    print(format_table(rows, columns))
    print("\nPublished anchors (other machines and shapes: context, not targets):")
    print(format_table(ANCHORS))
    summary = _summary(rows)
    if args.head_to_head and summary["best full-step torch rung"] and summary["best OpenVINO rung"]:
        summary.update(_head_to_head(base, summary["best full-step torch rung"], summary["best OpenVINO rung"], args))
    if args.head_to_head and summary["best torch int8 rung"] and summary["OpenVINO int8 rung"]:
        summary.update(_head_to_head(base, summary["best torch int8 rung"], summary["OpenVINO int8 rung"], args,
                                     label="int8 "))
    print(format_table([summary]))
    path = record_results("bench_latency", {
        "rows": rows, "anchors": ANCHORS, "summary": summary, "args": vars(args), "gflop_per_step": flops / 1e9,
        "roofline_gflops": {str(d).removeprefix("torch."): r / 1e9 for d, r in rooflines.items()},
        "roofline_sources_gflops": {str(d).removeprefix("torch."): {e: r / 1e9 for e, r in rates.items()}
                                    for d, rates in roofline_sources.items()}})
    print(f"wrote {path}")
    return 0


def _scheduler(model: str):
    """The model's scheduler (its timesteps feed DeepCache); random models have SD 1.5's."""
    return PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG) if model in RANDOM_MODELS else load_component(
        model, "scheduler")


def _head_to_head(base: latency.UNetOnly, torch_rung: str, openvino_rung: str, args, label: str = "") -> dict:
    """The two rungs timed again in turn: the ladder times them minutes apart, and a shared machine drifts 10-50% in
    that time; in turn, their ratio holds. `label` prefixes the keys ("int8 ")."""
    configs = {name: latency.parse_rung(name) for name in (torch_rung, openvino_rung)}
    times = latency.interleaved_step_times(base, configs, args.batch_size, args.latent_size, args.head_to_head)
    torch_s, openvino_s = (statistics.median(times[name]) for name in (torch_rung, openvino_rung))
    return {f"{label}head to head rounds": args.head_to_head, f"{label}head to head torch s": torch_s,
            f"{label}head to head OpenVINO s": openvino_s,
            f"{label}head to head torch vs OpenVINO": openvino_s / torch_s}


def _summary(rows: list[dict]) -> dict:
    """The best PyTorch rung doing a full step's float work (its share of the roofline is real) against OpenVINO's
    best at the same precision; the best PyTorch rung overall (with cached or merged steps, whose rate is only
    effective); and at int8, the best of each engine with its share of the int8 roofline."""
    ok = [r for r in rows if r["status"] == "ok"]

    def fastest(candidates):
        return min(candidates, key=lambda r: r["s per step"]) if candidates else None

    def is_openvino(row):
        return row["rung"].startswith("openvino")

    torch_rows = [r for r in ok if not is_openvino(r) and r["dtype"] != "int8"]
    full = fastest([r for r in torch_rows if r["rate"] == "measured"])
    best = fastest(torch_rows)
    best_ov = fastest([r for r in ok if is_openvino(r) and full and r["dtype"] == full["dtype"]])
    torch_int8 = fastest([r for r in ok if not is_openvino(r) and r["dtype"] == "int8"])
    ov_int8 = fastest([r for r in ok if is_openvino(r) and r["dtype"] == "int8"])

    def ratio(torch_row, openvino_row):
        return openvino_row["s per step"] / torch_row["s per step"] if torch_row and openvino_row else None

    return {"best full-step torch rung": full and full["rung"], "its dtype": full and full["dtype"],
            "its s": full and full["s per step"], "its roofline share": full and full["roofline share"],
            "best OpenVINO rung": best_ov and best_ov["rung"], "OpenVINO s": best_ov and best_ov["s per step"],
            "OpenVINO roofline share": best_ov and best_ov["roofline share"],
            "full-step torch vs OpenVINO": ratio(full, best_ov),
            "best torch rung": best and best["rung"], "best torch s": best and best["s per step"],
            "best torch vs OpenVINO": ratio(best, best_ov),
            "best torch int8 rung": torch_int8 and torch_int8["rung"], "torch int8 s": torch_int8 and torch_int8[
                "s per step"], "torch int8 roofline share": torch_int8 and torch_int8["roofline share"],
            "OpenVINO int8 rung": ov_int8 and ov_int8["rung"], "OpenVINO int8 s": ov_int8 and ov_int8["s per step"],
            "OpenVINO int8 roofline share": ov_int8 and ov_int8["roofline share"],
            "torch vs OpenVINO int8": ratio(torch_int8, ov_int8)}


if __name__ == "__main__":
    raise SystemExit(main())
