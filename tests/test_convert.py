"""SD weight conversion and loading against PyTorch diffusers / transformers on tiny random models.

Measured on the tiny models (max abs error / max |reference|, sd1 / sd2):
  float32: UNet 1.6e-5 to 3.5e-5 with our UNet (cfgbasin_jax.models.unet, exact-gelu GEGLU; diffusers'
           Flax UNet, whose GEGLU uses the tanh approximation, gave 5.5e-5 / 4.7e-5), VAE
           (cfgbasin_jax.models.vae) encode mean and logvar 1.1e-6 to 1.4e-6, decode 1.6e-6 / 2.4e-6, text
           encoder 3.2e-7 / 4.0e-7. Bound: FP32_RTOL = 1e-4.
  bfloat16 (params and compute): 9e-3 to 2.2e-2 on every output. Bound: BF16_RTOL = 5e-2.
"""

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from tiny_sd import write_sd_folder

from cfgbasin_jax.models import tiny
from cfgbasin_jax.convert import ConversionError
from cfgbasin_jax.convert.sd_folder import convert
from cfgbasin_jax.convert.__main__ import main as cli_main
from cfgbasin_jax.loading import COMPONENTS, is_converted, load_components
from cfgbasin_jax.models.converted import save_components
from cfgbasin_jax.models.builders import build_unet, component_param_shapes, param_shapes

FP32_RTOL = 1e-4
BF16_RTOL = 5e-2
OUTPUTS = ("unet", "vae_mean", "vae_logvar", "vae_decode", "text")
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on mars"]
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
UNET_KEY = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def tree_leaves_equal(a, b):
    flat_a, tree_a = jax.tree_util.tree_flatten(a)
    flat_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    return all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(flat_a, flat_b))


# --- shared inputs, PyTorch references, compiled Flax functions -------------------------------------


@pytest.fixture(scope="session")
def inputs(tiny_sd1):
    rng = np.random.default_rng(0)
    ids = tiny_sd1.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    return {
        "sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
        "timesteps": np.array([10, 700], dtype=np.int64),
        "states": rng.standard_normal((2, 5, 32)).astype(np.float32),
        "image": rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32),
        "latents": rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
        "ids": np.asarray(ids, dtype=np.int64),
    }


@torch.no_grad()
def torch_outputs(tiny_sd, x):
    """Reference outputs of the PyTorch modules, NCHW float32 numpy."""
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    posterior = tiny_sd.vae.encode(t["image"]).latent_dist
    return {
        "unet": tiny_sd.unet(t["sample"], t["timesteps"], t["states"]).sample.numpy(),
        "vae_mean": posterior.mean.numpy(),
        "vae_logvar": posterior.logvar.numpy(),
        "vae_decode": tiny_sd.vae.decode(t["latents"]).sample.numpy(),
        "text": tiny_sd.text_encoder(t["ids"]).last_hidden_state.numpy(),
    }


class FlaxFunctions:
    """Jitted apply functions, one set per (module, dtype); params are arguments, so every
    checkpoint with the same architecture reuses the compiled code."""

    def __init__(self):
        self._cache = {}

    def _fns(self, c):
        key = (repr(c.unet), repr(c.vae), repr(c.text_encoder), jnp.dtype(c.dtype).name)
        if key not in self._cache:
            unet, vae, text = c.unet, c.vae, c.text_encoder

            def encode(p, image):
                dist = vae.apply({"params": p}, image, method=vae.encode).latent_dist
                return dist.mean, dist.logvar  # NHWC

            def text_states(p, ids):
                positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
                return text.apply({"params": p}, ids, jnp.ones_like(ids), positions).last_hidden_state

            self._cache[key] = {
                "unet": jax.jit(lambda p, x, t, s: unet.apply({"params": p}, x, t, s).sample),
                "encode": jax.jit(encode),
                "decode": jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode).sample),
                "text": jax.jit(text_states),
            }
        return self._cache[key]

    def unet(self, c, x, params=None):
        fn = self._fns(c)["unet"]
        out = fn(params or c.params["unet"], jnp.asarray(x["sample"], c.dtype),
                 jnp.asarray(x["timesteps"], jnp.int32), jnp.asarray(x["states"], c.dtype))
        return np.asarray(out, np.float32)

    def outputs(self, c, x):
        fns = self._fns(c)
        mean, logvar = fns["encode"](c.params["vae"], jnp.asarray(x["image"], c.dtype))
        nchw = lambda a: np.asarray(a, np.float32).transpose(0, 3, 1, 2)  # noqa: E731
        return {
            "unet": self.unet(c, x),
            "vae_mean": nchw(mean),
            "vae_logvar": nchw(logvar),
            "vae_decode": np.asarray(fns["decode"](c.params["vae"], jnp.asarray(x["latents"], c.dtype)), np.float32),
            "text": np.asarray(fns["text"](c.params["text_encoder"], jnp.asarray(x["ids"], jnp.int32)), np.float32),
        }


@pytest.fixture(scope="session")
def flax_fns():
    return FlaxFunctions()


@pytest.fixture(scope="session")
def tiny_sd2_converted(tiny_sd2, tmp_path_factory):
    return convert(tiny_sd2.path, tmp_path_factory.mktemp("tiny_sd2_converted") / "dst")


@pytest.fixture(scope="session")
def references(tiny_sd1, tiny_sd2, inputs):
    return {"sd1": torch_outputs(tiny_sd1, inputs), "sd2": torch_outputs(tiny_sd2, inputs)}


@pytest.fixture(scope="session")
def loaded(request, tiny_sd1_converted, tiny_sd2_converted):
    """(variant, dtype) -> Components loaded from the converted directory (cached)."""
    paths = {"sd1": tiny_sd1_converted, "sd2": tiny_sd2_converted}
    cache = {}

    def get(variant, dtype):
        if (variant, dtype) not in cache:
            cache[variant, dtype] = load_components(paths[variant], dtype=dtype)
        return cache[variant, dtype]

    return get


@pytest.fixture(scope="session")
def flax_outputs(loaded, flax_fns, inputs):
    cache = {}

    def get(variant, dtype):
        if (variant, dtype) not in cache:
            cache[variant, dtype] = flax_fns.outputs(loaded(variant, dtype), inputs)
        return cache[variant, dtype]

    return get


# --- parity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_float32_matches_pytorch(variant, output, flax_outputs, references):
    err = rel_err(flax_outputs(variant, "float32")[output], references[variant][output])
    assert err <= FP32_RTOL, f"{variant} {output}: {err:.2e}"


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_bfloat16_within_documented_tolerance(variant, output, flax_outputs, references, loaded):
    components = loaded(variant, "bfloat16")
    assert components.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(components.params))
    err = rel_err(flax_outputs(variant, "bfloat16")[output], references[variant][output])
    assert err <= BF16_RTOL, f"{variant} {output}: {err:.2e}"


def test_variants_differ_where_sd2_differs(loaded, references):
    """sd2 exercises linear projections, per-block head counts, gelu and v_prediction."""
    sd1, sd2 = loaded("sd1", "float32"), loaded("sd2", "float32")
    assert sd2.configs["unet"]["use_linear_projection"] and sd2.configs["unet"]["attention_head_dim"] == [2, 4]
    assert sd2.configs["text_encoder"]["hidden_act"] == "gelu"
    assert sd1.configs["text_encoder"]["hidden_act"] == "quick_gelu"
    assert sd2.scheduler_config["prediction_type"] == "v_prediction"
    assert sd1.scheduler_config == tiny.SD1_SCHEDULER
    assert sd2.params["unet"]["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].ndim == 2
    assert sd1.params["unet"]["down_blocks_0"]["attentions_0"]["proj_in"]["kernel"].ndim == 4
    assert rel_err(references["sd1"]["unet"], references["sd2"]["unet"]) > 0.1


def test_attention_head_dim_counts_heads_in_both_libraries(tiny_sd2):
    """diffusers' quirk: attention_head_dim is the number of heads, in PyTorch and in Flax."""
    block = tiny_sd2.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert block.attn1.heads == 2
    assert tiny_sd2.unet.mid_block.attentions[0].transformer_blocks[0].attn1.heads == 4
    assert build_unet(tiny.tiny_configs("sd2")["unet"]).attention_head_dim == (2, 4)


def test_bin_weights_load_like_safetensors(tiny_sd1, tmp_path, loaded, flax_fns, inputs, references):
    src = write_sd_folder(tmp_path / "sd_bin", "sd1", tiny_sd1.unet, tiny_sd1.vae, tiny_sd1.text_encoder, "bin")
    assert not list(src.rglob("*.safetensors")) and len(list(src.rglob("*.bin"))) == 3
    components = load_components(src)
    assert tree_leaves_equal(components.params, loaded("sd1", "float32").params)
    assert rel_err(flax_fns.unet(components, inputs), references["sd1"]["unet"]) <= FP32_RTOL


def test_safetensors_win_over_bin_with_torch_blocked(tiny_sd1, tiny_sd1_converted, tmp_path):
    """A folder holding both weight files per component (issue 26: untested): the safetensors are
    read and torch is never imported (tests/blocked_imports.py fails on any attempt). The .bin files
    hold other weights (every tensor + 1), so reading them would change the content fingerprint."""
    from safetensors.torch import load_file as load_torch

    src = tmp_path / "both"
    shutil.copytree(tiny_sd1.path, src)
    for kind, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        other = {k: v + 1 if v.is_floating_point() else v for k, v in load_torch(src / kind / f"{stem}.safetensors").items()}
        torch.save(other, src / kind / f"{'pytorch_model' if kind == 'text_encoder' else stem}.bin")
    assert len(list(src.rglob("*.bin"))) == 3 and len(list(src.rglob("*.safetensors"))) == 3
    dst = tmp_path / "dst"
    code = f"from cfgbasin_jax.convert.sd_folder import convert; convert({str(src)!r}, {str(dst)!r})"
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "blocked_imports.py"), "torch", "-c", code],
                          capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    fingerprint = lambda d: json.loads((Path(d) / "cfgbasin_jax.json").read_text())["fingerprint"]  # noqa: E731
    assert fingerprint(dst) == fingerprint(tiny_sd1_converted)


def test_round_trip_converted_equals_in_memory(tiny_sd1, tiny_sd1_converted, loaded):
    assert is_converted(tiny_sd1_converted) and not is_converted(tiny_sd1.path)
    in_memory = load_components(tiny_sd1.path)
    converted = loaded("sd1", "float32")
    assert tree_leaves_equal(converted.params, in_memory.params)
    assert converted.configs == in_memory.configs
    assert converted.scheduler_config == in_memory.scheduler_config
    assert converted.tokenizer(PROMPTS).input_ids == in_memory.tokenizer(PROMPTS).input_ids
    assert converted.tokenizer.model_max_length == 77
    assert repr(converted.unet) == repr(in_memory.unet) and repr(converted.vae) == repr(in_memory.vae)
    assert converted.source == str(tiny_sd1_converted) and in_memory.source == str(tiny_sd1.path)


def test_bfloat16_conversion_stores_bfloat16(tiny_sd1, tmp_path, loaded):
    assert cli_main([str(tiny_sd1.path), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "bf16" / "cfgbasin_jax.json").read_text())["dtype"] == "bfloat16"
    stored = load_components(tmp_path / "bf16", dtype="bfloat16")
    assert tree_leaves_equal(stored.params, loaded("sd1", "bfloat16").params)


# --- UNet swap ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def finetuned_sd1(tmp_path_factory):
    from tiny_sd import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("finetuned") / "sd", "sd1", "safetensors", seed=1)


def test_unet_swap_cli(tiny_sd1, finetuned_sd1, tmp_path, loaded, flax_fns, inputs, references):
    dst = tmp_path / "swapped"
    assert cli_main([str(tiny_sd1.path), str(dst), "--unet", str(finetuned_sd1.path / "unet")]) == 0
    swapped = load_components(dst)
    base = loaded("sd1", "float32")
    assert tree_leaves_equal(swapped.params["vae"], base.params["vae"])
    assert tree_leaves_equal(swapped.params["text_encoder"], base.params["text_encoder"])
    ours = flax_fns.unet(swapped, inputs)
    ref = torch_outputs(finetuned_sd1, inputs)["unet"]
    assert rel_err(ours, ref) <= FP32_RTOL
    assert rel_err(ours, references["sd1"]["unet"]) > 0.1  # really the other UNet

    in_memory = load_components(tiny_sd1.path, unet_path=finetuned_sd1.path / "unet")
    assert tree_leaves_equal(in_memory.params, swapped.params)
    from_converted = load_components(dst, unet_path=tiny_sd1.path / "unet")
    assert tree_leaves_equal(from_converted.params["unet"], base.params["unet"])


# --- checkpoint variations that must still load -------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_old_vae_attention_names_and_position_ids_buffer(tiny_sd1, tmp_path, loaded):
    src = _copy(tiny_sd1.path, tmp_path / "old")
    vae_file = src / "vae" / "diffusion_pytorch_model.safetensors"
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {}
    for key, value in load_file(vae_file).items():
        for new_name, old_name in renames.items():
            key = key.replace(new_name, old_name)
        old[key] = value
    assert "encoder.mid_block.attentions.0.query.weight" in old
    save_file(old, vae_file)
    text_file = src / "text_encoder" / "model.safetensors"  # transformers < 5: `text_model.` keys + position_ids
    text = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in load_file(text_file).items()}
    text["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_file(text, text_file)
    assert tree_leaves_equal(load_components(src).params, loaded("sd1", "float32").params)


def test_text_encoder_keys_with_or_without_the_text_model_prefix():
    """transformers 5 saves CLIPTextModel without the `text_model.` prefix that every SD checkpoint has."""
    from cfgbasin_jax.convert.mapping import with_prefix
    from cfgbasin_jax.convert.weights import StateDict

    def state(*keys):
        return StateDict.from_arrays({k: np.full(1, len(k), np.float32) for k in keys}, "w")

    new = with_prefix(state("embeddings.token_embedding.weight", "text_model.embeddings.position_ids"), "text_model")
    assert set(new.specs) == set(new.files) == {"text_model.embeddings.token_embedding.weight",
                                                 "text_model.embeddings.position_ids"}
    # a renamed key still reads the tensor stored under its old name
    assert new.read("text_model.embeddings.token_embedding.weight")[0] == len("embeddings.token_embedding.weight")
    old = state("text_model.embeddings.token_embedding.weight")
    assert with_prefix(old, "text_model") is old


def test_sharded_safetensors(tiny_sd1, tmp_path, loaded):
    src = _copy(tiny_sd1.path, tmp_path / "sharded")
    unet_file = src / UNET_FILE
    tensors = load_file(unet_file)
    keys = sorted(tensors)
    shards = {"shard-1.safetensors": keys[: len(keys) // 2], "shard-2.safetensors": keys[len(keys) // 2 :]}
    for name, shard_keys in shards.items():
        save_file({k: tensors[k] for k in shard_keys}, src / "unet" / name)
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (src / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    unet_file.unlink()
    assert tree_leaves_equal(load_components(src).params, loaded("sd1", "float32").params)


# --- variants and shards, named as diffusers names them ------------------------------------------------


@pytest.fixture(scope="module")
def fp16_unet(tiny_sd1):
    """tiny_sd1's UNet shifted by 0.01 and cast to float16: a variant with other weights than the plain."""
    import copy

    unet = copy.deepcopy(tiny_sd1.unet)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01)
    return unet.half()


def _unet_params(folder, variant=None):
    from cfgbasin_jax.convert.sd_folder import load_unet_folder

    return load_unet_folder(folder, variant=variant)[2]


def test_weight_names_restated():
    from cfgbasin_jax.convert.weight_names import parse

    table = {  # name -> (kind, variant), the names diffusers' _add_variant and shard patterns give
        "diffusion_pytorch_model.safetensors": ("file", None),
        "diffusion_pytorch_model.fp16.safetensors": ("file", "fp16"),
        "model.safetensors.index.json": ("index", None),
        "model-00001-of-00002.safetensors": ("shard", None),
        "diffusion_pytorch_model.safetensors.index.fp16.json": ("index", "fp16"),
        "diffusion_pytorch_model.fp16-00002-of-00003.safetensors": ("shard", "fp16"),
        "diffusion_pytorch_model.bin.fp16.index.json": ("index", "fp16"),  # legacy
        "diffusion_pytorch_model-00001-of-00002.fp16.bin": ("shard", "fp16"),  # legacy
    }
    for name, (kind, variant) in table.items():
        parsed = parse(name)
        assert (parsed.kind, parsed.variant) == (kind, variant), name
    assert parse("config.json") is None and parse("tokenizer.json") is None


def test_sharded_variant_the_diffusers_way(tiny_sd1, fp16_unet, tmp_path):
    """save_pretrained(variant="fp16", max_shard_size=...) beside the plain weights: variant="fp16" reads
    the fp16 index and its shards (equal to the same weights saved whole under the plain name), no
    variant the plain file; diffusers' own loader reads the folder back (the names are diffusers')."""
    from diffusers import UNet2DConditionModel

    unet_dir = _copy(tiny_sd1.path / "unet", tmp_path / "unet")
    fp16_unet.save_pretrained(unet_dir, variant="fp16", max_shard_size="300KB")
    names = sorted(p.name for p in unet_dir.iterdir())
    shards = [n for n in names if n.startswith("diffusion_pytorch_model.fp16-")]
    assert "diffusion_pytorch_model.safetensors.index.fp16.json" in names and len(shards) >= 2, names
    back = UNet2DConditionModel.from_pretrained(unet_dir, variant="fp16").state_dict()
    assert all(torch.equal(back[k], v) for k, v in fp16_unet.state_dict().items())

    fp16_unet.save_pretrained(tmp_path / "whole")  # the reference: one plain file
    reference = _unet_params(tmp_path / "whole")
    assert tree_leaves_equal(_unet_params(unet_dir, "fp16"), reference)
    assert tree_leaves_equal(_unet_params(unet_dir), _unet_params(tiny_sd1.path / "unet"))
    assert not tree_leaves_equal(_unet_params(unet_dir), reference)

    # the legacy names (diffusers < 0.27): <stem>-0000k-of-0000n.fp16.safetensors, <stem>.safetensors.fp16.index.json
    legacy = _copy(unet_dir, tmp_path / "legacy")
    index = json.loads((legacy / "diffusion_pytorch_model.safetensors.index.fp16.json").read_text())
    renamed = {n: n.replace(".fp16-", "-").replace(".safetensors", ".fp16.safetensors") for n in shards}
    for old, new in renamed.items():
        (legacy / old).rename(legacy / new)
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    (legacy / "diffusion_pytorch_model.safetensors.index.fp16.json").unlink()
    (legacy / "diffusion_pytorch_model.safetensors.fp16.index.json").write_text(json.dumps(index))
    assert tree_leaves_equal(_unet_params(legacy, "fp16"), reference)

    # without the plain file and without a variant: the one index (its shards are not "several files")
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    assert tree_leaves_equal(_unet_params(unet_dir), reference)
    with pytest.raises(ConversionError, match="no weight file"):  # neither that variant nor plain: no other variant
        _unet_params(unet_dir, "bf16")
    shutil.copy(tiny_sd1.path / UNET_FILE, unet_dir / "diffusion_pytorch_model.ema.safetensors")
    with pytest.raises(ConversionError, match="several weight files .*--variant"):
        _unet_params(unet_dir)
    assert tree_leaves_equal(_unet_params(unet_dir, "fp16"), reference)


def test_variant_cli(tiny_sd1, fp16_unet, tmp_path):
    """cfgbasin-convert --variant fp16 converts the fp16 files beside the plain ones: the same UNet as a
    folder holding those weights under the plain name; without --variant, the plain weights."""
    src = _copy(tiny_sd1.path, tmp_path / "src")
    fp16_unet.save_pretrained(src / "unet", variant="fp16")
    reference = _copy(tiny_sd1.path, tmp_path / "reference")
    fp16_unet.save_pretrained(reference / "unet")
    for folder, argv in [(src, ["--variant", "fp16"]), (reference, []), (src, [])]:
        assert cli_main([str(folder), str(tmp_path / f"{folder.name}{len(argv)}"), *argv]) == 0
    unet = {name: load_components(tmp_path / name).params["unet"] for name in ("src2", "reference0", "src0")}
    assert tree_leaves_equal(unet["src2"], unet["reference0"])
    assert not tree_leaves_equal(unet["src0"], unet["reference0"])


# --- bad input -----------------------------------------------------------------------------------------


def _edit_unet_weights(src: Path, edit) -> None:
    tensors = load_file(src / UNET_FILE)
    edit(tensors)
    save_file(tensors, src / UNET_FILE)


def _edit_unet_config(src: Path, **changes) -> None:
    path = src / "unet" / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


BAD_INPUTS = {
    "missing_subfolder": (lambda src: shutil.rmtree(src / "vae"), ["'vae/'", "{src}"]),
    "missing_weight_file": (
        lambda src: (src / UNET_FILE).unlink(),
        ["{src}/unet", "diffusion_pytorch_model.safetensors"],
    ),
    "missing_config": (lambda src: (src / "vae" / "config.json").unlink(), ["{src}/vae/config.json"]),
    "missing_key": (
        lambda src: _edit_unet_weights(src, lambda t: t.pop(UNET_KEY)),
        ["{src}/" + UNET_FILE, "missing parameter", UNET_KEY],
    ),
    "unexpected_key": (
        lambda src: _edit_unet_weights(src, lambda t: t.update({"down_blocks.0.extra.weight": np.ones(3, np.float32)})),
        ["{src}/" + UNET_FILE, "unexpected parameter", "down_blocks.0.extra.weight"],
    ),
    "shape_mismatch": (
        lambda src: _edit_unet_weights(src, lambda t: t.update({UNET_KEY: np.ones((32, 31), np.float32)})),
        ["{src}/" + UNET_FILE, UNET_KEY, "(32, 31)"],
    ),
    "unsupported_config": (lambda src: _edit_unet_config(src, class_embed_type="timestep"), ["class_embed_type"]),
    "unknown_block_type": (
        lambda src: _edit_unet_config(src, down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
        ["down_block_types", "SimpleCrossAttnDownBlock2D"],
    ),
    "config_mismatch": (lambda src: _edit_unet_config(src, cross_attention_dim=48), ["cross_attention_dim", "48"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_cleanly(case, tiny_sd1, tmp_path, capsys):
    mutate, expected = BAD_INPUTS[case]
    src = _copy(tiny_sd1.path, tmp_path / "src")
    mutate(src)
    expected = [e.format(src=src) for e in expected]

    with pytest.raises(ConversionError) as info:
        load_components(src)
    for text in expected:
        assert text in str(info.value), (text, str(info.value))

    dst = tmp_path / "out" / "dst"
    capsys.readouterr()
    assert cli_main([str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cfgbasin-convert: error:")
    for text in expected:
        assert text in err
    assert not dst.exists()
    assert not dst.parent.exists() or not list(dst.parent.iterdir())


def test_unknown_dtype(tiny_sd1, tmp_path, capsys):
    with pytest.raises(ConversionError, match="float8"):
        load_components(tiny_sd1.path, dtype="float8")
    assert cli_main([str(tiny_sd1.path), str(tmp_path / "dst"), "--dtype", "float8"]) == 2
    err = capsys.readouterr().err
    assert "--dtype" in err and "float8" in err
    assert not (tmp_path / "dst").exists()


def test_existing_destination_is_kept(tiny_sd1, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert cli_main([str(tiny_sd1.path), str(dst)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_failure_while_writing_leaves_nothing(tiny_sd1, tmp_path, monkeypatch):
    from cfgbasin_jax.models import converted

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(converted, "save_tokenizer", broken)  # the tokenizer is our ClipTokenizer now
    with pytest.raises(OSError, match="disk full"):
        convert(tiny_sd1.path, tmp_path / "dst")
    assert list(tmp_path.iterdir()) == []


def test_console_script_exit_code(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "cfgbasin_jax.convert", str(tmp_path / "nowhere"), str(tmp_path / "dst")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 2
    assert "nowhere" in result.stderr and "not a directory" in result.stderr
    assert not (tmp_path / "dst").exists()


def test_sscd_subcommand_dispatches_lazily(monkeypatch):
    calls = []
    fake = types.ModuleType("cfgbasin_jax.convert.sscd")
    fake.main = lambda argv: calls.append(list(argv)) or 0
    monkeypatch.setitem(sys.modules, "cfgbasin_jax.convert.sscd", fake)
    import cfgbasin_jax.convert as convert_pkg

    monkeypatch.setattr(convert_pkg, "sscd", fake, raising=False)
    assert cli_main(["sscd", "weights.pt", "out_dir"]) == 0
    assert calls == [["weights.pt", "out_dir"]]


# --- models, tiny library -------------------------------------------------------------------------------


def test_param_shapes_are_abstract_and_match_loaded(loaded):
    components = loaded("sd1", "float32")
    shapes = component_param_shapes("unet", components.unet, dtype="bfloat16")
    leaves = jax.tree.leaves(shapes)
    assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) and leaf.dtype == jnp.bfloat16 for leaf in leaves)
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(lambda a: a.shape, components.params["unet"])
    image = jax.ShapeDtypeStruct((1, 3, 16, 16), jnp.float32)
    vae_shapes = param_shapes(components.vae, image)
    assert jax.tree.map(lambda s: s.shape, vae_shapes) == jax.tree.map(lambda a: a.shape, components.params["vae"])


@pytest.mark.parametrize(
    "key, value",
    [
        ("num_attention_heads", 8),
        ("time_cond_proj_dim", 256),
        ("addition_embed_type", "text_time"),
        ("norm_num_groups", 16),
        ("sample_size", [8, 8]),
    ],
)
def test_unsupported_unet_options_name_the_key(key, value):
    config = {**tiny.tiny_configs("sd1")["unet"], key: value}
    with pytest.raises(ConversionError, match=key):
        build_unet(config)


def test_tiny_tokenizer(tmp_path):
    from cfgbasin_jax.models.tokenizer import load_tokenizer

    tiny.write_tiny_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.model_max_length == 77 and len(tok) == tiny.tiny_vocab_size()
    assert tiny.tiny_configs("sd1")["text_encoder"]["vocab_size"] == len(tok)
    ids = tok("A photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and tok.eos_token_id in ids
    assert tok.convert_ids_to_tokens(ids[1:3]) == ["a</w>", "photo</w>"]
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    assert all(len(tok.tokenize(word)) == 1 for word in tiny._WORDS)  # merges cover whole words
    assert tok.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"]  # unknown words fall back to bytes
    assert tok.decode(tok("zebra").input_ids, skip_special_tokens=True) == "zebra"


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_random_components_save_and_load(variant, tmp_path):
    components = tiny.random_components(variant, seed=3, dtype="float32")
    assert set(components.params) == set(COMPONENTS)
    dst = save_components(components, tmp_path / "random")
    loaded_back = load_components(dst)
    assert tree_leaves_equal(loaded_back.params, components.params)
    assert loaded_back.configs == components.configs
    assert loaded_back.scheduler_config == components.scheduler_config
    again = tiny.random_components(variant, seed=3)
    other = tiny.random_components(variant, seed=4)
    assert tree_leaves_equal(again.params, components.params)
    assert not tree_leaves_equal(other.params, components.params)


def test_torch_free_path(tiny_sd1, tmp_path):
    """random_components, saving, loading a converted dir and converting safetensors need no torch."""
    code = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now fails
from cfgbasin_jax.models.tiny import random_components
from cfgbasin_jax.loading import load_components
from cfgbasin_jax.models.converted import save_components
save_components(random_components("sd2"), {str(tmp_path / 'random')!r})
load_components({str(tmp_path / 'random')!r})
load_components({str(tiny_sd1.path)!r})
print("ok")
"""
    env = {**os.environ, "USE_TORCH": "0", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
