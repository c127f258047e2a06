"""The host CPU (model, vendor, instruction sets) from ``/proc/cpuinfo``, and its ISA level.

    info = host_cpu()          # CpuInfo(model="AMD EPYC 9B14", vendor="AuthenticAMD", flags=frozenset(...))
    isa_level(info)            # "amx", "avx512", "avx2", "neon" or "baseline"
    info.isa_flags             # the flags that matter here: ("avx2", "avx512f", "avx512_bf16", ...)

The benchmark records them in every report; :func:`by_level` looks up per-level
tables (the convolution and attention choices in :mod:`cfgbasin_jax.models`).
"""

from __future__ import annotations

import dataclasses
import functools
import platform

# The instruction-set flags that decide matrix and convolution kernels, in /proc/cpuinfo's spelling.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")
LEVELS = ("amx", "avx512", "avx2", "neon", "baseline")


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """model: the model name; vendor: e.g. GenuineIntel, AuthenticAMD (empty where not given);
    flags: every feature flag of the first processor listed."""

    model: str
    vendor: str
    flags: frozenset

    @property
    def isa_flags(self) -> tuple:
        """The flags of :data:`ISA_FLAGS` this CPU has, in that order."""
        return tuple(f for f in ISA_FLAGS if f in self.flags)


def parse_cpuinfo(text: str, machine: str = "") -> CpuInfo:
    """CpuInfo from the text of /proc/cpuinfo (x86: 'model name', 'vendor_id', 'flags'; Arm:
    'Features', 'CPU implementer'). Only the first processor's block is read."""
    fields: dict = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    flags = frozenset((fields.get("flags") or fields.get("features") or "").split())
    model = fields.get("model name") or fields.get("cpu model") or fields.get("hardware") or machine or "unknown"
    vendor = fields.get("vendor_id") or fields.get("cpu implementer") or ""
    return CpuInfo(model=model, vendor=vendor, flags=flags)


def isa_level(info: CpuInfo) -> str:
    """The widest matrix instruction set: 'amx' (AMX tiles with bf16), 'avx512' (AVX-512 F+BW),
    'avx2' (AVX2 with FMA), 'neon' (Arm Advanced SIMD) or 'baseline'."""
    f = info.flags
    if {"amx_tile", "amx_bf16"} <= f:
        return "amx"
    if {"avx512f", "avx512bw"} <= f:
        return "avx512"
    if {"avx2", "fma"} <= f:
        return "avx2"
    if "asimd" in f:
        return "neon"
    return "baseline"


def by_level(table: dict, default, isa: str | None = None):
    """``table``'s entry for ISA level ``isa`` (default: this machine's level), else ``default``."""
    return table.get(isa or isa_level(host_cpu()), default)


@functools.lru_cache(maxsize=1)
def host_cpu() -> CpuInfo:
    """This machine's CpuInfo (empty flags where /proc/cpuinfo cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return parse_cpuinfo(f.read(), platform.machine())
    except OSError:
        return CpuInfo(model=platform.processor() or platform.machine() or "unknown", vendor="", flags=frozenset())
