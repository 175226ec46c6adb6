"""Notebooks 04 (lerp grid) and 05 (slerp): what their smoke runs recorded, and the pieces they are built from
(the noise they interpolate, the morph's endpoints, the GIF, the alpha slider)."""

import math

import numpy as np
import PIL.Image
import pytest
import torch

from helpers.core.pictures import save_gif
from helpers.core.stages import default_size, denoise, encode_text
from helpers.series.profiles import parameters_for
from helpers.studies.interpolate import (
    MIDPOINT_METHODS,
    colour_purity,
    colour_tolerance,
    morph_midpoints,
    noise_latents,
)
from helpers.toy import world
from helpers.toy.oracle import Reading


def expected_lerp_norm(alpha: float) -> float:  # independent of helpers.studies.interpolate
    return math.sqrt((1 - alpha) ** 2 + alpha**2)


# ------------------------------------------------------------------------------------------ notebook 04


@pytest.mark.notebook
def test_04_lerp_grid_norm_curve_and_endpoints(notebook_results, smoke_runs):
    r = notebook_results("04")
    smoke = parameters_for("04", "smoke")
    n = smoke["NUM_DIVISIONS"]
    assert r["model"] == "toy" and r["profile"] == "smoke"
    assert r["alphas"] == [k / n for k in range(n + 1)], "alpha = n / NUM_DIVISIONS for n = 0 .. NUM_DIVISIONS"
    curve = r["norm_curve"]
    assert curve["pairs"] == smoke["NORM_PAIRS"] and len(curve["norm_ratio"]) == n + 1
    assert curve["expected"] == pytest.approx([expected_lerp_norm(a) for a in r["alphas"]])
    middle = r["alphas"].index(0.5)
    # 16 pairs of 1024-dim noise: the measured dip is within a few percent of 1/sqrt(2), the ends at 1
    assert curve["norm_ratio"] == pytest.approx(curve["expected"], abs=0.03)
    assert curve["norm_ratio"][middle] == pytest.approx(2**-0.5, abs=0.02)
    assert curve["std"][middle] == pytest.approx(2**-0.5, abs=0.03) and curve["std"][0] == pytest.approx(1, abs=0.03)
    # alpha 0 and 1 of every row are the two generations (pixel values 0..255; other batch sizes: rounding only)
    for key in ("final_lerp_endpoint_max_diff", "noise_morph_endpoint_max_diff", "text_morph_start_max_diff"):
        assert r[key] <= 2, (key, r[key])
    for figure in ("04_lerp_grid.png", "04_three_ways.png", "04_norm_curve.png", "04_midpoints.png"):
        assert (smoke_runs.out_dir / figure).exists(), figure


@pytest.mark.notebook
def test_04_midpoint_statistics_and_bad_input(notebook_results):
    r = notebook_results("04")
    assert r["midpoint_seeds"] == parameters_for("04", "smoke")["MIDPOINT_SEEDS"]
    stats = r["midpoint_stats"]
    assert set(stats) == {"noise lerp", "final-latent lerp"}
    assert stats["noise lerp"]["latent_norm_ratio"] == pytest.approx(2**-0.5, abs=0.05)
    assert stats["final-latent lerp"]["latent_norm_ratio"] < 0.99, "the mean of two different latents is shorter"
    for method, s in stats.items():  # a midpoint is a picture, not a blank: its contrast is of the endpoints' order
        assert 0.3 < s["contrast_ratio"] < 3, (method, s)
    assert r["endpoint_contrast"] > 0.02
    bad = r["bad_cases"]
    assert len(bad) == 4 and all(v.startswith("ValueError") for v in bad.values()), bad
    assert "NUM_DIVISIONS=0" in bad["NUM_DIVISIONS=0"]
    assert "shape" in bad["endpoints of different shapes"]
    assert "float16" in bad["endpoints of different dtypes"]
    assert "[0, 1]" in bad["t = 1.5"] and "1.5" in bad["t = 1.5"]
    assert r["summary"]["lerp_noise_norm_at_half"] == r["norm_curve"]["norm_ratio"][r["alphas"].index(0.5)]


# ------------------------------------------------------------------------------------------ notebook 05


@pytest.mark.notebook
def test_05_slerp_norm_curves_grid_and_gif(notebook_results, smoke_runs):
    r = notebook_results("05")
    n = parameters_for("05", "smoke")["NUM_DIVISIONS"]
    curves = r["norm_curves"]
    assert curves["slerp"]["norm_ratio"] == pytest.approx([1.0] * (n + 1), abs=0.02), "slerp keeps the norm"
    assert curves["lerp"]["norm_ratio"] == pytest.approx(curves["lerp_expected"], abs=0.03)
    assert curves["lerp_expected"] == pytest.approx([expected_lerp_norm(k / n) for k in range(n + 1)])
    assert r["lerp_slerp_same_endpoints"] is True
    assert "[0, 1]" in r["bad_t_error"]
    for figure in ("05_norm_curves.png", "05_lerp_vs_slerp.png", "05_midpoints.png"):
        assert (smoke_runs.out_dir / figure).exists(), figure
    gif = PIL.Image.open(smoke_runs.out_dir / r["gif"]["path"])
    assert r["gif"]["frames_interpolated"] == n + 1
    assert gif.n_frames == 2 * (n + 1) - 2, "played forwards then backwards, ends not repeated"
    assert gif.size[0] >= r["width"]


@pytest.mark.notebook
def test_05_oracle_midpoint_shares(notebook_results):
    r = notebook_results("05")
    smoke = parameters_for("05", "smoke")
    q = r["midpoint_quality"]
    assert q["pairs"] == smoke["PROMPT_PAIRS"] and len(q["seeds"]) == smoke["ORACLE_SEEDS"]
    count = len(q["pairs"]) * len(q["seeds"])
    assert q["midpoints_per_method"] == count and q["alpha"] == 0.5
    assert set(q["shares"]) == set(MIDPOINT_METHODS)
    for method in MIDPOINT_METHODS:
        either, a, b = q["shares"][method], q["share_a"][method], q["share_b"][method]
        assert max(a, b) <= either <= min(1.0, a + b) + 1e-9, (method, q)
        assert either <= q["share_one_object"][method] + 1e-9, "reading as A or B means reading one object"
        assert all(abs(x * count - round(x * count)) < 1e-6 for x in (either, a, b)), "shares of whole midpoints"
        assert 0.0 <= q["colour_purity"][method] <= 1.0
    assert q["endpoint_adherence"] >= 0.5, "the toy model must draw the two prompts at the ends"
    assert q["colour_purity"]["ends"] >= 0.5, "the ends are flat shapes of one colour"
    assert q["share_one_object"]["noise slerp"] >= 0.5, "slerped noise denoises to clean single shapes"
    verdict, purity = r["verdict"], q["colour_purity"]
    assert verdict["noise slerp keeps clean shapes: purer colour than final-latent lerp"] == (
        purity["noise slerp"] > purity["final-latent lerp"])
    assert verdict["final-latent lerp gives blends: less pure than the endpoints"] == (
        purity["final-latent lerp"] < purity["ends"])
    assert r["summary"]["either_noise_slerp"] == q["shares"]["noise slerp"]
    assert r["summary"]["purity_final_latent_lerp"] == purity["final-latent lerp"]


# ------------------------------------------------------------------------------------------ the pieces


def test_noise_latents_is_the_noise_denoise_draws(tiny_pipe):
    height, width = default_size(tiny_pipe)
    prompt_embeds, negative_prompt_embeds = encode_text(tiny_pipe, ["a", "b"])
    kwargs = dict(num_inference_steps=2, height=height, width=width, progress=False)
    drawn = denoise(tiny_pipe, prompt_embeds, negative_prompt_embeds, seeds=[3, 4], **kwargs)
    given = denoise(tiny_pipe, prompt_embeds, negative_prompt_embeds, seeds=[3, 4],
                    latents=noise_latents(tiny_pipe, [3, 4], height, width), **kwargs)
    assert torch.equal(drawn, given)


@pytest.mark.parametrize("alpha, endpoint", [(0.0, "A"), (1.0, "B")])
def test_morph_midpoints_at_the_ends_are_the_generations(tiny_pipe, alpha, endpoint):
    height, width = default_size(tiny_pipe)
    latents = morph_midpoints(tiny_pipe, "a red circle", "a blue square", [0, 1], [5, 6], alpha,
                              num_inference_steps=2, height=height, width=width)
    assert set(latents) == {"A", "B", *MIDPOINT_METHODS}
    for method in MIDPOINT_METHODS:
        torch.testing.assert_close(latents[method], latents[endpoint], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(latents["A"], latents["B"])


def test_morph_midpoints_refuses_unpaired_seeds_and_missing_size(tiny_pipe):
    height, width = default_size(tiny_pipe)
    with pytest.raises(ValueError, match="seeds_b"):
        morph_midpoints(tiny_pipe, "a", "b", [0, 1], [5], 0.5, height=height, width=width)
    with pytest.raises(ValueError, match="height= and width="):
        morph_midpoints(tiny_pipe, "a", "b", [0], [5], 0.5)


def test_save_gif_bounces_and_refuses_one_frame(tmp_path):
    frames = [np.full((8, 8, 3), value, np.uint8) for value in (0, 80, 160, 240)]
    path = save_gif(frames, tmp_path / "walk.gif", fps=5, zoom=2)
    gif = PIL.Image.open(path)
    assert gif.n_frames == 6 and gif.size == (16, 16)  # 0 1 2 3 2 1
    assert save_gif(frames, tmp_path / "once.gif", bounce=False).exists()
    assert PIL.Image.open(tmp_path / "once.gif").n_frames == 4
    with pytest.raises(ValueError, match="at least 2"):
        save_gif(frames[:1], tmp_path / "one.gif")


def test_alpha_slider_swaps_the_frame():
    from helpers.serving.ui import AlphaSlider

    frames = [np.full((8, 8, 3), value, np.uint8) for value in (0, 120, 250)]
    slider = AlphaSlider(frames, [0.0, 0.5, 1.0])
    assert slider.image.value == slider.frames[0] and slider.alpha == 0.0
    slider.slider.value = 2  # what dragging does: the observer swaps the picture
    assert slider.image.value == slider.frames[2] and slider.alpha == 1.0
    assert len(set(slider.frames)) == 3
    assert slider.static_strip().size == (24, 8)
    with pytest.raises(ValueError, match="one image per alpha"):
        AlphaSlider(frames, [0.0, 1.0])


def _scene(shape: str, colour: str) -> world.Scene:
    obj = world.SceneObject(shape, colour, "large", "center", 32.0, 32.0, world.COLOURS[colour])
    return world.Scene("heldout", 0, "gray", world.BACKGROUNDS["gray"], (obj,), f"a {colour} {shape}")


def test_colour_purity_tells_a_flat_shape_from_a_cross_fade():
    red_circle = world.render(_scene("circle", "red"))[0]
    blue_square = world.render(_scene("square", "blue"))[0]
    cross_fade = ((red_circle.astype(np.float32) + blue_square) / 2).round().astype(np.uint8)

    def one(colour: str) -> Reading:
        return Reading((("square", colour, "large", "center"),), "gray")

    assert colour_purity(red_circle, one("red")) > 0.9
    assert colour_purity(blue_square, one("blue")) > 0.9
    assert colour_purity(cross_fade, one("blue")) < 0.5, "a double exposure is no flat blue object"
    assert colour_purity(cross_fade, one("red")) < 0.5
    assert colour_purity(red_circle, Reading((), "gray")) == 0.0, "no object read: nothing clean"
    # the tolerance: half the closest two world colours' distance, so no pixel is within it of two colours
    colours = np.array(list(world.COLOURS.values()), np.float32)
    gaps = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    assert colour_tolerance() == pytest.approx(gaps[gaps > 0].min() / 2)
