"""Notebook 02 (the three stages, by hand and through `generate`, against the pipeline) in its smoke run: what it
recorded."""

import pytest

from helpers.series.profiles import parameters_for

pytestmark = pytest.mark.notebook


def test_02_three_stages(notebook_results):
    r = notebook_results("02")
    assert r["max_abs_diff_helpers_vs_pipeline"] <= 1e-4
    assert r["max_abs_diff_loop_vs_pipeline"] <= 1e-4
    assert r["prompt_embeds_shape"] == [1, 77, r["prompt_embeds_shape"][2]]
    factor = r["height"] // r["latents_shape"][2]
    assert r["latents_shape"] == [1, 4, r["height"] // factor, r["width"] // factor] and factor in (4, 8)
    assert r["callback_steps_seen"][0] == 0
    first, last = r["signal_first_last"]
    assert first == 0.0 and last > 0.9, "the toy schedule runs from pure noise (zero terminal SNR) to nearly clean"
    assert r["negative_prompt_mean_abs_change"] > 0.005, "the negative prompt must change the picture"
    smoke = parameters_for("02", "smoke")
    assert len(r["grid_seconds"]) == len(smoke["GRID_STEPS"]) * len(smoke["GRID_GUIDANCE"])
    assert set(r["stage_seconds"]) == {"encode_text", "denoise", "decode"}
    assert r["stage_seconds"]["denoise"] > r["stage_seconds"]["encode_text"]
    accuracy = r["oracle_attribute_accuracy"]  # share of 8 images with each of the prompt's attributes right
    assert accuracy["colour"] >= 0.5, f"the toy model must at least get the colour right (chance 1/6): {accuracy}"
    assert accuracy["object count"] >= 0.5, accuracy
