"""CLIP's tokenizer rule restated in plain Python (OpenAI CLIP's SimpleTokenizer, without its optional
ftfy/html clean-up, which transformers does not apply either): the oracle for our tokenizer's ids.

NFC, runs of whitespace -> one space, lower case; split with CLIP's regex; each piece's UTF-8 bytes
as byte-level characters; BPE, merging the lowest-ranked adjacent pair first, the last character
carrying `</w>`; ids from the vocabulary, between BOS and EOS.
"""

from __future__ import annotations

import re
import unicodedata

import regex

from cfgbasin_jax.models.tokenizer import BOS_TOKEN, EOS_TOKEN, bytes_to_unicode

SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def read_bpe(folder) -> tuple[dict, dict]:
    """(vocab token -> id, merge pair -> rank) from a folder's vocab.json and merges.txt."""
    import json
    from pathlib import Path

    folder = Path(folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    pairs = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    return vocab, {pair: rank for rank, pair in enumerate(pairs)}


def _bpe(piece: str, ranks: dict) -> list[str]:
    if piece in (BOS_TOKEN, EOS_TOKEN):
        return [piece]
    symbols = list(piece[:-1]) + [piece[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, _ = min(pairs)
        if rank == float("inf"):
            break
        first, second = next(pair for pair in zip(symbols, symbols[1:]) if ranks.get(pair) == rank)
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == (first, second):
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def clip_ids(text: str, vocab: dict, ranks: dict) -> list[int]:
    """BOS, the BPE token ids of `text`, EOS (no truncation, no padding)."""
    byte_chars = bytes_to_unicode()
    text = re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()
    ids = [vocab[BOS_TOKEN]]
    for piece in SPLIT.findall(text):
        encoded = "".join(byte_chars[b] for b in piece.encode("utf-8"))
        ids += [vocab[symbol] for symbol in _bpe(encoded, ranks)]
    return ids + [vocab[EOS_TOKEN]]


def padded(ids: list[int], length: int, eos: int) -> list[int]:
    """SD's pipeline rule: truncate to `length` keeping EOS last, pad with EOS."""
    return ids[: length - 1] + [eos] if len(ids) > length else ids + [eos] * (length - len(ids))
