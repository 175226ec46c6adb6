"""Notebook 04 (lerp: the grid, the norm curve, the midpoints) in its smoke run: what it recorded."""

import pytest
from reference import lerp_norm_ratio

from helpers.series.profiles import parameters_for

pytestmark = pytest.mark.notebook


def test_04_lerp_grid_norm_curve_and_endpoints(notebook_results, smoke_runs):
    r = notebook_results("04")
    smoke = parameters_for("04", "smoke")
    n = smoke["NUM_DIVISIONS"]
    assert r["alphas"] == [k / n for k in range(n + 1)], "alpha = n / NUM_DIVISIONS for n = 0 .. NUM_DIVISIONS"
    curve = r["norm_curve"]
    assert curve["pairs"] == smoke["NORM_PAIRS"] and len(curve["norm_ratio"]) == n + 1
    assert curve["expected"] == pytest.approx([lerp_norm_ratio(a) for a in r["alphas"]])
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
