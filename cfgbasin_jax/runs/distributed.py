"""Multi-process generation: ``jax.distributed`` start-up and deterministic per-process shares.

Every process of a run sees the same global prompt index range. It is cut into a fixed grid of
batches ``[k*B, (k+1)*B)`` (B = ``--batch_size``, anchored at index 0, clipped to the range) and
batch k goes to process ``k % num_processes``. Batch composition therefore never depends on the
number of processes, on resume or on which images already exist, so the union of the processes'
images equals a single-process run with the same batch size.

Start-up (:func:`initialize`) never hangs: a non-coordinator process first waits (bounded) until
the coordinator's port accepts connections, and a watchdog ends the process with a one-line error
and exit status 2 if ``jax.distributed.initialize`` has not returned within the timeout (JAX itself
would abort the process with a C++ stack trace after its own deadline).

Settings come from flags or environment: ``--coordinator`` / ``JAX_COORDINATOR_ADDRESS`` (the
variable JAX reads), ``--num_processes`` / ``JAX_NUM_PROCESSES``, ``--process_id`` /
``JAX_PROCESS_ID`` (these two are read here, not by JAX). ``auto=True`` leaves everything to JAX's
cluster detection (SLURM, Open MPI, Kubernetes, Cloud TPU).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import time
from typing import Sequence

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
DEFAULT_TIMEOUT_S = 120


class DistributedError(RuntimeError):
    """Bad multi-process settings or a start-up that failed (one-line message)."""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """process_id in [0, num_processes); coordinator "host:port" (None for auto-detection or a
    single process); auto: JAX's cluster detection chooses everything."""

    process_id: int = 0
    num_processes: int = 1
    coordinator: str | None = None
    auto: bool = False

    @property
    def multi(self) -> bool:
        return self.auto or self.num_processes > 1

    @property
    def is_main(self) -> bool:
        return self.process_id == 0


SINGLE = ProcessInfo()


def _int_setting(name: str, flag, env: dict, env_name: str) -> int | None:
    value = flag if flag is not None else env.get(env_name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        source = name if flag is not None else env_name
        raise DistributedError(f"{source} must be an integer, got {value!r}") from None


def split_address(address: str) -> tuple[str, int]:
    """"host:port" (or "[v6]:port") -> (host, port)."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"coordinator address {address!r} must look like HOST:PORT")
    return host.strip("[]"), int(port)


def resolve(coordinator=None, num_processes=None, process_id=None, auto: bool = False, env=None) -> ProcessInfo:
    """Settings from flags, falling back to the environment; validated, no side effects.

    No coordinator and at most one process: :data:`SINGLE`. ``auto``: JAX detects the cluster.
    """
    env = os.environ if env is None else env
    if auto:
        return ProcessInfo(coordinator=coordinator or env.get(ENV_COORDINATOR) or None, auto=True)
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    n = _int_setting("--num_processes", num_processes, env, ENV_NUM_PROCESSES)
    pid = _int_setting("--process_id", process_id, env, ENV_PROCESS_ID)
    if coordinator is None and n in (None, 1) and pid in (None, 0):
        return SINGLE
    if n is None or n < 1:
        raise DistributedError(f"--num_processes must be a positive integer, got {n}")
    if pid is None:
        raise DistributedError("--process_id is required with --num_processes > 1")
    if not 0 <= pid < n:
        raise DistributedError(f"--process_id {pid} is out of range for --num_processes {n} (0..{n - 1})")
    if n == 1:
        return SINGLE
    if coordinator is None:
        raise DistributedError(f"--coordinator HOST:PORT (or {ENV_COORDINATOR}) is required with {n} processes")
    split_address(coordinator)
    return ProcessInfo(process_id=pid, num_processes=n, coordinator=coordinator)


def wait_for_port(address: str, timeout_s: float, interval_s: float = 0.2) -> None:
    """Block until ``address`` accepts a TCP connection; DistributedError after ``timeout_s``."""
    host, port = split_address(address)
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(1.0, timeout_s))):
                return
        except OSError as err:
            last = err
        if time.monotonic() >= deadline:
            reason = getattr(last, "strerror", None) or str(last)
            raise DistributedError(f"coordinator {address} could not be reached within {timeout_s:g} s ({reason})")
        time.sleep(interval_s)


def check_port_free(address: str) -> None:
    """The coordinator process binds ``address``'s port on all interfaces: fail early if taken."""
    _, port = split_address(address)
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            sock.bind((host, port))
            return
        except OSError as err:
            raise DistributedError(f"coordinator port {port} is not free ({err.strerror})") from None
        finally:
            sock.close()


def _watchdog(timeout_s: float, what: str) -> threading.Timer:
    def fire():
        print(f"cfgbasin: error: {what} did not complete within {timeout_s:g} s "
              "(are all processes started with the same --coordinator and --num_processes?)",
              file=sys.stderr, flush=True)
        os._exit(2)

    timer = threading.Timer(timeout_s, fire)
    timer.daemon = True
    return timer


def initialize(info: ProcessInfo, timeout_s: float = DEFAULT_TIMEOUT_S) -> ProcessInfo:
    """Start ``jax.distributed`` for a multi-process ``info`` (no-op for a single process).

    Must run before anything touches a JAX backend. Returns the settings actually in effect (for
    ``auto``, the detected process id and count). Bounded: DistributedError when the coordinator
    is unreachable; exit status 2 via a watchdog when peers do not join in time.
    """
    if not info.multi:
        return info
    import jax

    deadline = time.monotonic() + timeout_s
    if info.coordinator is not None and not info.auto:
        if info.is_main:
            check_port_free(info.coordinator)
        else:
            wait_for_port(info.coordinator, timeout_s)
    remaining = max(1.0, deadline - time.monotonic())
    timer = _watchdog(remaining, f"joining {info.coordinator or 'the detected cluster'} as process "
                                 f"{info.process_id if not info.auto else '?'} of "
                                 f"{info.num_processes if not info.auto else '?'}")
    timer.start()
    try:
        if info.auto:
            jax.distributed.initialize(coordinator_address=info.coordinator,
                                       initialization_timeout=int(remaining) + 30)
        else:
            jax.distributed.initialize(coordinator_address=info.coordinator, num_processes=info.num_processes,
                                       process_id=info.process_id, initialization_timeout=int(remaining) + 30)
    except (ValueError, TypeError, RuntimeError) as err:
        raise DistributedError(f"jax.distributed.initialize failed: {' '.join(str(err).split())}") from None
    finally:
        timer.cancel()
    return ProcessInfo(process_id=jax.process_index(), num_processes=jax.process_count(),
                       coordinator=info.coordinator, auto=info.auto)


def barrier(name: str, info: ProcessInfo) -> None:
    """All processes wait here (no-op for a single process)."""
    if not info.multi or info.num_processes == 1:
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def shutdown(info: ProcessInfo) -> None:
    if info.multi:
        import jax

        jax.distributed.shutdown()


def batch_grid(start: int, end: int, batch_size: int) -> list[list[int]]:
    """Global indices [start, end) cut at multiples of ``batch_size`` (grid anchored at 0)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches, i = [], start
    while i < end:
        stop = min(end, (i // batch_size + 1) * batch_size)
        batches.append(list(range(i, stop)))
        i = stop
    return batches


def share(batches: Sequence[Sequence[int]], batch_size: int, process_id: int, num_processes: int) -> list:
    """This process's batches: grid batch k (``k = first index // batch_size``) goes to process
    ``k % num_processes``, whatever the run's start and end."""
    return [b for b in batches if (b[0] // batch_size) % num_processes == process_id]
