"""The paper's command lines (cfgbasin_jax.apps.generate, scripts/generate_test_dataset_*.py) on tiny models:
the seed commands, outputs, resume (in-process and kill -9 in a subprocess), configuration check,
bad input. In-process runs share one loaded pipeline per model (runs.runner.PIPELINES)."""

import json
import os
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cfgbasin_jax.apps import generate as cli
from cfgbasin_jax.method import guidance as G
from cfgbasin_jax.runs import prompts as P
from cfgbasin_jax.runs import folder as R
from cfgbasin_jax.runs import runner

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
DATA = Path(__file__).parent / "data"
STEPS = 6
FAST = ["--num_inference_steps", str(STEPS), "--img_size", "16", "--batch_size", "2", "--progress", "none"]
IN_PROCESS = FAST + ["--no_compilation_cache"]

STP_SEED = ("--pretrained_model_name_or_path ./sd-21-finetuned_LAION10K/ --outdir LAION_10k_SDv21_0_500_7_5 "
            "--guidance_change_step 500 --guidance_scale 0.0 --guidance_scale_later 7.5").split()
DTP_SEED = "--unet_path /path/to/unet/model --end_iter 200 --exp 200_memorized".split()


def run_script(name: str, argv: list, monkeypatch) -> int:
    """Run scripts/<name> in this process as `python <name> argv...`; returns its exit status."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / name), *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(SCRIPTS / name), run_name="__main__")
    return exit_info.value.code


def records(outdir) -> list:
    return [json.loads(line) for line in (Path(outdir) / R.METADATA_FILE).read_text().splitlines()]


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def nan_to_none(values) -> list:
    return [None if not np.isfinite(v) else float(v) for v in values]


def parse(argv, method):
    return cli.resolve(cli.build_parser("test", method).parse_args(argv), method, argv)


# ------------------------------------------------------------------------------------ seed commands


def test_stp_seed_command(tiny_sd1, tmp_path, monkeypatch):
    """generate_test_dataset_stp.py as the README writes it, against a tiny model at the paper's
    folder name, with a LAION-style caption file in the working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sd-21-finetuned_LAION10K").symlink_to(tiny_sd1.path, target_is_directory=True)
    shutil.copy(DATA / "laion_combined_captions.json", tmp_path)
    out = tmp_path / "LAION_10k_SDv21_0_500_7_5"

    s = parse(STP_SEED, "stp")  # the command exactly as written: reference defaults, nothing written
    assert s.guidance == G.static_transition(500, 0.0, 7.5)
    assert (s.label, s.img_size, s.num_inference_steps, s.scheduler, s.seed) == ("stp", 256, 50, "dpm++2m", 42)
    assert (s.start_iter, s.end_iter, s.prompt_set.exp, s.batch_size) == (0, 10000, "laion10k", 1)
    assert s.pixels == "truncate"  # the official scripts' uint8 conversion
    assert s.model == Path(tiny_sd1.path).resolve() and s.outdir == out and not out.exists()

    # the same command run at tiny size: 5 prompts, 6 steps, 16 px
    assert run_script("generate_test_dataset_stp.py", STP_SEED + ["--end_iter", "5"] + IN_PROCESS, monkeypatch) == 0
    assert sorted(os.listdir(out / "Images")) == [f"{i}.png" for i in range(5)]
    recs = records(out)
    expected = P.load_prompt_set("laion10k", tmp_path / "laion_combined_captions.json", n_draw=5).prompts
    assert [r["index"] for r in recs] == list(range(5))
    assert [r["prompt"] for r in recs] == list(expected)
    assert [r["file"] for r in recs] == [f"Images/{i}.png" for i in range(5)]

    pipe = runner.PIPELINES.get(s.model, None, "float32")
    ts = np.asarray(pipe.make_scheduler("dpm++2m", STEPS).timesteps)
    switch = int(np.nonzero(ts <= 500)[0][0])
    for r in recs:
        assert (r["transition_index"], r["transition_t"]) == (switch, int(ts[switch]))
        assert r["method"] == "stp" and r["seed"] == 42 and r["nonfinite"] is False
        assert (r["guidance_scale"], r["guidance_scale_later"]) == (0.0, 7.5)
        assert r["noise_diff"][:switch] == [None] * switch  # scale 0: the conditional half is skipped
        assert all(v is not None for v in r["noise_diff"][switch:])
    config = json.loads((out / "config.json").read_text())
    assert config["identity"]["guidance"] == {"before": 0.0, "after": 7.5, "rule": "static", "t": 500,
                                              "shape_before": "static", "shape_after": "static"}
    assert config["identity"]["model"] == str(s.model) and config["versions"]["jax"]
    assert (out / "noise_diff.png").stat().st_size > 0 and (out / "run.log").exists()

    # the CLI is a thin wrapper: its images are Pipeline.generate's, batch by batch ([0,1], ..., [4,4])
    g = G.static_transition(500, 0.0, 7.5)
    for batch in ([0, 1], [4, 4]):
        res = pipe.generate([expected[i] for i in batch], guidance=g, num_inference_steps=STEPS, seed=42, height=16,
                            width=16, scheduler="dpm++2m", progress=False, sample_indices=batch, pixels="truncate")
        assert np.array_equal(png(out / f"Images/{batch[0]}.png"), res.images[0])
        assert recs[batch[0]]["noise_diff"] == nan_to_none(res.noise_diff[0])


def test_dtp_seed_command(tiny_sd2, tmp_path, monkeypatch):
    """generate_test_dataset_dtp.py --unet_path ... --end_iter 200 --exp 200_memorized, with the base
    model from $CFGBASIN_BASE_MODEL and the fine-tuned UNet at the paper's checkpoint-20000/unet."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(cli.ENV_BASE_MODEL, str(tiny_sd2.path))
    shutil.copytree(DATA / "memorized_images", tmp_path / "memorized_images")
    shutil.copytree(Path(tiny_sd2.path) / "unet", tmp_path / "checkpoint-20000" / "unet")
    argv = [a.replace("/path/to/unet/model", "checkpoint-20000/unet") for a in DTP_SEED]

    s = parse(argv, "dtp")
    assert s.guidance == G.dynamic_transition(1.0, 7.5, signal="noise_diff")
    assert (s.img_size, s.num_inference_steps, s.scheduler, s.start_iter, s.end_iter) == (512, 50, "dpm++2m", 0, 3)
    assert s.model == Path(tiny_sd2.path).resolve()
    assert s.unet_path == (tmp_path / "checkpoint-20000" / "unet").resolve()

    assert run_script("generate_test_dataset_dtp.py", argv + IN_PROCESS, monkeypatch) == 0
    out = tmp_path / "output"
    recs = records(out)
    assert [r["prompt"] for r in recs] == ["a photo of a cat", "an astronaut riding a horse",
                                           "oil painting of a city at night"]
    assert [r["source"] for r in recs] == [{"file": "10.txt"}, {"file": "2.txt"}, {"file": "a.txt"}]
    # the reference's names: {i}_{transition timestep}.png (-1: no transition found)
    assert sorted(os.listdir(out / "Images")) == sorted(f"{r['index']}_{r['transition_t']}.png" for r in recs)
    assert [r["file"] for r in recs] == [f"Images/{r['index']}_{r['transition_t']}.png" for r in recs]
    found = [r for r in recs if r["transition_index"] >= 0]
    assert found, "the tiny sd2 model has a noise-difference minimum for these prompts"
    for r in found:  # after = 7.5 from the transition on: both halves ran, so d is known up to it
        d = np.array([np.nan if v is None else v for v in r["noise_diff"]])
        j = r["transition_index"]
        assert d[j] > d[j - 1] < d[j - 2] or j == 1


def test_opposite_guidance_wrapper_with_plots(tiny_sd1, tmp_path, monkeypatch):
    out = tmp_path / "og"
    argv = ["--pretrained_model_name_or_path", str(tiny_sd1.path), "--outdir", str(out), "--end_iter", "3",
            "--plot", "images"] + IN_PROCESS
    assert run_script("generate_test_dataset_opposite_guidance.py", argv, monkeypatch) == 0
    recs = records(out)
    assert [r["prompt"] for r in recs] == list(P.load_prompt_set("sdv1_pretrained").prompts[:3])
    for r in recs:
        assert r["method"] == "og-dtp" and (r["guidance_scale"], r["guidance_scale_later"]) == (-7.5, 7.5)
        assert r["guidance"]["mode"] == "exact" and len(r["latent_cosine"]) == STEPS
        index = G.latent_cosine_transition_index(r["latent_cosine"])  # the official rule on the record
        assert r["transition_index"] == (index if index < STEPS else -1)
        # the reference names og images by the transition STEP index
        assert r["file"] == f"Images/{r['index']}_{r['transition_index']}.png" and (out / r["file"]).is_file()
        assert (out / "Plots" / f"{r['index']}.png").stat().st_size > 0


# ------------------------------------------------------------------------------------ resume / config


def test_console_cfg_resume_and_config_check(tiny_sd1, tmp_path, capsys):
    out = tmp_path / "cfg"
    base = ["--method", "cfg", "--pretrained_model_name_or_path", str(tiny_sd1.path), "--exp", "imagenette",
            "--outdir", str(out)] + IN_PROCESS
    assert cli.main(base + ["--end_iter", "3"]) == 0
    first = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "Images").iterdir()}
    assert sorted(first) == ["0.png", "1.png", "2.png"]
    capsys.readouterr()

    assert cli.main(base + ["--end_iter", "5"]) == 0  # finishes the rest, keeps what exists
    err = capsys.readouterr().err
    assert "3 of this process's 5 images already done; 2 to generate" in err and "resuming" in err
    recs = records(out)
    assert [r["index"] for r in recs] == list(range(5))
    assert [r["prompt"] for r in recs] == list(P.imagenette_prompts()[:5])
    for name, (data, mtime) in first.items():
        assert (out / "Images" / name).read_bytes() == data and (out / "Images" / name).stat().st_mtime_ns == mtime

    assert cli.main(base + ["--end_iter", "5"]) == 0
    assert "0 to generate" in capsys.readouterr().err
    assert len(records(out)) == 5

    from cfgbasin_jax.runs.evaluation import generation_cost

    assert generation_cost(str(out))["unet_evals_per_image"] == 2 * STEPS
    files = sorted(p.name for p in out.rglob("*"))
    assert cli.main(base + ["--end_iter", "5", "--guidance_scale", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "different configuration (guidance.after: 7.5 -> 5.0; guidance.before: 7.5 -> 5.0)" in err
    assert len(err.splitlines()) == 1 and sorted(p.name for p in out.rglob("*")) == files


def test_baselines_from_the_command_line(tiny_sd1, tmp_path):
    """--method wen, --prompt_augmentation and --cads run through the library's baselines."""
    from cfgbasin_jax import baselines as B

    out = tmp_path / "wen"
    argv = ["--method", "wen", "--pretrained_model_name_or_path", str(tiny_sd1.path), "--exp", "imagenette",
            "--end_iter", "2", "--outdir", str(out), "--prompt_augmentation", "rand_numb_add", "--cads"] + IN_PROCESS
    assert cli.main(argv) == 0
    recs = records(out)
    assert sorted(p.name for p in (out / "Images").iterdir()) == ["0.png", "1.png"]
    want = B.augment_prompts(list(P.imagenette_prompts()[:2]), "rand_numb_add", 4, seed=42, sample_indices=[0, 1])
    assert [r["prompt"] for r in recs] == list(P.imagenette_prompts()[:2])  # the caption, for evaluation
    assert [r["prompt_used"] for r in recs] == want != [r["prompt"] for r in recs]  # what was sampled
    from cfgbasin_jax.runs.evaluation import generation_cost

    cost = generation_cost(str(out))  # what scripts/evaluate.py reports beside the metrics
    assert "wen" in cost["method"] and cost["unet_evals_per_image"] > 2 * STEPS  # CFG + the optimisation


def test_metadata_writer_cuts_a_half_written_line(tmp_path):
    path = tmp_path / R.METADATA_FILE
    path.write_text('{"index": 0, "prompt": "a", "file": "Images/0.png"}\n{"index": 1, "prom')
    assert [r["index"] for r in R.read_metadata_file(path)] == [0]
    with R.MetadataWriter(tmp_path) as w:
        w.append([{"index": 1, "prompt": "b", "file": "Images/1.png", "x": float("nan")}])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"index": 0, "prompt": "a", "file": "Images/0.png"}, {"index": 1, "prompt": "b", "file": "Images/1.png", "x": None}]
    path.write_text('{"index": 0}\n')
    with pytest.raises(R.RunError, match=r"metadata.jsonl:1: a metadata record needs"):
        R.read_records(tmp_path)


# ------------------------------------------------------------------------------------ bad input


def _bad_cases(tmp_path, sd1):
    not_a_dir = tmp_path / "a_file"
    not_a_dir.write_text("x")
    (tmp_path / "empty_folder").mkdir()
    model = ["--pretrained_model_name_or_path", str(sd1)]
    return {
        "missing model": (["--pretrained_model_name_or_path", str(tmp_path / "nope")], "model folder"),
        "unknown exp": (model + ["--exp", "coco"], "argument --exp: invalid choice: 'coco'"),
        "malformed jsonl": (model + ["--prompt_json", str(DATA / "broken.jsonl")], "broken.jsonl:3: not valid JSON"),
        "empty prompt set": (model + ["--exp", "200_memorized", "--prompt_json", str(tmp_path / "empty_folder")],
                             "empty prompt set"),
        "end before start": (model + ["--start_iter", "5", "--end_iter", "2"], "--end_iter 2 < --start_iter 5"),
        "unwritable outdir": (model + ["--outdir", str(not_a_dir / "out")], "a_file is not a directory"),
        "augmentation": (model + ["--prompt_augmentation", "shuffle"], "--prompt_augmentation 'shuffle' is not one of"),
        "bad scheduler": (model + ["--scheduler", "LMS"], "--scheduler 'LMS' is not supported"),
        "bad process id": (model + ["--coordinator", "127.0.0.1:1234", "--num_processes", "2", "--process_id", "2"],
                           "--process_id 2 is out of range"),
        "bad img_size": (model + ["--img_size", "10"], "--img_size 10"),
    }


@pytest.mark.parametrize("case", ["missing model", "unknown exp", "malformed jsonl", "empty prompt set",
                                  "end before start", "unwritable outdir", "augmentation", "bad scheduler",
                                  "bad process id", "bad img_size"])
def test_bad_input_one_line_exit_2_nothing_written(case, tiny_sd1, tmp_path, capsys):
    argv, message = _bad_cases(tmp_path, tiny_sd1.path)[case]
    outdir = tmp_path / "out"
    if "--outdir" not in argv:
        argv = argv + ["--outdir", str(outdir)]
    assert cli.main(["--method", "dtp", "--end_iter", "3"] + IN_PROCESS + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cfgbasin-generate: error: ") and message in err[0], err
    assert not outdir.exists()


# ------------------------------------------------------------------------------------ kill -9 + resume


def _count_images(outdir: Path) -> int:
    folder = outdir / "Images"
    return len(list(folder.glob("*.png"))) if folder.is_dir() else 0


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_sd1, tmp_path):
    """Kill the CLI (SIGKILL) once some images exist, leave a half-written metadata line, rerun the
    same command: every image exactly once, bitwise equal to an uninterrupted run, metadata without
    duplicates; the rerun loads its executables from the persistent compilation cache."""
    n = 40
    argv = ["--method", "stp", "--pretrained_model_name_or_path", str(tiny_sd1.path), "--exp", "imagenette",
            "--end_iter", str(n), "--guidance_change_step", "500", "--guidance_scale", "0",
            "--guidance_scale_later", "7.5"] + FAST
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    cache = ["--compilation_cache", str(tmp_path / "jax_cache")]
    command = [sys.executable, "-m", "cfgbasin_jax.apps.generate", *argv, *cache, "--outdir", str(killed)]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"

    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while _count_images(killed) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()
    log = proc.communicate()[0].decode(errors="replace")
    n_killed = _count_images(killed)
    assert 2 <= n_killed < n, f"the run was not killed mid-way ({n_killed} images)\n{log[-2000:]}"
    with open(killed / R.METADATA_FILE, "ab") as f:  # as if killed while writing a record
        f.write(b'{"index": 39, "prompt": "An ima')

    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    log = done.stdout.decode(errors="replace")
    assert done.returncode == 0, log[-3000:]
    assert "resuming" in log and "persistent cache HIT" in log, log[-3000:]

    assert cli.main(argv + ["--no_compilation_cache", "--outdir", str(reference)]) == 0
    names = sorted(os.listdir(reference / "Images"))
    assert names == [f"{i}.png" for i in sorted(range(n), key=str)] or len(names) == n
    assert sorted(os.listdir(killed / "Images")) == names  # no temporary files left either
    for name in names:
        assert (killed / "Images" / name).read_bytes() == (reference / "Images" / name).read_bytes(), name
    assert records(killed) == records(reference)
    assert [r["index"] for r in records(killed)] == list(range(n))


# ------------------------------------------------------------------------------------ gated methods


def test_gated_method_calibrates_then_records_score_and_flag(tiny_sd1, tmp_path):
    """--method gated-og-stp --gate_calibrate: the threshold is the plain prompts' (1 - fpr) percentile
    (restated), and every image's score and flag are in metadata.jsonl. Calibrating on the run's own
    prompts and seeds at fpr 0.5 flags exactly the two images above their median."""
    captions = list(P.imagenette_prompts()[:4])
    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(captions[:2]) + "\n\n" + "\n".join(captions[2:]) + "\n")
    out = tmp_path / "gated"
    argv = ["--method", "gated-og-stp", "--pretrained_model_name_or_path", str(tiny_sd1.path), "--exp", "imagenette",
            "--end_iter", "4", "--outdir", str(out), "--gate_calibrate", str(plain), "--gate_fpr", "0.5"] + IN_PROCESS
    assert cli.main(argv) == 0
    recs = records(out)
    pipe = runner.PIPELINES.get(tiny_sd1.path.resolve(), None, "float32")
    kwargs = dict(num_inference_steps=STEPS, seed=42, height=16, width=16, scheduler="dpm++2m", progress=False)
    cal = pipe.generate(captions, G.constant(7.5), decode=False, **kwargs)
    want = np.percentile(cal.noise_diff[:, 0].astype(np.float64), 50)
    threshold = json.loads((out / R.CONFIG_FILE).read_text())["run"]["gate_threshold"]
    assert threshold == pytest.approx(want, rel=1e-5)
    assert all(r["gate_threshold"] == threshold and r["method"] == "gated-og-stp" for r in recs)
    assert [r["gate_flagged"] for r in recs] == [r["gate_score"] > threshold for r in recs]
    assert sum(r["gate_flagged"] for r in recs) == 2
    for r in recs:  # og-stp's transition for the flagged, none (constant CFG) for the rest
        assert (r["transition_index"] >= 0) == r["gate_flagged"]


@pytest.mark.parametrize("flags, message", [
    ([], "needs exactly one of --gate_threshold and --gate_calibrate"),
    (["--gate_threshold", "-1"], "--gate_threshold -1: guidance: threshold must be >= 0"),
    (["--gate_threshold", "nan"], "--gate_threshold nan: guidance: threshold must be finite"),
    (["--gate_threshold", "1", "--gate_steps", str(STEPS)], f"--gate_steps {STEPS} must be < the {STEPS} sampling"),
    (["--gate_calibrate", "missing.txt"], "--gate_calibrate: missing.txt: prompt file not found"),
    (["--gate_threshold", "1", "--gate_fpr", "0.1"], "--gate_fpr applies only with --gate_calibrate"),
])
def test_gated_bad_input_one_line_exit_2(tiny_sd1, tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    argv = ["--method", "gated-stp", "--pretrained_model_name_or_path", str(tiny_sd1.path), "--end_iter", "2",
            "--exp", "imagenette", "--outdir", str(tmp_path / "out")] + IN_PROCESS + flags
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()
