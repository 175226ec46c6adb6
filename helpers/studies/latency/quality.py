"""Pricing a rung in quality: against the prompt and the control map (the toy's oracle) and against the baseline's
picture of the same seed (PSNR/SSIM); then the trade-off: the Pareto front and a recommendation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from helpers.core.pictures import to_uint8
from helpers.studies.latency.rungs import Inputs
from helpers.toy import control_adherence, prompt_adherence


def image_similarity(images: Sequence, references: Sequence) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of each image against its reference (same seed), with scikit-image, and the lowest
    PSNR (inf: every image identical)."""
    if len(images) != len(references):
        raise ValueError(f"{len(images)} images but {len(references)} reference images: give one per image")
    psnrs, ssims = [], []
    for image, reference in zip(images, references):
        a, b = to_uint8(image, rgb=True), to_uint8(reference, rgb=True)  # the one rule: helpers.core.pictures
        if a.shape != b.shape:
            raise ValueError(f"an image of shape {a.shape} cannot be compared with a reference of shape {b.shape}")
        psnrs.append(peak_signal_noise_ratio(b, a, data_range=255) if not np.array_equal(a, b) else float("inf"))
        ssims.append(structural_similarity(b, a, channel_axis=-1, data_range=255))
    finite = [p for p in psnrs if np.isfinite(p)]  # identical pictures have no PSNR: the mean is over the others
    return {"psnr_db": float(np.mean(finite)) if finite else float("inf"), "ssim": float(np.mean(ssims)),
            "lowest_psnr_db": float(min(psnrs))}


def quality(images: Sequence, inputs: Inputs, baseline_images: Sequence | None, on_toy: bool) -> dict:
    """Prompt and control adherence (toy oracle) and PSNR/SSIM against the baseline images of the same seeds."""
    scores: dict[str, float] = {}
    if on_toy:
        scores["prompt_adherence"] = prompt_adherence(images, inputs.prompts)
        if inputs.depth_maps is not None:
            scores["control_adherence"] = control_adherence(images, inputs.depth_maps)
    if baseline_images is not None:
        scores.update(image_similarity(images, baseline_images))
    return scores


# ---------------------------------------------------------------------------------------------------
# The trade-off: Pareto front and a recommendation


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names whose (latency, quality) no other point beats on both (lower latency, higher quality), fastest first."""
    front = []
    for name, (latency, score) in points.items():
        dominated = any(other_latency <= latency and other_score >= score
                        and (other_latency, other_score) != (latency, score)
                        for other, (other_latency, other_score) in points.items() if other != name)
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n][0])


def within_bars(rows: list[dict], baseline: str, *, quality_key: str, max_loss: float,
                second_key: str | None = None, max_second_loss: float | None = None) -> list[dict]:
    """The rungs that ran whose `quality_key` is at most `max_loss` below the baseline's (and `second_key` at most
    `max_second_loss` below, when given), fastest first; empty if the baseline has no score."""
    by_name = {row["rung"]: row for row in rows if row.get("status") == "ok"}
    base = by_name.get(baseline)
    if base is None or base.get(quality_key) is None:
        return []

    def acceptable(row) -> bool:
        if row.get(quality_key) is None or base[quality_key] - row[quality_key] > max_loss + 1e-9:
            return False
        if second_key and max_second_loss is not None and base.get(second_key) is not None:
            return base[second_key] - row.get(second_key, -np.inf) <= max_second_loss + 1e-9
        return True

    return sorted((row for row in by_name.values() if acceptable(row)), key=lambda row: row["latency s"])


def recommend(rows: list[dict], baseline: str, *, quality_key: str, max_loss: float,
              second_key: str | None = None, max_second_loss: float | None = None) -> dict | None:
    """The fastest rung `within_bars`, with its speed-up and quality cost; None if the baseline has no score."""
    fastest = within_bars(rows, baseline, quality_key=quality_key, max_loss=max_loss, second_key=second_key,
                          max_second_loss=max_second_loss)
    if not fastest:
        return None
    best, base = fastest[0], next(row for row in rows if row["rung"] == baseline)
    return {"rung": best["rung"], "latency_s": best["latency s"], "baseline_latency_s": base["latency s"],
            "speedup": base["latency s"] / best["latency s"], quality_key: best[quality_key],
            f"{quality_key}_loss": base[quality_key] - best[quality_key],
            **({f"{second_key}_loss": base[second_key] - best[second_key]}
               if second_key and base.get(second_key) is not None and best.get(second_key) is not None else {})}

