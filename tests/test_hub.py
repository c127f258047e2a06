"""Hub model ids against a fake Hub on 127.0.0.1 (tests/hub_server.py): the first download (only the
files a model needs, a progress bar), a second resolve with zero requests, a revision, a variant, 401 /
404 / unknown revision / no server / offline as one line, a connection dropped mid-file and resumed,
and load_pipeline / the paper script on "org/tiny-model". Nothing but the local server is reached:
HF_ENDPOINT points at it, HF_HOME and XDG_CACHE_HOME are per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hub_server import FakeHub

from cfgbasin_jax.loading import hub

REPO = "org/tiny-model"
NEEDED = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
          "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
          "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
          "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]


@pytest.fixture(scope="module")
def repo_folder(tiny_sd1, tmp_path_factory):
    """tiny_sd1 as a Hub repo: plus files a download must skip (a .bin twin, a root checkpoint, a
    safety checker) and an fp16 variant of the UNet."""
    root = tmp_path_factory.mktemp("hub") / "repo"
    shutil.copytree(tiny_sd1.path, root)
    (root / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not needed")
    (root / "sd-v1-4.ckpt").write_bytes(b"not needed")
    (root / "safety_checker").mkdir()
    (root / "safety_checker" / "config.json").write_text("{}")
    (root / "safety_checker" / "model.safetensors").write_bytes(b"not needed")
    shutil.copy(root / "unet" / "diffusion_pytorch_model.safetensors", root / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    return root


@pytest.fixture
def fake_hub(repo_folder, monkeypatch, tmp_path):
    server = FakeHub().start()
    server.commit = server.add(REPO, repo_folder)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("CFGBASIN_JAX_CONVERSION_CACHE", "0")
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    yield server
    server.stop()


def downloaded(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_select_files_restated():
    """The selection rule on a listing, restated: per folder configs + one format, variant first."""
    listing = ["model_index.json", "sd.ckpt", "unet/config.json", "unet/diffusion_pytorch_model.bin",
               "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
               "vae/config.json", "vae/diffusion_pytorch_model.bin", "safety_checker/model.safetensors",
               "text_encoder/config.json", "text_encoder/model-00001-of-00002.safetensors",
               "text_encoder/model-00002-of-00002.safetensors", "text_encoder/model.safetensors.index.json",
               "text_encoder/flax_model.msgpack"]
    common = ["model_index.json", "text_encoder/config.json", "text_encoder/model-00001-of-00002.safetensors",
              "text_encoder/model-00002-of-00002.safetensors", "text_encoder/model.safetensors.index.json",
              "unet/config.json", "vae/config.json", "vae/diffusion_pytorch_model.bin"]
    assert hub.select_files(listing) == sorted(common + ["unet/diffusion_pytorch_model.safetensors"])
    assert hub.select_files(listing, "fp16") == sorted(common + ["unet/diffusion_pytorch_model.fp16.safetensors"])
    clip = ["config.json", "tokenizer.json", "vocab.json", "merges.txt", "pytorch_model.bin", "flax_model.msgpack",
            "tf_model.h5"]
    assert hub.select_files(clip) == ["config.json", "merges.txt", "pytorch_model.bin", "tokenizer.json", "vocab.json"]
    with pytest.raises(hub.HubError):
        hub.select_files(["README.md"])


def test_first_download_then_zero_requests(fake_hub, capfd):
    folder = hub.resolve(REPO)
    assert downloaded(folder) == NEEDED
    assert "Fetching" in capfd.readouterr().err  # huggingface_hub's progress bar
    got = [r for r in fake_hub.requests if r[0] == "GET" and "/resolve/" in r[1]]
    assert len(got) == len(NEEDED)
    before = len(fake_hub.requests)
    assert hub.resolve(REPO) == folder
    assert len(fake_hub.requests) == before  # the second resolve makes no request


def test_revision_and_variant(fake_hub, tmp_path, repo_folder):
    other = tmp_path / "v2"
    shutil.copytree(repo_folder, other)
    (other / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDIMScheduler", "v": 2}')
    commit = fake_hub.add(REPO, other, revision="v2")
    folder = hub.resolve(REPO, revision="v2")
    assert folder.name == commit and "DDIMScheduler" in (folder / "scheduler" / "scheduler_config.json").read_text()
    fp16 = hub.resolve(REPO, variant="fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in downloaded(fp16)
    assert not (fp16 / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert (fp16 / "vae" / "diffusion_pytorch_model.safetensors").is_file()  # no fp16 VAE: the plain one


@pytest.mark.parametrize("case, expect", [
    ("private", "hf auth login"), ("missing", "not found"), ("revision", "revision 'nope' not found"),
    ("down", "check the network"), ("offline", "HF_HUB_OFFLINE=1")])
def test_failures_give_one_line_and_write_nothing(fake_hub, monkeypatch, case, expect):
    repo, revision = REPO, None
    if case == "private":
        fake_hub.private.add(REPO)
    elif case == "missing":
        repo = "org/none"
    elif case == "revision":
        revision = "nope"
    elif case == "down":
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    elif case == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubError) as info:
        hub.resolve(repo, revision=revision)
    message = str(info.value)
    assert "\n" not in message and repo in message and expect in message, message
    snapshots = Path(os.environ["HF_HOME"]) / "hub" / "models--org--tiny-model" / "snapshots"
    assert not snapshots.exists() or not any(snapshots.rglob("*.safetensors"))


def test_token_opens_a_private_repo(fake_hub, monkeypatch):
    fake_hub.private.add(REPO)
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)
    assert downloaded(hub.resolve(REPO)) == NEEDED


def test_dropped_connection_resumes(fake_hub, monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants

    # huggingface_hub keeps what it received in whole chunks (10 MiB): small ones, for a small file
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    name = "unet/diffusion_pytorch_model.safetensors"
    fake_hub.drop_once.add(f"{REPO}/{name}")
    try:
        folder = hub.resolve(REPO)  # huggingface_hub >= 1 resumes within the call
    except hub.HubError as err:  # 0.x keeps the partial file, resumed by the next call
        assert huggingface_hub.__version__.startswith("0.") and "\n" not in str(err)
        folder = hub.resolve(REPO)
    assert (folder / name).read_bytes() == (fake_hub.repos[REPO]["main"][1] / name).read_bytes()
    ranges = [r[2] for r in fake_hub.requests if r[0] == "GET" and r[1].endswith(name)]
    assert len(ranges) == 2 and ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"


def test_load_pipeline_and_paper_script_from_a_hub_id(fake_hub, tiny_sd1, tmp_path):
    import cfgbasin_jax

    pipe = cfgbasin_jax.load_pipeline(REPO)
    local = cfgbasin_jax.load_pipeline(tiny_sd1.path)
    assert all(np.array_equal(a, b) for a, b in zip(*(jax_leaves(p) for p in (pipe, local))))
    before = len(fake_hub.requests)
    out = tmp_path / "out"
    script = Path(__file__).resolve().parents[1] / "scripts" / "generate_test_dataset_opposite_guidance.py"
    result = subprocess.run([sys.executable, str(script), "--pretrained_model_name_or_path", REPO, "--outdir", str(out),
                             "--num_inference_steps", "3", "--end_iter", "1", "--img_size", "16", "--progress", "none",
                             "--no_compilation_cache"],
                            capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(fake_hub.requests) == before  # the script found the snapshot in the cache
    assert len(list((out / "Images").glob("*.png"))) >= 1


def jax_leaves(pipe):
    import jax

    return jax.tree.leaves(pipe.params)


def test_cli_failure_is_one_line_exit_2(fake_hub, tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "generate_test_dataset_opposite_guidance.py"
    result = subprocess.run([sys.executable, str(script), "--pretrained_model_name_or_path", "org/none",
                             "--outdir", str(tmp_path / "out")], capture_output=True, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "org/none" in lines[0] and "not found" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_pixel_model_repo_for_the_demo(fake_hub):
    """The demo's --model takes a Hub id: a pixel-space model's repo gives model.json, the params and
    the tokenizer (not the training log and plots beside them)."""
    import cfgbasin_jax
    from cfgbasin_jax.apps import demo

    fake_hub.add("org/toy", cfgbasin_jax.TOY_MODEL)
    folder = demo._resolve_model("org/toy")
    assert downloaded(folder) == ["model.json", "params.safetensors", "tokenizer/merges.txt",
                                  "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
                                  "tokenizer/vocab.json"]
    with pytest.raises(demo.DemoError, match="--model org/missing .*not found"):
        demo._resolve_model("org/missing")


# ------------------------------------------------------------------ --revision / --variant on the command line


def test_select_files_sharded_variant_restated():
    """diffusers' sharded variant names (save_pretrained(variant="fp16", max_shard_size=...)), current and
    legacy: the variant's index and shards, not the plain ones; without a variant the plain ones."""
    plain = ["unet/diffusion_pytorch_model.safetensors"]
    current = ["unet/diffusion_pytorch_model.safetensors.index.fp16.json",
               "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
               "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors"]
    legacy = ["unet/diffusion_pytorch_model.safetensors.fp16.index.json",
              "unet/diffusion_pytorch_model-00001-of-00002.fp16.safetensors",
              "unet/diffusion_pytorch_model-00002-of-00002.fp16.safetensors"]
    for fp16 in (current, legacy):
        listing = ["unet/config.json", *plain, *fp16]
        assert hub.select_files(listing, "fp16") == sorted(["unet/config.json", *fp16])
        assert hub.select_files(listing) == ["unet/config.json", *plain]
        assert hub.select_files(listing, "bf16") == ["unet/config.json", *plain]  # no such variant: the plain


@pytest.fixture(scope="module")
def fp16_repo(repo_folder, tmp_path_factory):
    """repo_folder whose UNet fp16 variant holds real float16 weights (other bytes than the plain ones)."""
    from safetensors.numpy import load_file, save_file

    root = tmp_path_factory.mktemp("hub_fp16") / "repo"
    shutil.copytree(repo_folder, root)
    tensors = load_file(root / "unet" / "diffusion_pytorch_model.safetensors")
    save_file({k: v.astype(np.float16) for k, v in tensors.items()}, root / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    return root


GENERATE = ["--method", "cfg", "--exp", "imagenette", "--end_iter", "1", "--num_inference_steps", "3", "--img_size",
            "16", "--progress", "none", "--plot", "none", "--no_compilation_cache"]


def test_generate_with_revision_and_variant(fake_hub, fp16_repo, tmp_path, monkeypatch, capsys):
    """cfgbasin-generate --revision v2 --variant fp16 downloads v2's files with the fp16 UNet (not the
    plain one), loads the fp16 weights, and the run's identity holds both (the snapshot folder is named
    by v2's commit; the fingerprint is of the files read): a resume without either flag is refused."""
    import json

    from cfgbasin_jax import loading
    from cfgbasin_jax.apps import generate as cli
    from cfgbasin_jax.runs import runner

    commit = fake_hub.add(REPO, fp16_repo, revision="v2")
    asked = []
    original = runner.PipelineCache.get

    def spy(self, *args, **kwargs):
        asked.append(kwargs.get("variant", args[4] if len(args) > 4 else None))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(runner.PipelineCache, "get", spy)
    out = tmp_path / "out"
    argv = GENERATE + ["--pretrained_model_name_or_path", REPO, "--outdir", str(out)]
    assert cli.main(argv + ["--revision", "v2", "--variant", "fp16"]) == 0, capsys.readouterr().err
    snapshot = Path(os.environ["HF_HOME"]) / "hub" / "models--org--tiny-model" / "snapshots" / commit
    got = downloaded(snapshot)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in got and "unet/diffusion_pytorch_model.safetensors" not in got
    assert not any(r[1].startswith(f"/{REPO}/resolve/main/") for r in fake_hub.requests)
    assert asked == ["fp16"]  # the runner loads the variant's weights
    identity = json.loads((out / "config.json").read_text())["identity"]
    assert Path(identity["model"]).name == commit
    assert identity["model_fingerprint"] == loading.model_fingerprint(snapshot, "fp16")
    assert len(list((out / "Images").glob("*.png"))) == 1
    capsys.readouterr()

    files = downloaded(out)
    # --revision dropped: main's snapshot (model); --variant dropped: the plain UNet (model_fingerprint only)
    for kept, key in ((["--variant", "fp16"], "model"), (["--revision", "v2"], "model_fingerprint")):
        assert cli.main(argv + kept) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Fetching" not in line]  # no bar
        assert len(err) == 1 and "different configuration" in err[0] and f"{key}: " in err[0], err
        assert downloaded(out) == files


def test_generate_bad_revision_is_one_line_exit_2(fake_hub, tmp_path, capsys):
    from cfgbasin_jax.apps import generate as cli

    out = tmp_path / "out"
    argv = GENERATE + ["--pretrained_model_name_or_path", REPO, "--outdir", str(out), "--revision", "nope"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and REPO in err[0] and "--revision" in err[0] and "'nope' not found" in err[0], err
    assert not out.exists()
    snapshots = Path(os.environ["HF_HOME"]) / "hub" / "models--org--tiny-model" / "snapshots"
    assert not snapshots.exists() or not any(snapshots.rglob("*.safetensors"))
