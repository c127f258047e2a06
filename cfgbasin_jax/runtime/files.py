"""Writing files safely: writability checks before any work, atomic writes, one-line OS errors, an
exclusive lock file naming its holder, and signals that cannot interrupt a clean-up.

Every command-line tool uses these, so a read-only mount, a full disk or a missing permission gives
one line naming the path (exit status 2) and never a half-written file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path


class FileError(ValueError):
    """A path that cannot be used as asked (one-line message naming the path)."""


# ------------------------------------------------------------------------------------ OS errors

_OS_CODE = re.compile(r"os_error_code='?(\d+)|\[Errno (\d+)\]|\(os error (\d+)\)")


def os_errno(err: BaseException) -> int | None:
    """The errno of an OSError, or of an error that only quotes one in its message (tensorstore /
    orbax write errors say ``[os_error_code='28']``, Rust libraries such as the tokenizers
    ``(os error 28)``); None when there is none."""
    if isinstance(err, OSError) and err.errno:
        return err.errno
    match = _OS_CODE.search(str(err))
    return int(next(g for g in match.groups() if g)) if match else None


def as_os_error(err: BaseException, path) -> OSError | None:
    """An OSError naming ``path`` (unless ``err`` names a file itself) for an error that carries an
    errno; None for anything else (a bug, not an I/O problem)."""
    code = os_errno(err)
    if code is None:
        return None
    if isinstance(err, OSError) and err.filename:
        return err
    return OSError(code, os.strerror(code), str(path))


def with_path(err: OSError, path) -> OSError:
    """``err`` if it names a file, else the same error naming ``path`` (a failed ``write`` on a full
    disk names none)."""
    if err.filename is not None:
        return err
    return OSError(err.errno, err.strerror or str(err), str(path))


def describe(err: OSError) -> str:
    """``"PATH: No space left on device"``: one line for an OSError."""
    name = err.filename if err.filename is not None else ""
    reason = err.strerror or os.strerror(err.errno or 0) or str(err)
    target = f" -> {err.filename2}" if err.filename2 else ""
    return f"{name}{target}: {reason}" if name else reason


# ------------------------------------------------------------------------------------ checks


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest existing ancestor."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(path: Path) -> bool:
    # access(2) also reports a read-only mount (EROFS) for root, who bypasses permissions.
    return os.access(path, os.W_OK | os.X_OK)


def check_writable_dir(path, flag: str) -> Path:
    """Absolute ``path`` after checking that it is, or can be created as, a writable folder;
    writes nothing. ``flag`` names it in the error ("--outdir")."""
    out = Path(path).absolute()
    if out.exists() and not out.is_dir():
        raise FileError(f"{flag} {path}: {out} exists and is not a directory")
    anchor = nearest_existing(out)
    if not anchor.is_dir():
        raise FileError(f"{flag} {path}: {anchor} is not a directory")
    if not _writable(anchor):
        raise FileError(f"{flag} {path}: {anchor} is not writable{_why_not_writable(anchor)}")
    return out


def _why_not_writable(path: Path) -> str:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return " (read-only file system)"
    except OSError:
        pass
    return " (permission denied)"


def check_writable_file(path, flag: str) -> Path:
    """Absolute ``path`` after checking that a file can be written there (atomically: its folder
    must be writable); writes nothing."""
    out = Path(path).absolute()
    if out.is_dir():
        raise FileError(f"{flag} {path}: is a directory")
    try:
        check_writable_dir(out.parent, flag)
    except FileError as err:
        raise FileError(f"{flag} {path}: {str(err).split(': ', 1)[1]}") from None
    if out.exists() and not os.access(out, os.W_OK):
        raise FileError(f"{flag} {path}: is not writable{_why_not_writable(out)}")
    return out


def is_within(path, folder) -> bool:
    """True when ``path`` is ``folder`` or lies inside it (both resolved)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


# ------------------------------------------------------------------------------------ writing


def atomic_write_bytes(path, data: bytes, tag: str = ".tmp") -> None:
    """Write ``path`` as a whole or not at all: a temporary sibling ``.NAME{tag}``, then a rename.
    The temporary file is removed when writing fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{tag}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError):
            raise with_path(err, path) from None
        raise


def atomic_write_text(path, text: str, tag: str = ".tmp") -> None:
    atomic_write_bytes(path, text.encode("utf-8"), tag)


def write_all(folder, files: dict, last: str | None = None, tag: str = ".tmp") -> None:
    """Write {name: bytes} into ``folder`` all or nothing: every file to a temporary name, then the
    renames (``last`` after the others). A failed write (full disk) removes what this call wrote and
    raises the OSError with the path it could not write."""
    folder = Path(folder)
    names = sorted(files, key=lambda name: name == last)
    written: list[Path] = []
    try:
        for name in names:
            tmp = folder / f".{name}{tag}"
            written.append(tmp)
            try:
                tmp.write_bytes(files[name])
            except OSError as err:
                raise with_path(err, folder / name) from None
        for k, name in enumerate(names):
            os.replace(written[k], folder / name)
            written[k] = folder / name
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        raise


# ------------------------------------------------------------------------------------ signals


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM (see :func:`terminate_raises`), so clean-up runs."""


@contextlib.contextmanager
def terminate_raises():
    """While active, SIGTERM raises :class:`Terminated` in the main thread (as SIGINT raises
    KeyboardInterrupt) instead of ending the process without clean-up. No-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"terminated by signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM that arrive inside the block are held and delivered at its end, so a
    clean-up runs to completion. No-op off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for s in dict.fromkeys(held):
            os.kill(os.getpid(), s)


# ------------------------------------------------------------------------------------ stderr


class _Captured:
    def __init__(self, buffer):
        self.buffer = buffer
        self.keep = True

    def drop(self) -> None:
        """Discard what was captured instead of passing it on at the end of the block."""
        self.keep = False

    def text(self) -> str:
        self.buffer.seek(0)
        return self.buffer.read().decode("utf-8", errors="replace")


@contextlib.contextmanager
def stderr_captured():
    """Everything written to file descriptor 2 inside the block, by Python or by C code in any
    thread, goes to a temporary file, and is written to the real stderr at the end unless the
    block called ``captured.drop()``. For noisy libraries (orbax/tensorstore background writers)."""
    import sys
    import tempfile

    with tempfile.TemporaryFile() as buffer:
        captured = _Captured(buffer)
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(buffer.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if captured.keep:
                text = captured.text()
                if text:
                    sys.stderr.write(text)
                    sys.stderr.flush()


# ------------------------------------------------------------------------------------ lock file


def owner_info(what: str) -> dict:
    """Who holds a lock: pid, host, start time, command."""
    import sys

    return {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv}


def _describe_owner(info: dict) -> str:
    if not info:
        return "another process"
    argv = " ".join(str(a) for a in info.get("argv", []))[:200]
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"
            + (f" ({argv})" if argv else ""))


def _read_owner(fd: int) -> dict:
    try:
        data = os.pread(fd, 65536, 0)
        value = json.loads(data.decode("utf-8")) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class LockFile:
    """An exclusive lock held through an open file (``fcntl.flock``): the kernel drops it when the
    holder exits, however it exits, so a lock left by a killed process is stale and is taken over.
    The file holds the holder's pid, host, start time and command line (for the error message).

    On NFS, Linux emulates flock with POSIX byte-range locks, so the lock also holds across hosts.

        lock = LockFile(path, "cfgbasin-generate run").acquire()   # FileError when held
        ...
        lock.release()          # removes the file
    """

    def __init__(self, path, what: str):
        self.path = Path(path)
        self.what = what
        self.stale_owner: dict | None = None  # the previous holder's record when a stale lock was taken over
        self._fd: int | None = None

    def acquire(self) -> "LockFile":
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise FileError(f"{self.path.parent} is in use by another {self.what} ({_describe_owner(owner)}); "
                                "wait for it to finish or use another folder") from None
            except BaseException:
                os.close(fd)
                raise
            # The holder may have removed the file between our open and flock: lock the current file.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_owner(fd)
        self.stale_owner = previous or None
        try:
            record = json.dumps(owner_info(self.what)).encode("utf-8")
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Remove the file, then drop the lock (in this order, so no one locks a removed file)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "LockFile":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def describe_owner(info: dict | None) -> str:
    """One-line description of a lock record (pid, host, start, command)."""
    return _describe_owner(info or {})


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))
