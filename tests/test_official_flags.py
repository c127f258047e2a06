"""The official scripts' command lines (SonyResearch/mitigating_memorization) in ours: every official
flag with its name, type and default; where we deliberately differ, ``--help`` says so; the official
README's command lines verbatim; the README's table of differences, each row naming its test."""

import re
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from cfgbasin_jax.apps import generate as cli
from cfgbasin_jax.method import guidance as G
from cfgbasin_jax import schedulers
from cfgbasin_jax.models.tiny import SD1_SCHEDULER

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"

# The official argparse tables, restated: flag -> (type, default). type=bool is Python's bool() of the
# text, so every non-empty value, "False" included, is True there.
_SCRATCH = "/scratch/aj3281/DCR/DCR/"
OFFICIAL_FLAGS = {
    "generate_test_dataset_stp.py": {
        "use_json": (bool, True),
        "pretrained_model_name_or_path": (str, _SCRATCH + "sd-finetuned-org_parameters_instancelevel_blip_nodup_laion/checkpoint/"),
        "start_iter": (int, 0),
        "end_iter": (int, 10000),
        "outdir": (str, "LAION_10k_DCR_with_text_100000_0_500_7_5_else_cosine_1"),
        "guidance_scale": (float, 7.5),
        "guidance_change_step": (float, 0),
        "guidance_scale_later": (float, 7.5),
        "CFG_scheduling": (str, "static"),
        "CFG_scheduling_later": (str, "static"),
        "cads": (bool, False),
        "scheduler": (str, "DPM"),
        "img_size": (int, 256),
        "prompt_json": (str, _SCRATCH + "data/laion_10k_random/laion_combined_captions.json"),
        "prompt_augmentation": (str, None),
    },
    "generate_test_dataset_dtp.py": {
        "use_json": (bool, True),
        "pretrained_model_name_or_path": (str, "CompVis/stable-diffusion-v1-4"),
        "unet_path": (str, "CompVis/stable-diffusion-v1-4"),
        "start_iter": (int, 0),
        "end_iter": (int, 200),
        "outdir": (str, "output"),
        "guidance_scale": (float, 7.5),
        "CFG_scheduling": (str, "static"),
        "scheduler": (str, "DPM"),
        "img_size": (int, 512),
        "exp": (str, "sdv1_pretrained"),
    },
}
# generate_test_dataset-opposite_guidance.py declares the same table as the DTP script.
OFFICIAL_FLAGS["generate_test_dataset_opposite_guidance.py"] = dict(OFFICIAL_FLAGS["generate_test_dataset_dtp.py"])
METHOD = {"generate_test_dataset_stp.py": "stp", "generate_test_dataset_dtp.py": "dtp",
          "generate_test_dataset_opposite_guidance.py": "og-dtp"}
SAMPLE = {bool: "True", int: "3", float: "500.5", str: None}
STR_SAMPLE = {"CFG_scheduling": "linear", "CFG_scheduling_later": "cosine", "scheduler": "DDIM", "exp": "200_memorized",
              "prompt_augmentation": "rand_word_repeat"}

# Deliberate differences: defaults that differ here, and flags the official script ignores (or
# cannot run with) but that act here. Each has "official" in its --help text.
DIFFERENT_DEFAULTS = {
    "generate_test_dataset_stp.py": {"pretrained_model_name_or_path", "prompt_json"},
    "generate_test_dataset_dtp.py": {"pretrained_model_name_or_path", "unet_path", "guidance_scale"},
    "generate_test_dataset_opposite_guidance.py": {"pretrained_model_name_or_path", "unet_path"},
}
IGNORED_THERE = {
    "generate_test_dataset_stp.py": {"use_json", "cads", "scheduler"},
    "generate_test_dataset_dtp.py": {"use_json", "unet_path", "start_iter", "CFG_scheduling", "scheduler",
                                     "guidance_scale"},
    "generate_test_dataset_opposite_guidance.py": {"use_json", "start_iter", "CFG_scheduling", "scheduler",
                                                   "guidance_scale"},
}


def _parser(script):
    return cli.build_parser(script, METHOD[script])


def _actions(script) -> dict:
    return {a.dest: a for a in _parser(script)._actions}


@pytest.mark.parametrize("script", sorted(OFFICIAL_FLAGS))
def test_every_official_flag_parses_in_the_matching_script(script, monkeypatch, capsys):
    """All official flags at once, each with a value of the official type, in the parser of the
    script; the script's own --help lists every one."""
    argv, want = [], {}
    for flag, (kind, default) in OFFICIAL_FLAGS[script].items():
        text = SAMPLE[kind] if kind is not str else STR_SAMPLE.get(flag, "some/value")
        argv += [f"--{flag}", text]
        want[flag] = kind(text)
    args = _parser(script).parse_args(argv)
    for flag, value in want.items():
        assert getattr(args, flag) == value and type(getattr(args, flag)) is type(value), flag

    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "scripts" / script), run_name="__main__")
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{flag}" in text for flag in OFFICIAL_FLAGS[script])


@pytest.mark.parametrize("script", sorted(OFFICIAL_FLAGS))
def test_official_defaults_or_a_documented_difference(script):
    ours = cli.method_defaults(METHOD[script])
    differ = {flag for flag, (_, default) in OFFICIAL_FLAGS[script].items() if ours[flag] != default}
    assert differ == DIFFERENT_DEFAULTS[script]
    actions = _actions(script)
    for flag in differ | IGNORED_THERE[script]:
        assert "official" in actions[flag].help, flag
    for flag, (kind, _) in OFFICIAL_FLAGS[script].items():  # same parse type where it is a number
        if kind in (int, float):
            assert actions[flag].type is kind, flag


def test_use_json_true_parses_and_false_is_refused(capsys):
    assert _parser("generate_test_dataset_stp.py").parse_args(["--use_json", "True"]).use_json is True
    assert cli.main(["--use_json", "False"], method="stp", prog="generate_test_dataset_stp.py") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --use_json: 'False': only true is supported" in err[0]


def test_cads_is_a_real_boolean():
    """Officially type=bool, so "--cads False" is True (and unused by the STP script); here it is false."""
    parser = _parser("generate_test_dataset_stp.py")
    assert parser.parse_args(["--cads", "False"]).cads is False
    assert parser.parse_args(["--cads", "True"]).cads is True and parser.parse_args(["--cads"]).cads is True


# ------------------------------------------------------------------ resolved settings (nothing written)


@pytest.fixture
def workdir(tiny_sd1, tmp_path, monkeypatch):
    """A working directory with the official README's model folders, prompt files and a UNet."""
    monkeypatch.chdir(tmp_path)
    for name in ("sd-21-finetuned_LAION10K", "sd-21-finetuned_LAION10K_og", "sd-21-finetuned_Imagenette"):
        (tmp_path / name).symlink_to(tiny_sd1.path, target_is_directory=True)
    shutil.copy(DATA / "laion_combined_captions.json", tmp_path)
    shutil.copytree(DATA / "memorized_images", tmp_path / "memorized_images")
    monkeypatch.setenv(cli.ENV_BASE_MODEL, str(tiny_sd1.path))
    return tmp_path


def _settings(argv, method):
    return cli.resolve(cli.build_parser("test", method).parse_args(argv), method, argv)


def _readme_commands() -> list:
    """The official README's command lines as our README writes them (python3 scripts/...)."""
    text = (REPO / "README.md").read_text()
    block = text.split("## The paper's command lines", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines, current = [], ""
    for line in block.splitlines():  # join backslash continuations
        current += " " + line.strip().removesuffix("\\")
        if not line.rstrip().endswith("\\"):
            lines.append(current.split())
            current = ""
    return [words[1:] for words in lines if words[:1] == ["python3"] and "generate_test_dataset" in words[1]]


def test_readme_official_commands_verbatim(workdir):
    """The official README's STP, OG+STP, DTP and OG+DTP commands (and --use_json True) resolve
    verbatim, the DTP/OG ones with their /path/to/unet/model placeholder pointed at a real UNet."""
    commands = _readme_commands()
    scripts = [c[0].split("/")[1] for c in commands]
    assert scripts == ["generate_test_dataset_stp.py", "generate_test_dataset_stp.py", "generate_test_dataset_dtp.py",
                       "generate_test_dataset_opposite_guidance.py"]
    (workdir / "path" / "to" / "unet").mkdir(parents=True)
    (workdir / "path" / "to" / "unet" / "model").symlink_to(workdir / "sd-21-finetuned_LAION10K" / "unet")
    got = []
    for script, command in zip(scripts, commands):
        argv = [a.replace("/path/to/unet/model", "path/to/unet/model") for a in command[1:]] + ["--use_json", "True"]
        _parser(script).parse_args(command[1:])  # verbatim
        got.append(_settings(argv, METHOD[script]))
    stp, og_stp, dtp, og = got
    assert stp.guidance == G.static_transition(500, 0.0, 7.5) and stp.outdir.name == "LAION_10k_SDv21_0_500_7_5"
    assert og_stp.guidance == G.static_transition(650, -2.0, 7.5) and og_stp.label == "og-stp"
    assert dtp.guidance == G.dynamic_transition(1.0, 7.5) and dtp.unet_path is not None
    assert og.guidance == G.dynamic_transition(-7.5, 7.5, signal="latent_cosine", mode="exact")
    assert (dtp.prompt_set.exp, og.prompt_set.exp) == ("200_memorized", "sdv1_pretrained")


def test_stp_defaults_and_a_float_transition_step(workdir):
    s = _settings([], "stp")
    assert s.outdir.name == "LAION_10k_DCR_with_text_100000_0_500_7_5_else_cosine_1"
    assert s.guidance == G.static_transition(0, 7.5, 7.5)
    # officially a float, compared with whole-number timesteps: 500.5 switches where 500 does
    half = _settings(["--guidance_change_step", "500.5"], "stp").guidance
    ts = np.asarray(schedulers.make_scheduler("dpm++2m", SD1_SCHEDULER, 50).timesteps)
    assert int(np.asarray(G.plan(half, 1, ts).detector.index)[0]) == int(np.argmax(ts <= 500.5)) == int(np.argmax(ts <= 500))
    for bad in ("1000", "-1", "nan"):
        with pytest.raises(cli.CliError, match=re.escape(f"--guidance_change_step {float(bad):g}") + "( must be in|: guidance)"):
            _settings(["--guidance_change_step", bad], "stp")


def test_stp_switch_keeps_the_one_schedule():
    """The official STP script jumps to a 200-step schedule when t == --guidance_change_step (and, with
    a linspace timestep config, loops at t=500 forever); here the 50-step schedule runs to its end and
    the scale switches at the first timestep <= t."""
    ts = np.asarray(schedulers.make_scheduler("dpm++2m", SD1_SCHEDULER, 50).timesteps)
    t = int(ts[20])  # a transition step that is exactly one of the timesteps
    p = G.plan(G.static_transition(t, 0.0, 7.5), 1, ts)
    assert p.before.shape == (1, 50) and int(np.asarray(p.detector.index)[0]) == 20


def _official_stp_steps(ts50: list, ts200: list, change: float, cap: int = 1000) -> int | None:
    """The official STP script's timestep loop, restated: UNet calls until the end, or None if it
    is still running after ``cap`` calls (``t == change`` jumps to the closest step of the 200-step
    schedule without advancing, so it meets ``t == change`` again whenever both schedules hold it)."""
    ts, t_index, calls = ts50, 0, 0
    while t_index < len(ts):
        t = ts[t_index]
        t_index += 1
        calls += 1
        if calls > cap:
            return None
        if t == change:
            ts = ts200
            t_index = min(range(len(ts)), key=lambda i: abs(ts[i] - t))
    return calls


@pytest.mark.parametrize("spacing, hangs", [
    ("leading", [77, 153, 229, 305, 381, 457, 533, 609, 685, 761]),  # 76j + 1: steps 19k+1 and 4k+1
    ("linspace", "every timestep of the 50-step schedule"),
])
def test_stp_official_jump_hangs_where_both_schedules_meet(spacing, hangs):
    """The official STP script hangs for every --guidance_change_step on both the 50- and the 200-step
    schedule (linspace: each of the 50 timesteps, so the default 500; leading: 76j + 1); here the one
    50-step schedule runs to its end with the switch at the first timestep <= t."""
    config = {**SD1_SCHEDULER, "timestep_spacing": spacing}
    ts50 = np.asarray(schedulers.make_scheduler("dpm++2m", config, 50).timesteps).tolist()
    ts200 = np.asarray(schedulers.make_scheduler("dpm++2m", config, 200).timesteps).tolist()
    hanging = [t for t in range(1000) if _official_stp_steps(ts50, ts200, t) is None]
    assert hanging == (sorted(ts50) if spacing == "linspace" else hangs)
    assert (500 in hanging) == (spacing == "linspace")
    for t in hanging:
        p = G.plan(G.static_transition(t, 0.0, 7.5), 1, ts50)
        assert p.before.shape == (1, 50) and ts50[int(np.asarray(p.detector.index)[0])] == t


def test_dtp_and_og_honour_flags_the_official_scripts_ignore(workdir):
    """--CFG_scheduling (forced back to static every step there), --start_iter (always 0 there) and
    --scheduler (always DPM-Solver there) act here; --og_precision picks the official signal."""
    ts = np.asarray(schedulers.make_scheduler("dpm++2m", SD1_SCHEDULER, 50).timesteps)
    for method in ("dtp", "og-dtp"):
        s = _settings(["--CFG_scheduling", "linear", "--start_iter", "2", "--scheduler", "DDIM"], method)
        assert s.guidance.shape_before == "linear" and (s.start_iter, s.scheduler) == (2, "ddim")
        before = G.plan(s.guidance, 1, ts).before[0]
        np.testing.assert_allclose(before, s.scale_before * (1 - ts / 1000), atol=1e-6)
    og = _settings(["--og_precision", "official"], "og-dtp")
    assert og.guidance == G.dynamic_transition(-7.5, 7.5, signal="latent_cosine", precision="official")
    assert "--og_precision is not used by --method dtp" in list(_settings(["--og_precision", "official"], "dtp").warnings)


# ------------------------------------------------------------------ README: differences table


def _differences_rows() -> list:
    text = (REPO / "README.md").read_text()
    section = text.split("## Differences from the official scripts", 1)[1].split("\n## ", 1)[0]
    table = section.split("\n|", 1)[1].split("\n\n", 1)[0]  # the first table of the section
    rows = [re.split(r"(?<!\\)\|", line.strip().strip("|")) for line in ("|" + table).splitlines()]
    rows = [[cell.strip() for cell in row] for row in rows]
    assert rows[0] == ["behaviour", "official script", "here", "why", "test"], rows[0]
    assert all(len(row) == 5 for row in rows), [row[0] for row in rows if len(row) != 5]
    return rows[2:]


def test_readme_differences_table_rows_name_covering_tests():
    rows = _differences_rows()
    assert len(rows) >= 17
    behaviours = " ".join(r[0] for r in rows)
    for topic in ("cosine", "set_timesteps(200)", "sign", "exit(0)", "`exp`", "`cads`", "local_sd_pipeline", "glob",
                  "--CFG_scheduling", "--use_json", "--outdir", "--guidance_scale", "--guidance_change_step",
                  "--start_iter", "--cads", "--scheduler", "--unet_path"):
        assert topic in behaviours, topic
    for row in rows:
        refs = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", row[4])
        assert refs, row[0]
        for path, name in refs:
            assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), f"{path}::{name}"
