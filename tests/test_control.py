"""studies.control: depth maps from files, normal maps and edges, the metadata folder, sizes and fitting; and the
toy's ControlNets (depth, normal, canny) following their maps."""

import json
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from helpers.core import pictures
from helpers.studies import control
from helpers.toy import world

METADATA_DIR = Path(__file__).resolve().parents[1] / "notebooks" / "metadata"


@pytest.fixture(scope="module")
def scene_depth():
    """A held-out two-object scene's depth map, float (64, 64) in [0, 1]."""
    _, depth = world.render(world.make_scene(8, "heldout", 2))
    return depth


def grey8(depth):
    return np.round(depth * 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("mode, report", [
    ("L", "8-bit grey"), ("I;16", "16-bit grey"), ("RGB", "RGB with grey channels"),
    ("RGBA", "opaque alpha dropped"), ("LA", "opaque alpha dropped"),
])
def test_every_storage_format_gives_the_same_depth(tmp_path, scene_depth, mode, report):
    if mode == "I;16":
        image = PIL.Image.fromarray(np.round(scene_depth * 65535).astype(np.uint16))
    else:
        g = grey8(scene_depth)
        layers = {"L": [g], "RGB": [g, g, g], "RGBA": [g, g, g, np.full_like(g, 255)], "LA": [g, np.full_like(g, 255)]}
        image = PIL.Image.fromarray(np.stack(layers[mode], -1).squeeze())
    assert image.mode == mode
    image.save(tmp_path / "map.png")
    loaded = control.load_depth_map(tmp_path / "map.png")
    assert report in loaded.report and "64×64" in loaded.report
    assert loaded.depth.dtype == np.float32 and loaded.depth.shape == (64, 64)
    tolerance = 1e-4 if mode == "I;16" else 0.5 / 255 + 1e-6
    assert np.abs(loaded.depth - scene_depth).max() <= tolerance


def test_transparency_is_composited_onto_far_and_reported(tmp_path, scene_depth):
    g = grey8(scene_depth)
    alpha = np.full_like(g, 255)
    alpha[:, :16] = 0  # the left quarter transparent
    PIL.Image.fromarray(np.stack([g, g, g, alpha], -1)).save(tmp_path / "map.png")
    loaded = control.load_depth_map(tmp_path / "map.png")
    assert "25% of pixels" in loaded.report and "far" in loaded.report
    assert (loaded.depth[:, :16] == 0).all() and np.allclose(loaded.depth[:, 16:], g[:, 16:] / 255)


def test_colour_images_and_other_modes_are_refused(tmp_path, scene_depth):
    rgb = np.stack([grey8(scene_depth)] * 3, -1)
    rgb[..., 0] = 255 - rgb[..., 0]  # a colour map, not grey
    with pytest.raises(ValueError, match="colour image.*not a grey depth map"):
        control.load_depth_map(PIL.Image.fromarray(rgb))
    with pytest.raises(ValueError, match="mode 'P'.*8- or 16-bit grey"):
        control.load_depth_map(PIL.Image.fromarray(grey8(scene_depth)).convert("P"))
    with pytest.raises(ValueError, match="mode 'CMYK'"):
        control.load_depth_map(PIL.Image.fromarray(rgb).convert("CMYK"))
    with pytest.raises(FileNotFoundError, match="nowhere.png does not exist"):
        control.load_depth_map(tmp_path / "nowhere.png")


# ------------------------------------------------------------------------------------------ derived maps


def test_normal_map_encoding():
    flat = np.full((32, 48), 0.5, np.float32)
    assert (pictures.normal_map(flat) == [128, 128, 255]).all(), "a surface facing the camera is (128, 128, 255)"
    nearer_to_the_right = np.tile(np.linspace(0, 1, 48, dtype=np.float32), (32, 1))
    normals = pictures.normal_map(nearer_to_the_right)[5:-5, 5:-5].astype(int)
    assert (normals[..., 0] < 128).all() and (abs(normals[..., 1] - 128) <= 1).all(), "it faces left: R < 128"
    nearer_at_the_top = np.tile(np.linspace(1, 0, 32, dtype=np.float32)[:, None], (1, 48))
    assert (pictures.normal_map(nearer_at_the_top)[5:-5, 5:-5, 1] < 128).all(), "it faces down: G < 128 (y up)"
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pictures.normal_map(flat * 3)
    with pytest.raises(ValueError, match="height, width"):
        pictures.normal_map(np.zeros((4, 4, 3)))


def test_the_toy_trains_on_the_maps_notebook_06_derives(scene_depth):
    """One normal map and one Canny implementation: the toy's ControlNets learnt the maps control_images gives."""
    from helpers.toy.training import control_condition

    for kind in ("normal", "canny"):
        trained = control_condition(torch.from_numpy(scene_depth[None]), kind)[0].permute(1, 2, 0).numpy()
        derived = np.asarray(control.control_images(scene_depth, 64, 64, [kind])[kind], np.float32) / 255.0
        assert np.array_equal(trained, derived), kind


def test_normal_map_does_not_depend_on_resolution():
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))
    ramp_2x = np.tile(np.linspace(0, 1, 128, dtype=np.float32), (128, 1))
    small, large = pictures.normal_map(ramp)[32, 32].astype(int), pictures.normal_map(ramp_2x)[64, 64].astype(int)
    assert np.abs(small - large).max() <= 2, "the same slope gives the same normal at twice the resolution"


def test_canny_outlines_the_objects_only(scene_depth):
    edges = pictures.canny_edges(grey8(scene_depth))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    mask = world.depth_object_mask(scene_depth)
    import cv2

    rim = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) - cv2.erode(mask.astype(np.uint8),
                                                                                   np.ones((3, 3), np.uint8))
    on_edge = edges[..., 0] > 0
    assert on_edge.sum() > 40 and (on_edge <= rim.astype(bool)).all(), "every edge lies on an object's rim"
    rgb = world.render(world.make_scene(8, "heldout", 2))[0]
    assert pictures.canny_edges(rgb).shape == (64, 64, 3)
    with pytest.raises(ValueError, match="RGB or an"):
        pictures.canny_edges(np.zeros((8, 8, 4), np.uint8))


# ------------------------------------------------------------------------------------------- metadata


def test_the_shipped_metadata_loads():
    entries = control.read_metadata(METADATA_DIR)
    assert len(entries) >= 5
    for entry in entries:
        depth = entry.load_depth()
        assert depth.depth.min() >= 0 and depth.depth.max() <= 1 and depth.depth.max() > world.OBJECT_DEPTH_THRESHOLD
        assert entry.width / entry.height == pytest.approx(depth.size[0] / depth.size[1])
    nocrop = next(e for e in entries if e.depth_path.name == "2_nocrop.png")
    assert nocrop.depth_path.parent.name == "No crop"
    assert nocrop.width / nocrop.height >= 1.5, "the no-crop map is 3:2 or wider"
    reports = {e.load_depth().report.split(",")[0].split(";")[0] for e in entries}
    assert {"8-bit grey", "16-bit grey", "RGB with grey channels", "RGBA with grey channels"} <= reports


def write_metadata(folder: Path, *lines) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text("".join(line + "\n" for line in lines))
    return folder


def test_bad_metadata_is_refused_with_the_line(tmp_path):
    good = {"prompt": "a red circle", "depth": "map.png", "width": 512, "height": 512}
    shutil.copy(METADATA_DIR / "maps" / "1_grey8.png", tmp_path / "map.png")
    assert control.read_metadata(write_metadata(tmp_path, json.dumps(good)))[0].name == "map"
    cases = [
        ({**good, "depth": "missing.png"}, FileNotFoundError, "line 2: depth map 'missing.png' not found"),
        ({k: v for k, v in good.items() if k != "width"}, ValueError, r"line 2 lacks \['width'\]"),
        ({**good, "colour": "red"}, ValueError, r"line 2 has unknown keys \['colour'\]"),
        ({**good, "width": "512"}, ValueError, "line 2: width='512' must be a int"),
        ({**good, "height": 0}, ValueError, "line 2: width and height must be positive"),
    ]
    for record, error, message in cases:
        with pytest.raises(error, match=message):
            control.read_metadata(write_metadata(tmp_path, json.dumps(good), json.dumps(record)))
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        control.read_metadata(write_metadata(tmp_path, "{prompt: 1}"))
    with pytest.raises(FileNotFoundError, match="no metadata.jsonl"):
        control.read_metadata(tmp_path / "empty")



def test_a_relative_metadata_dir_is_found_from_outside_the_repo(tmp_path, monkeypatch):
    """Colab's kernel runs in /content, not in the clone's notebooks/ as papermill does: notebook 06's
    METADATA_DIR = "metadata" must still find the project's folder, and say which one it used."""
    monkeypatch.chdir(tmp_path)
    assert control.find_metadata_dir("metadata") == METADATA_DIR
    entries = control.read_metadata("metadata")
    assert entries[0].depth_path.is_file() and entries[0].depth_path.is_relative_to(METADATA_DIR)
    own = write_metadata(tmp_path / "metadata", json.dumps({"prompt": "mine", "depth": "map.png", "width": 512,
                                                              "height": 512}))
    shutil.copy(METADATA_DIR / "maps" / "1_grey8.png", own / "map.png")
    assert control.find_metadata_dir("metadata") == own.resolve(), "the working directory's folder comes first"
    assert control.read_metadata("metadata")[0].prompt == "mine"
    with pytest.raises(FileNotFoundError) as error:
        control.find_metadata_dir("nowhere")
    for place in (tmp_path / "nowhere", METADATA_DIR.parent / "nowhere"):
        assert str(place / "metadata.jsonl") in str(error.value), "the error names every place looked"


def test_with_prompts_replaces_entry_prompts_by_name():
    entries = control.read_metadata(METADATA_DIR)
    first = entries[0].name
    replaced = control.with_prompts(entries, {first: "a photograph of an orange on a table"})
    assert replaced[0].prompt == "a photograph of an orange on a table"
    assert [e.prompt for e in replaced[1:]] == [e.prompt for e in entries[1:]]
    assert entries[0].prompt != replaced[0].prompt, "the entries given are left as they were"
    with pytest.raises(ValueError, match=r"prompts for \['nope'\], which are not entries"):
        control.with_prompts(entries, {"nope": "x"})


# -------------------------------------------------------------------------------------- sizes and fitting


def test_snap_size_says_when_it_changed_a_size():
    same = control.snap_size(512, 768, 8)
    assert (same.height, same.width, same.changed, same.note) == (512, 768, False, "")
    snapped = control.snap_size(418.0, 627.0, 8)
    assert (snapped.height, snapped.width) == (416, 624) and snapped.changed
    assert "not a multiple of the VAE factor 8" in snapped.note and "416×624" in snapped.note
    assert control.snap_size(1, 3, 4).height == 4, "never below one latent"


@pytest.mark.parametrize("aspect", ["1:1", "3:2", "2:3", "16:9", "9:16", "2:1"])
@pytest.mark.parametrize("keep", ["short_side", "area"])
def test_size_for_aspect(aspect, keep):
    for base, factor in ((64, 4), (512, 8)):
        size = control.size_for_aspect(aspect, base, factor, keep=keep)
        assert size.height % factor == 0 and size.width % factor == 0
        assert size.width / size.height == pytest.approx(control.parse_aspect(aspect), rel=0.08)
        if keep == "short_side":
            assert min(size.height, size.width) == base
    with pytest.raises(ValueError, match="'W:H'"):
        control.size_for_aspect("wide", 64, 4)


@pytest.mark.parametrize("strategy", control.FIT_STRATEGIES)
@pytest.mark.parametrize("size", [(64, 64), (64, 96), (96, 64), (64, 112), (112, 64)])
def test_fit_control_image_gives_the_target_size(strategy, size):
    nocrop = control.load_depth_map(METADATA_DIR / "No crop" / "2_nocrop.png")
    height, width = size
    fitted = control.fit_control_image(nocrop, height, width, strategy)
    assert fitted.size == (width, height) and fitted.mode == "RGB"


def test_fit_strategies_keep_what_they_promise():
    nocrop = control.load_depth_map(METADATA_DIR / "No crop" / "2_nocrop.png")  # 128 × 64
    image = nocrop.control_image()
    cropped = np.asarray(control.fit_control_image(image, 64, 64, "crop"))
    assert (cropped == np.asarray(image)[:, 32:96]).all(), "a centre crop at scale 1 is the middle of the map"
    padded = np.asarray(control.fit_control_image(image, 64, 64, "pad"))
    assert (padded[16:48] == np.asarray(image.resize((64, 32), PIL.Image.BILINEAR))).all()
    assert (padded[:16] == padded[16]).all(), "padding repeats the edge row"
    objects = world.depth_object_mask(nocrop.depth).sum()
    assert world.depth_object_mask(padded[..., 0] / 255).sum() == pytest.approx(objects / 4, rel=0.15), "all kept"
    stretched = control.fit_control_image(image, 64, 64, "resize")
    assert (np.asarray(stretched) == np.asarray(image.resize((64, 64), PIL.Image.BILINEAR))).all()
    with pytest.raises(ValueError, match="strategy='zoom'"):
        control.fit_control_image(image, 64, 64, "zoom")


def test_check_control_images_refuses_or_resizes():
    square, wide = PIL.Image.new("RGB", (64, 64)), PIL.Image.new("RGB", (96, 64))
    images, notes = control.check_control_images([square, PIL.Image.new("L", (64, 64))], 64, 64, 4)
    assert [im.mode for im in images] == ["RGB", "RGB"] and notes == []
    with pytest.raises(ValueError, match=r"image\[1\] is 96×64 \(W×H\) but the target is 64×64"):
        control.check_control_images([square, wide], 64, 64, 4)
    images, notes = control.check_control_images([square, wide], 64, 64, 4, resize=True)
    assert all(im.size == (64, 64) for im in images) and notes == ["image[1]: 96×64 stretched to 64×64"]
    with pytest.raises(ValueError, match="mode 'RGBA'"):
        control.check_control_images(PIL.Image.new("RGBA", (64, 64)), 64, 64, 4)
    with pytest.raises(ValueError, match="width=67 is not a positive multiple of the VAE factor 4; try height=64, "
                                         "width=68"):
        control.check_control_images(square, 64, 67, 4)


# ------------------------------------------------------------------------------------ the toy ControlNets

IOU_FLOORS = {"depth": 0.7, "normal": 0.7, "canny": 0.7}  # bench toy measures them on 100 maps: >= 0.8


@pytest.mark.parametrize("kind", list(IOU_FLOORS))
def test_toy_controlnets_follow_their_maps(kind):
    import torch
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from helpers.toy import TOY_SD_DIR, WEIGHTS_DIR, control_adherence, sample_scenes

    folder = WEIGHTS_DIR / f"controlnet-{kind}"
    assert (folder / "config.json").exists(), f"missing {folder}: `python -m helpers.toy.train --stage ...`"
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        TOY_SD_DIR, controlnet=ControlNetModel.from_pretrained(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    sample = sample_scenes(8, seed=100, split="heldout", max_objects=2)
    derive = {"depth": lambda d: np.repeat(grey8(d)[..., None], 3, -1),
              "normal": lambda d: pictures.normal_map(grey8(d)),
              "canny": lambda d: pictures.canny_edges(grey8(d))}[kind]
    images = pipe(sample.prompts, image=[PIL.Image.fromarray(derive(d)) for d in sample.depth_maps],
                  num_inference_steps=10, generator=[torch.Generator().manual_seed(i) for i in range(8)],
                  output_type="np").images
    iou = control_adherence(np.round(images * 255).astype(np.uint8), sample.depth_maps)
    assert iou >= IOU_FLOORS[kind], f"the {kind} ControlNet's mask IoU is {iou:.3f}"


@pytest.mark.parametrize("aspect", ["1:1", "3:2", "2:3", "16:9", "9:16"])
def test_generation_has_the_requested_size_at_every_aspect(toy_depth_pipe, aspect):
    from helpers.core.stages import default_size, generate

    pipe = toy_depth_pipe
    size = control.size_for_aspect(aspect, default_size(pipe)[0], pipe.vae_scale_factor)
    nocrop = control.load_depth_map(METADATA_DIR / "No crop" / "2_nocrop.png")
    image = control.control_images(nocrop, size.height, size.width, ["depth"], "pad")["depth"]
    checked, _ = control.check_control_images(image, size.height, size.width, pipe.vae_scale_factor)
    result = generate(pipe, ["a red circle"], seeds=[0], num_inference_steps=1, height=size.height, width=size.width,
                      image=checked[0], output_type="np", progress=False)
    assert result.images.shape == (1, size.height, size.width, 3)


def test_generate_says_when_it_stretches_a_control_image(toy_depth_pipe):
    import warnings

    from helpers.core.stages import generate

    wide = PIL.Image.new("RGB", (128, 64))
    with pytest.warns(UserWarning, match=r"image: a control image of 128×64 \(W×H\) is stretched to the target 64×64"):
        result = generate(toy_depth_pipe, ["a red circle"], seeds=[0], num_inference_steps=1, image=wide,
                          output_type="np", progress=False)
    assert result.images.shape == (1, 64, 64, 3)
    with pytest.warns(UserWarning, match=r"of 128×64 \(W×H\) is stretched"):  # an HWC array in [0, 1] too
        generate(toy_depth_pipe, ["a red circle"], seeds=[0], num_inference_steps=1, image=np.zeros((64, 128, 3)),
                 output_type="np", progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*stretched")  # the target size is used as it is: no warning
        generate(toy_depth_pipe, ["a red circle"], seeds=[0], num_inference_steps=1,
                 image=PIL.Image.new("RGB", (64, 64)), output_type="np", progress=False)
