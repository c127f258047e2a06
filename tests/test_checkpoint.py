"""The params checkpoint: streamed conversion (bounded tensor bytes, counted through a hook),
restoring straight from the files (and orbax's older layout), bfloat16 halving the params end to end,
and the persistent compilation cache (on in load_pipeline by default, never changed by a bare Pipeline)."""

import json
import os
import shutil
import sys
import weakref
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import cfgbasin_jax
from cfgbasin_jax.models import checkpoint
from cfgbasin_jax.runtime import compile_cache
from cfgbasin_jax.convert import ConversionError, weights
from cfgbasin_jax.convert.sd_folder import convert
from cfgbasin_jax.loading import COMPONENTS, load_components

PROMPT = ["a photo of a cat"]


def leaves_equal(a, b) -> bool:
    flat_a, tree_a = jax.tree_util.tree_flatten(a)
    flat_b, tree_b = jax.tree_util.tree_flatten(b)
    return tree_a == tree_b and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(flat_a, flat_b))


class LiveBytes:
    """Counting hook: bytes of the arrays handed out by StateDict.read that are still alive (each
    array's memory is counted until its owning buffer is freed, views and transposes included)."""

    def __init__(self):
        self.live = self.peak = self.reads = 0

    def track(self, array: np.ndarray) -> np.ndarray:
        owner = array
        while isinstance(owner.base, np.ndarray):
            owner = owner.base
        self.reads += 1
        self.live += owner.nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(owner, self._free, owner.nbytes)
        return array

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


def test_conversion_streams_tensor_by_tensor(tiny_sd1, tmp_path, monkeypatch):
    sizes = {}  # component -> bytes of each parameter tensor
    for kind in COMPONENTS:
        specs = weights.read_component_state_dict(tiny_sd1.path / kind, kind).specs
        sizes[kind] = [int(np.prod(s.shape)) * s.dtype.itemsize for key, s in specs.items()
                       if not key.endswith("position_ids")]  # a buffer, not a parameter
    largest = max(max(v) for v in sizes.values())
    budget = largest  # one tensor in flight at a time
    bound = budget + largest  # plus one buffer that a worker thread may still be letting go of
    assert max(sum(v) for v in sizes.values()) > 4 * bound  # holding the UNet at once breaks it
    assert sum(sum(v) for v in sizes.values()) > 8 * bound

    hook = LiveBytes()
    read = weights.StateDict.read
    monkeypatch.setattr(weights.StateDict, "read", lambda self, key: hook.track(read(self, key)))
    monkeypatch.setattr(checkpoint, "DEFAULT_BUDGET_BYTES", budget)
    dst = convert(tiny_sd1.path, tmp_path / "dst")

    assert hook.reads == sum(len(v) for v in sizes.values())  # every tensor read once
    assert 0 < hook.peak <= bound, (hook.peak, bound)
    assert hook.live == 0
    monkeypatch.undo()
    assert leaves_equal(load_components(dst).params, load_components(tiny_sd1.path).params)


def test_write_params_reports_its_peak(tmp_path):
    params = {"unet": {f"w{i}": np.full((256, 64), i, np.float32) for i in range(12)}}  # 64 KiB each
    budget = checkpoint.write_params(tmp_path / "p", params, budget_bytes=3 * 65536)
    assert budget.peak <= 3 * 65536 and budget.held == 0
    restored = ocp.PyTreeCheckpointer().restore(tmp_path / "p")  # orbax reads what we wrote
    assert leaves_equal(restored, params)


def test_fingerprint_hashed_while_writing_equals_the_stored_params(tiny_sd1_converted, tmp_path, monkeypatch):
    """The converter hashes each tensor in its writer threads; the same formula over the params read
    back gives the stored fingerprint, and one changed value changes it. One sync for the save."""
    from cfgbasin_jax.models import fingerprint as FP

    comps = load_components(tiny_sd1_converted)
    marker = json.loads((tiny_sd1_converted / "cfgbasin_jax.json").read_text())
    args = (comps.configs, comps.scheduler_config, tiny_sd1_converted / "tokenizer")
    assert FP.content_fingerprint(comps.params, *args) == marker["fingerprint"]
    changed = jax.tree.map(np.asarray, comps.params)
    changed["vae"]["decoder"]["conv_out"]["bias"] = changed["vae"]["decoder"]["conv_out"]["bias"] + 1
    assert FP.content_fingerprint(changed, *args) != marker["fingerprint"]

    synced = []
    sync = checkpoint.sync_tree
    monkeypatch.setattr(checkpoint, "sync_tree", lambda d: synced.append(Path(d).name) or sync(d))
    checkpoint.write_params(tmp_path / "p", {"unet": {"w": np.ones((4, 4), np.float32)}})
    assert synced == ["p"]


def test_restore_reads_the_files_and_agrees_with_orbax(tiny_sd1_converted):
    params_dir = tiny_sd1_converted / "params"
    stored = checkpoint.open_params(params_dir)
    assert stored is not None and set(stored) == set(COMPONENTS)  # the direct (mmap) path applies
    ours = load_components(tiny_sd1_converted).params
    restored = ocp.PyTreeCheckpointer().restore(params_dir)
    assert leaves_equal(ours, restored)
    meta = json.loads((params_dir / "_METADATA").read_text())
    assert not meta["use_ocdbt"] and {v["value_metadata"]["value_type"] for v in meta["tree_metadata"].values()} == {
        "np.ndarray"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_layout_of_older_converted_folders_still_loads(tiny_sd1_converted, tmp_path, dtype):
    old = tmp_path / "old"
    shutil.copytree(tiny_sd1_converted, old)
    params = load_components(tiny_sd1_converted).params
    shutil.rmtree(old / "params")
    with ocp.StandardCheckpointer() as ckpt:  # exactly how the converter wrote params before (OCDBT, zstd)
        ckpt.save((old / "params").absolute(), params)
        ckpt.wait_until_finished()
    assert checkpoint.open_params(old / "params") is None  # orbax restores it
    assert leaves_equal(load_components(old, dtype=dtype).params, load_components(tiny_sd1_converted, dtype=dtype).params)


def test_shapes_come_from_the_checkpoint_only_for_its_own_configs(tiny_sd1_converted, tmp_path, monkeypatch):
    from cfgbasin_jax.models import converted as loading

    traced = []
    shapes = loading.component_param_shapes
    monkeypatch.setattr(loading, "component_param_shapes", lambda *a, **k: traced.append(a[0]) or shapes(*a, **k))
    load_components(tiny_sd1_converted)
    assert traced == []  # written by the converter for these configs: no module traced
    edited = tmp_path / "edited"
    shutil.copytree(tiny_sd1_converted, edited)
    config = json.loads((edited / "unet" / "config.json").read_text())
    (edited / "unet" / "config.json").write_text(json.dumps({**config, "_edited": True}))  # same shapes
    load_components(edited)
    assert sorted(traced) == sorted(COMPONENTS)  # configs changed since: checked against the modules


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's unawaited reads after the failure
def test_params_that_do_not_fit_are_refused(tiny_sd1_converted, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_sd1_converted, bad)
    metadata = json.loads((bad / "params" / "_METADATA").read_text())
    metadata["custom_metadata"] = None  # as from an earlier converter: the shapes are checked
    (bad / "params" / "_METADATA").write_text(json.dumps(metadata))
    folder = bad / "params" / "unet.conv_in.kernel"
    zarray = json.loads((folder / ".zarray").read_text())
    shape = zarray["shape"]
    zarray["shape"] = zarray["chunks"] = [shape[0], shape[1], shape[3], shape[2]]
    (folder / ".zarray").write_text(json.dumps(zarray))
    with pytest.raises(ConversionError, match=r"params do not fit .*\['unet'\]\['conv_in'\]\['kernel'\]"):
        load_components(bad)
    (folder / "0.0.0.0").write_bytes(b"")  # truncated: orbax's turn, and it refuses as well
    with pytest.raises(ConversionError, match="params do not fit"):
        load_components(bad)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's unawaited reads after the failure
def test_bfloat16_load_halves_the_params_end_to_end(tiny_sd1_converted):
    full = cfgbasin_jax.load_pipeline(tiny_sd1_converted, dtype="float32")
    alive = jax.live_arrays()  # held here, so no buffer of theirs is freed and its address reused below
    before = {a.unsafe_buffer_pointer() for a in alive}
    half = cfgbasin_jax.load_pipeline(tiny_sd1_converted, dtype="bfloat16")
    assert {k: 2 * v for k, v in half.param_bytes().items()} == full.param_bytes()
    assert {leaf.dtype.name for leaf in jax.tree.leaves(half.params)} == {"bfloat16"}
    half.generate(PROMPT, num_inference_steps=2, scheduler="ddim", progress=False)
    # Device memory the bfloat16 pipeline holds after sampling: its params, nothing float32 beside.
    held = {a.unsafe_buffer_pointer(): a for a in jax.live_arrays() if a.unsafe_buffer_pointer() not in before}
    held_bytes = sum(a.nbytes for a in held.values())
    params = sum(half.param_bytes().values())
    assert params <= held_bytes <= params + 64 * 1024, (held_bytes, params)


def test_compilation_cache_defaults(monkeypatch, tmp_path):
    for name in (compile_cache.ENV, "JAX_COMPILATION_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_dir() == str(tmp_path / "cfgbasin_jax" / "jax_cache")
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.default_dir() == str(tmp_path / "mine")
    for off in ("0", "off", "False"):
        monkeypatch.setenv(compile_cache.ENV, off)
        assert compile_cache.default_dir() is None

    old = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert compile_cache.enable(None) is None and jax.config.jax_compilation_cache_dir is None  # opted out
        monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
        assert compile_cache.enable(False) is None and jax.config.jax_compilation_cache_dir is None
        assert compile_cache.enable(None) == str(tmp_path / "mine") == jax.config.jax_compilation_cache_dir
        assert compile_cache.enable(None) == str(tmp_path / "mine")  # a configured directory is kept
        assert compile_cache.enable(tmp_path / "given") == str(tmp_path / "given")
    finally:
        jax.config.update("jax_compilation_cache_dir", old)


CACHE_KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")


def _cache_config() -> tuple:
    return tuple(getattr(jax.config, key) for key in CACHE_KEYS)


def test_a_pipeline_changes_jax_config_only_when_asked(monkeypatch, tmp_path):
    """Pipeline(components) leaves JAX's global compilation-cache settings as they are; asking for a
    directory, for the default one (True), or calling load_pipeline (which asks by default) turns it on."""
    from cfgbasin_jax.models.tiny import random_components
    from cfgbasin_jax.pipeline import Pipeline

    comps = random_components("sd1")
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "default"))
    monkeypatch.setattr(cfgbasin_jax.loading, "load_components", lambda *a, **k: comps)
    old = _cache_config()
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        assert Pipeline(comps).compilation_cache is None
        assert cfgbasin_jax.load_pipeline("unused", compilation_cache=False).compilation_cache is None
        assert _cache_config() == (None, 1.0)  # not asked: untouched
        assert Pipeline(comps, compilation_cache=tmp_path / "given").compilation_cache == str(tmp_path / "given")
        assert _cache_config() == (str(tmp_path / "given"), 0.0)
        jax.config.update("jax_compilation_cache_dir", None)
        assert Pipeline(comps, compilation_cache=True).compilation_cache == str(tmp_path / "default")
        jax.config.update("jax_compilation_cache_dir", None)
        assert cfgbasin_jax.load_pipeline("unused").compilation_cache == str(tmp_path / "default")
        assert _cache_config() == (str(tmp_path / "default"), 0.0)
    finally:
        for key, value in zip(CACHE_KEYS, old):
            jax.config.update(key, value)


SECOND_PROCESS = """
import json, sys, jax.monitoring as m
import cfgbasin_jax
events = []
m.register_event_listener(lambda name, **_: events.append(name))
pipe = cfgbasin_jax.load_pipeline(sys.argv[1])
pipe.generate(["a photo of a cat"], num_inference_steps=2, scheduler="ddim", progress=False)
print(json.dumps({"hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses"), "dir": pipe.compilation_cache}))
"""


def start_early(request, items):
    """The two processes below, one after the other, started at the session's first test (conftest's `early`)."""
    from early_start import Started, selected

    if not selected(items, "test_a_second_process_loads_its_compilations_from_the_default_cache"):
        return {}

    folder = request.getfixturevalue("tmp_path_factory").mktemp("default_cache")
    env = {k: v for k, v in os.environ.items() if k not in (compile_cache.ENV, "JAX_COMPILATION_CACHE_DIR")}
    env.update(XDG_CACHE_HOME=str(folder / "xdg"), JAX_PLATFORMS="cpu")  # the library caches every executable
    command = [sys.executable, "-c", SECOND_PROCESS, request.getfixturevalue("tiny_sd1_converted")]
    return {"second_process_cache": Started([command] * 2, env, folder / "logs")}


def test_a_second_process_loads_its_compilations_from_the_default_cache(early):
    job = early["second_process_cache"]
    runs = []
    for out in job.wait(timeout=1200):
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["dir"] == second["dir"] == str(Path(job.env["XDG_CACHE_HOME"]) / "cfgbasin_jax" / "jax_cache")
    assert first["misses"] > 0  # written (a stage compiled twice with the same program may hit already)
    assert second["hits"] >= first["misses"] and second["misses"] == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's unawaited reads after the failure
def test_a_read_failing_while_streaming_leaves_nothing(tiny_sd1, tmp_path, monkeypatch):
    calls = []
    read = weights.StateDict.read

    def failing(self, key):
        calls.append(key)
        if len(calls) == 20:
            raise ConversionError(f"disk error while reading {key!r}")
        return read(self, key)

    monkeypatch.setattr(weights.StateDict, "read", failing)
    with pytest.raises(ConversionError, match="disk error"):
        convert(tiny_sd1.path, tmp_path / "out" / "dst")
    assert list((tmp_path / "out").iterdir()) == []
