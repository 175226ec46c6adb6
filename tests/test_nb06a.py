"""Notebook 06a (ControlNet: depth, our loop equal to the pipeline, combined conditioning, sweeps) in its smoke run:
what it recorded."""

import pytest

from helpers.series.profiles import parameters_for

pytestmark = pytest.mark.notebook


def test_06a_runs_on_the_toy_with_every_entry(r):
    smoke = parameters_for("06a", "smoke")
    assert len(r["entries"]) == smoke["N_ENTRIES"]
    for entry in r["entries"]:
        assert entry["output_size"] == entry["size"], "each picture has its entry's size"
        assert "scaled" in entry["load_report"], "loading says what it did"
    assert any("16-bit" in entry["load_report"] for entry in r["entries"])


def test_06a_depth_controlnet_follows_the_maps(r):
    summary = r["summary"]
    assert summary["pipeline_max_abs_diff"] <= 1, "our denoise equals the ControlNet pipeline"
    assert set(r["pipeline_max_abs_diff"]) == {"depth", "depth+normal"}
    assert summary["depth_control_iou"] >= 0.5, summary
    assert summary["depth_control_iou"] > summary["text_only_iou"] + 0.2, "the map sets the masks"
    scale = {row["scales"]: row["control_iou"] for row in r["scale_sweep"]}
    assert scale[1.0] > scale[0.0] + 0.2, f"conditioning scale 0 is text only, 1 follows the map: {scale}"
    assert len(r["window_sweep"]) == len(parameters_for("06a", "smoke")["GUIDANCE_WINDOWS"])


def test_06a_combined_conditionings(r):
    rows = {row["conditioning"]: row for row in r["combined"]}
    assert {"text only", "depth", "normal", "canny", "depth + normal", "depth + canny"} <= set(rows)
    assert len(rows["depth + normal"]["scales"]) == 2, "one controlnet_conditioning_scale per net"
    for label in ("depth", "normal", "canny", "depth + normal", "depth + canny"):
        assert rows[label]["control_iou"] > rows["text only"]["control_iou"], f"{label} must follow its map"


def test_06a_the_control_scale_panel_draws_a_result_under_papermill(r):
    assert r["panel"] == {"error": None, "control_scale": 1.0, "images": 1}
