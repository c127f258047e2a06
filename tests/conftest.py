"""Shared session fixtures: tiny random SD models (PyTorch oracle + diffusers folders on disk)."""

import atexit
import os
import shutil
import tempfile

import pytest
from tiny_sd import make_tiny_sd

# The library turns JAX's persistent compilation cache on by default (cfgbasin_jax.runtime.compile_cache):
# give the test session (and the processes it starts) its own directory, not the user's cache.
if "CFGBASIN_JAX_COMPILATION_CACHE" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="cfgbasin_test_jax_cache_")
    os.environ["CFGBASIN_JAX_COMPILATION_CACHE"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, True)
# The conversion cache (cfgbasin_jax.loading.cache) and the serialized samplers
# (cfgbasin_jax.runtime.executables) are off for the suite: diffusers folders convert in memory and
# samplers compile as before; tests/test_conversion_cache.py and tests/test_executables.py turn them on.
os.environ.setdefault("CFGBASIN_JAX_CONVERSION_CACHE", "0")
os.environ.setdefault("CFGBASIN_JAX_EXECUTABLE_CACHE", "0")
# Nothing reaches the Hugging Face Hub: a Hub id resolves against a closed local port (the discard
# port) unless a test points HF_ENDPOINT at its own server (tests/test_hub.py).
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    """TinySD of variant sd1 (PyTorch modules + safetensors diffusers folder)."""
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd1") / "sd", "sd1", "safetensors", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    """TinySD of variant sd2 (v_prediction, linear projections, per-block heads, gelu)."""
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd2") / "sd", "sd2", "safetensors", seed=2)


@pytest.fixture(scope="session")
def tiny_sd1_converted(tiny_sd1, tmp_path_factory):
    """Path of tiny_sd1 converted by cfgbasin_jax.convert.sd_folder.convert (float32)."""
    from cfgbasin_jax.convert.sd_folder import convert

    return convert(tiny_sd1.path, tmp_path_factory.mktemp("tiny_sd1_converted") / "dst")


# ---- pipelines shared by the sampler / DTP tests (one object each, so compiled samplers are reused)


@pytest.fixture(scope="session")
def pipe_sd1(tiny_sd1):
    """cfgbasin_jax Pipeline over tiny_sd1's diffusers folder (converted in memory, float32)."""
    import cfgbasin_jax

    return cfgbasin_jax.load_pipeline(tiny_sd1.path)


@pytest.fixture(scope="session")
def pipe_sd2(tiny_sd2):
    """cfgbasin_jax Pipeline over tiny_sd2 (v_prediction)."""
    import cfgbasin_jax

    return cfgbasin_jax.load_pipeline(tiny_sd2.path)


# ---- long subprocess checks started at the session's first test


@pytest.fixture(scope="session", autouse=True)
def early(request):
    """Long subprocess checks begun at the first test, one at a time on the second core beside the
    in-process tests (:mod:`early_start`): a test module's ``start_early(request, items)`` (its
    collected items) returns {name: :class:`early_start.Started`}, empty when none of them needs it;
    its tests wait with ``early[name].wait(timeout)``."""
    from early_start import run_in_order

    by_module: dict = {}
    for item in request.session.items:
        module = getattr(item, "module", None)
        if module is not None:
            by_module.setdefault(module, []).append(item)
    started = {}
    for module, items in by_module.items():
        start = getattr(module, "start_early", None)
        if start is not None:
            started.update(start(request, items))
    run_in_order(list(started.values()))
    yield started
    for job in started.values():
        job.stop()


@pytest.fixture(scope="module", autouse=True)
def release_executables(request):
    """Drop JAX's compiled executables after each test module.

    Every CPU executable holds a few memory mappings of its JIT-compiled code; the whole suite in one process
    compiles thousands and would pass the kernel's map limit (vm.max_map_count, 65530 by default), where LLVM
    fails with 'Cannot allocate memory' and the process aborts. A later module recompiles what it needs (from
    the session's persistent compilation cache). CFGBASIN_TEST_MAPS_LOG=FILE appends each module's mapping
    count before and after."""
    yield
    import gc

    import jax

    before = _mappings()
    jax.clear_caches()
    gc.collect()
    if os.environ.get("CFGBASIN_TEST_MAPS_LOG"):
        with open(os.environ["CFGBASIN_TEST_MAPS_LOG"], "a") as log:
            log.write(f"{request.node.name} {before} {_mappings()}\n")


def _mappings() -> int:
    """The number of this process's memory mappings (0 where /proc is missing)."""
    try:
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return 0
