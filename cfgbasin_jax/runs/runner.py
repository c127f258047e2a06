"""Run a validated :class:`~cfgbasin_jax.runs.config.RunConfig`: start the processes, take OUTDIR's
lock, load the model, calibrate a gate, generate what is missing, merge the metadata.

    from cfgbasin_jax.runs import config, runner
    runner.run(config.from_flags({...}, method="stp"))

A run writes its identity (config.json, run.log, metadata) only when its first images are ready: a
run that fails before its first image (an image size the device cannot hold, a model that does not
load) leaves nothing behind, and its OUTDIR stays free for another configuration. Outputs, resume and
the lock: :mod:`cfgbasin_jax.runs.folder`.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import time
from pathlib import Path

from cfgbasin_jax import baselines as B
from cfgbasin_jax.method import guidance as G
from cfgbasin_jax.runs import distributed as D
from cfgbasin_jax.runs import folder as R
from cfgbasin_jax.runs import prompts as P
from cfgbasin_jax.runs.config import ConfigError, RunConfig
from cfgbasin_jax.runtime import files as F

log = logging.getLogger("cfgbasin_jax.generate")


class PipelineCache:
    """Loaded pipelines by (model, unet, dtype, weight variant), at most ``size`` of them (the oldest goes first), so
    repeated in-process runs reuse their compiled samplers. A fingerprint other than the cached
    pipeline's (another model now at the same path) loads it again."""

    def __init__(self, size: int = 2):
        self.size = size
        self._items: dict = {}

    def get(self, model: Path, unet_path: Path | None, dtype: str, fingerprint=None, variant: str | None = None):
        import cfgbasin_jax

        key = (str(model), None if unet_path is None else str(unet_path), dtype, variant)
        if key in self._items and fingerprint is not None and self._items[key][0] != fingerprint:
            del self._items[key]
        if key not in self._items:
            while len(self._items) >= self.size:
                self._items.pop(next(iter(self._items)))
            # The command configures the compilation cache itself (--compilation_cache / --no_compilation_cache).
            self._items[key] = (fingerprint, cfgbasin_jax.load_pipeline(model, dtype=dtype, unet_path=unet_path,
                                                                        compilation_cache=False, variant=variant))
        return self._items[key][1]

    def clear(self) -> None:
        self._items.clear()


# The process's pipelines (bounded: two models at a time); cfgbasin-generate and the tests run through it.
PIPELINES = PipelineCache()


# ------------------------------------------------------------------------------------------ logging


class _LogFile(logging.FileHandler):
    """run.log: a record that cannot be written (full disk) is dropped without the logging module's
    traceback; the run's own writes report the error."""

    def handleError(self, record):
        pass


def _formatted(handler: logging.Handler, process: D.ProcessInfo) -> logging.Handler:
    handler.setFormatter(logging.Formatter(f"%(asctime)s [p{process.process_id}] %(message)s", "%H:%M:%S"))
    return handler


def _log_handler(handler: logging.Handler, process: D.ProcessInfo) -> logging.Handler:
    log.addHandler(_formatted(handler, process))
    log.setLevel(logging.INFO)
    log.propagate = False
    return handler


# ------------------------------------------------------------------------------------------ records


def records(c: RunConfig, batch: list[int], prompts: list[str], res, n_tokens: dict, max_len: int,
            gate_threshold=None) -> list[dict]:
    """metadata.jsonl's records of one batch's real images (``batch``: their global indices)."""
    out = []
    for k, i in enumerate(batch):
        index, t = int(res.transition_index[k]), int(res.transition_t[k])
        rec = {
            "index": i,
            "prompt": c.prompt_set.prompts[i],
            "file": R.image_file(i, c.method.image_tag(index, t)),
            "seed": c.seed,
            "method": c.label,
            "guidance_scale": c.scale_before,
            "guidance_scale_later": c.scale_after,
            "guidance": c.guidance.describe(),
            "transition_index": index,
            "transition_t": t,
            "noise_diff": res.noise_diff[k],
            "nonfinite": bool(res.nonfinite[k]),
            "unet_evals": res.unet_evals / len(prompts),  # this image's share of its batch's UNet work
            "n_tokens": n_tokens[i],
            "truncated": n_tokens[i] > max_len,
            "source": c.prompt_set.extras[i],
        }
        rec.update({name: getattr(res, name)[k] for name in c.method.records})
        if res.gate_score is not None:
            rec.update(gate_score=float(res.gate_score[k]), gate_flagged=bool(res.gate_flagged[k]),
                       gate_threshold=gate_threshold)
        if prompts[k] != rec["prompt"]:
            rec["prompt_used"] = prompts[k]
        out.append(rec)
    return out


# ------------------------------------------------------------------------------------------ the run


class Run:
    """One execution of a :class:`RunConfig` (its state: the process, the lock, the gate threshold)."""

    def __init__(self, config: RunConfig, pipelines: PipelineCache = PIPELINES):
        self.c = config
        self.pipelines = pipelines
        self.process = config.process
        self.gate_threshold = None if config.guidance.gate is None else config.guidance.gate.threshold  # or calibrated
        self.resume = False
        self.handlers: list = []

    def guidance(self) -> G.Guidance:
        """The schedule sampled: the config's, with the calibrated threshold if any."""
        g = self.c.guidance
        if g.gate is not None and g.gate.threshold is None and self.gate_threshold is not None:
            return G.with_threshold(g, self.gate_threshold)
        return g

    def sample_kwargs(self) -> dict:
        """Pipeline.generate arguments of every batch (its default devices are this process's)."""
        c = self.c
        return dict(num_inference_steps=c.num_inference_steps, seed=c.seed, height=c.img_size, width=c.img_size,
                    scheduler=c.scheduler, pixels=c.pixels, progress=c.progress == "steps")

    def execute(self) -> int:
        from cfgbasin_jax.runtime import compile_cache
        from cfgbasin_jax.runtime.compile_cache import CompileStats

        c = self.c
        self.resume = R.check_config(c.outdir, c.identity())  # before waiting for peers
        old_cache = compile_cache.configure(c.compilation_cache)
        self.handlers = [_log_handler(logging.StreamHandler(sys.stderr), c.process)]
        lock = None
        try:
            try:  # first: a peer that never comes ends this process (watchdog) with nothing written
                self.process = D.initialize(c.process, c.distributed_timeout)
            except D.DistributedError as err:
                raise ConfigError(str(err)) from None
            lock = self.lock()
            with CompileStats() as stats:
                return self._execute(stats)
        finally:
            for h in self.handlers:
                log.removeHandler(h)
                h.close()
            compile_cache.restore(old_cache)
            if lock is not None:
                lock.release()

    def lock(self) -> R.RunLock:
        """Take OUTDIR's run lock, then check the stored configuration again: another run may have
        written it since the first look."""
        lock = R.RunLock(self.c.outdir, self.process.process_id).acquire()
        try:
            if lock.stale_owner:
                log.warning("warning: took over the lock of a run that is gone (%s)", F.describe_owner(lock.stale_owner))
            self.resume = R.check_config(self.c.outdir, self.c.identity())
        except BaseException:
            lock.release()
            raise
        return lock

    def _execute(self, stats) -> int:
        from cfgbasin_jax.models.errors import ConversionError

        c = self.c
        t_load = time.perf_counter()
        try:
            pipe = self.pipelines.get(c.model, c.unet_path, c.dtype, (c.model_fingerprint, c.unet_fingerprint), c.variant)
            pipe.latent_hw(c.img_size, c.img_size)
        except ConversionError as err:
            raise ConfigError(f"cannot load the model: {err}") from None
        except ValueError as err:
            raise ConfigError(f"--img_size {c.img_size}: {err}") from None
        load_s = time.perf_counter() - t_load
        if c.gate_calibration is not None:
            self.calibrate(pipe)
        indices = list(range(len(c.prompt_set.prompts)))
        prompts, extra = B.prepare(c.hook, list(c.prompt_set.prompts), indices, seed=c.seed, tokenizer=pipe.tokenizer)
        try:
            return self._write(stats, pipe, prompts, extra, load_s)
        except OSError as err:
            raise R.RunError(f"{F.describe(err)}; every finished image is kept: fix this and rerun the same "
                             "command to resume") from None

    def calibrate(self, pipe) -> None:
        """The gate threshold from the --gate_calibrate prompts (sampled as the run samples: same seed,
        steps, size, scheduler and batch size; sample indices 0..N-1)."""
        from cfgbasin_jax.pipeline import calibrate_threshold

        cal = self.c.gate_calibration
        t0 = time.perf_counter()
        kwargs = {**self.sample_kwargs(), "progress": False, "batch_size": self.c.batch_size}
        self.gate_threshold = calibrate_threshold(pipe, list(cal.prompts), self.c.guidance, cal.fpr, **kwargs)
        log.info("gate threshold %.4f: the %g quantile of %d plain prompts' scores (%s), %.1f s", self.gate_threshold,
                 1 - cal.fpr, len(cal.prompts), cal.file, time.perf_counter() - t0)

    def _start_writing(self, buffer: logging.handlers.MemoryHandler) -> R.MetadataWriter:
        """The run's first write: folders, run.log (with the lines logged so far), config.json."""
        c, pid, nproc = self.c, self.process.process_id, self.process.num_processes
        R.make_dirs(c.outdir, plots=c.plot == "images")
        file_handler = _formatted(_LogFile(c.outdir / R.log_name(pid, nproc), encoding="utf-8"), self.process)
        buffer.setTarget(file_handler)
        buffer.flush()
        log.removeHandler(buffer)
        self.handlers.remove(buffer)
        log.addHandler(file_handler)
        self.handlers.append(file_handler)
        if self.process.is_main:
            R.write_config(c.outdir, c.identity(), c.run_info(self.gate_threshold), pid)
        R.clean_temp_files(c.outdir, pid)
        return R.MetadataWriter(c.outdir, R.metadata_name(pid, nproc))

    def _write(self, stats, pipe, prompts: list, extra: dict, load_s: float) -> int:
        """Generate the missing images into OUTDIR; the first write happens once the first batch is ready."""
        import jax
        from tqdm.auto import tqdm

        c, pid, nproc = self.c, self.process.process_id, self.process.num_processes
        buffer = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
        self.handlers.append(_log_handler(buffer, self.process))
        log.info("%s: %s, %s; prompts %s [%d, %d) of %d; model %s%s; %s", c.label, c.guidance.describe(), c.scheduler,
                 c.exp, c.start_iter, c.end_iter, len(c.prompt_set), c.model,
                 f" + unet {c.unet_path}" if c.unet_path else "", "resuming" if self.resume else "new run")
        for w in c.warnings:
            log.warning("warning: %s", w)
        log.info("model loaded in %.1f s; process %d of %d; %d local device(s)", load_s, pid, nproc,
                 len(jax.local_devices()))

        done = R.completed(c.outdir, R.read_records(c.outdir))
        R.check_prompts(done, c.prompt_set.prompts, c.outdir)
        mine = D.share(D.batch_grid(c.start_iter, c.end_iter, c.batch_size), c.batch_size, pid, nproc)
        todo = [(b, [i for i in b if i not in done]) for b in mine]
        todo = [(b, missing) for b, missing in todo if missing]
        n_todo, n_mine = sum(len(m) for _, m in todo), sum(len(b) for b in mine)
        log.info("%d of this process's %d images already done; %d to generate in %d batch(es) of %d",
                 n_mine - n_todo, n_mine, n_todo, len(todo), c.batch_size)
        wanted = sorted({i for b, _ in todo for i in b})
        counts = dict(zip(wanted, P.token_counts(pipe.tokenizer, [prompts[i] for i in wanted]))) if wanted else {}
        max_len = int(pipe.tokenizer.model_max_length)
        n_trunc = sum(1 for v in counts.values() if v > max_len)
        if n_trunc:
            log.info("%d prompt(s) longer than %d tokens are truncated as SD's CLIP tokenizer does", n_trunc, max_len)

        kwargs = {**self.sample_kwargs(), **extra, "guidance": self.guidance()}
        stats.reset()  # report the sampling compiles only
        n_new = n_nonfinite = 0
        t_run = time.perf_counter()
        writer = self._start_writing(buffer) if self.resume or not todo else None
        try:
            bar = tqdm(total=n_todo, unit="img", desc=c.label, disable=c.progress == "none")
            for k, (batch, missing) in enumerate(todo):
                padded = batch + [batch[-1]] * (c.batch_size - len(batch))
                batch_prompts = [prompts[i] for i in padded]
                t0 = time.perf_counter()
                res = B.sample(pipe, c.hook, batch_prompts, sample_indices=padded, **kwargs)
                recs = records(c, batch, batch_prompts, res, counts, max_len, self.gate_threshold)
                new = [r for r in recs if r["index"] in set(missing)]
                writer = writer or self._start_writing(buffer)
                for r in new:
                    R.write_png(c.outdir, r["file"], res.images[batch.index(r["index"])], pid)
                writer.append(new)
                n_new += len(new)
                n_nonfinite += sum(r["nonfinite"] for r in new)
                bar.update(len(new))
                if k == 0:
                    log.info("first batch %.1f s: %s", time.perf_counter() - t0, stats.summary(c.compilation_cache))
            bar.close()
        finally:
            if writer is not None:
                writer.close()
        run_s = time.perf_counter() - t_run
        if n_nonfinite:
            log.warning("warning: %d image(s) had non-finite latents (metadata 'nonfinite')", n_nonfinite)
        D.barrier("cfgbasin_generate_done", self.process)
        if self.process.is_main:
            self._finish()
        rate = f", {n_new / run_s:.2f} img/s" if n_new and run_s > 0 else ""
        log.info("done: %d new image(s) in %.1f s%s; %s; sampler compilations %d", n_new, run_s, rate,
                 stats.summary(c.compilation_cache), pipe.compile_count())
        return 0

    def _finish(self) -> None:
        """Process 0: merge the metadata, plot the noise differences."""
        c = self.c
        merged = R.merge_metadata(c.outdir, self.process.process_id)
        in_range = [r for r in merged if c.start_iter <= r["index"] < c.end_iter]
        if c.plot != "none" and in_range:
            from cfgbasin_jax.runs import plots

            plots.plot_run(in_range, c.outdir / "noise_diff.png", title=f"{c.label}: noise difference, "
                           f"{len(in_range)} image(s); o = transition")
            if c.plot == "images":
                for r in in_range:
                    plots.plot_image(r, c.outdir / R.PLOTS_DIR / f"{r['index']}.png")
        log.info("metadata.jsonl: %d image(s) in %s", len(merged), c.outdir)


def run(config: RunConfig, pipelines: PipelineCache = PIPELINES) -> int:
    """Execute ``config`` (see :class:`Run`); 0 when done. Errors: ConfigError, RunError, OSError."""
    return Run(config, pipelines).execute()
