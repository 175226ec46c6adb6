"""Run profiles: which model and how much work each notebook does under papermill.

- `smoke`: CI and the tests. The toy model, tiny N and few steps: minutes for the whole series.
- `cpu`:   the offline main job, about 10 minutes on 2 cores. The toy model at the mission's sizes (N = 128, 64
           held-out prompts for quality), each notebook's whole story, with what costs most and teaches least trimmed.
- `full`:  every measurement the notebooks can make on the toy (about 40 minutes on 2 cores): all four schedulers at
           five step counts, every optimisation priced on every prompt, 20 steps in 03, two more loads of each kind.
- `gpu`:   SD 1.5 from the hub on Kaggle/Colab.
- `auto`:  `gpu` when CUDA and the hub are both there, else `cpu`.
Each notebook's `parameters` cell holds its defaults (the `cpu` values); a profile overrides some of them, here and
only here: a notebook never changes its own parameters in code, so what papermill passes is what runs.
"""

from __future__ import annotations

from pathlib import Path

# Light (no torch, no diffusers): settings, the rehearsal and `python -m helpers` read the profiles; the accelerator and
# the loader are imported when "auto" is resolved.

PROFILE_NAMES = ("smoke", "cpu", "full", "gpu", "auto")

COMMON = {
    "smoke": {"MODEL": "toy"},
    "cpu": {"MODEL": "toy"},
    "full": {"MODEL": "toy"},
    "gpu": {"MODEL": "stable-diffusion-v1-5/stable-diffusion-v1-5"},  # helpers.core.models.SD15_HUB_ID
}

# Per-notebook overrides, keyed by the notebook's two-digit number.
NOTEBOOK_OVERRIDES: dict[str, dict[str, dict]] = {
    "01": {  # smoke: a small demo file on the loopback swarm, whatever the hub cache holds: the notebook takes seconds
        "smoke": {"DEMO_SIZE_MB": 8, "DEMO_RATE_LIMIT_MB_S": 4, "SOURCE": "loopback"},
        "cpu": {},  # SOURCE "auto": offline the loopback demo and the toy's file
        # SD 1.5's single file from the hub (hosted notebooks often block BitTorrent: SOURCE="torrent" is an opt-in),
        # taken apart; COMPARE_WITH_HUB reads the hub's published SHA-256, no second download
        "gpu": {"SOURCE": "hub", "LOAD_FILE": "downloaded"},
    },
    "02": {
        "smoke": {"GRID_STEPS": [5, 20], "GRID_GUIDANCE": [1.0, 7.5], "CALLBACK_EVERY": 5},
        "cpu": {},
        # SD 1.5 at its trained 512² (HEIGHT = WIDTH = 0), 20 steps: ~480 its (UNet steps of batch 2 at 64² latents,
        # a 512² decode counted as 2) ≈ 1 min at a T4's ~7.6 it/s, plus loading; peak ~7 GiB (a decode of 6 at 512²)
        "gpu": {"PROMPT": "a photograph of an astronaut riding a horse",
                "NEGATIVE_DEMO_PROMPT": "a portrait photograph of a golden retriever",
                "NEGATIVE_PROMPT": "grass, trees, outdoors",
                "IMG2IMG_PROMPT": "a stained glass window of bright geometric shapes"},
    },
    "03": {  # smoke: N=4 at 2 steps, chunks of 3, room for 1 in the OOM demo, cold loads of state dicts only
        "smoke": {"N": 4, "STEPS": 2, "MAX_BATCH": 4, "REPEATS": 2, "MIN_RUN_S": 0.2, "CHUNK_DEMO_MAX_BATCH": 3,
                  "OOM_DEMO_LIMIT": 1, "LOAD_MODES": ["tensors"], "LOAD_REPEATS": 1},
        # cpu (the parameters cell): the toy at N=128, 10 steps (the ratios of 20 steps at half the time), one timed
        # run of each 128 calls (short calls repeated for 0.5 s), the sweep to 64, one cold load of each kind: ~2.5 min
        # on 2 cores (full: ~6)
        "cpu": {},
        "full": {"STEPS": 20, "REPEATS": 3, "MIN_RUN_S": 2.0, "SWEEP_MAX": 0, "LOAD_REPEATS": 3},
        # SD 1.5 at 512², 20 steps, fp16, on a 16 GB T4 (15 GiB budget). From FLOPs (torch.utils.flop_counter on SD
        # 1.5's shapes) and a T4's published ~7.6 it/s (a UNet step of batch 2 at 64² latents, 1.61 TFLOP: ~12 TFLOP/s):
        # an image's 20 steps (PNDM: 21 UNet calls) 2.8 s, a 512² decode (2.51 TFLOP) 0.21 s. The notebook denoises
        # ~147 images (compare denoise and generate 2N each, the grid 16, the sweep 1+2+4+8+16 = 31, auto 2N) ≈ 6.8 min,
        # one-step warm-ups ≈ 0.2 min, decodes ~330 (warm-ups, short-run repeats) ≈ 1.2 min; with three pipeline
        # loads, the single file's download (4.27 GB, once) and the cold loads (tensors, 1 repeat: ~2 reads of it),
        # ~12 min in all.
        # Memory (core.limits): a 512² decode ≈ 0.75 GiB an image, so a decode of 16 is at the edge of the ~12 GiB
        # beside the weights (halved in chunks, skipped in the sweep); 32 (~24 GiB) never fits. Prompts: the SD ones.
        "gpu": {"N": 16, "MAX_BATCH": 16, "CHUNK_DEMO_MAX_BATCH": 6, "OOM_DEMO_LIMIT": 4, "LOAD_MODES": ["tensors"],
                "LOAD_REPEATS": 1},
    },
    "04": {  # smoke: 8 steps, 4 divisions, 2 seed pairs for the midpoint statistics
        "smoke": {"STEPS": 8, "NUM_DIVISIONS": 4, "MIDPOINT_SEEDS": 2, "NORM_PAIRS": 16},
        "cpu": {},
        # SD 1.5 at 512², 20 steps, 7 values of α, 8 midpoint seed pairs: ~1,090 its (UNet steps of batch 2 at 64²
        # latents, a 512² decode counted as 2) ≈ 2.4 min at a T4's ~7.6 it/s, plus loading; peak ~9 GiB (decode of 8)
        "gpu": {"NUM_DIVISIONS": 6, "PROMPT_A": "a photograph of an astronaut riding a horse",
                "PROMPT_B": "a watercolor painting of a fox in a snowy forest"},
    },
    "05": {  # smoke: 2 prompt pairs x 2 seeds for the oracle shares (cpu: 8 x 8)
        "smoke": {"STEPS": 8, "NUM_DIVISIONS": 4, "ORACLE_SEEDS": 2, "NORM_PAIRS": 16,
                  "PROMPT_PAIRS": [["a red circle", "a blue square"], ["a green triangle", "a yellow diamond"]]},
        "cpu": {},
        # SD 1.5 at 512², 20 steps, 7 values of α, 4 pairs × 4 seeds of midpoints (contrast only: no oracle):
        # ~1,750 its (UNet steps of batch 2 at 64² latents, a 512² decode counted as 2) ≈ 3.8 min at a T4's ~7.6 it/s,
        # plus loading; peak ~8 GiB (a decode of 7 at 512²)
        "gpu": {"NUM_DIVISIONS": 6, "ORACLE_SEEDS": 4,
                "PROMPT_A": "a photograph of a red vintage car on a country road",
                "PROMPT_B": "an oil painting of a lighthouse on a cliff at sunset",
                "PROMPT_PAIRS": [["a photograph of a red vintage car on a country road",
                                  "an oil painting of a lighthouse on a cliff at sunset"],
                                 ["a photograph of an astronaut riding a horse",
                                  "a watercolor painting of a fox in a snowy forest"],
                                 ["a close-up photograph of a bowl of ramen", "a pencil sketch of an old oak tree"],
                                 ["a photograph of a snowy mountain at dawn", "a pixel art castle on a hill"]]},
    },
    "06a": {  # smoke: 4 steps, 2 entries, 2 scales, 1 window (cpu: 20 steps, all of them)
        "smoke": {"STEPS": 4, "N_ENTRIES": 2, "CONDITIONING_SCALES": [0.0, 1.0], "GUIDANCE_WINDOWS": [[0.0, 0.5]]},
        "cpu": {},
        # SD 1.5 at 512² to 768×512, 20 steps, three ControlNets loaded (fp16, ~5 GB of weights with SD 1.5); with 06b
        # (~4,750 its in all: UNet steps of batch 2 at 64² latents; a ControlNet adds ~0.45 of one, pixels scale it, a
        # 512² decode counts 2) ≈ 10.4 min at a T4's ~7.6 it/s, plus loading; peak ~9 GiB (a decode of 5 at 512²)
        "gpu": {"ENTRY_PROMPTS": {  # real prompts laid out as the depth maps are (objects on a receding floor)
            "1_grey8": "a photograph of an orange on the left of an empty wooden table, dark background",
            "2_grey16": "a photograph of a small wooden box in the middle of an empty room",
            "3_rgb": "a photograph of a cardboard box next to a football on a lawn",
            "4_rgba": "a photograph of a large glass sphere on the right of a marble floor",
            "5_grey8": "a photograph of a small stone pyramid beside a blue crystal on the sand",
            "nocrop": "a photograph of a red ball and a blue box on a white floor, studio lighting"}},
    },
    "06b": {  # smoke: 4 steps, 1 seed per aspect (cpu: 20 steps, 4 seeds)
        "smoke": {"STEPS": 4, "ASPECT_SEEDS": 1},
        "cpu": {},
        "gpu": {"ASPECT_SEEDS": 2, "TEXT_ONLY_PROMPT": "a portrait photograph of an old fisherman",
                "MAP_PROMPT": "a photograph of a red ball and a blue box on a white floor, studio lighting"},
    },
    "07": {  # smoke: 8-step baseline, 2 prompts, 1 repeat, a few rungs (no compile, no OpenVINO export), one LCM
        "smoke": {"N_PROMPTS": 2, "BASELINE_STEPS": 8, "REPEATS": 1, "MIN_RUN_S": 0.0, "QUALITY_BATCH": 2,
                  "SCHEDULER_RUNGS": ["dpm++"], "STEP_RUNGS": [4],
                  "OPTIMISATION_RUNGS": ["fp16", "cfg_cutoff", "deepcache", "tgate", "tiny_vae", "lcm 1"],
                  "COMBINED_RUNGS": ["dpm++ 4 + cfg_cutoff + deepcache + tiny_vae"], "SHOW_RUNGS": 2,
                  "FINALISTS": 2, "HEAD_TO_HEAD_ROUNDS": 2},
        # cpu (the parameters cell, ~3.5 min on 2 cores): two schedulers at 10 and 6 steps and Align Your Steps;
        # alone on the 50-step baseline the levers that change what is computed (guidance cut-off, DeepCache, T-GATE)
        # and two that change only how (channels_last, OpenVINO f32: equality-checked on 6 pictures); the LCM rungs; the
        # combinations that reach the recommendation (LCM 1 step + OpenVINO bf16 or NNCF int8). full: every rung of the
        # ladder, each priced in full.
        "cpu": {},
        "full": {"MIN_RUN_S": 2.0, "EQUALITY_IMAGES": 0, "SCHEDULER_RUNGS": ["ddim", "euler", "dpm++", "unipc"],
                 "STEP_RUNGS": [30, 20, 10, 6, 4],
                 "OPTIMISATION_RUNGS": ["half", "fp16", "channels_last", "attention_slicing", "classic_attention",
                                        "fused_qkv", "compile", "cfg_cutoff", "deepcache", "tgate", "tome",
                                        "control_end", "tiny_vae", "openvino", "openvino + bf16", "int8 + compile",
                                        "openvino + int8", "lcm 4", "lcm 2", "lcm 1"],
                 "COMBINED_RUNGS": ["ays 10", "ays 10 + cfg_cutoff", "dpm++ 10 + cfg_cutoff + openvino",
                                    "dpm++ 10 + cfg_cutoff + deepcache", "dpm++ 10 + tgate",
                                    "dpm++ 6 + deepcache", "dpm++ 6 + openvino + bf16",
                                    "dpm++ 6 + cfg_cutoff + openvino + bf16", "dpm++ 4 + openvino + bf16",
                                    "dpm++ 4 + cfg_cutoff + openvino + bf16",
                                    "dpm++ 6 + cfg_cutoff + openvino + bf16 + tiny_vae",
                                    "dpm++ 4 + cfg_cutoff + openvino + bf16 + tiny_vae", "lcm 4 + openvino + bf16",
                                    "lcm 2 + openvino + bf16", "lcm 1 + openvino + bf16",
                                    "lcm 1 + openvino + bf16 + tiny_vae", "dpm++ 6 + cfg_cutoff + openvino + int8",
                                    "lcm 1 + openvino + int8"],
                 "FINALISTS": 3, "HEAD_TO_HEAD_ROUNDS": 10},
        # SD 1.5 + depth ControlNet at 512² on a 16 GB T4, baseline fp16 PNDM 50 steps, every rung fp16 (no OpenVINO,
        # no bf16: a T4 only emulates it). Time, from FLOPs (flop_counter) at the T4's ~7.6 it/s for SD 1.5's UNet
        # (1,607 GFLOP a step at batch 2 with CFG, so ~12.2 TFLOP/s): a step with the ControlNet (+567 GFLOP) 0.18 s,
        # the decode (2,515 GFLOP an image) 0.21 s; a request of S steps ~0.18 S + 0.2 s (50 steps: 9.1 s). A rung
        # costs 1 warm-up + REPEATS timed requests + N_PROMPTS quality images = 7 requests: 64 s at 50 steps, 26 s at
        # 20, 14 s at 10. Baseline 64 + 4 steps rungs 81 + 4 optimisations at 50 steps 255 + 8 combinations 186 +
        # 3 LCM rungs at 2-4 steps (one UNet pass a step: no CFG) ≤ 24 + bottlenecks 9 + head to head ((1 + 3 rounds)
        # × (baseline + 2 finalists) ≤ 109) + one compile (~180 s of inductor on Colab's 2 vCPUs) ≈ 910 s, about
        # 15 min before the speed-ups (tests/test_latency.py checks it).
        # Memory: the fp16 base without the safety checker is 2.9 GB (UNet 1.72, ControlNet 0.72, text encoder 0.25,
        # VAE 0.17); a rung's copy owns only what it changes (channels_last re-lays the conv weights, ≤ 2.6 GB; an LCM
        # rung fuses the LCM-LoRA into new weights, 1.7 GB) and is freed after it; 4 quality images at a time (UNet
        # batch 8, a decode of 4 at 512²) and 2 finalists beside the baseline stay well inside 15 GiB.
        "gpu": {"N_PROMPTS": 4, "REPEATS": 2, "MIN_RUN_S": 0.0, "QUALITY_BATCH": 4, "FINALISTS": 2,
                "HEAD_TO_HEAD_ROUNDS": 3, "SCHEDULER_RUNGS": ["dpm++", "unipc"], "STEP_RUNGS": [20, 10],
                "OPTIMISATION_RUNGS": ["channels_last", "fused_qkv", "deepcache", "tome"],
                "COMBINED_RUNGS": ["dpm++ 20 + classic_attention", "dpm++ 20 + channels_last + fused_qkv",
                                   "dpm++ 20 + channels_last + fused_qkv + compile",
                                   "dpm++ 20 + cfg_cutoff + control_end + tiny_vae",
                                   "dpm++ 20 + channels_last + fused_qkv + cfg_cutoff + tiny_vae",
                                   "dpm++ 20 + deepcache + tiny_vae", "dpm++ 20 + tgate + tiny_vae",
                                   "dpm++ 10 + channels_last + fused_qkv + cfg_cutoff + tiny_vae",
                                   "dpm++ 10 + channels_last + fused_qkv + tome + tiny_vae",
                                   "lcm 4 + channels_last", "lcm 4 + channels_last + fused_qkv + tiny_vae",
                                   "lcm 2 + channels_last + fused_qkv + tiny_vae"]},
    },
    "08": {  # smoke: 3 star pictures, 4 class pictures, 8 LoRA steps, 4-step sampling (cpu: 800 steps, N=128)
        "smoke": {"N_INSTANCE": 3, "N_CLASS_IMAGES": 4, "TRAIN_STEPS": 8, "LEARNING_RATE": 0.005, "BATCH_SIZE": 2,
                  "STEPS": 4, "SEEDS": [100, 101], "N_CONTEXT_SEEDS": 1, "N_HELDOUT": 4, "N_VALIDATION": 8,
                  "CONTEXT_PROMPTS": ["a {} on the right on a brown background", "a green {}"]},
        "cpu": {},
        # SD 1.5 on your photos (3-5 in my_subject/; none there: diffusers' sample dog) in fp16 on a T4, 512², 25
        # steps, in its (UNet steps of batch 2 at 64² latents, 1.61 TFLOP; a 512² decode, 2.5 TFLOP, counted as 2):
        # 5 + 9 pictures before and after (4 seeds, the unrelated prompt, the reloaded adapter) ~380, 100 class
        # pictures ~2,700, 8 context pictures ~220, 400 LoRA steps of 1 subject + 1 class picture ~1,240 (a step is
        # ~3.1 its: forward and backward to the activations 3.45 TFLOP, plus the forward again that gradient
        # checkpointing recomputes), eval losses ~20: ~4,560 its ≈ 10 min at a T4's ~7.6 it/s, plus the download and
        # two loads: about 12-13 min. Peak ~9 GiB (SD 1.5 fp16 ~2.6 GB, twice while the reloaded adapter is checked;
        # a decode of 8 at 512² 6 GiB); training with checkpointing ~5 GiB.
        "gpu": {
            "IDENTIFIER": "sks", "CLASS_NOUN": "dog", "PROMPT_TEMPLATE": "a photo of {}", "INSTANCE_DIR": "my_subject",
            "CLASS_PROMPTS": "class noun", "CLASS_PICTURES": "generated", "N_CLASS_IMAGES": 100, "CLASS_BATCH_SIZE": 4,
            "TRAIN_STEPS": 400, "LEARNING_RATE": 0.0001, "LORA_RANK": 4, "LORA_TARGETS": "attention", "BATCH_SIZE": 1,
            "PRIOR_LOSS_WEIGHT": 1.0, "PRIOR_TARGET": "picture", "PRIOR_CAPTION_DROPOUT": 0.0,
            "GRADIENT_CHECKPOINTING": True, "OBJECT_WEIGHT": 1.0, "STEPS": 25,
            "UNRELATED_PROMPT": "a photo of a mountain lake", "N_CONTEXT_SEEDS": 2,
            "CONTEXT_PROMPTS": ["a {} on the beach", "a {} in the snow", "a watercolor painting of {}",
                                "a {} wearing a red hat"]},
    },
}


def resolve_profile(profile: str) -> str:
    if profile not in PROFILE_NAMES:
        raise ValueError(f"profile={profile!r} is unknown; choose one of {PROFILE_NAMES}")
    if profile != "auto":
        return profile
    from helpers.core.accelerator import on_gpu
    from helpers.core.models import hub_reachable

    return "gpu" if on_gpu() and hub_reachable() else "cpu"


def parameters_for(notebook_number: str, profile: str) -> dict:
    """The papermill parameters of one notebook under a (resolved) profile."""
    return {"PROFILE": profile, **COMMON[profile], **NOTEBOOK_OVERRIDES.get(notebook_number, {}).get(profile, {})}


# What the rehearsal (`python -m helpers rehearse`, SD 1.5 shapes computed on a CPU) shrinks of the settings in
# force, because a CPU cannot afford them; everything else runs as a T4 user's would. "steps" stands for the
# rehearsal's --steps and "size" for its --size; the image size is also capped in `stages.default_size`.
REHEARSAL: dict[str, dict] = {
    "01": {},
    # 02: at least 2 steps, since its img2img at strength 0.7 runs int(steps × 0.7) of them
    "02": {"STEPS": "steps_at_least_2", "HEIGHT": "size", "WIDTH": "size", "GRID_STEPS": [1, "steps_at_least_2"],
           "GRID_GUIDANCE": [1.0, 7.5], "CALLBACK_EVERY": 1, "ORACLE_SAMPLES": 2},
    "03": {"N": 2, "STEPS": "steps", "HEIGHT": "size", "WIDTH": "size", "MAX_BATCH": 2, "REPEATS": 1,
           "MIN_RUN_S": 0.0, "CHUNK_DEMO_MAX_BATCH": 1, "OOM_DEMO_LIMIT": 1, "LOAD_REPEATS": 1, "SWEEP_MAX": 2},
    "04": {"STEPS": "steps", "HEIGHT": "size", "WIDTH": "size", "NUM_DIVISIONS": 2, "MIDPOINT_SEEDS": 1,
           "NORM_PAIRS": 4},
    "05": {"STEPS": "steps", "HEIGHT": "size", "WIDTH": "size", "NUM_DIVISIONS": 2, "ORACLE_SEEDS": 1,
           "NORM_PAIRS": 4},
    "06a": {"STEPS": "steps", "N_ENTRIES": 1, "CONDITIONING_SCALES": [0.0, 1.0], "GUIDANCE_WINDOWS": [[0.0, 0.5]]},
    "06b": {"STEPS": "steps", "ASPECT_SEEDS": 1, "ASPECTS": ["1:1", "16:9"]},
    # 07's gpu combinations run at 20 and 10 steps: an SD 1.5-shaped fp16 step with its ControlNet takes ~11 s on one
    # CPU thread even at 64² (fp16 has no fast CPU kernels), an hour in all; here each lever in combination at 1 step
    "07": {"N_PROMPTS": 1, "BASELINE_STEPS": "steps", "REPEATS": 1, "MIN_RUN_S": 0.0, "QUALITY_BATCH": 1,
           "STEP_RUNGS": [1], "FINALISTS": 1, "HEAD_TO_HEAD_ROUNDS": 1, "SCHEDULER_RUNGS": ["dpm++"],
           "COMBINED_RUNGS": ["dpm++ 1 + classic_attention", "dpm++ 1 + channels_last + fused_qkv + compile",
                              "dpm++ 1 + channels_last + fused_qkv + cfg_cutoff + tiny_vae",
                              "dpm++ 1 + deepcache + tiny_vae", "dpm++ 1 + tome + control_end",
                              "lcm 1 + channels_last"]},
    "08": {"N_CLASS_IMAGES": 2, "CLASS_BATCH_SIZE": 1, "TRAIN_STEPS": 2, "STEPS": "steps", "N_CONTEXT_SEEDS": 1,
           "SEEDS": [100], "N_HELDOUT": 1, "N_VALIDATION": 1},
}


def rehearsal_shrinks(notebook_number: str, steps: int, size: int | None = None) -> dict:
    """REHEARSAL's knob values for one notebook, with "steps" (and "size") filled in."""

    def fill(value):
        if isinstance(value, list):
            return [fill(v) for v in value]
        named = {"steps": steps, "steps_at_least_2": max(steps, 2), "size": size}
        return named.get(value, value) if isinstance(value, str) else value

    return {knob: fill(value) for knob, value in REHEARSAL.get(notebook_number, {}).items()
            if not (value == "size" and size is None)}


# The series' notebooks: "NN_name.ipynb", and the parts of a notebook split in two, "NNa_name.ipynb", "NNb_name.ipynb".
NOTEBOOK_GLOB = "[0-9][0-9]*_*.ipynb"


def notebook_number(notebook: str | Path) -> str:
    """"06a" of "06a_controlnet.ipynb" (a path, file name or stem): what profiles, rehearsal shrinks and the records
    in outputs/ (06a_*.json) are keyed by."""
    return Path(notebook).name.split("_", 1)[0]
