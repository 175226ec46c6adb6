"""DreamBooth with LoRA: teach a model a new subject from a handful of pictures (notebook 08).

DreamBooth (Ruiz et al. 2023) binds a subject to a rare token ("a sks dog") by fine-tuning on a few pictures of it,
with *prior preservation*: pictures the model itself made for ordinary prompts are trained on too, so it keeps what
it knew. Here the fine-tune is a LoRA adapter on the UNet's attention layers, and optionally its resnets'
convolutions (peft, through diffusers' `unet.add_adapter`), saved with `StableDiffusionPipeline.save_lora_weights`
and loaded with `load_lora_weights`.

Forgetting, measured on the toy (held-out prompt adherence, same prompts and seeds before and after): training the
prior pictures towards their own noise target drifts the model even when they are its own training pictures (the
target's random part is all the gradient there is at the start), and the model's own *guided* pictures drift it
most (self-distillation of guidance); an untrained empty prompt lets guidance amplify the drift. Training the prior
pictures towards the frozen base model's prediction (`prior_target="base model"`), with some of them captioned with
the empty prompt, keeps the held-out prompts where they were while the star is learned.

On the toy model the subject is a shape outside its world, a five-pointed star in one colour, rendered here like
the world's shapes (`render_subject`); `five_fold_scores` / `shows_subject` check that a picture shows it (its
main object's outline is modulated five-fold, at any rotation), validated by `validate_fidelity_check` on renders
of the star and of the world's shapes, raw and passed through the VAE, and on the model's own pictures. The
training loss and noising are the toy's own (`helpers.toy.training`: v-prediction on its zero-terminal-SNR schedule;
epsilon on SD 1.5).

    check_identifier(tokenizer, identifier, known_words)  -> token id (one token, no meaning yet), else ValueError
    fill_prompt(template, phrase)                           -> "a photo of {}" + "sks dog" -> "a photo of a sks dog"
    subject_images(n, colour, subject, seed)                -> InstanceImages (toy renders + captions)
    load_instance_folder(folder, size, fit=False)           -> InstanceImages from the user's photos (SD 1.5)
    subject_photos(instance_dir, prompt, size)              -> the user's photos, else diffusers' sample dog (SD 1.5)
    training_data(pipe, instance, class_prompts, class_pictures=None, ...) -> DreamBoothData (latents + embeddings)
    add_lora(unet, rank) -> trainable parameter count;  train_lora(pipe, data, steps, ...) -> TrainingLog
                            (an fp16 UNet trains under autocast with a gradient scaler, the adapter in fp32)
    save_lora(pipe, folder) -> file;  load_lora(pipe, file)  (refuses an adapter made for another model)
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from helpers.core.models import load_pipeline
from helpers.core.pictures import to_pil
from helpers.core.results import PROGRESS_EVERY_S, outputs_dir
from helpers.core.stages import default_size, generate
from helpers.core.tokenizer import DEFAULT_WORDS
from helpers.toy import sample_scenes, world
from helpers.toy.oracle import image_object_mask, load_oracle, matches, parse_prompt, read_images
from helpers.toy.training import cosine_lr, diffusion_loss, noisy_latents_batch, object_pixel_weight, set_lr, tokenize

SUBJECT_SHAPE = "star"  # not one of world.SHAPES: the toy has never seen it
STAR_POINTS = 5
STAR_INNER_RATIO = 0.5  # inner / outer radius: arms wide enough to survive the toy VAE's 4x downsampling
SUBJECT_RADIUS = 13.0  # outer radius in pixels at IMAGE_SIZE (world "large" is 12): fits the left/right slots
MIN_INSTANCE_IMAGES = 3  # DreamBooth uses 3-5 pictures; fewer and the adapter learns one picture, not a subject
LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]  # the UNet's attention projections
RESNET_CONV_MODULES = ["conv1", "conv2"]  # the resnets' 3x3 convolutions, where a new *shape* is drawn
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default file name
# A picture shows the star when its main object's outline is modulated five-fold (see five_fold_scores and
# validate_fidelity_check). Renders score 0.31-0.44, through the VAE 0.26-0.43; the world's shapes at most 0.14 (0.21
# as the model generates them); stars the fine-tuned toy draws, rounder than renders, 0.13-0.27. The share keeps
# out irregular blobs (their outline is modulated, but not mostly five-fold): stars 0.5-1, world shapes near 0.1.
FIVE_FOLD_MIN = 0.10
FIVE_FOLD_SHARE_MIN = 0.5


# ---------------------------------------------------------------------------------------------------
# The rare token


def check_identifier(tokenizer, identifier: str, known_words: Sequence[str] = ()) -> int:
    """The token id of `identifier`, the rare word the subject is bound to; ValueError when it cannot be one.

    It must be one token (so the adapter binds one embedding) and not a word the model already knows
    (`known_words`: for the toy, the words its captions are made of; for SD 1.5, at least the class prompts' words).
    """
    if not isinstance(identifier, str) or not identifier.isalpha() or identifier != identifier.lower():
        raise ValueError(f"identifier={identifier!r} must be one lower-case word of letters, like 'sks'")
    known = {w.lower() for w in known_words}
    if identifier in known:
        raise ValueError(
            f"identifier={identifier!r} is already in the model's vocabulary (a word its prompts use, so it has a "
            f"meaning to unlearn); pick a rare one-token word such as {rare_tokens(tokenizer, known)[:5]}"
        )
    ids = tokenizer(identifier, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(
            f"identifier={identifier!r} splits into {len(ids)} tokens {pieces} in this tokenizer; DreamBooth binds the "
            f"subject to one token: pick one such as {rare_tokens(tokenizer, known)[:5]}"
        )
    return ids[0]


def rare_tokens(tokenizer, known_words: set[str], max_length: int = 3) -> list[str]:
    """Whole-word tokens of 2..max_length letters that are no known word: candidates for an identifier, those
    without a vowel first (less likely to be a word: "xt" rather than "are")."""
    words = (token.removesuffix("</w>") for token in tokenizer.get_vocab() if token.endswith("</w>"))
    candidates = [w for w in words if w.isalpha() and 2 <= len(w) <= max_length and w not in known_words]
    return sorted(candidates, key=lambda w: (any(v in w for v in "aeiouy"), w))


def toy_known_words() -> list[str]:
    """Every word the toy's tokenizer was built from: the world's captions plus common prompt words."""
    return sorted({*world.VOCABULARY, *DEFAULT_WORDS})


# ---------------------------------------------------------------------------------------------------
# Prompts: a template and the subject (or its class), with the article English needs

ARTICLE = "{a}"  # in a template: "a" or "an", whichever the subject after it takes
# Words after which a bare "{}" would leave the noun without an article ("a photo of {}" -> "a photo of dog")
PREPOSITIONS = ("of", "in", "on", "at", "with", "by", "for", "from", "like", "to", "as", "near", "beside", "under",
                "behind", "and")
# Spelling misleads the simple rule (a vowel letter -> "an") for these starts: "a unicorn", "an hour"
CONSONANT_SOUND_STARTS = ("uni", "use", "usu", "uti", "ure", "euro", "eu", "one", "once", "ewe")
VOWEL_SOUND_STARTS = ("hour", "honest", "honor", "honour", "heir")


def indefinite_article(phrase: str) -> str:
    """"a" or "an" for a noun phrase, by the sound of its first word as spelt ("an apple", "a unicorn", "a sks dog":
    an identifier is read as a word, as the DreamBooth paper writes it)."""
    word = phrase.strip().split()[0].lower() if phrase.strip() else ""
    if word.startswith(VOWEL_SOUND_STARTS):
        return "an"
    if word.startswith(CONSONANT_SOUND_STARTS):
        return "a"
    return "an" if word[:1] in tuple("aeiou") else "a"


def fill_prompt(template: str, phrase: str) -> str:
    """`template` with `{}` replaced by the noun phrase `phrase` ("sks dog", "dog") and its article right:
    `{a}` becomes "a" or "an" as the phrase sounds ("{a} {}" + "apple" -> "an apple"); an "a"/"an" written just
    before `{}` is matched the same way ("a {}" + "apple" -> "an apple"); a `{}` that starts the template or follows
    a preposition ("a photo of {}") would leave the noun bare, so it gets an article ("a photo of a dog"). To keep
    another determiner, write it before `{}` ("the {}", "my {}", "two {}s")."""
    if "{}" not in template:
        raise ValueError(f"prompt template {template!r} has no {{}} where the subject goes, e.g. 'a photo of {{}}'")
    article = indefinite_article(phrase)
    text = re.sub(r"\b([Aa]n?) \{\}", lambda m: f"{article.capitalize() if m[1][0] == 'A' else article} {{}}",
                  template)
    bare = r"(^|\b(?:" + "|".join(PREPOSITIONS) + r") )\{\}"
    text = re.sub(bare, lambda m: f"{m[1]}{article} {{}}", text)
    return text.replace(ARTICLE, article).replace("{}", phrase)


# ---------------------------------------------------------------------------------------------------
# The subject: a star, rendered like the world's shapes


def star_mask(cx: float, cy: float, radius: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean coverage of an upright five-pointed star centred at (cx, cy) on the pixel-centre grid (x, y)."""
    from skimage.draw import polygon2mask

    angles = -np.pi / 2 + np.arange(2 * STAR_POINTS) * np.pi / STAR_POINTS  # first point straight up
    radii = np.where(np.arange(2 * STAR_POINTS) % 2 == 0, radius, STAR_INNER_RATIO * radius)
    step = x[0, 1] - x[0, 0]  # grid spacing in pixel units
    # vertices in the grid's (row, column) index space
    rows = (cy + radii * np.sin(angles) - y[0, 0]) / step
    cols = (cx + radii * np.cos(angles) - x[0, 0]) / step
    return polygon2mask(x.shape, np.stack([rows, cols], axis=1))


def star_area(radius: float) -> float:
    """Area of the star polygon: 2·points triangles between an outer and an inner vertex."""
    return STAR_POINTS * radius * STAR_INNER_RATIO * radius * math.sin(math.pi / STAR_POINTS)


@dataclass(frozen=True)
class SubjectLayout:
    """Where one picture of the subject puts it."""

    colour: str
    position: str
    background: str
    cx: float
    cy: float


def random_layout(rng: np.random.Generator, colour: str, position: str, background: str) -> SubjectLayout:
    cx = world.POSITIONS[position] * world.IMAGE_SIZE + rng.uniform(-world.POSITION_JITTER, world.POSITION_JITTER)
    cy = rng.uniform(*world.VERTICAL_RANGE) * world.IMAGE_SIZE
    return SubjectLayout(colour, position, background, cx, cy)


def render_subject(layout: SubjectLayout, seed: int = 0, radius: float = SUBJECT_RADIUS) -> np.ndarray:
    """The star of `layout` on its background, supersampled like `world.render` (uint8 H×W×3)."""
    rng = np.random.default_rng([11, seed])
    n = world.IMAGE_SIZE * world.SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / world.SUPERSAMPLE  # sub-pixel centres in IMAGE_SIZE units
    x, y = np.meshgrid(coords, coords)  # (n, n) each
    jitter = world._jittered  # the world's colour jitter, so colours read like the world's
    image = np.broadcast_to(np.array(jitter(world.BACKGROUNDS[layout.background], rng), np.float32), (n, n, 3)).copy()
    image[star_mask(layout.cx, layout.cy, radius, x, y)] = jitter(world.COLOURS[layout.colour], rng)
    # (n, n, 3) -> (IMAGE_SIZE, IMAGE_SIZE, 3): average each SUPERSAMPLE×SUPERSAMPLE block
    size, k = world.IMAGE_SIZE, world.SUPERSAMPLE
    return np.round(image.reshape(size, k, size, k, 3).mean(axis=(1, 3))).astype(np.uint8)


def context_prompt(subject: str, colour: str | None = None, position: str = "center",
                   background: str | None = None) -> str:
    """A toy-world caption for the subject ("a green sks shape on the left on a gray background"), with the
    world's convention: a position is said when off-centre."""
    words = ["a", colour, subject] if colour else ["a", subject]
    if position != "center":
        words.append(world.POSITION_PHRASES[position][0])
    if background:
        words.append(world.BACKGROUND_PHRASES[0].format(background))
    return " ".join(words)


@dataclass
class InstanceImages:
    """The subject's pictures (uint8 (N, H, W, 3)) and their captions; layouts for toy renders."""

    images: np.ndarray
    prompts: list[str]
    layouts: list[SubjectLayout] = field(default_factory=list)


def subject_images(n: int, colour: str, subject: str, seed: int = 0) -> InstanceImages:
    """`n` renders of the star in `colour`, cycling through positions and backgrounds, captioned with `subject`
    ("sks shape") and their position and background."""
    if colour not in world.COLOURS:
        raise ValueError(f"colour={colour!r} is not a toy-world colour; choose one of {tuple(world.COLOURS)}")
    rng = np.random.default_rng([12, seed])
    positions, backgrounds = list(world.POSITIONS), list(world.BACKGROUNDS)
    layouts = [random_layout(rng, colour, positions[i % len(positions)], backgrounds[(i + seed) % len(backgrounds)])
               for i in range(n)]
    images = np.stack([render_subject(layout, seed * 1000 + i) for i, layout in enumerate(layouts)])
    prompts = [context_prompt(subject, None, lay.position, lay.background) for lay in layouts]
    return InstanceImages(images, prompts, layouts)


# ---------------------------------------------------------------------------------------------------
# Subject fidelity: does a picture show the star?


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a boolean mask (all False when the mask is empty)."""
    from skimage.measure import label

    labels = label(mask, connectivity=2)
    if labels.max() == 0:
        return np.zeros_like(mask, bool)
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1


def outline_harmonics(image, n_angles: int = 90, n_harmonics: int = 10) -> np.ndarray:
    """The outline of the picture's main object (its largest blob off the background colour) as harmonics: its
    radius by angle around the centroid, Fourier-transformed, each amplitude relative to the mean radius
    (2|F_k| / F_0: a radius r(1 + a cos 5θ) gives a at k = 5). Zeros for a picture without an object."""
    blob = largest_blob(image_object_mask(image))  # any picture, by helpers.core.pictures' rule
    if not blob.any():
        return np.zeros(n_harmonics + 1)
    rows, cols = np.nonzero(blob)
    dy, dx = rows - rows.mean(), cols - cols.mean()
    bins = ((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * n_angles).astype(int) % n_angles
    radius = np.zeros(n_angles)
    np.maximum.at(radius, bins, np.hypot(dy, dx) + 0.5)  # the outermost pixel in each angular bin
    spectrum = np.abs(np.fft.rfft(radius)) / n_angles
    return 2 * spectrum[: n_harmonics + 1] / spectrum[0]


def five_fold_scores(image) -> tuple[float, float]:
    """(strength, share) of the main object's five-fold outline: the 5th harmonic's amplitude, and its share of the
    2nd..8th harmonics' (root-sum-square). Rotation-invariant: a star at any angle scores the same."""
    harmonics = outline_harmonics(image)
    strength = float(harmonics[STAR_POINTS])
    others = float(np.sqrt((harmonics[2:9] ** 2).sum()))
    return strength, (strength / others if others > 0 else 0.0)


def shows_subject(images, min_strength: float = FIVE_FOLD_MIN, min_share: float = FIVE_FOLD_SHARE_MIN) -> list[bool]:
    """For each picture: does it show the star (an outline modulated five-fold, and mostly five-fold)?"""
    return [strength >= min_strength and share >= min_share
            for strength, share in map(five_fold_scores, images)]


@torch.inference_mode()
def vae_round_trip(vae, images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> the same pictures encoded and decoded by `vae`: what the best a generation can be."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).to(vae.device, vae.dtype) / 127.5 - 1  # (N, 3, H, W)
    decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    return ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def validate_fidelity_check(pipe=None, n: int = 64, seed: int = 0, steps: int = 20) -> dict:
    """How well `shows_subject` tells the star from the world's shapes: on `n` renders of each (stars in every
    colour, position and background; the world's held-out scenes), raw and, with `pipe`, passed through its VAE as
    a generated picture would be, plus `n` pictures the model itself generates for held-out prompts (which must
    not count as stars). Accuracy = share right over stars and shapes."""
    rng = np.random.default_rng([13, seed])
    colours, positions, backgrounds = list(world.COLOURS), list(world.POSITIONS), list(world.BACKGROUNDS)
    layouts = [random_layout(rng, colours[i % 6], positions[i % 3], backgrounds[i % 4]) for i in range(n)]
    stars = np.stack([render_subject(layout, 10_000 + i) for i, layout in enumerate(layouts)])
    others = sample_scenes(n, seed=seed, split="heldout")
    sets = {"raw": (stars, others.images)}
    if pipe is not None:
        sets["vae"] = (vae_round_trip(pipe.vae, stars), vae_round_trip(pipe.vae, others.images))
    report = {"min_strength": FIVE_FOLD_MIN, "min_share": FIVE_FOLD_SHARE_MIN, "n_per_class": n}
    for name, (positive, negative) in sets.items():
        hits, false_alarms = np.mean(shows_subject(positive)), np.mean(shows_subject(negative))
        report[name] = {"star_recall": float(hits), "false_positive_rate": float(false_alarms),
                        "accuracy": float((hits + 1 - false_alarms) / 2),
                        "star_strength_min": min(five_fold_scores(im)[0] for im in positive),
                        "other_strength_max": max(five_fold_scores(im)[0] for im in negative)}
    if pipe is not None:
        generated = generate(pipe, others.prompts, seeds=range(seed, seed + n), num_inference_steps=steps,
                             progress=False).images
        report["generated"] = {"false_positive_rate": float(np.mean(shows_subject(generated))),
                               "other_strength_max": max(five_fold_scores(im)[0] for im in generated)}
    return report


def subject_spec(prompt: str, subject: str, subject_colour: str):
    """What a subject prompt asks for, as the oracle's PromptSpec: the subject read as one object (a stand-in
    world shape, never scored), with the subject's own colour when the prompt names none."""
    if subject not in prompt:
        raise ValueError(f"prompt {prompt!r} does not contain the subject {subject!r}")
    spec = parse_prompt(prompt.replace(subject, world.SHAPES[0]))
    if len(spec.objects) != 1:
        raise ValueError(f"prompt {prompt!r} asks for {len(spec.objects)} objects; context prompts hold the subject")
    spec.objects[0].setdefault("colour", subject_colour)
    return spec


def context_scores(images, prompts: list[str], subject: str, subject_colour: str) -> list[dict]:
    """Per distinct prompt, then over all ("all prompts"): the share of pictures that show the subject
    (`fidelity`), and, read by the toy's oracle, that hold one object at the asked position, with the asked
    colour, on the asked background (when stated); `all` = the subject shown with every one of those right."""
    readings = read_images(load_oracle(), images)
    shown = shows_subject(images)
    per_image = []
    for reading, prompt, star in zip(readings, prompts, shown, strict=True):
        spec = subject_spec(prompt, subject, subject_colour)
        position, colour = matches(reading, spec, ("position",)), matches(reading, spec, ("colour",))
        background = spec.background is None or reading.background == spec.background
        per_image.append({"prompt": prompt, "fidelity": star, "position": position, "background": background,
                          "colour": colour, "all": star and position and colour and background})
    rows = []
    for prompt in [*dict.fromkeys(prompts), None]:
        group = [row for row in per_image if prompt is None or row["prompt"] == prompt]
        scores = {key: float(np.mean([row[key] for row in group]))
                  for key in ("fidelity", "position", "background", "colour", "all")}
        rows.append({"prompt": prompt or "all prompts", "n": len(group), **scores})
    return rows

# ---------------------------------------------------------------------------------------------------
# The user's own pictures (SD 1.5 on Kaggle/Colab)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def check_instance_images(images: np.ndarray, size: tuple[int, int], min_images: int = MIN_INSTANCE_IMAGES,
                          kind: str = "instance") -> None:
    """Refuse too few pictures, or pictures that are not (N, height, width, 3) uint8 at the model's size
    (`kind`: whose pictures, "instance" or "class", for the message)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{kind} images must be uint8 RGB (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(images) < min_images:
        raise ValueError(f"{len(images)} instance images are too few: DreamBooth needs at least {min_images} "
                         "pictures of the subject (3-5 is usual), or it learns one picture instead of a subject")
    if tuple(images.shape[1:3]) != tuple(size):
        raise ValueError(f"{kind} images are {images.shape[1]}×{images.shape[2]} but the model trains at "
                         f"{size[0]}×{size[1]} (H×W): resize them first, e.g. with fit_images(images, {tuple(size)})")


def fit_images(images, size: tuple[int, int]) -> np.ndarray:
    """PIL images (or arrays) centre-cropped to the aspect of `size` and resized to it: uint8 (N, H, W, 3)."""
    from PIL import ImageOps

    height, width = size
    return np.stack([np.asarray(ImageOps.fit(to_pil(im).convert("RGB"), (width, height))) for im in images])


def load_instance_folder(folder: str | Path, prompt: str, size: tuple[int, int], fit: bool = False) -> InstanceImages:
    """The pictures in `folder`, each captioned `prompt`; `fit=True` centre-crops and resizes them to `size`,
    otherwise any picture of another size is an error (nothing is resized behind your back)."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"instance folder {folder} does not exist: upload the subject's photos there")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    pictures = [Image.open(p).convert("RGB") for p in files]
    if fit:
        images = fit_images(pictures, size) if pictures else np.zeros((0, *size, 3), np.uint8)
    else:
        wrong = [f"{p.name} ({im.height}×{im.width})" for p, im in zip(files, pictures) if im.size != size[::-1]]
        if wrong:
            raise ValueError(f"{len(wrong)} pictures in {folder} are not {size[0]}×{size[1]}: {wrong[:3]}; "
                             "pass fit=True to centre-crop and resize them")
        images = np.stack([np.asarray(im) for im in pictures]) if pictures else np.zeros((0, *size, 3), np.uint8)
    check_instance_images(images, size)
    return InstanceImages(images, [prompt] * len(images))


SAMPLE_SUBJECT_REPO = "diffusers/dog-example"  # diffusers' DreamBooth docs train on it: 5 photos of one dog
SAMPLE_SUBJECT_CLASS = "dog"


def instance_dir_candidates(instance_dir: str | Path) -> list[Path]:
    """Where `instance_dir` may be, as absolute paths: itself when absolute; else in the working directory, then in
    the outputs folder. The working directory differs between runs (papermill: notebooks/; Colab: /content)."""
    path = Path(instance_dir).expanduser()
    if path.is_absolute():
        return [path]
    return list(dict.fromkeys([(Path.cwd() / path).resolve(), (outputs_dir() / path).resolve()]))


def picture_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def find_instance_dir(instance_dir: str | Path) -> tuple[Path | None, str]:
    """(the folder of the user's photos, what was found): the first candidate (`instance_dir_candidates`) that
    holds pictures, else None and where it looked."""
    if not str(instance_dir).strip():
        return None, "INSTANCE_DIR is empty"
    candidates = instance_dir_candidates(instance_dir)
    for folder in candidates:
        if picture_files(folder):
            return folder, f"INSTANCE_DIR {str(instance_dir)!r}: the photos in {folder}"
    looked = "; ".join(f"{c} ({'holds no pictures' if c.is_dir() else 'does not exist'})" for c in candidates)
    return None, f"INSTANCE_DIR {str(instance_dir)!r} holds no photos: looked in {looked}"


def upload_hint(instance_dir: str | Path) -> str:
    """Where to put the photos so that INSTANCE_DIR finds them."""
    folder = instance_dir_candidates(str(instance_dir).strip() or "my_subject")[0]
    return (f"upload 3-5 photos of one subject ({', '.join(IMAGE_SUFFIXES)}) into {folder} (Colab: the Files panel "
            "on the left; Kaggle: Add Input > Upload, then set INSTANCE_DIR to its folder under /kaggle/input) and set "
            f"INSTANCE_DIR = {str(instance_dir).strip() or 'my_subject'!r}")


def download_sample_subject(instance_dir: str | Path = "") -> Path:
    """The folder of diffusers' sample subject (`SAMPLE_SUBJECT_REPO`, through the hub cache); a clear error, with
    where to upload your own photos, when it cannot be had (no internet, HF_HUB_OFFLINE without it in the cache)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(SAMPLE_SUBJECT_REPO, repo_type="dataset", ignore_patterns=[".gitattributes"]))
    except Exception as error:
        raise FileNotFoundError(
            f"No photos of a subject, and diffusers' sample subject {SAMPLE_SUBJECT_REPO} could not be fetched "
            f"({type(error).__name__}: {error}): {upload_hint(instance_dir)}") from error
    if not picture_files(folder):
        raise FileNotFoundError(f"{SAMPLE_SUBJECT_REPO} ({folder}) holds no pictures: {upload_hint(instance_dir)}")
    return folder


def subject_photos(instance_dir: str | Path, prompt: str, size: tuple[int, int], fit: bool = True,
                   class_noun: str = SAMPLE_SUBJECT_CLASS) -> InstanceImages:
    """The user's photos from `instance_dir` (found by `find_instance_dir`), or, when there are none, diffusers'
    sample dog from the hub, said so, with where to upload your own. A sample dog is captioned `prompt` too, so a
    `class_noun` other than "dog" is pointed out."""
    folder, found = find_instance_dir(instance_dir)
    print(found)
    if folder is None:
        folder = download_sample_subject(instance_dir)
        print(f"using diffusers' sample subject {SAMPLE_SUBJECT_REPO} ({len(picture_files(folder))} photos of a "
              f"{SAMPLE_SUBJECT_CLASS}, {folder}); to use yours, {upload_hint(instance_dir)}")
        if class_noun != SAMPLE_SUBJECT_CLASS:
            print(f"note: the sample subject is a {SAMPLE_SUBJECT_CLASS}, but CLASS_NOUN is {class_noun!r}")
    return load_instance_folder(folder, prompt, size, fit=fit)


# ---------------------------------------------------------------------------------------------------
# Training data: the subject's pictures and the prior-preservation pictures, as latents and prompt embeddings


@dataclass
class DreamBoothData:
    """Everything one fine-tune step draws from: VAE latents (unscaled posterior means, as helpers.toy.training
    caches them) and frozen-text-encoder embeddings of the captions, instance rows first."""

    latents: torch.Tensor  # (N, 4, h, w)
    prompt_embeds: torch.Tensor  # (N, 77, hidden)
    is_instance: torch.Tensor  # (N,) bool
    pixel_weight: torch.Tensor | None = None  # (N, 1, h, w) loss weight per latent pixel; None: all 1
    empty_prompt_embeds: torch.Tensor | None = None  # (1, 77, hidden): the empty prompt, guidance's other half
    class_images: list = field(default_factory=list)  # the prior-preservation pictures, to look at

    @property
    def instance_index(self) -> torch.Tensor:
        return torch.nonzero(self.is_instance).flatten()

    @property
    def class_index(self) -> torch.Tensor:
        return torch.nonzero(~self.is_instance).flatten()


@torch.inference_mode()
def instance_latents(pipe, images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> VAE posterior means (N, 4, H/f, W/f), unscaled."""
    vae = pipe.vae
    pixels = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).to(vae.device, vae.dtype) / 127.5 - 1
    return vae.encode(pixels).latent_dist.mode().float()


@torch.inference_mode()
def caption_embeddings(pipe, prompts: list[str]) -> torch.Tensor:
    """Frozen text-encoder embeddings (N, 77, hidden), tokenized as the toy was trained."""

    ids = tokenize(pipe.tokenizer, prompts).to(pipe.text_encoder.device)  # (N, 77)
    return pipe.text_encoder(ids)[0].float()


def training_data(pipe, instance: InstanceImages, class_prompts: Sequence[str], *, class_pictures=None,
                  seed: int = 0, num_inference_steps: int = 20, guidance_scale: float = 7.5, batch_size: int = 16,
                  object_weight: float = 1.0) -> DreamBoothData:
    """The instance pictures plus one prior-preservation picture per class prompt: `class_pictures` (uint8
    (N, H, W, 3), one per prompt: pictures of the kind the model was trained on, encoded by its VAE), or else
    pictures the model itself generates through helpers.core.stages.generate (seeds seed, seed+1, ...), kept as the
    latents it denoised.

    `object_weight` > 1 weighs latent pixels on an object (off the background colour, as the toy's pictures are)
    that much more in the loss, as the toy was trained (helpers.toy.training.OBJECT_LOSS_WEIGHT): the star's points
    are a few latent pixels of a mostly flat picture. Leave it at 1 for photos."""
    class_prompts = list(class_prompts)
    if class_pictures is None:
        class_latents, class_images = generated_class_latents(pipe, class_prompts, seed, num_inference_steps,
                                                              guidance_scale, batch_size)
    else:
        class_latents, class_images = given_class_latents(pipe, class_prompts, class_pictures)
    prompts = [*instance.prompts, *class_prompts]
    is_instance = torch.arange(len(prompts)) < len(instance.prompts)
    latents = torch.cat([instance_latents(pipe, instance.images), class_latents]).cpu()  # (N, 4, h, w)
    pixel_weight = None
    if object_weight != 1.0:
        pictures = [*instance.images, *(np.asarray(im.convert("RGB")) for im in class_images)]
        pixel_weight = object_pixel_weights(pictures, latents.shape[-1], object_weight)
    return DreamBoothData(latents, caption_embeddings(pipe, prompts).cpu(), is_instance, pixel_weight=pixel_weight,
                          class_images=class_images, empty_prompt_embeds=caption_embeddings(pipe, [""]).cpu())


def generated_class_latents(pipe, class_prompts: list[str], seed: int, num_inference_steps: int,
                            guidance_scale: float, batch_size: int) -> tuple[torch.Tensor, list]:
    """The model's own pictures for `class_prompts`: (N, 4, h, w) latents, unscaled like the VAE's means, and the
    PIL pictures."""
    latents, images = [], []
    for start in range(0, len(class_prompts), batch_size):
        chunk = class_prompts[start : start + batch_size]
        result = generate(pipe, chunk, seeds=range(seed + start, seed + start + len(chunk)),
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, progress=False)
        latents.append(result.latents.float().cpu() / pipe.vae.config.scaling_factor)
        images += result.images
    return torch.cat(latents), images


def given_class_latents(pipe, class_prompts: list[str], class_pictures) -> tuple[torch.Tensor, list]:
    """Class pictures the caller has (uint8 (N, H, W, 3), one per prompt) -> their VAE latents and PIL pictures."""
    from PIL import Image

    pictures = np.asarray(class_pictures)
    if len(pictures) != len(class_prompts):
        raise ValueError(f"{len(pictures)} class pictures for {len(class_prompts)} class prompts: give one picture "
                         "per prompt (its caption)")
    check_instance_images(pictures, default_size(pipe), min_images=len(pictures), kind="class")
    return instance_latents(pipe, pictures).cpu(), [Image.fromarray(p) for p in pictures]


def object_pixel_weights(pictures, latent_size: int, object_weight: float) -> torch.Tensor:
    """uint8 pictures -> (N, 1, h, w) loss weights: `object_weight` on latent pixels an object touches."""

    masks = torch.from_numpy(np.stack([image_object_mask(p) for p in pictures])).float()  # (N, H, W)
    # object_pixel_weight thresholds depth maps at the world's object depth; a 0/1 mask passes it the same way
    return object_pixel_weight(masks, latent_size, object_weight)


# ---------------------------------------------------------------------------------------------------
# The LoRA adapter and its fine-tune


def add_lora(unet, rank: int = 4, alpha: float | None = None,
             target_modules: Sequence[str] = tuple(LORA_TARGET_MODULES)) -> int:
    """Freeze the UNet and add a LoRA adapter (rank `rank`) to the layers named `target_modules` (default: the
    attention projections); returns the number of trainable parameters. Gaussian init: B starts at zero, so the
    adapter starts as a no-op."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"rank={rank} must be at least 1")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                target_modules=list(target_modules)))
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


@dataclass
class TrainingLog:
    losses: list[float]  # per step: instance loss + prior_loss_weight * prior loss
    seconds: float
    steps: int
    eval_loss_before: float  # subject pictures at fixed noise and timesteps: lower = the subject is learned
    eval_loss_after: float
    trainable_parameters: int
    precision: str = "float32"  # the UNet's: "float16" trains under autocast with a gradient scaler
    grad_scaler: bool = False  # fp16: the loss was scaled so that the adapter's small gradients do not underflow
    skipped_steps: int = 0  # fp16: steps the scaler skipped (a gradient overflowed), lowering its scale instead


def eval_loss(pipe, data: DreamBoothData, scheduler, seed: int = 0, repeats: int = 4) -> float:
    """The instance loss on fixed noise and timesteps (the same every call): a fair before/after comparison."""

    generator = torch.Generator().manual_seed(seed)
    idx = data.instance_index.repeat(repeats)
    noisy, target, timesteps = noisy_latents_batch({"mean": data.latents}, idx, pipe.vae.config.scaling_factor,
                                                   scheduler, generator)
    with torch.no_grad():
        prediction = unet_prediction(pipe.unet, noisy, timesteps, data.prompt_embeds[idx])
    weight = None if data.pixel_weight is None else data.pixel_weight[idx]
    return float(diffusion_loss(prediction, target, weight))


def unet_prediction(unet, noisy: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
    """The UNet's output in float32; a half-precision UNet runs under autocast to its dtype (its fp32 adapter and
    fp32 inputs meet its fp16 weights there), on whatever device holds it."""
    device, dtype = unet.device, unet.dtype
    with torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.float16, torch.bfloat16)):
        prediction = unet(noisy.to(device), timesteps.to(device), encoder_hidden_states=prompt_embeds.to(device)).sample
    return prediction.float().cpu()  # (B, 4, h, w)


def train_lora(pipe, data: DreamBoothData, *, steps: int, learning_rate: float = 1e-3, batch_size: int = 4,
               prior_loss_weight: float = 1.0, prior_caption_dropout: float = 0.0, prior_target: str = "picture",
               rank: int = 4, target_modules: Sequence[str] = tuple(LORA_TARGET_MODULES), seed: int = 0,
               gradient_checkpointing: bool = False, progress: bool = True) -> TrainingLog:
    """DreamBooth: add a LoRA adapter to `pipe.unet` and fine-tune it for `steps` steps of `batch_size` subject
    pictures plus `batch_size` prior pictures (loss = subject loss + prior_loss_weight · prior loss), with the
    toy trainer's noising, loss, warm-up + cosine learning rate and gradient clipping.

    `prior_caption_dropout` trains that share of the prior pictures with the empty prompt, as the model itself was
    trained: classifier-free guidance amplifies the difference between the prompt's and the empty prompt's
    predictions, so an adapter that drifts the empty prompt's (never trained otherwise) changes every picture.

    `prior_target` is what the prior pictures are trained towards: "picture", classic DreamBooth, the noise (or v)
    that made the noisy latents, whose random part the adapter chases as noise; or "base model", the frozen base
    model's own prediction for the same noisy latents and caption (the adapter switched off): the adapter is pulled
    back exactly where it changes the model, and an untouched model has zero prior loss. On the toy, 400 steps on its
    own guided pictures with "picture" lost 28 points of held-out prompt adherence without ever seeing the star.

    An fp16 UNet (SD 1.5 on a T4) trains as diffusers' train_dreambooth_lora does with mixed_precision="fp16": the
    adapter's weights in fp32, the forward pass under fp16 autocast, and the loss scaled by a gradient scaler, since
    a LoRA's gradients are small enough to underflow to zero in fp16; a step whose gradients overflow is skipped and
    the scale lowered (`TrainingLog.skipped_steps`)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import cast_training_params
    from tqdm.auto import tqdm


    check_training_settings(data, steps, batch_size, prior_loss_weight, prior_caption_dropout, prior_target)
    unet = pipe.unet
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the model's training schedule and target
    before = eval_loss(pipe, data, scheduler, seed)
    trainable = add_lora(unet, rank, target_modules=target_modules)
    cast_training_params(unet, dtype=torch.float32)  # fp16 base weights, fp32 adapter (diffusers' recipe)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=1e-2)
    scaler = grad_scaler(unet)  # disabled (a pass-through) unless the UNet is fp16
    skipped = 0
    generator = torch.Generator().manual_seed(seed)
    latents, scaling_factor = {"mean": data.latents}, pipe.vae.config.scaling_factor
    losses, started = [], time.perf_counter()
    unet.train()
    for step in tqdm(range(steps), desc="LoRA", disable=not progress, mininterval=PROGRESS_EVERY_S):
        set_lr(optimizer, learning_rate * cosine_lr(step / steps))
        idx = torch.cat([pick(data.instance_index, batch_size, generator), pick(data.class_index, batch_size,
                                                                                generator)])
        noisy, target, timesteps = noisy_latents_batch(latents, idx, scaling_factor, scheduler, generator)
        prompt_embeds = drop_prior_captions(data, idx, batch_size, prior_caption_dropout, generator)  # (2B, 77, d)
        prediction = unet_prediction(unet, noisy, timesteps, prompt_embeds)  # (2B, 4, h, w)
        weight = None if data.pixel_weight is None else data.pixel_weight[idx]  # (2B, 1, h, w)
        instance_loss = diffusion_loss(prediction[:batch_size], target[:batch_size], part(weight, 0, batch_size))
        prior_loss = 0.0
        if batch_size < len(idx):
            if prior_target == "base model":
                target = target.clone()
                target[batch_size:] = base_prediction(unet, noisy[batch_size:], timesteps[batch_size:],
                                                      prompt_embeds[batch_size:])
            prior_loss = diffusion_loss(prediction[batch_size:], target[batch_size:], part(weight, batch_size, None))
        loss, stepped = scaled_step(optimizer, scaler, instance_loss + prior_loss_weight * prior_loss)
        losses.append(loss)
        skipped += not stepped
    seconds = time.perf_counter() - started
    unet.eval()
    return TrainingLog(losses, seconds, steps, before, eval_loss(pipe, data, scheduler, seed), trainable,
                       precision=str(unet.dtype).removeprefix("torch."), grad_scaler=scaler.is_enabled(),
                       skipped_steps=skipped)


def grad_scaler(unet) -> torch.amp.GradScaler:
    """A gradient scaler for an fp16 UNet (fp16's smallest normal number, 6e-5, is above many of a LoRA's
    gradients); disabled, a pass-through, for fp32 and bf16 (which has fp32's range)."""
    return torch.amp.GradScaler(unet.device.type, enabled=unet.dtype == torch.float16)


def scaled_step(optimizer, scaler: torch.amp.GradScaler, loss: torch.Tensor,
                max_grad_norm: float = 1.0) -> tuple[float, bool]:
    """Backpropagate the scaled loss, clip the unscaled gradients' norm to `max_grad_norm` and step, unless a
    gradient overflowed (the scaler then skips the step and lowers its scale); (the loss, whether it stepped).
    With a disabled scaler this is helpers.toy.training.optimizer_step."""
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    params = [param for group in optimizer.param_groups for param in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return loss.item(), not scaler.is_enabled() or scaler.get_scale() >= scale


@torch.no_grad()
def base_prediction(unet, noisy: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
    """The UNet's output with its adapter switched off: what the base model predicts (float32, (B, 4, h, w))."""
    unet.disable_adapters()
    try:
        return unet_prediction(unet, noisy, timesteps, prompt_embeds)
    finally:
        unet.enable_adapters()


def drop_prior_captions(data: DreamBoothData, idx: torch.Tensor, n_instance: int, p: float,
                        generator: torch.Generator) -> torch.Tensor:
    """The captions' embeddings of the batch `idx`, with a share `p` of its prior rows (after the first
    `n_instance`) replaced by the empty prompt's."""
    prompt_embeds = data.prompt_embeds[idx].clone()
    if p > 0:
        drop = torch.rand(len(idx), generator=generator) < p
        drop[:n_instance] = False  # the subject's pictures always keep their caption
        prompt_embeds[drop] = data.empty_prompt_embeds[0]
    return prompt_embeds


def part(weight: torch.Tensor | None, start: int, stop: int | None) -> torch.Tensor | None:
    return None if weight is None else weight[start:stop]


def pick(index: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` entries of `index` drawn with replacement (empty when `index` is)."""
    if len(index) == 0:
        return index
    return index[torch.randint(len(index), (n,), generator=generator)]


PRIOR_TARGETS = ("picture", "base model")


def check_training_settings(data: DreamBoothData, steps: int, batch_size: int, prior_loss_weight: float,
                            prior_caption_dropout: float = 0.0, prior_target: str = "picture") -> None:
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    if not 0 <= prior_caption_dropout < 1:
        raise ValueError(f"prior_caption_dropout={prior_caption_dropout} must be in [0, 1): the share of prior "
                         "pictures trained with the empty prompt")
    if prior_target not in PRIOR_TARGETS:
        raise ValueError(f"prior_target={prior_target!r} must be one of {PRIOR_TARGETS}: the class picture's own "
                         "noise target, or the base model's prediction for the same noisy latents")
    if prior_caption_dropout > 0 and data.empty_prompt_embeds is None:
        raise ValueError("prior_caption_dropout > 0 needs the empty prompt's embedding (training_data makes it)")
    if prior_loss_weight < 0:
        raise ValueError(f"prior_loss_weight={prior_loss_weight} must be >= 0 (0 turns prior preservation off)")
    if prior_loss_weight > 0 and len(data.class_index) == 0:
        raise ValueError("prior_loss_weight > 0 needs class pictures: pass class_prompts to training_data, "
                         "or set prior_loss_weight=0 for no prior preservation")
    if len(data.instance_index) == 0:
        raise ValueError("the training data holds no subject pictures")


# ---------------------------------------------------------------------------------------------------
# Saving and loading the adapter


def save_lora(pipe, folder: str | Path) -> Path:
    """Write the UNet's adapter with StableDiffusionPipeline.save_lora_weights (diffusers' key layout); the file."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet_lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=unet_lora_layers, safe_serialization=True,
                                              weight_name=LORA_WEIGHT_NAME)
    return Path(folder) / LORA_WEIGHT_NAME


LORA_KEY_PARTS = {".lora.down.": "A", ".lora.up.": "B", ".lora_A.": "A", ".lora_B.": "B"}  # diffusers', peft's


def lora_key_layer(key: str) -> tuple[str, str]:
    """'unet.<layer>.lora.down.weight' (or peft's lora_A) -> ('<layer>', 'A'); A maps inputs, B outputs."""
    for part, kind in LORA_KEY_PARTS.items():
        if part in key:
            return key.removeprefix("unet.").split(part)[0], kind
    raise ValueError(f"{key!r} is not a LoRA weight (no {' / '.join(LORA_KEY_PARTS)} in its name)")


def check_lora_file(unet, path: str | Path) -> None:
    """Refuse a LoRA file whose layers this UNet does not have, or has at other sizes (made for another model)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {path}")
    modules = dict(unet.named_modules())
    with safe_open(str(path), framework="pt") as file:
        for key in file.keys():
            name, kind = lora_key_layer(key)
            layer = modules.get(name)
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                raise ValueError(f"{path.name} was made for another model: it adapts a layer {name!r} that this "
                                 "UNet does not have; load it into the model it was trained on")
            shape = file.get_slice(key).get_shape()  # A: (rank, inputs[, k, k]), B: (outputs, rank[, 1, 1])
            inputs, outputs = layer.weight.shape[1], layer.weight.shape[0]  # Linear and Conv2d alike
            got, expected = (shape[1], inputs) if kind == "A" else (shape[0], outputs)
            if got != expected:
                raise ValueError(f"{path.name} was made for another model: its {name} has {got} "
                                 f"{'inputs' if kind == 'A' else 'outputs'}, this UNet's has {expected}; "
                                 "load it into the model it was trained on")


def lora_of_another_model(model: str, folder: str | Path) -> Path:
    """A LoRA file made for another model than `model` (the tiny random one's; the toy's for the tiny random model),
    saved in `folder`: what `load_lora` must refuse."""
    other = load_pipeline("tiny-random" if model != "tiny-random" else "toy")
    add_lora(other.unet, rank=2)
    return save_lora(other, folder)


def load_lora(pipe, path: str | Path, adapter_name: str | None = None) -> None:
    """`pipe.load_lora_weights` after `check_lora_file`, so an adapter for another model is a clear error."""
    check_lora_file(pipe.unet, path)
    pipe.load_lora_weights(str(Path(path).parent), weight_name=Path(path).name, adapter_name=adapter_name)
