"""Pictures: the one conversion rule, grids and strips for the notebooks, plots, GIFs.

The rule: a float picture is in [0, 1] and is clipped, then rounded to uint8 (x · 255); uint8 stays; anything else
is refused (a float picture far outside [0, 1], such as 0..255 or a decoder's [-1, 1], is refused too).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import PIL.Image
import torch

# A float picture may stray this far outside [0, 1] (rounding in half precision) before it counts as another range.
FLOAT_SLACK = 0.5 / 255


def to_uint8(image, *, rgb: bool = False) -> np.ndarray:
    """Any picture (PIL; a numpy array or a CHW / HWC tensor, one picture or a batch) as a uint8 array, by the rule
    above. `rgb=True`: one (H, W, 3) RGB picture (grey and RGBA PIL images are converted; other arrays refused)."""
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB") if rgb and image.mode != "RGB" else image)
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu()
        image = image.permute(1, 2, 0) if image.ndim == 3 and image.shape[0] in (1, 3) else image  # CHW -> HWC
        image = image.numpy()
    array = np.asarray(image)
    if np.issubdtype(array.dtype, np.floating):
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 1.0)
        if low < -FLOAT_SLACK or high > 1 + FLOAT_SLACK:
            raise ValueError(f"a float picture must hold values in [0, 1], got {low:.3g}..{high:.3g} (0..255 floats: "
                             "cast to uint8; a decoder's [-1, 1]: map it with (x + 1) / 2)")
        array = np.round(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"a picture must be PIL, uint8, or float in [0, 1]; got an array of {array.dtype}")
    if rgb and (array.ndim != 3 or array.shape[-1] != 3):
        raise ValueError(f"expected one RGB picture (H, W, 3), got shape {array.shape}")
    return array


def to_pil(image) -> PIL.Image.Image:
    """A PIL image of any one picture (see `to_uint8`); a PIL image is returned as it is."""
    if isinstance(image, PIL.Image.Image):
        return image
    return PIL.Image.fromarray(to_uint8(image).squeeze())


def show_grid(
    images: Sequence,
    *,
    rows: int | None = None,
    cols: int | None = None,
    titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    size: float = 2.0,
    suptitle: str | None = None,
    save_to: str | Path | None = None,
):
    """A matplotlib figure of images with titles or row/column labels; saved as PNG if `save_to` is given."""
    import matplotlib.pyplot as plt

    images = [to_pil(im) for im in images]
    cols = cols or (len(images) if rows is None else -(-len(images) // rows))
    rows = rows or -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= len(images):
            ax.axis("off")
            continue
        ax.imshow(images[i], cmap="gray" if images[i].mode in ("L", "F", "I") else None)
        if titles is not None:  # wrapped to the panel's width, so neighbours' titles never overlap
            ax.set_title(textwrap.fill(titles[i], width=max(12, int(size * 13))), fontsize=8)
    for r, label in enumerate(row_labels or []):  # wrapped to the panel's height, so long prompts never overlap
        axes[r, 0].set_ylabel(textwrap.fill(label, width=max(12, int(size * 13))), fontsize=9)
    for c, label in enumerate(col_labels or []):
        axes[0, c].set_title(label, fontsize=9)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    if save_to is not None:
        fig.savefig(save_to, dpi=100)
    return fig


def latent_channels(latents: torch.Tensor) -> list[PIL.Image.Image]:
    """Each of a latent's channels (1, C, h, w) as a grey image, each stretched to its own min..max."""
    if latents.ndim != 4 or latents.shape[0] != 1:
        raise ValueError(f"latent_channels shows one latent: shape (1, C, h, w), got {tuple(latents.shape)}")
    channels = latents[0].float().cpu()
    lo = channels.amin(dim=(1, 2), keepdim=True)
    hi = channels.amax(dim=(1, 2), keepdim=True)
    channels = (channels - lo) / (hi - lo).clamp_min(1e-8)
    return [to_pil(c.numpy()) for c in channels]


def upscale(image, factor: int = 4) -> PIL.Image.Image:
    """Nearest-neighbour upscaling, so a 64×64 toy image is big enough to look at."""
    image = to_pil(image)
    return image.resize((image.width * factor, image.height * factor), PIL.Image.NEAREST)


def save_gif(images: Sequence, path: str | Path, *, fps: int = 4, bounce: bool = True, zoom: int = 1) -> Path:
    """An animated GIF of `images` (diffusers' export_to_gif), looping forever; `bounce` plays it forwards then
    backwards (an interpolation that jumps from its end back to its start is hard to watch); `zoom` upscales."""
    from diffusers.utils import export_to_gif

    if len(images) < 2:
        raise ValueError(f"save_gif needs at least 2 images (frames), got {len(images)}")
    if fps < 1:
        raise ValueError(f"fps={fps} must be at least 1 (frames per second)")
    frames = [upscale(im, zoom) if zoom > 1 else to_pil(im).convert("RGB") for im in images]
    if bounce:
        frames = frames + frames[-2:0:-1]  # 0 1 2 3 2 1, then the loop starts again at 0
    return Path(export_to_gif(frames, str(path), fps=fps))


# ---------------------------------------------------------------------------------------------------
# Control maps derived from depth (notebook 06's ControlNets and the toy's training alike)

CONTROL_KINDS = ("depth", "normal", "canny")  # what each ControlNet is conditioned on, all derived from depth
# Depth 1.0 stands this far (as a share of the image width) in front of depth 0.0 when normals are derived: the
# toy's objects (0.25-0.35 in front of the ground) then get steep rims, and its ground plane stays nearly flat.
NORMAL_DEPTH_SCALE = 0.125
# OpenCV Canny hysteresis thresholds on 8-bit grey (the values diffusers' ControlNet examples use).
CANNY_LOW, CANNY_HIGH = 100, 200


def unit_depth(depth, name: str = "depth") -> np.ndarray:
    """A depth map as float32 in [0, 1], (H, W): from a DepthMap (`helpers.studies.control`: anything with `.depth`),
    or an (H, W) uint8, uint16 or float array in [0, 1] (anything else is refused, not rescaled)."""
    depth = np.asarray(getattr(depth, "depth", depth))
    if depth.ndim != 2:
        raise ValueError(f"{name} must be a (height, width) map, got shape {depth.shape}; load_depth_map reads files")
    if depth.dtype == np.uint8:
        return depth.astype(np.float32) / 255.0
    if depth.dtype == np.uint16:
        return depth.astype(np.float32) / 65535.0
    depth = depth.astype(np.float32)
    if depth.min() < 0.0 or depth.max() > 1.0:
        raise ValueError(f"{name} values span [{depth.min():.3g}, {depth.max():.3g}]; a float map must lie in [0, 1]")
    return depth


def normal_map(depth, depth_scale: float = NORMAL_DEPTH_SCALE) -> np.ndarray:
    """Surface normals of a depth map (bright = near) as the usual RGB normal map: x right -> R, y up -> G,
    z towards the viewer -> B, each mapped from [-1, 1] to [0, 255], so a surface facing the camera is (128, 128, 255).

    (H, W) depth (a DepthMap, uint8, uint16 or float in [0, 1]) -> (H, W, 3) uint8. Depth 1.0 counts as
    `depth_scale` × width pixels in front of depth 0.0, so the same scene gives the same map at any resolution."""
    depth = unit_depth(depth)
    height_px = depth * depth_scale * depth.shape[1]  # depth -> distance towards the viewer, in pixels
    dz_drow, dz_dcol = np.gradient(height_px)  # (H, W) each; rows run downwards, y up is -row
    normals = np.stack([-dz_dcol, dz_drow, np.ones_like(depth)], axis=-1)  # (H, W, 3), unnormalised
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    return np.round((normals * 0.5 + 0.5) * 255).astype(np.uint8)


def canny_edges(image, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> np.ndarray:
    """Canny edges with OpenCV (`controlnet_aux`'s CannyDetector needs torchvision): an RGB image (H, W, 3; PIL or
    uint8) or a depth map (a DepthMap, or (H, W) uint8, uint16 or float in [0, 1]) -> (H, W, 3) uint8, 0 or 255."""
    image = np.asarray(getattr(image, "depth", image))  # a DepthMap's map, or the image
    if image.ndim == 3 and image.shape[-1] == 3:
        gray = cv2.cvtColor(np.ascontiguousarray(image, dtype=np.uint8), cv2.COLOR_RGB2GRAY)
    elif image.ndim == 2:
        gray = np.round(unit_depth(image, "image") * 255).astype(np.uint8)
    else:
        raise ValueError(f"image must be (H, W, 3) RGB or an (H, W) map, got shape {image.shape}")
    edges = cv2.Canny(gray, low, high)  # (H, W) uint8, 0 or 255
    return np.repeat(edges[..., None], 3, axis=-1)  # -> (H, W, 3)
