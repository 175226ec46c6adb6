"""A local Hugging Face hub: random weights at the real shapes, under the real repo ids, in a hub cache folder.

`build_local_hub(cache_dir)` (or `python -m helpers hub build`) writes the folder that `huggingface_hub` reads when
offline, so that with `HF_HUB_OFFLINE=1 HF_HUB_CACHE=<cache_dir>` a user's own code, with no special branch,
loads everything the series asks the hub for:

- `stable-diffusion-v1-5/stable-diffusion-v1-5`: every component of `StableDiffusionPipeline` (the real configs,
  `model_index.json`, fp16 variant weights), plus the single file `v1-5-pruned-emaonly.safetensors`;
- the three lllyasviel v1.1 ControlNets, `madebyollin/taesd`, the LCM-LoRA `latent-consistency/lcm-lora-sdv1-5`
  (notebook 07's lcm rungs), and the depth estimator `estimate_depth` uses;
- a stand-in for the dataset `diffusers/dog-example` (5 synthetic photos of one subject).

The weights are random, so images are noise, but compute, memory and loading follow the real model's. A repo folder
is `models--org--name/` (`datasets--org--name/`) holding `refs/main` (a revision string) and
`snapshots/<revision>/<files>` as plain files (the real cache keeps blobs and symlinks; plain files read the same).
Each repo is built once: a marker file written last says it is complete, so a second build returns in seconds.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import shutil
import time
import zlib
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from helpers import DATA_DIR
from helpers.checkpoints.download import SD15_FILENAME

# Deliberately light (`python -m helpers` imports it for its help): the core and the toy, which pull in torch and
# diffusers, are imported inside the functions that build a hub.

# Bump when what a repo holds changes: every cache built by an older version is rebuilt.
HUB_BUILD_VERSION = 1
MARKER = ".sd-dissected-complete.json"

DEPTH_HUB_ID = "depth-anything/Depth-Anything-V2-Small-hf"  # helpers.studies.control.estimate_depth's default
DOG_DATASET_ID = "diffusers/dog-example"  # the subject of diffusers' DreamBooth docs (notebook 08's sample)

# Words of the series' SD 1.5 prompts (and diffusers' examples): our tokenizer makes each of them one token, as the
# real CLIP vocabulary does; any other word is split into byte pieces, which still works.
SD15_PROMPT_WORDS = """
sks dog dogs puppy cat kitten bird horse astronaut riding mars moon space rocket robot dragon castle knight princess
wizard lake river waterfall ocean wave island desert valley hill field meadow garden park road bridge tower temple
village cabin room kitchen bedroom library window door table chair sofa bed lamp cup bowl apple fruit vase flowers rose
sunflower sunset sunrise sunlight night stars clouds rain snow fog storm autumn winter spring summer golden hour
wearing hat glasses scarf sweater jacket dress suit crown helmet armor sitting standing running jumping sleeping
lying looking smiling playing flying swimming walking holding grass sand rock stone wood wooden metal glass
photograph photography photorealistic hyperrealistic realistic render rendering illustration sketch watercolor oil
acrylic pencil charcoal ink anime cartoon comic pixel art digital concept matte style by artist greg rutkowski
studio ghibli van gogh monet trending artstation unreal engine octane cinematic lighting volumetric dramatic soft
light shadow bokeh depth field lens wide angle closeup close up macro shot view aerial landscape scenery highly
intricate sharp focus masterpiece best beautiful cute happy old young elegant colorful vibrant dark bright
4k 8k hd uhd dslr canon nikon 35mm 50mm film grain vintage retro modern futuristic cyberpunk steampunk fantasy
magical epic serene peaceful cozy misty foggy frozen icy fluffy furry corgi golden retriever labrador bulldog
worst jpeg artifacts deformed disfigured bad anatomy extra limbs watermark text signature cropped out frame
duplicate mutated poorly drawn noisy grainy overexposed underexposed lowres normal
""".split()

# CLIP ViT-L/14's image tower, as in SD 1.5's safety_checker/config.json (the checker uses only this tower).
CLIP_VIT_L14_VISION_CONFIG = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "image_size": 224,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 768,
}
SD15_MODEL_INDEX = {  # stable-diffusion-v1-5/stable-diffusion-v1-5's model_index.json
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "requires_safety_checker": True,
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SD15_FEATURE_EXTRACTOR_CONFIG = {  # feature_extractor/preprocessor_config.json (CLIP's image preprocessing)
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
}
# lllyasviel's v1.1 SD 1.5 ControlNets (depth, normalbae, canny share it): SD 1.5's UNet encoder, as
# `ControlNetModel.from_unet` builds it, with the conditioning image's embedding network.
SD15_CONTROLNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "class_embed_type": None,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "global_pool_conditions": False,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default",
    "upcast_attention": False,
    "use_linear_projection": False,
}
TAESD_CONFIG = {  # madebyollin/taesd's config.json (equal to AutoencoderTiny's defaults in diffusers 0.42)
    "act_fn": "relu",
    "decoder_block_out_channels": [64, 64, 64, 64],
    "encoder_block_out_channels": [64, 64, 64, 64],
    "force_upcast": False,
    "in_channels": 3,
    "latent_channels": 4,
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "num_decoder_blocks": [3, 3, 3, 1],
    "num_encoder_blocks": [1, 3, 3, 3],
    "out_channels": 3,
    "scaling_factor": 1.0,
    "upsampling_scaling_factor": 2,
}
# Depth Anything V2 Small: a DINOv2-small backbone (features of layers 3, 6, 9, 12) and the DPT head; the rest of
# DepthAnythingConfig's defaults are the small model's.
DEPTH_BACKBONE_CONFIG = {
    "hidden_size": 384,
    "image_size": 518,
    "num_attention_heads": 6,
    "out_features": ["stage3", "stage6", "stage9", "stage12"],
    "out_indices": [3, 6, 9, 12],
    "patch_size": 14,
    "reshape_hidden_states": False,
}
DEPTH_PREPROCESSOR_CONFIG = {
    "do_normalize": True,
    "do_pad": False,
    "do_rescale": True,
    "do_resize": True,
    "ensure_multiple_of": 14,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "DPTImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "keep_aspect_ratio": True,
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 518, "width": 518},
    "size_divisor": None,
}
LCM_LORA_RANK = 64  # latent-consistency/lcm-lora-sdv1-5's rank (and lora_alpha: scale 1)
LCM_LORA_FILE = "pytorch_lora_weights.safetensors"
DOG_EXAMPLE_README = """# diffusers/dog-example: a STAND-IN built by sd-dissected

This is not the hub's dataset. `python -m helpers hub build` drew these 5 pictures of one cartoon dog (the same
brown dog with a red collar in five places) with PIL, so that notebook 08 finds a sample subject offline, through the
same `huggingface_hub.snapshot_download("diffusers/dog-example", repo_type="dataset")` a user runs. The real dataset
holds 5 photos of one dog (the subject of diffusers' DreamBooth docs).
"""


def default_cache_dir() -> Path:
    from helpers.core.results import outputs_dir

    return outputs_dir() / "cache" / "hub"


def revision_of(repo_id: str) -> str:
    """The commit hash `refs/main` names: fixed per repo and build version, so a rebuild lands in the same place."""
    return hashlib.sha1(f"sd-dissected local hub {HUB_BUILD_VERSION} {repo_id}".encode()).hexdigest()


def repo_folder(cache_dir: str | Path, repo_id: str, repo_type: str = "model") -> Path:
    """`models--org--name` (or `datasets--org--name`) under the cache, as huggingface_hub names it."""
    return Path(cache_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}"


# ---------------------------------------------------------------------------------------------------------------
# the repos
# ---------------------------------------------------------------------------------------------------------------


def _seed_of(repo_id: str) -> int:
    return zlib.crc32(repo_id.encode())


@contextmanager
def _seeded(repo_id: str):
    """Random draws that depend only on the repo: the default generator, seeded per repo inside a fork (modules
    draw their initial weights from it; transformers' initialisers take no generator), and one torch.Generator with
    the same seed for our own draws. The caller's random state is left as it was."""
    import torch

    seed = _seed_of(repo_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


@contextmanager
def _quiet_diffusers():
    """Without diffusers' warning that casting a freshly built model with `.to(float16)` skips its fp32 modules
    (a loader's concern: these models have none)."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _save_diffusers(model, folder: Path, fp32: bool) -> None:
    """The fp16 variant file (what `variant="fp16"` reads), plus the default fp32 file when asked for."""
    import torch

    if fp32:
        model.save_pretrained(folder)
    model.to(torch.float16).save_pretrained(folder, variant="fp16")


def _save_transformers(model, folder: Path, fp32: bool) -> None:
    """As `_save_diffusers`; the config keeps saying float32, as the hub's does beside its fp16 files (so loading
    without a dtype gives fp32 there and here)."""
    import torch

    if fp32:
        model.save_pretrained(folder)
    model.to(torch.float16).save_pretrained(folder, variant="fp16")
    model.config.dtype = torch.float32
    model.config.save_pretrained(folder)


def sd15_prompt_words() -> list[str]:
    """`SD15_PROMPT_WORDS`, the toy's words, the default prompt words, and every word of the series' SD 1.5 prompt
    files (`helpers/data/sd_prompts_*.txt`)."""
    import re

    from helpers.core.tokenizer import DEFAULT_WORDS
    from helpers.toy import world

    words = {*SD15_PROMPT_WORDS, *world.VOCABULARY, *DEFAULT_WORDS}
    for path in sorted(DATA_DIR.glob("sd_prompts_*.txt")):
        words.update(re.findall(r"[a-z0-9]+", path.read_text().lower()))
    return sorted(words)


def sd15_tokenizer():
    """The project's CLIP tokenizer (the real vocabulary is out of reach) with `sd15_prompt_words()` as single
    tokens."""
    from helpers.core.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer(sd15_prompt_words())


def _build_sd15(snapshot: Path, repo_id: str, fp32: bool, progress) -> None:
    """Every component of SD 1.5, then the single LDM file from the same UNet, VAE and text encoder.

    `v1-5-pruned-emaonly.safetensors` is written in fp16 (the hub's is fp32, 4.27 GB): half the disk, the same keys
    and shapes; `from_single_file` casts it to the dtype asked for."""
    from types import SimpleNamespace

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from helpers.core.ldm import export_ldm_checkpoint
    from helpers.core.random_models import (
        SD15_SCHEDULER_CONFIG,
        SD15_TEXT_ENCODER_CONFIG,
        SD15_UNET_CONFIG,
        SD15_VAE_CONFIG,
    )

    _write_json(snapshot / "model_index.json", SD15_MODEL_INDEX)
    _write_json(snapshot / "scheduler" / "scheduler_config.json",  # written as is: keeps DDIM's keys, as SD's does
                {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", **SD15_SCHEDULER_CONFIG,
                 "trained_betas": None})
    _write_json(snapshot / "feature_extractor" / "preprocessor_config.json", SD15_FEATURE_EXTRACTOR_CONFIG)
    sd15_tokenizer().save_pretrained(snapshot / "tokenizer")

    # CLIP's real special-token ids; pooling takes the end token as the highest id, which it is in our vocab too
    text_config = CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    parts = {}
    for name, build, save in (
        ("text_encoder", lambda: CLIPTextModel(text_config), _save_transformers),
        ("vae", lambda: AutoencoderKL(**SD15_VAE_CONFIG), _save_diffusers),
        ("unet", lambda: UNet2DConditionModel(**SD15_UNET_CONFIG), _save_diffusers),
    ):
        model = build().eval()
        save(model, snapshot / name, fp32)
        parts[name] = model.to(torch.float16)  # kept in fp16 for the single file
        progress(f"  {name}: {sum(p.numel() for p in model.parameters()):,} parameters")
    export_ldm_checkpoint(SimpleNamespace(**parts), snapshot / SD15_FILENAME, dtype=torch.float16)
    progress(f"  {SD15_FILENAME}: the same networks in the original LDM layout (fp16)")
    parts.clear()
    gc.collect()
    _build_safety_checker(snapshot / "safety_checker", fp32)


def _build_safety_checker(folder: Path, fp32: bool) -> None:
    """StableDiffusionSafetyChecker on CLIP ViT-L/14's image tower. diffusers initialises the concept embeddings and
    their thresholds to ones: a cosine similarity never exceeds 1, so no image is ever flagged (the real checker's
    embeddings are trained ones)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    from helpers.core.random_models import SD15_TEXT_ENCODER_CONFIG

    text_config = {k: v for k, v in SD15_TEXT_ENCODER_CONFIG.items() if k != "vocab_size"}
    config = CLIPConfig(text_config=text_config, vision_config=CLIP_VIT_L14_VISION_CONFIG, projection_dim=768)
    checker = StableDiffusionSafetyChecker(config).eval()
    for name in ("concept_embeds_weights", "special_care_embeds_weights"):
        if not bool((getattr(checker, name) >= 1).all()):
            raise RuntimeError(f"StableDiffusionSafetyChecker.{name} is not initialised to ones any more (diffusers "
                               "changed): random images could be flagged; set the thresholds explicitly")
    _save_transformers(checker, folder, fp32)


def _build_controlnet(snapshot: Path, repo_id: str, fp32: bool, progress) -> None:
    from diffusers import ControlNetModel

    _save_diffusers(ControlNetModel(**SD15_CONTROLNET_CONFIG).eval(), snapshot, fp32)


def _build_taesd(snapshot: Path, repo_id: str, fp32: bool, progress) -> None:
    from diffusers import AutoencoderTiny

    AutoencoderTiny(**TAESD_CONFIG).eval().save_pretrained(snapshot)  # the hub has fp32 files only
    # the hub's config as it is: diffusers' own save adds `block_out_channels`, which loading then warns about
    _write_json(snapshot / "config.json", {"_class_name": "AutoencoderTiny", "_diffusers_version": "0.20.0.dev0",
                                           **TAESD_CONFIG})


def lcm_lora_layers(unet, rank: int = LCM_LORA_RANK) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """The LCM-LoRA's layers on `unet` as the published file names them (kohya's: `lora_unet_` and the module path
    with underscores, what the LCM training script writes and `load_lora_weights` converts back), with the shapes of
    their down and up weights: LCM-LoRA's target list (the toy's `helpers.toy.training.LCM_LORA_TARGETS`: attention,
    feed-forward, resnet convs, time projections, down/upsamplers), peft's matching (a name or a dotted suffix)."""
    from helpers.toy.training import LCM_LORA_TARGETS

    layers = {}
    for name, module in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in LCM_LORA_TARGETS):
            continue
        if module.__class__.__name__ == "Conv2d":  # the down conv keeps the kernel, the up conv is 1x1
            down, up = (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
        else:
            down, up = (rank, module.in_features), (module.out_features, rank)
        layers["lora_unet_" + name.replace(".", "_")] = (down, up)
    return layers


def _build_lcm_lora(snapshot: Path, repo_id: str, fp32: bool, progress, *, generator=None) -> None:
    """A random LoRA at SD 1.5's shapes in the published file's format: `pytorch_lora_weights.safetensors`, fp16,
    rank 64, kohya key names with an `alpha` per layer. The updates are small (the UNet's output moves a little), so
    the pipeline runs as it would; the pictures are noise either way."""
    import torch
    from safetensors.torch import save_file

    from helpers.core.random_models import sd15_unet_on_meta

    tensors = {}
    for key, (down, up) in lcm_lora_layers(sd15_unet_on_meta()).items():
        fan_in = int(torch.tensor(down[1:]).prod())
        tensors[f"{key}.lora_down.weight"] = (torch.randn(down, generator=generator) / fan_in**0.5).half()
        tensors[f"{key}.lora_up.weight"] = (torch.randn(up, generator=generator) * 1e-3).half()
        tensors[f"{key}.alpha"] = torch.tensor(float(LCM_LORA_RANK), dtype=torch.float16)
    snapshot.mkdir(parents=True, exist_ok=True)
    save_file(tensors, snapshot / LCM_LORA_FILE)
    progress(f"  {LCM_LORA_FILE}: {len(tensors) // 3} layers, "
             f"{sum(t.numel() for t in tensors.values() if t.dim()):,} parameters")


def _build_depth(snapshot: Path, repo_id: str, fp32: bool, progress) -> None:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    config = DepthAnythingConfig(backbone_config=Dinov2Config(**DEPTH_BACKBONE_CONFIG))
    DepthAnythingForDepthEstimation(config).eval().save_pretrained(snapshot)  # fp32 only, as on the hub
    _write_json(snapshot / "preprocessor_config.json", DEPTH_PREPROCESSOR_CONFIG)


def _build_dog_example(snapshot: Path, repo_id: str, fp32: bool, progress, *, generator=None) -> None:
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / "README.md").write_text(DOG_EXAMPLE_README)
    for index in range(5):
        dog_picture(index, generator).save(snapshot / f"standin-dog-{index + 1}.jpeg", quality=90)


BACKGROUNDS = (  # (sky or wall, ground) colours of the five scenes: lawn, beach, snow, sofa, wooden floor
    ((150, 200, 240), (70, 140, 60)),
    ((170, 215, 245), (225, 205, 150)),
    ((200, 210, 225), (240, 242, 248)),
    ((190, 170, 150), (120, 60, 60)),
    ((225, 215, 195), (150, 105, 65)),
)


def dog_picture(index: int, generator=None, size: int = 512):
    """One photo-like picture of THE sample dog (brown, white chest, black ears, red collar) in scene `index`:
    the dog keeps its look while its place, size and facing change, as a subject's photos do."""
    import numpy as np
    import PIL.Image
    import PIL.ImageDraw
    import PIL.ImageFilter
    import torch

    generator = generator or torch.Generator().manual_seed(index)
    sky, ground = BACKGROUNDS[index % len(BACKGROUNDS)]
    horizon = int(size * (0.45 + 0.1 * float(torch.rand((), generator=generator))))
    image = PIL.Image.new("RGB", (size, size), sky)
    draw = PIL.ImageDraw.Draw(image)
    draw.rectangle([0, horizon, size, size], fill=ground)

    scale = size / 512 * (0.8 + 0.35 * float(torch.rand((), generator=generator)))
    cx = size * (0.35 + 0.3 * float(torch.rand((), generator=generator)))
    cy = horizon + (size - horizon) * 0.35
    facing = 1 if index % 2 == 0 else -1  # looks right or left

    def box(x, y, w, h):  # a box centred at (cx + x, cy + y) in dog units, mirrored when facing left
        x = cx + facing * x * scale
        return [x - w * scale / 2, cy + y * scale - h * scale / 2, x + w * scale / 2, cy + y * scale + h * scale / 2]

    brown, dark, white, black = (150, 95, 45), (60, 35, 20), (245, 240, 230), (20, 15, 10)
    for leg_x in (-70, -40, 45, 75):  # legs, then the body over their tops
        draw.rounded_rectangle(box(leg_x, 55, 24, 80), radius=int(10 * scale), fill=brown)
        draw.ellipse(box(leg_x, 95, 30, 14), fill=white)  # white paws
    draw.line([tuple(box(-105, -10, 0, 0)[:2]), tuple(box(-135, -60, 0, 0)[:2])], fill=brown, width=int(14 * scale))
    draw.ellipse(box(0, 0, 220, 110), fill=brown)
    draw.ellipse(box(55, 10, 70, 60), fill=white)  # chest patch
    draw.ellipse(box(95, -75, 110, 100), fill=brown)  # head
    draw.ellipse(box(140, -55, 60, 40), fill=(190, 140, 90))  # muzzle
    draw.ellipse(box(165, -62, 20, 16), fill=black)  # nose
    draw.ellipse(box(110, -95, 16, 16), fill=black)  # eye
    draw.ellipse(box(60, -80, 34, 80), fill=dark)  # floppy ear
    draw.rounded_rectangle(box(70, -30, 26, 50), radius=int(6 * scale), fill=(200, 30, 40))  # red collar

    pixels = np.asarray(image.filter(PIL.ImageFilter.GaussianBlur(1.2)), dtype=np.float32)
    noise = torch.randn(pixels.shape, generator=generator).numpy() * 6  # photo grain
    shade = np.linspace(1.08, 0.9, size, dtype=np.float32)[:, None, None]  # light from above
    return PIL.Image.fromarray(np.clip(pixels * shade + noise, 0, 255).astype(np.uint8))


@functools.cache
def hub_repos() -> dict[str, tuple[str, Callable]]:
    """repo id -> (repo type, builder), in build order. (A function: helpers.core.models imports diffusers, which the
    command line's other subcommands should not wait for.)"""
    from helpers.core.models import LCM_LORA_HUB_ID, SD15_CONTROLNET_HUB_IDS, SD15_HUB_ID, TAESD_HUB_ID

    return {
        SD15_HUB_ID: ("model", _build_sd15),
        **{repo_id: ("model", _build_controlnet) for repo_id in SD15_CONTROLNET_HUB_IDS.values()},
        TAESD_HUB_ID: ("model", _build_taesd),
        LCM_LORA_HUB_ID: ("model", _build_lcm_lora),
        DEPTH_HUB_ID: ("model", _build_depth),
        DOG_DATASET_ID: ("dataset", _build_dog_example),
    }


# ---------------------------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------------------------


def folder_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink())


def is_built(cache_dir: str | Path, repo_id: str, fp32: bool = False) -> bool:
    """Whether `repo_id` is complete in the cache, by this build version (and with fp32 files, if asked for)."""
    repo_type, _ = hub_repos()[repo_id]
    marker = repo_folder(cache_dir, repo_id, repo_type) / MARKER
    try:
        built = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return built.get("version") == HUB_BUILD_VERSION and (built.get("fp32") or not fp32)


def build_repo(cache_dir: str | Path, repo_id: str, *, fp32: bool = False, progress=print) -> Path:
    """(Re)build one repo from scratch: its snapshot, `refs/main`, and last the marker saying it is complete."""
    repo_type, build = hub_repos()[repo_id]
    folder = repo_folder(cache_dir, repo_id, repo_type)
    if folder.exists():
        shutil.rmtree(folder)  # a half-built or outdated repo: start clean
    revision = revision_of(repo_id)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    start = time.perf_counter()
    with _seeded(repo_id) as generator, _quiet_diffusers():
        if build in (_build_dog_example, _build_lcm_lora):
            build(snapshot, repo_id, fp32, progress, generator=generator)
        else:
            build(snapshot, repo_id, fp32, progress)
    gc.collect()
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    seconds = time.perf_counter() - start
    size = folder_bytes(snapshot)
    _write_json(folder / MARKER, {"version": HUB_BUILD_VERSION, "repo_id": repo_id, "repo_type": repo_type,
                                  "revision": revision, "fp32": fp32, "seconds": round(seconds, 1), "bytes": size})
    progress(f"built {repo_id} in {seconds:.1f} s ({size / 1e9:.2f} GB)")
    return folder


def build_local_hub(
    cache_dir: str | Path | None = None,
    *,
    repos: Iterable[str] | None = None,
    force: bool = False,
    fp32: bool = False,
    progress: Callable[[str], None] = print,
) -> Path:
    """Build the local hub into `cache_dir` (default `outputs/cache/hub`) and return it; point `HF_HUB_CACHE` at it
    with `HF_HUB_OFFLINE=1` to load from it.

    `repos` limits the build to some repo ids (of `hub_repos()`; default all). A repo already built is kept unless
    `force`.
    `fp32=True` adds the default (fp32) weight files beside the fp16 variants: loading without `variant="fp16"` then
    works too, at twice the disk. Prints what it built, the time it took and the disk the cache uses.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    repos = list(hub_repos()) if repos is None else list(repos)
    unknown = [r for r in repos if r not in hub_repos()]
    if unknown:
        raise ValueError(f"the local hub cannot build {unknown}; it builds {list(hub_repos())}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    built = []
    for repo_id in repos:
        if not force and is_built(cache_dir, repo_id, fp32):
            continue
        progress(f"building {repo_id} (random weights, real shapes) ...")
        build_repo(cache_dir, repo_id, fp32=fp32, progress=progress)
        built.append(repo_id)
    seconds = time.perf_counter() - start
    size = sum(folder_bytes(repo_folder(cache_dir, r, hub_repos()[r][0])) for r in repos)
    what = f"built {len(built)} repo(s) in {seconds:.1f} s" if built else f"all {len(repos)} repos already built"
    progress(f"local hub at {cache_dir}: {what}; {len(repos)} repos use {size / 1e9:.2f} GB of disk.\n"
             f"Use it with: HF_HUB_OFFLINE=1 HF_HUB_CACHE={cache_dir}")
    return cache_dir


def add_arguments(parser) -> None:
    actions = parser.add_subparsers(dest="hub_command", required=True)
    build = actions.add_parser("build", help="build the local hub (random weights, real shapes, real repo ids)")
    build.add_argument("--cache", help="the hub cache folder to write (default: outputs/cache/hub)")
    build.add_argument("--force", action="store_true", help="rebuild repos that are already built")
    build.add_argument("--fp32", action="store_true", help="also write the default fp32 weight files (2x disk)")
    build.add_argument("--repos", nargs="+", metavar="REPO_ID", help="build only these repo ids (default: all)")


def run_from_args(args) -> int:
    build_local_hub(args.cache, repos=args.repos, force=args.force, fp32=args.fp32)
    return 0
