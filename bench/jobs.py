"""One measured job per child process, so each peak RSS is the whole process's (VmHWM).

    python -m bench.jobs JOB '{"arg": value, ...}'     # prints one JSON line (the job's figures)

Jobs:
  read        raw read time of files (``paths``, folders walked): every byte through one reused
              64 MiB buffer
  convert     ``cfgbasin_jax.convert.sd_folder.convert(src, dst, dtype)``
  load        ``load_pipeline(path, dtype)``, the bytes of the params it holds, and the time to
              touch every param byte once after it (a lazily mapped load pays for its reads there)
  generate    load, then ``generate`` ``calls`` times (first call: compile; later: steady)
  torch_pipe  diffusers' ``StableDiffusionPipeline.from_pretrained(src)`` and its call on the same job

:func:`run` starts a job and returns its figures with ``peak_rss_bytes`` (the child's maximum
resident set over its life, VmHWM) and ``process_s`` (the child's wall time, imports included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of an astronaut riding a horse on mars"
SCALE = 7.5  # = cfgbasin_jax.method.guidance.CFG_SCALE, restated: the torch_pipe job must not import JAX


def run(job: str, env: dict | None = None, timeout: float | None = None, **kwargs) -> dict:
    """Run ``job`` in a child Python process; its JSON figures plus peak_rss_bytes and process_s."""
    child_env = {**os.environ, **(env or {})}
    # ROOT last: a PYTHONPATH given by the caller (e.g. another copy of the library) comes first.
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (child_env.get("PYTHONPATH", ""), str(ROOT)) if p)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bench.jobs", job, json.dumps(kwargs)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=child_env, cwd=ROOT, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"bench.jobs {job}: timed out after {timeout} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"bench.jobs {job} failed (exit {proc.returncode}):\n{err[-4000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def _peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------------------- the jobs


def files_under(paths) -> list:
    """The files of ``paths``: files as they are, folders walked (sorted)."""
    out = []
    for path in map(Path, paths):
        out += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return out


def evict(paths) -> None:
    """Drop the files' pages from the page cache (posix_fadvise DONTNEED), so the next read is from disk."""
    for path in files_under(paths):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def job_read(paths: list) -> dict:
    paths = files_under(paths)
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    total, start = 0, time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return {"seconds": time.perf_counter() - start, "bytes": total}


def job_convert(src: str, dst: str, dtype: str = "float32", overwrite: bool = False) -> dict:
    from cfgbasin_jax.convert.sd_folder import convert

    start = time.perf_counter()
    convert(src, dst, dtype=dtype, overwrite=overwrite)
    return {"seconds": time.perf_counter() - start}


def _param_bytes(pipe) -> dict:
    return {k: int(v) for k, v in pipe.param_bytes().items()}


def job_load(path: str, dtype: str = "float32") -> dict:
    import jax
    import numpy as np

    import cfgbasin_jax

    base = _rss_bytes()
    start = time.perf_counter()
    pipe = cfgbasin_jax.load_pipeline(path, dtype=dtype)
    seconds = time.perf_counter() - start
    rss_loaded = _rss_bytes()
    start = time.perf_counter()
    for leaf in jax.tree.leaves(pipe.params):  # every byte once (on CPU: the mapped files' pages)
        np.asarray(leaf).view(np.uint8).max()
    return {"seconds": seconds, "touch_s": time.perf_counter() - start, "param_bytes": _param_bytes(pipe),
            "rss_before_bytes": base, "rss_loaded_bytes": rss_loaded, "rss_touched_bytes": _rss_bytes()}


class PhasePeaks:
    """Peak resident set per phase of a job (sampled every ``interval`` s in a thread): ``mark(name)``
    starts a phase; ``peaks`` maps each phase to its highest sampled RSS in bytes."""

    def __init__(self, interval: float = 0.05):
        import threading

        self.phase, self.peaks, self.interval = "start", {}, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.is_set():
            rss = _rss_bytes()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            self._stop.wait(self.interval)

    def mark(self, phase: str) -> None:
        rss = _rss_bytes()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
        self.phase = phase

    def wrap(self, obj, name: str, phase: str) -> None:
        """``obj.name`` (a bound method) marks ``phase`` when called, then the phase "sample"."""
        method = getattr(obj, name)

        def marked(*args, **kwargs):
            self.mark(phase)
            try:
                return method(*args, **kwargs)
            finally:
                self.mark("sample")

        setattr(obj, name, marked)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self.mark("end")
        return dict(self.peaks)


def job_generate(path: str, dtype: str = "float32", steps: int = 1, side: int = 512, batch: int = 1,
                 calls: int = 1, decode: bool = True, scheduler: str = "ddim") -> dict:
    import numpy as np

    import cfgbasin_jax
    from cfgbasin_jax.method import guidance as G
    from cfgbasin_jax.runtime.compile_cache import CompileStats

    phases = PhasePeaks()
    phases.mark("load")
    start = time.perf_counter()
    pipe = cfgbasin_jax.load_pipeline(path, dtype=dtype)
    load_s = time.perf_counter() - start
    rss_loaded = _rss_bytes()
    phases.mark("sample")
    phases.wrap(pipe, "encode_prompts", "encode")
    phases.wrap(pipe, "decode", "decode")
    times, compile_s, hits, breakdown = [], [], [], []
    for i in range(calls):
        with CompileStats() as stats:
            t0 = time.perf_counter()
            res = pipe.generate([PROMPT] * batch, G.constant(SCALE), num_inference_steps=steps, height=side,
                                width=side, scheduler=scheduler, progress=False, decode=decode, seed=i)
            times.append(time.perf_counter() - t0)
        compile_s.append(stats.compile_s)
        hits.append(stats.hits)
        breakdown.append({"trace_s": stats.trace_s, "lower_s": stats.lower_s, "backend_s": stats.backend_s})
    return {"load_s": load_s, "call_s": times, "compile_s": compile_s, "cache_hits": hits, "compile_breakdown": breakdown,
            "param_bytes": _param_bytes(pipe), "rss_loaded_bytes": rss_loaded,
            "finite": bool(np.all(np.isfinite(res.latents))), "phase_peak_rss_bytes": phases.stop()}


def job_torch_pipe(src: str, steps: int = 1, side: int = 512, batch: int = 1, calls: int = 1,
                   threads: int = 0) -> dict:
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = pipe([PROMPT] * batch, num_inference_steps=steps, guidance_scale=SCALE, height=side, width=side,
                       output_type="np", generator=torch.Generator().manual_seed(i))
        times.append(time.perf_counter() - t0)
    return {"load_s": load_s, "call_s": times, "finite": bool(np.all(np.isfinite(out.images)))}


JOBS = {"read": job_read, "convert": job_convert, "load": job_load, "generate": job_generate,
        "torch_pipe": job_torch_pipe}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    job, kwargs = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    result = JOBS[job](**kwargs)
    result["peak_rss_bytes"] = _peak_rss_bytes()
    result["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
