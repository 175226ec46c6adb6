"""The three hand-written stages against diffusers' own pipelines, on the tiny random SD."""

import time

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from reference import assert_different_pictures, assert_same_pictures, theirs
from reference import ours as our_pictures

from helpers.core.models import make_scheduler
from helpers.core.stages import decode, denoise, encode_image, encode_text, generate

PROMPTS = ["a red circle on a blue background", "a small green square on the left", "a photo of a cat"]
STEPS = 4


def test_encode_text_equals_encode_prompt(tiny_pipe):
    prompt_embeds, negative_prompt_embeds = encode_text(tiny_pipe, PROMPTS, ["blurry", "", "ugly"])
    expected, expected_negative = tiny_pipe.encode_prompt(PROMPTS, "cpu", 1, True, ["blurry", "", "ugly"])
    assert prompt_embeds.shape == (3, 77, tiny_pipe.text_encoder.config.hidden_size)
    torch.testing.assert_close(prompt_embeds, expected, rtol=0, atol=0)
    torch.testing.assert_close(negative_prompt_embeds, expected_negative, rtol=0, atol=0)
    assert not torch.equal(prompt_embeds[0], prompt_embeds[1]), "different prompts must embed differently"


def test_encode_text_without_guidance_has_no_negative(tiny_pipe):
    prompt_embeds, negative_prompt_embeds = encode_text(tiny_pipe, "a red circle", guidance=False)
    assert negative_prompt_embeds is None and prompt_embeds.shape[0] == 1


@pytest.mark.parametrize("scheduler", [None, "euler_a", "dpm++"])
def test_generate_equals_pipeline_call(tiny_pipe, scheduler):
    seeds = [11, 12, 13]
    started = time.perf_counter()
    ours = generate(tiny_pipe, PROMPTS, seeds=seeds, num_inference_steps=STEPS, scheduler=scheduler,
                    output_type="np", progress=False)
    wall = time.perf_counter() - started
    if scheduler:
        tiny_pipe.scheduler = make_scheduler(scheduler, tiny_pipe.scheduler)  # tiny_pipe is this test's own
    assert ours.images.shape == (3, 64, 64, 3)
    assert_same_pictures(ours.images, theirs(tiny_pipe, PROMPTS, seeds, STEPS))
    timings = ours.timings
    assert set(timings) == {"encode_text", "denoise", "decode", "total"}
    stages = timings["encode_text"] + timings["denoise"] + timings["decode"]
    assert 0 < stages <= timings["total"] <= wall, f"the stages run one after another inside the call: {timings}"


def test_generate_takes_a_schedule_of_its_own_as_the_pipeline_does(tiny_pipe):
    """Align Your Steps' SD 1.5 timesteps (diffusers' AysSchedules) through `timesteps=`: the pipeline's pictures with
    the same schedule, not those of 10 evenly spaced steps; a scheduler without custom timesteps is refused."""
    from diffusers.schedulers import AysSchedules

    schedule = AysSchedules["StableDiffusionTimesteps"]
    tiny_pipe.scheduler = make_scheduler("dpm++", tiny_pipe.scheduler)
    # 99 steps asked, but the schedule's length wins, as in diffusers
    mine = our_pictures(tiny_pipe, PROMPTS[:2], [3, 4], 99, timesteps=schedule)
    assert_same_pictures(mine, theirs(tiny_pipe, PROMPTS[:2], [3, 4], None, timesteps=schedule))
    assert_different_pictures(mine, our_pictures(tiny_pipe, PROMPTS[:2], [3, 4], len(schedule)), at_least=1e-3)
    with pytest.raises(ValueError, match="takes no custom timesteps"):
        our_pictures(tiny_pipe, PROMPTS[:1], [0], 2, timesteps=[999, 500], scheduler="ddim")


def test_negative_prompt_and_guidance_change_the_image(tiny_pipe):
    kwargs = dict(seeds=[5], num_inference_steps=STEPS, output_type="np", progress=False)
    plain = generate(tiny_pipe, "a red circle", **kwargs).images
    negative = generate(tiny_pipe, "a red circle", "a blue square", **kwargs).images
    unguided = generate(tiny_pipe, "a red circle", guidance_scale=1.0, **kwargs).images
    assert_different_pictures(plain, negative, at_least=1e-3)
    assert_different_pictures(plain, unguided, at_least=1e-3)
    assert_same_pictures(unguided, theirs(tiny_pipe, ["a red circle"], [5], STEPS, guidance_scale=1.0))


def test_batch_equals_single_calls(tiny_pipe):
    seeds = [3, 1, 4]
    batch = generate(tiny_pipe, PROMPTS, seeds=seeds, num_inference_steps=STEPS, output_type="np", progress=False)
    singles = [
        generate(tiny_pipe, [p], seeds=[s], num_inference_steps=STEPS, output_type="np", progress=False).images[0]
        for p, s in zip(PROMPTS, seeds)
    ]
    assert_same_pictures(batch.images, singles)


def test_img2img_equals_diffusers_img2img(tiny_pipe):
    source = generate(tiny_pipe, PROMPTS[:2], seeds=[1, 2], num_inference_steps=STEPS, progress=False).images
    init_latents = encode_image(tiny_pipe, source)
    assert init_latents.shape == (2, 4, 8, 8)
    prompt_embeds, negative_prompt_embeds = encode_text(tiny_pipe, PROMPTS[:2])
    latents = denoise(
        tiny_pipe, prompt_embeds, negative_prompt_embeds, num_inference_steps=10, strength=0.6,
        latents=init_latents, seeds=[7, 8], progress=False,
    )
    ours = decode(tiny_pipe, latents, output_type="np")
    img2img = StableDiffusionImg2ImgPipeline(**tiny_pipe.components)
    assert_same_pictures(ours, theirs(img2img, PROMPTS[:2], [7, 8], 10, image=init_latents, strength=0.6))


def test_callback_on_step_end_sees_every_step_and_can_replace_the_latents(tiny_pipe):
    """diffusers' step-end callback: (pipe, step_index, t, callback_kwargs) -> dict, after every step; the latents
    it returns are the ones the loop goes on with (here: zeroed after step 5 of 7, so the result is the last step
    taken from zeros), and our loop equals diffusers' with the same callback."""
    seen = []

    def keep(pipe, i, t, callback_kwargs):
        seen.append((i, int(t), callback_kwargs["latents"].clone()))
        return callback_kwargs

    prompt_embeds, negative_prompt_embeds = encode_text(tiny_pipe, "a red circle")
    run = dict(num_inference_steps=7, scheduler="ddim", progress=False, seeds=[0])
    latents = denoise(tiny_pipe, prompt_embeds, negative_prompt_embeds, callback_on_step_end=keep, **run)
    assert [i for i, _, _ in seen] == list(range(7))
    assert seen[0][1] > seen[-1][1], "timesteps run from noisy to clean"
    torch.testing.assert_close(seen[-1][2], latents)

    def zero_at_5(pipe, i, t, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if i == 5 else callback_kwargs

    edited = denoise(tiny_pipe, prompt_embeds, negative_prompt_embeds, callback_on_step_end=zero_at_5, **run)
    assert not torch.equal(edited, latents)
    with pytest.raises(ValueError, match="a step-end callback can see"):
        denoise(tiny_pipe, prompt_embeds, negative_prompt_embeds, callback_on_step_end=keep,
                callback_on_step_end_tensor_inputs=["noise_pred"], **run)


def test_decode_returns_pil_numpy_and_tensors(tiny_pipe):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pil = decode(tiny_pipe, latents)
    array = decode(tiny_pipe, latents, output_type="np")
    tensor = decode(tiny_pipe, latents, output_type="pt")
    assert [im.size for im in pil] == [(64, 64)] * 2
    assert array.shape == (2, 64, 64, 3) and tensor.shape == (2, 3, 64, 64)
    np.testing.assert_allclose(np.asarray(pil[0]) / 255, array[0], atol=1 / 255 + 1e-6)


def test_non_square_sizes(tiny_pipe):
    result = generate(tiny_pipe, "a red circle", height=48, width=96, num_inference_steps=2, progress=False)
    assert result.images[0].size == (96, 48) and result.latents.shape == (1, 4, 6, 12)


# --- bad input: a clear error naming the argument -------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[]), "prompts is empty"),
        (dict(prompts=["a", "b"], negative_prompts=["c"]), "negative_prompts has 1 entries but there are 2"),
        (dict(prompts=["a", "b"], seeds=[1]), "seeds has 1 entries but there are 2"),
        (dict(prompts=["a"], height=100), "height=100 must be a positive multiple of the VAE's scale factor 8"),
        (dict(prompts=["a"], width=0), "width=0"),
        (dict(prompts=["a"], num_inference_steps=0), "num_inference_steps=0 must be at least 1"),
        (dict(prompts=["a"], latents=torch.zeros(1, 4, 9, 8)), "latents have shape (1, 4, 9, 8) but (1, 4, 8, 8)"),
        (dict(prompts=["a"], strength=0.5), "needs latents"),
    ],
)
def test_bad_input_is_a_clear_error(tiny_pipe, kwargs, message):
    kwargs.setdefault("num_inference_steps", 2)
    with pytest.raises(ValueError, match=None) as error:
        generate(tiny_pipe, progress=False, **kwargs)
    assert message in str(error.value)


def test_guidance_without_negative_embeds_is_an_error(tiny_pipe):
    prompt_embeds, _ = encode_text(tiny_pipe, "a red circle", guidance=False)
    with pytest.raises(ValueError, match="needs negative_prompt_embeds"):
        denoise(tiny_pipe, prompt_embeds, None, guidance_scale=7.5, num_inference_steps=2)


def test_prompt_over_77_tokens_warns_with_what_was_cut(tiny_pipe):
    long_prompt = " ".join(["red"] * 80 + ["zebra"])
    with pytest.warns(UserWarning, match="zebra"):
        prompt_embeds, _ = encode_text(tiny_pipe, long_prompt)
    assert prompt_embeds.shape[1] == 77


def test_decode_rejects_wrong_latent_channels(tiny_pipe):
    with pytest.raises(ValueError, match=r"decode needs \(batch, 4, h, w\)"):
        decode(tiny_pipe, torch.zeros(1, 3, 8, 8))


def test_stages_run_on_components_alone(tiny_pipe):
    """Each stage needs only its own part of the model (the point of partial loading)."""
    from types import SimpleNamespace

    text_part = SimpleNamespace(tokenizer=tiny_pipe.tokenizer, text_encoder=tiny_pipe.text_encoder)
    denoise_part = SimpleNamespace(unet=tiny_pipe.unet, scheduler=tiny_pipe.scheduler, vae_scale_factor=8)
    decode_part = SimpleNamespace(vae=tiny_pipe.vae)
    prompt_embeds, negative_prompt_embeds = encode_text(text_part, "a red circle")
    latents = denoise(denoise_part, prompt_embeds, negative_prompt_embeds, num_inference_steps=STEPS, seeds=[9],
                      progress=False)
    ours = decode(decode_part, latents, output_type="np")
    assert_same_pictures(ours, theirs(tiny_pipe, ["a red circle"], [9], STEPS))


def test_execution_device_reads_the_weights_unless_a_network_is_offloaded(tiny_pipe):
    """The fast path (the UNet's weights) must give way to diffusers' answer once offloading hooks are attached."""
    import copy
    from types import SimpleNamespace

    from helpers.core.limits import placement
    from helpers.core.stages import _execution_device

    assert _execution_device(tiny_pipe) == torch.device("cpu") == tiny_pipe._execution_device
    assert placement(tiny_pipe.unet) == (tiny_pipe.unet.device, tiny_pipe.unet.dtype)
    assert placement(copy.deepcopy(tiny_pipe.vae).to(torch.bfloat16))[1] == torch.bfloat16
    offloaded = copy.copy(tiny_pipe)  # shares the networks: give each a hook that says it runs elsewhere
    hooks = {name: SimpleNamespace(execution_device="meta") for name, m in tiny_pipe.components.items()
             if isinstance(m, torch.nn.Module)}
    try:
        for name, hook in hooks.items():
            getattr(tiny_pipe, name)._hf_hook = hook
        assert _execution_device(offloaded) == torch.device("meta"), "offloaded: diffusers' hooks decide"
    finally:
        for name in hooks:
            del getattr(tiny_pipe, name)._hf_hook
    assert _execution_device(tiny_pipe) == torch.device("cpu")


@pytest.mark.parametrize("guidance_scale", [float("inf"), float("nan"), -float("inf")])
def test_non_finite_guidance_is_refused_up_front(tiny_pipe, guidance_scale):
    """inf gave an all-NaN image, NaN silently ran unguided (NaN > 1.0 is False)."""
    with pytest.raises(ValueError, match="finite number"):
        generate(tiny_pipe, ["a cat"], seeds=[0], num_inference_steps=1, guidance_scale=guidance_scale)


def test_a_seed_out_of_the_generators_range_is_named(tiny_pipe):
    """2**70 failed inside torch with 'Overflow when unpacking long long'."""
    with pytest.raises(ValueError, match=r"seed 1180591620717411303424 is outside.*64-bit"):
        generate(tiny_pipe, ["a cat"], seeds=[2**70], num_inference_steps=1)
    with pytest.raises(TypeError, match="must be an integer"):
        generate(tiny_pipe, ["a cat"], seeds=[1.5], num_inference_steps=1)
    generate(tiny_pipe, ["a cat"], seeds=[2**64 - 1], num_inference_steps=1)  # the largest works


def test_img2img_that_leaves_no_step_is_refused(tiny_pipe):
    """int(1 step × strength 0.7) = 0 steps: it failed deep inside the UNet on an empty batch."""
    prompt_embeds, negative_prompt_embeds = encode_text(tiny_pipe, "a red circle")
    clean = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"leaves no step to run.*at least 2"):
        denoise(tiny_pipe, prompt_embeds, negative_prompt_embeds, num_inference_steps=1, strength=0.7,
                latents=clean, progress=False)
