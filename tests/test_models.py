"""Loaders, devices, the project's tokenizer and the random test models."""

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from helpers.core import random_models as testing
from helpers.core.models import default_dtype, load_component, load_pipeline, make_scheduler, pick_device
from helpers.core.tokenizer import build_clip_tokenizer


def test_tokenizer_reads_words_whole_and_pads_like_sd():
    tokenizer = build_clip_tokenizer(["circle", "triangle", "red"])
    ids = tokenizer("A RED Triangle", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 77
    assert tokenizer.convert_ids_to_tokens(ids[:5]) == ["<|startoftext|>", "a</w>", "red</w>", "triangle</w>",
                                                         "<|endoftext|>"]
    assert ids[5:] == [tokenizer.pad_token_id] * 72 and tokenizer.pad_token_id == tokenizer.eos_token_id
    # words outside the vocabulary still tokenize, byte by byte
    assert tokenizer.decode(tokenizer("zebra").input_ids, skip_special_tokens=True) == "zebra"


def test_tokenizer_round_trips_through_save_pretrained(tmp_path):
    tokenizer = build_clip_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a photo of an astronaut riding a horse"
    assert loaded(text).input_ids == tokenizer(text).input_ids


def test_sd15_shapes_are_the_real_ones():
    assert testing.count_parameters(testing.sd15_unet_on_meta()) == testing.SD15_UNET_PARAMS == 859_520_964
    with torch.device("meta"):
        text_encoder = CLIPTextModel(CLIPTextConfig(**testing.SD15_TEXT_ENCODER_CONFIG))
        from diffusers import AutoencoderKL

        vae = AutoencoderKL(**testing.SD15_VAE_CONFIG)
    assert testing.count_parameters(text_encoder) == 123_060_480  # CLIP ViT-L/14 text tower
    assert testing.count_parameters(vae) == 83_653_863


def test_tiny_random_pipeline_is_small_and_seeded():
    first, second = testing.tiny_random_pipeline(0), testing.tiny_random_pipeline(0)
    other = testing.tiny_random_pipeline(1)
    assert testing.count_parameters(first.unet) < 2_000_000
    assert first.vae_scale_factor == 8 and first.unet.config.sample_size == 8
    weight = "conv_in.weight"
    assert torch.equal(first.unet.state_dict()[weight], second.unet.state_dict()[weight])
    assert not torch.equal(first.unet.state_dict()[weight], other.unet.state_dict()[weight])


def test_device_and_dtype_defaults():
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device().type in ("cpu", "mps")
    assert default_dtype(torch.device("cuda")) == torch.float16
    assert default_dtype(torch.device("cpu")) == torch.float32


def test_load_pipeline_and_component_from_a_local_folder(tmp_path, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path)
    pipe = load_pipeline(str(tmp_path), device="cpu", scheduler="euler")
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    unet = load_component(str(tmp_path), "unet", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), tiny_pipe.unet.state_dict().values()))
    assert type(load_component(str(tmp_path), "scheduler")).__name__ == "PNDMScheduler"
    assert load_component(str(tmp_path), "tokenizer")("a red circle").input_ids == tiny_pipe.tokenizer(
        "a red circle").input_ids


def test_schedulers_keep_the_models_noise_schedule():
    from diffusers import DDIMScheduler

    from helpers.toy.training import SD_DDIM_CONFIG

    toy = DDIMScheduler(**SD_DDIM_CONFIG)  # zero terminal SNR, v-prediction: the toy model's
    default = make_scheduler("default", toy)
    assert type(default) is DDIMScheduler and default is not toy
    euler = make_scheduler("euler", toy)
    assert euler.config.rescale_betas_zero_snr and euler.config.prediction_type == "v_prediction"
    for name in ("pndm", "lms"):  # they do not implement the zero-SNR schedule: from_config would drop it
        with pytest.raises(ValueError, match="zero-terminal-SNR.*Choose one of"):
            make_scheduler(name, toy)
    with pytest.raises(ValueError, match="unknown; choose one of"):
        make_scheduler("heun", toy)


@pytest.mark.parametrize(
    "model, error, message",
    [
        ("no/such/thing", FileNotFoundError, "neither 'toy'"),
        ("./missing-folder", FileNotFoundError, "neither 'toy'"),
        (__file__, ValueError, "not a .safetensors or .ckpt"),
    ],
)
def test_bad_model_names_are_clear_errors(model, error, message):
    with pytest.raises(error, match=message):
        load_pipeline(model, device="cpu")


def test_folder_without_model_index_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="without model_index.json"):
        load_pipeline(str(tmp_path), device="cpu")


def test_unknown_scheduler_and_component_names():
    with pytest.raises(ValueError, match="scheduler='nope' is unknown"):
        make_scheduler("nope", DDPMScheduler())
    with pytest.raises(ValueError, match="component='clip' is unknown"):
        load_component("tiny-random", "clip")


def test_cpu_offload_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error is for machines without it")
    with pytest.raises(ValueError, match="cpu_offload=True needs a CUDA device"):
        load_pipeline("tiny-random", device="cpu", cpu_offload=True)


def test_hub_ids_stay_offline_here():
    """With HF_HUB_OFFLINE=1 a hub id fails fast instead of trying the network."""
    from helpers.core.models import ModelNotAvailableError

    with pytest.raises(ModelNotAvailableError, match="HF_HUB_OFFLINE=1 is set and it is not in the local cache"):
        load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cpu")
    with pytest.raises(ModelNotAvailableError, match="'lllyasviel/control_v11f1p_sd15_depth' is a hub model"):
        load_pipeline("tiny-random", device="cpu", controlnet="depth")  # not the toy: SD 1.5's net from the hub


def test_generation_panel_generates_from_its_widgets(tiny_pipe):
    """The widgets' values (prompt, seed, steps, scheduler) are what the click generates with."""
    import numpy as np

    from helpers.core.stages import make_generators
    from helpers.serving.ui import GenerationPanel

    panel = GenerationPanel(tiny_pipe, prompt="a red circle", steps=2, scheduler="ddim")
    panel.seed.value, panel.prompt.value, panel.steps.value = 7, "a blue square", 3
    panel.button.click()
    assert panel.last_result is not None and panel.last_result.images[0].size == (64, 64)
    tiny_pipe.scheduler = make_scheduler("ddim", tiny_pipe.scheduler)
    expected = tiny_pipe(["a blue square"], num_inference_steps=3, generator=make_generators([7])).images[0]
    assert np.array_equal(np.asarray(panel.last_result.images[0]), np.asarray(expected))
    panel.height.value = 50  # not a multiple of 8: the panel reports it and keeps the last image
    panel.button.click()
    assert panel.last_result.images[0].size == (64, 64)


def test_attribute_accuracy_counts_each_stated_attribute():
    from helpers.toy.oracle import Reading, attribute_accuracy, parse_prompt

    readings = [Reading((("circle", "red", "large", "right"),), "white"),
                Reading((("square", "red", "small", "left"),), "black")]
    accuracy = attribute_accuracy(readings, [parse_prompt("a large red circle on the left on a white background")] * 2)
    assert accuracy == {"object count": 1.0, "background": 0.5, "shape": 0.5, "colour": 1.0, "size": 0.5,
                        "position": 0.5}
    with pytest.raises(ValueError, match="2 readings but 1 prompt specs"):
        attribute_accuracy(readings, [parse_prompt("a red circle")])


def test_the_loader_gives_diffusers_own_pipeline_classes(toy_pipe, toy_depth_pipe):
    """Users meet the classes they know from diffusers' docs, not a subclass of ours: exactly those types."""
    assert type(toy_pipe) is StableDiffusionPipeline
    assert type(load_pipeline("tiny-random")) is StableDiffusionPipeline
    assert type(toy_depth_pipe) is StableDiffusionControlNetPipeline
