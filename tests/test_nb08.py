"""Notebook 08 (DreamBooth with LoRA on the toy) in its smoke run: what it recorded, and the figures it saved."""

import numpy as np
import pytest
from PIL import Image

from helpers.series.profiles import parameters_for

pytestmark = pytest.mark.notebook


def test_08_trains_a_lora_on_the_toy_and_lowers_the_loss(r):
    smoke = parameters_for("08", "smoke")
    assert r["identifier"] == "xt"
    training = r["training"]
    assert training["steps"] == smoke["TRAIN_STEPS"]  # the log's seconds: tests/test_lora.py
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


def test_08_badge_users_on_sd15_get_the_gpu_profile_not_the_toys_stars(monkeypatch):
    """The parameters cell as written (PROFILE = "auto", INSTANCE_DIR = "", 64-px toy stars) on a T4 with the hub:
    use_settings gives SD 1.5 the gpu profile (photos in my_subject/, class pictures it generates, fp16-sized
    work), and the notebook calls it after the parameters (and the imports), before any model."""
    import nbformat

    from helpers.core import accelerator, models
    from helpers.series.run import find_notebooks
    from helpers.series.settings import notebook_defaults, use_settings

    monkeypatch.setenv(accelerator.PRETEND_ENV, "t4")
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: True)
    accelerator.accelerator.cache_clear()  # decide as on a T4; cleared again before the environment is restored
    try:
        namespace = notebook_defaults("08")
        assert namespace["PROFILE"] == "auto" and namespace["INSTANCE_DIR"] == ""
        settings = use_settings("08", namespace, show=False)
    finally:
        accelerator.accelerator.cache_clear()
    gpu = parameters_for("08", "gpu")
    assert settings.profile == "gpu" and namespace["MODEL"] == models.SD15_HUB_ID
    for knob in ("INSTANCE_DIR", "CLASS_PROMPTS", "CLASS_PICTURES", "N_CLASS_IMAGES", "TRAIN_STEPS", "LEARNING_RATE",
                 "GRADIENT_CHECKPOINTING", "PROMPT_TEMPLATE", "CONTEXT_PROMPTS"):
        assert namespace[knob] == gpu[knob], knob
    cells = nbformat.read(find_notebooks(["08"])[0], as_version=4).cells
    index = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    code = [c.source for c in cells[index + 1:] if c.cell_type == "code"]
    loads = next(i for i, source in enumerate(code) if "load_pipeline(model)" in source)
    before_the_model = "\n".join(code[:loads]) + code[loads][:code[loads].index("load_pipeline(model)")]
    assert 'settings = use_settings("08", globals())' in before_the_model, "settings in force before the model loads"


# ---------------------------------------------------------------------------------------------------
# The SD 1.5 path as a Colab user on a T4 meets it: decisions taken as on a T4 (fp16), the gpu profile's settings,
# the kernel in a working directory outside the repo (Colab's /content), no photos uploaded, the hub offline with
# a stand-in for diffusers' sample dog in its cache. `tiny-random` stands in for SD 1.5's weights.

SMALL_ON_A_T4 = {"PROFILE": "gpu", "MODEL": "tiny-random", "N_CLASS_IMAGES": 2, "CLASS_BATCH_SIZE": 2,
                 "TRAIN_STEPS": 3, "STEPS": 2, "SEEDS": [100], "N_CONTEXT_SEEDS": 1,
                 "IDENTIFIER": "ft"}  # "sks" is 3 tokens in the tiny model's tokenizer (one in SD 1.5's)


@pytest.fixture(scope="module")
def on_a_t4(tmp_path_factory):
    """(results, printed text) of notebook 08 run as above."""
    import json

    import nbformat
    import papermill as pm

    from helpers.series.run import find_notebooks
    from tests.test_lora import dog_example_cache

    monkeypatch = pytest.MonkeyPatch()
    out_dir, workdir = tmp_path_factory.mktemp("outputs"), tmp_path_factory.mktemp("content")
    hub = tmp_path_factory.mktemp("hub")
    dog_example_cache(hub)
    for key, value in {"SD_PRETEND_ACCELERATOR": "t4", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub),
                       "SD_OUTPUTS": str(out_dir), "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)  # the kernel inherits the environment
    notebook = find_notebooks(["08"])[0]
    executed = out_dir / notebook.name
    try:
        pm.execute_notebook(str(notebook), str(executed), parameters=SMALL_ON_A_T4, cwd=str(workdir),
                            kernel_name="python3", progress_bar=False)
    finally:
        monkeypatch.undo()
    results = json.loads((out_dir / "08_new_subject.json").read_text())
    text = "\n".join(output.get("text", "") for cell in nbformat.read(executed, as_version=4).cells
                     if cell.cell_type == "code" for output in cell.outputs)
    return results, text, workdir, out_dir


def test_08_on_a_t4_gets_the_gpu_profile_and_diffusers_sample_dog(on_a_t4):
    results, text, workdir, out_dir = on_a_t4
    gpu = parameters_for("08", "gpu")
    assert results["model"] == "tiny-random" and results["profile"] == "gpu"
    assert "profile 'gpu'" in text and "Tesla T4" in text, "the settings in force are printed"
    assert (f"INSTANCE_DIR 'my_subject' holds no photos: looked in {workdir}/my_subject (does not exist); "
            f"{out_dir}/my_subject (does not exist)") in text
    assert "using diffusers' sample subject diffusers/dog-example (5 photos of a dog" in text
    assert results["instance_prompts"] == ["a photo of a ft dog"] * 5, "the sample's photos, fitted and captioned"
    assert gpu["PROMPT_TEMPLATE"] == "a photo of {}", "the article comes from fill_prompt"
    assert results["subject_prompt"] == "a photo of a ft dog" and results["class_prompt"] == "a photo of a dog"
    assert results["context_prompts"] == [
        "a ft dog on the beach", "a ft dog in the snow", "a watercolor painting of a ft dog",
        "a ft dog wearing a red hat"], gpu["CONTEXT_PROMPTS"]


def test_08_on_a_t4_trains_fp16_with_a_gradient_scaler(on_a_t4):
    results, text, _, _ = on_a_t4
    training = results["training"]
    assert training["precision"] == "float16" and training["grad_scaler"] is True, training
    assert training["steps"] == SMALL_ON_A_T4["TRAIN_STEPS"]
    assert "fp16 UNet: the loss was scaled (torch.amp.GradScaler)" in text
    assert results["adapter"]["reload_max_abs_diff"] < 0.02, "the reloaded adapter makes the tuned pictures (fp16)"
    assert "should have been refused" not in text, "an adapter of another model is refused here too"
    assert "fidelity_check" not in results and "heldout_adherence_after" not in results, "no oracle off the toy"
