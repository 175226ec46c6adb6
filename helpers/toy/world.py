"""The toy world: flat-colour shapes on a ground plane, with captions and depth maps.

Every scene is a pure function of `(split, seed)`: the same call renders the same pixels on any machine.
A scene holds one object, or two (one on the left, one on the right); each object has a shape, a colour,
a size and a horizontal slot (left / center / right) with a small random jitter. Captions mention a
random subset of those attributes in varied wording, with one convention: a single object's caption
always says "left" or "right" when the object is off-centre, so a caption without a position means the
centre. Two-object captions list the objects from left to right and never say "left" or "right", so the
text encoder has to read word order as well as words.

Depth follows the ControlNet convention (bright = near): the backdrop is a ground plane that comes
nearer towards the bottom of the picture, objects stand in front of it (large ones nearer than small
ones) and circles bulge like spheres. Normal maps and Canny edges are derived from the depth map by
`helpers.core.pictures` (`normal_map`, `canny_edges`), for notebook 06 and the toy's training alike.

Held-out split: a caption whose CRC32 is divisible by 10 is never shown in training; held-out scenes
use only such captions and a separate seed space.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from helpers.core.pictures import to_uint8

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # render at 4x and average down: anti-aliased edges, like a real photo of a shape

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
}
BACKGROUNDS = {
    "black": (20, 20, 20),
    "white": (235, 235, 235),
    "gray": (128, 128, 128),
    "brown": (100, 65, 40),
}
SIZES = {"small": 7.0, "large": 12.0}  # object radius in pixels at IMAGE_SIZE
POSITIONS = {"left": 0.23, "center": 0.5, "right": 0.77}  # slot centre as a fraction of the width
TWO_OBJECT_POSITIONS = ("left", "right")
COLOUR_JITTER = 8  # +- per channel, so the oracle learns colour names, not exact RGB values
POSITION_JITTER = 2.0  # +- pixels horizontally (at IMAGE_SIZE)
VERTICAL_RANGE = (0.35, 0.65)  # object centre, fraction of the height

# Depth (bright = near): the ground plane spans GROUND_DEPTH, objects stand OBJECT_LIFT in front of
# the ground at their base, so every object pixel is nearer than any backdrop pixel.
GROUND_DEPTH = (0.10, 0.40)  # top row, bottom row
OBJECT_LIFT = {"small": 0.25, "large": 0.35}
SPHERE_BULGE = 0.10
OBJECT_DEPTH_THRESHOLD = 0.42  # depth > this  <=>  object pixel (max backdrop depth is 0.40)

SPLITS = ("train", "heldout")
HELDOUT_MODULUS = 10  # 1 caption in 10 is held out
TWO_OBJECT_FRACTION = 0.3  # of scenes when max_objects == 2

PREFIXES = ("a", "a", "a picture of a", "a drawing of a", "a photo of a")
POSITION_PHRASES = {
    "left": ("on the left", "at the left"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the right"),
}
BACKGROUND_PHRASES = ("on a {} background", "against a {} background", "with a {} background")
PAIR_JOINERS = ("and a", "next to a", "beside a")

# Every word a caption can contain, for the tokenizer.
VOCABULARY = sorted(
    {
        word
        for phrase in (
            *SHAPES,
            *COLOURS,
            *BACKGROUNDS,
            *SIZES,
            *PREFIXES,
            *(p for phrases in POSITION_PHRASES.values() for p in phrases),
            *(p.format("x") for p in BACKGROUND_PHRASES),
            *PAIR_JOINERS,
        )
        for word in phrase.split()
        if word != "x"
    }
)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str
    cx: float  # centre in pixels (at IMAGE_SIZE)
    cy: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    """One scene: what is in it, what the caption says about it, and how to render it."""

    split: str
    seed: int
    background: str
    background_rgb: tuple[int, int, int]
    objects: tuple[SceneObject, ...]  # left to right
    caption: str
    # Attributes the caption states: subset of {"size", "position", "background"} for single objects, of
    # {"size", "background"} for two (shape and colour are always stated; word order fixes left/right; an
    # unstated single position means the centre).
    mentions: frozenset[str] = field(default_factory=frozenset)


def is_heldout_caption(caption: str) -> bool:
    return zlib.crc32(caption.encode()) % HELDOUT_MODULUS == 0


def _jittered(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(np.array(rgb) + jitter, 0, 255))


def _draw_object(rng: np.random.Generator, position: str, exclude_colour: str | None) -> SceneObject:
    shape = str(rng.choice(SHAPES))
    colour = str(rng.choice([c for c in COLOURS if c != exclude_colour]))
    size = str(rng.choice(list(SIZES)))
    cx = POSITIONS[position] * IMAGE_SIZE + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    cy = rng.uniform(*VERTICAL_RANGE) * IMAGE_SIZE
    return SceneObject(shape, colour, size, position, cx, cy, _jittered(COLOURS[colour], rng))


def _object_phrase(obj: SceneObject, with_size: bool) -> str:
    return f"{obj.size} {obj.colour} {obj.shape}" if with_size else f"{obj.colour} {obj.shape}"


def _caption(
    rng: np.random.Generator, objects: tuple[SceneObject, ...], background: str
) -> tuple[str, frozenset[str]]:
    # Position words belong to single objects only. Two-object captions place the objects by word order alone
    # (left first): had they said "X on the left and a Y on the right", "left" and "right" would mean "two
    # objects" as often as "this side", and a model would learn that instead.
    stated = ("size", "position", "background") if len(objects) == 1 else ("size", "background")
    mentions = {name for name in stated if rng.random() < 0.5}
    # An unplaced object is in the centre. Were it anywhere, "a red circle" would ask for three layouts at once:
    # the denoiser's early steps average them, guidance sharpens the average, and two objects come out (a third
    # of such prompts did, with a position stated never).
    if len(objects) == 1 and objects[0].position != "center":
        mentions.add("position")
    words = [str(rng.choice(PREFIXES)), _object_phrase(objects[0], "size" in mentions)]
    if len(objects) == 1:
        if "position" in mentions:
            words.append(str(rng.choice(POSITION_PHRASES[objects[0].position])))
    else:
        words += [str(rng.choice(PAIR_JOINERS)), _object_phrase(objects[1], "size" in mentions)]
    if "background" in mentions:
        words.append(str(rng.choice(BACKGROUND_PHRASES)).format(background))
    return " ".join(words), frozenset(mentions)


def make_scene(seed: int, split: str = "train", n_objects: int = 1) -> Scene:
    """The scene of `(split, seed)` with `n_objects` (1 or 2) objects; its caption belongs to `split`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n_objects not in (1, 2):
        raise ValueError(f"n_objects must be 1 or 2, got {n_objects}")
    rng = np.random.default_rng([SPLITS.index(split), n_objects, seed])
    while True:  # redraw until the caption falls in the requested split (~10 tries for "heldout")
        background = str(rng.choice(list(BACKGROUNDS)))
        if n_objects == 1:
            objects = (_draw_object(rng, str(rng.choice(list(POSITIONS))), None),)
        else:
            first = _draw_object(rng, TWO_OBJECT_POSITIONS[0], None)
            objects = (first, _draw_object(rng, TWO_OBJECT_POSITIONS[1], first.colour))
        caption, mentions = _caption(rng, objects, background)
        if is_heldout_caption(caption) == (split == "heldout"):
            bg_rgb = _jittered(BACKGROUNDS[background], rng)
            return Scene(split, seed, background, bg_rgb, objects, caption, mentions)


def _object_mask(obj: SceneObject, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean coverage of `obj` on the pixel-centre grid (x, y), in IMAGE_SIZE pixel units."""
    r = SIZES[obj.size]
    dx, dy = x - obj.cx, y - obj.cy
    if obj.shape == "circle":
        return dx**2 + dy**2 <= r**2
    if obj.shape == "square":
        half = 0.85 * r  # about the circle's area
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if obj.shape == "diamond":
        # A rhombus taller than wide. With the square turned 45 degrees, a circle was about the average of a square
        # and a diamond, and guidance, which extrapolates away from the average, drew 20 circles in 55 as diamonds.
        return np.abs(dx) / (0.95 * r) + np.abs(dy) / (1.45 * r) <= 1
    if obj.shape == "triangle":  # pointing up, apex at (0, -r), base at dy = 0.75 r
        base, half_width = 0.75 * r, 1.05 * r
        inside_sides = np.abs(dx) <= half_width * (dy + r) / (base + r)
        return (dy <= base) & inside_sides
    raise ValueError(f"unknown shape {obj.shape!r}")


def _sphere_bulge(obj: SceneObject, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if obj.shape != "circle":
        return np.zeros_like(x)
    rho2 = ((x - obj.cx) ** 2 + (y - obj.cy) ** 2) / SIZES[obj.size] ** 2
    return SPHERE_BULGE * np.sqrt(np.clip(1.0 - rho2, 0.0, 1.0))


def _ground_depth(y: np.ndarray) -> np.ndarray:
    near_bottom = y / IMAGE_SIZE
    return GROUND_DEPTH[0] + (GROUND_DEPTH[1] - GROUND_DEPTH[0]) * near_bottom


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """The scene's image (uint8, H×W×3) and depth map (float32 in [0, 1], H×W, bright = near)."""
    n = IMAGE_SIZE * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE  # sub-pixel centres in IMAGE_SIZE units
    x, y = np.meshgrid(coords, coords)  # (n, n) each
    image = np.broadcast_to(np.array(scene.background_rgb, np.float32), (n, n, 3)).copy()
    depth = _ground_depth(y).astype(np.float32)
    for obj in scene.objects:  # slots never overlap, so drawing order does not matter
        mask = _object_mask(obj, x, y)
        image[mask] = obj.rgb
        base_y = obj.cy + SIZES[obj.size]  # where the object stands on the ground plane
        object_depth = _ground_depth(np.float32(base_y)) + OBJECT_LIFT[obj.size] + _sphere_bulge(obj, x, y)
        depth = np.where(mask, object_depth, depth)
    # (n, n, C) -> (IMAGE_SIZE, IMAGE_SIZE, C): average each SUPERSAMPLE×SUPERSAMPLE block
    image = image.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    depth = depth.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).mean(axis=(1, 3))
    return np.round(image).astype(np.uint8), np.clip(depth, 0.0, 1.0).astype(np.float32)


def depth_object_mask(depth: np.ndarray) -> np.ndarray:
    """Pixels where an object stands in front of the backdrop (depth map in [0, 1], bright = near)."""
    return np.asarray(depth) > OBJECT_DEPTH_THRESHOLD


def depth_to_control_image(depth: np.ndarray) -> np.ndarray:
    """A depth map as the 3-channel uint8 image ControlNet pipelines take."""
    gray = to_uint8(np.asarray(depth, np.float32))  # (H, W), by helpers.core.pictures' rule
    return np.repeat(gray[..., None], 3, axis=-1)  # (H, W) -> (H, W, 3)


def make_scenes(
    n: int, seed: int = 0, split: str = "train", max_objects: int = 1, min_objects: int = 1
) -> list[Scene]:
    """`n` scenes with seeds seed..seed+n-1; between min_objects and max_objects objects each."""
    if not 1 <= min_objects <= max_objects <= 2:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= 2, got {min_objects}, {max_objects}")
    scenes = []
    for s in range(seed, seed + n):
        two = min_objects == 2 or (
            max_objects == 2 and np.random.default_rng([7, s]).random() < TWO_OBJECT_FRACTION
        )
        scenes.append(make_scene(s, split, 2 if two else 1))
    return scenes


def render_batch(scenes: list[Scene]) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, 3) uint8 and depth maps (N, H, W) float32 of `scenes`."""
    pairs = [render(scene) for scene in scenes]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
