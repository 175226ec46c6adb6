"""A CLIP tokenizer the project builds itself, because the hub (and SD 1.5's vocab.json) is out of reach.

It is a real `transformers.CLIPTokenizer`: the same byte-level BPE, lower-casing, `<|startoftext|>` /
`<|endoftext|>` specials and 77-token padding as SD 1.5's, only with a small vocabulary learned by the
`tokenizers` BPE trainer from a word list, so every word of that list is one token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # SD 1.5 pads with the end token too
MODEL_MAX_LENGTH = 77  # CLIP ViT-L/14's max_position_embeddings

# Words of typical prompts; the toy world adds its own vocabulary on top.
DEFAULT_WORDS = """
a an the of on in at with and photo painting picture drawing portrait of astronaut riding horse cat dog
car house tree mountain sky sea beach city street forest flower man woman child red green blue yellow
purple orange white black pink brown grey gray small big large tiny huge left right top bottom center
middle near far background foreground high quality detailed realistic blurry ugly low resolution
""".split()


def _bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Learn BPE merges (CLIP style, `</w>` end-of-word suffix) until every word is one token.

    The trainer breaks ties between equally frequent pairs in hash-map order (huggingface/tokenizers#1794), so two
    builds can swap the ids of a few word pieces ("st</w>" and "se</w>" between the last two toy rebuilds). Whole
    words, the only tokens captions use, kept their ids, so the trained text encoder does not depend on it."""
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,  # never the limit: stop only when no pair is left to merge
        min_frequency=1,
        initial_alphabet=ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tokenizer.train_from_iterator(words, trainer)
    return [tuple(pair) for pair in json.loads(tokenizer.to_str())["model"]["merges"]]


def build_clip_tokenizer(
    words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = MODEL_MAX_LENGTH
) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary holds all 512 byte symbols plus one token per word in `words`."""
    words = sorted({w.lower() for w in words})
    if not words:
        raise ValueError("build_clip_tokenizer needs at least one word to learn a vocabulary from")
    byte_symbols = sorted(ByteLevel.alphabet())  # sorted: deterministic ids
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    merges = _bpe_merges(words)
    tokens += ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
    )
