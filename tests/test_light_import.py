"""Nothing on the import / load / sample path imports torch, diffusers or transformers (the tokenizer stands
on the `tokenizers` library), even where all are installed.

Each check runs in a fresh interpreter under tests/blocked_imports.py: any attempt to import torch,
diffusers or transformers (also one the code would catch and work around) fails the run. The .bin reader is the one
place that needs torch: without it, one ConversionError names the file.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_sd import write_sd_folder

BLOCKER = Path(__file__).resolve().parent / "blocked_imports.py"
BLOCKED = "torch,diffusers,transformers"
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def blocked_command(*args, allow_attempts=False) -> list:
    return [sys.executable, str(BLOCKER), *(["--allow-attempts"] if allow_attempts else []), BLOCKED, *args]


def run_blocked(*args, allow_attempts=False, timeout=600):
    return subprocess.run(blocked_command(*args, allow_attempts=allow_attempts), capture_output=True, text=True,
                          env=ENV, timeout=timeout)


LOAD_AND_GENERATE = """
import pkgutil, sys
import jax
import numpy as np
import cfgbasin_jax

assert "jax" in sys.modules and "flax" in sys.modules
converted = cfgbasin_jax.load_pipeline({converted!r})
folder = cfgbasin_jax.load_pipeline({folder!r})   # diffusers folder with safetensors, converted in memory
leaves = [jax.tree.leaves(p.params) for p in (converted, folder)]
assert len(leaves[0]) == len(leaves[1]) and all(np.array_equal(a, b) for a, b in zip(*leaves))
images = converted.generate(["a photo of a cat"], num_inference_steps=2, seed=0, scheduler="ddim").images
assert images.shape == (1, 16, 16, 3) and images.dtype == np.uint8
# the tokenizer stands on the `tokenizers` library: transformers is not needed to load and sample
assert "transformers" not in sys.modules, "transformers imported"

# every library module imports without them (cfgbasin_jax.convert.sscd reads TorchScript: torch on use only)
import cfgbasin_jax.convert
for package in (cfgbasin_jax, cfgbasin_jax.convert):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        __import__(info.name)
print("ok")
"""


DEMO_FLAGS = ["--methods", "CFG", "STP", "Aug", "--stp_t", "500", "--steps", "3", "--num_mem_prompts", "1",
              "--num_plain_prompts", "1", "--samples_per_prompt", "1"]


def start_early(request, items):
    """The two long runs below, started at the session's first test (conftest's `early`)."""
    from early_start import Started

    names = {item.originalname for item in items}
    folder = request.getfixturevalue("tmp_path_factory").mktemp("light_import")
    jobs = {}
    if "test_load_generate_and_every_module_without_torch_or_diffusers" in names:
        tiny_sd1, converted = request.getfixturevalue("tiny_sd1"), request.getfixturevalue("tiny_sd1_converted")
        code = LOAD_AND_GENERATE.format(converted=str(converted), folder=str(tiny_sd1.path))
        jobs["light_import_load"] = Started([blocked_command("-c", code)], ENV, folder / "load")
    if "test_demo_without_torch_or_diffusers" in names:
        demo = blocked_command("-m", "cfgbasin_jax.apps.demo", "--outdir", folder / "demo" / "out", *DEMO_FLAGS)
        jobs["light_import_demo"] = Started([demo], ENV, folder / "demo")
    return jobs


def test_load_generate_and_every_module_without_torch_or_diffusers(early):
    (result,) = early["light_import_load"].wait(timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_demo_without_torch_or_diffusers(early):
    """cfgbasin-demo on the shipped toy, reduced (3 methods, 3 steps, 2 prompts; the full demo is
    tests/test_demo.py): the baselines module and the report writer are on this path too."""
    job = early["light_import_demo"]
    (result,) = job.wait(timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (job.logs / "out" / "report.md").read_text()
    assert all(f"| {name} |" in report for name in ("CFG", "STP", "Aug"))


def test_bin_weights_without_torch_name_the_file(tiny_sd1, tmp_path):
    src = write_sd_folder(tmp_path / "sd_bin", "sd1", tiny_sd1.unet, tiny_sd1.vae, tiny_sd1.text_encoder, "bin")
    code = f"""
from cfgbasin_jax.convert import ConversionError
from cfgbasin_jax.loading import load_unet_folder
try:
    load_unet_folder({str(src / "unet")!r})
except ConversionError as err:
    print("ConversionError:", err)
"""
    result = run_blocked("-c", code, allow_attempts=True)
    assert result.returncode == 0, result.stderr[-3000:]
    message = result.stdout.strip()
    assert message.count("\n") == 0 and message.startswith("ConversionError:")
    assert str(src / "unet" / "diffusion_pytorch_model.bin") in message and "torch" in message


@pytest.mark.parametrize("snippet", ["import torch", "import diffusers.models", "import importlib; importlib.import_module('torch.nn')",
                                     "from transformers import CLIPTokenizer"])
def test_the_blocker_blocks(snippet):
    """The check itself can fail: a direct or a caught import is reported."""
    assert run_blocked("-c", snippet, timeout=60).returncode != 0
    caught = run_blocked("-c", f"try:\n    {snippet}\nexcept ImportError:\n    pass", timeout=60)
    assert caught.returncode == 3 and "attempted" in caught.stderr
