"""CLIP's byte-level BPE tokenizer: load one from local files, write small vocabularies.

Loading uses transformers' Rust-backed CLIP tokenizer (`CLIPTokenizerFast`; in transformers 5.x the
same class is also named `CLIPTokenizer`). The same `tokenizers` pipeline runs on transformers 4.50+
and 5.x (NFC, whitespace squeeze, lower case, CLIP's split regex, byte-level BPE with `</w>` word
ends, BOS/EOS added), so a folder gives the same ids on both stacks. transformers 4.x's pure-Python
`CLIPTokenizer` is not used: it is gone in 5.x.

`write_bpe_tokenizer(dir, words)` writes a CLIP-layout vocabulary (256 byte characters, their `</w>`
forms, merge results, BOS, EOS) whose learned merges make every word in `words` one token; any other
text falls back to bytes. The tiny test models and the toy model use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
# The files a CLIP tokenizer folder may hold (vocab.json + merges.txt, or tokenizer.json).
FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "added_tokens.json")


class TokenizerError(ValueError):
    """A folder that holds no loadable CLIP tokenizer (the message names the folder)."""


def bytes_to_unicode() -> dict[int, str]:
    """Byte value -> the printable character that stands for it in CLIP's (and GPT-2's) vocabulary.

    The printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68
    bytes, in increasing order, become chr(256), chr(257), ... Iteration order (which fixes the
    first 256 vocabulary ids) is the printable bytes first, then the others.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {**{byte: chr(byte) for byte in printable}, **{byte: chr(256 + n) for n, byte in enumerate(others)}}


def _merge(symbols: tuple, pair: tuple) -> tuple:
    out, index = [], 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == pair:
            out.append(symbols[index] + symbols[index + 1])
            index += 2
        else:
            out.append(symbols[index])
            index += 1
    return tuple(out)


def learn_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges over `words` (each counted once per occurrence, last character marked `</w>`):
    the most frequent adjacent pair first, ties by the pair's name, until every word is one symbol."""
    sequences = [tuple(word[:-1]) + (word[-1] + "</w>",) for word in words]
    merges = []
    while True:
        counts: dict = {}
        for symbols in sequences:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        sequences = [_merge(symbols, best) for symbols in sequences]


def bpe_vocabulary(words: Sequence[str]) -> tuple[dict, list]:
    """(vocab: token -> id, merges [(a, b)]) in CLIP's layout: byte characters, their `</w>` forms,
    new merge results in merge order, then BOS and EOS."""
    characters = list(bytes_to_unicode().values())
    tokens = characters + [c + "</w>" for c in characters]
    known = set(tokens)
    merges = learn_merges(words)
    for a, b in merges:
        if a + b not in known:
            known.add(a + b)
            tokens.append(a + b)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_bpe_tokenizer(directory, words: Sequence[str], model_max_length: int) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json of
    `bpe_vocabulary(words)` to `directory` (created); `load_tokenizer(directory)` reads it offline."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = bpe_vocabulary(words)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
    )
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        **special,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return directory


def load_tokenizer(folder) -> Any:
    """The CLIP tokenizer of `folder` (vocab.json + merges.txt, or tokenizer.json), local files only.

    Returns transformers' `CLIPTokenizerFast`: call it like any transformers tokenizer; it has
    `model_max_length` and `save_pretrained`. Raises TokenizerError naming the folder.
    """
    from transformers import CLIPTokenizerFast

    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerError(f"missing tokenizer folder {folder}")
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_bpe and not (folder / "tokenizer.json").is_file():
        raise TokenizerError(f"{folder}: no CLIP tokenizer files (need vocab.json and merges.txt, or tokenizer.json)")
    try:
        return CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers raises OSError/ValueError/TypeError/KeyError/... for bad files
        raise TokenizerError(f"{folder}: cannot load a CLIP tokenizer ({type(err).__name__}: {err})") from err


def save_tokenizer(tokenizer, directory) -> Path:
    """`tokenizer.save_pretrained(directory)`, plus vocab.json and merges.txt where it wrote only
    tokenizer.json (transformers 5.x does): a folder saved on any stack loads on 4.x and 5.x,
    including transformers 4.x's pure-Python CLIPTokenizer, which reads only vocab.json + merges.txt."""
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory))
    if not ((directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()):
        tokenizer.backend_tokenizer.model.save(str(directory))
    return directory
