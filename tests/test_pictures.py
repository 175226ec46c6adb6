"""helpers.core.pictures: the GIF writer (notebook 05's walk)."""

import numpy as np
import PIL.Image
import pytest

from helpers.core.pictures import save_gif


def test_save_gif_bounces_and_refuses_one_frame(tmp_path):
    frames = [np.full((8, 8, 3), value, np.uint8) for value in (0, 80, 160, 240)]
    path = save_gif(frames, tmp_path / "walk.gif", fps=5, zoom=2)
    gif = PIL.Image.open(path)
    assert gif.n_frames == 6 and gif.size == (16, 16)  # 0 1 2 3 2 1
    assert save_gif(frames, tmp_path / "once.gif", bounce=False).exists()
    assert PIL.Image.open(tmp_path / "once.gif").n_frames == 4
    with pytest.raises(ValueError, match="at least 2"):
        save_gif(frames[:1], tmp_path / "one.gif")
