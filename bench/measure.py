"""Timing and memory helpers: medians of repeats, peak resident memory, the machine line."""

from __future__ import annotations

import os
import platform
import threading
import time
from typing import Callable

import numpy as np


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakRSS:
    """Context manager: ``peak_mb`` = highest RSS seen while inside (polled every ``interval`` s)
    minus the RSS on entry. Memory the allocators kept from earlier work is not counted again."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def _poll(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._start = self._peak = rss_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, rss_bytes())
        self.peak_mb = (self._peak - self._start) / 2**20
        return False


def reset_device_peak() -> None:
    """Reset PyTorch's CUDA peak-memory counter (JAX's cannot be reset: see device_peak_mb)."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    except ImportError:
        pass


def device_peak_mb() -> dict:
    """Accelerator memory peaks in MB: {"jax": process-lifetime peak of device 0 (None on CPU),
    "torch": CUDA peak since reset_device_peak (None without CUDA)}."""
    out = {"jax": None, "torch": None}
    try:
        import jax

        stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
        if stats and "peak_bytes_in_use" in stats:
            out["jax"] = stats["peak_bytes_in_use"] / 2**20
    except Exception:  # backend without memory statistics
        pass
    try:
        import torch

        if torch.cuda.is_available():
            out["torch"] = torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass
    return out


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call; the result is blocked on when it is a JAX array tree."""
    start = time.perf_counter()
    out = fn()
    _block(out)
    return time.perf_counter() - start, out


def _block(out) -> None:
    try:
        import jax

        jax.block_until_ready(out)
    except Exception:  # not a JAX tree (numpy / torch / dataclass): already synchronous
        pass


def interleaved(fns: dict, repeats: int) -> dict:
    """{name: [seconds per repeat]}: every repeat runs each function once, in turn, so slow phases of
    a shared machine hit all of them alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn)[0])
    return times


def median_ratio(a: list, b: list) -> float:
    """Median over repeats of a[i] / b[i] (paired, same-repeat ratios)."""
    return float(np.median(np.asarray(a) / np.asarray(b)))


def machine() -> dict:
    """CPU model, vendor, ISA level and flags, core count, affinity, load, memory, accelerator,
    library versions."""
    import jax

    from cfgbasin_jax.runtime.cpu import host_cpu, isa_level

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [d.device_kind for d in jax.devices()],
    }
    cpu = host_cpu()
    info.update(cpu=cpu.model, cpu_vendor=cpu.vendor, cpu_isa=isa_level(cpu), cpu_flags=list(cpu.isa_flags))
    try:
        with open("/proc/meminfo") as f:
            total_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        info["memory_gb"] = round(total_kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    versions = {}
    for name in ("jax", "jaxlib", "flax", "torch", "diffusers", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # not installed
            pass
    info["versions"] = versions
    return info


def machine_line(info: dict) -> str:
    """One line for the README: CPU, cores, accelerator, load, versions."""
    versions = ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items())
    devices = ",".join(sorted(set(info.get("jax_devices", []))))
    load = info.get("load_avg_start", info.get("load_avg"))
    load_end = info.get("load_avg_end")
    load_text = f"load avg {load[0]}" + (f" -> {load_end[0]}" if load_end else "")
    isa = (f" ({info['cpu_vendor'] or 'vendor ?'}; ISA {info['cpu_isa']}: {' '.join(info['cpu_flags']) or 'none'})"
           if "cpu_isa" in info else "")
    return (
        f"{info.get('cpu')}{isa}, {info.get('cores')} cores, {info.get('memory_gb', '?')} GB, "
        f"JAX backend {info.get('jax_backend')} ({devices}), {info.get('setting', '')}; {load_text}; {versions}"
    )
