"""Every notebook, executed headless by papermill in the `smoke` profile, and what it recorded.

The notebooks run once per session (the `smoke_runs` fixture in conftest.py); each test then checks one notebook's
numbers in outputs/NN_*.json, so a notebook that "runs" but measures nonsense still fails.
"""

import pytest

from helpers.series.profiles import notebook_number, parameters_for
from helpers.series.run import find_notebooks

pytestmark = pytest.mark.notebook


@pytest.mark.parametrize("notebook", [nb.stem for nb in find_notebooks()])
def test_notebook_runs_and_records_results(smoke_runs, notebook):
    run = smoke_runs(notebook_number(notebook))
    assert run.status == "ok", run.error
    assert run.results, f"{notebook} wrote no outputs/{notebook_number(notebook)}_*.json"
    assert (smoke_runs.out_dir / f"{notebook}.ipynb").exists(), "the executed copy goes to outputs/"


def test_01_download_and_loading(notebook_results):
    r = notebook_results("01")
    assert r["source"] == "loopback", "offline, the download runs on a local swarm"
    first, again = r["downloads"][0], r["downloads"][1]
    assert first["interrupted_at_bytes"] > 0 and first["resumed_bytes"] == first["interrupted_at_bytes"]
    assert first["downloaded_bytes"] + first["resumed_bytes"] == first["size_bytes"], "resume fetched only the rest"
    assert first["verified"]["pieces"].startswith("ok") and first["verified"]["safetensors"].startswith("ok")
    assert first["average_speed_Bps"] > 0 and first["elapsed_s"] > 0
    assert again["cached"] and again["downloaded_bytes"] == 0
    assert len(r["bad_cases"]) >= 5 and all("Error" in v.split(":")[0] for v in r["bad_cases"].values())
    assert all(diff <= 1e-5 for diff in r["single_file_max_abs_diff"].values())
    assert set(r["single_file_max_abs_diff"]) == {"unet", "vae", "text_encoder"}
    assert "partial_loading" not in r, "partial loading moved to notebook 03 (tests/test_nb03.py)"


def test_02_three_stages(notebook_results):
    r = notebook_results("02")
    assert r["model"] == "toy" and r["profile"] == "smoke"
    assert r["max_abs_diff_helpers_vs_pipeline"] <= 1e-4
    assert r["max_abs_diff_loop_vs_pipeline"] <= 1e-4
    assert r["prompt_embeds_shape"] == [1, 77, r["prompt_embeds_shape"][2]]
    factor = r["height"] // r["latents_shape"][2]
    assert r["latents_shape"] == [1, 4, r["height"] // factor, r["width"] // factor] and factor in (4, 8)
    assert r["callback_steps_seen"][0] == 0 and r["callback_matches_final"]
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
