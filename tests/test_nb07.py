"""Notebook 07 (latency: measure, find the bottlenecks, cut, price in quality) in its smoke run: what it recorded."""

import statistics

import pytest

from helpers.series.profiles import parameters_for
from helpers.studies import latency

pytestmark = pytest.mark.notebook

SMOKE = parameters_for("07", "smoke")


@pytest.fixture(scope="module")
def rungs(r):
    return {rung["name"]: rung for rung in r["rungs"]}


def test_07_times_loading_and_every_part_of_a_request(r):
    assert r["environment"]["cpu_threads"] >= 1
    assert r["environment"]["cpu"], "the CPU model is recorded with the timings"
    assert r["load_cold_s"] > 0 and r["load_warm_s"] > 0
    parts = r["baseline_parts_s"]
    assert set(parts) == {*latency.PARTS, "other"}
    assert all(parts[p] > 0 for p in latency.PARTS), f"every part of a ControlNet request takes time: {parts}"
    assert 0.2 < r["unet_share"] < 1, "the UNet is the biggest part of a request"
    assert parts["unet"] == max(parts.values())


def test_07_finds_the_bottlenecks_against_a_measured_roofline(r):
    assert r["roofline_gflops"]["float32"] > 1
    stages = {row["stage"]: row for row in r["stages"]}
    assert set(stages) == {"text_encoder", "controlnet", "unet", "vae_decode"}
    for row in stages.values():
        assert row["GFLOP per call"] > 0 and row["GFLOP/s"] > 0 and 0 < row["roofline share"] < 1.5, row
        assert row["top ops"] and all(0 <= op["share"] <= 1 for op in row["top ops"])
    assert stages["unet"]["calls"] == r["baseline_steps"], "one batched UNet call per step"
    assert stages["unet"]["GFLOP per call"] > stages["text_encoder"]["GFLOP per call"]


def test_07_runs_the_ladder_side_by_side_with_the_baseline(r, rungs):
    expected = ({f"{s} {n}" for s in SMOKE["SCHEDULER_RUNGS"] for n in SMOKE["STEP_RUNGS"]}
                | set(SMOKE["OPTIMISATION_RUNGS"]) | set(SMOKE["COMBINED_RUNGS"]) | {"baseline"})
    assert set(rungs) == expected
    base = rungs["baseline"]
    assert base["quality"]["ssim"] == pytest.approx(1.0) and base["calls"]["unet"] == r["baseline_steps"]
    for name, rung in rungs.items():
        if rung["status"] == "ok":
            assert len(rung["latency_s"]) == SMOKE["REPEATS"]
            assert rung["median_s"] == pytest.approx(statistics.median(rung["latency_s"])), name
            assert {"prompt_adherence", "control_adherence", "psnr_db", "ssim"} <= set(rung["quality"]), name
    fewer = rungs[f"{SMOKE['SCHEDULER_RUNGS'][0]} {SMOKE['STEP_RUNGS'][0]}"]
    assert fewer["calls"]["unet"] == SMOKE["STEP_RUNGS"][0], "fewer steps, fewer UNet calls (times: the bench)"


def test_07_a_rung_the_platform_cannot_run_is_skipped_with_its_reason(rungs):
    fp16 = rungs["fp16"]
    assert fp16["status"] == "skipped" and "fp16 on a CPU" in fp16["reason"]


def test_07_the_cuts_that_work_on_the_toy(rungs):
    cutoff, deepcache = rungs["cfg_cutoff"], rungs["deepcache"]
    assert cutoff["status"] == "ok" and deepcache["status"] == "ok"
    assert cutoff["config"] == {**rungs["baseline"]["config"], "cfg_cutoff": 0.5}, "one change on the baseline"
    tgate = rungs["tgate"]
    assert tgate["status"] == "ok", tgate["reason"]
    assert tgate["config"] == {**rungs["baseline"]["config"], "tgate_gate": 0.4}, "one change on the baseline"
    assert tgate["quality"]["psnr_db"] > 15, "cached cross-attention changes the picture a little, not entirely"
    tiny = rungs["tiny_vae"]
    assert tiny["status"] == "ok", tiny["reason"]
    assert tiny["quality"]["psnr_db"] > 20, "the tiny decoder decodes close to the VAE"


def test_07_the_lcm_rung_runs_one_unet_pass_a_step_at_guidance_one(rungs):
    """The few-step rung on the smoke ladder: the toy's LCM-LoRA at 1 step, priced like every rung."""
    lcm = rungs["lcm 1"]
    assert lcm["status"] == "ok", lcm["reason"]
    assert lcm["changes"] == {**rungs["baseline"]["changes"], "lcm": True, "steps": 1}
    assert lcm["calls"]["unet"] == 1 and lcm["calls"]["controlnet"] == 1
    assert {"prompt_adherence", "control_adherence", "psnr_db", "ssim"} <= set(lcm["quality"])
    assert lcm["median_s"] < rungs["baseline"]["median_s"]


def test_07_recommends_a_configuration_within_the_quality_bars(r, rungs):
    recommended = r["recommended"]
    assert recommended["rung"] in rungs and rungs[recommended["rung"]]["status"] == "ok"
    assert recommended["speedup"] > 1.5, recommended
    assert recommended["prompt_adherence_loss"] <= SMOKE.get("MAX_ADHERENCE_LOSS", 0.02) + 1e-9
    ok = {n: g for n, g in rungs.items() if g["status"] == "ok"}
    fastest = min(ok, key=lambda n: ok[n]["median_s"])
    assert fastest in r["pareto_front"], "nothing beats the fastest rung on latency"
    assert set(r["pareto_front"]) <= set(ok)
    assert r["summary"]["rungs_skipped"] >= 1 and r["summary"]["speedup"] == recommended["speedup"]


def test_07_times_the_finalists_head_to_head_with_the_baseline(r, rungs):
    """The recommendation's speed-up comes from the baseline and the finalists timed in turn, not from the ladder's
    separate runs."""
    final = {row["rung"]: row for row in r["head_to_head"]}
    finalists = r["summary"]["finalists"]
    assert len(finalists) == SMOKE["FINALISTS"] and set(final) == {"baseline", *finalists}
    assert all(row["rounds"] == SMOKE["HEAD_TO_HEAD_ROUNDS"] for row in final.values())
    assert all(row["ladder latency s"] == rungs[name]["median_s"] for name, row in final.items())
    recommended = r["recommended"]
    assert recommended["rung"] == min(finalists, key=lambda name: final[name]["latency s"])
    assert recommended["latency_s"] == final[recommended["rung"]]["latency s"]
    assert recommended["baseline_latency_s"] == final["baseline"]["latency s"] == r["summary"]["baseline_latency_s"]
