"""helpers.studies.latency: rung names, what a platform can run, part timers, quality scores, the Pareto front and the
recommendation, FLOPs and the roofline; the rungs themselves on the toy (small: 4-8 steps, one prompt)."""

import dataclasses

import numpy as np
import pytest
import torch

from helpers.core.models import load_pipeline
from helpers.studies import latency
from helpers.toy import sample_scenes


@pytest.fixture(scope="module")
def inputs():
    scenes = sample_scenes(2, seed=0)
    return latency.Inputs(scenes.prompts, [0, 1], scenes.control_images(), list(scenes.depth_maps))


# ---------------------------------------------------------------------------------------------------------------
# Names and configs


def test_parse_rung_reads_schedulers_steps_and_optimisations():
    strengths = latency.RungConfig(cfg_cutoff=0.4, deepcache_interval=2)
    config = latency.parse_rung("dpm++ 10 + cfg_cutoff + deepcache + fused_qkv", strengths)
    assert (config.scheduler, config.steps, config.cfg_cutoff, config.deepcache_interval, config.fuse_qkv) == (
        "dpm++", 10, 0.4, 2, True)
    assert latency.parse_rung("baseline") == latency.RungConfig()
    assert latency.parse_rung("bf16 + channels_last").changes() == {"half": "bf16", "channels_last": True}
    base = latency.RungConfig(steps=8)
    assert latency.parse_rung("euler 4", baseline=base).steps == 4
    assert latency.parse_rung("fused_qkv", baseline=base).steps == 8, "a rung starts from the given baseline"


@pytest.mark.parametrize("name", ["dpm++ ten", "warp_speed", "bf16+channels_last", "nosuch 10"])
def test_parse_rung_refuses_unknown_names(name):
    with pytest.raises(ValueError, match="neither 'baseline'"):
        latency.parse_rung(name)


def test_config_passes_steps_cutoff_and_control_window_to_generate():
    config = latency.parse_rung("unipc 6 + cfg_cutoff + control_end", latency.RungConfig(cfg_cutoff=0.3,
                                                                                    control_guidance_end=0.6))
    assert config.generate_kwargs() == {"num_inference_steps": 6, "control_guidance_end": 0.6, "cfg_cutoff": 0.3}


def test_ays_is_align_your_steps_schedule_with_dpm_solver(toy_depth_pipe, inputs):
    """"ays 10" runs DPM-Solver++ on diffusers' AysSchedules["StableDiffusionTimesteps"]: 10 UNet calls, at those
    timesteps (not 10 evenly spaced ones); other step counts are refused (the schedule is defined for 10)."""
    from diffusers.schedulers import AysSchedules

    config = latency.parse_rung("ays 10 + cfg_cutoff")
    assert (config.scheduler, config.steps) == ("dpm++", 10)
    assert config.generate_kwargs()["timesteps"] == AysSchedules["StableDiffusionTimesteps"]
    assert "timesteps=[999, 850" in latency.recipe(config)
    with pytest.raises(ValueError, match="has 10 steps"):
        latency.parse_rung("ays 6")
    pipe = latency.configure(toy_depth_pipe, latency.parse_rung("ays 10"))
    seen = []
    with latency.part_timers(pipe) as calls:
        pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(int(args[1].flatten()[0])))
        latency.generate_config(pipe, latency.parse_rung("ays 10"), inputs.subset(1))
    assert len(calls["unet"]) == 10 and seen == AysSchedules["StableDiffusionTimesteps"]


# ---------------------------------------------------------------------------------------------------------------
# What this platform can run: reasons, never crashes


def test_a_rung_is_its_speedups_applied_by_hand(toy_depth_pipe, inputs):
    """What the notebook shows (`recipe`) is what `configure` does: the same calls give the same picture."""
    config = latency.parse_rung("ddim 3 + cfg_cutoff + fused_qkv + channels_last")
    assert [(f.__name__, kwargs) for f, kwargs in latency.speedups(config)] == [
        ("use_scheduler", {"name": "ddim", "steps": 3}), ("fuse_qkv", {}), ("use_channels_last", {})]
    assert "latency.fuse_qkv(pipe)" in latency.recipe(config) and "cfg_cutoff=0.5" in latency.recipe(config)
    by_hand = latency.copy_pipeline(toy_depth_pipe)
    latency.use_scheduler(by_hand, "ddim", 3)
    latency.fuse_qkv(by_hand)
    latency.use_channels_last(by_hand)
    request = inputs.subset(1)
    expected = latency.generate_config(latency.configure(toy_depth_pipe, config), config, request, "np").images
    np.testing.assert_array_equal(latency.generate_config(by_hand, config, request, "np").images, expected)
    openvino = [f.__name__ for f, _ in latency.speedups(latency.parse_rung("openvino + bf16"))]
    assert openvino == ["use_scheduler", "use_openvino"], "OpenVINO takes the half as its precision, not a cast"


def test_why_not_names_what_a_cpu_cannot_run():
    cpu = torch.device("cpu")
    assert "fp16 on a CPU" in latency.why_not(latency.parse_rung("fp16"), cpu)
    assert "OpenVINO runs its own graph" in latency.why_not(latency.parse_rung("openvino + deepcache"), cpu)
    assert "not combined" in latency.why_not(latency.parse_rung("compile + deepcache"), cpu)
    assert "replace classic attention" in latency.why_not(latency.parse_rung("fused_qkv + classic_attention"), cpu)
    assert "replace slicing attention" in latency.why_not(latency.parse_rung("attention_slicing + fused_qkv"), cpu)
    assert latency.why_not(latency.parse_rung("dpm++ 10 + cfg_cutoff + fused_qkv + channels_last"), cpu) is None
    assert "engine" in latency.why_not(latency.RungConfig(engine="tensorrt"), cpu)


def test_a_rung_the_platform_cannot_run_is_recorded_as_skipped(toy_depth_pipe, inputs):
    result = latency.run_rung(toy_depth_pipe, "fp16", latency.parse_rung("fp16 + euler 2"), inputs, repeats=1)
    assert result.status == "skipped" and "fp16 on a CPU" in result.reason
    assert result.median_s is None and result.images == []
    assert result.row()["reason"] == result.reason


def test_configure_works_on_a_copy(toy_depth_pipe):
    before = {k: v.clone() for k, v in toy_depth_pipe.unet.state_dict().items()}
    configured = latency.configure(toy_depth_pipe, latency.parse_rung("fused_qkv + channels_last + ddim 4"))
    assert configured.unet is not toy_depth_pipe.unet
    assert any("to_qkv" in name for name, _ in configured.unet.named_modules()), "QKV fused in the copy"
    assert not any("to_qkv" in name for name, _ in toy_depth_pipe.unet.named_modules()), "the base is untouched"
    assert type(configured.scheduler).__name__ == "DDIMScheduler"
    after = toy_depth_pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_compile_on_a_cpu_freezes_and_prepacks_the_weights_at_every_batch():
    """torch.compile(options={"freezing": True}) alone leaves the weights unfrozen (dynamo reads the global flag):
    the compile rung must reach oneDNN's prepacked convolution, also after a recompile for a new batch size."""
    from diffusers import DDIMScheduler
    from torch.profiler import profile

    class Net(torch.nn.Sequential):
        device = torch.device("cpu")

    net = Net(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    holder = latency.configure(latency.UNetOnly(net, DDIMScheduler()), latency.RungConfig(compile=True))
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


def test_part_timers_count_each_part_and_leave_nothing_behind(toy_depth_pipe, inputs):
    pipe = latency.configure(toy_depth_pipe, latency.parse_rung("ddim 3"))
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


def test_time_request_splits_the_request_into_its_parts(toy_depth_pipe, inputs):
    config = latency.parse_rung("ddim 2")
    pipe = latency.configure(toy_depth_pipe, config)
    total, parts, stages, calls = latency.time_request(pipe, config, inputs.subset(1))
    assert set(parts) == {*latency.PARTS, "other"}
    assert sum(parts.values()) == pytest.approx(total, rel=1e-6, abs=1e-6), "other is what the parts leave"
    assert calls["unet"] == 2 and set(stages) >= {"encode_text", "denoise", "decode"}


def test_same_arithmetic_rungs_are_priced_by_an_equality_check(toy_depth_pipe):
    """channels_last changes how the baseline's arithmetic runs, not what it computes: its first pictures are checked
    equal to the baseline's and it inherits the oracle's scores; a rung that computes something else, or a same-
    arithmetic rung whose pictures differ from its reference's, is priced on every prompt."""
    scenes = sample_scenes(4, seed=0)
    inputs = latency.Inputs(scenes.prompts, [0, 1, 2, 3], scenes.control_images(), list(scenes.depth_maps))
    ladder = latency.Ladder(toy_depth_pipe, inputs, latency.RungConfig(scheduler="ddim", steps=4), on_toy=True,
                            repeats=1, quality_batch=4, equality_images=2)
    assert latency.same_arithmetic_reference(ladder.config("ddim 2 + channels_last")) == ladder.config("ddim 2")
    assert latency.same_arithmetic_reference(ladder.config("ddim 2 + cfg_cutoff")) is None
    layout = ladder.run("channels_last")
    base = ladder.results["baseline"]
    assert len(layout.images) == 2 and layout.quality["quality_from"] == "baseline"
    assert layout.quality["equality_lowest_psnr_db"] >= ladder.equality_min_psnr_db
    assert layout.quality["prompt_adherence"] == base.quality["prompt_adherence"]
    assert layout.quality["control_adherence"] == base.quality["control_adherence"]
    fewer = ladder.run("ddim 2")
    assert len(fewer.images) == len(inputs.prompts) and "quality_from" not in fewer.quality
    fused = ladder.run("ddim 2 + fused_qkv")
    assert fused.quality["quality_from"] == "ddim 2", "any rung priced in full is a reference"
    shuffled = dataclasses.replace(base, images=base.images[::-1])  # a baseline whose first pictures are others'
    other = latency.Ladder(toy_depth_pipe, inputs, ladder.baseline, on_toy=True, repeats=1, quality_batch=4,
                           equality_images=2, results={"baseline": shuffled})
    layout_again = other.run("classic_attention")
    assert len(layout_again.images) == len(inputs.prompts) and "quality_from" not in layout_again.quality


# ---------------------------------------------------------------------------------------------------------------
# Rungs on the toy: fewer steps, guidance cut-off, DeepCache, the tiny decoder


def test_a_ladder_scores_rungs_against_the_baseline(toy_depth_pipe, inputs):
    ladder = latency.Ladder(toy_depth_pipe, inputs, latency.RungConfig(scheduler="ddim", steps=8),
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


def test_head_to_head_times_the_rungs_in_turn(toy_depth_pipe, inputs, monkeypatch):
    """Round after round, each config once: not all of A's runs, then all of B's (a busy machine drifts)."""
    configs = {"a": latency.parse_rung("ddim 2"), "b": latency.parse_rung("ddim 3")}
    called = []
    real = latency.generate_config
    monkeypatch.setattr(latency.ladder, "generate_config",
                        lambda pipe, config, request: called.append(config.steps) or real(pipe, config, request))
    times = latency.interleaved_times(toy_depth_pipe, configs, inputs.subset(1), rounds=3)
    assert called == [2, 3] + [2, 3] * 3, "a warm-up each, then in turn"
    assert {name: len(seconds) for name, seconds in times.items()} == {"a": 3, "b": 3}


def test_deepcache_after_a_guidance_cutoff_still_runs(toy_depth_pipe, inputs):
    """The UNet batch halves at the cut-off; DeepCache's cached features must be refreshed there, not reused."""
    config = latency.parse_rung("dpm++ 6 + cfg_cutoff + deepcache", latency.RungConfig(cfg_cutoff=0.5,
                                                                                  deepcache_interval=3))
    pipe = latency.configure(toy_depth_pipe, config)
    images = latency.generate_config(pipe, config, inputs.subset(1), output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    plain = latency.generate_config(latency.configure(toy_depth_pipe, latency.parse_rung("dpm++ 6 + cfg_cutoff")),
                                    config, inputs.subset(1), output_type="np").images
    assert 0 < np.abs(images - plain).mean() < 0.1, "cached steps change the picture a little, not entirely"


def _cross_attention_key_calls(pipe) -> list[int]:
    """The batch of every cross-attention key projection the UNet computes (attn2.to_k reads the prompt)."""
    calls = []
    for name, module in pipe.unet.named_modules():
        if name.endswith("attn2.to_k"):
            module.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    return calls


def test_tgate_caches_the_cross_attention_after_its_gate_and_drops_guidance_there(toy_depth_pipe, inputs):
    """T-GATE at gate 0.4 of 10 steps: guided steps 0-4 compute the cross-attention on the doubled batch, then it is
    cached and reused (no key projection reads the prompt) while each step runs one pass; the count starts again for
    the next request, which draws the same picture."""
    config = latency.parse_rung("dpm++ 10 + tgate")
    assert (config.generate_kwargs()["cfg_cutoff"], config.tgate_gate_step()) == (0.4, 5)
    pipe = latency.configure(toy_depth_pipe, config)
    batches, keys = _unet_batches(pipe), _cross_attention_key_calls(pipe)
    layers = sum(name.endswith("attn2.to_k") for name, _ in pipe.unet.named_modules())
    first = latency.generate_config(pipe, config, inputs.subset(1), "np").images
    assert batches == [2] * 5 + [1] * 5, "guidance until the gate, one pass a step after it"
    assert keys == [2] * 5 * layers, "the cross-attention is computed before the gate only"
    again = latency.generate_config(pipe, config, inputs.subset(1), "np").images
    assert np.array_equal(first, again), "a second request starts a new step count"
    cutoff = latency.configure(toy_depth_pipe, latency.parse_rung("dpm++ 10 + cfg_cutoff", latency.RungConfig(
        cfg_cutoff=0.4)))
    plain = latency.generate_config(cutoff, config, inputs.subset(1), "np").images
    assert 0 < np.abs(first - plain).mean() < 0.1, "cached attention changes the picture a little, not entirely"


@pytest.mark.parametrize("name, reason", [
    ("lcm 4 + tgate", "no halves to average"), ("tgate + cfg_cutoff", "its own gate"),
    ("tgate + deepcache", "not combined"), ("tgate + openvino", "not combined"), ("tgate + compile", "not combined")])
def test_tgate_refuses_what_it_cannot_combine_with_and_says_why(name, reason):
    assert reason in (latency.why_not(latency.parse_rung(name), "cpu") or ""), name


def test_tiny_decoder_of_the_toy_decodes_like_its_vae(toy_depth_pipe, inputs):
    from diffusers import AutoencoderTiny

    from helpers.core.stages import vae_scale_factor

    config = latency.parse_rung("ddim 8 + tiny_vae")
    pipe = latency.configure(toy_depth_pipe, config)
    assert isinstance(pipe.vae, AutoencoderTiny) and vae_scale_factor(pipe.vae) == 4
    reference = latency.configure(toy_depth_pipe, latency.parse_rung("ddim 8"))
    tiny = latency.generate_config(pipe, config, inputs)
    full = latency.generate_config(reference, config, inputs)
    similarity = latency.image_similarity(tiny.images, full.images)
    assert similarity["psnr_db"] > 22 and similarity["ssim"] > 0.8, similarity
    assert latency.quality(tiny.images, inputs, None, on_toy=True)["control_adherence"] > 0.5


def test_openvino_runs_every_network_and_draws_what_torch_draws(toy_depth_pipe, inputs):
    """The OpenVINO peer converts the text encoder, UNet, ControlNet and VAE decoder (as optimum-intel does); in f32
    its pictures are PyTorch's, and the part timers still see each network."""
    from helpers.studies.openvino_engine import OpenVINOControlNet, OpenVINOTextEncoder, OpenVINOUNet, OpenVINOVAE

    config = latency.parse_rung("ddim 4 + openvino")
    pipe = latency.configure(toy_depth_pipe, config)
    assert [type(getattr(pipe, name)) for name in ("text_encoder", "unet", "controlnet", "vae")] == [
        OpenVINOTextEncoder, OpenVINOUNet, OpenVINOControlNet, OpenVINOVAE]
    request = inputs.subset(1)
    _, parts, _, calls = latency.time_request(pipe, config, request)
    assert calls == {"preprocess": 1, "text_encoder": 2, "controlnet": 4, "unet": 4, "scheduler": 4,
                     "vae_decode": 1, "postprocess": 1}
    assert all(parts[part] > 0 for part in ("text_encoder", "unet", "controlnet", "vae_decode"))
    reference = latency.configure(toy_depth_pipe, latency.parse_rung("ddim 4"))
    similarity = latency.image_similarity(latency.generate_config(pipe, config, request).images,
                                          latency.generate_config(reference, config, request).images)
    assert similarity["psnr_db"] > 40, similarity
    assert pipe.vae.inference_precision == "f32"
    pair = inputs.subset(2)  # new input shapes: each graph is reshaped and compiled again, not traced again
    similarity = latency.image_similarity(latency.generate_config(pipe, config, pair).images,
                                          latency.generate_config(reference, config, pair).images)
    assert similarity["lowest_psnr_db"] > 40, similarity
    assert all(getattr(pipe, name).traces == 1 for name in ("text_encoder", "unet", "controlnet", "vae"))

def test_int8_quantizes_the_openvino_unet_and_controlnet_on_the_warm_up_calls(toy_depth_pipe, inputs):
    """"openvino + int8": NNCF quantizes the UNet and the ControlNet (weights and activations) on the calls of the
    warm-up request, which PyTorch answers; the text encoder and the decode stay f32. The int8 pictures stay close to
    f32's (quantization noise, not another picture)."""
    from helpers.studies.openvino_engine import OpenVINOUNet

    config = latency.parse_rung("ddim 4 + openvino + int8")
    pipe = latency.configure(toy_depth_pipe, config)
    assert isinstance(pipe.unet, OpenVINOUNet) and pipe.unet.calibration == [] and pipe.vae.calibration is None
    latency.warm_up(pipe, config, inputs.subset(1), inputs)
    assert pipe.unet.traces == 1 and pipe.controlnet.traces == 1, "converted once, after calibrating"
    assert pipe.unet.quantized and pipe.controlnet.quantized and not pipe.text_encoder.quantized
    images = latency.generate_config(pipe, config, inputs.subset(1)).images
    reference = latency.configure(toy_depth_pipe, latency.parse_rung("ddim 4"))
    similarity = latency.image_similarity(images, latency.generate_config(reference, config, inputs.subset(1)).images)
    assert 20 < similarity["psnr_db"] < float("inf"), similarity


# ---------------------------------------------------------------------------------------------------------------
# Quality, the front and the recommendation


def test_image_similarity_is_perfect_for_the_same_images_and_drops_with_noise():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    noisy = np.clip(image.astype(int) + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
    same = latency.image_similarity([image], [image])
    assert same == {"psnr_db": float("inf"), "ssim": pytest.approx(1.0), "lowest_psnr_db": float("inf")}
    worse = latency.image_similarity([noisy], [image])
    assert 15 < worse["psnr_db"] < 35 and worse["ssim"] < 0.99
    mixed = latency.image_similarity([image, noisy], [image, image])  # one identical picture hides nothing
    assert mixed["psnr_db"] == pytest.approx(worse["psnr_db"]) and mixed["lowest_psnr_db"] == worse["psnr_db"]
    with pytest.raises(ValueError, match="2 images but 1 reference"):
        latency.image_similarity([image, image], [image])
    with pytest.raises(ValueError, match="cannot be compared"):
        latency.image_similarity([image[:16]], [image])
    assert latency.image_similarity([image / 255.0], [image])["psnr_db"] == float("inf"), "floats in [0, 1]: x 255"
    with pytest.raises(ValueError, match=r"must hold values in \[0, 1\]"):
        latency.image_similarity([image.astype(float)], [image])  # 0..255 floats are refused, never read as [0, 1]


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


def test_a_short_rung_is_timed_until_the_minimum_time_is_spent(toy_depth_pipe, inputs):
    config = latency.parse_rung("ddim 2")
    result = latency.run_rung(toy_depth_pipe, "ddim 2", config, inputs, repeats=1, min_time_s=0.3, quality_batch=2)
    assert len(result.latency_s) > 1 and sum(result.latency_s) >= 0.3, result.latency_s
    assert result.row()["runs"] == len(result.latency_s)
    once = latency.run_rung(toy_depth_pipe, "ddim 2", config, inputs, repeats=2, quality_batch=2)
    assert len(once.latency_s) == 2, "without a minimum time, exactly `repeats` requests"


def test_stage_bottlenecks_report_flops_rate_and_top_ops(toy_depth_pipe, inputs):
    config = latency.parse_rung("ddim 2")
    result = latency.run_rung(toy_depth_pipe, "ddim 2", config, inputs, repeats=1, quality_batch=2)
    rooflines = {torch.float32: latency.matmul_roofline(torch.float32, n=256, repeats=2)}
    rows = latency.stage_bottlenecks(latency.configure(toy_depth_pipe, config), config, inputs.subset(1), result,
                                     rooflines, top_k=3)
    stages = {row["stage"]: row for row in rows}
    assert set(stages) == {"text_encoder", "controlnet", "unet", "vae_decode"}
    for row in rows:
        assert row["GFLOP per call"] > 0 and row["s per call"] > 0 and 0 < row["roofline share"] < 1.5
        assert row["top ops"]
    assert stages["unet"]["GFLOP per call"] > stages["text_encoder"]["GFLOP per call"]


def test_unet_step_timing_on_a_unet_alone():
    from diffusers import DDIMScheduler

    from helpers.core.random_models import tiny_random_pipeline

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
    for module in (latency, latency.bottlenecks):  # the bench's ladder, and the head to head in turn
        monkeypatch.setattr(module, "time_unet_steps", lambda holder, config, *a, **k: order.append(config.engine)
                            or real(holder, config, *a, **k))
    assert bench.main(["--model", "tiny-random", "--rungs", "baseline", "openvino", "--repeats", "1",
                       "--latent-size", "8", "--head-to-head", "3"]) == 0
    assert order[2:] == ["torch", "openvino"] * 4, "the ladder's two, then a warm-up each and three rounds in turn"
    summary = json.loads((tmp_path / "bench_latency.json").read_text())["summary"]
    assert summary["head to head rounds"] == 3 and summary["head to head torch s"] > 0
    assert summary["head to head torch vs OpenVINO"] == pytest.approx(
        summary["head to head OpenVINO s"] / summary["head to head torch s"])


def test_bench_latency_sets_int8_rungs_against_an_int8_roofline_and_in_turn(tmp_path, monkeypatch):
    """"openvino + int8" (NNCF, calibrated on a few steps) and torch's "int8" (torchao) are timed and set against an
    int8 roofline (OpenVINO's int8 matmul and convolution) measured in the same run, then against each other in turn;
    the float comparison (torch against OpenVINO at one precision) leaves them out. Every roofline has a matmul and
    a convolution source."""
    import json

    from helpers.bench import latency as bench

    monkeypatch.setenv("SD_OUTPUTS", str(tmp_path))
    timed_quantized = []  # every timed OpenVINO int8 step, in the ladder and the head to head: quantized already?
    real = latency.time_unet_steps
    for module in (latency, latency.bottlenecks):
        monkeypatch.setattr(module, "time_unet_steps", lambda holder, config, *a, **k: (
            config.int8 and config.engine == "openvino" and timed_quantized.append(holder.unet.quantized))
            or real(holder, config, *a, **k))
    assert bench.main(["--model", "tiny-random", "--rungs", "baseline", "openvino", "int8", "openvino + int8",
                       "--repeats", "1", "--latent-size", "8", "--head-to-head", "1"]) == 0
    assert timed_quantized == [True] * 3, "the ladder's timing, then a warm-up and a round in turn: all NNCF's int8"
    record = json.loads((tmp_path / "bench_latency.json").read_text())
    rows = {row["rung"]: row for row in record["rows"]}
    for rung in ("int8", "openvino + int8"):
        assert rows[rung]["status"] == "ok" and rows[rung]["dtype"] == "int8" and rows[rung]["roofline share"] > 0
    assert record["roofline_gflops"]["int8"] > 0
    assert set(record["roofline_sources_gflops"]["float32"]) == {"torch matmul", "torch conv", "openvino matmul",
                                                                 "openvino conv"}
    assert set(record["roofline_sources_gflops"]["int8"]) == {"openvino matmul", "openvino conv"}
    summary = record["summary"]
    assert (summary["best torch int8 rung"], summary["OpenVINO int8 rung"]) == ("int8", "openvino + int8")
    assert summary["best OpenVINO rung"] == "openvino" and summary["best full-step torch rung"] == "baseline"
    assert summary["int8 head to head torch vs OpenVINO"] == pytest.approx(
        summary["int8 head to head OpenVINO s"] / summary["int8 head to head torch s"])


def test_torch_int8_quantizes_the_copys_linear_layers_and_draws_what_fp32_draws(toy_depth_pipe, inputs):
    """torchao's dynamic int8 on every linear layer of the copy's UNet and ControlNet (the base keeps its floats),
    convolutions untouched; the pictures stay close to fp32's. An int8 rung keeps its engine as its reference:
    OpenVINO's int8 is another quantization, not the same arithmetic."""
    from torchao.quantization import Int8Tensor

    config = latency.parse_rung("int8")
    assert latency.why_not(config, "cpu") is None
    pipe = latency.configure(toy_depth_pipe, config)
    for network, base in ((pipe.unet, toy_depth_pipe.unet), (pipe.controlnet, toy_depth_pipe.controlnet)):
        linears = [m for m in network.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(isinstance(m.weight, Int8Tensor) for m in linears)
        assert all(not isinstance(m.weight, Int8Tensor) for m in base.modules() if isinstance(m, torch.nn.Linear))
        assert all(m.weight.dtype == torch.float32 for m in network.modules() if isinstance(m, torch.nn.Conv2d))
    request = inputs.subset(1)
    quantized = latency.generate_config(pipe, config, request, "np").images
    plain = latency.generate_config(latency.configure(toy_depth_pipe, latency.RungConfig(steps=config.steps)), config,
                                    request, "np").images
    assert 0 < np.abs(quantized - plain).mean() < 0.05
    assert latency.same_arithmetic_reference(latency.parse_rung("openvino + int8")) is None
    assert latency.same_arithmetic_reference(latency.parse_rung("int8 + compile")) == config
    assert "GPU" in latency.why_not(config, "cuda")


# ---------------------------------------------------------------------------------------------------------------
# SD 1.5 on a T4 (issue 32): memory, the rungs and dtype a T4 decides, and notebook 07's badge path


@pytest.fixture
def pretend_t4(monkeypatch):
    """Decide as on a T4 while computing on this CPU (what `python -m helpers rehearse` does)."""
    from helpers.core import accelerator

    monkeypatch.setenv(accelerator.PRETEND_ENV, "t4")
    accelerator.accelerator.cache_clear()
    yield
    monkeypatch.delenv(accelerator.PRETEND_ENV)
    accelerator.accelerator.cache_clear()


def _storages(module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}


def test_configure_shares_the_weights_a_rung_does_not_change(toy_depth_pipe):
    """A rung's copy holds only what it changes: deep copies of every network for every rung filled a T4."""
    base = toy_depth_pipe
    conv = base.unet.conv_in.weight
    configured = latency.configure(base, latency.parse_rung("channels_last + fused_qkv + ddim 4"))
    for name in ("text_encoder", "unet", "controlnet", "vae"):
        assert getattr(configured, name) is not getattr(base, name), f"{name}: the copy is the rung's own module"
    assert _storages(configured.text_encoder) == _storages(base.text_encoder), "untouched: shared, not copied"
    assert configured.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.data_ptr() == (
        base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.data_ptr())
    assert configured.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert conv.is_contiguous() and base.unet.conv_in.weight is conv, "the base keeps its own layout"
    assert not any("to_qkv" in name for name, _ in base.unet.named_modules()), "the base is not fused"
    assert latency.owned_bytes(configured, base) > 0 == latency.owned_bytes(
        latency.configure(base, latency.parse_rung("ddim 4 + cfg_cutoff")), base)


def test_configure_casts_a_copy_without_touching_the_base(toy_depth_pipe):
    half = latency.configure(toy_depth_pipe, latency.RungConfig(half="bf16"))
    assert half.unet.dtype == torch.bfloat16 and toy_depth_pipe.unet.dtype == torch.float32
    assert half.scheduler is not toy_depth_pipe.scheduler


def _memory_budget_for(pipe, images_that_fit: int) -> float:
    """A memory budget (GiB) in which a decode of `images_that_fit` images fits and one more does not."""
    from helpers.core import limits

    height, width = 64, 64
    decode = [limits.estimate_bytes(pipe.vae, n, height, width, "decode") for n in (images_that_fit,
                                                                                     images_that_fit + 1)]
    unet = limits.estimate_bytes(pipe.unet, 2 * images_that_fit, height // 4, width // 4, "unet")
    budget = max(decode[0], unet) * 1.05
    assert budget < decode[1]
    return budget / 2**30


def test_a_rung_whose_quality_images_run_out_of_memory_is_skipped_and_the_ladder_goes_on(toy_depth_pipe, inputs,
                                                                                         monkeypatch):
    ladder = latency.Ladder(toy_depth_pipe, inputs, latency.RungConfig(scheduler="ddim", steps=3),
                            on_toy=True, repeats=1, quality_batch=2)
    ladder.run("baseline")
    monkeypatch.setenv("SD_MEMORY_BUDGET_GIB", str(_memory_budget_for(toy_depth_pipe, 1)))
    result = ladder.run("ddim 2")  # one image per request fits; the quality batch of two does not
    assert result.status == "skipped" and "out of memory" in result.reason and "QUALITY_BATCH" in result.reason
    assert result.images == [] and result.row()["reason"] == result.reason
    monkeypatch.delenv("SD_MEMORY_BUDGET_GIB")
    assert ladder.run("ddim 2 + cfg_cutoff").status == "ok", "the ladder goes on"


def test_a_baseline_that_cannot_run_says_what_to_lower(toy_depth_pipe, inputs, monkeypatch):
    monkeypatch.setenv("SD_MEMORY_BUDGET_GIB", str(_memory_budget_for(toy_depth_pipe, 1)))
    ladder = latency.Ladder(toy_depth_pipe, inputs, latency.RungConfig(scheduler="ddim", steps=2),
                            on_toy=True, repeats=1, quality_batch=2)
    with pytest.raises(RuntimeError, match="baseline could not run.*QUALITY_BATCH"):
        ladder.run("dpm++ 2")


def test_a_rung_frees_its_copy_when_it_is_done(toy_depth_pipe, inputs, monkeypatch):
    import weakref

    copies = []
    real = latency.configure
    monkeypatch.setattr(latency.ladder, "configure", lambda pipe, config: copies.append(weakref.ref(real(pipe, config)))
                        or copies[-1]())
    result = latency.run_rung(toy_depth_pipe, "deepcache", latency.parse_rung("ddim 3 + deepcache"), inputs,
                              repeats=1, quality_batch=2)
    assert result.status == "ok" and copies and copies[0]() is None, "DeepCache's helper cycle is collected"


def test_head_to_head_leaves_out_a_finalist_that_runs_out_of_memory(toy_depth_pipe, inputs, monkeypatch):
    """Finalists are configured one at a time, each sharing the base's weights; one that does not fit beside the
    others is left out with its reason instead of ending the notebook."""
    configs = {"baseline": latency.parse_rung("ddim 2"), "big": latency.parse_rung("ddim 3"),
               "small": latency.parse_rung("ddim 1")}
    real = latency.generate_config

    def generate(pipe, config, request):
        if config.steps == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(pipe, config, request)

    monkeypatch.setattr(latency.ladder, "generate_config", generate)
    skipped = {}
    times = latency.interleaved_times(toy_depth_pipe, configs, inputs.subset(1), rounds=2, skipped=skipped)
    assert set(times) == {"baseline", "small"} and "out of memory" in skipped["big"]


def test_time_loads_lets_the_first_load_go_before_the_second():
    """A second pipeline loaded while the first is still held doubles the memory (a T4 holds SD 1.5 in fp16 twice
    at best)."""
    import weakref

    class Loaded:
        pass

    alive_at_second_load = []
    first = []

    def load():
        if first:
            alive_at_second_load.append(first[0]() is not None)
        obj = Loaded()
        first.append(weakref.ref(obj))
        return obj

    loaded, times = latency.time_loads(load)
    assert alive_at_second_load == [False] and isinstance(loaded, Loaded) and times["load_warm_s"] > 0


def test_a_t4_decides_its_half_and_rungs_while_the_cpu_computes(pretend_t4):
    """Under the pretended T4 the rungs are a T4's (fp16; no bf16, which a T4 only emulates; no OpenVINO) while the
    CPU computes: what cannot run there (a GPU compile) is skipped with the reason."""
    cpu = torch.device("cpu")
    assert latency.parse_rung("half").half == "fp16"
    assert latency.why_not(latency.RungConfig(half="fp16"), cpu) is None, "the T4's baseline runs (slowly) on the CPU"
    assert "bf16" in latency.why_not(latency.parse_rung("bf16"), cpu) and "emulat" in latency.why_not(
        latency.parse_rung("bf16"), cpu)
    assert "measured on a CPU" in latency.why_not(latency.parse_rung("openvino"), cpu)
    assert "compute device" in latency.why_not(latency.parse_rung("compile"), cpu)


def test_a_t4_measures_the_fp16_roofline(pretend_t4):
    rates, sources = latency.rooflines("cpu", n=128)
    assert set(rates) == {torch.float32, torch.float16} and all(r > 0 for r in rates.values())


def test_the_gpu_half_is_fp16_on_a_cuda_machine(monkeypatch):
    """`torch.cuda.is_bf16_supported()` says True on a T4 (emulated): the half rung and bf16 ask
    helpers.core.accelerator."""
    from helpers.core import accelerator

    monkeypatch.setattr(accelerator, "on_gpu", lambda: True)
    monkeypatch.setattr(accelerator, "fast_half_dtype", lambda: torch.float16)
    monkeypatch.setattr(accelerator, "bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert latency.parse_rung("half").half == "fp16"
    assert "no native bf16" in latency.why_not(latency.parse_rung("bf16"), torch.device("cuda"))


def test_a_pretended_t4_runs_an_fp16_ladder_on_the_cpu(pretend_t4):
    """The rehearsal's path: tiny-random in the T4's dtype on the CPU, its baseline fp16, a GPU compile skipped."""
    from helpers.core.accelerator import compute_device, default_dtype

    pipe = load_pipeline("tiny-random", dtype=default_dtype(), device=compute_device(), safety_checker=False)
    assert pipe.unet.dtype == torch.float16 and pipe.device.type == "cpu"
    inputs = latency.Inputs(["a photo of a red apple on a table"], [0])
    baseline = latency.RungConfig(steps=3, half=latency.half_name(pipe.unet.dtype))
    ladder = latency.Ladder(pipe, inputs, baseline, on_toy=False, repeats=1, quality_batch=1)
    assert ladder.run("dpm++ 2 + channels_last").status == "ok"
    assert ladder.results["baseline"].status == "ok"
    compiled = ladder.run("compile")
    assert compiled.status == "skipped" and "compute device" in compiled.reason


def test_sd15_prompts_are_real_prompts_that_fit_the_depth_maps():
    scenes = sample_scenes(8, seed=0)
    prompts = latency.sd15_prompts(scenes)
    assert len(prompts) == 8 and len(set(prompts)) > 4
    for prompt, scene in zip(prompts, scenes.scenes):
        assert scene.objects[0].colour in prompt and not any(s in prompt for s in ("circle", "diamond", "triangle"))


# ---------------------------------------------------------------------------------------------------------------
# Few-step rungs: the LCM-LoRA


def test_lcm_rungs_parse_and_sample_at_guidance_one():
    config = latency.parse_rung("lcm 4")
    assert config.changes() == {"lcm": True, "steps": 4}
    assert config.generate_kwargs() == {"num_inference_steps": 4, "control_guidance_end": 1.0, "guidance_scale": 1.0}
    combined = latency.parse_rung("lcm 1 + openvino + bf16 + tiny_vae", baseline=latency.RungConfig(scheduler="ddim"))
    assert combined.changes() == {"lcm": True, "steps": 1, "engine": "openvino", "half": "bf16", "tiny_vae": True}
    assert [f.__name__ for f, _ in latency.speedups(combined)] == ["use_lcm", "use_tiny_decoder", "use_openvino"]
    code = latency.recipe(latency.parse_rung("lcm 2 + channels_last"))
    assert "latency.use_lcm(pipe, steps=2)" in code and "guidance_scale=1.0" in code
    assert latency.why_not(latency.parse_rung("lcm 4 + deepcache + channels_last + fused_qkv + tome"), "cpu") is None


@pytest.mark.parametrize("name, reason", [
    ("dpm++ 6 + lcm 4", "LCMScheduler"), ("lcm 4 + euler 6", "LCMScheduler"),
    ("lcm 2 + cfg_cutoff", "no classifier-free guidance to cut"), ("lcm 1 + deepcache", "1-step rung"),
    ("lcm 1 + control_end", "leaves the ControlNet no step"), ("lcm 0", "1 step or more")])
def test_lcm_refuses_what_it_cannot_combine_with_and_says_why(name, reason):
    assert reason in (latency.why_not(latency.parse_rung(name), "cpu") or ""), name


def _unet_batches(pipe) -> list[int]:
    batches = []
    pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: batches.append(args[0].shape[0]),
                                        with_kwargs=True)
    return batches


def test_lcm_rung_fuses_the_toys_lcm_lora_into_a_copy_and_runs_one_pass_a_step(toy_depth_pipe, inputs):
    """`use_lcm` loads the shipped LoRA (as `use_lcm_lora`: diffusers' loader and LCMScheduler), fuses it into the
    copy's own weights (the base's shared ones untouched) and the rung generates at guidance 1: one UNet pass of batch
    1 a step, the picture of the unfused LoRA at guidance 1."""
    from diffusers import LCMScheduler
    from peft.tuners.tuners_utils import BaseTunerLayer

    before = {k: v.clone() for k, v in toy_depth_pipe.unet.state_dict().items()}
    config = latency.parse_rung("lcm 2")
    pipe = latency.configure(toy_depth_pipe, config)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.timesteps.tolist() == [999, 499]
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules()), "fused: a plain UNet again"
    after = pipe.unet.state_dict()
    assert sum(not torch.equal(before[k], after[k]) for k in before) > 100, "the LoRA is in the copy's weights"
    assert all(torch.equal(before[k], v) for k, v in toy_depth_pipe.unet.state_dict().items()), "the base is not"
    batches = _unet_batches(pipe)
    request = inputs.subset(1)
    fused = latency.generate_config(pipe, config, request, "np").images
    assert batches == [1, 1], "guidance 1: no unconditional pass"
    adapter = latency.use_lcm_lora(latency.copy_pipeline(toy_depth_pipe))
    assert "lcm" in adapter.get_active_adapters()
    unfused = latency.generate_config(adapter, config, request, "np").images
    assert np.abs(fused - unfused).max() < 0.02 and fused.std() > 0.05


def test_lcm_lora_source_is_the_toys_folder_or_sd15s_published_one():
    from helpers.core.models import LCM_LORA_HUB_ID, lcm_lora_source
    from helpers.core.random_models import sd15_unet_on_meta
    from helpers.toy import TOY_LCM_LORA_DIR

    assert LCM_LORA_HUB_ID == "latent-consistency/lcm-lora-sdv1-5"
    assert lcm_lora_source(load_pipeline("toy").unet) == str(TOY_LCM_LORA_DIR)
    assert lcm_lora_source(sd15_unet_on_meta()) == LCM_LORA_HUB_ID
    with pytest.raises(ValueError, match="made for SD 1.5's UNet"):
        lcm_lora_source(load_pipeline("tiny-random").unet)


def test_an_lcm_rung_without_the_hub_is_skipped_with_the_reason(tmp_path, monkeypatch):
    """SD 1.5's LCM-LoRA offline and not in the hub cache: the rung says so (the ladder goes on)."""
    from helpers.core.random_models import sd15_unet_on_meta

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))

    class Pipe:
        unet = sd15_unet_on_meta()

    with pytest.raises(latency.RungSkipped, match="lcm-lora-sdv1-5 comes from the hub"):
        latency.use_lcm_lora(Pipe())


# ---------------------------------------------------------------------------------------------------------------
# Notebook 07's gpu profile and its badge path


def _notebook_07():
    import nbformat

    from helpers.series.run import find_notebooks

    return nbformat.read(find_notebooks(["07"])[0], as_version=4)


def test_notebook_07_takes_its_settings_from_the_profile_that_fits():
    nb = _notebook_07()
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    index = next(i for i, cell in enumerate(code) if "parameters" in cell.metadata.get("tags", []))
    assert 'PROFILE = "auto"' in code[index].source
    assert 'settings = use_settings("07", globals())' in code[index + 1].source
    source = "\n".join(cell.source for cell in code[1:])
    assert "torch.cuda.is_available()" not in source, "device decisions go through helpers.core.accelerator"
    assert "compute_device()" in source and "safety_checker=False" in source


GPU = __import__("helpers.series.profiles", fromlist=["parameters_for"]).parameters_for("07", "gpu")
T4_STEP_S = (1607 + 567) / (1607 * 7.6)  # UNet + ControlNet, batch 2 at 64×64 latents: FLOPs at the T4's 7.6 it/s
T4_DECODE_S = 2515 / (1607 * 7.6)  # the VAE decoder at 512² (one image)


def _gpu_rungs() -> list[str]:
    return ([f"{s} {n}" for s in GPU["SCHEDULER_RUNGS"] for n in GPU["STEP_RUNGS"]] + GPU["OPTIMISATION_RUNGS"]
            + GPU["COMBINED_RUNGS"])


def test_notebook_07_gpu_rungs_are_a_t4s(pretend_t4, monkeypatch):
    """No OpenVINO or bf16 (skipped on CUDA), fp16 throughout (the baseline is fp16), and every GPU lever tried."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else real(name, *a))
    baseline = latency.RungConfig(steps=GPU.get("BASELINE_STEPS", 50), half="fp16")
    levers = set()
    for name in _gpu_rungs():
        config = latency.parse_rung(name, latency.STRENGTHS, baseline)
        assert config.half == "fp16" and config.engine == "torch", name
        assert latency.why_not(config, torch.device("cuda")) is None, (name, latency.why_not(config, "cuda"))
        levers |= {part.strip().split()[0] for part in name.split(" + ")}
    assert {"dpm++", "channels_last", "fused_qkv", "compile", "deepcache", "tome", "tiny_vae", "cfg_cutoff",
            "classic_attention", "lcm"} <= levers


def test_notebook_07_gpu_profile_fits_a_t4_in_about_15_minutes():
    """Denoising steps the gpu profile asks for, at a T4's rate (the estimate written in helpers/series/profiles.py)."""
    def request_s(steps: int, images: int = 1) -> float:
        return images * (steps * T4_STEP_S + T4_DECODE_S)

    n, repeats = GPU["N_PROMPTS"], GPU["REPEATS"]
    steps = {name: latency.parse_rung(name, baseline=latency.RungConfig(steps=GPU.get("BASELINE_STEPS", 50))).steps
             for name in ["baseline", *_gpu_rungs()]}
    ladder = sum((1 + repeats) * request_s(s) + request_s(s, n) for s in steps.values())
    bottlenecks = request_s(steps["baseline"])
    head_to_head = (1 + GPU["HEAD_TO_HEAD_ROUNDS"]) * (request_s(steps["baseline"])
                                                       + GPU["FINALISTS"] * request_s(max(steps.values())))
    compile_s = 180 * sum("compile" in name for name in _gpu_rungs())  # inductor on Colab's 2 vCPUs: minutes
    total = ladder + bottlenecks + head_to_head + compile_s
    assert total < 16 * 60, f"{total / 60:.0f} minutes on a T4"
    assert GPU["QUALITY_BATCH"] <= 4 and GPU["FINALISTS"] <= 2


def test_notebook_07_under_the_rehearsal_stays_affordable_on_a_cpu():
    """The rehearsal computes the T4's fp16 rungs on a CPU (~11 s an SD 1.5-shaped step with its ControlNet at 64²):
    after its shrinks, the gpu profile's ladder asks for a few dozen denoising steps, not hundreds."""
    from helpers.series.profiles import rehearsal_shrinks

    params = {**GPU, **rehearsal_shrinks("07", steps=2, size=64)}
    baseline = latency.RungConfig(steps=params["BASELINE_STEPS"], half="fp16")
    names = ([f"{s} {n}" for s in params["SCHEDULER_RUNGS"] for n in params["STEP_RUNGS"]]
             + params["OPTIMISATION_RUNGS"] + params["COMBINED_RUNGS"])
    requests = 1 + params["REPEATS"] + params["N_PROMPTS"]
    steps = requests * sum(latency.parse_rung(name, baseline=baseline).steps for name in ["baseline", *names])
    assert steps <= 60, f"{steps} denoising steps"
    levers = {part.strip().split()[0] for name in names for part in name.split(" + ")}
    assert {"channels_last", "fused_qkv", "cfg_cutoff", "deepcache", "tome", "tiny_vae", "lcm"} <= levers
