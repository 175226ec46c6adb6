"""Notebook 06 (ControlNet depth, combined conditioning, aspect ratios) in its smoke run: what it recorded."""

import pytest

from helpers.series.profiles import parameters_for

pytestmark = pytest.mark.notebook


@pytest.fixture(scope="module")
def r(notebook_results):
    return notebook_results("06")


def test_06_runs_on_the_toy_with_every_entry(r):
    smoke = parameters_for("06", "smoke")
    assert r["model"] == "toy" and r["profile"] == "smoke"
    assert len(r["entries"]) == smoke["N_ENTRIES"]
    for entry in r["entries"]:
        assert entry["output_size"] == entry["size"], "each picture has its entry's size"
        assert "scaled" in entry["load_report"], "loading says what it did"
    assert any("16-bit" in entry["load_report"] for entry in r["entries"])


def test_06_depth_controlnet_follows_the_maps(r):
    summary = r["summary"]
    assert summary["pipeline_max_abs_diff"] <= 1, "our denoise equals the ControlNet pipeline"
    assert set(r["pipeline_max_abs_diff"]) == {"depth", "depth+normal"}
    assert summary["depth_control_iou"] >= 0.5, summary
    assert summary["depth_control_iou"] > summary["text_only_iou"] + 0.2, "the map sets the masks"
    scale = {row["scales"]: row["control_iou"] for row in r["scale_sweep"]}
    assert scale[1.0] > scale[0.0] + 0.2, f"conditioning scale 0 is text only, 1 follows the map: {scale}"
    assert len(r["window_sweep"]) == len(parameters_for("06", "smoke")["GUIDANCE_WINDOWS"])


def test_06_combined_conditionings(r):
    rows = {row["conditioning"]: row for row in r["combined"]}
    assert {"text only", "depth", "normal", "canny", "depth + normal", "depth + canny"} <= set(rows)
    assert len(rows["depth + normal"]["scales"]) == 2, "one controlnet_conditioning_scale per net"
    for label in ("depth", "normal", "canny", "depth + normal", "depth + canny"):
        assert rows[label]["control_iou"] > rows["text only"]["control_iou"], f"{label} must follow its map"


def test_06_every_aspect_has_its_size(r):
    aspects = {row["aspect"] for row in r["aspects"]}
    assert {"1:1", "3:2", "2:3", "16:9", "9:16"} <= aspects and any(a.startswith("native") for a in aspects)
    for row in r["aspects"]:
        assert row["output_size"] == [row["height"], row["width"]], row
        assert row["height"] % 4 == 0 and row["width"] % 4 == 0
    strategies = {row["strategy"] for row in r["aspects"]}
    assert strategies == {"text only", "resize", "crop", "pad", "native"}
    native = next(row for row in r["aspects"] if row["strategy"] == "native")
    assert native["width"] == 2 * native["height"], "the no-crop map's own 2:1 aspect"
    assert r["summary"]["best_aspect_strategy"] in strategies


def test_06_bad_control_images_get_clear_errors(r):
    errors = r["size_errors"]
    assert "must match" in errors["diffusers"], "diffusers' own failure, shown for contrast"
    assert "is 128×64 (W×H) but the target is 64×64" in errors["mismatched sizes"]
    assert "mode 'RGBA'" in errors["wrong mode"]
    assert "not a positive multiple of the VAE factor" in errors["not a multiple of the factor"]
    assert "stretched to" in errors["resize=True"]


def test_06_the_control_scale_panel_draws_a_result_under_papermill(r):
    assert r["panel"] == {"error": None, "control_scale": 1.0, "images": 1}
