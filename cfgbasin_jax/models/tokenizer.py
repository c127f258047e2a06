"""CLIP's byte-level BPE tokenizer: load one from local files, write small vocabularies.

Loading builds CLIP's pipeline on the `tokenizers` library alone (:class:`ClipTokenizer`; no
transformers, hence no torch on any stack): NFC, whitespace squeeze, lower case, CLIP's split regex,
byte-level BPE with `</w>` word ends, BOS/EOS added -- the pipeline of transformers 5.x's
`CLIPTokenizer` and 4.x's `CLIPTokenizerFast`, so a folder gives their ids (tests/test_tokenizer.py
compares them on the 500 memorized prompts and edge cases).

`write_bpe_tokenizer(dir, words)` writes a CLIP-layout vocabulary (256 byte characters, their `</w>`
forms, merge results, BOS, EOS) whose learned merges make every word in `words` one token; any other
text falls back to bytes. The tiny test models and the toy model use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

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


def _special(config: dict, name: str, default: str) -> str:
    value = config.get(name, default)
    if isinstance(value, dict):  # {"content": ..., "lstrip": ..., ...}
        value = value.get("content", default)
    return default if value is None else str(value)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    value = json.loads(path.read_text(encoding="utf-8"))
    return value if isinstance(value, dict) else {}


def clip_backend(vocab: dict, merges: list, bos: str = BOS_TOKEN, eos: str = EOS_TOKEN, unk: str = EOS_TOKEN):
    """CLIP's `tokenizers` pipeline over a vocabulary and merges: NFC, whitespace runs -> one space,
    lower case; CLIP's split regex; byte-level BPE with `</w>` word ends; BOS ... EOS added."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
    split = Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(split, behavior="removed", invert=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys((bos, eos, unk))])
    backend.post_processor = processors.RobertaProcessing((eos, backend.token_to_id(eos)), (bos, backend.token_to_id(bos)),
                                                          trim_offsets=False, add_prefix_space=False)
    return backend


class Encoded(dict):
    """What a call returns: {"input_ids", "attention_mask"}, also as attributes (like transformers')."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ClipTokenizer:
    """CLIP's tokenizer on the `tokenizers` library alone (no transformers, no torch); gives
    transformers' `CLIPTokenizer` ids (tests/test_tokenizer.py). Called like a transformers tokenizer:

        tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
            return_tensors="np").input_ids      # int64 [B, max_length]: BOS, tokens, EOS, padding

    Truncation keeps BOS, the first ``max_length - 2`` tokens and EOS; padding uses ``pad_token``.
    """

    def __init__(self, backend, model_max_length: int = 77, bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN,
                 pad_token: str = EOS_TOKEN, unk_token: str = EOS_TOKEN, config: dict | None = None):
        self.backend_tokenizer = backend
        self.model_max_length = int(model_max_length)
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.config = dict(config or {})

    def _id(self, token: str) -> int:
        found = self.backend_tokenizer.token_to_id(token)
        if found is None:
            raise TokenizerError(f"special token {token!r} is not in the vocabulary")
        return int(found)

    @property
    def bos_token_id(self) -> int:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        return self._id(self.pad_token)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted({self._id(t) for t in (self.bos_token, self.eos_token, self.pad_token, self.unk_token)})

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, text, padding=False, max_length: int | None = None, truncation=False, return_tensors=None,
                 **_ignored) -> Encoded:
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        rows = [enc.ids for enc in self.backend_tokenizer.encode_batch(texts)]
        limit = max_length if max_length is not None else self.model_max_length
        if truncation:
            rows = [r if len(r) <= limit else r[: limit - 1] + [self.eos_token_id] for r in rows]
        masks = [[1] * len(r) for r in rows]
        width = limit if padding == "max_length" else (max(map(len, rows), default=0) if padding in (True, "longest") else None)
        if width is not None:
            pad = self.pad_token_id
            masks = [m + [0] * (width - len(r)) for r, m in zip(rows, masks)]
            rows = [r + [pad] * (width - len(r)) for r in rows]
        if return_tensors == "np":
            import numpy as np

            rows, masks = np.asarray(rows, dtype=np.int64), np.asarray(masks, dtype=np.int64)
        elif return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r}: only 'np' or None")
        elif single:
            rows, masks = rows[0], masks[0]
        return Encoded(input_ids=rows, attention_mask=masks)

    def tokenize(self, text: str) -> list[str]:
        """The BPE tokens of ``text`` (no BOS/EOS), as transformers' ``tokenize`` gives them."""
        return self.convert_ids_to_tokens(self.backend_tokenizer.encode(text).ids[1:-1])

    def convert_ids_to_tokens(self, ids) -> list[str]:
        """The vocabulary entries of ``ids`` (BPE tokens, ``</w>`` marking a word's end)."""
        return [self.backend_tokenizer.id_to_token(int(i)) for i in ids]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = self.backend_tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return text.replace("</w>", " ").strip()

    def save_pretrained(self, directory) -> Path:
        """tokenizer.json, vocab.json + merges.txt, tokenizer_config.json, special_tokens_map.json:
        readable by this class and by transformers 4.x and 5.x."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend_tokenizer.save(str(directory / "tokenizer.json"))
        self.backend_tokenizer.model.save(str(directory))
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                   "pad_token": self.pad_token}
        config = {"tokenizer_class": "CLIPTokenizer", "do_lower_case": True, "errors": "replace",
                  "add_prefix_space": False, "clean_up_tokenization_spaces": True,
                  **{k: v for k, v in self.config.items() if isinstance(v, (str, int, float, bool)) and k not in special},
                  "model_max_length": self.model_max_length, **special}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
        return directory

    @classmethod
    def from_folder(cls, folder) -> "ClipTokenizer":
        """From vocab.json + merges.txt (preferred) or tokenizer.json, with tokenizer_config.json and
        special_tokens_map.json when present (model_max_length, special tokens)."""
        folder = Path(folder)
        config = {**_read_json(folder / "tokenizer_config.json"), **_read_json(folder / "special_tokens_map.json")}
        bos, eos = _special(config, "bos_token", BOS_TOKEN), _special(config, "eos_token", EOS_TOKEN)
        unk = _special(config, "unk_token", EOS_TOKEN)
        pad = _special(config, "pad_token", eos)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
            merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
            if any(len(m) != 2 for m in merges):
                raise ValueError("merges.txt: a line is not two symbols")
            backend = clip_backend(vocab, merges, bos, eos, unk)
        else:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        max_length = config.get("model_max_length", 77)
        max_length = 77 if not isinstance(max_length, int) or max_length > 1 << 20 else max_length
        return cls(backend, max_length, bos, eos, pad, unk, config)


def load_tokenizer(folder) -> ClipTokenizer:
    """The CLIP tokenizer of `folder` (vocab.json + merges.txt, or tokenizer.json), local files only,
    built on the `tokenizers` library (:class:`ClipTokenizer`; no transformers, no torch). Raises
    TokenizerError naming the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerError(f"missing tokenizer folder {folder}")
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_bpe and not (folder / "tokenizer.json").is_file():
        raise TokenizerError(f"{folder}: no CLIP tokenizer files (need vocab.json and merges.txt, or tokenizer.json)")
    try:
        return ClipTokenizer.from_folder(folder)
    except Exception as err:  # json / tokenizers raise ValueError, Exception, ... for bad files
        raise TokenizerError(f"{folder}: cannot load a CLIP tokenizer ({type(err).__name__}: {err})") from err


def save_tokenizer(tokenizer, directory) -> Path:
    """`tokenizer.save_pretrained(directory)`, plus vocab.json and merges.txt where it wrote only
    tokenizer.json (transformers 5.x does, for a transformers tokenizer passed in): a folder saved on
    any stack loads on 4.x and 5.x, including transformers 4.x's pure-Python CLIPTokenizer, which reads
    only vocab.json + merges.txt."""
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory))
    if not ((directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()):
        tokenizer.backend_tokenizer.model.save(str(directory))
    return directory
