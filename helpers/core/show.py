"""Pictures for the notebooks: image grids with labels, strips of intermediate steps, plots."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch


def to_pil(image) -> PIL.Image.Image:
    """A PIL image from PIL, a HWC numpy array in [0, 1] / uint8, or a CHW tensor in [0, 1]."""
    if isinstance(image, PIL.Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu()
        image = image.permute(1, 2, 0).numpy() if image.ndim == 3 and image.shape[0] in (1, 3) else image.numpy()
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return PIL.Image.fromarray(array.squeeze())


def image_grid(images: Sequence, rows: int | None = None, cols: int | None = None) -> PIL.Image.Image:
    """Paste equally sized images into one rows × cols image (row by row)."""
    images = [to_pil(im) for im in images]
    if not images:
        raise ValueError("image_grid needs at least one image")
    cols = cols or (len(images) if rows is None else -(-len(images) // rows))
    rows = rows or -(-len(images) // cols)
    if rows * cols < len(images):
        raise ValueError(f"{len(images)} images do not fit a {rows}×{cols} grid")
    width, height = images[0].size
    grid = PIL.Image.new("RGB", (cols * width, rows * height), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB").resize((width, height)), ((i % cols) * width, (i // cols) * height))
    return grid


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
