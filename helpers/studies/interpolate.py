"""Interpolation between latents (or embeddings): lerp, slerp, the sequences notebooks 04 and 05 decode, and how
clean the midpoints are on the toy model.

- `lerp(t, v0, v1)` and `slerp(t, v0, v1)`: `t` a scalar or a vector of K values in [0, 1]. With a vector the result
  gains a leading axis: (K, *v0.shape). A tensor of 2 or more dims is a batch: each entry `v0[i]` (flattened) is one
  vector, so slerp measures the angle per sample, never across the batch.
- `interpolation_alphas(num_divisions)`: 0, 1/N, ..., 1. `interpolate(v0, v1, num_divisions, method)`: the list of
  interpolated tensors at those alphas.
- `morph_midpoints` / `midpoint_images`: generations A and B and their midpoints by noise slerp, noise lerp and
  final-latent lerp; `contrast_ratios` (any model): washed out or not; `midpoint_quality`: on the toy model, how
  the oracle reads them too (with `colour_purity`: flat shape or blend).
- Why slerp: a Gaussian sample in many dimensions lies near the sphere of radius sqrt(D). The straight line between
  two independent samples cuts through the inside of that sphere: at alpha 0.5 its norm is about 1/sqrt(2) of the
  ends' (`expected_lerp_norm_ratio`), a latent the UNet never saw as noise. Slerp walks along the sphere instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from helpers.core.pictures import to_uint8
from helpers.core.stages import decode, denoise, encode_text, latent_shape, make_generators
from helpers.toy import world
from helpers.toy.oracle import adherence, image_object_mask, load_oracle, matches, parse_prompt, read_images

# |cos(angle)| above this and the two vectors count as parallel: sin(angle) is then so small that slerp's weights
# sin((1 - t) θ) / sin θ lose precision, while lerp differs from slerp by less than (1 - 0.9995) of the norm.
# (The value is the one of the widely copied slerp in the Stable Diffusion community; see tests/test_interpolate.py.)
PARALLEL_THRESHOLD = 0.9995

METHODS = ("lerp", "slerp")


# ---------------------------------------------------------------------------------------------------
# Input checks


def _check_endpoints(v0: torch.Tensor, v1: torch.Tensor) -> None:
    if not isinstance(v0, torch.Tensor) or not isinstance(v1, torch.Tensor):
        raise TypeError(f"v0 and v1 must be torch tensors, got {type(v0).__name__} and {type(v1).__name__}")
    if v0.shape != v1.shape:
        raise ValueError(
            f"v0 has shape {tuple(v0.shape)} but v1 has {tuple(v1.shape)}: interpolate between tensors of one shape"
        )
    if v0.dtype != v1.dtype:
        raise ValueError(f"v0 is {v0.dtype} but v1 is {v1.dtype}: cast one (e.g. v1.to(v0.dtype)) so both match")
    if v0.device != v1.device:
        raise ValueError(f"v0 is on {v0.device} but v1 on {v1.device}: move both to one device")
    if not v0.is_floating_point():
        raise ValueError(f"v0 and v1 are {v0.dtype}: interpolation needs floating-point tensors")


def _as_t(t) -> torch.Tensor:
    """`t` as a float64 CPU tensor (a 0-dim scalar or a 1-dim vector), every value checked to lie in [0, 1]
    (checked on the CPU in float64: MPS has no float64, and a GPU check would wait for the device anyway)."""
    t_tensor = torch.as_tensor(t).detach().to("cpu", torch.float64)
    if t_tensor.ndim > 1:
        raise ValueError(f"t has shape {tuple(t_tensor.shape)}: give a scalar or a vector (1-D) of values in [0, 1]")
    if t_tensor.numel() == 0:
        raise ValueError("t is empty: give a scalar or at least one value in [0, 1]")
    bad = t_tensor[~((t_tensor >= 0) & (t_tensor <= 1))]  # NaN fails both comparisons, so it counts as bad
    if bad.numel():
        raise ValueError(
            f"t must lie in [0, 1] (0 gives v0, 1 gives v1), got {bad.tolist()}; extrapolation is not supported"
        )
    return t_tensor


def _broadcast_t(t: torch.Tensor, v0: torch.Tensor) -> torch.Tensor:
    """A 0-dim t stays a scalar; a vector of K values becomes (K, 1, ..., 1) to broadcast over (K, *v0.shape)."""
    return t if t.ndim == 0 else t.view(-1, *([1] * v0.ndim))


# ---------------------------------------------------------------------------------------------------
# lerp and slerp


def lerp(t, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """(1 - t) · v0 + t · v1, exact at t = 0 and 1 (torch.lerp). t a scalar, or K values: then (K, *v0.shape)."""
    _check_endpoints(v0, v1)
    compute_dtype = torch.promote_types(v0.dtype, torch.float32)  # fp16/bf16 inputs: weights in fp32
    t = _broadcast_t(_as_t(t), v0).to(v0.device, compute_dtype)
    result = torch.lerp(v0.to(compute_dtype), v1.to(compute_dtype), t)
    return result.to(v0.dtype)


def slerp(t, v0: torch.Tensor, v1: torch.Tensor, parallel_threshold: float = PARALLEL_THRESHOLD) -> torch.Tensor:
    """Spherical interpolation: sin((1 - t) θ) / sin θ · v0 + sin(t θ) / sin θ · v1, θ the angle between v0 and v1.

    Per sample for batched tensors (a tensor of 2+ dims is (batch, ...)). Exact at t = 0 and 1. Where
    |cos θ| > `parallel_threshold` it falls back to lerp (for nearly opposite vectors that line passes near zero:
    the arc between opposite points is not unique). For equal-norm endpoints every point keeps that norm (Shoemake's
    formula; unequal norms get the same weights). Keeps dtype (computes in at least float32) and device.
    """
    _check_endpoints(v0, v1)
    if not 0.0 < parallel_threshold <= 1.0:
        raise ValueError(f"parallel_threshold={parallel_threshold} must be in (0, 1]: a bound on |cos θ|")
    compute_dtype = torch.promote_types(v0.dtype, torch.float32)
    t = _broadcast_t(_as_t(t), v0).to(v0.device, compute_dtype)
    a, b = v0.to(compute_dtype), v1.to(compute_dtype)
    dot = _per_sample_cosine(a, b)  # (batch, 1, ..., 1), or 0-dim for 1-D vectors
    theta = torch.arccos(dot.clamp(-1.0, 1.0))
    sin_theta = torch.sin(theta)
    # (1 - t) θ is exactly 0 at t = 1 and t θ is exactly θ, so the weights are exactly (1, 0) and (0, 1) at the ends
    weight0 = torch.sin((1 - t) * theta) / sin_theta
    weight1 = torch.sin(t * theta) / sin_theta
    parallel = dot.abs() > parallel_threshold
    weight0 = torch.where(parallel, 1 - t, weight0)
    weight1 = torch.where(parallel, t, weight1)
    return (weight0 * a + weight1 * b).to(v0.dtype)


def _per_sample_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos θ between a[i] and b[i] (each flattened) kept as (batch, 1, ..., 1); one 0-dim value for 1-D tensors."""
    if a.ndim <= 1:
        return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0, eps=1e-12)
    cosine = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-12)  # (batch,)
    return cosine.view(-1, *([1] * (a.ndim - 1)))


# ---------------------------------------------------------------------------------------------------
# Sequences and their norms


def interpolation_alphas(num_divisions: int) -> list[float]:
    """alpha = n / num_divisions for n = 0 .. num_divisions: 2 divisions give [0.0, 0.5, 1.0]."""
    if isinstance(num_divisions, bool) or not isinstance(num_divisions, int) or num_divisions < 1:
        raise ValueError(
            f"NUM_DIVISIONS={num_divisions!r} must be an integer of at least 1: the number of steps from 0 to 1 "
            "(1 gives just the two ends, 2 adds the midpoint)"
        )
    return [n / num_divisions for n in range(num_divisions + 1)]


def interpolate(v0: torch.Tensor, v1: torch.Tensor, num_divisions: int, method: str = "lerp") -> list[torch.Tensor]:
    """[interpolation at alpha for alpha in interpolation_alphas(num_divisions)], each shaped like v0."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; choose one of {METHODS}")
    function = lerp if method == "lerp" else slerp
    return list(function(interpolation_alphas(num_divisions), v0, v1))  # (K, *shape) -> K tensors of v0's shape


def expected_lerp_norm_ratio(alpha: float) -> float:
    """E‖lerp(alpha, a, b)‖ / E‖a‖ for independent a, b ~ N(0, I) in many dimensions: sqrt((1 - alpha)² + alpha²),
    1/sqrt(2) ≈ 0.707 at alpha 0.5 (the variances add: (1 - alpha)² + alpha²; the norm goes with its root)."""
    return math.sqrt((1 - alpha) ** 2 + alpha**2)


def norm_curve(sequence: Sequence[torch.Tensor]) -> dict[str, list[float]]:
    """Each interpolated tensor's norm (per sample, averaged over the batch), relative to the mean of the two ends'
    norms, and its standard deviation: what the wash-out of lerped noise is about."""
    norms = [float(x.float().flatten(1).norm(dim=1).mean()) if x.ndim > 1 else float(x.float().norm())
             for x in sequence]
    reference = (norms[0] + norms[-1]) / 2
    stds = [float(x.float().std()) for x in sequence]
    return {"norm": norms, "norm_ratio": [n / reference for n in norms], "std": stds}


# ---------------------------------------------------------------------------------------------------
# The starting noise, drawn the way `helpers.core.stages.denoise` draws it


def noise_latents(pipe, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
    """The Gaussian starting latents `denoise` draws for `seeds` (one generator per seed), (batch, 4, h/8, w/8):
    `denoise(..., latents=noise_latents(pipe, seeds, h, w))` equals `denoise(..., seeds=seeds)`."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = latent_shape(pipe, len(seeds), height, width)
    return randn_tensor(shape, generator=make_generators(seeds), device=pipe.unet.device, dtype=pipe.unet.dtype)


# ---------------------------------------------------------------------------------------------------
# Midpoint quality on the toy model

MIDPOINT_METHODS = ("noise slerp", "noise lerp", "final-latent lerp")
SEED_OFFSET = 1000  # endpoint B of a morph uses seed s + SEED_OFFSET when endpoint A uses seed s


@dataclass
class MidpointQuality:
    """For each way of interpolating (MIDPOINT_METHODS), how the oracle reads the midpoints: "either prompt" = one
    object with every attribute of prompt A, or of prompt B, right; "one object" = one object whatever its
    attributes (a chimera such as A's colour on B's shape counts here, not there). The oracle names the nearest
    class even for a blend (a red-over-blue double exposure may read as a blue square), so "colour purity" says
    whether the object really is one flat colour (see `colour_purity`): low purity = a blend."""

    alpha: float
    pairs: list[tuple[str, str]]
    seeds: list[int]
    shares: dict[str, float] = field(default_factory=dict)  # method -> share reading as A or as B
    share_a: dict[str, float] = field(default_factory=dict)
    share_b: dict[str, float] = field(default_factory=dict)
    share_one_object: dict[str, float] = field(default_factory=dict)
    colour_purity: dict[str, float] = field(default_factory=dict)  # mean over midpoints; the endpoints': "ends"
    contrast_ratio: dict[str, float] = field(default_factory=dict)  # midpoint pixel std / the endpoints' mean
    endpoint_adherence: float = 0.0  # share of the alpha 0 and 1 images that match their own prompt
    images: dict[str, list] = field(default_factory=dict)  # "A", "B" and method -> images, pair-major

    def rows(self) -> list[dict]:
        return [{"method": m, "either prompt": self.shares[m], "prompt A": self.share_a[m], "prompt B": self.share_b[m],
                 "one object": self.share_one_object[m], "colour purity": self.colour_purity[m],
                 "contrast ratio": self.contrast_ratio[m]} for m in self.shares]

    def as_dict(self) -> dict:
        return {"alpha": self.alpha, "pairs": [list(p) for p in self.pairs], "seeds": self.seeds,
                "midpoints_per_method": len(self.pairs) * len(self.seeds), "shares": self.shares,
                "share_a": self.share_a, "share_b": self.share_b, "share_one_object": self.share_one_object,
                "colour_purity": self.colour_purity,
                "contrast_ratio": self.contrast_ratio, "endpoint_adherence": self.endpoint_adherence}


def pixel_contrast(images) -> np.ndarray:
    """Each image's standard deviation over pixels and channels, in [0, 1] units: (N,). A washed-out (grey, faded)
    picture has less of it than a clean one."""
    arrays = np.stack([to_uint8(im, rgb=True).astype(np.float32) / 255 for im in images])  # (N, H, W, 3)
    return arrays.std(axis=(1, 2, 3))


def colour_tolerance() -> float:
    """Half the smallest RGB distance between two colours of the toy world (yellow and orange): a pixel this close
    to a world colour is nearer to it than to any other."""
    colours = np.array(list(world.COLOURS.values()), np.float32)  # (colours, 3)
    distances = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    return float(distances[distances > 0].min() / 2)


def colour_purity(image, reading) -> float:
    """The share of the object's pixels (`image_object_mask`) within `colour_tolerance()` of the world colour the
    oracle named: near 1 for a flat object of one colour, lower for a blend of two. 0 unless the reading is exactly
    one object (the mask cannot tell two objects apart)."""
    if len(reading.objects) != 1:
        return 0.0
    pixels = to_uint8(image, rgb=True)
    object_pixels = pixels[image_object_mask(pixels)].astype(np.float32)  # (n, 3)
    if not len(object_pixels):
        return 0.0
    named = np.array(world.COLOURS[reading.objects[0][1]], np.float32)
    return float((np.linalg.norm(object_pixels - named, axis=-1) <= colour_tolerance()).mean())


def morph_midpoints(pipe, prompt_a: str, prompt_b: str, seeds_a: Sequence[int], seeds_b: Sequence[int], alpha: float,
                    **denoise_kwargs) -> dict[str, torch.Tensor]:
    """For each seed pair, generation A (prompt_a, seeds_a[i]) and B (prompt_b, seeds_b[i]) and three midpoints at
    `alpha`: noise slerp and noise lerp (each denoised with the text embeddings lerped, so alpha 0 and 1 are A and B
    exactly), and the lerp of A's and B's final latents. Returns latents (batch, 4, h/8, w/8) keyed "A", "B" and by
    MIDPOINT_METHODS. `denoise_kwargs` must hold height and width (progress bars are off unless asked for)."""
    n = len(seeds_a)
    if n == 0 or len(seeds_b) != n:
        raise ValueError(f"seeds_a has {n} seeds and seeds_b {len(seeds_b)}: give one seed of B per seed of A (>= 1)")
    if "height" not in denoise_kwargs or "width" not in denoise_kwargs:
        raise ValueError("morph_midpoints needs height= and width= (e.g. from helpers.core.stages.default_size(pipe))")
    height, width = denoise_kwargs.pop("height"), denoise_kwargs.pop("width")
    denoise_kwargs.setdefault("progress", False)
    prompt_embeds, negative_prompt_embeds = encode_text(pipe, [prompt_a, prompt_b])  # (2, 77, hidden) each
    embeds_a, embeds_b = prompt_embeds[:1].expand(n, -1, -1), prompt_embeds[1:].expand(n, -1, -1)  # (n, 77, hidden)
    negative = negative_prompt_embeds[:1].expand(n, -1, -1)
    noise_a, noise_b = noise_latents(pipe, seeds_a, height, width), noise_latents(pipe, seeds_b, height, width)
    embeds_mid = lerp(alpha, embeds_a, embeds_b)

    def run(embeds, noise, seeds):
        return denoise(pipe, embeds, negative, seeds=seeds, height=height, width=width, latents=noise,
                       **denoise_kwargs)

    latents = {"A": run(embeds_a, noise_a, seeds_a), "B": run(embeds_b, noise_b, seeds_b)}
    latents["noise slerp"] = run(embeds_mid, slerp(alpha, noise_a, noise_b), seeds_a)
    latents["noise lerp"] = run(embeds_mid, lerp(alpha, noise_a, noise_b), seeds_a)
    latents["final-latent lerp"] = lerp(alpha, latents["A"], latents["B"])
    return latents


def lerp_midpoint_stats(morph: dict[str, torch.Tensor], morph_images: dict[str, list], noise_a: torch.Tensor,
                        noise_b: torch.Tensor) -> tuple[dict[str, dict[str, float]], float]:
    """Notebook 04's midpoints (`morph_midpoints` and their decoded images) against their ends: for the noise lerp
    and the final-latent lerp, the latent norm over the ends' and the pixel contrast over the ends'. Returns those
    and the ends' mean contrast."""
    endpoint_contrast = float(np.concatenate([pixel_contrast(morph_images["A"]), pixel_contrast(morph_images["B"])])
                              .mean())

    def mean_norm(latents: torch.Tensor) -> float:
        return float(latents.flatten(1).norm(dim=1).mean())  # (batch, 4, h/8, w/8) -> a norm per sample -> mean

    final_ends = torch.cat([morph["A"], morph["B"]])
    norms = {"noise lerp": mean_norm(lerp(0.5, noise_a, noise_b)) / mean_norm(torch.cat([noise_a, noise_b])),
             "final-latent lerp": mean_norm(morph["final-latent lerp"]) / mean_norm(final_ends)}
    return {method: {"latent_norm_ratio": norm,
                     "contrast_ratio": float(pixel_contrast(morph_images[method]).mean() / endpoint_contrast)}
            for method, norm in norms.items()}, endpoint_contrast


def midpoint_images(pipe, prompt_pairs: Sequence[Sequence[str]], seeds: Sequence[int], *, alpha: float = 0.5,
                    seed_offset: int = SEED_OFFSET, **denoise_kwargs) -> dict[str, list]:
    """Generations A and B and their midpoints (MIDPOINT_METHODS) for every (pair, seed), decoded: {"A", "B",
    method: images, pair-major}. Endpoint A uses seed s, endpoint B seed s + seed_offset (two different noises, as two
    separate generations have). `denoise_kwargs` (num_inference_steps, guidance_scale, height, width, scheduler) go to
    `denoise`. Needs no oracle: any model."""
    pairs = [_check_pair(pair) for pair in prompt_pairs]
    seeds = [int(s) for s in seeds]
    if not pairs or not seeds:
        raise ValueError(f"need at least one prompt pair and one seed, got {len(pairs)} pairs and {len(seeds)} seeds")
    _as_t(alpha)
    images = {key: [] for key in ("A", "B", *MIDPOINT_METHODS)}
    for prompt_a, prompt_b in pairs:
        latents = morph_midpoints(pipe, prompt_a, prompt_b, seeds, [s + seed_offset for s in seeds], alpha,
                                  **denoise_kwargs)
        for key, batch in latents.items():
            images[key] += decode(pipe, batch)
    return images


def contrast_ratios(images: dict[str, list]) -> dict[str, float]:
    """Each method's mean midpoint contrast (`pixel_contrast`) over the endpoints' mean: well below 1 is washed out.
    `images` as `midpoint_images` returns them. Measures pixels only, so it holds for any model."""
    endpoint_contrast = np.concatenate([pixel_contrast(images["A"]), pixel_contrast(images["B"])]).mean()
    return {method: float(pixel_contrast(images[method]).mean() / endpoint_contrast) for method in MIDPOINT_METHODS}


def midpoint_quality(pipe, prompt_pairs: Sequence[Sequence[str]], seeds: Sequence[int], *, alpha: float = 0.5,
                     seed_offset: int = SEED_OFFSET, oracle=None, **denoise_kwargs) -> MidpointQuality:
    """How the toy oracle reads the midpoints of each method (MIDPOINT_METHODS) over every (pair, seed) of
    `midpoint_images` (same arguments), and their contrast ratios."""
    oracle = oracle or load_oracle()
    pairs = [_check_pair(pair) for pair in prompt_pairs]
    seeds = [int(s) for s in seeds]
    images = midpoint_images(pipe, pairs, seeds, alpha=alpha, seed_offset=seed_offset, **denoise_kwargs)
    quality = MidpointQuality(_as_t(alpha).item(), pairs, seeds)
    n = len(seeds)  # read one pair's images at a time, as they were generated
    readings = {key: [r for i in range(0, len(batch), n) for r in read_images(oracle, batch[i:i + n])]
                for key, batch in images.items()}
    specs = {"A": [parse_prompt(a) for a, _ in pairs for _ in seeds],
             "B": [parse_prompt(b) for _, b in pairs for _ in seeds]}
    _score_midpoints(quality, readings, specs, images)
    return quality


def _score_midpoints(quality: MidpointQuality, readings: dict, specs: dict, images: dict) -> None:
    quality.endpoint_adherence = (adherence(readings["A"], specs["A"]) + adherence(readings["B"], specs["B"])) / 2
    quality.colour_purity["ends"] = float(np.mean([colour_purity(im, r) for key in ("A", "B")
                                                   for im, r in zip(images[key], readings[key])]))
    quality.images.update(A=images["A"], B=images["B"])
    quality.contrast_ratio = contrast_ratios(images)
    for method in MIDPOINT_METHODS:
        is_a = [matches(r, s) for r, s in zip(readings[method], specs["A"])]
        is_b = [matches(r, s) for r, s in zip(readings[method], specs["B"])]
        quality.share_a[method] = float(np.mean(is_a))
        quality.share_b[method] = float(np.mean(is_b))
        quality.shares[method] = float(np.mean([a or b for a, b in zip(is_a, is_b)]))
        quality.share_one_object[method] = float(np.mean([len(r.objects) == 1 for r in readings[method]]))
        quality.colour_purity[method] = float(np.mean([colour_purity(im, r)
                                                       for im, r in zip(images[method], readings[method])]))
        quality.images[method] = images[method]


def _check_pair(pair) -> tuple[str, str]:
    if isinstance(pair, str) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
        raise ValueError(f"each prompt pair must be two prompts [prompt_a, prompt_b], got {pair!r}")
    return pair[0], pair[1]
