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
    OUTDIR/.run.lock           held while a run works here (.run.p{k}.lock: process k > 0 of a
                               multi-process run); removed at the end

One run per OUTDIR at a time: :class:`RunLock` takes an OS-level lock (``fcntl.flock``) on
``.run.lock``, so a second run, whatever its prompt range, is refused with the first one's pid, host
and command line. Every run has a process 0, so two runs always meet on the same file. A lock left by
a killed run is stale (the kernel dropped it) and is taken over. Runs on disjoint ranges are refused,
not merged: use one multi-process run (``--num_processes``) to split the work.

Resume: an image counts as done when a metadata record names it and its file exists. A record is
appended only after its image has been renamed into place, and images are written to a temporary
name first, so a killed run leaves no half-written image and at most one half-written metadata
line (the last), which every reader skips (:func:`read_metadata_file`, the one parser of this
format) and the next writer cuts off. A write that fails (full disk, read-only mount) removes its
temporary file and cuts its partial metadata line before the error is raised.

A record's ``file`` must lie inside OUTDIR (relative, no ``..``, no symlink leading out): anything
else is a corrupt record, refused with one line naming it, never counted as done nor read.

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

from cfgbasin_jax.runtime import files as F

CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.jsonl"
IMAGES_DIR = "Images"
PLOTS_DIR = "Plots"
REQUIRED_KEYS = ("index", "prompt", "file")


class RunError(ValueError):
    """An output folder that cannot be used as asked (one-line message naming the path)."""


# ---------------------------------------------------------------------------------------- paths


def check_outdir(outdir) -> Path:
    """Absolute OUTDIR after checking that it is (or can be created as) a writable folder; writes
    nothing."""
    try:
        out = F.check_writable_dir(outdir, "--outdir")
    except F.FileError as err:
        raise RunError(str(err)) from None
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


def write_config(outdir, identity: Mapping, run: Mapping, process_id: int = 0) -> None:
    """Write config.json (atomically) unless it exists."""
    path = Path(outdir) / CONFIG_FILE
    if path.exists():
        return
    config = {"identity": _canonical(identity), "run": _canonical(run), "versions": versions(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    F.atomic_write_bytes(path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(), _temp_tag(process_id))


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
    try:
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise F.with_path(err, path) from None
        raise


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


def _check_record(rec, where: str, required) -> dict:
    if not isinstance(rec, dict) or any(k not in rec for k in required):
        raise RunError(f"{where}: a metadata record needs {', '.join(repr(k) for k in required)}")
    if "index" in rec and (isinstance(rec["index"], bool) or not isinstance(rec["index"], int)):
        raise RunError(f"{where}: 'index' must be an integer, got {rec['index']!r}")
    if "prompt" in rec and rec["prompt"] is not None and not isinstance(rec["prompt"], str):
        raise RunError(f"{where}: 'prompt' must be a string, got {rec['prompt']!r}")
    if "file" in rec and not isinstance(rec["file"], str):
        raise RunError(f"{where}: 'file' must be a string, got {rec['file']!r}")
    if "file" in rec and not _relative_inside(rec["file"]):
        raise RunError(f"{where}: 'file' {rec['file']!r} is not a path inside the run folder (a corrupt record)")
    return rec


def _relative_inside(file: str) -> bool:
    """A non-empty relative path without '..' (lexically inside the folder it is relative to)."""
    parts = Path(file).parts
    return bool(parts) and not Path(file).is_absolute() and not file.startswith(("/", "\\")) and ".." not in parts


def check_record_paths(records: Iterable[dict], outdir, where) -> None:
    """RunError naming ``where`` and the record when a record's ``file``, symlinks resolved, lies
    outside OUTDIR (or outside its Images/ folder, wherever that links to): a corrupt record, never
    trusted as a finished image nor read."""
    roots = [Path(outdir).resolve(), (Path(outdir) / IMAGES_DIR).resolve()]
    for rec in records:
        if "file" not in rec:
            continue
        target = (Path(outdir) / rec["file"]).resolve()
        if not any(target == root or root in target.parents for root in roots):
            raise RunError(f"{where}: record of index {rec.get('index')!r}: file {rec['file']!r} resolves to "
                           f"{target}, outside {Path(outdir).absolute()} (a corrupt record)")


def parse_metadata(data: bytes, path, required=REQUIRED_KEYS) -> tuple[list[dict], int, bool]:
    """Parse metadata.jsonl bytes. Returns (records, bytes to keep, whether a last line was skipped).

    Every line must be a JSON object with the ``required`` keys (``index`` an integer), except the
    last one when it lacks its newline: a killed writer leaves that, so it is kept when it is a
    complete record and skipped otherwise. Any other bad line is a RunError naming file and line.
    """
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the data ends with a newline
    records = []
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
            raise RunError(f"{path}:{lineno}: not valid JSON ({reason})") from None
        records.append(_check_record(rec, f"{path}:{lineno}", required))
    keep = len(data) - len(tail)
    if not tail.strip():
        return records, len(data), False
    try:
        rec = _check_record(json.loads(tail.decode("utf-8")), f"{path}:{len(lines) + 1}", required)
    except (UnicodeDecodeError, ValueError):  # a cut-off record (RunError is a ValueError too)
        return records, keep, True
    return records + [rec], len(data), False


def read_metadata_file(path, required=REQUIRED_KEYS, on_skip=None) -> list[dict]:
    """Records of one metadata file (see :func:`parse_metadata`), each one's ``file`` checked to lie
    inside the file's folder (:func:`check_record_paths`). ``on_skip(message)`` is told when a
    cut-off last line is skipped. Every reader of metadata.jsonl uses this."""
    path = Path(path)
    records, _, skipped = parse_metadata(path.read_bytes(), path, required)
    check_record_paths(records, path.parent, path)
    if skipped and on_skip is not None:
        on_skip(f"{path}: skipped a cut-off last line (left by a killed run)")
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
    """Appends records (one JSON line each) to one metadata file. Before the first append it cuts
    off a cut-off last line left by a killed run (a complete one only gets its newline). An append
    that fails (full disk) is cut off again before the error is raised."""

    def __init__(self, outdir, name: str = METADATA_FILE):
        self.path = Path(outdir) / name
        if self.path.exists():
            data = self.path.read_bytes()
            _, keep, skipped = parse_metadata(data, self.path)
            if skipped:
                with open(self.path, "r+b") as f:
                    f.truncate(keep)
            elif data and not data.endswith(b"\n"):
                with open(self.path, "ab") as f:
                    f.write(b"\n")
        self._file = open(self.path, "ab")

    def append(self, records: Iterable[dict]) -> None:
        lines = "".join(json.dumps(json_safe(r), ensure_ascii=False, allow_nan=False) + "\n" for r in records)
        start = self._file.tell()
        try:
            self._file.write(lines.encode("utf-8"))
            self._file.flush()
        except OSError as err:
            self._cut(start)
            raise F.with_path(err, self.path) from None

    def _cut(self, size: int) -> None:
        """Drop what a failed append wrote (buffered bytes included), keeping the file open."""
        try:
            self._file.close()  # flushing the rest fails again; the file is closed all the same
        except OSError:
            pass
        with open(self.path, "r+b") as f:
            f.truncate(size)
        self._file = open(self.path, "ab")

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
    F.atomic_write_bytes(out / METADATA_FILE, lines.encode("utf-8"), _temp_tag(process_id))
    for path in out.glob("metadata.p*.jsonl"):
        path.unlink(missing_ok=True)
    return ordered


# -------------------------------------------------------------------------------------- the lock


def lock_name(process_id: int = 0) -> str:
    """Process 0 of every run locks ``.run.lock`` (so any two runs meet there); process k > 0 of a
    multi-process run locks ``.run.p{k}.lock``."""
    return ".run.lock" if process_id == 0 else f".run.p{process_id}.lock"


class RunLock:
    """One run per OUTDIR at a time (see the module docstring). Creates OUTDIR when needed;
    :meth:`release` removes the lock file and an OUTDIR that this lock created and that is still
    empty, so a run that fails before writing leaves nothing behind."""

    def __init__(self, outdir, process_id: int = 0):
        self.outdir = Path(outdir)
        self.process_id = process_id
        self.created = False
        self._lock = F.LockFile(self.outdir / lock_name(process_id), "cfgbasin-generate run")

    @property
    def stale_owner(self) -> dict | None:
        """The record of a killed run whose lock was taken over (None when there was none)."""
        return self._lock.stale_owner

    def acquire(self) -> "RunLock":
        self._top = nearest_missing(self.outdir)
        self.created = self._top is not None
        self.outdir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except F.FileError as err:
            self._remove_created()
            raise RunError(str(err)) from None
        except BaseException:
            self._remove_created()
            raise
        return self

    def release(self) -> None:
        self._lock.release()
        self._remove_created()

    def _remove_created(self) -> None:
        """rmdir the folders acquire created, innermost first, while they are empty."""
        if not self.created:
            return
        path = self.outdir
        while True:
            try:
                path.rmdir()
            except OSError:
                return
            if path == self._top:
                return
            path = path.parent


def nearest_missing(path: Path) -> Path | None:
    """The outermost ancestor of ``path`` (or ``path``) that does not exist yet; None if it exists."""
    path = Path(path).absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path
