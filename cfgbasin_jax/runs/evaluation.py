"""Evaluation of a generation folder: the paper's row (SSCD copy similarity against a training set,
CLIP score, FID placeholder) from the images a run wrote. The command line is
:mod:`cfgbasin_jax.apps.evaluate`.

Generation folder layout: ``OUTDIR/Images/{i}.png`` or ``OUTDIR/Images/{i}_{t}.png`` and, optionally,
``OUTDIR/metadata.jsonl`` with one object per image holding at least ``index`` (int), ``prompt`` (str)
and ``file`` (path relative to OUTDIR), read by :func:`cfgbasin_jax.runs.folder.read_metadata_file` (a last
line cut off by a killed run is skipped with a note). Without metadata the images are read from ``Images/`` in the
order of their leading integers and captions come from ``--captions`` (line ``i`` = prompt ``i``);
``--captions`` also overrides the metadata prompts when both are given.

Reported (``OUTDIR/eval.json`` and a Markdown row on stdout):
  * ``sscd_p95``: 95th percentile (numpy linear interpolation) over generated images of each image's
    highest SSCD cosine similarity to any training image; ``sscd_mean``; ``sscd_frac_above``: fraction
    with that similarity > ``sscd_threshold`` (0.5);
  * ``clip_cos_mean``: mean raw cosine of image and prompt embeddings; ``clip_score_mean``: mean of
    ``100 * max(cos, 0)``;
  * ``fid``: null, with ``fid_note`` (no Inception-v3 port yet);
  * ``per_image``: the per-image values and the index/path of the closest training image.

Every flag is checked before any metric is computed, ``--out`` included (its folder must be
writable); the report is written atomically (a temporary file, then a rename). Exit status 2 with one
line on bad input or an I/O error.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
from typing import Callable, Sequence

import numpy as np

from cfgbasin_jax.metrics import images as I
from cfgbasin_jax.runs import folder as R
from cfgbasin_jax.runtime import files as F

PREFETCH_BATCHES = 2  # batches being decoded while the device runs the current one
FID_NOTE = "FID not available: cfgbasin_jax has no Inception-v3 port yet (use pytorch-fid / clean-fid on OUTDIR/Images)"

# Defaults shared by sscd_similarity, clip_similarity and evaluate (images per batch, image-reading threads, matmul
# precision, nearest-neighbour chunks of queries and keys).
BATCH_SIZE, WORKERS, PRECISION, QUERY_CHUNK, KEY_CHUNK = 32, 8, "highest", 1024, 4096


class EvalError(ValueError):
    """Bad evaluation input; the message names the flag, folder or file."""


@dataclasses.dataclass(frozen=True)
class GenImage:
    """One generated image: prompt ``index``, sample number ``sample``, absolute ``path``, ``file``
    relative to the generation folder, ``prompt`` (None when unknown)."""

    index: int
    sample: int
    path: str
    file: str
    prompt: str | None


# ----------------------------------------------------------------------------- inputs


def _read_metadata(gen_dir: str, meta_path: str, log: Callable[[str], None] | None = None) -> list[GenImage]:
    try:
        records = R.read_metadata_file(meta_path, required=("index", "file"), on_skip=log)
    except R.RunError as err:
        raise EvalError(str(err)) from None
    items = []
    for rec in records:
        path = os.path.join(gen_dir, rec["file"])
        if not os.path.isfile(path):
            raise EvalError(f"{meta_path}: image {rec['file']!r} (index {rec['index']}) not found in {gen_dir}")
        parsed = I.leading_ints(rec["file"])
        sample = int(rec.get("sample", parsed[1] if parsed else 0))
        items.append(GenImage(rec["index"], sample, path, rec["file"], rec.get("prompt")))
    if not items:
        raise EvalError(f"{meta_path} lists no images")
    return items


def _read_images_folder(gen_dir: str) -> list[GenImage]:
    folder = os.path.join(gen_dir, "Images")
    if not os.path.isdir(folder):
        raise EvalError(f"{gen_dir} has neither metadata.jsonl nor an Images/ folder (--gen)")
    paths = I.list_images(folder, recursive=False)
    items = []
    for path in paths:
        ids = I.leading_ints(path)
        if ids is None:
            raise EvalError(f"{path}: generated image names must start with the prompt index ({{i}}.png or {{i}}_{{t}}.png)")
        items.append(GenImage(ids[0], ids[1], path, os.path.relpath(path, gen_dir), None))
    return items


def read_generations(gen_dir: str, log: Callable[[str], None] | None = None) -> list[GenImage]:
    """Generated images of ``gen_dir`` sorted by (prompt index, sample): metadata.jsonl when present,
    else ``Images/`` by leading integers. ``log`` gets a note when a cut-off last line is skipped."""
    if not os.path.isdir(gen_dir):
        raise EvalError(f"--gen {gen_dir}: not a folder")
    meta = os.path.join(gen_dir, R.METADATA_FILE)
    items = _read_metadata(gen_dir, meta, log) if os.path.isfile(meta) else _read_images_folder(gen_dir)
    items.sort(key=lambda g: (g.index, g.sample, g.file))
    seen = set()
    for g in items:
        if g.file in seen:
            raise EvalError(f"{gen_dir}: image {g.file} is listed twice")
        seen.add(g.file)
    return items


def read_captions(path: str) -> list[str]:
    """Captions by prompt index: ``.txt`` one per line, ``.json`` a list of strings, ``.jsonl`` objects
    with ``prompt`` or ``caption`` (and optional ``index``)."""
    if not os.path.isfile(path):
        raise EvalError(f"--captions {path}: file not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise EvalError(f"--captions {path}: not valid JSON ({err.msg})") from None
        if not isinstance(data, list) or not all(isinstance(c, str) for c in data):
            raise EvalError(f"--captions {path}: expected a JSON list of strings")
        return data
    if path.endswith(".jsonl"):
        by_index = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                caption = rec.get("prompt", rec.get("caption"))
                index = int(rec.get("index", len(by_index)))
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                raise EvalError(f"--captions {path}:{lineno}: expected an object with 'prompt' or 'caption'") from None
            if not isinstance(caption, str):
                raise EvalError(f"--captions {path}:{lineno}: expected an object with 'prompt' or 'caption'")
            by_index[index] = caption
        if sorted(by_index) != list(range(len(by_index))):
            raise EvalError(f"--captions {path}: indices must run 0..{len(by_index) - 1} without gaps")
        return [by_index[i] for i in range(len(by_index))]
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def attach_captions(items: list[GenImage], captions: Sequence[str], source: str) -> list[GenImage]:
    """Give every image the caption of its prompt index; errors when the list is too short."""
    if not captions:
        raise EvalError(f"{source}: no captions")
    top = max(g.index for g in items)
    if top >= len(captions) or min(g.index for g in items) < 0:
        raise EvalError(f"{source} has {len(captions)} captions but the generated images use prompt index {top}")
    return [dataclasses.replace(g, prompt=captions[g.index]) for g in items]


def _is_report(path: str) -> bool:
    """True for a report an earlier evaluation wrote (a JSON object with 'gen_dir' and 'per_image')."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "gen_dir" in data and "per_image" in data


def check_report_path(out: str, gen_dir: str, train_dir=None, captions=None, sscd_dir=None, clip_dir=None,
                      default: bool = False) -> None:
    """Refuse (EvalError naming ``--out``) a report path that would overwrite or lie among the
    inputs: the --captions file; anything inside --train, --sscd, --clip or GEN/Images; inside GEN,
    a run file (config.json, metadata*.jsonl) or any existing file that is not an earlier report.
    A new file in GEN or an earlier report there is fine. The ``default`` path (GEN/eval.json, not
    chosen by the user) is held to the GEN rules only (--train may be GEN itself)."""
    if captions and os.path.exists(captions) and os.path.realpath(out) == os.path.realpath(captions):
        raise EvalError(f"--out {out} is the --captions file; choose another path")
    folders = [("--train", train_dir), ("--sscd", sscd_dir), ("--clip", clip_dir)] if not default else []
    folders.append(("--gen", os.path.join(gen_dir, R.IMAGES_DIR)))
    for flag, folder in folders:
        if folder and os.path.isdir(folder) and F.is_within(out, folder):
            raise EvalError(f"--out {out} lies inside {flag} {folder} (an input); choose another path")
    if F.is_within(out, gen_dir):
        name = os.path.basename(out)
        run_file = name == R.CONFIG_FILE or (name.startswith("metadata") and name.endswith(".jsonl"))
        if run_file or (os.path.lexists(out) and not _is_report(out)):
            raise EvalError(f"--out {out} is a file of the generation folder --gen {gen_dir} (an input); "
                            "choose another path (default: GEN/eval.json)")


# ----------------------------------------------------------------------------- batched embedding


def embed_paths(
    paths: Sequence[str],
    to_pixels: Callable[[str], np.ndarray],
    shape_of: Callable[[str], tuple[int, int]],
    embed: Callable[[np.ndarray], np.ndarray],
    batch_size: int,
    workers: int,
    log: Callable[[str], None] = print,
    what: str = "images",
) -> np.ndarray:
    """Embed images in fixed-size batches, grouped by preprocessed shape (one compile per shape).

    to_pixels(path) -> float32 [H,W,3]; shape_of(path) -> (H,W) without decoding;
    embed(pixels [b,H,W,3]) -> [b,D], b = min(batch_size, group size). Returns [len(paths),D] in input order.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        shapes = list(pool.map(shape_of, paths))
        groups: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(shapes):
            groups.setdefault(s, []).append(i)
        if len(groups) > 8:
            log(f"note: {len(paths)} {what} resize to {len(groups)} different shapes (one compile each); "
                "--sscd-preprocess square320 or dcr224 gives a single shape")
        # each shape group runs at min(batch_size, group size): one compile per (shape, batch)
        batches = [
            (ids[i : i + batch_size], min(batch_size, len(ids)))
            for ids in groups.values()
            for i in range(0, len(ids), batch_size)
        ]
        submit = lambda bb: (bb, [pool.submit(to_pixels, paths[j]) for j in bb[0]])  # noqa: E731
        in_flight = collections.deque(submit(b) for b in batches[:PREFETCH_BATCHES])
        results = []
        for nxt in range(PREFETCH_BATCHES, len(batches) + PREFETCH_BATCHES):
            (b, bs), futures = in_flight.popleft()
            if nxt < len(batches):
                in_flight.append(submit(batches[nxt]))
            pixels = np.stack([f.result() for f in futures])
            if pixels.shape[0] < bs:
                pixels = np.concatenate([pixels, np.repeat(pixels[-1:], bs - pixels.shape[0], axis=0)])
            results.append((b, embed(pixels)))  # dispatched asynchronously; the host keeps decoding
    out: list[np.ndarray | None] = [None] * len(paths)
    for b, emb in results:
        emb = np.asarray(emb)
        for k, j in enumerate(b):
            out[j] = emb[k]
    return np.stack(out)


def _image_size(path: str) -> tuple[int, int]:
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as err:
        raise I.ImageInputError(f"cannot read image {path}: {err}") from None


def sscd_shape(preset: str, size: tuple[int, int]) -> tuple[int, int]:
    """(H,W) of the SSCD input for an image of PIL size (W,H)."""
    if preset == "sscd":
        w, h = I.short_edge_size(size[0], size[1], 288)
        return h, w
    return (320, 320) if preset == "square320" else (224, 224)


# ----------------------------------------------------------------------------- metrics


def sscd_similarity(
    gen_paths: Sequence[str],
    train_paths: Sequence[str],
    sscd_dir: str,
    preset: str = "sscd",
    batch_size: int = BATCH_SIZE,
    workers: int = WORKERS,
    precision: str = PRECISION,
    query_chunk: int = QUERY_CHUNK,
    key_chunk: int = KEY_CHUNK,
    log: Callable[[str], None] = print,
) -> tuple[np.ndarray, np.ndarray]:
    """-> (max cosine similarity to the training set float32 [N], index of the match int32 [N])."""
    import jax
    import jax.numpy as jnp

    from cfgbasin_jax.metrics.neighbors import nearest_neighbors
    from cfgbasin_jax.models.sscd import descriptor_fn, load_sscd

    config, params = load_sscd(sscd_dir)
    params = jax.tree_util.tree_map(jnp.asarray, params)  # on device once
    fn = descriptor_fn(config, precision)

    def run(paths, what):
        return embed_paths(
            paths,
            lambda p: I.sscd_pixels(I.load_rgb(p), preset),
            lambda p: sscd_shape(preset, _image_size(p)),
            lambda x: fn(params, jnp.asarray(x)),
            batch_size,
            workers,
            log,
            what,
        )

    gen = run(gen_paths, "generated images")
    train = run(train_paths, "training images")
    return nearest_neighbors(gen, train, query_chunk=query_chunk, key_chunk=key_chunk)


def clip_similarity(
    gen_paths: Sequence[str],
    prompts: Sequence[str],
    clip_dir: str,
    batch_size: int = BATCH_SIZE,
    workers: int = WORKERS,
    precision: str = PRECISION,
    log: Callable[[str], None] = print,
) -> np.ndarray:
    """-> raw cosine float64 [N] between each generated image and its prompt."""
    import jax.numpy as jnp

    from cfgbasin_jax.metrics import clip_score as C

    scorer = C.load_clip(clip_dir, precision=precision)
    crop = scorer.recipe.crop
    fn = C.image_fn(scorer.model, precision)
    img = embed_paths(
        gen_paths,
        lambda p: I.clip_pixels(I.load_rgb(p), scorer.recipe),
        lambda p: (crop, crop),
        lambda x: fn(scorer.params, jnp.asarray(x)),
        batch_size,
        workers,
        log,
        "generated images",
    )
    unique = sorted(set(prompts))
    txt = C.text_embeddings(scorer, unique)
    row = {p: i for i, p in enumerate(unique)}
    return C.cosine(img, txt[[row[p] for p in prompts]])


def summarize_sscd(max_sim: np.ndarray, threshold: float) -> dict:
    """Paper statistics of per-image max similarities [N]."""
    s = np.asarray(max_sim, np.float64)
    return {
        "sscd_p95": float(np.percentile(s, 95)),
        "sscd_mean": float(np.mean(s)),
        "sscd_frac_above": float(np.mean(s > threshold)),
        "sscd_threshold": float(threshold),
    }


def evaluate(
    gen_dir: str,
    train_dir: str | None = None,
    captions: str | None = None,
    sscd_dir: str | None = None,
    clip_dir: str | None = None,
    *,
    metrics: Sequence[str] | None = None,
    threshold: float = 0.5,
    sscd_preprocess: str = "sscd",
    batch_size: int = BATCH_SIZE,
    workers: int = WORKERS,
    precision: str = PRECISION,
    query_chunk: int = QUERY_CHUNK,
    key_chunk: int = KEY_CHUNK,
    inception: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Compute the evaluation report (see module docstring). ``metrics``: subset of {"sscd", "clip"};
    None = every metric whose inputs were given. Raises EvalError naming the missing flag."""
    want = set(metrics) if metrics is not None else set()
    if metrics is None:
        if train_dir or sscd_dir:
            want.add("sscd")
        if clip_dir:
            want.add("clip")
    unknown = want - {"sscd", "clip"}
    if unknown:
        raise EvalError(f"--metrics: unknown metric(s) {sorted(unknown)}; choose from sscd, clip")
    if not want:
        raise EvalError(
            "nothing to evaluate: pass --train TRAIN_DIR with --sscd SSCD_DST for copy similarity "
            "and/or --clip CLIP_DIR for CLIP score"
        )
    if "sscd" in want:
        if not sscd_dir:
            raise EvalError("SSCD similarity needs converted SSCD weights: pass --sscd SSCD_DST "
                            "(make it with `cfgbasin-convert sscd sscd_disc_mixup.torchscript.pt SSCD_DST`)")
        if not train_dir:
            raise EvalError("SSCD similarity needs the training images: pass --train TRAIN_DIR")
        from cfgbasin_jax.models.sscd import CONFIG_NAME, PARAMS_NAME

        for name in (CONFIG_NAME, PARAMS_NAME):
            if not os.path.isfile(os.path.join(sscd_dir, name)):
                raise EvalError(f"--sscd {sscd_dir}: {name} not found (convert with `cfgbasin-convert sscd FILE DST`)")
        if sscd_preprocess not in I.SSCD_PRESETS:
            raise EvalError(f"--sscd-preprocess must be one of {I.SSCD_PRESETS}, got {sscd_preprocess!r}")
    if "clip" in want:
        if not clip_dir:
            raise EvalError("CLIP score needs a CLIP model folder: pass --clip CLIP_DIR")
        from cfgbasin_jax.metrics.clip_score import ClipWeightsError, check_folder

        try:
            check_folder(clip_dir)
        except ClipWeightsError as err:
            raise EvalError(f"--clip: {err}") from None

    items = read_generations(gen_dir, log)
    if captions:
        items = attach_captions(items, read_captions(captions), f"--captions {captions}")
    if "clip" in want and any(g.prompt is None for g in items):
        raise EvalError(f"{gen_dir} has no metadata.jsonl with prompts: pass --captions FILE for the CLIP score")
    train_paths = I.list_images(train_dir, recursive=True) if "sscd" in want else []

    report: dict = {
        "gen_dir": os.path.abspath(gen_dir),
        "n_generated": len(items),
        "n_prompts": len({g.index for g in items}),
        **generation_cost(gen_dir),
    }
    per_image = [{"index": g.index, "sample": g.sample, "file": g.file, "prompt": g.prompt} for g in items]
    paths = [g.path for g in items]
    if "sscd" in want:
        log(f"SSCD: {len(paths)} generated vs {len(train_paths)} training images ({sscd_preprocess} preprocessing)")
        sim, idx = sscd_similarity(
            paths, train_paths, sscd_dir, sscd_preprocess, batch_size, workers, precision, query_chunk, key_chunk, log
        )
        report.update(
            train_dir=os.path.abspath(train_dir), n_train=len(train_paths), sscd_weights=os.path.abspath(sscd_dir),
            sscd_preprocess=sscd_preprocess, **summarize_sscd(sim, threshold),
        )
        for rec, s, j in zip(per_image, sim, idx):
            rec.update(sscd_max=float(s), sscd_match=int(j), sscd_match_file=os.path.relpath(train_paths[j], train_dir))
    if "clip" in want:
        log(f"CLIP: {len(paths)} images, {report['n_prompts']} prompts")
        cos = clip_similarity(paths, [g.prompt for g in items], clip_dir, batch_size, workers, precision, log)
        report.update(
            clip_model=os.path.abspath(clip_dir),
            clip_cos_mean=float(np.mean(cos)),
            clip_score_mean=float(np.mean(100.0 * np.maximum(cos, 0.0))),
            clip_score_scale="clip_score = 100 * max(cos, 0); clip_cos = raw cosine",
        )
        for rec, c in zip(per_image, cos):
            rec.update(clip_cos=float(c))
    report["fid"] = None
    report["fid_note"] = FID_NOTE
    if inception:
        log(f"note: --inception given but {FID_NOTE}")
    report["per_image"] = per_image
    return report


def generation_cost(gen_dir: str) -> dict:
    """Method and mean UNet sample-evaluations per image from ``metadata.jsonl`` (cfgbasin-generate
    records both); empty when the folder has no such metadata."""
    meta = os.path.join(gen_dir, R.METADATA_FILE)
    if not os.path.isfile(meta):
        return {}
    recs = R.read_metadata_file(meta, required=("index", "file"))
    evals = [r["unet_evals"] for r in recs if isinstance(r.get("unet_evals"), (int, float))]
    methods = sorted({str(r["method"]) for r in recs if "method" in r})
    out = {}
    if methods:
        out["method"] = ", ".join(methods)
    if evals:
        out["unet_evals_per_image"] = float(np.mean(evals))
    return out


def markdown_row(report: dict) -> str:
    """Header, separator and one row: SSCD p95 | SSCD mean | % SSCD > t | CLIP cos | CLIPScore | FID
    (n/a for metrics not computed)."""

    def fmt(key, scale=1.0, digits=3, suffix=""):
        v = report.get(key)
        return "n/a" if v is None else f"{v * scale:.{digits}f}{suffix}"

    t = report.get("sscd_threshold", 0.5)
    name = os.path.basename(os.path.normpath(report["gen_dir"]))
    cells = [
        name,
        fmt("sscd_p95"),
        fmt("sscd_mean"),
        fmt("sscd_frac_above", 100, 1, "%"),
        fmt("clip_cos_mean"),
        fmt("clip_score_mean", 1, 2),
        fmt("fid", 1, 2),
        fmt("unet_evals_per_image", 1, 1),
    ]
    head = f"| run | SSCD p95 | SSCD mean | SSCD > {t:g} | CLIP cos | CLIPScore | FID | UNet evals/img |"
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|"
    return "\n".join([head, sep, "| " + " | ".join(cells) + " |"])
