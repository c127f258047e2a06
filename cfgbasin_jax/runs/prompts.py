"""Prompt sets of the paper's experiments (``--exp`` / ``--prompt_json`` of the generation scripts).

Experiments (the reference scripts' names and selection rules, so that indices match):

  laion10k         LAION-10K ``laion_combined_captions.json``: a dict {image path: [captions]}; the
                   first caption of each entry; ``n`` prompts drawn WITH replacement after
                   ``np.random.seed(42)`` exactly as ``np.random.choice(captions, n)`` does
                   (n = ``--end_iter``). Default file: ``./laion_combined_captions.json``.
  sdv1_pretrained  ``sdv1_500_memorized.jsonl`` (JSON lines with ``caption``, ``index``, ``url``): the
                   500 prompts SD v1.4 reproduces (Webster / Wen et al.), shipped in
                   ``cfgbasin_jax/data``; in file order.
  200_memorized    a folder of ``*.txt`` captions, one file per prompt, in sorted file-name order.
                   Default folder: ``./memorized_images``.
  imagenette       "An image of {class}" over the ten Imagenette classes, 10000 draws with
                   replacement after ``np.random.seed(42)`` (the reference ImageNet script).

Every reader raises :class:`PromptError` naming the file (and line or key) at fault. Selection by
``--start_iter`` / ``--end_iter`` happens in the caller; :func:`load_prompt_set` only builds the list.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

REFERENCE_SEED = 42  # np.random.seed(42) in the reference scripts
IMAGENETTE_CLASSES = (
    "tench", "English springer", "cassette player", "chain saw", "church",
    "French horn", "garbage truck", "gas pump", "golf ball", "parachute",
)
IMAGENETTE_DRAWS = 10000  # the reference draws 10000 class names once, whatever --end_iter is
IMAGENETTE_TEMPLATE = "An image of {}"

EXPERIMENTS = ("laion10k", "sdv1_pretrained", "200_memorized", "imagenette")
# Where each experiment's prompts come from when --prompt_json is not given (None: built in).
DEFAULT_SOURCES = {
    "laion10k": "laion_combined_captions.json",
    "sdv1_pretrained": "package:sdv1_500_memorized.jsonl",
    "200_memorized": "memorized_images",
    "imagenette": None,
}
# Experiments whose prompt list has a fixed length: --end_iter beyond it is clipped, as the
# reference DTP scripts do (``while i < n_samples and i < len(prompts)``).
FIXED_SIZE = ("sdv1_pretrained", "200_memorized", "imagenette")


class PromptError(ValueError):
    """A prompt file, folder or selection that cannot be used (message names the file/line/key)."""


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """A prompt list indexed by global prompt index.

    exp: experiment name (one of :data:`EXPERIMENTS`). source: the file/folder read (absolute),
    "package:sdv1_500_memorized.jsonl" (shipped data) or "builtin:imagenette". prompts: the captions, prompts[i] is global index i. extras: per-prompt
    JSON-friendly provenance (e.g. {"laion_index", "url"}, {"file"}, {"key"}).
    """

    exp: str
    source: str  # absolute path, "package:<file in cfgbasin_jax/data>" or "builtin:<exp>"
    prompts: tuple
    extras: tuple

    def __len__(self) -> int:
        return len(self.prompts)

    def digest(self, start: int = 0, end: int | None = None) -> str:
        """sha256 of prompts[start:end] (one per line), for run configurations."""
        h = hashlib.sha256()
        for p in self.prompts[start:end]:
            h.update(p.encode("utf-8") + b"\n")
        return h.hexdigest()


def packaged_file(name: str) -> Path:
    """Path of a data file shipped in ``cfgbasin_jax/data``."""
    return Path(str(resources.files("cfgbasin_jax") / "data" / name))


def _read_text(path: Path, what: str) -> str:
    if not path.exists():
        raise PromptError(f"{path}: {what} not found")
    if not path.is_file():
        raise PromptError(f"{path}: {what} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PromptError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise PromptError(f"{path}: cannot read ({err.strerror})") from None


def _caption(value, where: str) -> str:
    if not isinstance(value, str):
        raise PromptError(f"{where}: caption must be a string, got {type(value).__name__}")
    if not value.strip():
        raise PromptError(f"{where}: empty caption")
    return value


def read_laion_captions(path) -> list[tuple[str, str]]:
    """[(key, first caption)] of a LAION-10K ``laion_combined_captions.json`` in file order."""
    path = Path(path)
    text = _read_text(path, "LAION caption file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise PromptError(f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(data, dict):
        raise PromptError(f"{path}: expected a JSON object {{image path: [captions]}}, got {type(data).__name__}")
    out = []
    for key, captions in data.items():
        where = f"{path}: key {key!r}"
        if not isinstance(captions, list) or not captions:
            raise PromptError(f"{where}: expected a non-empty list of captions")
        out.append((key, _caption(captions[0], where)))
    if not out:
        raise PromptError(f"{path}: empty prompt set (no entries)")
    return out


def draw_with_replacement(population: int, n: int, seed: int = REFERENCE_SEED) -> np.ndarray:
    """int [n]: the indices ``np.random.seed(seed); np.random.choice(list_of_population, n)`` picks
    (the legacy global generator, without touching numpy's global state)."""
    if population <= 0:
        raise PromptError("cannot draw from an empty prompt set")
    if n < 0:
        raise PromptError(f"cannot draw {n} prompts")
    return np.random.RandomState(seed).choice(population, n)


def read_caption_jsonl(path) -> list[dict]:
    """Records of a JSON-lines caption file: objects with a string ``caption`` (or ``prompt``);
    other keys (e.g. ``index``, ``url``) are kept. Blank lines are skipped."""
    path = Path(path)
    text = _read_text(path, "JSON-lines caption file")
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptError(f"{where}: not valid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(rec, dict):
            raise PromptError(f"{where}: expected a JSON object with a 'caption', got {type(rec).__name__}")
        key = "caption" if "caption" in rec else "prompt" if "prompt" in rec else None
        if key is None:
            raise PromptError(f"{where}: missing key 'caption'")
        rec = dict(rec)
        rec["caption"] = _caption(rec.pop(key), f"{where}: key {key!r}")
        records.append(rec)
    if not records:
        raise PromptError(f"{path}: empty prompt set (no caption lines)")
    return records


def read_prompt_file(path) -> list[str]:
    """Prompts of a file: a JSON-lines caption file (``.jsonl``, see :func:`read_caption_jsonl`) or
    plain text with one prompt per line (blank lines skipped)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return [rec["caption"] for rec in read_caption_jsonl(path)]
    prompts = [line.strip() for line in _read_text(path, "prompt file").splitlines() if line.strip()]
    if not prompts:
        raise PromptError(f"{path}: empty prompt set (no prompt lines)")
    return prompts


def read_caption_folder(path) -> list[tuple[str, str]]:
    """[(file name, caption)] of every ``*.txt`` in a folder, sorted by name (the reference's
    ``sorted(glob('memorized_images/*.txt'))``); each file's whole text, stripped."""
    path = Path(path)
    if not path.exists():
        raise PromptError(f"{path}: caption folder not found")
    if not path.is_dir():
        raise PromptError(f"{path}: expected a folder of *.txt captions")
    files = sorted(p for p in path.glob("*.txt") if p.is_file())
    if not files:
        raise PromptError(f"{path}: empty prompt set (no *.txt files)")
    return [(f.name, _caption(_read_text(f, "caption file").strip(), str(f))) for f in files]


def imagenette_prompts(n: int = IMAGENETTE_DRAWS, seed: int = REFERENCE_SEED) -> list[str]:
    """The reference's Imagenette prompts: "An image of {class}" for ``n`` classes drawn with
    replacement after ``np.random.seed(seed)``."""
    picks = draw_with_replacement(len(IMAGENETTE_CLASSES), n, seed)
    return [IMAGENETTE_TEMPLATE.format(IMAGENETTE_CLASSES[k]) for k in picks]


def resolve_source(exp: str, path=None) -> Path | None:
    """The file/folder an experiment reads: ``path`` when given, else its default (None: built in)."""
    if exp not in EXPERIMENTS:
        raise PromptError(f"unknown --exp {exp!r}; expected one of {', '.join(EXPERIMENTS)}")
    if path is not None:
        if exp == "imagenette":
            raise PromptError("--exp imagenette has built-in prompts; it takes no --prompt_json")
        return Path(path).absolute()
    default = DEFAULT_SOURCES[exp]
    if default is None:
        return None
    if default.startswith("package:"):
        return packaged_file(default.split(":", 1)[1])
    return Path(default).absolute()


def load_prompt_set(exp: str, path=None, n_draw: int | None = None) -> PromptSet:
    """Read an experiment's prompt list.

    exp: one of :data:`EXPERIMENTS`. path: overrides the default file/folder (``--prompt_json``).
    n_draw: laion10k only, the number of prompts drawn with replacement (``--end_iter``).
    """
    source = resolve_source(exp, path)
    if exp == "laion10k":
        if n_draw is None:
            raise PromptError("laion10k needs the number of prompts to draw (--end_iter)")
        entries = read_laion_captions(source)
        picks = draw_with_replacement(len(entries), n_draw)
        prompts = [entries[k][1] for k in picks]
        extras = [{"key": entries[k][0]} for k in picks]
    elif exp == "sdv1_pretrained":
        records = read_caption_jsonl(source)
        prompts = [r["caption"] for r in records]
        extras = [{("laion_index" if k == "index" else k): v for k, v in r.items() if k != "caption"} for r in records]
    elif exp == "200_memorized":
        files = read_caption_folder(source)
        prompts = [caption for _, caption in files]
        extras = [{"file": name} for name, _ in files]
    else:
        prompts = imagenette_prompts()
        extras = [{} for _ in prompts]
    packaged = path is None and str(DEFAULT_SOURCES[exp]).startswith("package:")
    return PromptSet(
        exp=exp,
        source=DEFAULT_SOURCES[exp] if packaged else str(source) if source is not None else f"builtin:{exp}",
        prompts=tuple(prompts),
        extras=tuple(extras),
    )


def select_range(prompt_set: PromptSet, start: int, end: int) -> tuple[int, int]:
    """Validated global index range [start, end) of a run (``--start_iter`` / ``--end_iter``).

    Fixed-size sets clip ``end`` to their length (the reference DTP rule); an empty selection or
    ``end < start`` is an error.
    """
    if start < 0:
        raise PromptError(f"--start_iter {start} must be >= 0")
    if end < start:
        raise PromptError(f"--end_iter {end} < --start_iter {start}")
    if prompt_set.exp in FIXED_SIZE:
        end = min(end, len(prompt_set))
    elif end > len(prompt_set):
        raise PromptError(f"--end_iter {end} exceeds the {len(prompt_set)} prompts of {prompt_set.source}")
    if end <= start:
        raise PromptError(
            f"empty prompt set: no prompts in [{start}, {end}) of {prompt_set.source} ({len(prompt_set)} prompts)"
        )
    return start, end


def token_counts(tokenizer, prompts: Sequence[str]) -> list[int]:
    """Number of tokens of each prompt WITHOUT truncation (BOS and EOS included); the text encoder
    sees the first ``tokenizer.model_max_length`` of them (BOS, 75 BPE tokens, EOS for SD)."""
    ids = tokenizer(list(prompts), truncation=False, padding=False, verbose=False).input_ids
    return [len(x) for x in ids]
