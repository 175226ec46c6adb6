"""The oracle: a small CNN that reads a toy-world image, and the two quality metrics built on it.

The oracle looks at three horizontal slots (left / center / right) and says for each whether it holds an
object and which (shape, colour, size), plus the background colour. On that reading:

- `prompt_adherence(images, prompts_or_scenes)`: the share of images whose reading matches every
  attribute the prompt states (prompts are parsed with `parse_prompt`, so any toy-world prompt works).
- `control_adherence(images, depth_maps)`: mean IoU between the object pixels of each image (pixels far
  from the background colour) and the object pixels of its depth map (nearer than the backdrop).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from helpers.core.pictures import to_uint8
from helpers.toy import world

SLOTS = tuple(world.POSITIONS)  # left, center, right
SHAPE_CLASSES = ("none", *world.SHAPES)  # per slot: "none" = empty slot
COLOUR_CLASSES = tuple(world.COLOURS)
SIZE_CLASSES = tuple(world.SIZES)
BACKGROUND_CLASSES = tuple(world.BACKGROUNDS)
HEADS = {"shape": SHAPE_CLASSES, "colour": COLOUR_CLASSES, "size": SIZE_CLASSES}


class Oracle(nn.Module):
    """(N, 3, 64, 64) images in [0, 1] -> logits per slot and attribute, and background logits."""

    def __init__(self, width: int = 32, image_size: int = world.IMAGE_SIZE):
        super().__init__()
        self.config = {"width": width, "image_size": image_size}

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())

        self.features = nn.Sequential(  # (N, 3, 64, 64) -> (N, 2w, 8, 8)
            block(3, width), nn.MaxPool2d(2), block(width, 2 * width), nn.MaxPool2d(2),
            block(2 * width, 2 * width), nn.MaxPool2d(2), block(2 * width, 2 * width),
        )
        feature_dim = 2 * width * (image_size // 8) ** 2
        self.slot_heads = nn.ModuleDict(
            {name: nn.Linear(feature_dim, len(SLOTS) * len(classes)) for name, classes in HEADS.items()}
        )
        self.background_head = nn.Linear(feature_dim, len(BACKGROUND_CLASSES))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(images).flatten(1)  # (N, feature_dim)
        logits = {
            name: head(features).view(len(images), len(SLOTS), len(HEADS[name]))  # (N, slots, classes)
            for name, head in self.slot_heads.items()
        }
        logits["background"] = self.background_head(features)  # (N, backgrounds)
        return logits


# ----------------------------------------------------------------------------------------------- labels


def scene_labels(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    """Integer targets: shape/colour/size (N, slots) with -100 (ignored) for colour/size of empty slots."""
    n = len(scenes)
    labels = {name: torch.full((n, len(SLOTS)), -100, dtype=torch.long) for name in HEADS}
    labels["shape"].fill_(0)  # "none"
    labels["background"] = torch.tensor([BACKGROUND_CLASSES.index(s.background) for s in scenes])
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            slot = SLOTS.index(obj.position)
            labels["shape"][i, slot] = SHAPE_CLASSES.index(obj.shape)
            labels["colour"][i, slot] = COLOUR_CLASSES.index(obj.colour)
            labels["size"][i, slot] = SIZE_CLASSES.index(obj.size)
    return labels


def oracle_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = nn.functional.cross_entropy(logits["background"], labels["background"])
    for name in HEADS:  # (N, slots, classes) -> (N * slots, classes)
        loss = loss + nn.functional.cross_entropy(logits[name].flatten(0, 1), labels[name].flatten())
    return loss


# ------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Reading:
    """What the oracle sees: objects left to right as (shape, colour, size, position), and the background."""

    objects: tuple[tuple[str, str, str, str], ...]
    background: str


def to_image_tensor(images, image_size: int = world.IMAGE_SIZE) -> torch.Tensor:
    """PIL images, an (N, H, W, 3) array (uint8, or float in [0, 1]: helpers.core.pictures' rule), or a float
    (N, 3, H, W) tensor in [0, 1] -> float (N, 3, image_size, image_size) in [0, 1] (resized if needed; non-square
    images get squashed)."""
    if isinstance(images, torch.Tensor):
        batch = images.detach().float().cpu()
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a (N, 3, H, W) tensor in [0, 1], got shape {tuple(batch.shape)}")
    else:
        arrays = [to_uint8(im, rgb=True) for im in images]  # (H, W, 3) uint8 each
        batch = torch.stack([torch.from_numpy(a.astype(np.float32) / 255.0).permute(2, 0, 1) for a in arrays])
    if batch.shape[-2:] != (image_size, image_size):
        batch = nn.functional.interpolate(batch, size=(image_size, image_size), mode="area")
    return batch


@torch.inference_mode()
def read_images(oracle: Oracle, images, batch_size: int = 256) -> list[Reading]:
    """The oracle's reading of each image."""
    batch = to_image_tensor(images, oracle.config["image_size"])
    oracle.eval()
    readings = []
    for start in range(0, len(batch), batch_size):
        logits = oracle(batch[start : start + batch_size])
        picks = {name: logits[name].argmax(-1) for name in logits}
        for i in range(len(picks["background"])):
            objects = tuple(
                (
                    SHAPE_CLASSES[picks["shape"][i, s]],
                    COLOUR_CLASSES[picks["colour"][i, s]],
                    SIZE_CLASSES[picks["size"][i, s]],
                    slot,
                )
                for s, slot in enumerate(SLOTS)
                if picks["shape"][i, s] != 0
            )
            readings.append(Reading(objects, BACKGROUND_CLASSES[picks["background"][i]]))
    return readings


# ------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for. Each object: dict with "shape", "colour" and optionally "size", "position"."""

    objects: tuple[dict, ...]
    background: str | None = None


_POSITION_WORDS = {"left": "left", "right": "right", "center": "center", "middle": "center"}


def parse_prompt(prompt: str) -> PromptSpec:
    """Parse a toy-world prompt ("a small red circle on the left against a gray background").

    The world's captions leave positions implied: two objects are read left to right, as they are written,
    and a single object without a stated position is in the centre.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    objects: list[dict] = []
    pending: dict = {}  # size / colour words waiting for their shape
    background = None
    for i, word in enumerate(words):
        if word in world.SIZES:
            pending["size"] = word
        elif word in world.COLOURS or word in world.BACKGROUNDS:
            if i + 1 < len(words) and words[i + 1] == "background":
                background = word
            else:
                pending["colour"] = word
        elif word in world.SHAPES:
            objects.append({**pending, "shape": word})
            pending = {}
        elif word in _POSITION_WORDS and objects:
            objects[-1]["position"] = _POSITION_WORDS[word]
    if not objects or len(objects) > 2:
        raise ValueError(f"expected a prompt with one or two toy-world shapes {world.SHAPES}: {prompt!r}")
    defaults = world.TWO_OBJECT_POSITIONS if len(objects) == 2 else ("center",)
    for obj, default in zip(objects, defaults):
        obj.setdefault("position", default)
    return PromptSpec(tuple(objects), background)


def scene_spec(scene: world.Scene) -> PromptSpec:
    """What the scene's caption states (same as parse_prompt(scene.caption))."""
    return parse_prompt(scene.caption)


def scene_full_spec(scene: world.Scene) -> PromptSpec:
    """Everything about the scene, stated or not: what a perfect reading of its rendering gives."""
    objects = tuple(
        {"shape": o.shape, "colour": o.colour, "size": o.size, "position": o.position} for o in scene.objects
    )
    return PromptSpec(objects, scene.background)


def reading_accuracy(images, scenes: list[world.Scene], oracle: Oracle | None = None) -> float:
    """Share of images (renderings of `scenes`) whose reading is exactly the scene, every attribute."""
    readings = read_images(oracle or load_oracle(), images)
    return float(np.mean([matches(r, scene_full_spec(s)) for r, s in zip(readings, scenes)]))


ATTRIBUTES = ("shape", "colour", "size", "position", "background")


def matches(reading: Reading, spec: PromptSpec, attributes: tuple[str, ...] = ATTRIBUTES) -> bool:
    """True when the reading has exactly as many objects as the prompt, left to right, with every stated
    attribute among `attributes` right (e.g. attributes=("colour",) checks the number of objects and
    their colours only)."""
    unknown = set(attributes) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}; choose from {ATTRIBUTES}")
    if "background" in attributes and spec.background is not None and reading.background != spec.background:
        return False
    if len(reading.objects) != len(spec.objects):
        return False
    for obj, wanted in zip(reading.objects, spec.objects):
        seen = _object_attributes(obj)
        if any(seen[key] != value for key, value in wanted.items() if key in attributes):
            return False
    return True


def _object_attributes(obj: tuple[str, str, str, str]) -> dict[str, str]:
    """One object of a Reading, (shape, colour, size, position), as a dict keyed like PromptSpec objects."""
    return dict(zip(("shape", "colour", "size", "position"), obj))


def _as_spec(item) -> PromptSpec:
    if isinstance(item, PromptSpec):
        return item
    if isinstance(item, world.Scene):
        return scene_spec(item)
    if isinstance(item, str):
        return parse_prompt(item)
    raise TypeError(f"expected a prompt string, a world.Scene or a PromptSpec, got {type(item).__name__}")


def prompt_adherence(
    images, prompts_or_scenes, oracle: Oracle | None = None, attributes: tuple[str, ...] = ATTRIBUTES
) -> float:
    """Share of images whose oracle reading matches what their prompt states (0..1); `attributes`
    restricts the check (see `matches`)."""
    specs = [_as_spec(item) for item in prompts_or_scenes]
    readings = read_images(oracle or load_oracle(), images)
    if len(readings) != len(specs):
        raise ValueError(f"{len(readings)} images but {len(specs)} prompts")
    return adherence(readings, specs, attributes)


def adherence(readings: list[Reading], specs: list[PromptSpec], attributes: tuple[str, ...] = ATTRIBUTES) -> float:
    """`prompt_adherence` for images the oracle has already read (read once, score several ways)."""
    return float(np.mean([matches(r, s, attributes) for r, s in zip(readings, specs, strict=True)]))


def attribute_accuracy(readings: list[Reading], specs: list[PromptSpec]) -> dict[str, float]:
    """For each attribute a prompt states (shape, colour, size, position, background, object count): the share
    of images whose reading has it right. Finer than `matches`, which needs every attribute right at once."""
    if len(readings) != len(specs):
        raise ValueError(f"{len(readings)} readings but {len(specs)} prompt specs")
    right: dict[str, list[bool]] = {}
    for reading, spec in zip(readings, specs):
        right.setdefault("object count", []).append(len(reading.objects) == len(spec.objects))
        if spec.background is not None:
            right.setdefault("background", []).append(reading.background == spec.background)
        for obj, wanted in zip(reading.objects, spec.objects):
            seen = _object_attributes(obj)
            for key, value in wanted.items():
                right.setdefault(key, []).append(seen[key] == value)
    return {key: float(np.mean(values)) for key, values in right.items()}


# ----------------------------------------------------------------------------------------- control


def image_object_mask(image: np.ndarray, min_distance: float = 30.0, coverage: float = 0.4) -> np.ndarray:
    """Pixels of an RGB picture (PIL, uint8, or float in [0, 1]) that belong to an object: farther (in 0..255
    levels) from the background colour (the median colour of the image border) than `coverage` of the farthest
    pixel, so an anti-aliased edge pixel counts when the object covers about that share of it (as the depth map's
    mask does)."""
    image = to_uint8(image, rgb=True).astype(np.float32)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])  # (4 * side, 3)
    distance = np.linalg.norm(image - np.median(border, axis=0), axis=-1)  # (H, W)
    return distance > max(min_distance, coverage * distance.max())


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def control_adherence(images, depth_maps) -> float:
    """Mean IoU between each image's object mask and its depth map's object mask (same size)."""
    arrays = [to_uint8(im, rgb=True) for im in images]
    depths = [np.asarray(d, np.float32) for d in depth_maps]
    if len(arrays) != len(depths):
        raise ValueError(f"{len(arrays)} images but {len(depths)} depth maps")
    ious = []
    for image, depth in zip(arrays, depths):
        if depth.ndim == 3:  # a 3-channel control image (uint8 or float): take one channel
            depth = depth[..., 0] / (255.0 if depth.max() > 1.0 else 1.0)
        if image.shape[:2] != depth.shape:
            raise ValueError(f"image {image.shape[:2]} and depth map {depth.shape} differ in size")
        ious.append(mask_iou(image_object_mask(image), world.depth_object_mask(depth)))
    return float(np.mean(ious))


# ----------------------------------------------------------------------------------------- weights

ORACLE_DIR = Path(__file__).parent / "weights" / "oracle"


def save_oracle(oracle: Oracle, directory: Path = ORACLE_DIR) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in oracle.state_dict().items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(oracle.config, indent=2) + "\n")


_CACHE: dict[str, Oracle] = {}


def load_oracle(directory: Path = ORACLE_DIR) -> Oracle:
    """The trained oracle (cached per directory)."""
    from safetensors.torch import load_file

    key = str(directory)
    if key not in _CACHE:
        if not (directory / "model.safetensors").exists():
            raise FileNotFoundError(
                f"no oracle weights in {directory}; train them with `python -m helpers.toy.train --stage oracle`"
            )
        oracle = Oracle(**json.loads((directory / "config.json").read_text()))
        oracle.load_state_dict(load_file(directory / "model.safetensors"))
        _CACHE[key] = oracle.eval()
    return _CACHE[key]
