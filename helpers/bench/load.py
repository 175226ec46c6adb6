"""Benchmark: partial loading of a single-file SD 1.5 checkpoint, vs loading the whole file.

    python -m helpers bench load [--repeats 3] [--modes tensors,model] [--cache-dir DIR] [--small]

The checkpoint is SD 1.5-shaped (UNet 859.5 M params, CLIP ViT-L/14 text encoder, the real VAE) with random
fp16 weights, in the original LDM key layout (`helpers.core.ldm`), ~2.1 GB. It is generated once into the cache
folder (default `outputs/cache/`, git-ignored) and reused. `--small` uses the tiny test model instead (a
few MiB, seconds) to check the machinery.

Every load runs in a fresh process with the file evicted from the page cache (see `helpers.studies.partial`), so
each row is a cold load. Prints the table and writes `outputs/bench_load.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from helpers.core import ldm
from helpers.core.measure import MiB, timed

CHECKPOINT_NAME = "sd15-random-fp16-ldm.safetensors"


def _meta_models(configs: dict) -> dict:
    """The three networks on the meta device: real shapes, no memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel(**configs["unet"]),
            "vae": AutoencoderKL(**configs["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        }


def write_config_folder(models: dict, folder: Path) -> Path:
    """A diffusers-style folder with one config per component, as `from_single_file(config=...)` wants it."""
    for name, model in models.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        if name == "text_encoder":
            model.config.save_pretrained(folder / name)
        else:
            model.save_config(folder / name)
    return folder


def write_random_ldm_checkpoint(configs: dict, path: Path, dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """An LDM-layout single file with random weights at the shapes `configs` give (never the real weights)."""
    models = _meta_models(configs)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for component, prefix in ldm.LDM_PREFIXES.items():
        for key, meta in ldm._TO_LDM[component](models[component]).items():
            if meta.is_floating_point():
                value = torch.randn(meta.shape, generator=generator).mul_(0.02).to(dtype)
            else:
                value = torch.zeros(meta.shape, dtype=meta.dtype)
            state[prefix + key] = value
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "layout": "ldm", "weights": "random (benchmark only)"})
    tmp.replace(path)
    write_config_folder(models, path.with_suffix(""))
    return path


def ensure_checkpoint(cache_dir: Path, small: bool = False) -> tuple[Path, Path]:
    """(checkpoint path, config folder), generating them on the first call."""
    from helpers.core.random_models import TINY_TEXT_ENCODER_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG, sd15_configs

    if small:
        configs = {"unet": TINY_UNET_CONFIG, "vae": TINY_VAE_CONFIG, "text_encoder": TINY_TEXT_ENCODER_CONFIG}
        path = cache_dir / "tiny-random-fp16-ldm.safetensors"
    else:
        configs = sd15_configs()
        path = cache_dir / CHECKPOINT_NAME
    config_dir = path.with_suffix("")
    if not (path.is_file() and (config_dir / "unet" / "config.json").is_file()):
        print(f"generating {path} (random weights, real shapes; once) ...", flush=True)
        seconds: dict[str, float] = {}
        with timed(seconds, "write", "cpu"):
            write_random_ldm_checkpoint(configs, path)
        print(f"  {path.stat().st_size / 1e9:.2f} GB in {seconds['write']:.0f} s", flush=True)
    return path, config_dir


def main(argv: list[str]) -> int:
    from helpers.core.results import format_table, outputs_dir, record_results
    from helpers.studies.partial import TABLE_COLUMNS, compare

    parser = argparse.ArgumentParser(prog="python -m helpers bench load", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="tensors,model", help="comma list of: tensors, model")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: outputs/cache")
    parser.add_argument("--small", action="store_true", help="the tiny model instead of SD 1.5 (a quick check)")
    parser.add_argument("--warm", action="store_true", help="do not evict the file from the page cache")
    args = parser.parse_args(argv)

    cache_dir = args.cache_dir or outputs_dir() / "cache"
    path, config_dir = ensure_checkpoint(cache_dir, args.small)
    shares = ldm.component_byte_ranges(path)
    size = path.stat().st_size
    print(f"checkpoint: {path} ({size / 1e9:.3f} GB)")
    for component, entry in shares.items():
        if entry["tensors"]:
            print(
                f"  {component:13s} {entry['tensors']:5d} tensors  {entry['bytes'] / MiB:9.1f} MiB  "
                f"{entry['share']:6.1%} of the file"
            )

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    rows = compare(path, config_dir, modes=modes, repeats=args.repeats, cold=not args.warm)
    print()
    print(format_table(rows, TABLE_COLUMNS))

    te = next((r for r in rows if r["mode"] == "tensors" and r["component"] == "text_encoder"), None)
    target = None
    if te is not None:
        target = {
            "text_encoder_read_share": te["read_share"],
            "text_encoder_tensor_share": te["tensor_share"],
            "text_encoder_time_vs_full": te["time_vs_full"],
            "met": bool(te["read_share"] <= 1.25 * te["tensor_share"] and te["time_vs_full"] <= 0.25),
        }
        print(
            f"\ntarget (text encoder reads ~its share, in <= 1/4 of the full load's time): "
            f"read {te['read_share']:.1%} of the file (its tensors: {te['tensor_share']:.1%}), "
            f"time {te['time_vs_full']:.2f} x full -> {'MET' if target['met'] else 'NOT MET'}"
        )
    out = record_results(
        "bench_load",
        {
            "checkpoint": str(path),
            "checkpoint_bytes": size,
            "small": args.small,
            "cold": not args.warm,
            "repeats": args.repeats,
            "bytes_read_source": "/proc/self/io read_bytes of a fresh process, file evicted with posix_fadvise",
            "shares": shares,
            "rows": rows,
            "target": target,
        },
    )
    print(f"wrote {out}")
    json.dumps(rows)  # fail here, not later, if a row is not JSON-friendly
    return 0
