"""Single LDM files taken apart (notebooks 01 and 03): which file, where its configs come from, and whether each
network loaded from it computes what the diffusers folder's does.

- `single_file_for(model)`: the single file whose parts a stage loads alone (notebook 03), or why there is none.
- `pick_single_file(LOAD_FILE, ...)`: the file notebook 01 takes apart (the one it downloaded, or the toy's).
- `compare_with_folder(...)`: each network from the file against the same network from the folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError
from transformers import CLIPTextModel

from helpers.checkpoints.download import SD15_FILENAME
from helpers.core import ldm
from helpers.core.ldm import COMPONENTS
from helpers.core.models import SD15_HUB_ID, hub_offline, in_hub_cache
from helpers.core.random_models import tiny_random_pipeline
from helpers.toy import TOY_LDM_FILE, TOY_SD_DIR

SMALL_LATENT_SIZE = 8  # SD 1.5's UNet on 8×8 latents runs in about a second on a CPU


# what taking a single file apart needs besides it: each component's config, the tokenizer's files, the scheduler's
SINGLE_FILE_CONFIGS = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer/*"]


@dataclass
class SingleFile:
    """The single LDM file to take apart and the diffusers folder holding its configs, or why there is none."""

    path: Path | None
    config_dir: str | None
    reason: str | None = None


def single_file_for(model: str, single_file: str = "", config_dir: str = "") -> SingleFile:
    """The single file whose parts a stage loads alone: `single_file` when given (configs from `config_dir`, the
    toy's folder for the toy's file, SD 1.5's hub folder for SD 1.5), else the toy's own file for the toy and
    `v1-5-pruned-emaonly.safetensors` from SD 1.5's hub repo for SD 1.5 (`hf_hub_download`: the local cache
    offline, a 4.27 GB download once online). Where there is none, `path` is None and `reason` says why and what
    to set; nothing raises, so a notebook can skip that part and record the reason."""
    if single_file:
        path = Path(single_file).expanduser()
        if not path.is_file():
            return SingleFile(None, None, f"{path} does not exist (SINGLE_FILE): give the path of a single LDM "
                                          ".safetensors (notebook 01 downloads SD 1.5's), or '' for the model's own")
        if config_dir:
            return SingleFile(path, str(config_dir))
        if path.resolve() == Path(TOY_LDM_FILE).resolve():
            return SingleFile(path, str(TOY_SD_DIR))
        if model != SD15_HUB_ID:
            return SingleFile(None, None, f"SINGLE_FILE={single_file!r} needs LOAD_CONFIG_DIR: a diffusers folder "
                                          f"with its components' configs (for {model}, there is no default)")
        return _from_sd15_hub(path)
    if model == "toy":
        return SingleFile(Path(TOY_LDM_FILE), str(TOY_SD_DIR))
    if model == SD15_HUB_ID:
        return _from_sd15_hub(None)
    return SingleFile(None, None, f"{model} has no single file here: set SINGLE_FILE (and LOAD_CONFIG_DIR) to take "
                                  "one apart")


def _from_sd15_hub(path: Path | None) -> SingleFile:
    """SD 1.5's single file (unless `path` is given) and its config folder, from the hub or its local cache."""
    offline = hub_offline()
    what = f"{SD15_HUB_ID}'s {SD15_FILENAME}" if path is None else f"{SD15_HUB_ID}'s configs"
    try:
        if path is None:
            if not offline and not in_hub_cache(SD15_HUB_ID, SD15_FILENAME):
                print(f"downloading {SD15_FILENAME} from {SD15_HUB_ID} into the hub cache (4.27 GB, once)")
            path = Path(hf_hub_download(SD15_HUB_ID, SD15_FILENAME, local_files_only=offline))
        configs = Path(snapshot_download(SD15_HUB_ID, allow_patterns=SINGLE_FILE_CONFIGS, local_files_only=offline))
    except (OSError, EntryNotFoundError) as error:
        why = "HF_HUB_OFFLINE=1 is set and it is not in the local hub cache" if offline else \
            f"the hub did not give it ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        return SingleFile(None, None, f"{what} is not available: {why}. Partial loading from the single file is "
                                      "skipped; set SINGLE_FILE to a local copy (notebook 01 downloads it) to run it")
    missing = [f"{c}/config.json" for c in COMPONENTS if not (configs / c / "config.json").is_file()]
    missing += [folder for folder in ("tokenizer", "scheduler") if not (configs / folder).is_dir()]
    if missing:
        return SingleFile(None, None, f"{what}: the hub folder {configs} lacks {missing}, which taking the file apart "
                                      "needs; set LOAD_CONFIG_DIR to a diffusers folder of SD 1.5")
    return SingleFile(path, str(configs))



def hub_configs(hub_repo: str) -> Path:
    """`hub_repo`'s unet/, vae/ and text_encoder/ configs (a few kB), from the hub or, offline, the hub cache."""
    try:
        folder = Path(snapshot_download(hub_repo, allow_patterns=[f"{c}/config.json" for c in ldm.COMPONENTS]))
    except Exception as error:  # noqa: BLE001 - offline without a cached copy of hub_repo: say what to set instead
        raise FileNotFoundError(f"cannot get {hub_repo}'s configs from the hub ({type(error).__name__}): "
                                "set LOAD_CONFIG_DIR to a diffusers folder holding them") from error
    missing = [c for c in ldm.COMPONENTS if not (folder / c / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{hub_repo} ({folder}) has no config.json for {missing}: "
                                "set LOAD_CONFIG_DIR to a diffusers folder holding them")
    return folder


def has_weights(folder: str | Path) -> bool:
    """Whether a diffusers folder holds weights for all three networks (not only their configs)."""
    return all(any((Path(folder) / c).glob("*.safetensors")) for c in ldm.COMPONENTS)


def pick_single_file(choice: str, checkpoint: Path | None, config_dir: str, hub_repo: str,
                     scratch: Path) -> tuple[Path, Path, bool]:
    """(the single file, a folder with its configs, whether that folder has weights to compare outputs with).

    `choice` is notebook 01's LOAD_FILE: "auto"/"downloaded" (the `checkpoint` just downloaded when it holds the three
    networks in the LDM layout, else the toy's), "toy", or a path (then `config_dir` must be given). The downloaded
    SD 1.5 file gets the hub's configs only: the folder's weights would be a second 4 GB download."""
    if choice in ("auto", "downloaded"):
        shares = ldm.component_byte_ranges(checkpoint) if checkpoint is not None else {}
        if shares and all(shares[c]["tensors"] for c in ldm.COMPONENTS):
            if config_dir:
                return checkpoint, Path(config_dir), has_weights(config_dir)
            return checkpoint, hub_configs(hub_repo), False
        print(f"{checkpoint.name} holds no UNet, VAE and text encoder in the LDM layout: using the toy model's file"
              if shares else "no real checkpoint in this run: using the toy model's file")
        choice = "toy"
    if choice == "toy":
        if Path(TOY_LDM_FILE).is_file():
            return Path(TOY_LDM_FILE), Path(TOY_SD_DIR), True
        print("the toy model's single file is not built yet: exporting the tiny random test model instead")
        folder = scratch / "tiny-random"
        pipe = tiny_random_pipeline(seed=0)
        pipe.save_pretrained(folder)
        return ldm.export_ldm_checkpoint(pipe, folder / "tiny-random-ldm.safetensors"), folder, True
    if not config_dir:
        raise ValueError(f"LOAD_FILE={choice!r}: set LOAD_CONFIG_DIR to a diffusers folder with its configs")
    return Path(choice), Path(config_dir), has_weights(config_dir)


def compare_with_folder(single_file: Path, config_dir: Path, has_folder_weights: bool,
                        ) -> tuple[dict[str, float | None], dict[str, list[int]]]:
    """Each network loaded from the single file, run on one fixed input: ({network: max |single file - folder|, or
    None when the folder has configs only}, {network: its output's shape})."""
    dtype = ldm.float_dtype(single_file)
    generator = torch.Generator().manual_seed(0)
    unet_config = UNet2DConditionModel.load_config(config_dir, subfolder="unet")
    size = unet_config["sample_size"] if has_folder_weights else SMALL_LATENT_SIZE
    latents = torch.randn(1, unet_config["in_channels"], size, size, generator=generator).to(dtype)
    prompt_embeds = torch.randn(1, 77, unet_config["cross_attention_dim"], generator=generator).to(dtype)
    input_ids = torch.arange(77)[None] % 300
    runs = {"unet": (UNet2DConditionModel, lambda m: m(latents, 500, prompt_embeds).sample),
            "vae": (AutoencoderKL, lambda m: m.decode(latents).sample),
            "text_encoder": (CLIPTextModel, lambda m: m(input_ids)[0])}
    differences, shapes = {}, {}
    for name, (cls, run) in runs.items():
        with torch.inference_mode():
            out = run(ldm.load_component_from_single_file(single_file, name, config_dir, dtype=dtype))
            shapes[name] = list(out.shape)
            differences[name] = ((out - run(cls.from_pretrained(config_dir, subfolder=name, dtype=dtype)))
                                 .abs().max().item() if has_folder_weights else None)
    return differences, shapes
