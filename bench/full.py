"""``python -m bench --config sd15`` (or ``sd21``): the benchmark on a full-size random model.

Sections (``--sections``, default all of them except the ones marked optional):

  convert   the source's weight files read from disk (evicted from the page cache first) and from
            the page cache; ``cfgbasin_jax.convert.sd_folder.convert`` from disk: wall time and peak RSS,
            against the read time and the weights' bytes (child processes)
  load      the checkpoint's bytes read from disk and from the page cache; ``load_pipeline`` from
            both: wall time and peak RSS (child processes)
  memory    one job, batch 1, ``--memory-steps`` steps at the model's resolution with VAE decode:
            our peak RSS (float32 and bfloat16) against diffusers' PyTorch
            ``StableDiffusionPipeline`` on the same job (child processes)
  compile   a first process on an empty persistent compilation cache (first call: compile; second
            call: steady state), then a second process on that cache: its first call against the
            steady state (child processes)
  table     the table of ``python -m bench`` (our sampler, the official-structure PyTorch loop,
            diffusers' PyTorch pipeline; diffusers' Flax pipeline with ``--runners``) at batch
            ``--batch`` and ``--steps`` steps, in this process
  profile   one CFG step's UNet call split into convolutions, self- and cross-attention, group
            norms and the rest, ours and PyTorch's; FLOP/s against the measured peak
            (:mod:`bench.profile`), in this process

The model is built once (random weights, :mod:`bench.fullsize`) under ``--cache-dir`` and converted
there (``<cache>/<config>.converted``); the measured conversion writes to a scratch folder beside it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from bench import fullsize, jobs

SECTIONS = ("convert", "load", "memory", "compile", "table", "profile")
NOTES = [
    "read from disk: the files' pages dropped from the page cache first (posix_fadvise DONTNEED), then read "
    "through one reused 64 MiB buffer; from the page cache: the same, read again",
    "peak RSS: the whole process's (VmHWM), imports included; each figure is its own child process",
    "the memory jobs run with the persistent compilation cache off, so the compile's memory is counted",
]
GB = 1e9


def converted_folder(name: str, source: Path, log=print) -> Path:
    """The cached converted folder of ``source`` (converted once, float32)."""
    out = source.parent / f"{name}.converted"
    marker = out / "cfgbasin_jax.json"
    if not marker.is_file() or marker.stat().st_mtime < (source / "bench_model.json").stat().st_mtime:
        log(f"converting {source} -> {out}")
        jobs.run("convert", src=str(source), dst=str(out), overwrite=True)
    return out


def convert_section(source: Path, scratch: Path, log=print) -> dict:
    files = [str(p) for p in fullsize.weight_files(source)]
    weight_bytes = fullsize.weight_bytes(files)
    jobs.evict(files)
    cold = jobs.run("read", paths=files)
    warm = jobs.run("read", paths=files)
    dst = scratch / "convert_run"
    shutil.rmtree(dst, ignore_errors=True)
    jobs.evict(files)
    log("  convert (source evicted from the page cache first)")
    conv = jobs.run("convert", src=str(source), dst=str(dst))
    shutil.rmtree(dst, ignore_errors=True)
    return {
        "weight_bytes": weight_bytes, "read_disk_s": cold["seconds"], "read_cache_s": warm["seconds"],
        "convert_s": conv["seconds"], "convert_process_s": conv["process_s"], "peak_rss_bytes": conv["peak_rss_bytes"],
        "peak_rss_vs_weights": conv["peak_rss_bytes"] / weight_bytes,
        "convert_vs_read_disk": conv["seconds"] / cold["seconds"], "convert_vs_read_cache": conv["seconds"] / warm["seconds"],
        "load_avg": conv["load_avg"],
    }


def load_section(converted: Path, log=print) -> dict:
    params = [str(converted / "params")]
    jobs.evict(params)
    cold = jobs.run("read", paths=params)
    warm = jobs.run("read", paths=params)
    jobs.evict(params)
    log("  load_pipeline (checkpoint evicted from the page cache first)")
    load_cold = jobs.run("load", path=str(converted))
    load_warm = jobs.run("load", path=str(converted))
    return {
        "checkpoint_bytes": cold["bytes"], "read_disk_s": cold["seconds"], "read_cache_s": warm["seconds"],
        "load_disk_s": load_cold["seconds"], "load_cache_s": load_warm["seconds"],
        "load_vs_read_disk": load_cold["seconds"] / cold["seconds"],
        "load_cache_vs_read_cache": load_warm["seconds"] / warm["seconds"],
        "peak_rss_bytes": load_warm["peak_rss_bytes"], "param_bytes": sum(load_warm["param_bytes"].values()),
        "load_avg": load_warm["load_avg"],
    }


def memory_section(source: Path, converted: Path, side: int, steps: int, dtypes=("float32", "bfloat16"),
                   log=print) -> dict:
    """Peak RSS of the same job in separate processes: ours in each of ``dtypes``, diffusers PyTorch."""
    out = {"side": side, "steps": steps, "batch": 1}
    no_cache = {"CFGBASIN_JAX_COMPILATION_CACHE": "0"}  # the compile's own memory is part of the job
    for dtype in dtypes:
        log(f"  memory: ours {dtype}")
        r = jobs.run("generate", no_cache, path=str(converted), dtype=dtype, steps=steps, side=side)
        out[f"ours_{dtype}"] = {"peak_rss_bytes": r["peak_rss_bytes"], "call_s": r["call_s"][0], "load_s": r["load_s"],
                                "param_bytes": sum(r["param_bytes"].values()), "finite": r["finite"],
                                "phase_peak_rss_bytes": r["phase_peak_rss_bytes"],
                                "load_avg": r["load_avg"]}
    log("  memory: diffusers PyTorch pipeline")
    r = jobs.run("torch_pipe", src=str(source), steps=steps, side=side)
    out["torch_pipe"] = {"peak_rss_bytes": r["peak_rss_bytes"], "call_s": r["call_s"][0], "load_s": r["load_s"],
                         "finite": r["finite"], "load_avg": r["load_avg"]}
    out["ours_vs_torch"] = out["ours_float32"]["peak_rss_bytes"] / out["torch_pipe"]["peak_rss_bytes"]
    return out


def compile_section(converted: Path, scratch: Path, side: int, steps: int, batch: int = 1, log=print) -> dict:
    """First process (empty caches): first and steady call; then second processes on those caches:
    with JAX's persistent compilation cache only (serialized executables off: the earlier start) and
    with the serialized executables too (the default). ``converted``: a converted folder or a
    diffusers folder (converted in memory by each: the conversion cache is off here)."""
    cache, executables = scratch / "jax_cache", scratch / "executables"
    for folder in (cache, executables):
        shutil.rmtree(folder, ignore_errors=True)
    env = {"CFGBASIN_JAX_COMPILATION_CACHE": str(cache), "CFGBASIN_JAX_EXECUTABLE_CACHE": str(executables),
           "CFGBASIN_JAX_CONVERSION_CACHE": "0"}
    log("  compile: first process (empty caches)")
    first = jobs.run("generate", env, path=str(converted), steps=steps, side=side, batch=batch, calls=2)
    log("  compile: second process, persistent compilation cache only")
    before = jobs.run("generate", {**env, "CFGBASIN_JAX_EXECUTABLE_CACHE": "0"}, path=str(converted), steps=steps,
                      side=side, batch=batch, calls=1)
    log("  compile: second process, serialized executables")
    second = jobs.run("generate", env, path=str(converted), steps=steps, side=side, batch=batch, calls=1)
    steady = first["call_s"][1]
    for folder in (cache, executables):
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "side": side, "steps": steps, "batch": batch, "first_call_s": first["call_s"][0], "steady_call_s": steady,
        "compile_s": first["compile_s"][0], "second_process_compile_breakdown": second["compile_breakdown"][0], "second_process_first_call_s": second["call_s"][0],
        "second_process_compile_s": second["compile_s"][0], "second_process_cache_hits": second["cache_hits"][0],
        "second_process_vs_steady": second["call_s"][0] / steady, "load_avg": second["load_avg"],
        "compilation_cache_only_first_call_s": before["call_s"][0],
        "compilation_cache_only_vs_steady": before["call_s"][0] / steady,
        "compilation_cache_only_breakdown": before["compile_breakdown"][0],
    }


def table_section(name: str, models, args, log=print) -> dict:
    from bench import harness

    tab = harness.table(models, args.methods.split(","), args.batch, args.steps, args.loop_images,
                        args.repeats, tuple(args.runners.split(",")), sweep=False, log=log)
    return {"size": {"name": name, "description": fullsize.DESCRIPTIONS[name], "latent": models.size.latent,
                     "unet_params_m": models.unet_params_m, "parity": models.parity}, "table": tab}


def profile_section(models, repeats: int, log=print) -> dict:
    """bench.profile.profile_section on the models of the table (our UNet and PyTorch's, same weights)."""
    from bench import profile

    pipe = models.pipe
    return profile.profile_section(pipe.unet, pipe.params["unet"], models.torch_unet, models.size.latent,
                                   models.configs["unet"]["cross_attention_dim"], repeats=max(repeats, 2), log=log)


def bench_models(name: str, source: Path, converted: Path, log=print):
    """BenchModels over the full-size model: PyTorch modules from the diffusers folder, our
    pipeline from the converted folder (the same weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    import cfgbasin_jax
    from bench import models as M

    size = M.Size(name, {}, latent=fullsize.LATENT[name], steps=2, batch=1, description=fullsize.DESCRIPTIONS[name])
    device = M.torch_device()
    log(f"  table: loading {name} (PyTorch and ours)")
    unet = UNet2DConditionModel.from_pretrained(source / "unet").eval().to(device)
    vae = AutoencoderKL.from_pretrained(source / "vae").eval().to(device)
    text = CLIPTextModel.from_pretrained(source / "text_encoder").eval().to(device)
    tokenizer = CLIPTokenizer.from_pretrained(str(source / "tokenizer"), local_files_only=True)
    pipe = cfgbasin_jax.load_pipeline(converted)
    configs = {**{k: dict(v) for k, v in pipe.components.configs.items()}, "scheduler": dict(pipe.scheduler_config)}
    return M.BenchModels(
        size=size, folder=source, configs=configs, torch_unet=unet, torch_vae=vae, torch_text=text,
        tokenizer=tokenizer, torch_device=device, pipe=pipe,
        unet_params_m=sum(p.numel() for p in unet.parameters()) / 1e6,
        parity=M.unet_parity(pipe, unet, size.latent, device),
    )


def run(args, result: dict, log=print) -> dict:
    """The full-size sections for ``args.config`` into ``result["fullsize"]``."""
    name = args.config
    sections = args.sections.split(",") if args.sections else list(SECTIONS)
    cache_dir = Path(args.cache_dir) if args.cache_dir else fullsize.default_cache_dir()
    source = fullsize.ensure_model(name, cache_dir, log=log)
    converted = converted_folder(name, source, log=log)
    scratch = cache_dir / f".{name}.scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    side = fullsize.LATENT[name] * 8
    out = {"config": name, "description": fullsize.DESCRIPTIONS[name], "source": str(source), "side": side}
    started = time.time()
    try:
        if "convert" in sections:
            log(f"{name}: convert")
            out["convert"] = convert_section(source, scratch, log)
        if "load" in sections:
            log(f"{name}: load")
            out["load"] = load_section(converted, log)
        if "memory" in sections:
            log(f"{name}: memory")
            out["memory"] = memory_section(source, converted, side, args.memory_steps,
                                           tuple(args.memory_dtypes.split(",")), log)
        if "compile" in sections:
            log(f"{name}: compile")
            out["compile"] = compile_section(converted, scratch, side, args.memory_steps, log=log)
        models = None
        if "table" in sections or "profile" in sections:
            models = bench_models(name, source, converted, log=log)
        if "table" in sections:
            log(f"{name}: table")
            sized = table_section(name, models, args, log)
            result["sizes"][name] = sized["size"]
            result.setdefault("table", {})[name] = sized["table"]
        if "profile" in sections:
            log(f"{name}: profile")
            result.setdefault("profile", {})[name] = profile_section(models, args.repeats, log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out["wall_s"] = time.time() - started
    result["fullsize"] = out
    return result
