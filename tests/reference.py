"""'Ours equals the reference', said one way: the pictures our code makes against those a reference makes (diffusers'
own pipeline call, or our `generate` behind a front end), with the same seeds."""

import math

import numpy as np

from helpers.core.stages import generate, make_generators


def ours(pipe, prompts, seeds, steps: int, **kwargs) -> np.ndarray:
    """Our `generate`'s pictures, floats in [0, 1] of shape (N, H, W, 3)."""
    return generate(pipe, prompts, seeds=seeds, num_inference_steps=steps, output_type="np", progress=False,
                    **kwargs).images


def theirs(pipe, prompts, seeds, steps: int, **kwargs) -> np.ndarray:
    """diffusers' own pipeline call with the same seeds (one generator per picture, as `generate` seeds them)."""
    return pipe(prompts, generator=make_generators(seeds), num_inference_steps=steps, output_type="np",
                **kwargs).images


def as_array(images) -> np.ndarray:
    """(N, H, W, 3) from an array or a list of PIL images / arrays, as float64 so differences do not wrap."""
    if not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(image) for image in images])
    return images.astype(np.float64)


def assert_same_pictures(actual, expected, atol: float = 1e-4):
    """`actual` equals `expected` picture for picture, on the same scale (floats in [0, 1], or 0..255 for PIL
    images): same shape, no pixel further apart than `atol` (0: identical)."""
    actual, expected = as_array(actual), as_array(expected)
    assert actual.shape == expected.shape, f"{actual.shape} pictures against {expected.shape}"
    diff = np.abs(actual - expected).max()
    assert diff <= atol, f"the largest pixel difference is {diff:.3g}, above {atol}"


def assert_different_pictures(a, b, at_least: float):
    """`a` and `b` differ somewhere by more than `at_least`: a reference equality is not trivially met."""
    diff = np.abs(as_array(a) - as_array(b)).max()
    assert diff > at_least, f"the largest pixel difference is {diff:.3g}, not above {at_least}"


def lerp_norm_ratio(alpha: float) -> float:
    """|lerp(a, b, alpha)| / |a| for independent Gaussian a, b of one norm: sqrt((1 - alpha)^2 + alpha^2), written
    here independently of helpers.studies.interpolate."""
    return math.sqrt((1 - alpha) ** 2 + alpha**2)
