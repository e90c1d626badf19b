"""Train a small byte-level BPE on a caption corpus and write it as CLIPTokenizer files.

    merges = train_bpe(shapes.all_captions())
    write_clip_tokenizer(folder, merges, model_max_length=16)
    CLIPTokenizer.from_pretrained(folder)   # or dag_jax.pipeline.load_tokenizer(folder)

The vocabulary follows CLIP's layout: the 256 byte symbols, the same with ``</w>`` (end of
word), one entry per merge, then ``<|startoftext|>`` and ``<|endoftext|>``. Since every byte is
in it, any text still tokenizes (unknown words fall apart into bytes); words of the corpus
become single tokens once enough merges are learnt.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable
from pathlib import Path

from dag_jax.tinyworld.random_tiny import write_byte_tokenizer

# CLIP's pre-tokenizer, restricted to what lowercased ASCII captions contain
_WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def word_counts(texts: Iterable[str]) -> collections.Counter:
    """Return how often each pre-token occurs, as a tuple of symbols ending in ``</w>``."""
    counts: collections.Counter = collections.Counter()
    for text in texts:
        for word in _WORD.findall(text.lower()):
            counts[tuple(word[:-1]) + (word[-1] + "</w>",)] += 1
    return counts


def _pair_counts(words: collections.Counter) -> collections.Counter:
    pairs: collections.Counter = collections.Counter()
    for symbols, n in words.items():
        for pair in zip(symbols, symbols[1:], strict=False):
            pairs[pair] += n
    return pairs


def _apply(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def train_bpe(texts: Iterable[str], max_merges: int = 1000, min_count: int = 2) -> list[str]:
    """Return merges ("a b" lines), most frequent pair first; ties broken alphabetically.

    Stops after ``max_merges`` or when no pair occurs ``min_count`` times. Deterministic.
    """
    words = word_counts(texts)
    merges: list[str] = []
    while len(merges) < max_merges:
        pairs = _pair_counts(words)
        if not pairs:
            break
        best, n = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if n < min_count:
            break
        merges.append(f"{best[0]} {best[1]}")
        words = collections.Counter({_apply(s, best): c for s, c in words.items()})
    return merges


def write_clip_tokenizer(folder: str | Path, merges: list[str], model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json for ``CLIPTokenizer``."""
    return write_byte_tokenizer(Path(folder), tuple(merges), model_max_length)
