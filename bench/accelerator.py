"""``python -m bench.accelerator``: one prepared run on a GPU or TPU host, one markdown table.

    pip install -e . "jax[cuda12]"         # (GPU; a TPU VM's jax[tpu]) then, unattended:
    python -m bench.accelerator            # SD 1.5 architecture, 512x512, 50 DDIM steps, ~5-8 min
    python -m bench.accelerator --config tiny --steps 2 --batches 1,2    # the CPU smoke run (tests)

It builds SD 1.5's architecture with seeded random weights (numpy, no torch, no download) and
measures, on JAX's default backend:

  * the attention implementation chosen (and whether cuDNN's fused attention accepts SD's shapes);
  * UNet parity at the highest matmul precision, float32: against diffusers' PyTorch UNet on the
    same weights on the same device where torch (CUDA, or CPU when JAX runs on CPU) and diffusers
    are installed, and against the saved CPU reference ``bench/data/accelerator_<config>.npz`` (our
    UNet's output on CPU, written by ``--write-reference``) where it exists;
  * images/s of CFG, STP, DTP and OG+DTP at each batch size (``--batches``, default 1, 8, 32), with
    ``--dtype`` (default bfloat16) params and compute, VAE decode included, against diffusers'
    PyTorch ``StableDiffusionPipeline`` in float16 (constant CFG) where CUDA is available;
  * compile time (first call minus the steady call) and peak device memory.

Rows that would start after ``--time-limit`` seconds are listed as skipped, so the run ends in time.
The table goes to ``--out`` (default bench/results/accelerator.md) and is printed.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # PyTorch shares the device

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
from bench.runners import METHODS, label  # noqa: E402  (the registry's BENCH preset)

LABELS = {m: label(m, short=True) for m in METHODS}

PARITY_SEED = 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.accelerator", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="sd15", choices=("sd15", "tiny"), help="model architecture (default sd15)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps per image (default 50)")
    p.add_argument("--batches", default="1,8,32", help="batch sizes (default 1,8,32)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}")
    p.add_argument("--dtype", default="bfloat16", help="our params and compute (default bfloat16)")
    p.add_argument("--time-limit", type=float, default=450.0, help="start no row after this many seconds")
    p.add_argument("--no-torch", action="store_true", help="skip every PyTorch comparison")
    p.add_argument("--out", default=str(HERE / "results" / "accelerator.md"))
    p.add_argument("--write-reference", action="store_true",
                   help="write the saved CPU reference of --config's UNet (run on CPU) and stop")
    args = p.parse_args(argv)
    bad = [m for m in args.methods.split(",") if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {', '.join(bad)} (use {', '.join(METHODS)})")
    return args


def model_configs(config: str) -> dict:
    """{"unet", "vae", "text_encoder", "scheduler"} of the architecture (DDIM scheduler)."""
    if config == "tiny":
        from bench.models import DDIM_SCHEDULER
        from cfgbasin_jax.models.tiny import tiny_configs

        return {**tiny_configs("sd1"), "scheduler": dict(DDIM_SCHEDULER)}
    from bench.fullsize import configs

    return configs(config)


def reference_path(config: str) -> Path:
    return HERE / "data" / f"accelerator_{config}.npz"


def parity_inputs(pipe, seed: int = PARITY_SEED) -> tuple:
    """Batch-2 UNet inputs at the model's latent size: x [2,4,h,w], t [2], states [2,77,D]."""
    rng = np.random.default_rng(seed)
    side = int(pipe.components.configs["unet"]["sample_size"])
    cross = int(pipe.components.configs["unet"]["cross_attention_dim"])
    x = rng.standard_normal((2, pipe.latent_channels, side, side)).astype(np.float32)
    return x, np.array([10, 700], np.int32), rng.standard_normal((2, 77, cross)).astype(np.float32)


def our_unet_output(pipe, inputs) -> np.ndarray:
    """Our UNet on ``inputs`` in float32 at the highest matmul precision."""
    import jax

    with jax.default_matmul_precision("highest"):
        out = jax.jit(pipe.unet_fn)(pipe.params["unet"], *(jax.numpy.asarray(a) for a in inputs))
        return np.asarray(out, np.float32)


def torch_unet_output(pipe, inputs, device: str) -> np.ndarray:
    """diffusers' PyTorch UNet with our weights (mapped back), float32, TF32 off, on ``device``."""
    import torch
    from diffusers import UNet2DConditionModel

    from cfgbasin_jax.convert.mapping import torch_state_dict

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    unet = UNet2DConditionModel.from_config(pipe.components.configs["unet"]).eval()
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    state = torch_state_dict(pipe.params["unet"], shapes)
    unet.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    unet = unet.to(device)
    x, t, c = (torch.from_numpy(np.asarray(a)).to(device) for a in inputs)
    with torch.no_grad():
        out = unet(x, t.long(), c).sample.float().cpu().numpy()
    del unet
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def rel_err(ours, ref) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def torch_device(jax_backend: str, no_torch: bool) -> str | None:
    """'cuda' / 'cpu' when PyTorch and diffusers run on the device JAX uses, else None."""
    if no_torch:
        return None
    try:
        import diffusers  # noqa: F401
        import torch
    except ImportError:
        return None
    if jax_backend == "gpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu" if jax_backend == "cpu" else None


def parity(pipe, config: str, device: str | None) -> list:
    """[(what, relative error)] against PyTorch on the same device and the saved CPU reference."""
    inputs = parity_inputs(pipe)
    ours = our_unet_output(pipe, inputs)
    out = []
    if device is not None:
        out.append((f"diffusers PyTorch UNet on {device}, float32, TF32 off", rel_err(ours, torch_unet_output(pipe, inputs, device))))
    ref = reference_path(config)
    if ref.is_file():
        out.append((f"saved CPU reference {ref.relative_to(HERE.parent)}", rel_err(ours, np.load(ref)["output"])))
    return out


def attention_backend(head_dim: int) -> str:
    """The implementation ``attention="auto"`` resolves to, and for "fused" whether cuDNN takes
    SD's self-attention shape in bfloat16."""
    import jax
    import jax.numpy as jnp

    from cfgbasin_jax.models.attention import resolve

    impl = resolve("auto")
    if impl != "fused":
        return impl
    q = jnp.zeros((2, 4096, 8, head_dim), jnp.bfloat16)
    try:
        jax.block_until_ready(jax.nn.dot_product_attention(q, q, q, implementation="cudnn"))
        return "fused (cuDNN flash attention, bfloat16)"
    except Exception as err:  # noqa: BLE001 (any refusal means the XLA fallback runs)
        return f"fused -> XLA fallback (cuDNN refused: {type(err).__name__})"


def components(config: str, dtype: str):
    """Seeded random Components (numpy, no torch) of the architecture."""
    from cfgbasin_jax.models.tiny import random_components

    return random_components("sd1", seed=0, dtype=dtype, configs=model_configs(config))


def recast(comps, dtype: str):
    """The same weights with modules and params in ``dtype``."""
    import jax

    from cfgbasin_jax.models.builders import build_module, resolve_dtype

    target = resolve_dtype(dtype)
    modules = {k: build_module(k, comps.configs[k], target) for k in ("unet", "vae", "text_encoder")}
    params = jax.tree.map(lambda x: x.astype(target), comps.params)
    return dataclasses.replace(comps, **modules, params=params, dtype=target)


def device_peak_gb() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in stats else None


def our_row(pipe, method: str, batch: int, steps: int, side: int) -> dict:
    """First call (compile) and a second, timed call of our sampler."""
    from bench.runners import PROMPTS, guidance

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    kw = dict(num_inference_steps=steps, height=side, width=side, scheduler="ddim", progress=False)
    start = time.perf_counter()
    pipe.generate(prompts, guidance(method), seed=0, **kw)
    first = time.perf_counter() - start
    start = time.perf_counter()
    res = pipe.generate(prompts, guidance(method), seed=1, **kw)
    steady = time.perf_counter() - start
    return {"images_per_s": batch / steady, "compile_s": max(first - steady, 0.0), "steady_s": steady,
            "unet_evals_per_image": res.unet_evals / batch, "device_peak_gb": device_peak_gb(),
            "finite": bool(np.isfinite(res.latents).all())}


def torch_pipeline(configs: dict, tokenizer, device: str):
    """diffusers' StableDiffusionPipeline in float16 (float32 on CPU), seeded random weights."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:  # diffusers wants transformers' tokenizer, not ours
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer.save_pretrained(folder)), local_files_only=True)
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(configs["vae"]), text_encoder=CLIPTextModel(CLIPTextConfig.from_dict(dict(configs["text_encoder"]))),
        tokenizer=tokenizer, unet=UNet2DConditionModel.from_config(configs["unet"]),
        scheduler=DDIMScheduler.from_config(configs["scheduler"]), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def torch_row(pipe, batch: int, steps: int, side: int, device: str) -> dict:
    import torch

    from bench.runners import PROMPTS, SCALE

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def call():
        with torch.no_grad():
            pipe(prompts, num_inference_steps=steps, guidance_scale=SCALE, height=side, width=side, output_type="np")
        if device == "cuda":
            torch.cuda.synchronize()

    call()  # warm-up (cuDNN autotuning, allocator)
    start = time.perf_counter()
    call()
    steady = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    return {"images_per_s": batch / steady, "steady_s": steady, "device_peak_gb": peak}


def _f(value, fmt="{:.3g}"):
    return "-" if value is None else fmt.format(value)


def markdown(info: dict) -> str:
    lines = [f"### Accelerator run ({info['date']})", "",
             f"Device: {info['device']}; JAX backend {info['backend']}; jax {info['jax']}, torch {info['torch']}, "
             f"diffusers {info['diffusers']}", "", f"Host: {info['host']}", "",
             f"Command: `{info['command']}` ({info['wall_s']:.0f} s)", "",
             f"Model: {info['model']}; {info['side']}x{info['side']}, {info['steps']} DDIM steps, ours in "
             f"{info['dtype']}, VAE decode included; attention: {info['attention']}", ""]
    lines += [f"- UNet parity, float32, highest precision, vs {what}: {err:.1e} (max abs err / max abs)"
              for what, err in info["parity"]] or ["- UNet parity: no PyTorch on this device and no saved reference"]
    if info.get("note"):
        lines += [f"- {info['note']}"]
    lines += ["", "| method | batch | ours images/s | diffusers PyTorch images/s (CFG) | ours / diffusers | "
              "UNet evals/image | compile s | JAX device peak GB | PyTorch device peak GB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in info["rows"]:
        if row.get("skipped"):
            lines.append(f"| {LABELS[row['method']]} | {row['batch']} | skipped ({row['skipped']}) | | | | | | |")
            continue
        torch_row_ = info["torch_rows"].get(row["batch"]) or {}
        ratio = row["images_per_s"] / torch_row_["images_per_s"] if torch_row_.get("images_per_s") else None
        lines.append(f"| {LABELS[row['method']]} | {row['batch']} | {_f(row['images_per_s'])} | "
                     f"{_f(torch_row_.get('images_per_s'))} | {_f(ratio, '{:.2f}x')} | "
                     f"{_f(row['unet_evals_per_image'], '{:.0f}')} | {_f(row['compile_s'], '{:.1f}')} | "
                     f"{_f(row['device_peak_gb'], '{:.1f}')} | {_f(torch_row_.get('device_peak_gb'), '{:.1f}')} |")
    lines += ["", "JAX device peak: the process's peak so far (JAX cannot reset it); PyTorch: per batch size.",
              "diffusers' pipeline runs constant CFG only: every method's ratio is against its CFG rate."]
    return "\n".join(lines) + "\n"


def write_reference(args) -> Path:
    import jax

    from cfgbasin_jax.pipeline import Pipeline

    if jax.default_backend() != "cpu":
        raise SystemExit("python -m bench.accelerator: error: --write-reference runs on CPU (JAX_PLATFORMS=cpu)")
    pipe = Pipeline(components(args.config, "float32"), compilation_cache=False)
    path = reference_path(args.config)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, output=our_unet_output(pipe, parity_inputs(pipe)), seed=PARITY_SEED)
    return path


def run(args, log=print) -> dict:
    import jax

    from cfgbasin_jax.pipeline import Pipeline

    started = time.perf_counter()
    backend = jax.default_backend()
    versions = {}
    for name in ("jax", "torch", "diffusers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "absent"
    from bench import measure

    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "backend": backend,
            "host": measure.machine_line(measure.machine()),
            "device": jax.devices()[0].device_kind, "command": "python -m bench.accelerator " + " ".join(
                shlex.quote(a) for a in (sys.argv[1:] if sys.argv[0].endswith(("accelerator.py", "accelerator")) else [])),
            "dtype": args.dtype, "steps": args.steps, "rows": [], "torch_rows": {}, **versions}
    if backend == "cpu" and args.config != "tiny":
        info["note"] = ("JAX runs on CPU: on a GPU host install JAX's CUDA build (pip install \"jax[cuda12]\"), "
                        "on a TPU VM jax[tpu]")
    device = torch_device(backend, args.no_torch)
    log(f"building {args.config} (random weights, float32)")
    comps = components(args.config, "float32")
    unet_config = comps.configs["unet"]
    info["model"] = f"{args.config} architecture, seeded random weights"
    side = int(unet_config["sample_size"]) * 2 ** (len(comps.configs["vae"]["block_out_channels"]) - 1)
    info["side"] = side
    channels, heads = unet_config["block_out_channels"][0], unet_config["attention_head_dim"]
    info["attention"] = attention_backend(channels // (heads if isinstance(heads, int) else heads[0]))
    log("UNet parity")
    info["parity"] = parity(Pipeline(comps, compilation_cache=False), args.config, device)
    pipe = Pipeline(recast(comps, args.dtype), compilation_cache=False)
    del comps
    torch_pipe = None
    for batch in (int(b) for b in args.batches.split(",")):
        for method in args.methods.split(","):
            if time.perf_counter() - started > args.time_limit:
                info["rows"].append({"method": method, "batch": batch, "skipped": "time limit"})
                continue
            log(f"ours: {method}, batch {batch}")
            info["rows"].append({"method": method, "batch": batch, **our_row(pipe, method, batch, args.steps, side)})
        if device is not None and time.perf_counter() - started <= args.time_limit:
            log(f"diffusers PyTorch pipeline, batch {batch}")
            torch_pipe = torch_pipe or torch_pipeline(pipe.components.configs | {"scheduler": pipe.scheduler_config},
                                                      pipe.tokenizer, device)
            info["torch_rows"][batch] = torch_row(torch_pipe, batch, args.steps, side, device)
    info["wall_s"] = time.perf_counter() - started
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.write_reference:
        print(f"wrote {write_reference(args)}")
        return 0
    info = run(args)
    text = markdown(info)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
