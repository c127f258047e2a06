"""Output paths and fault cases of issue 26, each reproduced as a user meets it: two conversions to
one destination at once (real concurrent processes), --overwrite through a symlink, the SSCD
converter under the SD conversion's rules (read-only and full file systems in a user + mount
namespace), full-disk messages naming the path, one-line errors, evaluate's --out, metadata records
pointing outside the run folder, and what the model fingerprints detect.

Read-only and full file systems are made with ``unshare -rm`` (see tests/test_faults.py); where the
kernel refuses such namespaces those tests are skipped with the reason.
"""

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_faults import FAST, IN_PROCESS, STP, env_cpu, in_namespace, marker, namespaces, one_error_line, tree  # noqa: F401

from cfgbasin_jax.apps import generate as cli
from cfgbasin_jax.convert.__main__ import main as convert_main
from cfgbasin_jax.runs import folder as R

# ---------------------------------------------------------------------------- helpers


def run_cli(args, timeout=300) -> subprocess.CompletedProcess:
    """``python -m ARGS`` with the CPU backend."""
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, env=env_cpu(),
                          timeout=timeout)


def marker_file(folder) -> dict:
    return json.loads((Path(folder) / "cfgbasin_jax.json").read_text())


def sscd_state_file(path: Path) -> Path:
    """A tiny torchvision-layout SSCD state dict saved with torch.save (converts without TorchScript)."""
    import torch
    from test_metrics import SSCDTorchvision, randomize

    torch.save(randomize(SSCDTorchvision(blocks=(1, 1, 1, 1), base=8, dims=16), seed=3).state_dict(), path)
    return path


# ---------------------------------------------------------------------------- item 2: concurrent DST

_HELD_SAVE = """
import pathlib, sys, time
import orbax.checkpoint as ocp
original = ocp.Checkpointer.save  # the params checkpoint's writer (cfgbasin_jax.models.checkpoint.write_params)
def save(self, *args, **kwargs):
    original(self, *args, **kwargs)
    pathlib.Path(sys.argv[-2]).write_text("saved")
    while not pathlib.Path(sys.argv[-1]).exists():  # both conversions are past their checks now
        time.sleep(0.02)
ocp.Checkpointer.save = save
from cfgbasin_jax.convert.__main__ import main
sys.exit(main(sys.argv[1:-2]))
"""


def test_two_conversions_to_one_destination_at_once(tiny_sd1, tiny_sd2, tmp_path):
    """Issue 26 item 2: two conversions to one DST, without --overwrite, both printed "wrote DST" and
    the first one's output was silently replaced. Both are held after writing their partial folder
    (past every check) and released together: exactly one wins; the other gets one line, exit 2, and
    leaves nothing."""
    dst, go = tmp_path / "out" / "dst", tmp_path / "go"
    procs = []
    for name, model in (("a", tiny_sd1), ("b", tiny_sd2)):
        flag = tmp_path / f"{name}.saved"
        procs.append((flag, subprocess.Popen([sys.executable, "-c", _HELD_SAVE, str(model.path), str(dst), str(flag),
                                              str(go)], env=env_cpu(), stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True)))
    try:
        for flag, proc in procs:
            while not flag.exists() and proc.poll() is None:
                time.sleep(0.05)
            assert flag.exists(), proc.communicate()[1][-3000:]
        assert not dst.exists()
        go.write_text("go")
        results = [proc.communicate(timeout=300) + (proc.returncode,) for _, proc in procs]
    finally:
        for _, proc in procs:
            proc.kill()
    codes = sorted(rc for _, _, rc in results)
    assert codes == [0, 2], results
    (win_out, _, _), = [r for r in results if r[2] == 0]
    (_, lose_err, _), = [r for r in results if r[2] == 2]
    assert win_out.strip() == f"wrote {dst} (float32)"
    line = one_error_line(lose_err, "cfgbasin-convert")
    assert f"{dst} appeared while this conversion ran" in line and "nothing of this conversion is kept" in line
    assert os.listdir(dst.parent) == ["dst"]  # no partial folder of the loser
    winner = tiny_sd1 if results[0][2] == 0 else tiny_sd2
    assert marker_file(dst)["source"] == str(winner.path)


# ---------------------------------------------------------------------------- item 7: symlinked DST


def test_overwrite_through_a_symlink_replaces_its_target_and_leaves_nothing(tiny_sd1, tiny_sd2, tmp_path, capsys):
    """Issue 26 item 7: --overwrite onto a DST that is a symlink left a `.link.old-*` symlink, and the
    next conversion's note claimed it had removed it (rmtree cannot remove a symlink). Now the link's
    target is replaced and the link kept; a stale `.DST.old-*` symlink is really removed."""
    real, links = tmp_path / "disk", tmp_path / "models"
    real.mkdir()
    links.mkdir()
    assert convert_main([str(tiny_sd1.path), str(real / "dst")]) == 0
    (links / "link").symlink_to(real / "dst")
    first = marker_file(real / "dst")["fingerprint"]
    assert convert_main([str(tiny_sd2.path), str(links / "link"), "--overwrite"]) == 0
    assert (links / "link").is_symlink() and os.readlink(links / "link") == str(real / "dst")
    assert marker_file(real / "dst")["source"] == str(tiny_sd2.path) and marker_file(real / "dst")["fingerprint"] != first
    assert os.listdir(links) == ["link"] and os.listdir(real) == ["dst"]

    from cfgbasin_jax.runtime.files import remove_stale_partials

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = links / f".link.old-{socket.gethostname()}-{dead.pid}-aaaa"
    stale.symlink_to(real / "dst")
    assert remove_stale_partials(links / "link") == [stale]
    assert not os.path.lexists(stale) and (real / "dst" / "cfgbasin_jax.json").is_file()


# ---------------------------------------------------------------------------- item 5: sscd DST rules


def test_sscd_conversion_follows_the_sd_rules(tmp_path, capsys):
    """Issue 26 item 5: `cfgbasin-convert sscd` wrote into an existing user folder without
    --overwrite, and DST = SRC gave a FileExistsError traceback. Now the SD conversion's rules
    (one line, exit 2, nothing touched) and its partial folder + rename."""
    src = sscd_state_file(tmp_path / "sscd.pt")
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    cases = [
        ([src, src], f"destination {src} is the source"),
        ([src, tmp_path, "--overwrite"], f"destination {tmp_path} contains the source"),
        ([src, user], f"{user} already exists (use overwrite=True / --overwrite to replace it)"),
        ([src, user, "--overwrite"], f"{user} is not an SSCD folder (no sscd_config.json) and is not empty"),
        ([src, tmp_path / "x", "--gem-p", "abc"], "argument --gem-p: invalid float value: 'abc'"),
    ]
    for argv, message in cases:
        assert convert_main(["sscd", *map(str, argv)]) == 2, argv
        assert message in one_error_line(capsys.readouterr().err, "cfgbasin-convert sscd"), argv
    assert tree(user) == ["notes.txt"] and (user / "notes.txt").read_text() == "mine"

    dst = tmp_path / "flax"
    assert convert_main(["sscd", str(src), str(dst)]) == 0
    assert sorted(os.listdir(dst)) == ["sscd_config.json", "sscd_params.safetensors"]
    assert convert_main(["sscd", str(src), str(dst)]) == 2
    assert "already exists" in one_error_line(capsys.readouterr().err, "cfgbasin-convert sscd")
    assert convert_main(["sscd", str(src), str(dst), "--overwrite"]) == 0  # ours: replaced
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []


def test_sscd_conversion_on_read_only_and_full_file_systems(namespaces, tmp_path):
    """Issue 26 item 5: a read-only DST gave an OSError traceback (rc 1). Now one line naming the
    path, exit 2, for a read-only and for a full file system, and nothing left on it."""
    src = sscd_state_file(tmp_path / "sscd.pt")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    conv = f"{sys.executable} -m cfgbasin_jax.convert sscd {src}"
    script = f"""
mount -t tmpfs -o size=12k tmpfs {mnt} || exit 99
{conv} {mnt}/full 2> {tmp_path}/full.err; echo rc_full=$?
echo left_full=$(ls -A {mnt} | tr '\\n' ' ')
mount -o remount,ro {mnt}
{conv} {mnt}/ro 2> {tmp_path}/ro.err; echo rc_ro=$?
"""
    done = in_namespace(script)
    assert marker(done.stdout, "rc_full") == "2", done.stdout + done.stderr
    assert marker(done.stdout, "left_full") == ""
    line = one_error_line((tmp_path / "full.err").read_text(), "cfgbasin-convert sscd")
    assert line.endswith(f"{mnt}/full: No space left on device"), line
    assert marker(done.stdout, "rc_ro") == "2"
    line = one_error_line((tmp_path / "ro.err").read_text(), "cfgbasin-convert sscd")
    assert f"{mnt} is not writable (read-only file system)" in line


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_bad_pickles_give_one_line(tmp_path):
    """Issue 26 item 11: torch.load's errors printed 3 to 6 lines (its advice included), and a
    pickle of another protocol printed torch's 2-line warning first. Now one line naming the file
    and the reason, for the SSCD converter and for .bin weights of an SD folder."""
    import torch

    bad = {
        "garbage.pt": (os.urandom(1000), "Unsupported operand"),
        "code.pt": (None, "unsupported GLOBAL posix.system"),
        "protocol4.pt": (pickle.dumps({"a": _Evil()}, protocol=4), "Unsupported operand"),
    }
    torch.save({"a": _Evil()}, tmp_path / "code.pt")
    for name, (data, _) in bad.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    for name, (_, reason) in bad.items():
        done = run_cli(["cfgbasin_jax.convert", "sscd", tmp_path / name, tmp_path / f"out_{name}"])
        assert done.returncode == 2, done.stderr
        line = one_error_line(done.stderr, "cfgbasin-convert sscd")
        assert f"{tmp_path / name} is neither a TorchScript module nor a torch state dict" in line and reason in line
        assert "Weights only load failed" not in line and "pwned" not in done.stdout


def test_legacy_pickle_bin_in_an_sd_folder_gives_one_line(tiny_sd1, tmp_path):
    """Issue 26 item 11: a pickled .bin of another protocol printed torch's 2-line warning before
    our error line."""
    import torch
    from safetensors.torch import load_file

    sd = tmp_path / "sd"
    shutil.copytree(tiny_sd1.path, sd)
    weights = sd / "text_encoder" / "model.safetensors"
    state = dict(load_file(weights), evil=_Evil())
    weights.unlink()
    with open(sd / "text_encoder" / "pytorch_model.bin", "wb") as f:
        pickle.dump(state, f, protocol=4)
    done = run_cli(["cfgbasin_jax.convert", sd, tmp_path / "dst"])
    assert done.returncode == 2
    line = one_error_line(done.stderr, "cfgbasin-convert")
    assert f"{sd / 'text_encoder' / 'pytorch_model.bin'}: cannot read pickled weights (" in line
    assert not (tmp_path / "dst").exists()

    # the same weights as a legacy (non-zip) torch pickle convert without a word on stderr
    torch.save(load_file(tiny_sd1.path / "text_encoder" / "model.safetensors"), sd / "text_encoder" / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    done = run_cli(["cfgbasin_jax.convert", sd, tmp_path / "dst"])
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


# ---------------------------------------------------------------------------- item 10: full disk


@pytest.mark.parametrize("size", ["24k", "48k"])
def test_full_disk_while_converting_names_the_path(namespaces, tiny_sd1, tmp_path, size):
    """Issue 26 item 10: a disk that fills while the tokenizer is saved (a Rust library's bare
    Exception "No space left on device (os error 28)") gave a 27-line traceback, rc 1. Now one line
    naming DST, exit 2, nothing left (the params-checkpoint case is
    test_faults.py::test_conversion_onto_read_only_and_full_file_systems)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f"""
mount -t tmpfs -o size={size} tmpfs {mnt} || exit 99
{sys.executable} -m cfgbasin_jax.convert {tiny_sd1.path} {mnt}/full 2> {tmp_path}/full.err; echo rc=$?
echo left=$(ls -A {mnt} | tr '\\n' ' ')
"""
    done = in_namespace(script)
    assert marker(done.stdout, "rc") == "2", (tmp_path / "full.err").read_text()[-3000:]
    assert marker(done.stdout, "left") == ""
    line = one_error_line((tmp_path / "full.err").read_text(), "cfgbasin-convert")
    assert line == f"cfgbasin-convert: error: {mnt}/full: No space left on device"
