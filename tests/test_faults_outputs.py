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
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_faults import (IN_PROCESS, STP, check_full_and_read_only, env_cpu, in_namespace, last_error_line,  # noqa: F401
                         marker, namespaces, one_error_line, tree)

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

    from cfgbasin_jax.runtime.folders import remove_stale_partials

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
    check_full_and_read_only(f"{sys.executable} -m cfgbasin_jax.convert sscd {src}", "12k", "cfgbasin-convert sscd",
                             tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_bad_pickles_give_one_line(tmp_path):
    """Issue 26 item 11: torch.load's errors printed 3 to 6 lines (its advice included), and a
    pickle of another protocol printed torch's 2-line warning first. Now one line naming the file
    and the reason, for the SSCD converter and for .bin weights of an SD folder."""
    import torch

    bad = {
        # Seeded: some random bytes start with a valid opcode and fail otherwise (e.g. "pop from empty list").
        "garbage.pt": (random.Random(0).randbytes(1000), "Unsupported operand"),
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


# ---------------------------------------------------------------------------- items 3, 4, 11: evaluate --out


@pytest.fixture
def small_eval(tmp_path):
    """A generation folder (metadata.jsonl + 2 images), a training folder, a captions file and a
    tiny converted SSCD folder (written with save_sscd, no torch file)."""
    import torch
    from PIL import Image
    from test_metrics import SSCDTorchvision, randomize

    from cfgbasin_jax.convert.sscd import convert_state
    from cfgbasin_jax.models.sscd import save_sscd

    model = randomize(SSCDTorchvision(blocks=(1, 1, 1, 1), base=8, dims=16), seed=3)
    config, params = convert_state({k: v.numpy() for k, v in model.state_dict().items()})
    save_sscd(str(tmp_path / "sscd"), config, params)
    rng = np.random.default_rng(0)
    gen, train = tmp_path / "gen", tmp_path / "train"
    (gen / "Images").mkdir(parents=True)
    train.mkdir()
    lines = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(gen / "Images" / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(train / f"t{i}.png")
        lines.append(json.dumps({"index": i, "prompt": f"p{i}", "file": f"Images/{i}.png"}) + "\n")
    (gen / R.METADATA_FILE).write_text("".join(lines))
    (gen / R.CONFIG_FILE).write_text('{"identity": {}}')
    (tmp_path / "captions.txt").write_text("p0\np1\n")
    del torch
    return tmp_path


def evaluate_args(root: Path) -> list:
    return ["--gen", str(root / "gen"), "--train", str(root / "train"), "--sscd", str(root / "sscd"),
            "--sscd-preprocess", "dcr224", "--batch-size", "2", "--workers", "1"]


def test_evaluate_out_in_a_new_folder_keeps_the_results(small_eval, capsys):
    """Issue 26 item 3: with --out in a folder that does not exist, the check passed, SSCD ran, and
    the write failed on the temporary file: the results were lost. Now the folder is created."""
    from cfgbasin_jax.apps.evaluate import main as evaluate_main

    out = small_eval / "reports" / "new" / "eval.json"
    assert evaluate_main(evaluate_args(small_eval) + ["--out", str(out)]) == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["n_generated"] == 2 and len(report["per_image"]) == 2 and "sscd_p95" in report
    assert os.listdir(out.parent) == ["eval.json"]


def test_evaluate_refuses_an_out_among_its_inputs(small_eval, capsys, monkeypatch):
    """Issue 26 item 4: `--out GEN/metadata.jsonl` replaced the run's metadata with the report (the
    run could no longer resume). Any input file, or a path inside the inputs, is refused with one
    line before a metric is computed; the default GEN/eval.json, and rerunning onto it, still work.
    Item 11: `--threshold abc` printed a 7-line usage dump."""
    from cfgbasin_jax.apps.evaluate import main as evaluate_main
    from cfgbasin_jax.runs import evaluation as E

    root = small_eval
    gen = root / "gen"
    inputs = {p: p.read_bytes() for p in [*gen.rglob("*"), root / "captions.txt", *(root / "sscd").iterdir()]
              if p.is_file()}
    real = E.sscd_similarity
    monkeypatch.setattr(E, "sscd_similarity", lambda *a, **k: pytest.fail("computed a metric"))
    cases = [
        (gen / "metadata.jsonl", "is a file of the generation folder --gen"),
        (gen / "config.json", "is a file of the generation folder --gen"),
        (gen / "metadata.p1.jsonl", "is a file of the generation folder --gen"),  # a run file, even when absent
        (gen / "Images" / "0.png", f"lies inside --gen {gen / 'Images'}"),
        (gen / "Images" / "report.json", f"lies inside --gen {gen / 'Images'}"),
        (root / "train" / "report.json", f"lies inside --train {root / 'train'}"),
        (root / "sscd" / "sscd_config.json", f"lies inside --sscd {root / 'sscd'}"),
        (root / "captions.txt", "is the --captions file"),
    ]
    for out, message in cases:
        assert evaluate_main(evaluate_args(root) + ["--captions", str(root / "captions.txt"), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --out {out} ") and message in err[0], (out, err)
    assert evaluate_main(evaluate_args(root) + ["--threshold", "abc"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: argument --threshold: invalid float value: 'abc'"]
    assert {p: p.read_bytes() for p in inputs} == inputs and not (gen / "metadata.p1.jsonl").exists()

    monkeypatch.setattr(E, "sscd_similarity", real)
    for _ in range(2):  # the default report, then the same command again over its own earlier report
        assert evaluate_main(evaluate_args(root)) == 0
        assert json.loads((gen / "eval.json").read_text())["n_generated"] == 2
    assert {p: p.read_bytes() for p in inputs} == inputs


# ---------------------------------------------------------------------------- item 8: records outside OUTDIR


def escaping_records(outdir: Path, outside: Path) -> dict:
    """metadata.jsonl texts whose record 1 names a file outside ``outdir`` in three ways."""
    (outdir / "Images" / "link.png").symlink_to(outside)
    good = json.dumps({"index": 0, "prompt": "p", "file": "Images/0.png"})
    return {name: good + "\n" + json.dumps({"index": 1, "prompt": "p", "file": file}) + "\n"
            for name, file in (("absolute", str(outside)), ("dotdot", "Images/../../outside.png"),
                               ("symlink", "Images/link.png"))}


def test_records_pointing_outside_the_run_folder_are_refused_by_resume(tiny_sd1, tmp_path, capsys):
    """Issue 26 item 8: a record whose `file` pointed outside OUTDIR (absolute, `..`, a symlink
    leading out) was trusted: resume skipped the image. Now a corrupt record, one line naming it,
    exit 2, nothing written."""
    out = tmp_path / "out"
    argv = [*STP, "--pretrained_model_name_or_path", str(tiny_sd1.path), "--outdir", str(out)] + IN_PROCESS
    assert cli.main(argv + ["--end_iter", "1"]) == 0
    outside = tmp_path / "outside.png"
    shutil.copy(out / "Images" / "0.png", outside)
    for name, text in escaping_records(out, outside).items():
        (out / R.METADATA_FILE).write_text(text)
        before = tree(out)
        capsys.readouterr()
        assert cli.main(argv + ["--end_iter", "2"]) == 2, name
        line = last_error_line(capsys.readouterr().err)
        assert f"{out / R.METADATA_FILE}" in line and "a corrupt record" in line, (name, line)
        assert tree(out) == before, name


def test_records_pointing_outside_the_run_folder_are_refused_by_evaluate(small_eval, capsys, monkeypatch):
    """Issue 26 item 8: evaluate read the outside file. Now one line naming the record."""
    from cfgbasin_jax.apps.evaluate import main as evaluate_main
    from cfgbasin_jax.runs import evaluation as E

    gen = small_eval / "gen"
    monkeypatch.setattr(E, "sscd_similarity", lambda *a, **k: pytest.fail("computed a metric"))
    outside = small_eval / "train" / "t0.png"
    for name, text in escaping_records(gen, outside).items():
        (gen / R.METADATA_FILE).write_text(text)
        assert evaluate_main(evaluate_args(small_eval)) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(gen / R.METADATA_FILE) in err[0] and "a corrupt record" in err[0], (name, err)


# ---------------------------------------------------------------------------- item 6: fingerprints


def test_converted_fingerprint_follows_config_edits_and_resume_refuses(tiny_sd1_converted, tmp_path, capsys):
    """Issue 26, "Fingerprint content": the fingerprint of a converted model was the value stored at
    conversion, so editing scheduler/scheduler_config.json (prediction_type) went unnoticed and a
    resume mixed two schedulers. Now the stored parameter digest is combined with the files read
    at load: the edit changes the fingerprint and the resume is refused."""
    from cfgbasin_jax import loading

    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(tiny_sd1_converted, model)
    stored = marker_file(model)["fingerprint"]
    assert loading.model_fingerprint(model) == stored  # untouched: the value the converter stored
    config = model / "unet" / "config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), _diffusers_version="9.9")))
    assert loading.model_fingerprint(model) == stored  # `_` keys do not decide images

    argv = [*STP, "--pretrained_model_name_or_path", str(model), "--outdir", str(out)] + IN_PROCESS
    assert cli.main(argv + ["--end_iter", "2"]) == 0
    files = tree(out)
    scheduler = model / "scheduler" / "scheduler_config.json"
    original = scheduler.read_text()
    assert json.loads(original).get("prediction_type", "epsilon") == "epsilon"
    scheduler.write_text(json.dumps(dict(json.loads(original), prediction_type="v_prediction")))
    edited = loading.model_fingerprint(model)
    assert edited.startswith("content:") and edited != stored
    capsys.readouterr()
    assert cli.main(argv + ["--end_iter", "4"]) == 2
    assert f"different configuration (model_fingerprint: {stored!r} -> {edited!r}" in one_error_line(
        capsys.readouterr().err)
    assert tree(out) == files
    scheduler.write_text(original)  # undone: the run resumes
    assert cli.main(argv + ["--end_iter", "4"]) == 0
    assert [r["index"] for r in R.read_metadata_file(out / R.METADATA_FILE)] == [0, 1, 2, 3]
    for name, edit in (("tokenizer/vocab.json", lambda t: t.replace('"a"', '"A"', 1)),
                       ("text_encoder/config.json", lambda t: t.replace('"hidden_act"', '"hidden_act_x"'))):
        path = model / name
        text = path.read_text()
        assert edit(text) != text, name
        path.write_text(edit(text))
        assert loading.model_fingerprint(model) != stored, name
        path.write_text(text)
    assert loading.model_fingerprint(model) == stored


def big_safetensors(path: Path, seed: int, n: int = 6, size: int = 96 << 10) -> dict:
    """A safetensors file over 1 MiB: n float32 tensors of `size` elements."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {f"block{i}.weight": rng.standard_normal(size).astype(np.float32) for i in range(n)}
    save_file(tensors, path)
    return tensors


def test_weight_swaps_of_equal_size_and_mtime_change_the_folder_fingerprint(tiny_sd1, tmp_path):
    """Issue 26 item 6: files over 1 MiB were hashed by size and mtime only, so other weights of the
    same size copied with their mtime (cp -a, rsync -a, tar) resumed into a mixed run. Restated
    here: a large safetensors file is hashed by its header and both ends of every tensor, any other
    large file by sampled blocks; a plain copy (new mtime, same bytes) keeps the fingerprint."""
    from cfgbasin_jax import loading

    model = tmp_path / "sd"
    shutil.copytree(tiny_sd1.path, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = big_safetensors(weights, seed=0)
    assert weights.stat().st_size > (1 << 20)
    fp = loading.model_fingerprint(model)

    def swap(path: Path, write) -> str:
        """Rewrite ``path`` (same size), restore its mtime, return the new fingerprint."""
        st = path.stat()
        write(path)
        assert path.stat().st_size == st.st_size
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        return loading.model_fingerprint(model)

    from safetensors.numpy import save_file

    assert swap(weights, lambda p: big_safetensors(p, seed=1)) != fp  # other weights, same shapes
    key = "block3.weight"
    for index in (0, tensors[key].size - 1):  # a change in the first or last element of one tensor
        changed = dict(tensors)
        changed[key] = tensors[key].copy()
        changed[key][index] += 1
        assert swap(weights, lambda p: save_file(changed, p)) != fp, index
    assert swap(weights, lambda p: save_file(tensors, p)) == fp  # the same bytes again
    shutil.copytree(model, tmp_path / "plain_copy")  # new mtimes, same bytes
    assert loading.model_fingerprint(tmp_path / "plain_copy") == fp

    # a large pickled .bin: sampled blocks
    weights.unlink()
    binary = model / "unet" / "diffusion_pytorch_model.bin"
    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, 3 << 20, dtype=np.uint8)
    binary.write_bytes(data.tobytes())
    fp_bin = loading.model_fingerprint(model)
    other = rng.integers(0, 256, data.size, dtype=np.uint8)
    assert swap(binary, lambda p: p.write_bytes(other.tobytes())) != fp_bin
    assert swap(binary, lambda p: p.write_bytes(data.tobytes())) == fp_bin
