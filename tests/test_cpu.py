"""runtime.cpu: /proc/cpuinfo parsing and the ISA level, on fixed texts of real CPU families."""

from __future__ import annotations

import pytest

from cfgbasin_jax.runtime import cpu

INTEL_SPR = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Intel(R) Xeon(R) Platinum 8480C
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: something else
flags\t\t: fpu
"""
INTEL_ICX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni
"""
AMD_ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
flags\t\t: fpu avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni
"""
AMD_ZEN2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse4_2 avx avx2 fma
"""
GRAVITON = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize("text, model, vendor, level", [
    (INTEL_SPR, "Intel(R) Xeon(R) Platinum 8480C", "GenuineIntel", "amx"),
    (INTEL_ICX, "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "GenuineIntel", "avx512"),
    (AMD_ZEN4, "AMD EPYC 9B14", "AuthenticAMD", "avx512"),
    (AMD_ZEN2, "AMD EPYC 7B12", "AuthenticAMD", "avx2"),
    (GRAVITON, "aarch64", "0x41", "neon"),
    ("", "x86_64", "", "baseline"),
])
def test_parse_and_level(text, model, vendor, level):
    machine = "aarch64" if text is GRAVITON else "x86_64"
    info = cpu.parse_cpuinfo(text, machine)
    assert (info.model, info.vendor, cpu.isa_level(info)) == (model, vendor, level)


def test_only_the_first_processor_is_read_and_flags_keep_their_order():
    info = cpu.parse_cpuinfo(INTEL_SPR)
    assert "avx512f" in info.flags and info.model.endswith("8480C")
    assert info.isa_flags == ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                              "amx_tile", "amx_bf16", "amx_int8")


def test_host_cpu_reads_this_machine():
    info = cpu.host_cpu()
    assert info.model and cpu.isa_level(info) in cpu.LEVELS


def test_by_level_takes_the_given_or_this_machines_level(monkeypatch):
    table = {"amx": "tiles", "avx512": "wide"}
    assert cpu.by_level(table, "default", "amx") == "tiles"
    assert cpu.by_level(table, "default", "avx2") == "default"  # a level without an entry
    monkeypatch.setattr(cpu, "host_cpu", lambda: cpu.parse_cpuinfo(INTEL_ICX))
    assert cpu.by_level(table, "default") == "wide"  # no level given: this machine's (avx512 here)
