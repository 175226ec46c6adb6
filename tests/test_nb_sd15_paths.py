"""Notebooks 02, 04, 05 and 06 on SD 1.5's code path, as a Colab user on a T4 meets it: decisions taken as on a T4
(`SD_PRETEND_ACCELERATOR=t4`: fp16 pipelines, the `gpu` profile's settings and prompts), the kernel in a working
directory outside the repo (Colab's /content), and a model other than the toy, so nothing the toy's oracle computes
is there. `tiny-random` stands in for SD 1.5's weights (and tiny random ControlNets for lllyasviel's), so every cell
runs in seconds; what the notebooks print and record must be true of such a model."""

import json
from pathlib import Path

import nbformat
import pytest

from helpers.series.run import find_notebooks
from helpers.series.settings import notebook_defaults

pytestmark = pytest.mark.notebook

# Small work on the tiny model; the gpu profile gives everything not named here (its prompts above all).
SMALL = {
    "02": {"STEPS": 2, "GRID_STEPS": [2], "GRID_GUIDANCE": [1.0, 7.5], "CALLBACK_EVERY": 1},
    "04": {"STEPS": 2, "NUM_DIVISIONS": 2, "MIDPOINT_SEEDS": 2, "NORM_PAIRS": 4},
    "05": {"STEPS": 2, "NUM_DIVISIONS": 2, "ORACLE_SEEDS": 1, "NORM_PAIRS": 4, "GIF_FPS": 4},
    "06a": {"STEPS": 2, "N_ENTRIES": 2, "CONDITIONING_SCALES": [0.0, 1.0], "GUIDANCE_WINDOWS": [[0.0, 0.5]]},
    "06b": {"STEPS": 2, "ASPECT_SEEDS": 1},
}


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory) -> dict:
    """Three tiny random ControlNets (from the tiny UNet) in folders, standing in for lllyasviel's nets."""
    from diffusers import ControlNetModel

    from helpers.core.random_models import tiny_random_pipeline

    unet = tiny_random_pipeline(seed=0).unet
    folders = {}
    for kind in ("depth", "normal", "canny"):
        folder = tmp_path_factory.mktemp(f"controlnet-{kind}")
        ControlNetModel.from_unet(unet).save_pretrained(folder)
        folders[f"{kind.upper()}_CONTROLNET"] = str(folder)
    return folders


@pytest.fixture(scope="module")
def as_on_a_t4(tmp_path_factory, controlnets):
    """`run("04")`: (results, printed text) of notebook 04 run as above; each notebook runs once."""
    import papermill as pm

    monkeypatch = pytest.MonkeyPatch()
    out_dir, workdir = tmp_path_factory.mktemp("outputs"), tmp_path_factory.mktemp("content")
    monkeypatch.setenv("SD_PRETEND_ACCELERATOR", "t4")  # the kernel inherits the environment
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SD_OUTPUTS", str(out_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runs = {}

    def run(number: str) -> tuple[dict, str]:
        if number not in runs:
            notebook = find_notebooks([number])[0]
            parameters = {"PROFILE": "gpu", "MODEL": "tiny-random", **SMALL[number]}
            if number.startswith("06"):  # 06b loads only the depth net
                parameters.update({k: v for k, v in controlnets.items() if k in notebook_defaults(number)})
            executed = out_dir / notebook.name
            pm.execute_notebook(str(notebook), str(executed), parameters=parameters, cwd=str(workdir),
                                kernel_name="python3", progress_bar=False)
            results = {}
            for path in sorted(out_dir.glob(f"{number}_*.json")):
                results.update(json.loads(path.read_text()))
            text = "\n".join(output.get("text", "") for cell in nbformat.read(executed, as_version=4).cells
                             if cell.cell_type == "code" for output in cell.outputs)
            runs[number] = results, text
        return runs[number]

    yield run
    monkeypatch.undo()


def test_02_runs_on_the_gpu_path_with_real_prompts(as_on_a_t4):
    from helpers.series.profiles import parameters_for

    results, text = as_on_a_t4("02")
    assert results["model"] == "tiny-random" and results["profile"] == "gpu" and results["dtype"] == "torch.float16"
    assert "astronaut" in parameters_for("02", "gpu")["PROMPT"]
    assert "profile 'gpu'" in text and "Tesla T4" in text, "the settings in force are printed"
    assert results["safety_checker_flagged"] is False
    assert "oracle_attribute_accuracy" not in results, "the toy's oracle reads no other model's pictures"


def test_04_refuses_every_bad_input_in_the_pipelines_own_dtype(as_on_a_t4):
    results, text = as_on_a_t4("04")
    bad = results["bad_cases"]
    assert all(v.startswith("ValueError") for v in bad.values()), bad  # fp16 noise: .half() was no mismatch
    assert "float16" in bad["endpoints of different dtypes"] and "float32" in bad["endpoints of different dtypes"]
    assert "should have been refused" not in text
    assert "On tiny-random, the noise-lerp midpoint has" in text


def test_05_measures_the_contrast_it_reports_without_the_oracle(as_on_a_t4):
    results, text = as_on_a_t4("05")
    assert "midpoint_quality" not in results, "no oracle off the toy"
    contrast = results["midpoint_contrast"]["contrast_ratio"]
    assert set(contrast) == {"noise slerp", "noise lerp", "final-latent lerp"}
    assert all(ratio > 0 for ratio in contrast.values())
    assert results["summary"]["contrast_noise_slerp"] == contrast["noise slerp"]
    assert "only the contrast ratio is measured" in text


def test_06_finds_its_metadata_from_colabs_working_directory_and_scores_nothing_it_cannot(as_on_a_t4):
    from helpers.series.profiles import parameters_for

    results, text = as_on_a_t4("06a")
    shipped = Path(__file__).resolve().parents[1] / "notebooks" / "metadata" / "metadata.jsonl"
    assert f"metadata: {shipped}" in text, "says which folder it used"
    prompts = parameters_for("06a", "gpu")["ENTRY_PROMPTS"]
    assert [e["prompt"] for e in results["entries"]] == [prompts[e["name"]] for e in results["entries"]]
    assert results["summary"]["pipeline_max_abs_diff"] <= 2, "our generate equals the ControlNet pipeline in fp16 too"
    results, text = as_on_a_t4("06b")
    assert "by prompt adherence: None" not in text
    assert "No strategy can be scored on tiny-random" in text
    summary = results["summary"]
    assert summary["best_aspect_strategy"] is None and summary["text_only_objects_max"] is None, summary
