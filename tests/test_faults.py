"""Bad input and faults, each reproduced as a user meets it (issue 15): flags checked before anything
is written, one run per OUTDIR (a real concurrent pair of processes, a stale lock of a SIGKILLed run),
the model fingerprint on resume, a safe --overwrite, no debris after SIGINT / SIGTERM / SIGKILL,
one-line I/O errors on a real read-only or full file system, the one tolerant metadata reader.

Read-only and full file systems are made in a user + mount namespace (``unshare -rm``: a tmpfs of a
few pages, or a read-only remount), which needs no privileges on the host; where the kernel refuses
such namespaces those tests are skipped with the reason.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cfgbasin_jax.apps import generate as cli
from cfgbasin_jax.runs import folder as R
from cfgbasin_jax.convert.sd_folder import convert
from cfgbasin_jax.convert.__main__ import main as convert_main

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
STEPS = 6
FAST = ["--num_inference_steps", str(STEPS), "--img_size", "16", "--batch_size", "2", "--progress", "none"]
IN_PROCESS = FAST + ["--no_compilation_cache"]
STP = ["--method", "stp", "--exp", "imagenette", "--guidance_change_step", "500", "--guidance_scale", "0",
       "--guidance_scale_later", "7.5"]


def env_cpu() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def one_error_line(err: str, prog: str = "cfgbasin-generate") -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err[-3000:]
    return lines[0]


def last_error_line(err: str, prog: str = "cfgbasin-generate") -> str:
    """A run's log lines may precede it: exactly one error line, the last one, and no traceback."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and [line for line in lines if "error:" in line] == lines[-1:], err[-3000:]
    assert lines[-1].startswith(f"{prog}: error: "), err[-3000:]
    return lines[-1]


def tree(folder: Path) -> list:
    """Every path under ``folder`` (hidden ones included), relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


def records(outdir) -> list:
    return R.read_metadata_file(Path(outdir) / R.METADATA_FILE)


def pngs(outdir) -> dict:
    return {p.name: p.read_bytes() for p in sorted((Path(outdir) / "Images").glob("*.png"))}


@pytest.fixture(scope="session")
def namespaces():
    """Skip unless ``unshare -rm`` can mount a tmpfs here (user + mount namespaces)."""
    try:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=8k tmpfs /mnt"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"no unshare: {err}")
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}")


def in_namespace(script: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) as root of a new user + mount namespace; its mounts vanish with it."""
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env_cpu(),
                          timeout=timeout)


def marker(text: str, name: str) -> str:
    """The value of ``name=...`` printed by a namespace script."""
    for line in text.splitlines():
        if line.startswith(name + "="):
            return line.split("=", 1)[1]
    raise AssertionError(f"{name} not printed:\n{text[-3000:]}")


# ---------------------------------------------------------------------------- 1. flags checked first


@pytest.mark.parametrize("script, argv, message", [
    ("generate_test_dataset_stp.py", ["--guidance_change_step", "-1"], "--guidance_change_step -1 must be in [0, 999]"),
    ("generate_test_dataset_stp.py", ["--guidance_change_step", "1000"], "--guidance_change_step 1000 must be in [0, 999]"),
    ("generate_test_dataset_stp.py", ["--guidance_change_step", "5000"], "--guidance_change_step 5000 must be in [0, 999]"),
    ("generate_test_dataset_dtp.py", ["--num_inference_steps", "1001", "--scheduler", "DDIM"],
     "--num_inference_steps 1001 must be in [1, 1000]"),
    ("generate_test_dataset_stp.py", ["--seed", "-1"], "--seed -1 must be in [0, 4294967295]"),
    ("generate_test_dataset_stp.py", ["--seed", str(2**32)], "--seed 4294967296 must be in"),
    ("generate_test_dataset_opposite_guidance.py", ["--distributed_timeout", "nan"], "--distributed_timeout"),
    ("generate_test_dataset_stp.py", ["--guidance_scale", "inf"], "must be finite"),
])
def test_bad_flags_of_the_scripts_are_refused_before_writing(script, argv, message, tiny_sd1, tmp_path,
                                                            monkeypatch, capsys):
    """Defect 1: a bad transition step or step count crashed after config.json, metadata.jsonl and
    run.log were written. Now the script exits 2 with one line naming the flag and writes nothing."""
    import runpy

    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", str(tiny_sd1.path), "--outdir", str(out), "--exp", "imagenette",
            "--end_iter", "2"] + IN_PROCESS + argv
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / script), *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(SCRIPTS / script), run_name="__main__")
    assert exit_info.value.code == 2
    assert message in one_error_line(capsys.readouterr().err, script)
    assert not out.exists()


def test_corrected_command_runs_in_the_same_outdir(tiny_sd1, tmp_path, capsys):
    """Defect 1, second half: the fixed command was refused ("different configuration (guidance.t:
    -1 -> 500)") because the failed one had written config.json."""
    out = tmp_path / "out"
    base = ["--pretrained_model_name_or_path", str(tiny_sd1.path), "--outdir", str(out), "--end_iter", "2"]
    bad = STP[:4] + ["--guidance_change_step", "-1"] + STP[6:]
    assert cli.main(base + bad + IN_PROCESS) == 2
    assert "--guidance_change_step -1" in one_error_line(capsys.readouterr().err) and not out.exists()
    assert cli.main(base + STP + IN_PROCESS) == 0
    assert [r["index"] for r in records(out)] == [0, 1]


def test_unused_flag_warning_only_when_given(tiny_sd1, tmp_path):
    """Defect 8: "--CFG_scheduling_later is not used by --method cfg" appeared although the flag was
    never given (its default is not None)."""
    def warnings(argv):
        argv = ["--pretrained_model_name_or_path", str(tiny_sd1.path), "--outdir", str(tmp_path / "o"),
                "--exp", "imagenette"] + argv
        return list(cli.resolve(cli.build_parser("test", "cfg").parse_args(argv), "cfg", argv).warnings)

    assert warnings([]) == []
    assert warnings(["--CFG_scheduling_later", "linear"]) == ["--CFG_scheduling_later is not used by --method cfg"]
    assert warnings(["--guidance_change_step=300"]) == ["--guidance_change_step is not used by --method cfg"]


# ---------------------------------------------------------------------------- 2. one run per OUTDIR


def test_second_run_is_refused_and_a_stale_lock_is_taken_over(tiny_sd1, tmp_path, capsys):
    """Defect 2: two runs on one OUTDIR (disjoint ranges, started apart) lost metadata and both
    reported success. Now the second is refused with one line naming the first (pid, host); once the
    first is SIGKILLed its lock is stale and is taken over; the two ranges then give 40 images and 40
    metadata lines."""
    out = tmp_path / "out"
    common = [*STP, "--pretrained_model_name_or_path", str(tiny_sd1.path), "--outdir", str(out)] + IN_PROCESS
    first = subprocess.Popen([sys.executable, "-m", "cfgbasin_jax.apps.generate", *common, "--start_iter", "0",
                              "--end_iter", "12"], env=env_cpu(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        lock = out / R.lock_name(0)
        deadline = time.monotonic() + 300
        while first.poll() is None and time.monotonic() < deadline:
            if lock.is_file() and f'"pid": {first.pid}' in lock.read_text():
                break
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[0].decode()[-3000:]
        os.kill(first.pid, signal.SIGSTOP)  # holds its lock, whatever the machine's speed
        second = subprocess.run([sys.executable, "-m", "cfgbasin_jax.apps.generate", *common, "--start_iter", "12",
                                 "--end_iter", "40"], env=env_cpu(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        line = one_error_line(second.stderr)
        assert f"in use by another cfgbasin-generate run (pid {first.pid} on host {socket.gethostname()}" in line
        assert not any(r["index"] >= 12 for r in (records(out) if (out / R.METADATA_FILE).exists() else []))
    finally:
        first.kill()
        first.communicate()
    assert lock.is_file()  # SIGKILL: the file stays, the kernel dropped the lock

    capsys.readouterr()
    assert cli.main(common + ["--start_iter", "12", "--end_iter", "40"]) == 0
    assert f"took over the lock of a run that is gone (pid {first.pid}" in capsys.readouterr().err
    assert cli.main(common + ["--start_iter", "0", "--end_iter", "12"]) == 0
    assert [r["index"] for r in records(out)] == list(range(40))
    assert sorted(pngs(out)) == sorted(f"{i}.png" for i in range(40))
    assert not lock.exists()


def test_lock_is_exclusive_in_process_and_removed_on_release(tmp_path):
    out = tmp_path / "new" / "out"
    lock = R.RunLock(out).acquire()
    with pytest.raises(R.RunError, match=rf"in use by another cfgbasin-generate run \(pid {os.getpid()} on host"):
        R.RunLock(out).acquire()
    R.RunLock(out, process_id=1).acquire().release()  # process 1 of a multi-process run: its own file
    lock.release()
    assert not (tmp_path / "new").exists()  # created by the lock, still empty: removed
    kept = tmp_path / "kept"
    kept.mkdir()
    R.RunLock(kept).acquire().release()
    assert kept.is_dir() and tree(kept) == []


# ---------------------------------------------------------------------------- 3. model fingerprint


def test_resume_refuses_another_model_at_the_same_path(tiny_sd1, tiny_sd2, tiny_sd1_converted, tmp_path, capsys):
    """Defect 3: re-converting another model into the same folder with --overwrite, then rerunning,
    gave images 0-1 from the old model and 2-3 from the new one (rc 0)."""
    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(tiny_sd1_converted, model)
    argv = [*STP, "--pretrained_model_name_or_path", str(model), "--outdir", str(out)] + IN_PROCESS
    assert cli.main(argv + ["--end_iter", "2"]) == 0
    before = pngs(out)
    stored = json.loads((out / R.CONFIG_FILE).read_text())["identity"]["model_fingerprint"]
    assert stored.startswith("content:")

    assert convert_main([str(tiny_sd2.path), str(model), "--overwrite"]) == 0
    capsys.readouterr()
    assert cli.main(argv + ["--end_iter", "4"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"different configuration (model_fingerprint: {stored!r} -> 'content:" in line
    assert pngs(out) == before and len(records(out)) == 2

    # the same weights converted again (from another path) keep their fingerprint: the resume runs
    shutil.copytree(tiny_sd1.path, tmp_path / "elsewhere")
    assert convert_main([str(tmp_path / "elsewhere"), str(model), "--overwrite"]) == 0
    assert cli.main(argv + ["--end_iter", "4"]) == 0
    assert [r["index"] for r in records(out)] == [0, 1, 2, 3]


def test_diffusers_folder_fingerprint_follows_its_files(tiny_sd1, tmp_path):
    """A diffusers folder's fingerprint: small files by content, weight files by size and mtime."""
    from safetensors.numpy import load_file, save_file

    from cfgbasin_jax import loading as FP

    model = tmp_path / "sd"
    shutil.copytree(tiny_sd1.path, model)
    fp = FP.model_fingerprint(model)
    assert fp.startswith("files:") and fp == FP.model_fingerprint(model)
    shutil.copytree(model, tmp_path / "copy", copy_function=shutil.copy2)  # same content and mtimes
    assert FP.model_fingerprint(tmp_path / "copy") == fp
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1
    save_file(tensors, weights)
    assert FP.model_fingerprint(model) != fp
    (model / "scheduler" / "scheduler_config.json").write_text("{}")
    assert FP.model_fingerprint(tmp_path / "copy") == fp


# ---------------------------------------------------------------------------- 4. safe --overwrite


def test_overwrite_never_deletes_the_source_or_unrelated_files(tiny_sd1, tmp_path, capsys):
    """Defect 4: `cfgbasin-convert sd1par/model sd1par --overwrite` deleted model/ and notes.txt;
    DST = SRC replaced the source."""
    parent = tmp_path / "sd1par"
    shutil.copytree(tiny_sd1.path, parent / "model")
    (parent / "notes.txt").write_text("mine")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    unet = tmp_path / "ft" / "unet"
    shutil.copytree(Path(tiny_sd1.path) / "unet", unet)
    before = {p: tree(p) for p in (parent, other, tmp_path / "ft")}
    cases = [
        ([str(parent / "model"), str(parent), "--overwrite"], "contains the source"),
        ([str(parent / "model"), str(parent / "model"), "--overwrite"], "is the source"),
        ([str(parent / "model"), str(parent / "model" / "converted")], "lies inside the source"),
        ([str(parent / "model"), str(other), "--overwrite"], "is not a converted directory"),
        ([str(parent / "model"), str(unet / "x"), "--unet", str(unet)], "lies inside the source"),
    ]
    for argv, message in cases:
        assert convert_main(argv) == 2, argv
        assert message in one_error_line(capsys.readouterr().err, "cfgbasin-convert"), argv
    assert {p: tree(p) for p in before} == before and (parent / "notes.txt").read_text() == "mine"

    dst = tmp_path / "dst"
    assert convert_main([str(parent / "model"), str(dst)]) == 0
    assert convert_main([str(parent / "model"), str(dst), "--overwrite"]) == 0  # ours: replaced
    assert (dst / "cfgbasin_jax.json").is_file() and tree(tmp_path).count("dst") == 1
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".dst")]


# ---------------------------------------------------------------------------- 5. no debris

# The child sets its own signal dispositions: a test run started as a background job of a
# non-interactive shell (nohup ... &, some CI runners) hands SIGINT down as ignored, and Python then
# leaves it ignored. SIGTERM: the converter installs its handler (terminate_raises) either way.
_SLOW_SAVE = """
import signal
signal.signal(signal.SIGINT, signal.default_int_handler)
import pathlib, sys, time
import orbax.checkpoint as ocp
original = ocp.Checkpointer.save  # the params checkpoint's writer (cfgbasin_jax.models.checkpoint.write_params)
def save(self, *args, **kwargs):
    original(self, *args, **kwargs)
    pathlib.Path(sys.argv[-1]).write_text("saving")
    time.sleep(300)
ocp.Checkpointer.save = save
from cfgbasin_jax.convert.__main__ import main
sys.exit(main(sys.argv[1:-1]))
"""


def test_interrupted_conversions_leave_no_debris(tiny_sd1, tmp_path):
    """Defect 5: SIGINT / SIGTERM during the save left `.DST.partial-*` (and SIGINT's clean-up raced
    orbax's writer); nothing removed them later. Real signals, sent while orbax saves."""
    procs = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        folder = tmp_path / sig.name
        folder.mkdir()
        flag = tmp_path / f"{sig.name}.saving"
        procs[sig] = (folder, subprocess.Popen(
            [sys.executable, "-c", _SLOW_SAVE, str(tiny_sd1.path), str(folder / "dst"), str(flag)],
            env=env_cpu(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), flag)
    try:
        deadline = time.monotonic() + 400
        for sig, (folder, proc, flag) in procs.items():
            while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert flag.exists(), proc.communicate()[1][-3000:]
            assert [p.startswith(".dst.partial-") for p in os.listdir(folder)] == [True]
            os.kill(proc.pid, sig)
        results = {sig: proc.communicate(timeout=120) + (proc.returncode,) for sig, (_, proc, _) in procs.items()}
    finally:
        for _, proc, _ in procs.values():
            proc.kill()
    for sig, word in ((signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")):
        out, err, rc = results[sig]
        assert rc == 128 + sig, err[-3000:]
        assert err.strip().splitlines() == [f"cfgbasin-convert: {word}; nothing written at {procs[sig][0] / 'dst'}"]
        time.sleep(0.5)  # an orbax writer still running would recreate files now
        assert os.listdir(procs[sig][0]) == [], sig.name
    killed = procs[signal.SIGKILL][0]
    assert results[signal.SIGKILL][2] == -signal.SIGKILL
    stale = os.listdir(killed)
    assert len(stale) == 1 and stale[0].startswith(".dst.partial-")  # SIGKILL cannot be handled ...
    with pytest.warns(UserWarning, match="left by an interrupted conversion"):
        convert(tiny_sd1.path, killed / "dst")  # ... the next conversion to DST removes it
    assert os.listdir(killed) == ["dst"]


def test_partial_folders_of_running_conversions_are_kept(tmp_path):
    from cfgbasin_jax.runtime.folders import remove_stale_partials

    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {f".dst.partial-{host}-{os.getpid()}-aaaa": True,  # alive (this process)
             f".dst.partial-{host}-{dead.pid}-bbbb": False,  # its process is gone
             f".dst.partial-{host}x-{dead.pid}-cccc": True,  # another host: cannot tell, kept
             ".dst.partial-0123456789ab": False,  # an older version's name
             f".dst.old-{host}-{dead.pid}-dddd": False,
             f".dstx.partial-{host}-{dead.pid}-eeee": True}  # another destination
    for name in names:
        (tmp_path / name).mkdir()
    removed = remove_stale_partials(tmp_path / "dst")
    assert sorted(p.name for p in removed) == sorted(n for n, keep in names.items() if not keep)
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, keep in names.items() if keep)


# ---------------------------------------------------------------------------- 6. I/O errors


def test_conversion_onto_read_only_and_full_file_systems(namespaces, tiny_sd1, tmp_path):
    """Defect 6: a read-only mount gave a traceback (rc 1), a full disk a 4,550-line traceback."""
    check_full_and_read_only(f"{sys.executable} -m cfgbasin_jax.convert {tiny_sd1.path}", "1m", "cfgbasin-convert",
                             tmp_path)


def check_full_and_read_only(conv: str, size: str, prog: str, tmp_path) -> None:
    """``conv DST`` onto a full tmpfs of ``size``, then onto the same one mounted read-only: one line
    naming the path each time, exit 2, nothing left behind."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f"""
mount -t tmpfs -o size={size} tmpfs {mnt} || exit 99
{conv} {mnt}/full 2> {tmp_path}/full.err; echo rc_full=$?
echo left_full=$(ls -A {mnt} | tr '\\n' ' ')
mount -o remount,ro {mnt}
{conv} {mnt}/ro 2> {tmp_path}/ro.err; echo rc_ro=$?
"""
    done = in_namespace(script)
    assert marker(done.stdout, "rc_full") == "2", done.stdout + done.stderr
    assert marker(done.stdout, "left_full") == ""  # nothing half-written, no partial folder
    line = one_error_line((tmp_path / "full.err").read_text(), prog)
    assert line.endswith(f"{mnt}/full: No space left on device"), line
    assert marker(done.stdout, "rc_ro") == "2"
    line = one_error_line((tmp_path / "ro.err").read_text(), prog)
    assert f"{mnt} is not writable (read-only file system)" in line


FULL_DISK_IMAGES = 20


def full_disk_argv(model) -> list:
    return [*STP, "--pretrained_model_name_or_path", str(model), "--end_iter", str(FULL_DISK_IMAGES)] + FAST


def start_early(request, items):
    """The namespace script of the full-disk test below, started at the session's first test
    (conftest's `early`); where namespaces are refused the test is skipped and its result unread."""
    from early_start import Started, selected

    if not selected(items, "test_generation_onto_a_full_disk_then_resume"):
        return {}

    folder = request.getfixturevalue("tmp_path_factory").mktemp("full_disk")
    mnt = folder / "mnt"
    mnt.mkdir()
    # the session's compilation cache (tests/conftest.py), off the small mount
    gen = " ".join([sys.executable, "-m", "cfgbasin_jax.apps.generate", *full_disk_argv(request.getfixturevalue("tiny_sd1").path)])
    script = f"""
mount -t tmpfs -o size=48k tmpfs {mnt} || exit 99
{gen} --outdir {mnt}/run 2> {folder}/full.err; echo rc_full=$?
cp -a {mnt}/run {folder}/snap
mount -o remount,size=8m {mnt}
{gen} --outdir {mnt}/run 2> {folder}/resume.err; echo rc_resume=$?
cp -a {mnt}/run {folder}/resumed
"""
    return {"full_disk": Started([["unshare", "-rm", "sh", "-c", script]], env_cpu(), folder / "logs")}


def test_generation_onto_a_full_disk_then_resume(namespaces, early, tiny_sd1, tmp_path):
    """Defect 6: generating onto a full disk gave a traceback. Now: one line, exit 2, no temporary
    file or cut-off metadata line; after space is freed the same command finishes the run bit for bit
    as an uninterrupted one. (A read-only OUTDIR is refused by the check that
    test_read_only_outputs_of_demo_and_evaluate runs on a real read-only mount.)
    The two runs in a namespace (a 48k tmpfs, then 8m) are an early job (start_early above)."""
    n = FULL_DISK_IMAGES
    job = early["full_disk"]
    (done,) = job.wait(timeout=600)
    folder = job.logs.parent
    snap = folder / "snap"
    assert marker(done.stdout, "rc_full") == "2", (folder / "full.err").read_text()[-3000:]
    line = last_error_line((folder / "full.err").read_text())
    assert "No space left on device; every finished image is kept" in line
    kept = records(snap)
    assert (snap / R.METADATA_FILE).read_bytes().endswith(b"\n") or not kept  # no cut-off line
    assert 0 < len(kept) < n and all((snap / r["file"]).is_file() for r in kept)
    assert not [p for p in tree(snap) if p.endswith(".tmp") or ".run" in p]  # no temp files, no lock

    assert marker(done.stdout, "rc_resume") == "0", (folder / "resume.err").read_text()[-3000:]
    reference = tmp_path / "reference"
    assert cli.main(full_disk_argv(tiny_sd1.path) + ["--no_compilation_cache", "--outdir", str(reference)]) == 0
    assert pngs(folder / "resumed") == pngs(reference) and len(pngs(reference)) == n
    assert records(folder / "resumed") == records(reference)


def test_writers_clean_up_after_a_failed_write(tmp_path, monkeypatch):
    """The writers' part in "nothing half-written", without a file system: a failed PNG write
    removes its temporary file, a failed metadata append cuts what it wrote."""
    import errno

    from PIL import Image

    (tmp_path / "Images").mkdir()

    def full_disk(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OSError, match="No space") as info:
        R.write_png(tmp_path, "Images/0.png", np.zeros((2, 2, 3), np.uint8))
    assert info.value.filename == str(tmp_path / "Images" / "0.png") and tree(tmp_path) == ["Images"]
    monkeypatch.undo()

    with R.MetadataWriter(tmp_path) as w:
        w.append([{"index": 0, "prompt": "a", "file": "Images/0.png"}])
        good = (tmp_path / R.METADATA_FILE).read_bytes()

        class Full:
            def __init__(self, f):
                self.f = f

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")

            def __getattr__(self, name):
                return getattr(self.f, name)

        w._file = Full(w._file)
        with pytest.raises(OSError, match="No space"):
            w.append([{"index": 1, "prompt": "b", "file": "Images/1.png"}])
    assert (tmp_path / R.METADATA_FILE).read_bytes() == good


def test_demo_refuses_bad_flags_before_any_work(tmp_path, capsys, monkeypatch):
    """Defect 6: cfgbasin-demo with --stp_t 2000, --guidance nan or --model /nope gave tracebacks."""
    from cfgbasin_jax.apps import demo

    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("ran the demo"))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    cases = [
        (["--stp_t", "2000"], "--stp_t 2000 must be a timestep in [0, 999]"),
        (["--og_t", "-1"], "--og_t -1 must be a timestep"),
        (["--guidance", "nan"], "--guidance must be a finite number"),
        (["--og_scale", "inf"], "--og_scale must be a finite number"),
        (["--model", "/nope"], "--model /nope: not a pixel-model folder"),
        (["--steps", "2"], "--num_inference_steps must be >= 3"),
        (["--steps", "1001"], "--num_inference_steps 1001 must be <= 1000"),
        (["--outdir", str(not_a_dir / "out")], "is not a directory"),
    ]
    for argv, message in cases:
        assert demo.main(argv + ["--outdir", str(tmp_path / "out")] if "--outdir" not in argv else argv) == 2
        assert message in one_error_line(capsys.readouterr().err, "cfgbasin-demo"), argv
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_read_only_outputs_of_demo_and_evaluate(namespaces, tmp_path):
    """Defect 6/7: a read-only --outdir (demo) or --out (evaluate) is refused with one line before
    any work (the checks run before the model is loaded or a metric computed)."""
    mnt = tmp_path / "mnt"
    (mnt / "gen" / "Images").mkdir(parents=True)
    script = f"""
mount -t tmpfs -o size=64k tmpfs {mnt} && mkdir -p {mnt}/gen/Images && mount -o remount,ro {mnt} || exit 99
{sys.executable} -m cfgbasin_jax.apps.demo --outdir {mnt}/demo 2> {tmp_path}/demo.err; echo rc_demo=$?
{sys.executable} -m cfgbasin_jax.apps.evaluate --gen {mnt}/gen --train {mnt} --sscd {mnt} 2> {tmp_path}/eval.err
echo rc_eval=$?
"""
    done = in_namespace(script)
    assert marker(done.stdout, "rc_demo") == "2"
    assert "is not writable (read-only file system)" in one_error_line((tmp_path / "demo.err").read_text(),
                                                                          "cfgbasin-demo")
    assert marker(done.stdout, "rc_eval") == "2"
    err = (tmp_path / "eval.err").read_text().strip().splitlines()
    assert len(err) == 1 and f"--out {mnt}/gen/eval.json" in err[0] and "read-only file system" in err[0], err


# ---------------------------------------------------------------------------- 8. silent acceptances


def test_nonfinite_weights_warn_at_conversion_naming_the_key(tiny_sd1, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "sd"
    shutil.copytree(tiny_sd1.path, src)
    weights = src / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["conv_in.weight"] = np.full_like(tensors["conv_in.weight"], np.nan)
    save_file(tensors, weights)
    assert convert_main([str(src), str(tmp_path / "dst")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    size = tensors["conv_in.weight"].size
    assert err == [f"cfgbasin-convert: warning: parameter unet/conv_in/kernel has {size} non-finite value(s) "
                   f"(NaN/Inf) of {size}; the model will produce NaN images"]


def test_resume_with_another_seed_or_batch_size_is_refused(tiny_sd1, tmp_path, capsys):
    """Mutation audit: the seed must stay in the run identity. Defect 8: another --batch_size is
    not bit-exact (XLA picks batch-shape-dependent kernels), so it is refused too."""
    out = tmp_path / "out"
    argv = [*STP, "--pretrained_model_name_or_path", str(tiny_sd1.path), "--outdir", str(out),
            "--end_iter", "2"] + IN_PROCESS
    assert cli.main(argv) == 0
    files = tree(out)
    for extra, diff in ((["--seed", "7"], "seed: 42 -> 7"), (["--batch_size", "1"], "batch_size: 2 -> 1")):
        capsys.readouterr()
        assert cli.main(argv + extra + ["--end_iter", "4"]) == 2
        assert f"different configuration ({diff})" in one_error_line(capsys.readouterr().err)
        assert tree(out) == files


def test_cut_off_last_line_is_skipped_by_every_reader(tmp_path):
    """Defect 8: evaluate refused a metadata file whose last line a kill had cut off, although the
    writer's docs say readers skip it; runs and evaluate now share one parser."""
    from cfgbasin_jax.runs import evaluation as E

    (tmp_path / "Images").mkdir()
    for i in range(2):
        (tmp_path / "Images" / f"{i}.png").write_bytes(b"")
    meta = tmp_path / R.METADATA_FILE
    full = "".join(json.dumps({"index": i, "prompt": f"p{i}", "file": f"Images/{i}.png", "unet_evals": 12}) + "\n"
                   for i in range(2))
    meta.write_text(full + '{"index": 2, "prompt": "p2", "fi')
    notes = []
    assert [g.index for g in E.read_generations(str(tmp_path), notes.append)] == [0, 1]
    assert notes == [f"{meta}: skipped a cut-off last line (left by a killed run)"]
    assert E.generation_cost(str(tmp_path))["unet_evals_per_image"] == 12
    assert sorted(R.read_records(tmp_path)) == [0, 1]
    meta.write_text(full.rstrip("\n"))  # a complete last line without its newline is kept
    assert [g.index for g in E.read_generations(str(tmp_path))] == [0, 1]
    meta.write_text('{"index": 0, "prompt": "p0"\n' + full)  # a bad line before the last one is an error
    with pytest.raises(E.EvalError, match=r"metadata.jsonl:1: not valid JSON"):
        E.read_generations(str(tmp_path))


def test_finetune_checks_everything_before_writing(tmp_path, capsys):
    from cfgbasin_jax.apps.finetune import main as finetune_main

    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"caption {i}")
    out = tmp_path / "run"
    cases = [
        (["--data", str(tmp_path / "nowhere")], "nowhere"),
        (["--data", str(data), "--resolution", "0"], "--resolution must be >= 1"),
        (["--data", str(data), "--learning_rate", "nan"], "--learning_rate must be a finite number"),
        (["--data", str(data), "--non_mem_ratio", "nan"], "--non_mem_ratio must be a finite number"),
        (["--data", str(data), "--adam_beta1", "1.5"], "--adam_beta1 must be in [0, 1)"),
        (["--data", str(data), "--model", str(tmp_path / "nope")], "nope"),
    ]
    for argv, message in cases:
        assert finetune_main(argv + ["--output_dir", str(out), "--no_progress"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
        assert not out.exists(), argv
