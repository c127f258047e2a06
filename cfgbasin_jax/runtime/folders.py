"""Folders written as a whole or not at all: a hidden partial sibling ``.DST.partial-HOST-PID-RANDOM``
renamed into place at the end, the destination rules every converter and writer shares
(:func:`check_output_dir`), ``--overwrite`` that replaces only what we wrote (through a symlink too), and
the clean-up of partial folders that killed processes left behind."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import socket
import uuid
from pathlib import Path

from cfgbasin_jax.runtime import files

PARTIAL_TAG = ".partial-"  # .DST.partial-HOST-PID-RANDOM: a save in progress
OLD_TAG = ".old-"  # .DST.old-HOST-PID-RANDOM: a replaced DST being removed


def owner_tag() -> str:
    """HOST-PID-RANDOM: names a partial or old folder after the process that made it."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(owner: str) -> bool:
    """Was a partial/old folder whose name ends in ``owner`` (HOST-PID-RANDOM) left by a process
    that is gone? Only a process on this host can be checked; the names of older versions
    (RANDOM only) count as stale."""
    host_pid = owner.rpartition("-")[0]
    host, _, pid = host_pid.rpartition("-")
    if not host:  # .DST.partial-RANDOM, written before owners were recorded
        return True
    return host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))


def _remove(path: Path) -> bool:
    """Remove ``path`` (a symlink or file is unlinked, never followed; a folder is removed with its
    content). True when nothing is left at ``path``."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return not os.path.lexists(path)


def remove_stale_partials(dst) -> list[Path]:
    """Remove the ``.DST.partial-*`` / ``.DST.old-*`` folders (or links) that killed saves to ``dst``
    left (gigabytes for SD). Folders of running saves are kept. Returns the paths actually removed."""
    dst = Path(dst).absolute()
    removed = []
    if not dst.parent.is_dir():
        return removed
    for tag in (PARTIAL_TAG, OLD_TAG):
        prefix = f".{dst.name}{tag}"
        for path in dst.parent.glob(f"{glob.escape(prefix)}*"):
            if (path.is_dir() or path.is_symlink()) and _stale(path.name[len(prefix):]) and _remove(path):
                removed.append(path)
    return removed


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def rename_noreplace(src, dst) -> None:
    """Rename ``src`` to ``dst`` unless something exists at ``dst`` (FileExistsError naming it).
    Atomic with ``renameat2(RENAME_NOREPLACE)`` (Linux: ext4, xfs, btrfs, tmpfs, ...); where the
    kernel or file system lacks it (NFS, other systems), a check then a rename."""
    import ctypes

    src, dst = os.fspath(src), os.fspath(dst)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), src, None, dst)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def replace_dir(src: Path, dst: Path, overwrite: bool = True) -> None:
    """Rename the finished folder ``src`` to ``dst``. Without ``overwrite`` a ``dst`` that exists
    (one that appeared while ``src`` was written: another process) is left alone and
    FileExistsError is raised. With it, an existing ``dst`` is moved aside to ``.DST.old-OWNER``
    first, then removed (a symlink at ``dst`` is replaced and unlinked, never followed: callers that
    mean its target resolve ``dst`` first, see :func:`output_dir`)."""
    src, dst = Path(src), Path(dst)
    try:
        rename_noreplace(src, dst)
        return
    except FileExistsError:
        if not overwrite:
            raise
    old = dst.parent / f".{dst.name}{OLD_TAG}{owner_tag()}"
    os.rename(dst, old)
    os.rename(src, dst)
    _remove(old)


# ------------------------------------------------------------------------------------ output folders


def check_output_dir(dst, sources=(), overwrite: bool = False, ours=None, kind: str = "folder",
                     writer: str = "this command") -> Path:
    """Absolute ``dst`` after checking that a folder may be written there; writes nothing. The rules
    every converter shares. Refused (files.FileError naming the paths): ``dst`` equal to, inside or
    containing one of ``sources`` (existing paths; None skipped); an existing ``dst`` without
    ``overwrite``; with ``overwrite``, an existing ``dst`` that ``ours(dst)`` does not recognise and
    that is not empty (``kind`` describes ours, e.g. "a converted directory (no cfgbasin_jax.json)";
    ``writer`` names who writes such folders); a parent that cannot be written. A symlink at ``dst``
    counts as the folder it points to (see :func:`output_dir`)."""
    dst = Path(dst).absolute()
    for src in sources:
        if src is None or not Path(src).exists():
            continue
        if files.is_within(dst, src):
            where = "is" if dst.resolve() == Path(src).resolve() else "lies inside"
            raise files.FileError(f"destination {dst} {where} the source {src}; choose another destination")
        if files.is_within(src, dst):
            raise files.FileError(f"destination {dst} contains the source {src}; choose another destination")
    if dst.exists() or dst.is_symlink():
        if not dst.is_dir():
            raise files.FileError(f"{dst} exists and is not a directory")
        if not overwrite:
            raise files.FileError(f"{dst} already exists (use overwrite=True / --overwrite to replace it)")
        if not (ours is not None and ours(dst)) and any(dst.iterdir()):
            raise files.FileError(f"{dst} is not {kind} and is not empty; --overwrite only replaces a directory "
                            f"that {writer} wrote, so it is left alone")
    files.check_writable_dir(output_dir(dst).parent, "destination")
    return dst


def output_dir(dst) -> Path:
    """Where a folder for ``dst`` is written: ``dst`` (absolute), or the folder a symlink at ``dst``
    points to (so --overwrite through a link replaces its target and keeps the link)."""
    dst = Path(dst).absolute()
    return dst.resolve() if dst.is_symlink() else dst


@contextlib.contextmanager
def building_dir(dst, overwrite: bool = False, note=None):
    """Yields a fresh hidden sibling ``.DST.partial-HOST-PID-RANDOM`` to fill; when the block ends
    normally it becomes ``dst`` (:func:`replace_dir`), so ``dst`` is never partial. On an error,
    KeyboardInterrupt or SIGTERM (under :func:`files.terminate_raises`) the partial folder is removed
    (signals held meanwhile). Partial folders of killed saves to ``dst`` are removed first, each
    reported to ``note(message)``. Without ``overwrite``, a ``dst`` that another process created
    meanwhile is left alone: files.FileError, and nothing of this save remains."""
    target = output_dir(dst)
    target.parent.mkdir(parents=True, exist_ok=True)
    for path in remove_stale_partials(target):
        if note is not None:
            note(f"removed {path}, left by an interrupted conversion")
    tmp = target.parent / f".{target.name}{PARTIAL_TAG}{owner_tag()}"
    tmp.mkdir()
    try:
        yield tmp
        try:
            replace_dir(tmp, target, overwrite)
        except FileExistsError:
            raise files.FileError(f"{target} appeared while this conversion ran (another process wrote it); it is "
                            "left alone and nothing of this conversion is kept (use --overwrite to replace it)"
                            ) from None
    except BaseException as err:
        with files.signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)
        io_error = _write_error(err, target)
        if io_error is not None:
            raise io_error from None
        raise


def _write_error(err: BaseException, dst: Path) -> OSError | None:
    """An I/O error met while writing ``dst``'s partial folder as an OSError naming a path: one
    that names none gets ``dst``; a library's own error type quoting an errno (Rust libraries:
    the tokenizers' ``Exception`` and safetensors' ``SafetensorError``, "No space left on device
    (os error 28)") becomes one. None: raise ``err`` as it is (our errors are ValueErrors and keep
    their message)."""
    if isinstance(err, OSError):
        return None if err.filename is not None else files.with_path(err, dst)
    if isinstance(err, Exception) and not isinstance(err, (ValueError, ArithmeticError, LookupError)):
        return files.as_os_error(err, dst)
    return None
