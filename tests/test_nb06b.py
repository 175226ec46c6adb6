"""Notebook 06b (the depth ControlNet at other aspect ratios; control images of the wrong size) in its smoke run: what
it recorded."""

import pytest

pytestmark = pytest.mark.notebook


def test_06b_every_aspect_has_its_size(r):
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


def test_06b_bad_control_images_get_clear_errors(r):
    errors = r["size_errors"]
    assert "must match" in errors["diffusers"], "diffusers' own failure, shown for contrast"
    assert "is 128×64 (W×H) but the target is 64×64" in errors["mismatched sizes"]
    assert "mode 'RGBA'" in errors["wrong mode"]
    assert "not a positive multiple of the VAE factor" in errors["not a multiple of the factor"]
    assert "stretched to" in errors["resize=True"]
