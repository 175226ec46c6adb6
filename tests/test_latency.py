"""helpers.latency: rung names, what a platform can run, part timers, quality scores, the Pareto front and the
recommendation, FLOPs and the roofline; the rungs themselves on the toy (small: 4-8 steps, one prompt)."""

import numpy as np
import pytest
import torch

from helpers import latency
from helpers.models import load_pipeline
from helpers.toy import sample_scenes


@pytest.fixture(scope="module")
def toy_control_pipe():
    return load_pipeline("toy", controlnet="depth", dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def inputs():
    scenes = sample_scenes(2, seed=0)
    return latency.Inputs(scenes.prompts, [0, 1], scenes.control_images(), list(scenes.depth_maps))


# ---------------------------------------------------------------------------------------------------------------
# Names and configs


def test_parse_rung_reads_schedulers_steps_and_optimisations():
    knobs = latency.Knobs(cfg_cutoff=0.4, deepcache_interval=2)
    config = latency.parse_rung("dpm++ 10 + cfg_cutoff + deepcache + fused_qkv", knobs)
    assert (config.scheduler, config.steps, config.cfg_cutoff, config.deepcache_interval, config.fuse_qkv) == (
        "dpm++", 10, 0.4, 2, True)
    assert latency.parse_rung("baseline") == latency.Config()
    assert latency.parse_rung("bf16 + channels_last").changes() == {"half": "bf16", "channels_last": True}
    base = latency.Config(steps=8)
    assert latency.parse_rung("euler 4", baseline=base).steps == 4
    assert latency.parse_rung("fused_qkv", baseline=base).steps == 8, "a rung starts from the given baseline"


@pytest.mark.parametrize("name", ["dpm++ ten", "warp_speed", "bf16+channels_last", "nosuch 10"])
def test_parse_rung_refuses_unknown_names(name):
    with pytest.raises(ValueError, match="neither 'baseline'"):
        latency.parse_rung(name)


def test_config_passes_steps_cutoff_and_control_window_to_generate():
    config = latency.parse_rung("unipc 6 + cfg_cutoff + control_end", latency.Knobs(cfg_cutoff=0.3,
                                                                                    control_guidance_end=0.6))
    assert config.generate_kwargs() == {"num_inference_steps": 6, "control_guidance_end": 0.6, "cfg_cutoff": 0.3}


# ---------------------------------------------------------------------------------------------------------------
# What this platform can run: reasons, never crashes


def test_why_not_names_what_a_cpu_cannot_run():
    cpu = torch.device("cpu")
    assert "fp16 on a CPU" in latency.why_not(latency.parse_rung("fp16"), cpu)
    assert "OpenVINO runs its own graph" in latency.why_not(latency.parse_rung("openvino + deepcache"), cpu)
    assert "not combined" in latency.why_not(latency.parse_rung("compile + deepcache"), cpu)
    assert "replace classic attention" in latency.why_not(latency.parse_rung("fused_qkv + classic_attention"), cpu)
    assert "replace slicing attention" in latency.why_not(latency.parse_rung("attention_slicing + fused_qkv"), cpu)
    assert latency.why_not(latency.parse_rung("dpm++ 10 + cfg_cutoff + fused_qkv + channels_last"), cpu) is None
    assert "engine" in latency.why_not(latency.Config(engine="tensorrt"), cpu)


def test_a_rung_the_platform_cannot_run_is_recorded_as_skipped(toy_control_pipe, inputs):
    result = latency.run_rung(toy_control_pipe, "fp16", latency.parse_rung("fp16 + euler 2"), inputs, repeats=1)
    assert result.status == "skipped" and "fp16 on a CPU" in result.reason
    assert result.median_s is None and result.images == []
    assert result.row()["reason"] == result.reason


def test_configure_works_on_a_copy(toy_control_pipe):
    before = {k: v.clone() for k, v in toy_control_pipe.unet.state_dict().items()}
    configured = latency.configure(toy_control_pipe, latency.parse_rung("fused_qkv + channels_last + ddim 4"))
    assert configured.unet is not toy_control_pipe.unet
    assert any("to_qkv" in name for name, _ in configured.unet.named_modules()), "QKV fused in the copy"
    assert not any("to_qkv" in name for name, _ in toy_control_pipe.unet.named_modules()), "the base is untouched"
    assert type(configured.scheduler).__name__ == "DDIMScheduler"
    after = toy_control_pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_compile_on_a_cpu_freezes_and_prepacks_the_weights_at_every_batch():
    """torch.compile(options={"freezing": True}) alone leaves the weights unfrozen (dynamo reads the global flag):
    the compile rung must reach oneDNN's prepacked convolution, also after a recompile for a new batch size."""
    from diffusers import DDIMScheduler
    from torch.profiler import profile

    class Net(torch.nn.Sequential):
        device = torch.device("cpu")

    net = Net(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    holder = latency.configure(latency.UNetOnly(net, DDIMScheduler()), latency.Config(compile=True))
    for batch in (2, 1):  # a guidance cut-off halves the UNet batch: a recompile
        sample = torch.randn(batch, 4, 8, 8)
        with torch.no_grad():
            holder.unet(sample)
            with profile() as prof:
                out = holder.unet(sample)
        ops = {event.key for event in prof.key_averages()}
        assert "mkldnn::_convolution_pointwise" in ops and "aten::mkldnn_convolution" not in ops, sorted(ops)
        torch.testing.assert_close(out, net(sample), atol=1e-4, rtol=1e-4)
    assert not torch._inductor.config.freezing, "the global flag is set only during the calls"


# ---------------------------------------------------------------------------------------------------------------
# Timing every part


def test_part_timers_count_each_part_and_leave_nothing_behind(toy_control_pipe, inputs):
    pipe = latency.configure(toy_control_pipe, latency.parse_rung("ddim 3"))
    scheduler_step = type(pipe.scheduler).step
    decode = pipe.vae.decode
    request = inputs.subset(1)
    with latency.part_timers(pipe) as calls:
        latency.generate_config(pipe, latency.parse_rung("ddim 3"), request)
    counts = {part: len(seconds) for part, seconds in calls.items()}
    # guidance runs the prompt and the empty prompt as one batch: one UNet and one ControlNet call per step
    assert counts == {"preprocess": 1, "text_encoder": counts["text_encoder"], "controlnet": 3, "unet": 3,
                      "scheduler": 3, "vae_decode": 1, "postprocess": 1}
    assert counts["text_encoder"] in (1, 2)
    assert all(s > 0 for seconds in calls.values() for s in seconds)
    assert type(pipe.scheduler).step is scheduler_step, "the scheduler class gets its own step back"
    assert "step" not in vars(type(pipe.scheduler)) or vars(type(pipe.scheduler))["step"] is scheduler_step
    assert pipe.vae.decode == decode and "decode" not in vars(pipe.vae)
    assert not pipe.unet._forward_hooks and not pipe.unet._forward_pre_hooks


def test_time_request_splits_the_request_into_its_parts(toy_control_pipe, inputs):
    config = latency.parse_rung("ddim 2")
    pipe = latency.configure(toy_control_pipe, config)
    total, parts, stages, calls = latency.time_request(pipe, config, inputs.subset(1))
    assert set(parts) == {*latency.PARTS, "other"}
    assert sum(parts.values()) == pytest.approx(total, rel=1e-6, abs=1e-6), "other is what the parts leave"
    assert calls["unet"] == 2 and set(stages) >= {"encode_text", "denoise", "decode"}


# ---------------------------------------------------------------------------------------------------------------
# Rungs on the toy: fewer steps, guidance cut-off, DeepCache, the tiny decoder


def test_a_ladder_scores_rungs_against_the_baseline(toy_control_pipe, inputs):
    ladder = latency.Ladder(toy_control_pipe, inputs, latency.Config(scheduler="ddim", steps=8), latency.Knobs(),
                            on_toy=True, repeats=1, quality_batch=2)
    fast = ladder.run("ddim 2 + cfg_cutoff")
    base = ladder.results["baseline"]
    assert base.quality["ssim"] == pytest.approx(1.0) and base.quality["psnr_db"] == float("inf")
    assert fast.status == "ok" and fast.calls["unet"] == 2 and len(fast.images) == len(inputs.prompts)
    assert 0 <= fast.quality["prompt_adherence"] <= 1 and 0 <= fast.quality["control_adherence"] <= 1
    assert fast.quality["ssim"] < 1.0, "two steps are not eight"
    rows = {row["rung"]: row for row in ladder.rows()}
    assert rows["baseline"]["speed-up"] == pytest.approx(1.0)
    assert rows["ddim 2 + cfg_cutoff"]["speed-up"] == pytest.approx(base.median_s / fast.median_s)

    final = {row["rung"]: row for row in ladder.head_to_head(["ddim 2 + cfg_cutoff"], rounds=2)}
    assert list(final) == ["baseline", "ddim 2 + cfg_cutoff"] and final["baseline"]["speed-up"] == 1.0
    again = final["ddim 2 + cfg_cutoff"]
    assert again["rounds"] == 2 and again["ladder latency s"] == fast.median_s and again["latency s"] > 0
    assert again["speed-up"] == final["baseline"]["latency s"] / again["latency s"]
    assert again["prompt_adherence"] == fast.quality["prompt_adherence"], "the ladder's quality rides along"


def test_head_to_head_times_the_rungs_in_turn(toy_control_pipe, inputs, monkeypatch):
    """Round after round, each config once: not all of A's runs, then all of B's (a busy machine drifts)."""
    configs = {"a": latency.parse_rung("ddim 2"), "b": latency.parse_rung("ddim 3")}
    called = []
    real = latency.generate_config
    monkeypatch.setattr(latency, "generate_config",
                        lambda pipe, config, request: called.append(config.steps) or real(pipe, config, request))
    times = latency.interleaved_times(toy_control_pipe, configs, inputs.subset(1), rounds=3)
    assert called == [2, 3] + [2, 3] * 3, "a warm-up each, then in turn"
    assert {name: len(seconds) for name, seconds in times.items()} == {"a": 3, "b": 3}


def test_deepcache_after_a_guidance_cutoff_still_runs(toy_control_pipe, inputs):
    """The UNet batch halves at the cut-off; DeepCache's cached features must be refreshed there, not reused."""
    config = latency.parse_rung("dpm++ 6 + cfg_cutoff + deepcache", latency.Knobs(cfg_cutoff=0.5,
                                                                                  deepcache_interval=3))
    pipe = latency.configure(toy_control_pipe, config)
    images = latency.generate_config(pipe, config, inputs.subset(1), output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    plain = latency.generate_config(latency.configure(toy_control_pipe, latency.parse_rung("dpm++ 6 + cfg_cutoff")),
                                    config, inputs.subset(1), output_type="np").images
    assert 0 < np.abs(images - plain).mean() < 0.1, "cached steps change the picture a little, not entirely"


def test_tiny_decoder_of_the_toy_decodes_like_its_vae(toy_control_pipe, inputs):
    from diffusers import AutoencoderTiny

    from helpers.stages import vae_scale_factor

    config = latency.parse_rung("ddim 8 + tiny_vae")
    pipe = latency.configure(toy_control_pipe, config)
    assert isinstance(pipe.vae, AutoencoderTiny) and vae_scale_factor(pipe.vae) == 4
    reference = latency.configure(toy_control_pipe, latency.parse_rung("ddim 8"))
    tiny = latency.generate_config(pipe, config, inputs)
    full = latency.generate_config(reference, config, inputs)
    similarity = latency.image_similarity(tiny.images, full.images)
    assert similarity["psnr_db"] > 22 and similarity["ssim"] > 0.8, similarity
    assert latency.quality(tiny.images, inputs, None, on_toy=True)["control_adherence"] > 0.5


def test_openvino_runs_every_network_and_draws_what_torch_draws(toy_control_pipe, inputs):
    """The OpenVINO peer converts the text encoder, UNet, ControlNet and VAE decoder (as optimum-intel does); in f32
    its pictures are PyTorch's, and the part timers still see each network."""
    from helpers.openvino_engine import OpenVINOControlNet, OpenVINOTextEncoder, OpenVINOUNet, OpenVINOVAE

    config = latency.parse_rung("ddim 4 + openvino")
    pipe = latency.configure(toy_control_pipe, config)
    assert [type(getattr(pipe, name)) for name in ("text_encoder", "unet", "controlnet", "vae")] == [
        OpenVINOTextEncoder, OpenVINOUNet, OpenVINOControlNet, OpenVINOVAE]
    request = inputs.subset(1)
    _, parts, _, calls = latency.time_request(pipe, config, request)
    assert calls == {"preprocess": 1, "text_encoder": 2, "controlnet": 4, "unet": 4, "scheduler": 4,
                     "vae_decode": 1, "postprocess": 1}
    assert all(parts[part] > 0 for part in ("text_encoder", "unet", "controlnet", "vae_decode"))
    reference = latency.configure(toy_control_pipe, latency.parse_rung("ddim 4"))
    similarity = latency.image_similarity(latency.generate_config(pipe, config, request).images,
                                          latency.generate_config(reference, config, request).images)
    assert similarity["psnr_db"] > 40, similarity
    assert pipe.vae.inference_precision == "f32"

# ---------------------------------------------------------------------------------------------------------------
# Quality, the front and the recommendation


def test_image_similarity_is_perfect_for_the_same_images_and_drops_with_noise():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    noisy = np.clip(image.astype(int) + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
    same = latency.image_similarity([image], [image])
    assert same == {"psnr_db": float("inf"), "ssim": pytest.approx(1.0)}
    worse = latency.image_similarity([noisy], [image])
    assert 15 < worse["psnr_db"] < 35 and worse["ssim"] < 0.99
    with pytest.raises(ValueError, match="2 images but 1 reference"):
        latency.image_similarity([image, image], [image])
    with pytest.raises(ValueError, match="cannot be compared"):
        latency.image_similarity([image[:16]], [image])
    with pytest.raises(ValueError, match="uint8"):
        latency.image_similarity([image / 255.0], [image])


def test_pareto_front_keeps_only_undominated_rungs_fastest_first():
    points = {"baseline": (10.0, 0.95), "fast": (1.0, 0.90), "faster": (0.5, 0.60), "dominated": (2.0, 0.85),
              "best": (3.0, 0.96)}
    assert latency.pareto_front(points) == ["faster", "fast", "best"]


def test_recommend_picks_the_fastest_rung_within_the_quality_bars():
    rows = [{"rung": "baseline", "status": "ok", "latency s": 2.0, "prompt_adherence": 0.90, "control_adherence": 0.8},
            {"rung": "a", "status": "ok", "latency s": 0.5, "prompt_adherence": 0.89, "control_adherence": 0.79},
            {"rung": "b", "status": "ok", "latency s": 0.1, "prompt_adherence": 0.70, "control_adherence": 0.8},
            {"rung": "c", "status": "ok", "latency s": 0.2, "prompt_adherence": 0.90, "control_adherence": 0.5},
            {"rung": "d", "status": "skipped", "latency s": None}]
    pick = latency.recommend(rows, "baseline", quality_key="prompt_adherence", max_loss=0.02,
                             second_key="control_adherence", max_second_loss=0.05)
    assert pick["rung"] == "a" and pick["speedup"] == pytest.approx(4.0)
    assert pick["prompt_adherence_loss"] == pytest.approx(0.01)
    only_first = latency.recommend(rows, "baseline", quality_key="prompt_adherence", max_loss=0.02)
    assert only_first["rung"] == "c", "without the control bar, c's broken control is acceptable"
    assert latency.recommend(rows, "nosuch", quality_key="prompt_adherence", max_loss=0.02) is None
    assert [row["rung"] for row in latency.within_bars(rows, "baseline", quality_key="prompt_adherence",
                                                        max_loss=0.02)] == ["c", "a", "baseline"], "fastest first"


# ---------------------------------------------------------------------------------------------------------------
# Bottlenecks


def test_count_flops_counts_a_matmul_exactly():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert latency.count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


def test_matmul_roofline_and_profile_are_measured():
    rate = latency.matmul_roofline(torch.float32, n=256, repeats=2)
    assert 1e8 < rate < 1e14, f"{rate:.3g} FLOP/s is not a CPU matmul rate"
    a = torch.randn(128, 128)
    top = latency.profile_top_ops(lambda: torch.relu(a @ a), k=3)
    assert top and any("mm" in row["op"] for row in top)
    assert all(0 <= row["share"] <= 1 for row in top)


def test_a_short_rung_is_timed_until_the_minimum_time_is_spent(toy_control_pipe, inputs):
    config = latency.parse_rung("ddim 2")
    result = latency.run_rung(toy_control_pipe, "ddim 2", config, inputs, repeats=1, min_time_s=0.3, quality_batch=2)
    assert len(result.latency_s) > 1 and sum(result.latency_s) >= 0.3, result.latency_s
    assert result.row()["runs"] == len(result.latency_s)
    once = latency.run_rung(toy_control_pipe, "ddim 2", config, inputs, repeats=2, quality_batch=2)
    assert len(once.latency_s) == 2, "without a minimum time, exactly `repeats` requests"


def test_stage_bottlenecks_report_flops_rate_and_top_ops(toy_control_pipe, inputs):
    config = latency.parse_rung("ddim 2")
    result = latency.run_rung(toy_control_pipe, "ddim 2", config, inputs, repeats=1, quality_batch=2)
    rooflines = {torch.float32: latency.matmul_roofline(torch.float32, n=256, repeats=2)}
    rows = latency.stage_bottlenecks(latency.configure(toy_control_pipe, config), config, inputs.subset(1), result,
                                     rooflines, top_k=3)
    stages = {row["stage"]: row for row in rows}
    assert set(stages) == {"text_encoder", "controlnet", "unet", "vae_decode"}
    for row in rows:
        assert row["GFLOP per call"] > 0 and row["s per call"] > 0 and 0 < row["roofline share"] < 1.5
        assert row["top ops"]
    assert stages["unet"]["GFLOP per call"] > stages["text_encoder"]["GFLOP per call"]


def test_unet_step_timing_on_a_unet_alone():
    from diffusers import DDIMScheduler

    from helpers.testing import tiny_random_pipeline

    pipe = tiny_random_pipeline(seed=0)
    holder = latency.UNetOnly(pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config))
    timing = latency.time_unet_steps(latency.configure(holder, latency.parse_rung("channels_last")),
                                     latency.parse_rung("channels_last"), batch_size=2, latent_size=8, repeats=2)
    assert timing["step_s"] > 0 and timing["repeats"] == 2 and timing["first_call_s"] > 0


def test_bench_latency_tables_every_rung_with_its_rate(tmp_path, monkeypatch):
    import json

    from helpers.bench import latency as bench

    monkeypatch.setenv("SD_OUTPUTS", str(tmp_path))
    assert bench.main(["--model", "tiny-random", "--rungs", "baseline", "deepcache", "fp16", "channels_last",
                       "--repeats", "1", "--latent-size", "8"]) == 0
    recorded = json.loads((tmp_path / "bench_latency.json").read_text())
    rows = {row["rung"]: row for row in recorded["rows"]}
    assert rows["fp16"]["status"] == "skipped" and "fp16 on a CPU" in rows["fp16"]["reason"]
    assert rows["baseline"]["rate"] == "measured" and rows["deepcache"]["rate"] == "effective"
    assert rows["baseline"]["speed-up"] == 1.0 and rows["baseline"]["roofline share"] > 0
    summary = recorded["summary"]
    assert summary["best full-step torch rung"] in ("baseline", "channels_last"), "a cached step is not a full step"
    assert summary["best OpenVINO rung"] is None and summary["full-step torch vs OpenVINO"] is None
    assert recorded["gflop_per_step"] > 0 and recorded["roofline_gflops"]["float32"] > 0


def test_bench_latency_times_torch_and_openvino_again_in_turn(tmp_path, monkeypatch):
    import json

    from helpers.bench import latency as bench

    monkeypatch.setenv("SD_OUTPUTS", str(tmp_path))
    order = []
    real = latency.time_unet_steps
    monkeypatch.setattr(latency, "time_unet_steps", lambda holder, config, *a, **k: order.append(config.engine)
                        or real(holder, config, *a, **k))
    assert bench.main(["--model", "tiny-random", "--rungs", "baseline", "openvino", "--repeats", "1",
                       "--latent-size", "8", "--head-to-head", "3"]) == 0
    assert order[2:] == ["torch", "openvino"] * 4, "the ladder's two, then a warm-up each and three rounds in turn"
    summary = json.loads((tmp_path / "bench_latency.json").read_text())["summary"]
    assert summary["head to head rounds"] == 3 and summary["head to head torch s"] > 0
    assert summary["head to head torch vs OpenVINO"] == pytest.approx(
        summary["head to head OpenVINO s"] / summary["head to head torch s"])
