"""Serialized executables (cfgbasin_jax.runtime.executables): a second process loads the compiled
sampler instead of tracing it; a corrupted entry, or one written under another key (another jax
version, backend or code), is rebuilt, never used. On a small jitted function, and on the shipped toy
pipeline across two processes."""

from __future__ import annotations

import json
import os
import pickle
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfgbasin_jax.runtime import executables as E


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(E.ENV, str(tmp_path / "exe"))
    return tmp_path / "exe"


def poly(x, y):
    return {"sum": jnp.sum(x * y + 1.0), "scaled": x * 2.0}


def make(static=None):
    return E.Executables.wrap(jax.jit(poly), "poly", static or {"k": 1})


def expected(x, y):  # the function restated in numpy
    return float(np.sum(x * y + 1.0)), x * 2.0


def check(out, x, y):
    want_sum, want_scaled = expected(np.asarray(x), np.asarray(y))
    assert np.isclose(float(out["sum"]), want_sum) and np.allclose(np.asarray(out["scaled"]), want_scaled)


def test_written_then_loaded_and_keyed_by_shapes(cache):
    x, y = jnp.arange(6.0).reshape(2, 3), jnp.ones((2, 3))
    first = make()
    check(first(x, y), x, y)
    assert (first.writes, first.hits) == (1, 0) and len(list(cache.iterdir())) == 1
    second = make()  # a fresh wrapper: loads from disk
    check(second(x, y), x, y)
    assert (second.writes, second.hits) == (0, 1)
    check(second(x[:1], y[:1]), x[:1], y[:1])  # another shape: another entry
    assert second.writes == 1 and len(list(cache.iterdir())) == 2 and second._cache_size() == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_key", "bad_payload"])
def test_broken_or_foreign_entries_are_rebuilt(cache, damage):
    x, y = jnp.arange(4.0), jnp.full((4,), 3.0)
    make()(x, y)
    (path,) = cache.iterdir()
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a pickle")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        entry = pickle.loads(data)
        if damage == "other_key":  # as if written by another jax version into this file
            description = json.loads(entry["description"])
            description["platform"]["jax"] = "0.0.1"
            entry["description"] = json.dumps(description, sort_keys=True)
        else:
            entry["payload"] = entry["payload"][:100]
        path.write_bytes(pickle.dumps(entry))
    again = make()
    check(again(x, y), x, y)
    assert (again.hits, again.rebuilds, again.writes) == (0, 1, 1)
    check(make()(x, y), x, y)  # the rewritten entry loads


def test_key_changes_with_platform_and_static(cache, monkeypatch):
    x, y = jnp.arange(3.0), jnp.ones(3)
    base = make().path_for(make().describe(E.signature((x, y))))
    assert make({"k": 2}).path_for(make({"k": 2}).describe(E.signature((x, y)))) != base
    monkeypatch.setattr(E, "_CODE_VERSION", ["another-code-version"])
    assert make().path_for(make().describe(E.signature((x, y)))) != base


def test_opt_out(monkeypatch):
    monkeypatch.setenv(E.ENV, "0")
    jitted = jax.jit(poly)
    assert E.Executables.wrap(jitted, "poly", {}) is jitted


SAMPLE = """
import sys, numpy as np
import cfgbasin_jax as cb
pipe = cb.load_pipeline(cb.TOY_MODEL, compilation_cache=False)
res = pipe.generate(["a red circle at the top left"], cb.guidance.constant(5.0), num_inference_steps=3, seed=0,
                    progress=False)
fn = next(iter(pipe._samplers.values()))
print("RESULT", fn.hits, fn.writes, int(res.images.astype(np.int64).sum()))
"""


def start_early(request, items):
    """The two processes below, one after the other, started at the session's first test (conftest's `early`)."""
    from early_start import Started, selected

    if not selected(items, "test_second_process_loads_the_sampler"):
        return {}

    folder = request.getfixturevalue("tmp_path_factory").mktemp("executables")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", E.ENV: str(folder / "exe")}
    return {"second_process_sampler": Started([[sys.executable, "-c", SAMPLE]] * 2, env, folder / "logs")}


def test_second_process_loads_the_sampler(early):
    runs = []
    for out in early["second_process_sampler"].wait(timeout=1200):
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(out.stdout.split("RESULT")[1].split())
    assert len(runs) == 2
    assert runs[0][:2] == ["0", "1"] and runs[1][:2] == ["1", "0"]  # written, then loaded
    assert runs[0][2] == runs[1][2]  # the same image


def test_an_entry_failing_its_first_run_is_rebuilt(cache, monkeypatch):
    """As a deserialized CPU executable that lost a kernel does ('Function ... not found')."""
    x, y = jnp.arange(5.0), jnp.ones(5)
    make()(x, y)

    def broken(*args):
        raise RuntimeError("INTERNAL: Function add_rsqrt_fusion.1 not found")

    monkeypatch.setattr(E.Executables, "_load", staticmethod(lambda path, description: broken))
    again = make()
    check(again(x, y), x, y)
    assert (again.hits, again.rebuilds, again.writes) == (0, 1, 1)
