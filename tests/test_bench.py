"""Smoke test of the benchmark harness (bench/) at minimal size: it runs and its figures are
consistent. Nothing here is timed; `python -m bench` is the benchmark."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import __main__ as cli  # noqa: E402
from bench import diffusers_flax, harness, report  # noqa: E402
from bench import models as M  # noqa: E402
from bench import runners as R  # noqa: E402

STEPS = 10  # DDIM timesteps 901, 801, ..., 1: five above t=500


def test_cli_arguments():
    args = cli.parse_args(["--sizes", "tiny", "--sections", "table,dtp", "--pin", "none"])
    assert args.sections == "table,dtp" and args.repeats == 3
    with pytest.raises(SystemExit):
        cli.parse_args(["--sections", "speed"])
    assert cli.pin_core("auto", [0, 1]) == 1 and cli.pin_core("none", [0, 1]) is None and cli.pin_core("0", [0, 1]) == 0
    with pytest.raises(SystemExit, match="--pin 7"):
        cli.pin_core("7", [0, 1])


def test_official_rules_on_the_host():
    assert not R.official_dtp_switch([5.0]) and not R.official_dtp_switch([5.0, 3.0])
    assert R.official_dtp_switch([5.0, 3.0, 4.0])  # d[1] is a strict local minimum: switch at step 2
    assert R.official_og_index([0.5, 0.4, 0.3, 0.35, 0.2, 0.1]) == 2
    assert R.official_og_index([0.5, 0.4, 0.3, 0.2]) == 5  # no minimum: the official fallback


@pytest.fixture(scope="module")
def bench_models(tiny_sd1, pipe_sd1):
    """BenchModels over the session's tiny sd1 models (PyTorch oracle and our pipeline)."""
    size = M.SIZES["tiny"]
    configs = M.configs_for(size)
    saved = pipe_sd1.components.configs["unet"]
    assert all(saved[k] == v for k, v in configs["unet"].items() if not k.startswith("_"))
    return M.BenchModels(
        size=size, folder=tiny_sd1.path, configs=configs, torch_unet=tiny_sd1.unet, torch_vae=tiny_sd1.vae,
        torch_text=tiny_sd1.text_encoder, tokenizer=tiny_sd1.tokenizer, torch_device="cpu", pipe=pipe_sd1,
        unet_params_m=sum(p.numel() for p in tiny_sd1.unet.parameters()) / 1e6, parity=0.0,
    )


@pytest.fixture(scope="module")
def stp_table(bench_models):
    """The STP table of ours and (b); the (d) anchor is requested as on a stack without diffusers' Flax."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(diffusers_flax, "available", lambda: False)
        return harness.table(bench_models, ["stp"], batch=2, steps=STEPS, loop_images=1, repeats=1,
                             runners=("ours", "torch_loop", "flax_pipe"), sweep=False, log=lambda *a: None)


def test_table_rows_agree_with_the_official_loop(stp_table):
    rows = stp_table["methods"]["stp"]
    assert set(rows) == {"ours", "torch_loop"} and stp_table["skipped"] == {"flax_pipe": diffusers_flax.SKIP_NOTE}
    ours, loop = rows["ours"], rows["torch_loop"]
    assert ours["n_images"] == 2 and loop["n_images"] == 1
    assert ours["unet_evals_per_image"] == 5 + 2 * 5  # the cond-free half only above t=500
    assert loop["unet_evals_per_image"] == 2 * STEPS  # the official structure runs both halves
    assert loop["ratio_vs_anchor"] == 1.0 and ours["ratio_vs_anchor"] > 0
    assert ours["max_pixel_diff_vs_anchor"] <= 1  # same model, same method, same noise: same image
    for row in rows.values():
        assert row["images_per_s"] > 0 and len(row["seconds"]) == 1 and row["compile_s"] >= 0


def test_no_host_round_trips_in_the_compiled_loop(bench_models, stp_table):
    args = harness.sampler_args(bench_models.pipe, 2, STEPS, bench_models.size.latent)  # the table's shapes
    assert harness.host_callbacks_in_loop(bench_models.pipe, args) == 0


def _synthetic_result(stp_table) -> dict:
    percall_row = {"config": "tiny", "unet_params_m": 0.79, "shape": [16, 4, 32, 32],
                   "seconds": {"torch": 1.0, "ours": 0.9, "diffusers_flax": 3.0},
                   "ratio_vs_torch": {"ours": 0.9, "diffusers_flax": 3.0}, "rel_err_vs_torch": {"ours": 2e-5}}
    dtp_rows = {name: {"n_images": n, "images_per_s": r, "ratio_vs_anchor": r / 2.0, "ratio_vs_flax_loop": r / 3.0,
                       "unet_evals_per_image": 20, "seconds": [n / r]}
                for name, n, r in (("ours_b1", 1, 4.0), ("ours_b8", 8, 7.0), ("flax_loop", 1, 3.0), ("torch_loop", 1, 2.0))}
    return {
        "date": "today", "command": "python -m bench", "args": {"repeats": 1},
        "machine": {"cpu": "test cpu", "cores": 2, "jax_backend": "cpu", "jax_devices": ["cpu"],
                    "load_avg_start": [1.0, 1.0, 1.0], "versions": {"jax": "x"}, "setting": "pinned"},
        "sizes": {"tiny": {"name": "tiny", "description": "tiny", "unet_params_m": 0.79, "parity": 2e-5}},
        "table": {"tiny": stp_table},
        "overhead": {"tiny": {"batch": 8, "unet_call_s": 0.01, "measured_fraction": 0.02, "isolated_fraction": 0.01,
                              "host_callbacks_in_loop": 0}},
        "dtp": {"tiny": {"steps": 10, "rows": dtp_rows}},
        "percall": {"pinned_1_thread": {"results": [percall_row]}},
        "notes": ["a note"],
    }


def test_report_markdown_and_json(stp_table, tmp_path):
    result = _synthetic_result(stp_table)
    result["table"]["tiny"] = {**stp_table, "methods": {"cfg": stp_table["methods"]["stp"], **stp_table["methods"]}}
    result["percall"]["pinned_1_thread"]["skipped"] = {"diffusers_flax": diffusers_flax.SKIP_NOTE}
    md_path, json_path = report.write(result, tmp_path / "results")
    text = md_path.read_text()
    # the skipped (d) anchor: one row under constant CFG (the only method it expresses), a per-call note
    assert text.count(f"| (d) diffusers Flax | - | {diffusers_flax.SKIP_NOTE} |") == 1
    assert f"diffusers Flax columns: {diffusers_flax.SKIP_NOTE}" in text
    assert "test cpu, 2 cores" in text and "pinned" in text
    assert "| STP (0 above t=500, then 7.5) | (a) ours | 2 |" in text
    assert "per-call ratio ours/PyTorch, pinned 1 thread: tiny 0.90x" in text
    assert "DTP batch 8 vs the PyTorch batch-1 loop, `tiny`: 3.50x" in text
    assert "isolated 1.0%" in text and "host callbacks in the compiled loop: 0" in text
    assert "STP UNet work" not in text  # needs both the constant and the STP rows
    loaded = json.loads(json_path.read_text())
    assert loaded["table"]["tiny"]["methods"]["stp"]["ours"]["n_images"] == 2
    assert np.isclose(loaded["percall"]["pinned_1_thread"]["results"][0]["ratio_vs_torch"]["ours"], 0.9)


ACCELERATOR_FLAGS = ["--config", "tiny", "--steps", "3", "--batches", "1", "--methods", "cfg,dtp"]


def start_early(request, items):
    """`python -m bench.accelerator` below, started at the session's first test (conftest's `early`)."""
    from early_start import Started, selected

    if not selected(items, "test_accelerator_run_on_cpu_with_the_tiny_config"):
        return {}

    folder = request.getfixturevalue("tmp_path_factory").mktemp("accelerator")
    command = [sys.executable, "-m", "bench.accelerator", *ACCELERATOR_FLAGS, "--out", folder / "accelerator.md"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return {"accelerator": Started([command], env, folder / "logs")}


def test_accelerator_run_on_cpu_with_the_tiny_config(early):
    """python -m bench.accelerator end to end on CPU (the tiny config, 3 steps, batch 1): the table,
    the attention choice, parity against PyTorch and the saved reference, the runner rows."""
    job = early["accelerator"]
    (done,) = job.wait(timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = job.logs.parent / "accelerator.md"
    text = out.read_text()
    assert "JAX backend cpu" in text and "attention: chunked" in text
    errors = {line.split(" vs ")[1].split(":")[0]: float(line.rsplit(": ", 1)[1].split()[0])
              for line in text.splitlines() if line.startswith("- UNet parity")}
    assert len(errors) == 2 and all(err <= 1e-4 for err in errors.values()), errors
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith(("| CFG", "| DTP"))]
    assert [(r[0], r[1]) for r in rows] == [("| CFG 7.5", "1"), ("| DTP (1.0, then 7.5)", "1")]
    for row in rows:
        assert float(row[2]) > 0 and float(row[3]) > 0 and row[5] == "6"  # 3 steps x 2 halves


def test_import_time_targets_and_probe():
    from bench import import_time

    assert import_time.parse_target("before=/py@/src") == ("before", "/py", "/src")
    assert import_time.parse_target("now=/py") == ("now", "/py", None)
    with pytest.raises(SystemExit, match="LABEL=PYTHON"):
        import_time.parse_target("/py")
    (row,) = import_time.measure([("json", "import json", sys.executable, None)], runs=1)
    assert row["imports"] == [] and row["median_s"] > 0 and row["runs"] == 1
