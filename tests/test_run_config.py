"""The run config (cfgbasin_jax.runs.config): every field declared identity or not, the identity derived
from the declarations and complete (a resume that changes ANY identity field is refused, before any
sampling), non-identity fields free to change; the experiment presets; and issue 26's run-flow cases
(bad sizes leave nothing behind, OUTDIR inside the model, an unusable compilation cache, resume after a
lost image, gated reports under padding, the demo's one-line errors and all-or-nothing outputs)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_faults import env_cpu, in_namespace, namespaces  # noqa: F401  (namespaces: a fixture)
from test_faults import one_error_line as one_line

from cfgbasin_jax.apps import generate as cli
from cfgbasin_jax.method import guidance as G
from cfgbasin_jax.method import registry as M
from cfgbasin_jax.runs import config as C
from cfgbasin_jax.runs import folder as R
from cfgbasin_jax.runs import prompts as P
from cfgbasin_jax.runs import runner

FAST = ["--num_inference_steps", "3", "--img_size", "16", "--batch_size", "1", "--progress", "none", "--plot", "none",
        "--no_compilation_cache"]


def config_of(argv, method="cfg") -> C.RunConfig:
    return cli.resolve(cli.build_parser("test", method).parse_args(argv), method, argv)


# ------------------------------------------------------------------------------ declarations


def test_every_field_is_declared_and_the_identity_follows_the_declarations():
    for f in dataclasses.fields(C.RunConfig):
        assert isinstance(f.metadata.get("identity"), bool), f"{f.name} is declared neither way"
    keys = [f.metadata["key"] or f.name for f in C.identity_fields()]
    # the identity config.json has always stored (f0ec935), restated
    assert sorted(keys) == sorted(["method", "model", "model_fingerprint", "unet_path", "unet_fingerprint",
                                   "batch_size", "dtype", "pixels", "guidance", "scheduler", "num_inference_steps", "img_size",
                                   "seed", "exp", "prompt_source", "baselines", "gate_calibration"])


def test_a_field_without_a_declaration_fails():
    @dataclasses.dataclass(frozen=True)
    class Planted(C.RunConfig):
        extra: int = 0

    with pytest.raises(TypeError, match="declare extra with identity"):
        C.identity_fields(Planted)


def test_experiment_presets():
    """The paper's experiments, restated: LAION-10k at 256 px with 10,000 prompts (the STP script's
    defaults), SD v1's memorized prompts at 512 px (the DTP / OG scripts'), the 200 memorized images."""
    assert C.laion10k() == {"exp": "laion10k", "img_size": 256, "end_iter": 10000,
                            "outdir": "LAION_10k_DCR_with_text_100000_0_500_7_5_else_cosine_1"}
    assert C.sdv1_pretrained()["img_size"] == 512 and C.sdv1_pretrained()["exp"] == "sdv1_pretrained"
    assert (C.memorized200()["exp"], C.memorized200()["end_iter"]) == ("200_memorized", 200)
    assert set(C.PRESETS) <= set(P.EXPERIMENTS)
    assert C.script_defaults("stp")["img_size"] == 256 and C.script_defaults("og-dtp")["img_size"] == 512


# ------------------------------------------------------------------------------ identity on resume


class _NoSampling(runner.PipelineCache):
    def get(self, *args, **kwargs):
        raise AssertionError("the refusal must come before the model is loaded or sampled")


def _changed(f: dataclasses.Field, value, tmp_path):
    """Another value of identity field ``f`` (a new identity field needs a case here)."""
    if value is None:
        by_name = {"unet_path": tmp_path / "unet", "unet_fingerprint": "other",
                   "gate_calibration": C.Calibration("plain.txt", ("a",), "digest", 0.5)}
        return by_name[f.name]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, Path):
        return value.parent / (value.name + "-other")
    if isinstance(value, G.Guidance):
        return dataclasses.replace(value, after=value.after + 1.0)
    if isinstance(value, M.Hook):
        return dataclasses.replace(value, cads=not value.cads)
    raise AssertionError(f"no changed value for identity field {f.name} ({type(value).__name__}): add one")


@pytest.fixture(scope="module")
def written_run(tiny_sd1, tmp_path_factory):
    """One image written by the runner with a minimal config (the session's pipeline)."""
    out = tmp_path_factory.mktemp("identity") / "run"
    config = config_of(["--pretrained_model_name_or_path", str(tiny_sd1.path), "--exp", "imagenette",
                        "--end_iter", "1", "--outdir", str(out)] + FAST)
    assert runner.run(config) == 0
    return config


def test_resume_refuses_a_change_of_every_identity_field(written_run, tmp_path):
    stored = json.loads((written_run.outdir / R.CONFIG_FILE).read_text())["identity"]
    assert stored == json.loads(json.dumps(written_run.identity()))
    fields = C.identity_fields()
    assert len(fields) >= 16
    for f in fields:
        changed = dataclasses.replace(written_run, **{f.name: _changed(f, getattr(written_run, f.name), tmp_path)})
        with pytest.raises(R.RunError, match="different configuration") as refused:
            runner.run(changed, _NoSampling())
        assert f"{f.metadata['key'] or f.name}" in str(refused.value), f.name
    assert len(list((written_run.outdir / "Images").iterdir())) == 1


def test_non_identity_fields_may_change_on_resume(written_run, capsys):
    changed = dataclasses.replace(written_run, end_iter=2, plot="none", progress="none", compilation_cache=None,
                                  distributed_timeout=7.0, argv=("other",), warnings=("w",))
    assert runner.run(changed) == 0
    assert "1 of this process's 2 images already done; 1 to generate" in capsys.readouterr().err
    assert [r["index"] for r in R.read_metadata_file(written_run.outdir / R.METADATA_FILE)] == [0, 1]


# ------------------------------------------------------------------------------ issue 26 (run flow)


def test_a_run_that_fails_before_its_first_image_leaves_nothing(tiny_sd1, tmp_path):
    """Issue 26, item 1: a failure in the first batch (here: the device gives up) writes no identity:
    no config.json, metadata, run.log or lock; the folder it created is gone; a good run follows."""
    out = tmp_path / "out"
    config = config_of(["--pretrained_model_name_or_path", str(tiny_sd1.path), "--exp", "imagenette",
                        "--end_iter", "1", "--outdir", str(out)] + FAST)

    class Failing(runner.PipelineCache):
        def get(self, *args, **kwargs):
            pipe = runner.PIPELINES.get(*args, **kwargs)

            class Broken:
                tokenizer = pipe.tokenizer

                def latent_hw(self, h, w):
                    return pipe.latent_hw(h, w)

                def generate(self, *a, **k):
                    raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

            return Broken()

    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        runner.run(config, Failing())
    assert not out.exists()
    assert runner.run(config) == 0 and (out / R.CONFIG_FILE).is_file()


def test_huge_img_size_is_one_line_and_the_outdir_stays_usable(tiny_sd1, tmp_path):
    """Issue 26, item 1: --img_size 100000 aborted inside XLA and poisoned OUTDIR. Now: one line naming
    the flag, exit 2, nothing written; the same OUTDIR then takes a good size."""
    out = tmp_path / "out"
    argv = ["--method", "cfg", "--pretrained_model_name_or_path", str(tiny_sd1.path), "--exp", "imagenette",
            "--end_iter", "1", "--outdir", str(out), *FAST]
    bad = [a if a != "16" else "100000" for a in argv]
    done = subprocess.run([sys.executable, "-m", "cfgbasin_jax.apps.generate", *bad], capture_output=True, text=True,
                          env=env_cpu(), timeout=300)
    assert done.returncode == 2
    assert "--img_size 100000 with --batch_size 1 needs at least" in one_line(done.stderr, "cfgbasin-generate")
    assert not out.exists()
    assert cli.main(argv) == 0


def test_outdir_inside_the_model_folder_is_refused(tiny_sd1, tmp_path):
    """Issue 26, item 9: the run's own outputs changed the model's fingerprint, so it never resumed."""
    out = Path(tiny_sd1.path) / "generated"
    done = subprocess.run([sys.executable, "-m", "cfgbasin_jax.apps.generate", "--method", "cfg",
                           "--pretrained_model_name_or_path", str(tiny_sd1.path), "--exp", "imagenette",
                           "--end_iter", "1", "--outdir", str(out), *FAST], capture_output=True, text=True,
                          env=env_cpu(), timeout=300)
    assert done.returncode == 2
    assert f"inside the model folder {Path(tiny_sd1.path).resolve()}" in one_line(done.stderr, "cfgbasin-generate")
    assert not out.exists()


def test_unusable_compilation_cache_is_one_line(tiny_sd1, tmp_path):
    """Issue 26, item 12: a cache folder under /proc was accepted with a Python warning."""
    argv = ["--method", "cfg", "--pretrained_model_name_or_path", str(tiny_sd1.path), "--exp", "imagenette",
            "--end_iter", "1", "--outdir", str(tmp_path / "out"), *FAST[:-1], "--compilation_cache", "/proc/cfgbasin_cache"]
    done = subprocess.run([sys.executable, "-m", "cfgbasin_jax.apps.generate", *argv], capture_output=True, text=True,
                          env=env_cpu(), timeout=300)
    assert done.returncode == 2
    assert "--compilation_cache /proc/cfgbasin_cache" in one_line(done.stderr, "cfgbasin-generate")
    assert not (tmp_path / "out").exists()


def test_a_lost_image_is_regenerated_on_resume(tiny_sd1, tmp_path, capsys):
    """Issue 26, "Resume": a finished image deleted, its record kept: the rerun makes it again (bit for
    bit) and says N-1 already done."""
    out = tmp_path / "out"
    argv = ["--method", "stp", "--pretrained_model_name_or_path", str(tiny_sd1.path), "--exp", "imagenette",
            "--end_iter", "3", "--outdir", str(out), *FAST]
    assert cli.main(argv) == 0
    lost = out / R.read_metadata_file(out / R.METADATA_FILE)[1]["file"]
    data = lost.read_bytes()
    lost.unlink()
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "2 of this process's 3 images already done; 1 to generate" in capsys.readouterr().err
    assert lost.read_bytes() == data
    assert [r["index"] for r in R.read_metadata_file(out / R.METADATA_FILE)] == [0, 1, 2]


def test_gated_report_under_padding(pipe_sd1):
    """Issue 26, "Gated report under padding": 5 prompts in chunks of 2 (the last one padded): the gate's
    score and flag have length 5 and equal the unchunked run's."""
    prompts = list(P.imagenette_prompts()[:5])
    kwargs = dict(num_inference_steps=3, seed=0, height=16, width=16, scheduler="ddim", progress=False, decode=False)
    open_gate = M.guidance("gated-stp", threshold=float(np.finfo(np.float32).max))  # flags none: the scores
    probe = np.sort(pipe_sd1.generate(prompts, open_gate, **kwargs).gate_score)  # same program as the runs below
    g = G.with_threshold(open_gate, float(probe[2] + probe[3]) / 2)  # between two scores: no tie
    whole = pipe_sd1.generate(prompts, g, **kwargs)
    chunked = pipe_sd1.generate(prompts, g, batch_size=2, **kwargs)
    assert whole.gate_score.shape == chunked.gate_score.shape == (5,)
    assert chunked.gate_flagged.shape == (5,) and 0 < chunked.gate_flagged.sum() < 5
    np.testing.assert_array_equal(chunked.gate_flagged, whole.gate_flagged)
    np.testing.assert_allclose(chunked.gate_score, whole.gate_score, rtol=1e-5)


def test_demo_bad_method_is_one_line(tmp_path):
    """Issue 26, item 11: cfgbasin-demo --methods bogus printed an 11-line usage dump."""
    done = subprocess.run([sys.executable, "-m", "cfgbasin_jax.apps.demo", "--methods", "bogus", "--outdir",
                           str(tmp_path / "d")], capture_output=True, text=True, env=env_cpu(), timeout=300)
    assert done.returncode == 2
    assert "argument --methods: invalid choice: 'bogus'" in one_line(done.stderr, "cfgbasin-demo")
    assert not (tmp_path / "d").exists()


def test_demo_on_a_full_disk_names_the_path_and_leaves_no_grids(namespaces, tmp_path):
    """Issue 26, item 10: the demo's full-disk message named no path and left grids without report.md.
    Its outputs are written all or nothing (report.md last); the error names the file."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    demo = " ".join([sys.executable, "-m", "cfgbasin_jax.apps.demo", "--methods", "CFG", "--num_mem_prompts", "2",
                     "--num_plain_prompts", "2", "--samples_per_prompt", "2", "--num_inference_steps", "3",
                     "--outdir", f"{mnt}/out"])
    script = f"mount -t tmpfs -o size=24k tmpfs {mnt} || exit 99\n{demo} 2> {tmp_path}/err; echo rc=$?\nls -a {mnt}/out"
    done = in_namespace(script)
    assert "rc=2" in done.stdout, (tmp_path / "err").read_text()[-3000:]
    line = one_line((tmp_path / "err").read_text(), "cfgbasin-demo")
    assert f"{mnt}/out/" in line and "No space left on device" in line
    listed = done.stdout.split("rc=2", 1)[1].split()
    assert [name for name in listed if name not in (".", "..")] == [], listed
