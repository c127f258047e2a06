"""Convert an SSCD copy-detection model (TorchScript file from facebookresearch/sscd-copy-detection,
or a plain torch state dict) into the Flax SSCD folder read by :func:`cfgbasin_jax.models.sscd.load_sscd`.

    cfgbasin-convert sscd sscd_disc_mixup.torchscript.pt converted/sscd_disc_mixup
    python -m cfgbasin_jax.convert.sscd sscd_disc_large.torchscript.pt converted/sscd_disc_large

Both parameter layouts of the released files are recognised, with any module prefix:
  * torchvision ResNet names: ``conv1``, ``bn1``, ``layer{1-4}.{i}.conv{1-3}/bn{1-3}/downsample.{0,1}``,
    projection ``fc`` (GeM replaces ``avgpool``);
  * Classy Vision ResNeXt names: ``initial_block[._module].{0,1}``,
    ``blocks.{s}.{i}[._module].convolutional_block.{0,1,3,4,6}``, ``.bn``, ``.downsample.{0,1}``,
    projection ``embeddings.1`` (GeM, Linear, L2Norm).
Depth, widths, cardinality (ResNeXt groups) and descriptor size are read off the weight shapes.
BatchNorm (eval statistics, eps 1e-5) is folded into the convolutions. Any tensor the mapping does not
recognise is an error, so a file with extra layers (e.g. whitening) is never half-converted.

When the input is a TorchScript module the converter runs it and the Flax model on the same random
batch and refuses to write unless the descriptors agree (``--no-verify`` skips this).
Only this converter imports torch; the written folder loads without it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cfgbasin_jax.convert.weights import torch_load
from cfgbasin_jax.models.errors import ConversionError
from cfgbasin_jax.models.sscd import CONFIG_NAME, SSCDConfig, SSCDWeightsError, check_params, save_sscd
from cfgbasin_jax.runtime import files, folders
from cfgbasin_jax.runtime.cli import OneLineParser, UsageError, fail, interrupted

PROG = "cfgbasin-convert sscd"

BN_FIELDS = ("weight", "bias", "running_mean", "running_var")
VERIFY_TOL = 1e-3


class SSCDConversionError(ValueError):
    """The input file or its parameter names / shapes cannot be mapped to the SSCD architecture."""


# ----------------------------------------------------------------------------- name mapping

_FIELD = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_TV_RULES = [
    (re.compile(rf"(?:^|\.)layer(\d+)\.(\d+)\.conv([123])\.{_FIELD}$"), lambda m: (f"s{int(m[1]) - 1}.b{m[2]}.conv{m[3]}", m[4])),
    (re.compile(rf"(?:^|\.)layer(\d+)\.(\d+)\.bn([123])\.{_FIELD}$"), lambda m: (f"s{int(m[1]) - 1}.b{m[2]}.bn{m[3]}", m[4])),
    (re.compile(rf"(?:^|\.)layer(\d+)\.(\d+)\.downsample\.0\.{_FIELD}$"), lambda m: (f"s{int(m[1]) - 1}.b{m[2]}.down_conv", m[3])),
    (re.compile(rf"(?:^|\.)layer(\d+)\.(\d+)\.downsample\.1\.{_FIELD}$"), lambda m: (f"s{int(m[1]) - 1}.b{m[2]}.down_bn", m[3])),
    (re.compile(rf"(?:^|\.)conv1\.{_FIELD}$"), lambda m: ("stem_conv", m[1])),
    (re.compile(rf"(?:^|\.)bn1\.{_FIELD}$"), lambda m: ("stem_bn", m[1])),
    (re.compile(rf"(?:^|\.)fc\.{_FIELD}$"), lambda m: ("proj", m[1])),
]
_CLASSY_SEQ = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3"}
_CV_BLOCK = r"(?:^|\.)blocks\.(\d+)\.(\d+)\.(?:_module\.)?"
_CLASSY_RULES = [
    (re.compile(rf"{_CV_BLOCK}convolutional_block\.([01346])\.{_FIELD}$"), lambda m: (f"s{m[1]}.b{m[2]}.{_CLASSY_SEQ[m[3]]}", m[4])),
    (re.compile(rf"{_CV_BLOCK}bn\.{_FIELD}$"), lambda m: (f"s{m[1]}.b{m[2]}.bn3", m[3])),
    (re.compile(rf"{_CV_BLOCK}downsample\.0\.{_FIELD}$"), lambda m: (f"s{m[1]}.b{m[2]}.down_conv", m[3])),
    (re.compile(rf"{_CV_BLOCK}downsample\.1\.{_FIELD}$"), lambda m: (f"s{m[1]}.b{m[2]}.down_bn", m[3])),
    (re.compile(rf"(?:^|\.)initial_block\.(?:_module\.)?0\.{_FIELD}$"), lambda m: ("stem_conv", m[1])),
    (re.compile(rf"(?:^|\.)initial_block\.(?:_module\.)?1\.{_FIELD}$"), lambda m: ("stem_bn", m[1])),
    (re.compile(rf"(?:^|\.)embeddings\.\d+\.{_FIELD}$"), lambda m: ("proj", m[1])),
]


def detect_layout(names: list[str]) -> str:
    """"torchvision" or "classy", from the parameter names."""
    if any(re.search(r"(?:^|\.)layer\d+\.\d+\.conv1\.weight$", n) for n in names):
        return "torchvision"
    if any(re.search(rf"{_CV_BLOCK}convolutional_block\.0\.weight$", n) for n in names):
        return "classy"
    raise SSCDConversionError(
        "no ResNet trunk found: expected torchvision names (layer1.0.conv1.weight) or Classy Vision "
        f"names (blocks.0.0.convolutional_block.0.weight); first names in the file: {names[:8]}"
    )


def canonical_state(state: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """{torch name: array} -> {"stem_conv" | "stem_bn" | "s{S}.b{B}.{conv1..3,bn1..3,down_conv,down_bn}"
    | "proj": {field: array}}. Unrecognised names raise SSCDConversionError."""
    rules = _TV_RULES if detect_layout(list(state)) == "torchvision" else _CLASSY_RULES
    out: dict[str, dict[str, np.ndarray]] = {}
    unknown = []
    for name, value in state.items():
        for pattern, target in rules:
            m = pattern.search(name)
            if m:
                module, field = target(m)
                if field != "num_batches_tracked":
                    if field in out.setdefault(module, {}):
                        raise SSCDConversionError(f"two tensors map to {module}.{field} (second: {name})")
                    out[module][field] = np.asarray(value, dtype=np.float64)
                break
        else:
            unknown.append(name)
    if unknown:
        raise SSCDConversionError(f"tensors not part of the SSCD architecture: {unknown[:10]} ({len(unknown)} in all)")
    return out


# ----------------------------------------------------------------------------- folding


def fold_conv_bn(conv: dict, bn: dict, eps: float, groups: int = 1) -> dict[str, np.ndarray]:
    """torch conv [O,I/g,kh,kw] (+bias) and eval BatchNorm -> Flax {"kernel" [kh,kw,I/g,O], "bias" [O]}."""
    missing = [f for f in BN_FIELDS if f not in bn]
    if missing or "weight" not in conv:
        raise SSCDConversionError(f"incomplete conv/BatchNorm pair (missing BN fields {missing})")
    scale = bn["weight"] / np.sqrt(bn["running_var"] + eps)
    kernel = conv["weight"] * scale[:, None, None, None]
    bias = (conv.get("bias", 0.0) - bn["running_mean"]) * scale + bn["bias"]
    return {"kernel": kernel.transpose(2, 3, 1, 0).astype(np.float32), "bias": bias.astype(np.float32)}


_BLOCK_KEY = re.compile(r"^s(\d+)\.b(\d+)\.")


def _require(canon: dict, key: str) -> dict:
    if key not in canon:
        raise SSCDConversionError(f"missing weights for {key} (is this an SSCD ResNet-50 / ResNeXt model?)")
    return canon[key]


def convert_state(state: dict[str, np.ndarray], gem_p: float = 3.0, bn_eps: float = 1e-5) -> tuple[SSCDConfig, dict]:
    """A torch SSCD state dict (numpy values) -> (SSCDConfig, Flax params with BatchNorm folded)."""
    canon = canonical_state(state)
    stem_w = _require(canon, "stem_conv")["weight"]
    if stem_w.shape[1:] != (3, 7, 7):
        raise SSCDConversionError(f"stem conv must be [C,3,7,7], got {list(stem_w.shape)}")
    block_keys = [m for m in map(_BLOCK_KEY.match, canon) if m]
    stages = sorted({int(m[1]) for m in block_keys})
    if stages != list(range(len(stages))) or not stages:
        raise SSCDConversionError(f"ResNet stages are not consecutive: {stages}")
    blocks, widths, outs, groups = [], [], [], set()
    params: dict[str, Any] = {"stem": fold_conv_bn(canon["stem_conv"], _require(canon, "stem_bn"), bn_eps)}
    in_ch = stem_w.shape[0]
    for s in stages:
        ids = sorted({int(m[2]) for m in block_keys if int(m[1]) == s})
        if ids != list(range(len(ids))):
            raise SSCDConversionError(f"stage {s}: block indices are not consecutive: {ids}")
        blocks.append(len(ids))
        for b in ids:
            pre = f"s{s}.b{b}."
            c1, c2, c3 = (_require(canon, pre + f"conv{i}")["weight"] for i in (1, 2, 3))
            width, out = c1.shape[0], c3.shape[0]
            g = width // c2.shape[1]
            if c2.shape[0] != width or c2.shape[1] * g != width or c2.shape[2:] != (3, 3):
                raise SSCDConversionError(f"{pre}conv2 shape {list(c2.shape)} does not fit width {width}")
            groups.add(g)
            if b == 0:
                widths.append(width)
                outs.append(out)
            block = {
                f"conv{i}": fold_conv_bn(canon[pre + f"conv{i}"], _require(canon, pre + f"bn{i}"), bn_eps) for i in (1, 2, 3)
            }
            stride = 2 if (s > 0 and b == 0) else 1
            needs_proj = b == 0 and (stride != 1 or in_ch != out)
            if (pre + "down_conv" in canon) != needs_proj:
                raise SSCDConversionError(f"{pre}: projection shortcut {'missing' if needs_proj else 'unexpected'}")
            if needs_proj:
                block["downsample"] = fold_conv_bn(canon[pre + "down_conv"], _require(canon, pre + "down_bn"), bn_eps)
            params[f"stage{s}_block{b}"] = block
            in_ch = out
    if len(groups) != 1:
        raise SSCDConversionError(f"mixed 3x3 conv cardinalities {sorted(groups)}")
    proj = _require(canon, "proj")
    if proj["weight"].ndim != 2 or proj["weight"].shape[1] != outs[-1] or "bias" not in proj:
        raise SSCDConversionError(f"projection must be Linear({outs[-1]}, dims) with bias, got {list(proj['weight'].shape)}")
    params["proj"] = {"kernel": proj["weight"].T.astype(np.float32), "bias": proj["bias"].astype(np.float32)}
    config = SSCDConfig(
        stage_blocks=tuple(blocks),
        stage_widths=tuple(int(w) for w in widths),
        stage_out=tuple(int(o) for o in outs),
        stem_width=int(stem_w.shape[0]),
        groups=int(groups.pop()),
        dims=int(proj["weight"].shape[0]),
        gem_p=float(gem_p),
    )
    check_params(config, params)
    return config, params


# ----------------------------------------------------------------------------- torch side


def load_torch_file(path: str):
    """-> (state dict of numpy arrays, ScriptModule or None). TorchScript first, then a plain state dict."""
    import torch

    if not os.path.isfile(path):
        raise SSCDConversionError(f"SSCD file not found: {path}")
    try:
        module = torch.jit.load(path, map_location="cpu").eval()
        state = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
        return state, module
    except (RuntimeError, ValueError):
        pass
    try:
        obj = torch_load(path)
    except ConversionError as err:
        raise SSCDConversionError(f"{path} is neither a TorchScript module nor a torch state dict: "
                                  f"{str(err).split(': ', 1)[-1]}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(hasattr(v, "numpy") for v in obj.values()):
        raise SSCDConversionError(f"{path} does not hold a flat state dict of tensors")
    return {k: v.detach().cpu().float().numpy() for k, v in obj.items()}, None


def gem_p_from_module(module) -> float | None:
    """The GeM exponent stored on a scripted module (``pooling_param``), if it kept it."""
    if module is None:
        return None
    for _, sub in module.named_modules():
        for attr in ("pooling_param", "p"):
            try:
                value = getattr(sub, attr)
            except Exception:  # noqa: BLE001 - ScriptModules raise various errors for absent attributes
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return None


def verify(module, config: SSCDConfig, params: dict, size: int = 64, seed: int = 0) -> float:
    """Max |descriptor difference| between the torch module and the Flax model on a random batch."""
    import torch

    from cfgbasin_jax.models.sscd import sscd_descriptors

    x = np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    got = sscd_descriptors(config, params, x.transpose(0, 2, 3, 1))
    if ref.shape != got.shape:
        raise SSCDConversionError(f"torch module returns {ref.shape}, the Flax model {got.shape}")
    return float(np.max(np.abs(ref - got)))


def check_destination(dst, sources=(), overwrite: bool = False) -> Path:
    """Absolute ``dst`` after checking that an SSCD folder may be written there: the rules of the
    SD conversion (:func:`cfgbasin_jax.runtime.folders.check_output_dir`; with ``overwrite`` only a
    folder holding ``sscd_config.json`` is replaced). Raises FileError naming the paths."""
    return folders.check_output_dir(dst, sources, overwrite, ours=lambda p: (Path(p) / CONFIG_NAME).is_file(),
                                  kind=f"an SSCD folder (no {CONFIG_NAME})", writer="cfgbasin-convert sscd")


def convert_file(path: str, dst: str, gem_p: float | None = None, bn_eps: float = 1e-5, check: bool = True,
                 overwrite: bool = False) -> SSCDConfig:
    """TorchScript / state-dict file -> Flax SSCD folder ``dst``. Returns the config. ``dst`` is
    checked first (:func:`check_destination`) and written whole or not at all
    (:func:`cfgbasin_jax.runtime.folders.building_dir`)."""
    dst = check_destination(dst, [path], overwrite)
    state, module = load_torch_file(path)
    found_p = gem_p_from_module(module)
    p = gem_p if gem_p is not None else (found_p if found_p is not None else 3.0)
    config, params = convert_state(state, gem_p=p, bn_eps=bn_eps)
    if check and module is not None:
        err = verify(module, config, params)
        print(f"verify: max |descriptor difference| vs TorchScript = {err:.2e}")
        if not err <= VERIFY_TOL:
            raise SSCDConversionError(
                f"converted model disagrees with {path} (max diff {err:.3e} > {VERIFY_TOL}); "
                "check --gem-p / --bn-eps, or pass --no-verify to write anyway"
            )
    with folders.building_dir(dst, overwrite) as tmp:
        save_sscd(str(tmp), config, params)
    return config


def main(argv=None) -> int:
    """``cfgbasin-convert sscd FILE DST``: exit 0, or 2 with one line (bad input, an I/O error naming
    the path, a destination refused by the SD conversion's rules), 130/143 when interrupted; nothing
    is left at DST unless the conversion succeeded."""
    parser = OneLineParser(
        prog=PROG, description="Convert an SSCD TorchScript / state-dict file to a Flax SSCD folder."
    )
    parser.add_argument("file", help="e.g. sscd_disc_mixup.torchscript.pt")
    parser.add_argument("dst", help="output folder (sscd_config.json + sscd_params.safetensors)")
    parser.add_argument("--gem-p", type=float, default=None, help="GeM exponent (default: from the module, else 3.0)")
    parser.add_argument("--bn-eps", type=float, default=1e-5, help="BatchNorm epsilon (default 1e-5)")
    parser.add_argument("--no-verify", action="store_true", help="skip the TorchScript-vs-Flax descriptor check")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST that this command wrote")
    try:
        args = parser.parse_args(argv)
        with files.terminate_raises():
            config = convert_file(args.file, args.dst, gem_p=args.gem_p, bn_eps=args.bn_eps,
                                  check=not args.no_verify, overwrite=args.overwrite)
    except (UsageError, SSCDConversionError, SSCDWeightsError, ConversionError, files.FileError) as err:
        return fail(PROG, str(err))
    except OSError as err:
        return fail(PROG, files.describe(files.with_path(err, args.dst)))
    except KeyboardInterrupt as err:
        return interrupted(PROG, err, args.dst)
    print(
        f"wrote {args.dst}: blocks {list(config.stage_blocks)}, groups {config.groups}, "
        f"dims {config.dims}, GeM p {config.gem_p}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
