"""Rebuild this metadata folder from the toy world: `python notebooks/metadata/build.py`.

Renders the depth maps of a few held-out toy scenes (never seen in training) and one wide "no crop" scene, saves
them in the storage formats the loader accepts (8-bit grey, 16-bit grey, grey as RGB and as RGBA), and writes
metadata.jsonl. Sizes in metadata.jsonl are for SD 1.5 (512 on the short side); the maps themselves are drawn at
the toy's scale (64 pixels high), which is all a depth map needs: the pipeline resizes control images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image

from helpers.studies.control import METADATA_FILE, METADATA_REFERENCE_SIZE
from helpers.toy import world

FOLDER = Path(__file__).parent
# (file, storage mode, held-out scene seed, objects): every storage format, every shape, one or two objects
SCENES = [
    ("maps/1_grey8.png", "L", 3, 1),
    ("maps/2_grey16.png", "I;16", 11, 1),
    ("maps/3_rgb.png", "RGB", 5, 2),
    ("maps/4_rgba.png", "RGBA", 20, 1),
    ("maps/5_grey8.png", "L", 8, 2),
]
NOCROP_PATH = "No crop/2_nocrop.png"
NOCROP_WIDTH = 2 * world.IMAGE_SIZE  # 2:1, wider than 3:2: its own aspect differs from every aspect the notebook tries
NOCROP_OBJECTS = [  # (shape, colour, size, centre x as a share of the width): one in the middle half, one at the edge
    ("circle", "red", "large", 0.31),
    ("square", "blue", "large", 0.80),
]
NOCROP_PROMPT = "a large red circle and a large blue square on a white background"


def render_depth(objects: list[world.SceneObject], height: int, width: int) -> np.ndarray:
    """A depth map like world.render's (ground plane, objects standing on it, circles bulging), at any width."""
    n_rows, n_cols = height * world.SUPERSAMPLE, width * world.SUPERSAMPLE
    x, y = np.meshgrid((np.arange(n_cols) + 0.5) / world.SUPERSAMPLE, (np.arange(n_rows) + 0.5) / world.SUPERSAMPLE)
    depth = world._ground_depth(y).astype(np.float32)
    for obj in objects:
        mask = world._object_mask(obj, x, y)
        base_y = obj.cy + world.SIZES[obj.size]
        object_depth = world._ground_depth(np.float32(base_y)) + world.OBJECT_LIFT[obj.size]
        depth = np.where(mask, object_depth + world._sphere_bulge(obj, x, y), depth)
    blocks = depth.reshape(height, world.SUPERSAMPLE, width, world.SUPERSAMPLE)
    return np.clip(blocks.mean(axis=(1, 3)), 0.0, 1.0).astype(np.float32)  # (H, W)


def save_depth(depth: np.ndarray, path: Path, mode: str) -> None:
    """Store a [0, 1] depth map in one of the formats load_depth_map reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        image = PIL.Image.fromarray(np.round(depth * 65535).astype(np.uint16))
    else:
        grey = np.round(depth * 255).astype(np.uint8)
        channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
        stacked = np.repeat(grey[..., None], 3, axis=-1) if channels > 1 else grey
        if channels == 4:
            stacked = np.concatenate([stacked, np.full_like(grey[..., None], 255)], axis=-1)  # opaque alpha
        image = PIL.Image.fromarray(stacked)
    image.save(path)


def nocrop_scene() -> tuple[np.ndarray, str]:
    height = world.IMAGE_SIZE
    objects = [world.SceneObject(shape, colour, size, "left" if share < 0.5 else "right", share * NOCROP_WIDTH,
                                 0.5 * height, world.COLOURS[colour]) for shape, colour, size, share in NOCROP_OBJECTS]
    return render_depth(objects, height, NOCROP_WIDTH), NOCROP_PROMPT


def main() -> None:
    entries = []
    scale = METADATA_REFERENCE_SIZE / world.IMAGE_SIZE  # toy pixels -> SD 1.5 pixels
    for relative, mode, seed, n_objects in SCENES:
        scene = world.make_scene(seed, "heldout", n_objects)
        _, depth = world.render(scene)
        save_depth(depth, FOLDER / relative, mode)
        entries.append({"name": Path(relative).stem, "prompt": scene.caption, "depth": relative,
                        "width": METADATA_REFERENCE_SIZE, "height": METADATA_REFERENCE_SIZE, "seed": seed})
    depth, prompt = nocrop_scene()
    save_depth(depth, FOLDER / NOCROP_PATH, "L")
    entries.append({"name": "nocrop", "prompt": prompt, "depth": NOCROP_PATH, "width": round(depth.shape[1] * scale),
                    "height": round(depth.shape[0] * scale), "seed": 0})
    (FOLDER / METADATA_FILE).write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    print(f"wrote {len(entries)} entries to {FOLDER / METADATA_FILE}")


if __name__ == "__main__":
    main()
