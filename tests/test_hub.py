"""The local hub (`checkpoints.hub`): the full hub is built once (conftest's `local_hub_cache`, into outputs/cache/hub,
as a user's `python -m helpers hub build` does; the rehearsal reads the same one), then read offline through the code a
user runs, each check in a fresh Python with `HF_HUB_OFFLINE=1 HF_HUB_CACHE=<folder>` set before any import (the
hub library reads both once, at import). The build itself (its report, a second build, a forced rebuild) is checked
on the two small repos, built by the command line into a temporary folder.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers.checkpoints import hub
from helpers.core.models import SD15_HUB_ID, TAESD_HUB_ID

SMALL = [TAESD_HUB_ID, hub.DOG_DATASET_ID]


@pytest.fixture(scope="module")
def small_hub(tmp_path_factory):
    """(cache folder, what the build printed): `python -m helpers hub build --repos` of the small repos."""
    cache = tmp_path_factory.mktemp("hub")
    result = subprocess.run(
        [sys.executable, "-m", "helpers", "hub", "build", "--cache", str(cache), "--repos", *SMALL],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    yield cache, result.stdout
    shutil.rmtree(cache)


@pytest.fixture(scope="module")
def local_hub(local_hub_cache):
    return local_hub_cache, ""


def offline(cache, code: str, tmp_path, **env) -> dict:
    """Run `code` in a fresh Python, offline against `cache`, from a working directory outside the repo; the last
    line it prints is JSON, returned."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1", **env}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_build_reports_time_and_disk_and_a_second_build_is_a_no_op(small_hub):
    cache, printed = small_hub
    assert "GB of disk" in printed and "built 2 repo(s) in" in printed, printed
    markers = {r: hub.repo_folder(cache, r, hub.hub_repos()[r][0]) / hub.MARKER for r in SMALL}
    before = {r: m.stat().st_mtime_ns for r, m in markers.items()}
    lines = []
    start = time.perf_counter()
    hub.build_local_hub(cache, repos=SMALL, progress=lines.append)
    assert time.perf_counter() - start < 10
    assert {r: m.stat().st_mtime_ns for r, m in markers.items()} == before
    assert "all 2 repos already built" in lines[-1]


def test_forced_rebuild_is_reproducible(small_hub):
    """--force rebuilds from scratch; one seed per repo makes the files byte for byte the same."""
    cache, _ = small_hub
    repos = SMALL

    def files():
        out = {}
        for repo_id in repos:
            folder = hub.repo_folder(cache, repo_id, hub.hub_repos()[repo_id][0])
            out.update({str(p.relative_to(cache)): p.read_bytes() for p in folder.rglob("*")
                        if p.is_file() and p.name != hub.MARKER})
        return out

    before = files()
    hub.build_local_hub(cache, repos=repos, force=True, progress=lambda line: None)
    assert files() == before


def test_sd15_loads_from_the_local_hub_with_the_real_shapes(local_hub, tmp_path):
    cache, _ = local_hub
    got = offline(cache, """
        import json, torch, numpy as np
        from diffusers import StableDiffusionPipeline
        from helpers.checkpoints.hub import SD15_PROMPT_WORDS
        from helpers.core.random_models import count_parameters
        pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", variant="fp16",
                                                       dtype=torch.float16)
        counts = {name: count_parameters(getattr(pipe, name))
                  for name in ("unet", "vae", "text_encoder", "safety_checker")}
        images = np.random.default_rng(0).random((1, 64, 64, 3)).astype(np.float32)
        pipe.safety_checker.float()  # fp16 matmuls crawl on a CPU
        _, flagged = pipe.run_safety_checker(images, "cpu", torch.float32)
        words = ["sks", "dog", "astronaut", "photograph", "watercolor", "painting", "mountain"]
        pieces = {w: len(pipe.tokenizer(w, add_special_tokens=False).input_ids) for w in words}
        print(json.dumps({"counts": counts, "flagged": [bool(f) for f in flagged], "pieces": pieces,
                          "dtype": str(pipe.unet.dtype), "feature_extractor": type(pipe.feature_extractor).__name__,
                          "scheduler": type(pipe.scheduler).__name__}))
        """, tmp_path)
    from helpers.core.random_models import SD15_UNET_PARAMS

    assert got["counts"]["unet"] == SD15_UNET_PARAMS
    assert got["counts"]["text_encoder"] == 123_060_480  # CLIP ViT-L/14's text tower
    assert got["counts"]["vae"] == 83_653_863
    assert got["counts"]["safety_checker"] > 300_000_000  # CLIP ViT-L/14's image tower
    assert got["dtype"] == "torch.float16" and got["scheduler"] == "PNDMScheduler"
    assert got["feature_extractor"].startswith("CLIPImageProcessor")
    assert got["flagged"] == [False]  # a random image passes the random safety checker
    assert set(got["pieces"].values()) == {1}, got["pieces"]


def test_load_pipeline_auto_and_a_controlnet_on_a_t4(local_hub, tmp_path):
    cache, _ = local_hub
    got = offline(cache, """
        import json, torch
        from diffusers import ControlNetModel
        from helpers.core import accelerator
        from helpers.core.models import load_pipeline, resolve_model
        from helpers.core.random_models import count_parameters, sd15_unet_on_meta
        accelerator.accelerator.cache_clear()
        pipe = load_pipeline("auto", controlnet="depth", safety_checker=False)
        with torch.device("meta"):
            expected = count_parameters(ControlNetModel.from_unet(sd15_unet_on_meta()))
        print(json.dumps({"model": resolve_model("auto"), "dtype": str(pipe.unet.dtype),
                          "pipeline": type(pipe).__name__, "unet": pipe.unet.config._name_or_path,
                          "controlnet": count_parameters(pipe.controlnet), "expected": expected,
                          "embedding": list(pipe.controlnet.config.conditioning_embedding_out_channels)}))
        """, tmp_path, SD_PRETEND_ACCELERATOR="t4")
    assert got["model"] == SD15_HUB_ID  # "auto" on a T4 when the hub (here its local cache) answers
    repo = hub.repo_folder(cache, SD15_HUB_ID).resolve()
    assert repo in Path(got["unet"]).resolve().parents  # read from the local hub
    assert got["dtype"] == "torch.float16"  # the fp16 variant, as on a T4
    assert got["pipeline"] == "StableDiffusionControlNetPipeline"
    assert got["controlnet"] == got["expected"]
    assert got["embedding"] == [16, 32, 96, 256]


def test_the_single_file_downloads_and_loads_with_the_cached_config(local_hub, tmp_path):
    cache, _ = local_hub
    got = offline(cache, """
        import json, os, torch
        from diffusers import AutoencoderKL, StableDiffusionPipeline
        from huggingface_hub import hf_hub_download
        from helpers.core.ldm import load_component_from_single_file
        from helpers.core.random_models import count_parameters
        path = hf_hub_download("stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors")
        config = os.path.dirname(path)  # the cached repo: its configs, tokenizer and scheduler
        pipe = StableDiffusionPipeline.from_single_file(path, config=config, local_files_only=True)
        vae = load_component_from_single_file(path, "vae", config, partial=True)
        folder_vae = AutoencoderKL.from_pretrained(config, subfolder="vae", variant="fp16")
        same = all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), folder_vae.state_dict().values()))
        print(json.dumps({"unet": count_parameters(pipe.unet), "text_encoder": count_parameters(pipe.text_encoder),
                          "vae_same_as_folder": same, "bytes": os.path.getsize(path)}))
        """, tmp_path)
    from helpers.core.random_models import SD15_UNET_PARAMS

    assert got["unet"] == SD15_UNET_PARAMS and got["text_encoder"] == 123_060_480
    assert got["vae_same_as_folder"]  # one set of networks, in both layouts
    assert 2.0e9 < got["bytes"] < 2.3e9  # fp16: half the hub's 4.27 GB


def test_depth_estimator_and_the_sample_subject_dataset(local_hub, tmp_path):
    cache, _ = local_hub
    got = offline(cache, """
        import json, os
        import PIL.Image
        from huggingface_hub import snapshot_download
        from helpers.studies.control import estimate_depth
        depth = estimate_depth(PIL.Image.new("RGB", (96, 64), (120, 90, 60)))
        folder = snapshot_download("diffusers/dog-example", repo_type="dataset")
        sizes = [PIL.Image.open(os.path.join(folder, name)).size for name in sorted(os.listdir(folder))
                 if name.endswith(".jpeg")]
        readme = open(os.path.join(folder, "README.md")).read()
        print(json.dumps({"depth": list(depth.depth.shape), "range": [float(depth.depth.min()),
                          float(depth.depth.max())], "sizes": sizes, "stand_in": "STAND-IN" in readme}))
        """, tmp_path)
    assert got["depth"] == [64, 96] and got["range"] == [0.0, 1.0]
    assert got["sizes"] == [[512, 512]] * 5
    assert got["stand_in"]


def test_the_lcm_lora_stand_in_loads_into_sd15_as_the_published_one_does(local_hub, tmp_path):
    """latent-consistency/lcm-lora-sdv1-5's file name, format (kohya keys with an alpha per layer, fp16) and rank 64:
    the ladder's `use_lcm_lora` loads it offline into SD 1.5, every layer of the file adapted (278, 67 M parameters:
    the published file's 134 MB)."""
    from helpers.core.models import LCM_LORA_HUB_ID

    cache, _ = local_hub
    got = offline(cache, """
        import json, torch
        from huggingface_hub import hf_hub_download
        from peft.tuners.tuners_utils import BaseTunerLayer
        from safetensors.torch import load_file
        from helpers.core.models import load_pipeline
        from helpers.studies import latency
        weights = load_file(hf_hub_download("latent-consistency/lcm-lora-sdv1-5", "pytorch_lora_weights.safetensors"))
        pipe = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", dtype=torch.float16, device="cpu",
                             safety_checker=False)
        latency.use_lcm_lora(pipe)
        print(json.dumps({"keys": sorted(weights)[:3], "n": len(weights),
                          "ranks": sorted({v.shape[0] for k, v in weights.items() if k.endswith("lora_down.weight")}),
                          "dtypes": sorted({str(v.dtype) for v in weights.values()}),
                          "parameters": sum(v.numel() for v in weights.values() if v.dim()),
                          "adapted": sum(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules()),
                          "scheduler": type(pipe.scheduler).__name__}))
        """, tmp_path)
    assert hub.repo_folder(cache, LCM_LORA_HUB_ID).exists()
    assert got["keys"][0].startswith("lora_unet_down_blocks_0_") and got["n"] == 3 * 278, got["keys"]
    assert got["ranks"] == [64] and got["dtypes"] == ["torch.float16"]
    assert got["parameters"] == 67_252_224 and got["adapted"] == 278
    assert got["scheduler"] == "LCMScheduler"
