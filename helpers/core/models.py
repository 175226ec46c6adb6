"""Load a Stable Diffusion pipeline, or one component of it, from wherever the weights are.

`MODEL` can be:
- `"toy"`: the project's miniature SD trained on a synthetic world, shipped in `helpers/toy/weights/`;
- `"tiny-random"` / `"sd15-random"`: random weights at tiny / SD 1.5 shapes (`helpers.core.random_models`);
- a hub id such as `"stable-diffusion-v1-5/stable-diffusion-v1-5"`;
- a local diffusers folder (with `model_index.json`) or a single `.safetensors` file in the original LDM layout.
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)

from helpers.core import accelerator, random_models
from helpers.core.ldm import check_checkpoint, load_component_from_single_file
from helpers.toy import TOY_CONTROLNET_DIR, TOY_LCM_LORA_DIR, TOY_LDM_FILE, TOY_SD_DIR

SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# ControlNets by name: the toy's ship in helpers/toy/weights/controlnet-<name>; SD 1.5's come from the hub.
SD15_CONTROLNET_HUB_IDS = {
    "depth": "lllyasviel/control_v11f1p_sd15_depth",
    "normal": "lllyasviel/control_v11p_sd15_normalbae",
    "canny": "lllyasviel/control_v11p_sd15_canny",
}
TAESD_HUB_ID = "madebyollin/taesd"  # SD 1.5's tiny decoder (AutoencoderTiny), notebook 07's tiny_vae rung
LCM_LORA_HUB_ID = "latent-consistency/lcm-lora-sdv1-5"  # SD 1.5's LCM-LoRA (Luo et al.), notebook 07's lcm rungs
RANDOM_MODELS = ("tiny-random", "sd15-random")
TOY_MODELS = ("toy", "tiny-random")  # the models with the toy's settings (tiny-random tests the toy's code paths)

# Short names users type in a widget, mapped to diffusers' scheduler classes; "default" keeps the model's own.
DEFAULT_SCHEDULER = "default"
SCHEDULERS = {
    "pndm": PNDMScheduler,  # SD 1.5's default
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "lms": LMSDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The device asked for, else where `helpers.core.accelerator` computes (CUDA, MPS, else the CPU)."""
    if device is not None:
        return torch.device(device)
    return accelerator.compute_device()


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (half the memory, tensor cores); fp32 elsewhere, where fp16 is slow or inexact. On the compute
    device the accelerator decides (the rehearsal's pretended T4 answers fp16 while computing on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16
    return accelerator.default_dtype() if device == accelerator.compute_device() else torch.float32


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can SD 1.5 be had from the model hub: online (and allowed by HF_HUB_OFFLINE), or offline from the local
    cache (`HF_HUB_CACHE`: a Kaggle dataset of a cache, or the rehearsal's local hub)?"""
    if hub_offline():
        return in_hub_cache(SD15_HUB_ID)
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(SD15_HUB_ID, timeout=timeout)
        return True
    except Exception:
        return in_hub_cache(SD15_HUB_ID)


def in_hub_cache(repo_id: str, filename: str = "model_index.json", repo_type: str = "model") -> bool:
    """Whether the local hub cache holds `filename` of `repo_id` (what an offline `from_pretrained` would read)."""
    from huggingface_hub import try_to_load_from_cache

    cache_dir = os.environ.get("HF_HUB_CACHE")  # read now: huggingface_hub read it once, when first imported
    return isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, repo_type=repo_type), str)


def resolve_model(model: str) -> str:
    """`"auto"` becomes SD 1.5 from the hub when there is a (usable) GPU and the hub answers, else `"toy"`."""
    if model != "auto":
        return model
    return SD15_HUB_ID if accelerator.on_gpu() and hub_reachable() else "toy"


def hub_variant(repo_id: str) -> str | None:
    """The weights' variant to download: "fp16" for SD 1.5 and its ControlNets, whose fp16 files are half the
    download (fp32 is cast up after loading when asked for); None (the default files) for any other repo."""
    return "fp16" if repo_id in (SD15_HUB_ID, *SD15_CONTROLNET_HUB_IDS.values()) else None


def make_scheduler(name_or_scheduler, model_scheduler):
    """A fresh scheduler on the noise schedule of `model_scheduler` (the pipeline's own), from a short name
    (`SCHEDULERS`, or `"default"` for the model's own class) or a class; an instance is used as it is."""
    config = model_scheduler.config
    if name_or_scheduler == DEFAULT_SCHEDULER:
        scheduler_class = type(model_scheduler)
    elif isinstance(name_or_scheduler, str):
        scheduler_class = _scheduler_class(name_or_scheduler)
    elif isinstance(name_or_scheduler, type):
        scheduler_class = name_or_scheduler
    else:
        return name_or_scheduler
    _check_schedule_supported(scheduler_class, config)
    return scheduler_class.from_config(config)


def _scheduler_class(name: str) -> type:
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r} is unknown; choose one of {[DEFAULT_SCHEDULER, *sorted(SCHEDULERS)]}")
    return SCHEDULERS[name]


def _check_schedule_supported(scheduler_class: type, config) -> None:
    """A model trained on a zero-terminal-SNR schedule (the toy model) only works with schedulers that
    implement it: from_config would silently drop the setting and sample from the wrong noise levels."""
    if not config.get("rescale_betas_zero_snr"):
        return
    if "rescale_betas_zero_snr" not in inspect.signature(scheduler_class.__init__).parameters:
        supported = [name for name, cls in SCHEDULERS.items()
                     if "rescale_betas_zero_snr" in inspect.signature(cls.__init__).parameters]
        raise ValueError(
            f"{scheduler_class.__name__} cannot run this model: it was trained on a zero-terminal-SNR noise "
            f"schedule (rescale_betas_zero_snr=True), which {scheduler_class.__name__} does not implement. "
            f"Choose one of {[DEFAULT_SCHEDULER, *supported]}."
        )


def toy_paths() -> tuple[Path, Path]:
    """(pipeline folder, depth ControlNet folder) of the shipped toy model; a clear error if missing."""
    if not (Path(TOY_SD_DIR) / "model_index.json").exists():
        raise FileNotFoundError(
            f"The toy model's weights are missing at {TOY_SD_DIR}. Rebuild them with "
            "`python -m helpers.toy.train`, or use MODEL='tiny-random' for a random-weight stand-in."
        )
    return Path(TOY_SD_DIR), Path(TOY_CONTROLNET_DIR)


def tiny_vae_source(vae) -> str | None:
    """Where the tiny decoder (an AutoencoderTiny) for `vae` lives: the one distilled for the toy (shipped), TAESD
    for SD 1.5's VAE when the hub is reachable, else None."""
    sd_dir = toy_paths()[0]
    if Path(vae.config.get("_name_or_path") or "").resolve() == (sd_dir / "vae").resolve():
        folder = sd_dir.parent / "tiny-vae"
        return str(folder) if (folder / "config.json").exists() else None
    return TAESD_HUB_ID if hub_reachable() else None


def lcm_lora_source(unet) -> str:
    """Where the LCM-LoRA for `unet` lives: the toy's own folder (shipped) for the toy's UNet, else the published
    one for SD 1.5. A UNet of other shapes has none: ValueError."""
    sd_dir = toy_paths()[0]
    if Path(unet.config.get("_name_or_path") or "").resolve() == (sd_dir / "unet").resolve():
        return str(TOY_LCM_LORA_DIR)
    if (unet.config.cross_attention_dim, tuple(unet.config.block_out_channels)) != (768, (320, 640, 1280, 1280)):
        raise ValueError(f"{LCM_LORA_HUB_ID} is made for SD 1.5's UNet (320-1280 channels, text width 768); this UNet "
                         f"({list(unet.config.block_out_channels)}, {unet.config.cross_attention_dim}) has no LCM-LoRA")
    return LCM_LORA_HUB_ID


def controlnet_source(model: str, name: str) -> str:
    """Where the ControlNet called `name` lives for `model`: the toy's folder, SD 1.5's hub id, or `name` itself
    (a folder or hub id of your own)."""
    if name not in SD15_CONTROLNET_HUB_IDS:
        if not Path(name).expanduser().exists() and name.count("/") != 1:
            raise ValueError(f"controlnet={name!r} is unknown: give a name {sorted(SD15_CONTROLNET_HUB_IDS)}, a "
                             "ControlNet folder, or a hub id like 'lllyasviel/control_v11f1p_sd15_depth'")
        return name
    if model == "toy":
        folder = toy_paths()[0].parent / f"controlnet-{name}"
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"the toy model has no {name!r} ControlNet at {folder}; build it with "
                                    "`python -m helpers.toy.train`")
        return str(folder)
    return SD15_CONTROLNET_HUB_IDS[name]


def load_controlnet(model: str, controlnet, dtype: torch.dtype) -> ControlNetModel | list[ControlNetModel] | None:
    """A ControlNetModel (or a list, for several) from names ("depth", "normal", "canny"), folders or hub ids."""
    if controlnet is None or isinstance(controlnet, ControlNetModel):
        return controlnet
    if isinstance(controlnet, (list, tuple)):
        return [load_controlnet(model, c, dtype) for c in controlnet]
    if not isinstance(controlnet, (str, Path)):
        raise TypeError(f"controlnet must be a name {sorted(SD15_CONTROLNET_HUB_IDS)}, a folder, a hub id, a "
                        f"ControlNetModel or a list of those; got {type(controlnet).__name__}")
    source = controlnet_source(model, str(controlnet))
    with explained_hub_errors(source):
        return ControlNetModel.from_pretrained(source, dtype=dtype, local_files_only=hub_offline(),
                                               variant=hub_variant(source))


def load_pipeline(
    model: str = "toy",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    controlnet: str | ControlNetModel | list | None = None,
    scheduler: str | None = None,
    cpu_offload: bool = False,
    attention_slicing: bool = False,
    safety_checker: bool = True,
    single_file_config: str | Path | None = None,
) -> DiffusionPipeline:
    """A ready-to-run pipeline: the ONE loader of the project (notebooks, benchmarks, the app and batch jobs).

    `controlnet` makes it a StableDiffusionControlNetPipeline: a name ("depth", "normal", "canny": the toy's own
    nets for "toy", lllyasviel's v1.1 nets for SD 1.5), a folder, a hub id, a ControlNetModel, or a list of these
    (several nets, as diffusers' MultiControlNetModel).
    `cpu_offload` keeps each component on the CPU until it runs (fits SD 1.5 in ~3 GB of a T4's VRAM);
    `attention_slicing` (True, or a slice size) trades speed for lower peak memory; `safety_checker=False` drops
    SD 1.5's checker.
    """
    model = resolve_model(model)
    device = pick_device(device)
    dtype = dtype or default_dtype(device)
    if model in RANDOM_MODELS:
        build = random_models.tiny_random_pipeline if model == "tiny-random" else random_models.sd15_random_pipeline
        pipe = build(dtype=dtype)
    else:
        pipe = _load_weights(model, dtype, safety_checker, single_file_config)
    controlnet = load_controlnet(model, controlnet, dtype)
    if controlnet is not None:
        pipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet,  # keeps the choice made
                                                 requires_safety_checker=pipe.config.requires_safety_checker)
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler)
    if attention_slicing:
        enable_attention_slicing(pipe, attention_slicing)
    if cpu_offload:
        if device.type != "cuda":
            raise ValueError(f"cpu_offload=True needs a CUDA device, but the device is {device.type!r}")
        pipe.enable_model_cpu_offload()
    else:
        pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def enable_attention_slicing(pipe, slice_size: bool | int | str = True) -> None:
    """Attention computed a few heads at a time. True picks diffusers' "auto" (half the heads) where every
    attention layer has at least two heads, else "max" (one head at a time): "auto" on a one-head model (the toy)
    would ask for slices of 0 heads and fail with ZeroDivisionError inside diffusers."""
    if slice_size is True:
        heads = [m.sliceable_head_dim for m in pipe.unet.modules() if hasattr(m, "sliceable_head_dim")]
        slice_size = "auto" if heads and min(heads) >= 2 else "max"
    pipe.enable_attention_slicing(slice_size)


def _load_weights(model: str, dtype: torch.dtype, safety_checker: bool, single_file_config) -> DiffusionPipeline:
    extra = {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}
    if model == "toy":
        return StableDiffusionPipeline.from_pretrained(toy_paths()[0], dtype=dtype, **extra)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix not in (".safetensors", ".ckpt"):
            raise ValueError(f"MODEL={model!r} is a file but not a .safetensors or .ckpt checkpoint")
        check_checkpoint(path)  # a truncated download: say so, rather than diffusers' "Unable to load weights"
        kwargs = {"config": str(single_file_config)} if single_file_config else {}
        return StableDiffusionPipeline.from_single_file(
            str(path), dtype=dtype, local_files_only=hub_offline() or bool(kwargs), **kwargs, **extra
        )
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise FileNotFoundError(f"MODEL={model!r} is a folder without model_index.json (not a diffusers folder)")
        return StableDiffusionPipeline.from_pretrained(path, dtype=dtype, **extra)
    if model.count("/") != 1 or model.startswith(("/", ".", "~")):
        raise FileNotFoundError(
            f"MODEL={model!r} is neither 'toy', {RANDOM_MODELS}, an existing path, nor a hub id like {SD15_HUB_ID!r}"
        )
    return _from_hub(model, dtype, extra)


class ModelNotAvailableError(FileNotFoundError):
    """A hub model that cannot be had here: offline and not in the local cache, or refused by the hub."""


def _from_hub(model: str, dtype: torch.dtype, extra: dict) -> DiffusionPipeline:
    with explained_hub_errors(model):
        return StableDiffusionPipeline.from_pretrained(
            model, dtype=dtype, local_files_only=hub_offline(), low_cpu_mem_usage=True, variant=hub_variant(model),
            **extra)


@contextmanager
def explained_hub_errors(model: str):
    """Turn the hub's errors for a model that cannot be had into one that says why and what to do."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        yield
    except LocalEntryNotFoundError as error:
        why = "HF_HUB_OFFLINE=1 is set" if hub_offline() else "the hub cannot be reached"
        raise ModelNotAvailableError(
            f"{model!r} is a hub model, but {why} and it is not in the local cache. Connect to the internet "
            "(on Kaggle: Settings → Internet on) and unset HF_HUB_OFFLINE, or use MODEL='toy' offline."
        ) from error
    except (GatedRepoError, RepositoryNotFoundError) as error:
        raise ModelNotAvailableError(
            f"the hub refused {model!r} ({type(error).__name__}): check the id, and for a gated model accept "
            "its licence on the hub and log in (huggingface_hub.login() or the HF_TOKEN secret)."
        ) from error
    except OSError as error:  # diffusers' models re-raise the hub's errors as a plain OSError
        if Path(model).expanduser().exists() or isinstance(error, ModelNotAvailableError):
            raise
        why = "HF_HUB_OFFLINE=1 is set and it is not in the local cache" if hub_offline() else str(error)
        raise ModelNotAvailableError(
            f"{model!r} is a hub model, but {why}. Connect to the internet and unset HF_HUB_OFFLINE, or use the "
            "toy model's nets offline (MODEL='toy')."
        ) from error


COMPONENT_CLASSES = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel",
    "tokenizer": "CLIPTokenizer",
    "controlnet": "ControlNetModel",
}


def load_component(
    model: str, component: str, *, device=None, dtype: torch.dtype | None = None, config_dir: str | Path | None = None
):
    """Load one component (`unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler`) without the rest.

    For a single-file checkpoint, `config_dir` is a diffusers folder holding the component's config.json
    (the architecture is not in the file); for the toy model's file it defaults to the toy folder.
    """
    import diffusers
    import transformers

    model = resolve_model(model)
    if component not in (*COMPONENT_CLASSES, "scheduler"):
        raise ValueError(f"component={component!r} is unknown; choose one of {[*COMPONENT_CLASSES, 'scheduler']}")
    device = pick_device(device)
    dtype = dtype or default_dtype(device)
    if model in RANDOM_MODELS:
        return getattr(load_pipeline(model, device=device, dtype=dtype), component)
    if Path(model).is_file():
        if config_dir is None and Path(model).resolve() == Path(TOY_LDM_FILE).resolve():
            config_dir = toy_paths()[0]
        if config_dir is None:
            raise ValueError(
                f"loading {component!r} from the single file {model} needs config_dir=<a diffusers folder with "
                f"{component}/config.json> (for SD 1.5, a local copy of the hub repo's config files)"
            )
        # partial=True: read only this component's tensors from the file (see notebook 01)
        return load_component_from_single_file(model, component, config_dir, partial=True, dtype=dtype).to(device)
    root = toy_paths()[0] if model == "toy" else model
    kwargs = {"subfolder": component, "local_files_only": hub_offline()}
    if component == "scheduler":
        config = PNDMScheduler.load_config(root, **kwargs)
        return getattr(diffusers, config["_class_name"]).from_config(config)
    if component == "tokenizer":
        return transformers.CLIPTokenizer.from_pretrained(root, **kwargs)
    library = transformers if component == "text_encoder" else diffusers
    cls = getattr(library, COMPONENT_CLASSES[component])
    return cls.from_pretrained(root, dtype=dtype, variant=hub_variant(str(root)), **kwargs).to(device)
