"""Data parallelism: same seed -> same image for any device count and batch size (bitwise on CPU)."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from early_start import Started
from parallel_worker import GRID

HERE = Path(__file__).parent


def start_early(request, items):
    """The worker, started at the session's first test (conftest's `early`) when a collected test
    reads its runs: it runs for minutes in its own process, beside the other tests."""
    if not any("sharded_runs" in item.fixturenames for item in items):
        return {}
    model = request.getfixturevalue("tiny_sd1_converted")
    folder = request.getfixturevalue("tmp_path_factory").mktemp("parallel")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    command = [sys.executable, HERE / "parallel_worker.py", model, folder / "runs.npz"]
    return {"parallel_worker": Started([command], env, folder / "logs")}


@pytest.fixture(scope="module")
def sharded_runs(early):
    worker = early["parallel_worker"]
    (proc,) = worker.wait(timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(worker.logs.parent / "runs.npz"))


def _local_batch(n_dev, bs):
    return -(-min(bs, 12) // n_dev)


@pytest.mark.parametrize("method", ["stp", "dtp"])
def test_same_image_across_devices_and_batch_sizes(sharded_runs, method):
    """Bitwise equal whenever the per-device compute shape is the same (batch 5 on 2 devices and
    batch 12 on 4 devices both run 3 samples per device).
    Across different per-device shapes XLA:CPU picks shape-dependent kernels (a batch-1 GroupNorm
    reduction, for one), so there the images may differ by at most one uint8 level in rare pixels."""
    ref = sharded_runs[f"{method}_1_12_images"]
    assert ref.shape[0] == 12 and ref.dtype == np.uint8
    by_shape = {}
    for n_dev, bs in GRID:
        key = f"{method}_{n_dev}_{bs}"
        images = sharded_runs[key + "_images"]
        np.testing.assert_array_equal(sharded_runs[key + "_index"], sharded_runs[f"{method}_1_12_index"])
        first = by_shape.setdefault(_local_batch(n_dev, bs), images)
        np.testing.assert_array_equal(images, first, err_msg=key)
        diff = np.abs(images.astype(np.int16) - ref)
        assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3, key
    assert len(by_shape) == 4  # per-device batches 12, 3 (twice: 2 devices x 5 and 4 x 12), 1, 6


def test_unet_evals_count_only_real_samples(sharded_runs):
    # STP at 5 DDIM steps (timesteps 801, 601, 401, 201, 1): 2 steps unconditional only, 3 with both
    per_sample = 2 * 1 + 3 * 2
    for n_dev, bs in GRID:  # chunks of 12, 6 (batch 5 on 2 devices), 4, 12, 12: no padding row
        assert int(sharded_runs[f"stp_{n_dev}_{bs}_evals"]) == 12 * per_sample
    # 5 prompts in one call: 1 padding row on 2 devices, 3 on 4 devices; neither is counted
    for n_dev in (2, 4):
        assert int(sharded_runs[f"pad5_{n_dev}_evals"]) == 5 * per_sample, n_dev


def test_too_many_devices_is_a_clear_error(sharded_runs):
    msg = str(sharded_runs["too_many_devices_error"])
    assert "devices=8" in msg and "4 local device" in msg


def test_bfloat16_params_take_half_the_bytes(tiny_sd1_converted):
    import cfgbasin_jax

    f32 = cfgbasin_jax.load_pipeline(tiny_sd1_converted).param_bytes()
    bf16 = cfgbasin_jax.load_pipeline(tiny_sd1_converted, dtype="bfloat16").param_bytes()
    for k in ("unet", "vae", "text_encoder"):
        assert bf16[k] * 2 == f32[k], k
