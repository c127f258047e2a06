"""The conversion cache (cfgbasin_jax.loading.cache): a diffusers folder is converted once, later loads
read the converted directory; two processes started together convert once; a changed source converts
again; CFGBASIN_JAX_CONVERSION_CACHE=0 opts out; cfgbasin-convert --cache-info / --cache-clear."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from cfgbasin_jax.convert.__main__ import main as convert_main
from cfgbasin_jax.loading import load_components
from cfgbasin_jax.loading.cache import load_cached
from cfgbasin_jax.models.converted import is_converted


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "conversions"
    monkeypatch.setenv("CFGBASIN_JAX_CONVERSION_CACHE", str(folder))
    return folder


@pytest.fixture
def source(tiny_sd1, tmp_path):
    return shutil.copytree(tiny_sd1.path, tmp_path / "sd")


def entries(folder):
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []


def same_params(a, b) -> bool:
    leaves = [jax.tree.leaves(c.params) for c in (a, b)]
    return len(leaves[0]) == len(leaves[1]) and all(np.array_equal(x, y) for x, y in zip(*leaves))


def test_converted_once_then_read_and_changed_source_converts_again(cache, source):
    notes = []
    first = load_cached(source, log=notes.append)
    assert sum("converting" in n for n in notes) == 1 and len(entries(cache)) == 1
    assert is_converted(cache / entries(cache)[0]) and first.source == str(source)
    assert same_params(first, load_components(source))  # the in-memory conversion agrees
    notes.clear()
    load_cached(source, log=notes.append)
    assert notes == []  # read from the cache
    load_cached(source, dtype="bfloat16", log=notes.append)
    assert sum("converting" in n for n in notes) == 1 and len(entries(cache)) == 2  # a dtype has its own entry
    (source / "scheduler" / "scheduler_config.json").write_text(
        (source / "scheduler" / "scheduler_config.json").read_text().replace("}", ', "note": 1}', 1))
    notes.clear()
    load_cached(source, log=notes.append)
    assert sum("converting" in n for n in notes) == 1 and len(entries(cache)) == 3


def test_opt_out(source, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("CFGBASIN_JAX_CONVERSION_CACHE", "0")
    notes = []
    load_cached(source, log=notes.append)
    assert notes == [] and not (tmp_path / "xdg").exists()


LOAD = """
import sys
from cfgbasin_jax.loading.cache import load_cached
load_cached(sys.argv[1], log=lambda m: print(m, flush=True))
print("loaded")
"""


def test_two_processes_started_together_convert_once(cache, source):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", LOAD, str(source)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    text = "".join(o[0] for o in outs)
    assert text.count("converting") == 1 and text.count("loaded") == 2, text
    assert len(entries(cache)) == 1 and not any(p.name.startswith(".") and p.is_dir() for p in cache.iterdir())


def test_cache_info_and_clear(cache, source, capsys):
    load_cached(source)
    assert convert_main(["--cache-info"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("1 converted model(s), ") and str(cache) in line and "\n" not in line
    assert convert_main(["--cache-clear"]) == 0
    assert capsys.readouterr().out.strip().startswith("removed 1 converted model(s)")
    assert entries(cache) == []
