"""Notebook 05 (slerp: the norm curves, the grid, the GIF, the oracle's midpoint shares) in its smoke run: what it
recorded."""

import PIL.Image
import pytest
from reference import lerp_norm_ratio

from helpers.series.profiles import parameters_for
from helpers.studies.interpolate import MIDPOINT_METHODS

pytestmark = pytest.mark.notebook


def test_05_slerp_norm_curves_grid_and_gif(notebook_results, smoke_runs):
    r = notebook_results("05")
    n = parameters_for("05", "smoke")["NUM_DIVISIONS"]
    curves = r["norm_curves"]
    assert curves["slerp"]["norm_ratio"] == pytest.approx([1.0] * (n + 1), abs=0.02), "slerp keeps the norm"
    assert curves["lerp"]["norm_ratio"] == pytest.approx(curves["lerp_expected"], abs=0.03)
    assert curves["lerp_expected"] == pytest.approx([lerp_norm_ratio(k / n) for k in range(n + 1)])
    assert "[0, 1]" in r["bad_t_error"]
    for figure in ("05_norm_curves.png", "05_lerp_vs_slerp.png", "05_midpoints.png"):
        assert (smoke_runs.out_dir / figure).exists(), figure
    gif = PIL.Image.open(smoke_runs.out_dir / r["gif"]["path"])
    assert r["gif"]["frames_interpolated"] == n + 1
    assert gif.n_frames == 2 * (n + 1) - 2, "played forwards then backwards, ends not repeated"
    assert gif.size[0] >= r["width"]


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
