"""Notebook 01 (download, verify, resume; the single file taken apart) in its smoke run (a loopback swarm), and as a
badge user on a T4 meets it: parameters cell as written, `SD_PRETEND_ACCELERATOR=t4`, and a local
hub cache (offline) holding "SD 1.5": its repo id with configs, a `model_index.json`, fp16 folder weights (as notebook
02 leaves them) and its single file `v1-5-pruned-emaonly.safetensors` (the toy's LDM file stands in for the 4.27 GB).

The user must get the hub download (not a torrent that hosted notebooks block), a comparison with the hub that
downloads nothing, and the loading part taking apart the file downloaded, with SD 1.5's configs from the hub repo.
"""

import json
import shutil
from pathlib import Path

import pytest
from hub_cache import put_in_hub_cache, use_hub_cache

from helpers.checkpoints import download as dl
from helpers.series.run import find_notebooks
from helpers.toy import TOY_LDM_FILE, TOY_SD_DIR

pytestmark = pytest.mark.notebook


@pytest.fixture(scope="module")
def badge_run(tmp_path_factory):
    import papermill as pm

    tmp = tmp_path_factory.mktemp("nb01-t4")
    with pytest.MonkeyPatch.context() as monkeypatch:
        cache = tmp / "hub-cache"
        files = {name: TOY_SD_DIR / name for name in
                 ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json")}
        files["unet/diffusion_pytorch_model.fp16.safetensors"] = TOY_SD_DIR / "unet/diffusion_pytorch_model.safetensors"
        files[dl.SD15_FILENAME] = Path(TOY_LDM_FILE)
        snapshot = put_in_hub_cache(cache, dl.SD15_REPO, files)
        use_hub_cache(cache, monkeypatch)
        monkeypatch.setenv("SD_PRETEND_ACCELERATOR", "t4")
        monkeypatch.setenv("SD_OUTPUTS", str(tmp / "outputs"))
        workdir = tmp / "content"  # as on Colab: not the clone's notebooks/ folder
        workdir.mkdir()
        notebook = find_notebooks(["01"])[0]
        pm.execute_notebook(str(notebook), str(tmp / notebook.name), parameters={}, cwd=str(workdir),
                            kernel_name="python3", progress_bar=False)
        results = json.loads((tmp / "outputs" / "01_download.json").read_text())
        shutil.rmtree(workdir)
    return results, snapshot


def test_t4_user_gets_the_hub_not_the_torrent(badge_run):
    r, snapshot = badge_run
    assert r["profile"] == "gpu" and r["source"] == "hub", (r["profile"], r["source"], r.get("source_why"))
    assert [d["label"] for d in r["downloads"]] == ["hub"], "one download, from the hub: no torrent, no second copy"
    assert Path(r["downloads"][0]["path"]).resolve() == (snapshot / dl.SD15_FILENAME).resolve()


def test_t4_user_compares_with_the_hub_without_downloading_again(badge_run):
    r, snapshot = badge_run
    comparison = r["hub_comparison"]
    assert comparison["same"] is True and comparison["where"] == "local hub cache"
    assert comparison["hub_sha256"] == dl.sha256_file(TOY_LDM_FILE)


def test_t4_user_takes_apart_the_file_downloaded(badge_run):
    r, snapshot = badge_run
    assert Path(r["load_file"]).resolve() == (snapshot / dl.SD15_FILENAME).resolve(), "not the toy's own file"
    assert Path(r["load_config_dir"]).resolve() == snapshot.resolve(), "SD 1.5's configs from its hub repo"
    assert set(r["single_file_outputs"]) == {"unet", "vae", "text_encoder"}, "each network loaded and ran"


def test_01_smoke_downloads_resumes_verifies_and_loads(notebook_results):
    r = notebook_results("01")
    assert r["source"] == "loopback", "offline, the download runs on a local swarm"
    first, again = r["downloads"][0], r["downloads"][1]
    assert first["interrupted_at_bytes"] > 0 and first["resumed_bytes"] == first["interrupted_at_bytes"]
    assert first["downloaded_bytes"] + first["resumed_bytes"] == first["size_bytes"], "resume fetched only the rest"
    assert first["verified"]["pieces"].startswith("ok") and first["verified"]["safetensors"].startswith("ok")
    assert first["average_speed_Bps"] == pytest.approx(first["downloaded_bytes"] / first["elapsed_s"]), "this call's"
    assert again["cached"] and again["downloaded_bytes"] == 0
    assert len(r["bad_cases"]) >= 5 and all("Error" in v.split(":")[0] for v in r["bad_cases"].values())
    assert all(diff <= 1e-5 for diff in r["single_file_max_abs_diff"].values())
    assert set(r["single_file_max_abs_diff"]) == {"unet", "vae", "text_encoder"}
    assert "partial_loading" not in r, "partial loading moved to notebook 03 (tests/test_nb03.py)"
