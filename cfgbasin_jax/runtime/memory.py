"""Host memory housekeeping for large models.

XLA's CPU runtime frees its temporaries into glibc's per-thread malloc arenas, which keep them: the
VAE decoder's temporaries (other threads, other arenas) then come on top of the sampler's, and the
process's peak grows by the sampler's working set. :func:`release_freed` hands freed memory back to
the operating system between the two (a fraction of a second for SD; skipped for small models).
"""

from __future__ import annotations

import ctypes
import ctypes.util

# Below this many bytes of params the temporaries are small and the call is not worth its time.
MIN_PARAM_BYTES = 256 << 20

_LIBC: list = []


def _malloc_trim():
    if not _LIBC:
        name = ctypes.util.find_library("c")
        try:
            _LIBC.append(getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None)
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def release_freed(param_bytes: int = MIN_PARAM_BYTES) -> bool:
    """Return the memory malloc holds free to the OS (glibc ``malloc_trim``) when the model has at
    least MIN_PARAM_BYTES of params; True if it ran (False: small model, or not glibc)."""
    trim = _malloc_trim()
    if trim is None or param_bytes < MIN_PARAM_BYTES:
        return False
    trim(0)
    return True
