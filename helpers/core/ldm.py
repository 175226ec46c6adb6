"""One checkpoint file in the original LDM (CompVis) layout: export, load back, load only a part.

The original Stable Diffusion release ships the three networks in *one* state dict whose keys say which
network they belong to:

| component      | key prefix in the LDM file        | diffusers class         |
|----------------|-----------------------------------|-------------------------|
| `unet`         | `model.diffusion_model.`          | `UNet2DConditionModel`  |
| `vae`          | `first_stage_model.`              | `AutoencoderKL`         |
| `text_encoder` | `cond_stage_model.transformer.`   | `CLIPTextModel`         |

`export_ldm_checkpoint` writes a diffusers pipeline's three networks to such a file. It is the exact inverse
of diffusers' own single-file converters (`diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`): after writing, it runs those converters on the
exported keys and checks that they give back every original key (`verify=True`).

`load_component_from_single_file` loads one network back through diffusers' `from_single_file` machinery
with a local config folder (no network). With `partial=True` it first reads only the tensors under the
component's prefix with safetensors' lazy `safe_open` (no pickle), so the other networks' bytes are never
touched; see `helpers.studies.partial` for the measurements.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

LDM_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}
COMPONENTS = tuple(LDM_PREFIXES)

# ---------------------------------------------------------------------------------------------------------------
# diffusers -> LDM key mapping (inverse of diffusers.loaders.single_file_utils)
# ---------------------------------------------------------------------------------------------------------------

_UNET_TOP = {  # inverse of DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = [  # inverse of update_unet_resnet_ldm_to_diffusers
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
]
_VAE_ATTN = [  # inverse of update_vae_attentions_ldm_to_diffusers
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
]


def _rename_head(rest: str, table: list[tuple[str, str]]) -> str:
    for old, new in table:
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest


def _unet_key_to_ldm(key: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    """`down_blocks.1.resnets.0.conv1.weight` -> `input_blocks.4.0.in_layers.2.weight` (SD's block structure)."""
    for old, new in _UNET_TOP.items():
        if key.startswith(old):
            return new + key[len(old) :]
    lpb = layers_per_block
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":  # the block's last input block holds only the downsampler
            return f"input_blocks.{1 + block * (lpb + 1) + lpb}.0.op.{rest.removeprefix('conv.')}"
        index = 1 + block * (lpb + 1) + layer
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_rename_head(rest, _UNET_RESNET)}"
        return f"input_blocks.{index}.1.{rest}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        kind, layer, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":  # resnet 0, attention, resnet 1
            return f"middle_block.{2 * layer}.{_rename_head(rest, _UNET_RESNET)}"
        return f"middle_block.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":  # sits after the last resnet (and its attention, if any) of the block
            index = block * (lpb + 1) + lpb
            slot = 2 if up_has_attention[block] else 1
            return f"output_blocks.{index}.{slot}.{rest}"
        index = block * (lpb + 1) + layer
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_rename_head(rest, _UNET_RESNET)}"
        return f"output_blocks.{index}.1.{rest}"
    raise KeyError(f"no LDM name for UNet key {key!r}: is this an SD-1.x-shaped UNet2DConditionModel?")


def _vae_key_to_ldm(key: str, num_up_blocks: int) -> str:
    """`decoder.up_blocks.0.resnets.1.conv_shortcut.weight` -> `decoder.up.3.block.1.nin_shortcut.weight`."""
    for coder in ("encoder.", "decoder."):
        if key.startswith(coder):
            rest = key[len(coder) :]
            break
    else:  # quant_conv, post_quant_conv keep their names
        return key
    rest = re.sub(r"^conv_norm_out\.", "norm_out.", rest)
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
        rest = f"down.{m[1]}.block.{m[2]}.{m[3]}"
    elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.(.*)", rest):
        rest = f"down.{m[1]}.downsample.{m[2]}"
    elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):  # LDM counts up blocks backwards
        rest = f"up.{num_up_blocks - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", rest):
        rest = f"up.{num_up_blocks - 1 - int(m[1])}.upsample.{m[2]}"
    elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
        rest = f"mid.block_{int(m[1]) + 1}.{m[2]}"
    elif m := re.match(r"mid_block\.attentions\.0\.(.*)", rest):
        rest = f"mid.attn_1.{_rename_head(m[1], _VAE_ATTN)}"
    rest = rest.replace(".conv_shortcut.", ".nin_shortcut.")
    return coder + rest


def _vae_tensor_to_ldm(ldm_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """LDM's VAE attention uses 1x1 convolutions where diffusers uses linear layers: [C, C] -> [C, C, 1, 1]."""
    if ".mid.attn_1." in ldm_key and ldm_key.endswith("weight") and tensor.ndim == 2:
        return tensor[:, :, None, None]
    return tensor


def unet_state_dict_to_ldm(unet) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel's state dict under LDM names (without the `model.diffusion_model.` prefix)."""
    config = unet.config
    up_has_attention = ["CrossAttn" in t for t in config.up_block_types]
    return {_unet_key_to_ldm(k, config.layers_per_block, up_has_attention): v for k, v in unet.state_dict().items()}


def vae_state_dict_to_ldm(vae) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL's state dict under LDM names (without the `first_stage_model.` prefix)."""
    n_up = len(vae.config.up_block_types)
    out = {}
    for k, v in vae.state_dict().items():
        ldm_key = _vae_key_to_ldm(k, n_up)
        out[ldm_key] = _vae_tensor_to_ldm(ldm_key, v)
    return out


def text_encoder_state_dict_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """CLIPTextModel's state dict as SD stores it: `text_model.*` (transformers >= 5.6 dropped that level)."""
    out = {}
    for k, v in text_encoder.state_dict().items():
        k = k.removeprefix("text_model.")
        out["text_model." + k] = v
    return out


_TO_LDM = {
    "unet": unet_state_dict_to_ldm,
    "vae": vae_state_dict_to_ldm,
    "text_encoder": text_encoder_state_dict_to_ldm,
}


def pipeline_to_ldm_state_dict(pipe, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """`pipe.unet`, `pipe.vae`, `pipe.text_encoder` as one LDM-layout state dict (contiguous CPU tensors)."""
    state = {}
    for component, prefix in LDM_PREFIXES.items():
        for k, v in _TO_LDM[component](getattr(pipe, component)).items():
            v = v.detach().to("cpu")
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            state[prefix + k] = v.contiguous()
    return state


def verify_ldm_state_dict(state: Mapping[str, torch.Tensor], pipe) -> None:
    """Run diffusers' own LDM->diffusers converters on `state`: each must give back every key of `pipe`'s models.

    Raises AssertionError naming the first keys that do not round-trip. Only names and shapes are compared
    (values are views of the same tensors).
    """
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    back = {
        "unet": convert_ldm_unet_checkpoint(dict(state), dict(pipe.unet.config)),
        "vae": convert_ldm_vae_checkpoint(dict(state), dict(pipe.vae.config)),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(dict(state)).items()},
    }
    for component, converted in back.items():
        expected = {k.removeprefix("text_model."): v for k, v in getattr(pipe, component).state_dict().items()}
        if component == "text_encoder":
            expected.pop("embeddings.position_ids", None)
            converted.pop("embeddings.position_ids", None)
        missing = sorted(set(expected) - set(converted))
        extra = sorted(set(converted) - set(expected))
        bad_shape = [k for k in expected if k in converted and tuple(converted[k].shape) != tuple(expected[k].shape)]
        if missing or extra or bad_shape:
            raise AssertionError(
                f"LDM export of {component} does not round-trip through diffusers' converter: "
                f"missing={missing[:5]} extra={extra[:5]} wrong shape={bad_shape[:5]}"
            )


def export_ldm_checkpoint(pipe, path: str | Path, dtype: torch.dtype | None = None, verify: bool = True) -> Path:
    """Write pipe.unet, pipe.vae and pipe.text_encoder to ONE safetensors file in the original LDM layout.

    `dtype` casts floating tensors (e.g. torch.float16 halves the file). safetensors sorts tensors by dtype,
    then by name, so with one dtype each component's prefix is one contiguous byte range of the file
    (`cond_stage_model.` < `first_stage_model.` < `model.diffusion_model.`). The metadata names the prefixes.
    Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = pipeline_to_ldm_state_dict(pipe, dtype=dtype)
    if verify:
        verify_ldm_state_dict(state, pipe)
    metadata = {
        "format": "pt",
        "layout": "ldm",
        "components": json.dumps({c: p for c, p in LDM_PREFIXES.items()}),
    }
    save_file(state, str(path), metadata=metadata)
    return path


# ---------------------------------------------------------------------------------------------------------------
# reading back
# ---------------------------------------------------------------------------------------------------------------


def component_of(key: str) -> str | None:
    """Which component an LDM key belongs to (None for extras such as `alphas_cumprod`)."""
    for component, prefix in LDM_PREFIXES.items():
        if key.startswith(prefix):
            return component
    return None


class DamagedCheckpointError(ValueError):
    """A checkpoint file that is truncated or not what its name says: what it holds, and what to do."""

    def __init__(self, path: str | Path, detail: str):
        size = Path(path).stat().st_size if Path(path).exists() else 0
        super().__init__(
            f"{path} is damaged ({size:,} bytes): {detail}. Download it again (an interrupted download resumes: "
            "notebook 01), or compare its SHA-256 with the one the hub publishes for it.")


def check_checkpoint(path: str | Path) -> None:
    """Refuse a damaged single-file checkpoint before a loader fails on it with a generic message: a .safetensors
    file's header must fit and cover the file (`read_header`); a .ckpt must be the zip archive torch.save writes."""
    path = Path(path)
    if path.suffix == ".safetensors":
        read_header(path)
    elif path.suffix == ".ckpt" and not zipfile.is_zipfile(path):
        raise DamagedCheckpointError(path, "a .ckpt should be the zip archive torch.save writes, and this is not")


def read_header(path: str | Path) -> tuple[dict, int]:
    """The safetensors JSON header (name -> dtype, shape, data_offsets) and the byte offset where data starts.

    Raises `DamagedCheckpointError` (a ValueError) for a file that is not a valid safetensors file (too short,
    header length beyond the file, header not JSON, a tensor's byte range beyond the end of the file).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise DamagedCheckpointError(path, f"{size} bytes is too short to be a safetensors file")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size or n > 100_000_000:
            raise DamagedCheckpointError(path, f"header length {n} does not fit in a file of {size} bytes (truncated?)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DamagedCheckpointError(path, f"safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise DamagedCheckpointError(path, "safetensors header is not a JSON object")
    data_start = 8 + n
    data_len = size - data_start
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
        except (TypeError, KeyError, ValueError) as exc:
            raise DamagedCheckpointError(path, f"tensor {name!r} has no valid data_offsets") from exc
        end = max(end, stop)
        if not 0 <= begin <= stop:
            raise DamagedCheckpointError(path, f"tensor {name!r} has a negative byte range")
    if end > data_len:
        raise DamagedCheckpointError(
            path, f"tensors need {end} data bytes but the file holds {data_len} (truncated by {end - data_len} bytes)"
        )
    return header, data_start


def float_dtype(path: str | Path):
    """The torch dtype of the first floating tensor in a safetensors file (None if there is none)."""
    header, _ = read_header(path)
    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    for info in (v for k, v in header.items() if k != "__metadata__"):
        if info["dtype"] in names:
            return names[info["dtype"]]
    return None


def component_byte_ranges(path: str | Path) -> dict[str, dict]:
    """For each component: number of tensors, total bytes, and share of the file's size."""
    header, _ = read_header(path)
    size = Path(path).stat().st_size
    out: dict[str, dict] = {c: {"tensors": 0, "bytes": 0} for c in (*COMPONENTS, "other")}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, stop = info["data_offsets"]
        entry = out[component_of(name) or "other"]
        entry["tensors"] += 1
        entry["bytes"] += stop - begin
    for entry in out.values():
        entry["share"] = entry["bytes"] / size if size else 0.0
    return out


def load_ldm_state_dict(
    path: str | Path, prefixes: str | Iterable[str] | None = None, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Read the tensors whose keys start with one of `prefixes` (all of them for None) with lazy `safe_open`.

    Only the byte ranges of the selected tensors are read from disk; no pickle is involved.
    """
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    prefixes = tuple(prefixes) if prefixes is not None else None
    state = {}
    check_checkpoint(path)
    with safe_open(str(path), framework="pt", device=device) as f:
        for key in f.keys():
            if prefixes is None or key.startswith(prefixes):
                state[key] = f.get_tensor(key)
    return state


def _config_folder(config_dir: str | Path, component: str) -> Path:
    folder = Path(config_dir)
    if not (folder / component / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder / component / 'config.json'} not found: `config_dir` must be a diffusers pipeline folder "
            "(the one `pipe.save_pretrained` writes) holding a config for each component"
        )
    return folder


def load_component_from_single_file(
    path: str | Path,
    component: str,
    config_dir: str | Path,
    partial: bool = False,
    dtype: torch.dtype | None = None,
):
    """Load `component` ("unet" | "vae" | "text_encoder") from one LDM-layout single file, offline.

    The architecture comes from `config_dir/<component>/config.json` (a diffusers pipeline folder). With
    `partial=False` diffusers reads the whole file itself (`from_single_file(path, ...)`), as a user of the
    original checkpoint would; with `partial=True` we read only the tensors under the component's prefix
    (`load_ldm_state_dict`) and hand that dict to the same converter.
    """
    if component not in LDM_PREFIXES:
        raise ValueError(f"unknown component {component!r}; expected one of {sorted(LDM_PREFIXES)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"single-file checkpoint {path} does not exist")
    config_dir = _config_folder(config_dir, component)
    source = load_ldm_state_dict(path, LDM_PREFIXES[component]) if partial else str(path)

    if component == "text_encoder":
        from diffusers.loaders.single_file_utils import (
            create_diffusers_clip_model_from_ldm,
            load_single_file_checkpoint,
        )
        from transformers import CLIPTextModel

        checkpoint = source if isinstance(source, dict) else load_single_file_checkpoint(source, local_files_only=True)
        return create_diffusers_clip_model_from_ldm(
            CLIPTextModel,
            checkpoint,
            subfolder="text_encoder",
            config=str(config_dir),
            torch_dtype=dtype,  # this converter has no `dtype` yet
            local_files_only=True,
        )

    from diffusers import AutoencoderKL, UNet2DConditionModel

    cls = UNet2DConditionModel if component == "unet" else AutoencoderKL
    return cls.from_single_file(
        source,
        config=str(config_dir),
        subfolder=component,
        local_files_only=True,
        dtype=dtype,
    )
