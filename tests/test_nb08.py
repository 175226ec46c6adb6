"""Notebook 08 (DreamBooth with LoRA on the toy) in its smoke run: what it recorded, and the figures it saved."""

import numpy as np
import pytest
from PIL import Image

from helpers.profiles import parameters_for

pytestmark = pytest.mark.notebook


@pytest.fixture(scope="module")
def r(notebook_results):
    return notebook_results("08")


def test_08_trains_a_lora_on_the_toy_and_lowers_the_loss(r):
    smoke = parameters_for("08", "smoke")
    assert r["model"] == "toy" and r["profile"] == "smoke" and r["identifier"] == "xt"
    training = r["training"]
    assert training["steps"] == smoke["TRAIN_STEPS"] and training["seconds"] > 0
    assert training["eval_loss_after"] < training["eval_loss_before"], training
    # rank 8 on the attention projections and the resnets' convolutions: 11% of the toy's 1.9 M-parameter UNet
    assert 0 < training["trainable_parameters"] < 0.15 * training["unet_parameters"], "only the adapter trains"
    assert len(r["instance_prompts"]) == smoke["N_INSTANCE"]


def test_08_adapter_is_small_and_reloads_to_the_tuned_pictures(r):
    adapter = r["adapter"]
    assert adapter["file"] == "pytorch_lora_weights.safetensors"
    assert 0 < adapter["bytes"] < 1_000_000
    assert adapter["reload_max_abs_diff"] < 1e-4, "a fresh pipeline with the saved adapter makes the same pictures"


def test_08_subject_prompt_changes_more_than_the_unrelated_one(r):
    assert r["subject_change"] > 0.01, r["subject_change"]
    assert r["unrelated_change"] < r["subject_change"], (r["subject_change"], r["unrelated_change"])


def test_08_measures_fidelity_contexts_and_forgetting(r):
    smoke = parameters_for("08", "smoke")
    check = r["fidelity_check"]
    assert check["n_per_class"] == smoke["N_VALIDATION"]
    assert check["vae"]["accuracy"] >= 0.9 and check["raw"]["accuracy"] >= 0.9, check
    assert check["generated"]["false_positive_rate"] <= 0.1, "the base model's own pictures are no stars"
    rows = r["contexts"]
    assert [row["prompt"] for row in rows] == [t.format("xt shape") for t in smoke["CONTEXT_PROMPTS"]] + [
        "all prompts"]
    assert rows[-1]["n"] == len(smoke["CONTEXT_PROMPTS"]) * smoke["N_CONTEXT_SEEDS"]
    for key in ("fidelity", "position", "background", "colour", "all"):
        assert 0.0 <= rows[-1][key] <= 1.0
    assert r["subject_fidelity"] == rows[-1]["fidelity"]
    before, after = r["heldout_adherence_before"], r["heldout_adherence_after"]
    assert 0.0 <= after <= 1.0 and 0.0 < before <= 1.0, "the base model gets some held-out prompts right"
    assert r["forgetting_points"] == pytest.approx(100 * (before - after))
    summary = r["summary"]
    assert summary["train_steps"] == smoke["TRAIN_STEPS"] and summary["fidelity_check_accuracy"] >= 0.9


def test_08_bad_input_gets_clear_errors(r):
    bad = r["bad_cases"]
    assert "2 instance images are too few" in bad["2 pictures"]
    assert "are 32×32 but the model trains at 64×64" in bad["pictures of the wrong size"]
    assert "'circle' is already in the model's vocabulary" in bad["identifier 'circle'"]
    assert "splits into" in bad["identifier of several tokens"]
    assert "was made for another model" in bad["LoRA of another model"]


def test_08_figures_show_the_subject(smoke_runs, r):
    out = smoke_runs.out_dir
    for name in ("08_instance_images.png", "08_before_after.png", "08_contexts.png", "08_loss.png"):
        assert (out / name).stat().st_size > 1000, name
    # the subject pictures are stars in orange: the figure holds that colour (not noise, not blank)
    pixels = np.asarray(Image.open(out / "08_instance_images.png").convert("RGB")).reshape(-1, 3).astype(int)
    orange = (np.abs(pixels - (250, 140, 30)) < 20).all(axis=1).mean()
    assert orange > 0.005, orange
