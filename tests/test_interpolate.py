"""studies.interpolate: lerp and slerp against independent formulas written here with numpy, one vector at a time;
the pieces notebooks 04 and 05 are built from (the noise they interpolate, the morph's endpoints, colour purity)."""

import math

import numpy as np
import pytest
import torch

from helpers.core.stages import default_size, denoise, encode_text
from helpers.studies.interpolate import (
    MIDPOINT_METHODS,
    PARALLEL_THRESHOLD,
    colour_purity,
    colour_tolerance,
    expected_lerp_norm_ratio,
    interpolate,
    interpolation_alphas,
    lerp,
    morph_midpoints,
    noise_latents,
    norm_curve,
    slerp,
)
from helpers.toy import world
from helpers.toy.oracle import Reading


def reference_slerp(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Shoemake's formula in float64 for one flattened pair of vectors, with math.acos/math.sin on Python floats."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    theta = math.acos(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1))
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def gaussian(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("function", [lerp, slerp])
def test_exact_at_the_ends(function):
    v0, v1 = gaussian(2, 4, 8, 8, seed=1), gaussian(2, 4, 8, 8, seed=2)
    assert torch.equal(function(0.0, v0, v1), v0)
    assert torch.equal(function(1.0, v0, v1), v1)
    ends = function([0.0, 1.0], v0, v1)  # a vector of t: a leading axis
    assert ends.shape == (2, 2, 4, 8, 8) and torch.equal(ends[0], v0) and torch.equal(ends[1], v1)


def test_slerp_matches_the_reference_formula_per_sample():
    v0, v1 = gaussian(3, 4, 8, 8, seed=3), gaussian(3, 4, 8, 8, seed=4)
    for t in (0.1, 0.25, 0.5, 0.9):
        ours = slerp(t, v0, v1)
        for i in range(3):  # each sample its own angle: never one angle for the whole batch
            expected = reference_slerp(t, v0[i].numpy(), v1[i].numpy()).reshape(v0[i].shape)
            np.testing.assert_allclose(ours[i].numpy(), expected, rtol=1e-4, atol=1e-5)


def test_lerp_matches_the_reference_formula():
    v0, v1 = gaussian(2, 3, 5, seed=5), gaussian(2, 3, 5, seed=6)
    for t in (0.2, 0.5, 0.7):
        expected = (1 - t) * v0.double().numpy() + t * v1.double().numpy()
        np.testing.assert_allclose(lerp(t, v0, v1).numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("function", [lerp, slerp])
def test_symmetric(function):
    v0, v1 = gaussian(2, 16, seed=7), gaussian(2, 16, seed=8)
    for t in (0.1, 0.3, 0.5):
        torch.testing.assert_close(function(t, v0, v1), function(1 - t, v1, v0), rtol=1e-5, atol=1e-6)


def test_slerp_keeps_the_norm_of_equal_norm_inputs_and_lerp_does_not():
    v0, v1 = gaussian(4, 4, 16, 16, seed=9), gaussian(4, 4, 16, 16, seed=10)
    v1 = v1 * (v0.flatten(1).norm(dim=1) / v1.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)  # equal norms per sample
    alphas = interpolation_alphas(8)
    norms = slerp(alphas, v0, v1).flatten(2).norm(dim=2)  # (K, batch)
    torch.testing.assert_close(norms, v0.flatten(1).norm(dim=1).expand_as(norms), rtol=1e-5, atol=1e-5)
    midpoint_ratio = lerp(0.5, v0, v1).flatten(1).norm(dim=1) / v0.flatten(1).norm(dim=1)
    # 1024-dim independent Gaussians are nearly orthogonal: the chord's midpoint is at about 1/sqrt(2)
    assert torch.allclose(midpoint_ratio, torch.full_like(midpoint_ratio, 2**-0.5), atol=0.03), midpoint_ratio


def test_norm_curve_of_lerped_noise_follows_the_expected_dip():
    v0, v1 = gaussian(16, 4, 16, 16, seed=11), gaussian(16, 4, 16, 16, seed=12)
    alphas = interpolation_alphas(4)
    curve = norm_curve(interpolate(v0, v1, 4, "lerp"))
    expected = [expected_lerp_norm_ratio(a) for a in alphas]
    np.testing.assert_allclose(curve["norm_ratio"], expected, atol=0.02)
    assert expected[2] == pytest.approx(2**-0.5)
    np.testing.assert_allclose(norm_curve(interpolate(v0, v1, 4, "slerp"))["norm_ratio"], 1.0, atol=0.02)


def test_parallel_vectors_fall_back_to_lerp():
    v0 = gaussian(2, 64, seed=13)
    v1 = 2.0 * v0  # same direction: θ = 0, slerp's 0 / 0
    for t in (0.25, 0.5):
        out = slerp(t, v0, v1)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, lerp(t, v0, v1))
    # just above the threshold: lerp; and the two agree to ~(1 - threshold) there anyway
    noise = gaussian(2, 64, seed=14)
    nearly = v0 + 1e-3 * noise
    cos = torch.nn.functional.cosine_similarity(v0, nearly, dim=1)
    assert (cos > PARALLEL_THRESHOLD).all()
    torch.testing.assert_close(slerp(0.5, v0, nearly), lerp(0.5, v0, nearly))
    # a batch where only one sample is parallel: the other still gets the true slerp
    mixed = torch.stack([2.0 * v0[0], gaussian(64, seed=15)])
    out = slerp(0.5, v0, mixed)
    torch.testing.assert_close(out[0], lerp(0.5, v0[0], mixed[0]))
    expected = reference_slerp(0.5, v0[1].numpy(), mixed[1].numpy())
    np.testing.assert_allclose(out[1].numpy(), expected, rtol=1e-4, atol=1e-5)


def test_batched_shapes_and_vector_t():
    for shape in [(7,), (3, 7), (2, 4, 8, 8), (2, 77, 32)]:
        v0, v1 = gaussian(*shape, seed=16), gaussian(*shape, seed=17)
        assert slerp(0.3, v0, v1).shape == shape and lerp(0.3, v0, v1).shape == shape
        assert slerp([0.0, 0.5, 1.0], v0, v1).shape == (3, *shape)
        assert lerp(torch.tensor([0.0, 0.5, 1.0]), v0, v1).shape == (3, *shape)
        stacked = slerp([0.2, 0.6], v0, v1)
        torch.testing.assert_close(stacked[1], slerp(0.6, v0, v1))  # each row of a vector t = that scalar t
    single = slerp(0.4, gaussian(7, seed=18), gaussian(7, seed=19))
    np.testing.assert_allclose(single.numpy(), reference_slerp(0.4, gaussian(7, seed=18).numpy(),
                                                               gaussian(7, seed=19).numpy()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("function", [lerp, slerp])
def test_keeps_dtype_and_device(function, dtype):
    v0, v1 = gaussian(2, 4, 4, 4, seed=20, dtype=dtype), gaussian(2, 4, 4, 4, seed=21, dtype=dtype)
    out = function(0.5, v0, v1)
    assert out.dtype == dtype and out.device == v0.device
    a, b = v0[0].double().numpy(), v1[0].double().numpy()
    expected = reference_slerp(0.5, a, b).reshape(a.shape) if function is slerp else (a + b) / 2
    tolerance = 1e-10 if dtype == torch.float64 else 2e-2  # half precision: one rounding of the result
    np.testing.assert_allclose(out[0].double().numpy(), expected, atol=tolerance)


@pytest.mark.parametrize("function", [lerp, slerp])
@pytest.mark.parametrize("bad_t", [-0.1, 1.5, float("nan"), [0.5, 2.0], [[0.5]], []])
def test_bad_t_is_a_clear_error(function, bad_t):
    v0, v1 = gaussian(2, 8, seed=22), gaussian(2, 8, seed=23)
    with pytest.raises(ValueError, match="t"):
        function(bad_t, v0, v1)


@pytest.mark.parametrize("function", [lerp, slerp])
def test_bad_endpoints_are_clear_errors(function):
    v0 = gaussian(2, 8, seed=24)
    with pytest.raises(ValueError, match=r"shape \(2, 8\).*\(2, 9\)"):
        function(0.5, v0, gaussian(2, 9, seed=25))
    with pytest.raises(ValueError, match="float16"):
        function(0.5, v0, v0.half())
    with pytest.raises(ValueError, match="floating-point"):
        function(0.5, torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="torch tensors"):
        function(0.5, v0.numpy(), v0)


def test_interpolation_alphas_and_sequences():
    assert interpolation_alphas(2) == [0.0, 0.5, 1.0]
    assert interpolation_alphas(1) == [0.0, 1.0]
    assert interpolation_alphas(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    for bad in (0, -3, 2.5, True, "4"):
        with pytest.raises(ValueError, match="NUM_DIVISIONS"):
            interpolation_alphas(bad)
    v0, v1 = gaussian(1, 4, 8, 8, seed=26), gaussian(1, 4, 8, 8, seed=27)
    sequence = interpolate(v0, v1, 4, "slerp")
    assert len(sequence) == 5 and all(x.shape == v0.shape for x in sequence)
    assert torch.equal(sequence[0], v0) and torch.equal(sequence[-1], v1)
    torch.testing.assert_close(sequence[2], slerp(0.5, v0, v1))
    with pytest.raises(ValueError, match="method"):
        interpolate(v0, v1, 4, "cubic")


def test_midpoint_contrast_needs_no_oracle(tiny_pipe):
    """Notebook 05 on SD 1.5: the midpoints and their contrast ratios, from pixels alone (the oracle is the toy's)."""
    from helpers.core.stages import default_size
    from helpers.studies.interpolate import MIDPOINT_METHODS, contrast_ratios, midpoint_images

    height, width = default_size(tiny_pipe)
    images = midpoint_images(tiny_pipe, [["a photograph of a horse", "a watercolor of a fox"]], [0, 1],
                             num_inference_steps=2, height=height, width=width)
    assert set(images) == {"A", "B", *MIDPOINT_METHODS} and all(len(v) == 2 for v in images.values())
    ratios = contrast_ratios(images)
    assert set(ratios) == set(MIDPOINT_METHODS) and all(r > 0 for r in ratios.values())
    grey = {**images, "noise lerp": [np.full((height, width, 3), 128, np.uint8)] * 2}
    assert contrast_ratios(grey)["noise lerp"] == 0.0, "a flat grey midpoint has no contrast at all"
    with pytest.raises(ValueError, match="at least one prompt pair"):
        midpoint_images(tiny_pipe, [], [0], height=height, width=width)


# ------------------------------------------------------------------------------------------ the pieces of 04 and 05


def test_noise_latents_is_the_noise_denoise_draws(tiny_pipe):
    height, width = default_size(tiny_pipe)
    prompt_embeds, negative_prompt_embeds = encode_text(tiny_pipe, ["a", "b"])
    kwargs = dict(num_inference_steps=2, height=height, width=width, progress=False)
    drawn = denoise(tiny_pipe, prompt_embeds, negative_prompt_embeds, seeds=[3, 4], **kwargs)
    given = denoise(tiny_pipe, prompt_embeds, negative_prompt_embeds, seeds=[3, 4],
                    latents=noise_latents(tiny_pipe, [3, 4], height, width), **kwargs)
    assert torch.equal(drawn, given)


@pytest.mark.parametrize("alpha, endpoint", [(0.0, "A"), (1.0, "B")])
def test_morph_midpoints_at_the_ends_are_the_generations(tiny_pipe, alpha, endpoint):
    height, width = default_size(tiny_pipe)
    latents = morph_midpoints(tiny_pipe, "a red circle", "a blue square", [0, 1], [5, 6], alpha,
                              num_inference_steps=2, height=height, width=width)
    assert set(latents) == {"A", "B", *MIDPOINT_METHODS}
    for method in MIDPOINT_METHODS:
        torch.testing.assert_close(latents[method], latents[endpoint], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(latents["A"], latents["B"])


def test_morph_midpoints_refuses_unpaired_seeds_and_missing_size(tiny_pipe):
    height, width = default_size(tiny_pipe)
    with pytest.raises(ValueError, match="seeds_b"):
        morph_midpoints(tiny_pipe, "a", "b", [0, 1], [5], 0.5, height=height, width=width)
    with pytest.raises(ValueError, match="height= and width="):
        morph_midpoints(tiny_pipe, "a", "b", [0], [5], 0.5)


def _scene(shape: str, colour: str) -> world.Scene:
    obj = world.SceneObject(shape, colour, "large", "center", 32.0, 32.0, world.COLOURS[colour])
    return world.Scene("heldout", 0, "gray", world.BACKGROUNDS["gray"], (obj,), f"a {colour} {shape}")


def test_colour_purity_tells_a_flat_shape_from_a_cross_fade():
    red_circle = world.render(_scene("circle", "red"))[0]
    blue_square = world.render(_scene("square", "blue"))[0]
    cross_fade = ((red_circle.astype(np.float32) + blue_square) / 2).round().astype(np.uint8)

    def one(colour: str) -> Reading:
        return Reading((("square", colour, "large", "center"),), "gray")

    assert colour_purity(red_circle, one("red")) > 0.9
    assert colour_purity(blue_square, one("blue")) > 0.9
    assert colour_purity(cross_fade, one("blue")) < 0.5, "a double exposure is no flat blue object"
    assert colour_purity(cross_fade, one("red")) < 0.5
    assert colour_purity(red_circle, Reading((), "gray")) == 0.0, "no object read: nothing clean"
    # the tolerance: half the closest two world colours' distance, so no pixel is within it of two colours
    colours = np.array(list(world.COLOURS.values()), np.float32)
    gaps = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    assert colour_tolerance() == pytest.approx(gaps[gaps > 0].min() / 2)
