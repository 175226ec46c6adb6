"""Generation latency (notebook 07): measure it part by part, find the bottlenecks, cut it, and price each cut in
quality. Read in this order:

- `rungs`: what a rung is. A `RungConfig` says how one generation runs (scheduler and steps, and which speed-ups at
  what strength); `parse_rung("dpm++ 10 + bf16 + deepcache")` reads one from the ladder's names (`OPTIMISATIONS`),
  which stay the labels of every result; "lcm 4" is the LCM-LoRA at 4 steps, sampled at guidance 1. `Inputs`: the
  prompts, seeds and control images every rung generates.
- `speedups`: how each speed-up is applied, one small function each on a pipeline copy (`use_scheduler`, `use_lcm`
  (with `use_lcm_lora`: the toy's LCM-LoRA or SD 1.5's published one, and LCMScheduler), `use_half`,
  `use_attention_slicing`, `use_classic_attention`, `fuse_qkv`, `use_channels_last`, `use_tome`, `use_deepcache`,
  `use_tgate`, `use_tiny_decoder`, `use_openvino`, `quantize_int8`, `compile_unet`); `speedups(config)` lists a
  rung's calls, `recipe(config)` prints them as code, `why_not(config, device)` says why this platform cannot run
  it. Device decisions (which half, bf16, compile, OpenVINO) ask `helpers.core.accelerator`: under the rehearsal's
  pretended T4 the rungs are a T4's while the CPU computes.
- `ladder`: the copies (`copy_pipeline` shares the base's weights; only what a rung changes is its own, freed when
  the rung is done: SD 1.5 with a ControlNet and a copy per rung did not fit a 16 GB T4), `configure`, `run_rung`
  (warm-up excluded, median of repeats, through `helpers.core.stages.generate`), `Ladder` and its head-to-head in
  turn, `time_loads`.
- `quality`: oracle prompt and control adherence on the toy, PSNR/SSIM against the baseline of the same seed;
  `pareto_front`, `within_bars` and `recommend`.
- `profiling`: `part_timers` (every part of a generation, without touching the loop), `count_flops`,
  `profile_top_ops`, `matmul_roofline`, `conv_roofline` and `rooflines`; `bottlenecks`: each stage replayed alone
  against the roofline, and one UNet step timed alone (the bench).
"""

from helpers.studies.latency.bottlenecks import (
    capture_stage_calls,
    configure_for_steps,
    interleaved_step_times,
    stage_bottlenecks,
    time_unet_steps,
    unet_step_inputs,
)
from helpers.studies.latency.ladder import (
    Ladder,
    RungResult,
    UNetOnly,
    configure,
    copy_pipeline,
    generate_config,
    interleaved_times,
    out_of_memory,
    owned_bytes,
    quality_images,
    release_memory,
    run_rung,
    sharing_copy,
    skip_reason,
    time_loads,
    time_request,
    warm_up,
)
from helpers.studies.latency.profiling import (
    PARTS,
    conv_roofline,
    count_flops,
    matmul_roofline,
    part_timers,
    profile_top_ops,
    rooflines,
)
from helpers.studies.latency.quality import image_similarity, pareto_front, quality, recommend, within_bars
from helpers.studies.latency.rungs import (
    HALF_DTYPES,
    LCM_GUIDANCE_SCALE,
    OPTIMISATIONS,
    SAME_ARITHMETIC,
    STRENGTHS,
    Inputs,
    RungConfig,
    RungSkipped,
    decided_as,
    half_name,
    parse_rung,
    same_arithmetic_reference,
    sd15_prompts,
)
from helpers.studies.latency.speedups import (
    apply_speedups,
    compile_unet,
    finish_calibration,
    fuse_qkv,
    networks,
    quantize_int8,
    recipe,
    slow_bf16_reason,
    speedups,
    use_attention_slicing,
    use_channels_last,
    use_classic_attention,
    use_deepcache,
    use_half,
    use_lcm,
    use_lcm_lora,
    use_openvino,
    use_scheduler,
    use_tgate,
    use_tiny_decoder,
    use_tome,
    why_not,
)

__all__ = [
    "HALF_DTYPES", "Inputs", "LCM_GUIDANCE_SCALE", "Ladder", "OPTIMISATIONS", "PARTS", "RungConfig", "RungResult",
    "RungSkipped", "SAME_ARITHMETIC", "STRENGTHS", "UNetOnly", "apply_speedups", "capture_stage_calls",
    "compile_unet", "configure", "configure_for_steps", "conv_roofline", "copy_pipeline", "count_flops",
    "decided_as", "finish_calibration", "fuse_qkv", "generate_config", "half_name", "image_similarity",
    "interleaved_step_times", "interleaved_times", "matmul_roofline", "networks", "out_of_memory", "owned_bytes",
    "pareto_front", "parse_rung", "part_timers", "profile_top_ops", "quality", "quality_images", "quantize_int8",
    "recipe", "recommend", "release_memory", "rooflines", "run_rung", "same_arithmetic_reference", "sd15_prompts",
    "sharing_copy", "skip_reason", "slow_bf16_reason", "speedups", "stage_bottlenecks", "time_loads",
    "time_request", "time_unet_steps", "unet_step_inputs", "use_attention_slicing", "use_channels_last",
    "use_classic_attention", "use_deepcache", "use_half", "use_lcm", "use_lcm_lora", "use_openvino",
    "use_scheduler", "use_tgate", "use_tiny_decoder", "use_tome", "warm_up", "why_not", "within_bars",
]
