"""The params checkpoint of a converted directory: written tensor by tensor, restored at disk speed.

Layout (an ordinary orbax PyTree checkpoint, restorable by orbax itself):

    params/_METADATA, _CHECKPOINT_METADATA       orbax's tree metadata
    params/<component>.<flax path joined by '.'>/  one zarr v2 array per parameter:
        .zarray                                  {"shape", "chunks" = shape, "compressor": null, ...}
        0.0[...]                                 the raw little-endian bytes (one chunk)

Writing (:func:`write_params`): orbax saves the tree (its metadata files) with a type handler that
reads each leaf only when its turn comes (:class:`LazyLeaf`, in file order) and writes it as that
zarr array (:func:`write_zarr`) while the next is read, with at most ``budget_bytes`` of tensors
held at once (:class:`ByteBudget`). No compression and no OCDBT: each parameter is one plain file.

Restoring (:func:`restore_params`) maps each file (copy-on-write ``mmap``) and hands it to the
device: on CPU, ``jax.device_put`` of a page-aligned buffer aliases it, so the params ARE the page
cache's pages (read from disk on first use, never copied, reclaimable under memory pressure); on an
accelerator the pages are copied to device memory and unmapped. (So on CPU the files must stay
as they are while the params live: the converter never rewrites a file in place, it writes a new
directory and renames it.) A load in another dtype casts tensor by tensor into aligned buffers. Checkpoints in any other layout (older converted
directories: OCDBT, zstd) are restored by orbax.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import json
import math
import mmap
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import jax
import numpy as np

from cfgbasin_jax.models.errors import ConversionError

ALIGNMENT = 64  # bytes: XLA's CPU client aliases host buffers aligned like this instead of copying
DEFAULT_BUDGET_BYTES = 512 << 20
READ_WORKERS = 4
METADATA_FILE = "_METADATA"
DIGEST_KEY = "cfgbasin_configs_sha256"


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ALIGNMENT-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def to_device(array: np.ndarray, device=None):
    """``array`` on ``device`` (default: the first local device) without keeping a host copy: an
    aligned, contiguous host array is aliased on CPU; anything else is copied once."""
    device = device or jax.local_devices()[0]
    if array.ctypes.data % ALIGNMENT or not array.flags.c_contiguous:
        staged = aligned_empty(array.shape, array.dtype)
        np.copyto(staged, array)
        array = staged
    return jax.device_put(array, device)


@dataclass(frozen=True)
class LazyLeaf:
    """A parameter not read yet: ``read()`` returns it as a numpy array of ``shape`` and ``dtype``
    (a new array each call: nothing is cached)."""

    shape: tuple
    dtype: np.dtype
    read: Callable[[], np.ndarray]
    order: tuple = ()  # (file, offset) in its source: write_params reads leaves in this order

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def astype(self, dtype) -> "LazyLeaf":
        """The same leaf cast to ``dtype`` when read (into an aligned buffer)."""
        dtype = np.dtype(dtype)
        if dtype == np.dtype(self.dtype):
            return self

        def read():
            out = aligned_empty(self.shape, dtype)
            np.copyto(out, self.read(), casting="unsafe")
            return out

        return LazyLeaf(self.shape, dtype, read, self.order)

    @classmethod
    def of(cls, value) -> "LazyLeaf":
        """An array already in memory (numpy or jax) as a leaf."""
        return cls(tuple(value.shape), np.dtype(value.dtype), lambda: np.asarray(value))


def is_lazy(x) -> bool:
    return isinstance(x, LazyLeaf)


def materialize(tree, device=None, workers: int = READ_WORKERS):
    """Read every :class:`LazyLeaf` of ``tree`` (others pass through ``to_device``) in ``workers``
    threads, each straight to ``device``: at most ``workers`` host buffers exist at once."""
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_lazy)

    def load(leaf):
        return to_device(leaf.read() if is_lazy(leaf) else np.asarray(leaf), device)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return jax.tree_util.tree_unflatten(treedef, list(pool.map(load, leaves)))


# ----------------------------------------------------------------------------------------- writing


class ByteBudget:
    """Bytes of tensors held at once, bounded by ``limit`` (a tensor larger than the limit is let
    through alone). ``peak`` is the most ever held. Used from one event loop (no locking)."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.held = 0
        self.peak = 0

    def fits(self, nbytes: int) -> bool:
        return self.held == 0 or self.held + nbytes <= self.limit

    def hold(self, nbytes: int) -> None:
        self.held += nbytes
        self.peak = max(self.peak, self.held)

    def release(self, nbytes: int) -> None:
        self.held -= nbytes


def zarr_dtype(dtype) -> str:
    """The zarr v2 dtype string TensorStore (and so orbax) uses: '<f4', '<f2', 'bfloat16', ..."""
    dtype = np.dtype(dtype)
    return "bfloat16" if dtype.name == "bfloat16" else dtype.newbyteorder("<").str


def write_zarr(folder: Path, array: np.ndarray) -> None:
    """``array`` as a zarr v2 array of one uncompressed chunk at ``folder`` (what orbax writes
    for a numpy leaf with use_ocdbt=False and use_compression=False): the chunk file ``0.0...``
    (laid out C-contiguous, little-endian; one copy if ``array`` is not), then ``.zarray``. Not
    synced to disk here (:func:`write_params` syncs once at the end)."""
    if array.size == 0:
        raise ValueError(f"{folder}: cannot save an array with zero size")
    folder.mkdir(parents=True, exist_ok=True)
    little = array.dtype.newbyteorder("<") if array.dtype.str[0] == ">" else array.dtype
    data = np.ascontiguousarray(array, dtype=little)
    chunk = folder / ".".join("0" * array.ndim) if array.ndim else folder / "0"
    view = memoryview(data.reshape(-1).view(np.uint8))
    with open(chunk, "wb", buffering=0) as f:
        done = 0
        while done < len(view):
            done += f.write(view[done:])
    shape = list(array.shape)
    meta = {"chunks": shape, "compressor": None, "dimension_separator": ".", "dtype": zarr_dtype(array.dtype),
            "fill_value": None, "filters": None, "order": "C", "shape": shape, "zarr_format": 2}
    with open(folder / ".zarray", "w", encoding="utf-8") as f:
        json.dump(meta, f)


def _streaming_handler(budget: ByteBudget, on_write=None):
    """An orbax NumpyHandler whose values are LazyLeafs, read one after another as the budget
    allows and each written as one zarr array (so the metadata says ``np.ndarray`` and orbax
    restores the checkpoint like any other). ``on_write(folder, array)`` runs in the writer thread
    after each array is written."""
    import orbax.checkpoint as ocp

    class StreamingHandler(ocp.type_handlers.NumpyHandler):
        def __init__(self):
            super().__init__(deepcopy_host_arrays=False)

        async def serialize(self, values, infos, args=None):
            args = args or [ocp.SaveArgs()] * len(values)
            ocp.type_handlers.check_input_arguments(values, infos, args)
            return [ocp.future.CommitFutureAwaitingContractedSignals(self._write_all(values, infos),
                                                                     name="cfgbasin_stream")]

        async def _write_all(self, values, infos):
            """Read leaves one after another (in their ``order``) while earlier ones are written."""
            pending: set = set()
            try:
                for leaf, info in sorted(zip(values, infos), key=lambda item: item[0].order):
                    await info.await_path_creation()
                    while pending and not budget.fits(leaf.nbytes):
                        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                        for task in done:
                            task.result()
                    budget.hold(leaf.nbytes)
                    try:
                        array = await asyncio.to_thread(leaf.read)
                    except BaseException:
                        budget.release(leaf.nbytes)
                        raise
                    pending.add(asyncio.ensure_future(self._write_one(Path(info.path), array, leaf.nbytes)))
                    del array
            finally:  # every writer thread has stopped when this returns (the caller may remove the folder)
                results = await asyncio.gather(*pending, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result

        async def _write_one(self, folder: Path, array: np.ndarray, nbytes: int):
            # A non-contiguous view (a transposed weight) is copied once while it is written.
            extra = 0 if array.flags.c_contiguous else nbytes
            budget.hold(extra)
            try:
                await asyncio.to_thread(_write_and_report, folder, array, on_write)
            finally:
                budget.release(nbytes + extra)

    return StreamingHandler()


def _write_and_report(folder: Path, array: np.ndarray, on_write) -> None:
    write_zarr(folder, array)
    if on_write is not None:
        on_write(folder, array)


def config_digest(configs: Mapping) -> str:
    """sha256 of the model configs ({component: config dict}) as canonical JSON."""
    text = json.dumps({k: configs[k] for k in sorted(configs)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def write_params(directory, params: Mapping, budget_bytes: int | None = None, fsync: bool = True,
                 configs: Mapping | None = None, on_write: Callable[[str, np.ndarray], None] | None = None
                 ) -> ByteBudget:
    """Write ``params`` ({component: tree}; leaves numpy/jax arrays or :class:`LazyLeaf`) as an orbax
    checkpoint at ``directory`` (created; see the module docstring), holding at most
    ``budget_bytes`` (default DEFAULT_BUDGET_BYTES) of tensors at once; ``fsync``: every file is on
    disk before this returns (one ``syncfs`` of the file system at the end, not one fsync per file:
    about 2,300 files for SD, each fsync a journal commit). ``configs``: the model configs the
    params were checked against; their digest is stored (orbax custom metadata) so that a load with
    the same configs can take the shapes from the checkpoint instead of tracing the modules (see
    :func:`stored_shapes`). ``on_write(key, array)`` sees each parameter as written
    ("component/path/to/leaf", from a writer thread: e.g. to hash it). Returns the budget (its
    ``peak``: the most tensor bytes held at once)."""
    import orbax.checkpoint as ocp

    budget = ByteBudget(DEFAULT_BUDGET_BYTES if budget_bytes is None else budget_bytes)
    tree = jax.tree.map(lambda x: x if is_lazy(x) else LazyLeaf.of(x), dict(params), is_leaf=is_lazy)
    keys = {".".join(str(p.key) for p in path): "/".join(str(p.key) for p in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_lazy)[0]}
    report = None if on_write is None else (lambda folder, array: on_write(keys[folder.name], array))
    registry = ocp.type_handlers.create_type_handler_registry((LazyLeaf, _streaming_handler(budget, report)))
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False, use_compression=False,
                                          type_handler_registry=registry,
                                          multiprocessing_options=_local_only(ocp))
    directory = Path(directory).absolute()
    custom = {DIGEST_KEY: config_digest(configs)} if configs is not None else None
    with ocp.Checkpointer(handler, multiprocessing_options=_local_only(ocp)) as checkpointer:
        checkpointer.save(directory, args=ocp.args.PyTreeSave(tree, custom_metadata=custom))
    if fsync:
        sync_tree(directory)
    return budget


def sync_tree(directory) -> None:
    """Everything written under ``directory`` on disk: one ``syncfs`` of its file system (Linux), else
    an fsync of every file and folder under it."""
    directory = Path(directory)
    lib = _libc()
    syncfs = getattr(lib, "syncfs", None) if lib is not None else None
    fd = os.open(directory, os.O_RDONLY)
    try:
        if syncfs is not None and syncfs(fd) == 0:
            return
    finally:
        os.close(fd)
    for path in [*sorted(directory.rglob("*")), directory]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _local_only(ocp):
    """Each process writes / restores on its own (no cross-process barriers)."""
    return ocp.options.MultiprocessingOptions(
        primary_host=None,
        active_processes={jax.process_index()},
        barrier_sync_key_prefix=f"restore_p{jax.process_index()}",
    )


# ---------------------------------------------------------------------------------------- restoring

def _zarr_dtype(text: str):
    if text in ("<f4", "<f2", "<f8"):
        return np.dtype(text)
    if text == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return None


_LIBC: list = []


def _libc():
    """libc's mmap / munmap through ctypes (None where there is none, e.g. Windows)."""
    if not _LIBC:
        try:
            lib = ctypes.CDLL(None, use_errno=True)
            lib.mmap.restype = ctypes.c_void_p
            lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                 ctypes.c_int64]
            lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            _LIBC.append(lib if os.name == "posix" else None)
        except (OSError, AttributeError):
            _LIBC.append(None)
    return _LIBC[0]


def map_file(path: Path, shape: tuple, dtype) -> np.ndarray | None:
    """The whole file as a copy-on-write memory map of ``shape`` and ``dtype`` (page-aligned, so
    the CPU device aliases it: the pages are read from the page cache or disk on first use, and
    nothing is copied), unmapped when the array is freed. No file descriptor stays open (Python's
    mmap would keep one per file). None where mmap is unavailable."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    lib = _libc()
    if lib is None or nbytes == 0:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        address = lib.mmap(None, nbytes, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, 0)
    finally:
        os.close(fd)
    if address is None or address == ctypes.c_void_p(-1).value:
        return None
    buffer = (ctypes.c_char * nbytes).from_address(address)
    weakref.finalize(buffer, lib.munmap, address, nbytes)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def read_file(path: Path, shape: tuple, dtype, offset: int = 0) -> np.ndarray:
    """``shape`` x ``dtype`` bytes of ``path`` from ``offset``, read into a new aligned buffer."""
    out = aligned_empty(shape, dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise ConversionError(f"{path}: file ends after {done} of {len(view)} bytes (truncated)")
            done += n
    return out


def _chunk_reader(path: Path, shape: tuple, dtype) -> Callable[[], np.ndarray]:
    def read():
        mapped = map_file(path, shape, dtype)
        return read_file(path, shape, dtype) if mapped is None else mapped

    return read


def open_params(directory) -> dict | None:
    """The checkpoint at ``directory`` as a nested dict of :class:`LazyLeaf` reading its files
    directly, or None when its layout is not the one written by :func:`write_params` (then orbax
    must restore it)."""
    directory = Path(directory)
    try:
        metadata = json.loads((directory / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return None
    if metadata.get("use_ocdbt", True) or metadata.get("use_zarr3", False):
        return None
    tree: dict = {}
    for entry in metadata.get("tree_metadata", {}).values():
        keys = [str(k["key"]) for k in entry["key_metadata"]]
        leaf = _open_leaf(directory / ".".join(keys))
        if leaf is None:
            return None
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = leaf
    return tree or None


def _open_leaf(folder: Path) -> LazyLeaf | None:
    try:
        zarray = json.loads((folder / ".zarray").read_text())
    except (OSError, ValueError):
        return None
    shape = tuple(zarray.get("shape", ()))
    dtype = _zarr_dtype(zarray.get("dtype", ""))
    simple = (zarray.get("zarr_format") == 2 and zarray.get("compressor") is None and not zarray.get("filters")
              and zarray.get("order") == "C" and tuple(zarray.get("chunks", ())) == shape and dtype is not None)
    if not simple:
        return None
    chunk = folder / (zarray.get("dimension_separator", ".").join(["0"] * len(shape)) or "0")
    if not chunk.is_file() or chunk.stat().st_size != math.prod(shape) * dtype.itemsize:
        return None
    return LazyLeaf(shape, dtype, _chunk_reader(chunk, shape, dtype))


def stored_shapes(params_dir, configs: Mapping, dtype) -> dict | None:
    """The checkpoint's own tree of ShapeDtypeStruct in ``dtype`` when it was written (by
    :func:`write_params`) for exactly these ``configs`` and can be read directly; None otherwise
    (then the shapes must come from the modules)."""
    params_dir = Path(params_dir)
    try:
        metadata = json.loads((params_dir / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return None
    if (metadata.get("custom_metadata") or {}).get(DIGEST_KEY) != config_digest(configs):
        return None
    stored = open_params(params_dir)
    if stored is None or set(stored) != set(configs):
        return None
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, dtype), stored, is_leaf=is_lazy)


def _check_fits(params_dir: Path, stored: Mapping, target: Mapping) -> None:
    """ConversionError naming the first parameter whose path or shape differs."""
    flat_stored = {jax.tree_util.keystr(p): leaf for p, leaf in
                   jax.tree_util.tree_flatten_with_path(stored, is_leaf=is_lazy)[0]}
    flat_target = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    for key, spec in flat_target.items():
        if key not in flat_stored:
            raise ConversionError(f"{params_dir}: params do not fit the stored configs (missing parameter {key})")
        if tuple(flat_stored[key].shape) != tuple(spec.shape):
            raise ConversionError(
                f"{params_dir}: params do not fit the stored configs (parameter {key} has shape "
                f"{tuple(flat_stored[key].shape)}, the config needs {tuple(spec.shape)})")
    extra = sorted(set(flat_stored) - set(flat_target))
    if extra:
        raise ConversionError(f"{params_dir}: params do not fit the stored configs (unexpected parameter {extra[0]})")


def restore_params(params_dir, target: Mapping, device=None) -> dict:
    """The checkpoint at ``params_dir`` as ``target``'s tree ({component: tree of
    ShapeDtypeStruct}; their dtypes are the dtypes to load), on ``device`` (default: the first
    local device). Components of the checkpoint absent from ``target`` are not read."""
    params_dir = Path(params_dir)
    if not params_dir.is_dir():
        raise ConversionError(f"missing folder {params_dir} (the orbax params checkpoint)")
    device = device or jax.local_devices()[0]
    stored = open_params(params_dir)
    if stored is None:
        return _orbax_restore(params_dir, target, device)
    missing = sorted(set(target) - set(stored))
    if missing:
        raise ConversionError(f"{params_dir}: params do not fit the stored configs (no component {missing[0]!r})")
    stored = {kind: stored[kind] for kind in target}
    _check_fits(params_dir, stored, target)
    lazy = jax.tree.map(lambda leaf, spec: leaf.astype(spec.dtype), stored, dict(target), is_leaf=is_lazy)
    return materialize(lazy, device)


def _orbax_restore(params_dir: Path, target: Mapping, device) -> dict:
    """Restore with orbax (any layout orbax writes), straight into device arrays of ``target``."""
    import orbax.checkpoint as ocp

    sharding = jax.sharding.SingleDeviceSharding(device)
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), dict(target))
    try:
        with ocp.StandardCheckpointer(multiprocessing_options=_local_only(ocp)) as checkpointer:
            return checkpointer.restore(params_dir.absolute(), abstract)
    except Exception as err:  # orbax raises ValueError/KeyError/... for a tree that does not fit
        raise ConversionError(f"{params_dir}: params do not fit the stored configs ({err})") from err
