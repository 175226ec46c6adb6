"""One generation path: denoise's ControlNet path and guidance cut-off against diffusers, on the toy model, and the
checks that refuse bad input before any work."""

import numpy as np
import pytest
import reference
import torch
from diffusers import StableDiffusionControlNetPipeline
from diffusers.callbacks import SDCFGCutoffCallback
from diffusers.models.controlnets import MultiControlNetModel
from reference import assert_different_pictures, assert_same_pictures

from helpers.core import limits
from helpers.core.models import load_controlnet, load_pipeline
from helpers.core.stages import generate
from helpers.toy import sample_scenes

STEPS = 4


@pytest.fixture(scope="module")
def scenes():
    return sample_scenes(2, seed=7, split="heldout", max_objects=2)


def ours(pipe, prompts, seeds, **kwargs) -> np.ndarray:
    return reference.ours(pipe, prompts, seeds, STEPS, **kwargs)


def theirs(pipe, prompts, seeds, **kwargs) -> np.ndarray:
    return reference.theirs(pipe, prompts, seeds, STEPS, **kwargs)


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
@pytest.mark.parametrize("guess_mode", [False, True])
def test_one_controlnet_equals_the_pipeline(toy_depth_pipe, scenes, guidance_scale, guess_mode):
    kwargs = dict(image=scenes.control_images(), guidance_scale=guidance_scale, controlnet_conditioning_scale=0.8,
                  control_guidance_end=0.75, guess_mode=guess_mode)
    a = ours(toy_depth_pipe, scenes.prompts, [3, 4], **kwargs)
    b = theirs(toy_depth_pipe, scenes.prompts, [3, 4], **kwargs)
    assert_same_pictures(a, b)
    # not trivially equal: the ControlNet changes the picture
    no_control = ours(toy_depth_pipe, scenes.prompts, [3, 4], **{**kwargs, "controlnet_conditioning_scale": 0.0})
    assert_different_pictures(a, no_control, at_least=0.1)


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_two_controlnets_equal_the_pipeline(toy_depth_pipe, scenes, guidance_scale):
    depth = toy_depth_pipe.controlnet
    pipe = StableDiffusionControlNetPipeline(**{**toy_depth_pipe.components, "controlnet": [depth, depth]})
    pipe.set_progress_bar_config(disable=True)
    images = scenes.control_images()
    kwargs = dict(image=[images, images[::-1]], guidance_scale=guidance_scale,
                  controlnet_conditioning_scale=[0.6, 0.9], control_guidance_start=[0.0, 0.25])
    a = ours(pipe, scenes.prompts, [5, 6], **kwargs)
    assert_same_pictures(a, theirs(pipe, scenes.prompts, [5, 6], **kwargs))
    # the second net matters: switching it off changes the picture
    off = ours(pipe, scenes.prompts, [5, 6], **{**kwargs, "controlnet_conditioning_scale": [0.6, 0.0]})
    assert_different_pictures(a, off, at_least=0.05)


def test_a_controlnet_batch_equals_its_single_calls(toy_depth_pipe, scenes):
    images = scenes.control_images()
    batch = ours(toy_depth_pipe, scenes.prompts, [8, 9], image=images, cfg_cutoff=0.5)
    for i in range(2):
        alone = ours(toy_depth_pipe, scenes.prompts[i:i + 1], [8 + i], image=images[i], cfg_cutoff=0.5)
        assert_same_pictures(batch[i:i + 1], alone)


def test_cfg_cutoff_equals_diffusers_callback_and_works_on_batches(toy_pipe):
    pipe = toy_pipe
    prompt = ["a large blue square on the left"]
    cut = ours(pipe, prompt, [2], cfg_cutoff=0.4)
    callback = theirs(pipe, prompt, [2], callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.4))
    assert_same_pictures(cut, callback)
    assert_same_pictures(ours(pipe, prompt, [2], cfg_cutoff=1.0), ours(pipe, prompt, [2]), atol=0)  # every step
    assert_different_pictures(cut, ours(pipe, prompt, [2]), at_least=0.05)
    batch = ours(pipe, [*prompt, "a red circle"], [2, 3], cfg_cutoff=0.4)  # diffusers' callback fails on two
    assert_same_pictures(batch[:1], cut)


def test_toy_controlnets_load_by_name():
    pipe = load_pipeline("toy", controlnet=["depth", "depth"])
    assert isinstance(pipe.controlnet, MultiControlNetModel) and len(pipe.controlnet.nets) == 2
    with pytest.raises(ValueError, match="controlnet='depht' is unknown"):
        load_controlnet("toy", "depht", torch.float32)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"controlnet_conditioning_scale": [0.5]}, ValueError, r"controlnet_conditioning_scale .* one entry per "
                                                               r"ControlNet \(2\), got 1"),
        ({"control_guidance_start": [0.0, 0.1, 0.2]}, ValueError, r"control_guidance_start .* \(2\), got 3"),
        ({"control_guidance_start": 0.8, "control_guidance_end": 0.5}, ValueError, "0 <= start < end <= 1"),
        ({"image": None}, ValueError, "needs image="),
        ({"image": "depth.png"}, ValueError, r"image must be a list with one entry per ControlNet \(2\)"),
    ],
)
def test_bad_controlnet_arguments_are_refused(toy_depth_pipe, scenes, kwargs, error, message):
    depth = toy_depth_pipe.controlnet
    images = scenes.control_images()
    arguments = {"controlnet": [depth, depth], "image": [images, images], **kwargs}
    with pytest.raises(error, match=message):
        ours(toy_depth_pipe, scenes.prompts, [0, 1], **arguments)


def test_control_images_must_match_the_prompts(toy_depth_pipe, toy_pipe, scenes):
    images = scenes.control_images()
    with pytest.raises(ValueError, match="image has 3 control images but there are 2 prompts"):
        ours(toy_depth_pipe, scenes.prompts, [0, 1], image=[*images, images[0]])
    with pytest.raises(ValueError, match="there is no controlnet"):
        ours(toy_pipe, scenes.prompts, [0, 1], image=images)


def test_attention_slicing_works_on_the_one_head_toy(toy_pipe):
    sliced = load_pipeline("toy", attention_slicing=True)  # diffusers' "auto" would divide by zero here
    assert_same_pictures(ours(sliced, ["a red circle"], [1]), ours(toy_pipe, ["a red circle"], [1]))


def test_prompts_of_the_wrong_type_name_the_argument(toy_pipe):
    pipe = toy_pipe
    with pytest.raises(TypeError, match="prompts must be a string or a list of strings, got NoneType"):
        generate(pipe, None)
    with pytest.raises(TypeError, match="negative_prompts must be a string or a list of strings, got int"):
        generate(pipe, ["a red circle"], 3)


def test_absurd_sizes_are_refused_before_any_work(toy_pipe):
    pipe = toy_pipe
    with pytest.raises(ValueError, match=r"64×100000 is 1562× the pixels this UNet was trained on \(64×64\)"):
        generate(pipe, ["a red circle"], width=100000)


def test_a_size_that_cannot_fit_in_memory_is_refused_with_what_would(toy_pipe, monkeypatch):
    pipe = toy_pipe
    monkeypatch.setattr(limits, "available_bytes", lambda device: 64 * 2**20)  # pretend 64 MiB are free
    with pytest.raises(MemoryError) as refused:
        generate(pipe, ["a red circle"] * 4, height=512, width=512)
    message = str(refused.value)
    assert "512×512 at batch 4" in message and "GiB" in message and "What would fit: about" in message
    side = int(message.split("about ")[-1].split("×")[0])
    assert side % 8 == 0 and 64 <= side < 512
    generate(pipe, ["a red circle"], height=side, width=side, num_inference_steps=1)  # what it offers does fit
