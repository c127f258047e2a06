"""Multi-process generation (cfgbasin_jax.runs.distributed): settings, deterministic shares, bounded
start-up, and a real 2-process run on 127.0.0.1 (2 forced host devices each) whose union equals a
single-process run."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from cfgbasin_jax.apps import generate as cli
from cfgbasin_jax.runs import distributed as D
from cfgbasin_jax.runs import folder as R


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ settings


def test_resolve_single_and_multi():
    assert D.resolve(env={}) == D.SINGLE
    assert D.resolve(num_processes=1, process_id=0, env={}) == D.SINGLE
    info = D.resolve("127.0.0.1:1234", 3, 2, env={})
    assert (info.process_id, info.num_processes, info.coordinator, info.multi, info.is_main) == (2, 3, "127.0.0.1:1234", True, False)
    env = {D.ENV_COORDINATOR: "10.0.0.1:99", D.ENV_NUM_PROCESSES: "2", D.ENV_PROCESS_ID: "1"}
    assert D.resolve(env=env) == D.ProcessInfo(1, 2, "10.0.0.1:99")
    assert D.resolve(process_id=0, env=env) == D.ProcessInfo(0, 2, "10.0.0.1:99")  # flags win
    assert D.resolve(auto=True, env={}).auto


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator="h:1", num_processes=2, process_id=2), "--process_id 2 is out of range for --num_processes 2"),
    (dict(coordinator="h:1", num_processes=2, process_id=-1), "--process_id -1 is out of range"),
    (dict(coordinator="h:1", num_processes=0, process_id=0), "--num_processes must be a positive integer"),
    (dict(num_processes=2, process_id=1), "--coordinator HOST:PORT"),
    (dict(coordinator="h:1", num_processes=2), "--process_id is required"),
    (dict(coordinator="nohost", num_processes=2, process_id=0), "must look like HOST:PORT"),
    (dict(coordinator="h:1", env={D.ENV_NUM_PROCESSES: "two"}, process_id=0), "JAX_NUM_PROCESSES must be an integer"),
])
def test_resolve_rejects(kwargs, message):
    kwargs.setdefault("env", {})
    with pytest.raises(D.DistributedError, match=message):
        D.resolve(**kwargs)


# ------------------------------------------------------------------------------------ shares


def test_batch_grid_is_anchored_at_zero():
    assert D.batch_grid(0, 7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert D.batch_grid(4, 11, 4) == [[4, 5, 6, 7], [8, 9, 10]]
    assert D.batch_grid(5, 11, 4) == [[5, 6, 7], [8, 9, 10]]
    with pytest.raises(ValueError):
        D.batch_grid(0, 3, 0)


@pytest.mark.parametrize("start, end, batch", [(0, 23, 4), (3, 17, 2), (0, 5, 8)])
def test_shares_partition_the_grid(start, end, batch):
    grid = D.batch_grid(start, end, batch)
    for n in (1, 2, 3, 5):
        shares = [D.share(grid, batch, p, n) for p in range(n)]
        union = sorted((b for s in shares for b in s), key=lambda b: b[0])
        assert union == grid  # every batch exactly once, compositions unchanged
        assert sorted(i for s in shares for b in s for i in b) == list(range(start, end))
    # a batch's owner does not depend on where the run starts
    for p in range(3):
        late = [b for b in D.share(D.batch_grid(13, 20, 2), 2, p, 3) if b[0] >= 14]
        assert late == [b for b in D.share(D.batch_grid(0, 20, 2), 2, p, 3) if b[0] >= 14]


# ------------------------------------------------------------------------------------ start-up


def test_wait_for_port_is_bounded():
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(D.DistributedError, match=rf"coordinator 127.0.0.1:{port} could not be reached within 0.5 s"):
        D.wait_for_port(f"127.0.0.1:{port}", 0.5)
    assert time.monotonic() - t0 < 3
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        D.wait_for_port(f"127.0.0.1:{server.getsockname()[1]}", 2)
        with pytest.raises(D.DistributedError, match="is not free"):
            D.check_port_free(f"127.0.0.1:{server.getsockname()[1]}")


def test_cli_unreachable_coordinator_exits_2(tiny_sd1, tmp_path, capsys):
    import jax

    out = tmp_path / "out"
    argv = ["--method", "stp", "--pretrained_model_name_or_path", str(tiny_sd1.path), "--exp", "imagenette",
            "--end_iter", "4", "--outdir", str(out), "--coordinator", f"127.0.0.1:{free_port()}",
            "--num_processes", "2", "--process_id", "1", "--distributed_timeout", "1", "--no_compilation_cache"]
    t0 = time.monotonic()
    assert cli.main(argv) == 2
    assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not be reached within 1 s" in err[0], err
    assert not out.exists() and not jax.distributed.is_initialized()


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def test_missing_peer_times_out_with_exit_2(tiny_sd1, tmp_path):
    """Process 0 of 2 alone: the watchdog ends it with one line and status 2 (JAX alone would abort
    with a C++ stack trace after its own deadline)."""
    command = [sys.executable, "-m", "cfgbasin_jax.apps.generate", "--method", "stp", "--pretrained_model_name_or_path",
               str(tiny_sd1.path), "--exp", "imagenette", "--end_iter", "4", "--outdir", str(tmp_path / "out"),
               "--coordinator", f"127.0.0.1:{free_port()}", "--num_processes", "2", "--process_id", "0",
               "--distributed_timeout", "3", "--no_compilation_cache"]
    done = subprocess.run(command, env=_env(2), capture_output=True, timeout=120)
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 2, err[-2000:]
    assert "error: joining 127.0.0.1" in err and "did not complete within" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ 2 processes


def test_two_processes_equal_one(tiny_sd1_converted, tmp_path):
    """Process 0 by flags, process 1 by JAX_* environment variables; 5 prompts in batches of 2:
    process 0 makes [0,1] and [4], process 1 makes [2,3]. The merged result equals a
    single-process run. The model is a converted (orbax) directory: each process restores it
    locally."""
    common = ["--method", "stp", "--pretrained_model_name_or_path", str(tiny_sd1_converted), "--exp", "imagenette",
              "--end_iter", "5", "--guidance_change_step", "500", "--guidance_scale", "0", "--guidance_scale_later",
              "7.5", "--num_inference_steps", "6", "--img_size", "16", "--batch_size", "2", "--progress", "none",
              "--no_compilation_cache"]
    multi, single = tmp_path / "multi", tmp_path / "single"
    address = f"127.0.0.1:{free_port()}"
    base = [sys.executable, "-m", "cfgbasin_jax.apps.generate", *common, "--outdir", str(multi), "--distributed_timeout", "120"]
    env1 = {**_env(2), D.ENV_COORDINATOR: address, D.ENV_NUM_PROCESSES: "2", D.ENV_PROCESS_ID: "1"}
    procs = [
        subprocess.Popen(base + ["--coordinator", address, "--num_processes", "2", "--process_id", "0"],
                         env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
        subprocess.Popen(base, env=env1, stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=480)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    assert "3 to generate in 2 batch(es)" in logs[0] and "process 0 of 2" in logs[0]
    assert "2 to generate in 1 batch(es)" in logs[1] and "process 1 of 2" in logs[1]

    assert cli.main(common + ["--outdir", str(single)]) == 0
    multi_recs = [json.loads(x) for x in (multi / R.METADATA_FILE).read_text().splitlines()]
    single_recs = [json.loads(x) for x in (single / R.METADATA_FILE).read_text().splitlines()]
    assert [r["index"] for r in multi_recs] == list(range(5))
    strip = lambda r: {k: v for k, v in r.items() if k != "noise_diff"}  # noqa: E731
    assert [strip(r) for r in multi_recs] == [strip(r) for r in single_recs]
    for a, b in zip(multi_recs, single_recs):  # 2 vs 1 host devices: XLA may round differently
        np.testing.assert_allclose(np.array(a["noise_diff"], float), np.array(b["noise_diff"], float), rtol=1e-4)
    assert sorted(os.listdir(multi / "Images")) == sorted(os.listdir(single / "Images"))
    for name in os.listdir(single / "Images"):
        x = np.asarray(Image.open(multi / "Images" / name), np.int16)
        y = np.asarray(Image.open(single / "Images" / name), np.int16)
        assert np.abs(x - y).max() <= 1, name
    assert not list(multi.glob("metadata.p*.jsonl"))
    assert (multi / "run.p0.log").exists() and (multi / "run.p1.log").exists()
    assert (multi / "config.json").exists() and (multi / "noise_diff.png").exists()
