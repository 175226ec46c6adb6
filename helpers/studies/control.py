"""Control images for ControlNet: depth maps from files, maps derived from them, the metadata folder, and sizes.

    load_depth_map(path)            8/16-bit grey, RGB or RGBA PNG -> DepthMap (float (H, W) in [0, 1], and a report)
    normal_map(depth), canny_edges  derived control images, (H, W, 3) uint8
    read_metadata(folder)           notebooks/metadata/metadata.jsonl -> MetadataEntry per line (format: its README)
    snap_size, size_for_aspect      sizes that are multiples of the VAE factor, and sizes for an aspect ratio
    fit_control_image               bring a map to a target size: "resize" (stretch), "crop" or "pad"
    check_control_images            control images of the target size, or a clear error (or resized, if asked)
    estimate_depth                  a depth map from a photo with transformers' depth-estimation pipeline (hub)

Depth follows the ControlNet convention: bright = near.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import PIL.Image

from helpers import SOURCE_NOTEBOOKS_DIR
from helpers.core.models import hub_offline
from helpers.core.pictures import CONTROL_KINDS, canny_edges, normal_map, to_pil, to_uint8, unit_depth
from helpers.core.results import json_object
from helpers.core.stages import default_size, generate, make_generators, vae_scale_factor
from helpers.toy.oracle import ATTRIBUTES, control_adherence, image_object_mask, prompt_adherence

FIT_STRATEGIES = ("resize", "crop", "pad")
METADATA_FILE = "metadata.jsonl"
# Metadata sizes are written for SD 1.5, which was trained at 512 × 512; `MetadataEntry.size_for` scales them to
# a model trained at another size (the toy: 64 × 64), keeping the aspect.
METADATA_REFERENCE_SIZE = 512
# Channels of an RGB image closer than this (in 8-bit levels) count as one grey depth map saved as RGB.
GREY_TOLERANCE = 1


# ---------------------------------------------------------------------------------------------------
# Depth maps from files


@dataclass
class DepthMap:
    """A depth map in [0, 1] (bright = near), where it came from, and what loading did to it."""

    depth: np.ndarray  # (H, W) float32
    source: str
    report: str

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as PIL counts."""
        return self.depth.shape[1], self.depth.shape[0]

    def control_image(self) -> PIL.Image.Image:
        """The map as the 3-channel 8-bit image a depth ControlNet takes."""
        grey = to_uint8(self.depth)  # (H, W)
        return PIL.Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))  # (H, W) -> (H, W, 3)


def load_depth_map(source: str | Path | PIL.Image.Image) -> DepthMap:
    """Read a depth map (bright = near) from a PNG path or a PIL image: 8-bit grey ("L"), 16-bit grey ("I;16",
    or "I" as Pillow opens some 16-bit PNGs), grey stored as RGB, RGBA or LA (alpha: opaque is dropped,
    transparency composited onto 0, far). Other modes, and coloured RGB, are refused with an error that says why."""
    name = str(source) if not isinstance(source, PIL.Image.Image) else "<PIL image>"
    if isinstance(source, PIL.Image.Image):
        image = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"depth map {path} does not exist")
        image = PIL.Image.open(path)
        image.load()
    depth, report = _depth_from_image(image, name)
    return DepthMap(depth.astype(np.float32), name, f"{report}; {image.width}×{image.height}")


def _depth_from_image(image: PIL.Image.Image, name: str) -> tuple[np.ndarray, str]:
    mode = image.mode
    if mode == "L":
        return np.asarray(image, np.float32) / 255.0, "8-bit grey, scaled /255"
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.float32) / 65535.0, "16-bit grey, scaled /65535"
    if mode == "I":
        values = np.asarray(image)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"depth map {name}: 32-bit integer values span [{values.min()}, {values.max()}], "
                             "beyond 16 bits; save it as an 8- or 16-bit grey PNG")
        return values.astype(np.float32) / 65535.0, "16-bit grey (opened as 32-bit 'I'), scaled /65535"
    if mode in ("RGB", "RGBA", "LA"):
        return _depth_from_colour_channels(image, name)
    raise ValueError(f"depth map {name} has mode {mode!r}; give an 8- or 16-bit grey PNG ('L', 'I;16'), or grey "
                     "stored as RGB/RGBA")


def _depth_from_colour_channels(image: PIL.Image.Image, name: str) -> tuple[np.ndarray, str]:
    array = np.asarray(image).astype(np.float32)  # (H, W, C), C = 2 (LA), 3 or 4
    colour, alpha = (array[..., :1], array[..., 1]) if image.mode == "LA" else (array[..., :3], None)
    if image.mode == "RGBA":
        alpha = array[..., 3]
    spread = colour.max(-1) - colour.min(-1)  # (H, W): 0 where the channels agree
    if spread.max() > GREY_TOLERANCE:
        raise ValueError(
            f"depth map {name} is a colour image (its channels differ by up to {spread.max():.0f} levels), not a "
            "grey depth map. A colour-mapped depth map must be converted back to grey first; for a photo, "
            "estimate its depth (helpers.studies.control.estimate_depth)")
    depth = colour.mean(-1) / 255.0  # (H, W)
    report = f"{image.mode} with grey channels"
    if alpha is None:
        return depth, report + ", scaled /255"
    if alpha.min() == 255:
        return depth, report + ", opaque alpha dropped, scaled /255"
    transparent = float((alpha < 255).mean())
    return depth * alpha / 255.0, f"{report}, {transparent:.0%} of pixels (partly) transparent: composited onto 0 (far)"


def estimate_depth(image: PIL.Image.Image, model: str = "depth-anything/Depth-Anything-V2-Small-hf") -> DepthMap:
    """A depth map (bright = near) of an ordinary photo, with transformers' `depth-estimation` pipeline (Depth
    Anything and DPT predict relative inverse depth, which is ControlNet's convention). Needs the model from the
    hub: offline it raises an error saying so."""
    from transformers import pipeline

    try:
        estimator = pipeline("depth-estimation", model=model, local_files_only=hub_offline())
    except OSError as error:
        raise RuntimeError(f"estimate_depth needs the model {model!r} from the hub (or its local cache), which is "
                           f"not reachable here ({type(error).__name__}); use a depth map file instead") from error
    predicted = estimator(image.convert("RGB"))["predicted_depth"].squeeze().float().cpu().numpy()  # (h, w)
    low, high = float(predicted.min()), float(predicted.max())
    depth = (predicted - low) / max(high - low, 1e-8)
    resized = PIL.Image.fromarray(depth.astype(np.float32), mode="F").resize(image.size, PIL.Image.BILINEAR)
    return DepthMap(np.clip(np.asarray(resized), 0, 1).astype(np.float32), f"{model} on a photo",
                    f"estimated by {model}, min-max normalised to [0, 1]; {image.width}×{image.height}")


# ---------------------------------------------------------------------------------------------------
# Maps derived from depth


def control_images(depth, height: int, width: int, kinds=CONTROL_KINDS, strategy: str = "resize") -> dict:
    """A depth map (DepthMap, (H, W) array or PIL) fitted to width × height (`fit_control_image`), then each of
    `kinds` derived from the fitted map: {kind: PIL RGB image of the target size}."""
    unknown = set(kinds) - set(CONTROL_KINDS)
    if unknown:
        raise ValueError(f"kinds {sorted(unknown)} are unknown; choose from {CONTROL_KINDS}")
    if not isinstance(depth, (DepthMap, PIL.Image.Image)):
        depth = DepthMap(unit_depth(depth), "array", "")
    fitted = fit_control_image(depth, height, width, strategy)
    grey = np.asarray(fitted.convert("L"))  # (height, width) uint8
    derive = {"depth": lambda: fitted.convert("RGB"), "normal": lambda: PIL.Image.fromarray(normal_map(grey)),
              "canny": lambda: PIL.Image.fromarray(canny_edges(grey))}
    return {kind: derive[kind]() for kind in kinds}


# ---------------------------------------------------------------------------------------------------
# The metadata folder


@dataclass
class MetadataEntry:
    """One line of metadata.jsonl: a prompt, its depth map, and the size it is meant for (on SD 1.5)."""

    name: str
    prompt: str
    depth_path: Path
    width: int
    height: int
    negative_prompt: str = ""
    seed: int = 0

    def load_depth(self) -> DepthMap:
        return load_depth_map(self.depth_path)

    def size_for(self, pipe) -> SnappedSize:
        """The entry's (height, width) for `pipe`'s model: scaled by its trained size over SD 1.5's 512, snapped."""
        scale = default_size(pipe)[0] / METADATA_REFERENCE_SIZE
        return snap_size(self.height * scale, self.width * scale, vae_scale_factor(pipe))


REQUIRED_KEYS = {"prompt": str, "depth": str, "width": int, "height": int}
OPTIONAL_KEYS = {"name": str, "negative_prompt": str, "seed": int}


# A relative METADATA_DIR is looked for in the clone's notebooks/ folder (helpers.SOURCE_NOTEBOOKS_DIR) after the
# working directory: papermill runs in notebooks/, but Colab's kernel runs in /content, not the clone.


def find_metadata_dir(folder: str | Path) -> Path:
    """The metadata folder `folder` names: itself when absolute; a relative one is looked for in the working
    directory first, then in the project's notebooks/ folder. The error names every place looked."""
    folder = Path(folder).expanduser()
    candidates = [folder] if folder.is_absolute() else [Path.cwd() / folder, SOURCE_NOTEBOOKS_DIR / folder]
    for candidate in candidates:
        if (candidate / METADATA_FILE).is_file():
            return candidate.resolve()
    looked = ", ".join(str(c / METADATA_FILE) for c in candidates)
    raise FileNotFoundError(f"no {METADATA_FILE} for METADATA_DIR={str(folder)!r}: looked for {looked}. Give the "
                            "folder's full path, or one relative to the working directory (see notebooks/metadata/"
                            "README.md for the format)")


def read_metadata(folder: str | Path) -> list[MetadataEntry]:
    """Every entry of `folder`/metadata.jsonl (one JSON object a line; see notebooks/metadata/README.md), each
    checked: an error names the line and what is wrong, including a depth map that is not there. A relative
    `folder` is found as `find_metadata_dir` says."""
    folder = find_metadata_dir(folder)
    path = folder / METADATA_FILE
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            where = f"{path.name} line {number}"
            entries.append(_parse_entry(json_object(line, where), folder, where))
    if not entries:
        raise ValueError(f"{path} holds no entries")
    return entries


def with_prompts(entries: list[MetadataEntry], prompts: dict[str, str]) -> list[MetadataEntry]:
    """The entries with the prompts of `prompts` ({entry name: prompt}) in place of their own (the metadata's
    prompts describe the toy world; SD 1.5 deserves its own). A name that is no entry's is an error."""
    unknown = sorted(set(prompts) - {e.name for e in entries})
    if unknown:
        raise ValueError(f"prompts for {unknown}, which are not entries; the entries are {[e.name for e in entries]}")
    return [replace(e, prompt=prompts.get(e.name, e.prompt)) for e in entries]


def _parse_entry(record: dict, folder: Path, where: str) -> MetadataEntry:
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise ValueError(f"{where} lacks {missing}: every entry needs {list(REQUIRED_KEYS)}")
    unknown = sorted(set(record) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; known: {[*REQUIRED_KEYS, *OPTIONAL_KEYS]}")
    for key, kind in {**REQUIRED_KEYS, **OPTIONAL_KEYS}.items():
        if key in record and (not isinstance(record[key], kind) or isinstance(record[key], bool)):
            raise ValueError(f"{where}: {key}={record[key]!r} must be a {kind.__name__}")
    if record["width"] < 1 or record["height"] < 1:
        raise ValueError(f"{where}: width and height must be positive, got {record['width']}×{record['height']}")
    depth_path = folder / record["depth"]
    if not depth_path.is_file():
        raise FileNotFoundError(f"{where}: depth map {record['depth']!r} not found (looked for {depth_path})")
    return MetadataEntry(record.get("name", depth_path.stem), record["prompt"], depth_path, record["width"],
                         record["height"], record.get("negative_prompt", ""), record.get("seed", 0))


# ---------------------------------------------------------------------------------------------------
# Sizes and aspect ratios


@dataclass
class SnappedSize:
    height: int
    width: int
    asked: tuple[float, float]  # (height, width) before snapping
    factor: int

    @property
    def changed(self) -> bool:
        return (self.height, self.width) != self.asked

    @property
    def note(self) -> str:
        """What snapping did, in words ("" when nothing changed)."""
        if not self.changed:
            return ""
        asked = "×".join(f"{v:g}" for v in self.asked)
        return f"{asked} (H×W) is not a multiple of the VAE factor {self.factor}: using {self.height}×{self.width}"


def snap_size(height: float, width: float, factor: int) -> SnappedSize:
    """The nearest (height, width) that are positive multiples of `factor` (the latents are `factor`× smaller)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}×{width}")

    def snap(value: float) -> int:
        return max(factor, int(round(value / factor)) * factor)

    return SnappedSize(snap(height), snap(width), (height, width), factor)


def parse_aspect(aspect: str) -> float:
    """"3:2" -> 1.5 (width over height)."""
    try:
        width, height = (float(part) for part in aspect.split(":"))
    except ValueError as error:
        raise ValueError(f"aspect={aspect!r} must read 'W:H' with two positive numbers, e.g. '3:2'") from error
    if width <= 0 or height <= 0:
        raise ValueError(f"aspect={aspect!r} must read 'W:H' with two positive numbers, e.g. '3:2'")
    return width / height


def size_for_aspect(aspect: str | float, base_size: int, factor: int, keep: str = "short_side") -> SnappedSize:
    """(height, width) with width / height = `aspect`, snapped to `factor`. `keep="short_side"`: the short side is
    the model's trained size (SD 1.5 at 3:2: 768×512, what users usually pick); `"area"`: the trained area."""
    ratio = parse_aspect(aspect) if isinstance(aspect, str) else float(aspect)
    if keep == "short_side":
        height, width = (base_size, base_size * ratio) if ratio >= 1 else (base_size / ratio, base_size)
    elif keep == "area":
        height, width = base_size / math.sqrt(ratio), base_size * math.sqrt(ratio)
    else:
        raise ValueError(f"keep={keep!r} must be 'short_side' or 'area'")
    return snap_size(height, width, factor)


def _to_pil(image) -> PIL.Image.Image:
    """A control image (PIL, a DepthMap, or an (H, W[, 3]) array by helpers.core.pictures' rule) as PIL."""
    if isinstance(image, DepthMap):
        return image.control_image()
    if not isinstance(image, PIL.Image.Image) and np.ndim(image) not in (2, 3):
        raise ValueError(f"a control image must be PIL or an (H, W[, 3]) array, got shape {np.shape(image)}")
    return to_pil(image)


def fit_control_image(image, height: int, width: int, strategy: str = "resize") -> PIL.Image.Image:
    """`image` (PIL, an array by helpers.core.pictures' rule, or a DepthMap) brought to width × height:
    - "resize": stretched (what the ControlNet pipeline does to any control image): nothing lost, shapes distorted;
    - "crop": scaled to cover the target, then centre-cropped: shapes kept, the sides (or top and bottom) lost;
    - "pad": scaled to fit inside, then padded by repeating its edge pixels: shapes and content kept, smaller."""
    from PIL import ImageOps

    if strategy not in FIT_STRATEGIES:
        raise ValueError(f"strategy={strategy!r} must be one of {FIT_STRATEGIES}")
    image = _to_pil(image)
    if strategy == "resize":
        return image.resize((width, height), PIL.Image.BILINEAR)
    if strategy == "crop":
        return ImageOps.fit(image, (width, height), PIL.Image.BILINEAR)
    scale = min(width / image.width, height / image.height)
    inner = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), PIL.Image.BILINEAR)
    array = np.asarray(inner)
    top, left = (height - inner.height) // 2, (width - inner.width) // 2
    pad = [(top, height - inner.height - top), (left, width - inner.width - left)] + [(0, 0)] * (array.ndim - 2)
    return PIL.Image.fromarray(np.pad(array, pad, mode="edge"))


def check_control_images(images, height: int, width: int, factor: int, *, resize: bool = False,
                         name: str = "image") -> tuple[list[PIL.Image.Image], list[str]]:
    """Control images ready for a ControlNet at height × width: RGB (grey "L" is expanded), every one of exactly
    that size. A size other than the target is refused with an error (multi-ControlNet pipelines otherwise fail deep
    in the UNet, "size of tensor a must match"), or stretched to it when `resize=True`, with a note saying so.
    Returns (images, notes)."""
    for side, value in (("height", height), ("width", width)):
        if value < factor or value % factor:
            snapped = snap_size(height, width, factor)
            raise ValueError(f"{side}={value} is not a positive multiple of the VAE factor {factor}; "
                             f"try height={snapped.height}, width={snapped.width} (helpers.studies.control.snap_size)")
    single = not isinstance(images, (list, tuple))
    checked, notes = [], []
    for k, image in enumerate([images] if single else images):
        label = name if single else f"{name}[{k}]"
        image = _to_pil(image)
        if image.mode == "L":
            image = image.convert("RGB")
        elif image.mode != "RGB":
            raise ValueError(f"{label} has mode {image.mode!r}; a control image must be RGB or grey ('L'): "
                             "convert it (an RGBA map: drop or composite its alpha first)")
        if image.size != (width, height):
            if not resize:
                raise ValueError(f"{label} is {image.width}×{image.height} (W×H) but the target is {width}×{height}: "
                                 "fit it first (control.fit_control_image: resize, crop or pad), or pass "
                                 "resize=True to stretch it")
            notes.append(f"{label}: {image.width}×{image.height} stretched to {width}×{height}")
            image = image.resize((width, height), PIL.Image.BILINEAR)
        checked.append(image)
    return checked, notes


# ---------------------------------------------------------------------------------------------------
# Scoring on the toy (its oracle knows only the toy world)


def square_view(image) -> PIL.Image.Image:
    """An image padded to a square with its background colour (the median of its border), so the toy's oracle,
    which reads 64 × 64 squares, sees the shapes of a wide or tall picture unsquashed (only smaller)."""
    array = to_uint8(image, rgb=True)
    image = PIL.Image.fromarray(array)
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])  # (2H + 2W, 3)
    side = max(image.size)
    square = PIL.Image.new("RGB", (side, side), tuple(int(v) for v in np.median(border, axis=0)))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return square


def count_objects(image, min_share: float = 0.004) -> int:
    """Objects drawn in a toy image: connected parts of its object mask (pixels unlike the background) covering at
    least `min_share` of the image (a small toy object covers ~0.04 of a 64 × 64 image)."""
    from skimage.measure import label, regionprops

    mask = image_object_mask(image)  # (H, W) bool
    return int(sum(region.area >= min_share * mask.size for region in regionprops(label(mask))))


def toy_scores(images, control_depths, prompts, attributes: tuple[str, ...] | None = None) -> dict:
    """Control and prompt adherence of toy images (PIL, or (N, H, W, 3) uint8 or float in [0, 1]) against the depth
    maps they were conditioned on (each the image's size; None for a text-only image) and their prompts: mean mask
    IoU, the share of images the oracle reads as the prompt (on `square_view`s; `attributes` as in oracle.matches),
    and the objects drawn per image."""
    arrays = [to_uint8(image, rgb=True) for image in images]
    with_depth = [(a, np.asarray(d)) for a, d in zip(arrays, control_depths, strict=True) if d is not None]
    iou = control_adherence([a for a, _ in with_depth], [d for _, d in with_depth]) if with_depth else None
    adherence = prompt_adherence([square_view(a) for a in arrays], list(prompts), attributes=attributes or ATTRIBUTES)
    return {"control_iou": iou, "prompt_adherence": adherence, "objects": [count_objects(a) for a in arrays]}


# ---------------------------------------------------------------------------------------------------
# The notebooks' generations and their bookkeeping (06a: ControlNets; 06b: aspect ratios)


@dataclass
class ControlStudy:
    """What every generation of notebooks 06a/06b shares: the ControlNet pipeline (its nets by CONTROL_KINDS), the
    steps and guidance, and whether the toy's oracle can score the pictures."""

    control_pipe: object
    steps: int
    guidance_scale: float
    on_toy: bool

    @property
    def nets(self) -> dict:
        """{kind: ControlNetModel}: one net, or the nets of a MultiControlNetModel, in CONTROL_KINDS order."""
        nets = getattr(self.control_pipe.controlnet, "nets", [self.control_pipe.controlnet])
        return dict(zip(CONTROL_KINDS, nets))

    @property
    def text_pipe(self):
        """A plain StableDiffusionPipeline on the same components: the text-only pictures we compare against."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(**{k: v for k, v in self.control_pipe.components.items() if k != "controlnet"})

    def generate(self, kinds, prompts, maps, height, width, seeds, scales=1.0, start=0.0, end=1.0) -> np.ndarray:
        """uint8 pictures (N, H, W, 3) of `prompts` through our `generate`, with the ControlNets `kinds` on `maps`
        (one {kind: image} per prompt), each checked by `check_control_images`; no kinds: text only."""
        common = dict(seeds=seeds, num_inference_steps=self.steps, guidance_scale=self.guidance_scale, height=height,
                      width=width, output_type="np", progress=False)
        if not kinds:
            return to_uint8(generate(self.text_pipe, prompts, **common).images)
        factor = vae_scale_factor(self.control_pipe)
        per_net = [check_control_images([m[kind] for m in maps], height, width, factor)[0] for kind in kinds]
        multi = len(kinds) > 1
        return to_uint8(generate(
            self.control_pipe, prompts, **common, controlnet=[self.nets[k] for k in kinds] if multi else
            self.nets[kinds[0]], image=per_net if multi else per_net[0], controlnet_conditioning_scale=scales,
            control_guidance_start=start, control_guidance_end=end).images)

    def pipeline_images(self, kinds, prompt, maps, height, width, seed, scales=1.0) -> np.ndarray:
        """The same picture through diffusers' StableDiffusionControlNetPipeline: uint8 (H, W, 3)."""
        from diffusers import StableDiffusionControlNetPipeline

        multi = len(kinds) > 1
        # without SD 1.5's safety checker, which our generate does not run either: like with like
        pipe = StableDiffusionControlNetPipeline(
            **{**self.control_pipe.components, "safety_checker": None,
               "controlnet": [self.nets[k] for k in kinds] if multi else self.nets[kinds[0]]},
            requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        images = [maps[k] for k in kinds]
        return to_uint8(pipe(prompt, image=images if multi else images[0], height=height, width=width,
                             num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                             controlnet_conditioning_scale=scales, generator=make_generators([seed]),
                             output_type="np").images)[0]

    def scores(self, images, maps, prompts, **kwargs) -> dict:
        """Mask IoU against the depth maps (None for text only) and prompt adherence (`toy_scores`); None off the
        toy, whose oracle knows only the toy world."""
        if not self.on_toy:
            return {"control_iou": None, "prompt_adherence": None}
        depth = [None if m is None else np.asarray(m["depth"])[..., 0] / 255.0 for m in maps]
        return toy_scores(images, depth, prompts, **kwargs)

    def sweep(self, cases: dict, prompts, maps, height, width, seeds) -> tuple[list, dict]:
        """The depth net on `maps` once per case ({label: generate keyword arguments}): (rows, {label: pictures})."""
        rows, images = [], {}
        for label, kwargs in cases.items():
            images[label] = self.generate(["depth"], prompts, maps, height, width, seeds, **kwargs)
            row = self.scores(images[label], maps, prompts)
            rows.append({"setting": label, **kwargs, "control_iou": row["control_iou"],
                         "prompt_adherence": row["prompt_adherence"]})
        return rows, images


def labelled(label: str, row: dict) -> str:
    """A grid row's label with its scores, when there are any."""
    if row.get("control_iou") is None:
        return label
    return f"{label}\nIoU {row['control_iou']:.2f}, prompt {row['prompt_adherence']:.2f}"


def mean_of(rows, key):
    """The mean of `key` over the rows that have a value (None when none has)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def best(rows):
    """The row with the best prompt adherence (ties broken by control IoU); None when nothing was scored."""
    rows = [r for r in rows if r["prompt_adherence"] is not None]
    return max(rows, key=lambda r: (r["prompt_adherence"], r["control_iou"] or 0)) if rows else None


def aspect_study(study: ControlStudy, fitted: dict, sizes: dict, strategies, map_prompt: str, text_prompt: str,
                 seeds) -> tuple[list, dict]:
    """For every aspect ({aspect: SnappedSize}) and strategy (`fitted[aspect, strategy]`: {"depth": map}), the
    pictures of `map_prompt` with the depth net, plus text-only pictures of `text_prompt` (one object asked) at the
    same size; the native aspect (its name starts with "native") has one map, not one per strategy. Returns (rows,
    {(aspect, strategy): pictures}); the oracle scores shape and colour (padding shrinks sizes) and counts objects."""
    rows, images = [], {}
    for aspect, size in sizes.items():
        for label in ["text only", *(["native"] if aspect.startswith("native") else strategies)]:
            text_only = label == "text only"
            maps = [fitted[aspect, label if label in strategies else strategies[0]]] * len(seeds)
            prompt = text_prompt if text_only else map_prompt
            pictures = study.generate([] if text_only else ["depth"], [prompt] * len(seeds), maps, size.height,
                                      size.width, seeds)
            row = study.scores(pictures, [None] * len(seeds) if text_only else maps, [prompt] * len(seeds),
                               attributes=("shape", "colour"))
            objects = row.get("objects")
            images[aspect, label] = pictures
            rows.append({"aspect": aspect, "strategy": label, "height": size.height, "width": size.width,
                         "output_size": list(pictures.shape[1:3]), "control_iou": row["control_iou"],
                         "prompt_adherence": row["prompt_adherence"], "asked_objects": 1 if text_only else 2,
                         "objects_mean": None if objects is None else float(np.mean(objects))})
    return rows, images


def aspect_panels(rows: list, images: dict, strategies, blank_size: tuple[int, int]) -> tuple[list, list]:
    """The first picture of every (strategy, aspect), rows "text only" then each strategy, titled with its scores;
    the native column has one picture (in the first strategy's row), blanks of `blank_size` (H, W) below it."""
    by_key = {(r["aspect"], r["strategy"]): r for r in rows}
    aspects = list(dict.fromkeys(r["aspect"] for r in rows))
    panels, titles = [], []
    for name in ["text only", *strategies]:
        for aspect in aspects:
            label = "native" if aspect.startswith("native") and name != "text only" else name
            if label == "native" and name != strategies[0]:
                panels.append(np.full((*blank_size, 3), 255, np.uint8))
                titles.append("")
                continue
            row = by_key[aspect, label]
            iou = "" if row["control_iou"] is None else f" IoU {row['control_iou']:.2f}"
            score = "" if row["prompt_adherence"] is None else f" ok {row['prompt_adherence']:.2f}"
            objects = "" if row["objects_mean"] is None else f" obj {row['objects_mean']:.1f}"
            panels.append(images[aspect, label][0])
            titles.append(f"{aspect} {label}:{iou}{score}{objects}")
    return panels, titles


def aspect_summary(rows: list) -> dict:
    """Per aspect, the best strategy (`best`); each strategy's means over the aspects; the winner of those means
    (None when nothing was scored); and the text-only rows (objects drawn for a one-object prompt)."""
    controlled = [r for r in rows if r["strategy"] != "text only"]
    per_aspect = []
    for aspect in dict.fromkeys(r["aspect"] for r in rows):
        winner_here = best([r for r in controlled if r["aspect"] == aspect])
        if winner_here:
            per_aspect.append({"aspect": aspect, "best": winner_here["strategy"],
                               "prompt_adherence": winner_here["prompt_adherence"],
                               "control_iou": winner_here["control_iou"]})
    strategy_means = [{"strategy": s, "aspects": len(rs), "control_iou": mean_of(rs, "control_iou"),
                       "prompt_adherence": mean_of(rs, "prompt_adherence"), "objects_mean": mean_of(rs, "objects_mean")}
                      for s in dict.fromkeys(r["strategy"] for r in controlled)
                      for rs in [[r for r in controlled if r["strategy"] == s]]]
    return {"per_aspect": per_aspect, "strategy_means": strategy_means, "winner": best(strategy_means),
            "text_only": [r for r in rows if r["strategy"] == "text only"]}
