"""A generation run's output folder: layout, configuration check, metadata, atomic image writes.

    OUTDIR/config.json         {"identity": ..., "run": ..., "versions": ..., "created": ...}
    OUTDIR/Images/{i}.png      static rules (cfg, stp, og-stp), i = global prompt index
    OUTDIR/Images/{i}_{t}.png  dynamic rules: dtp names by the transition TIMESTEP, og-dtp by the
                               transition STEP INDEX (as the reference scripts do; -1 = none)
    OUTDIR/metadata.jsonl      one JSON object per image, sorted by "index" at the end of a run
    OUTDIR/metadata.p{k}.jsonl process k's records while a multi-process run is under way (merged
                               into metadata.jsonl by process 0 at the end, then removed)
    OUTDIR/run.log             the run log (run.p{k}.log per process in multi-process runs)
    OUTDIR/noise_diff.png      noise-difference traces (OUTDIR/Plots/{i}.png per image on request)

Resume: an image counts as done when a metadata record names it and its file exists. A record is
appended only after its image has been renamed into place, and images are written to a temporary
name first, so a killed run leaves no half-written image and at most one half-written metadata
line (the last), which readers ignore and the next writer cuts off.

A different configuration (``identity``) in an existing OUTDIR is refused, never mixed.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.jsonl"
IMAGES_DIR = "Images"
PLOTS_DIR = "Plots"
REQUIRED_KEYS = ("index", "prompt", "file")


class RunError(ValueError):
    """An output folder that cannot be used as asked (one-line message naming the path)."""


# ---------------------------------------------------------------------------------------- paths


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_outdir(outdir) -> Path:
    """Absolute OUTDIR after checking that it is (or can be created as) a writable folder; writes
    nothing."""
    out = Path(outdir).absolute()
    if out.exists() and not out.is_dir():
        raise RunError(f"--outdir {outdir}: exists and is not a directory")
    anchor = _nearest_existing(out)
    if not anchor.is_dir():
        raise RunError(f"--outdir {outdir}: {anchor} is not a directory")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise RunError(f"--outdir {outdir}: {anchor} is not writable")
    images = out / IMAGES_DIR
    if images.exists() and (not images.is_dir() or not os.access(images, os.W_OK | os.X_OK)):
        raise RunError(f"--outdir {outdir}: {images} is not a writable directory")
    return out


def image_file(index: int, transition: int | None = None) -> str:
    """Path relative to OUTDIR: ``Images/{i}.png``, or ``Images/{i}_{transition}.png``."""
    name = f"{index}.png" if transition is None else f"{index}_{int(transition)}.png"
    return f"{IMAGES_DIR}/{name}"


def metadata_name(process_id: int = 0, num_processes: int = 1) -> str:
    """The metadata file a process appends to (see the module docstring)."""
    return METADATA_FILE if num_processes == 1 else f"metadata.p{process_id}.jsonl"


def log_name(process_id: int = 0, num_processes: int = 1) -> str:
    return "run.log" if num_processes == 1 else f"run.p{process_id}.log"


def _temp_tag(process_id: int) -> str:
    return f".p{process_id}.tmp"


# ------------------------------------------------------------------------------------ configuration


def versions() -> dict:
    """Versions of the packages that decide the numbers."""
    import importlib.metadata as md

    out = {}
    for name in ("cfgbasin_jax", "jax", "jaxlib", "flax", "numpy", "diffusers", "transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _canonical(value):
    return json.loads(json.dumps(value, sort_keys=True))


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def identity_diff(old: Mapping, new: Mapping) -> list[str]:
    """Human-readable differences between two identities ("key.sub: old -> new")."""
    old, new = _flatten(_canonical(dict(old))), _flatten(_canonical(dict(new)))
    missing = "<missing>"
    return [f"{key}: {old.get(key, missing)!r} -> {new.get(key, missing)!r}"
            for key in sorted(set(old) | set(new)) if old.get(key, missing) != new.get(key, missing)]


def read_config(outdir) -> dict | None:
    path = Path(outdir) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"{path}: not valid JSON ({err}); move it away or use another --outdir") from None
    if not isinstance(config, dict) or not isinstance(config.get("identity"), dict):
        raise RunError(f"{path}: no 'identity' object; not written by cfgbasin-generate")
    return config


def check_config(outdir, identity: Mapping) -> bool:
    """Refuse an OUTDIR that holds another configuration. Returns True when OUTDIR already holds
    this configuration (a resume), False when it is new or empty."""
    out = Path(outdir)
    config = read_config(out)
    if config is None:
        has_images = (out / IMAGES_DIR).is_dir() and any((out / IMAGES_DIR).glob("*.png"))
        if has_images or list(out.glob("metadata*.jsonl")):
            raise RunError(f"{out} holds images or metadata but no {CONFIG_FILE}; refusing to mix runs "
                           "(use another --outdir)")
        return False
    diffs = identity_diff(config["identity"], identity)
    if diffs:
        raise RunError(f"{out} holds a run with a different configuration ({'; '.join(diffs)}); "
                       "use another --outdir")
    return True


def _atomic_write_bytes(path: Path, data: bytes, tag: str) -> None:
    tmp = path.with_name(f".{path.name}{tag}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_config(outdir, identity: Mapping, run: Mapping, process_id: int = 0) -> None:
    """Write config.json (atomically) unless it exists."""
    path = Path(outdir) / CONFIG_FILE
    if path.exists():
        return
    config = {"identity": _canonical(identity), "run": _canonical(run), "versions": versions(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _atomic_write_bytes(path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(), _temp_tag(process_id))


def make_dirs(outdir, plots: bool = False) -> None:
    out = Path(outdir)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    if plots:
        (out / PLOTS_DIR).mkdir(exist_ok=True)


# ---------------------------------------------------------------------------------------- images


def write_png(outdir, relpath: str, image: np.ndarray, process_id: int = 0) -> None:
    """Write uint8 [H,W,3] as PNG: a temporary file in the same folder, then a rename."""
    from PIL import Image

    path = Path(outdir) / relpath
    tmp = path.with_name(f".{path.name}{_temp_tag(process_id)}")
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)


def clean_temp_files(outdir, process_id: int = 0) -> int:
    """Remove this process's leftover temporary files (a killed run's). Returns how many."""
    out = Path(outdir)
    tag = _temp_tag(process_id)
    n = 0
    for folder in (out, out / IMAGES_DIR, out / PLOTS_DIR):
        if folder.is_dir():
            for p in folder.glob(f".*{tag}"):
                p.unlink(missing_ok=True)
                n += 1
    return n


# -------------------------------------------------------------------------------------- metadata


def json_safe(value):
    """Floats that are NaN/Inf become None; numpy scalars and arrays become Python values."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def _metadata_files(outdir) -> list[Path]:
    out = Path(outdir)
    main = out / METADATA_FILE
    shards = sorted(out.glob("metadata.p*.jsonl"), key=lambda p: p.name)
    return ([main] if main.exists() else []) + shards


def read_metadata_file(path) -> list[dict]:
    """Records of one metadata file; a final line without newline (a killed writer's) is ignored."""
    path = Path(path)
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    records = []
    for lineno, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(rec, dict) or any(k not in rec for k in REQUIRED_KEYS) or not isinstance(rec["index"], int):
            raise RunError(f"{path}:{lineno}: a metadata record needs an integer 'index', 'prompt' and 'file'")
        records.append(rec)
    return records


def read_records(outdir) -> dict[int, dict]:
    """All records of OUTDIR (metadata.jsonl, then the per-process files), the last one per index."""
    by_index: dict[int, dict] = {}
    for path in _metadata_files(outdir):
        for rec in read_metadata_file(path):
            by_index[rec["index"]] = rec
    return by_index


def completed(outdir, records: Mapping[int, dict]) -> dict[int, dict]:
    """The records whose image file exists."""
    out = Path(outdir)
    return {i: r for i, r in records.items() if (out / r["file"]).is_file()}


def check_prompts(done: Mapping[int, dict], prompts: Mapping[int, str] | list, where) -> None:
    """Refuse to resume when a finished image's prompt differs from the prompt set's."""
    for i, rec in sorted(done.items()):
        if 0 <= i < len(prompts) and rec["prompt"] != prompts[i]:
            raise RunError(f"{where}: image {i} was made from prompt {rec['prompt']!r} but the prompt set now "
                           f"gives {prompts[i]!r}; use another --outdir")


class MetadataWriter:
    """Appends records (one JSON line each) to one metadata file; cuts off a half-written last
    line left by a killed run before the first append."""

    def __init__(self, outdir, name: str = METADATA_FILE):
        self.path = Path(outdir) / name
        if self.path.exists():
            data = self.path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(keep)
        self._file = open(self.path, "a", encoding="utf-8")

    def append(self, records: Iterable[dict]) -> None:
        lines = "".join(json.dumps(json_safe(r), ensure_ascii=False, allow_nan=False) + "\n" for r in records)
        self._file.write(lines)
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def merge_metadata(outdir, process_id: int = 0) -> list[dict]:
    """Rewrite metadata.jsonl as every record of OUTDIR (last per index, sorted by index, images
    that exist only) and remove the per-process files. Returns the records."""
    out = Path(outdir)
    records = completed(out, read_records(out))
    ordered = [records[i] for i in sorted(records)]
    lines = "".join(json.dumps(json_safe(r), ensure_ascii=False, allow_nan=False) + "\n" for r in ordered)
    _atomic_write_bytes(out / METADATA_FILE, lines.encode("utf-8"), _temp_tag(process_id))
    for path in out.glob("metadata.p*.jsonl"):
        path.unlink(missing_ok=True)
    return ordered
