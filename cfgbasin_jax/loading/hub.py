"""Hugging Face Hub model ids ("org/name") -> a local folder, the way diffusers' ``from_pretrained`` does.

    folder = resolve("CompVis/stable-diffusion-v1-4", revision="main", variant="fp16")

A name that is an existing path is returned as it is. A repo id is downloaded through
``huggingface_hub`` into the Hugging Face cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub``,
``~/.cache/huggingface/hub``), shared with diffusers and transformers:

- only the files a model needs (:func:`select_files`): a pipeline repo (``model_index.json``) gives
  model_index.json and unet/, vae/, text_encoder/, tokenizer/, scheduler/ (safety_checker and root
  checkpoints are skipped); a pixel-space model (``model.json``) its root and tokenizer/; any other
  repo (a CLIP model, a UNet) its root folder, or unet/ when only that holds a config. Per folder: the configs and tokenizer
  files (.json, .txt) and ONE weight format: safetensors, else .bin, else Flax .msgpack, of the
  requested ``variant`` (``fp16``: ``*.fp16.safetensors``, or a sharded ``*.safetensors.index.fp16.json``
  with its ``*.fp16-0000k-of-0000n.safetensors``) where the folder has it, else the plain weights;
- ``revision``: a branch, tag or commit; the token: ``token=``, else ``$HF_TOKEN`` or the login cache
  (``hf auth login``), as huggingface_hub finds it;
- a progress bar (huggingface_hub's tqdm; ``HF_HUB_DISABLE_PROGRESS_BARS=1`` hides it); a dropped
  connection resumes from the bytes received; files appear in the cache only when complete.

A later call finds the snapshot from a small record (``<cache>/cfgbasin_jax/hub/``, which files make
the model) and makes no request at all: a branch is looked up once (pass a commit as ``revision``, or
delete the record, to move on). ``HF_HUB_OFFLINE=1``: the local cache only.

Every failure (gated or private repo without a token, unknown repo or revision, no network, offline
and not cached) raises :class:`HubError` with one line naming the repo and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from cfgbasin_jax.convert import weight_names
from cfgbasin_jax.runtime import files
from cfgbasin_jax.runtime.cache_dirs import cache_root, hf_hub_cache

DEFAULT_ENDPOINT = "https://huggingface.co"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
PIPELINE_FOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_FORMATS = weight_names.FORMATS  # preference order
TEXT_SUFFIXES = (".json", ".txt")
TRUE = ("1", "on", "true", "yes")


class HubError(ValueError):
    """A Hub id that cannot be resolved (one line: the repo and what to do)."""


def is_repo_id(name) -> bool:
    """True for "org/name" that is not an existing path."""
    return isinstance(name, str) and REPO_ID.fullmatch(name) is not None and not Path(name).exists()


def _folder(path: str) -> str:
    return path.rpartition("/")[0]


def pick_weights(names: list[str], variant: str | None) -> list[str]:
    """The weight files (shards and shard index included) of one folder to download: the ``variant``'s
    where there are any (else the plain ones), in the first format of :data:`WEIGHT_FORMATS` present
    (names parsed by :mod:`cfgbasin_jax.convert.weight_names`)."""
    parsed = {n: weight_names.parse(n) for n in names}
    wanted = [n for n, p in parsed.items() if p is not None and p.variant == variant]
    if variant is not None and not wanted:
        wanted = [n for n, p in parsed.items() if p is not None and p.variant is None]
    for suffix in WEIGHT_FORMATS:
        group = [n for n in wanted if parsed[n].format == suffix]
        if group:
            return sorted(group)
    return []


def select_files(repo_files, variant: str | None = None) -> list[str]:
    """The files of a repo listing that make the model (see the module docstring); HubError when the
    listing holds neither model_index.json nor config.json."""
    names = set(repo_files)
    if "model_index.json" in names:
        folders, root_weights = ("", *PIPELINE_FOLDERS), False
    elif "config.json" in names:
        folders, root_weights = ("",), True
    elif "model.json" in names:  # a pixel-space model (cfgbasin_jax.models.components)
        folders, root_weights = ("", "tokenizer"), True
    elif "unet/config.json" in names:
        folders, root_weights = ("unet",), True
    else:
        raise HubError("holds neither model_index.json (a diffusers pipeline), config.json (a model) nor "
                       "model.json (a pixel-space model)")
    chosen = []
    for folder in folders:
        inside = [n for n in names if _folder(n) == folder]
        chosen += [n for n in inside if n.endswith(TEXT_SUFFIXES) and not weight_names.is_weight(n)]
        if folder or root_weights:
            chosen += pick_weights([n for n in inside if weight_names.is_weight(n)], variant)
    return sorted(chosen)


# ------------------------------------------------------------------------------------------ resolve


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE


def _record_path(repo_id: str, revision: str, variant: str | None) -> Path:
    key = json.dumps([str(hf_hub_cache()), endpoint(), repo_id, revision, variant])
    name = f"{repo_id.replace('/', '--')}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    return cache_root() / "hub" / name


def _snapshot_dir(repo_id: str, commit: str) -> Path:
    return hf_hub_cache() / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit


def cached_snapshot(repo_id: str, revision: str = "main", variant: str | None = None) -> Path | None:
    """The snapshot folder of an earlier :func:`resolve` whose files are all still in the cache (no
    request is made); None otherwise."""
    try:
        record = json.loads(_record_path(repo_id, revision, variant).read_text(encoding="utf-8"))
        folder = _snapshot_dir(repo_id, record["commit"])
        complete = all((folder / name).is_file() for name in record["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return folder if complete and record["files"] else None


def _write_record(repo_id: str, revision: str, variant: str | None, commit: str, names: list) -> None:
    path = _record_path(repo_id, revision, variant)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write_text(path, json.dumps({"repo": repo_id, "revision": revision, "variant": variant,
                                                   "commit": commit, "files": names}, indent=1))
    except OSError:  # an unwritable cache only costs the next call a request
        pass


def describe_error(repo_id: str, revision: str, err: BaseException) -> str:
    """One line naming the repo and what to do, for any error huggingface_hub raised."""
    kind = type(err).__name__
    status = getattr(getattr(err, "response", None), "status_code", None)
    where = f"{repo_id} (revision {revision}, {endpoint()})"
    token_hint = "log in with `hf auth login` or set HF_TOKEN"
    if kind == "GatedRepoError":
        return f"{where}: gated repo (HTTP {status}); accept its terms on the Hub page, then {token_hint}"
    if kind == "RepositoryNotFoundError" or status in (401, 403):
        return (f"{where}: repository not found or not accessible (HTTP {status}); check the id, and for a "
                f"private repo {token_hint}")
    if kind == "RevisionNotFoundError":
        return f"{where}: revision {revision!r} not found; check the branch, tag or commit (--revision)"
    if kind in ("EntryNotFoundError", "RemoteEntryNotFoundError") or status == 404:
        return f"{where}: not found (HTTP 404); check the id and the revision"
    if isinstance(err, HubError):
        return f"{where}: {err}"
    if isinstance(err, OSError) and not kind.startswith(("Hf", "Local", "Incomplete")) and status is None \
            and getattr(err, "filename", None):
        return f"{where}: {files.describe(err)}"
    detail = " ".join(str(err).split())[:200]
    return (f"{where}: download failed ({kind}: {detail}); check the network and retry (finished files are "
            f"kept), or use a local folder / HF_HUB_OFFLINE=1 with a cached model")


def resolve(name, revision: str | None = None, variant: str | None = None, token=None) -> Path:
    """A local folder for ``name``: an existing path as it is, a Hub repo id downloaded (or found in
    the cache; see the module docstring). Anything else is returned as a Path for the caller's own
    "not found" message. Raises HubError (one line) when a repo id cannot be resolved."""
    if not isinstance(name, str) or not is_repo_id(name):  # a Path is always a local path
        return Path(name)
    repo_id, revision = name, revision or "main"
    found = cached_snapshot(repo_id, revision, variant)
    if found is not None:
        return found
    if offline():
        return _offline_snapshot(repo_id, revision)
    try:
        from huggingface_hub import HfApi, snapshot_download

        info = HfApi(endpoint=endpoint(), token=token).model_info(repo_id, revision=revision)
        try:
            names = select_files([s.rfilename for s in (info.siblings or [])], variant)
        except HubError as err:
            raise HubError(f"{err}; not a diffusers or transformers model repo") from None
        # By the revision's name, so that huggingface_hub records refs/<revision> (diffusers finds it offline).
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=str(hf_hub_cache()), endpoint=endpoint(),
                                        token=token, allow_patterns=names))
    except Exception as err:  # huggingface_hub's HTTP / connection / OS errors, all named in one line
        raise HubError(describe_error(repo_id, revision, err)) from None
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:  # the revision moved between the two requests: the next call lists it again
        raise HubError(f"{repo_id} (revision {revision}): {missing[0]} is missing from the download; retry")
    _write_record(repo_id, revision, variant, folder.name, names)
    return folder


def _offline_snapshot(repo_id: str, revision: str) -> Path:
    """HF_HUB_OFFLINE=1: a snapshot already in the Hugging Face cache (e.g. downloaded by diffusers)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, cache_dir=str(hf_hub_cache()),
                                      local_files_only=True))
    except Exception:
        raise HubError(f"{repo_id} (revision {revision}): not in the local Hugging Face cache {hf_hub_cache()} "
                       "and HF_HUB_OFFLINE=1; unset HF_HUB_OFFLINE to download it, or pass a local folder") from None


def resolve_unet(name, revision: str | None = None, variant: str | None = None, token=None) -> Path:
    """A ``unet/`` folder for ``unet_path``: a local path as it is; a Hub id's root folder if it holds a
    UNet config, else its ``unet/`` subfolder (e.g. ``CompVis/stable-diffusion-v1-4``)."""
    if not isinstance(name, str) or not is_repo_id(name):
        return Path(name)
    folder = resolve(name, revision=revision, variant=variant, token=token)
    return folder if (folder / "config.json").is_file() or not (folder / "unet").is_dir() else folder / "unet"
