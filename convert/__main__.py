"""cfgbasin-convert: diffusers Stable Diffusion folder -> cfgbasin_jax converted directory.

    cfgbasin-convert SRC DST [--dtype float32|bfloat16|float16] [--unet UNET_DIR] [--variant fp16] [--overwrite]
    cfgbasin-convert sscd FILE DST [--overwrite]   (SSCD copy-detection weights; cfgbasin_jax.convert.sscd,
                                                    same destination rules and exit statuses)
    cfgbasin-convert --cache-info | --cache-clear   (the conversion cache; cfgbasin_jax.loading.cache)

Exit status 0 on success, 2 with a one-line message on bad input (missing folder or weight file,
missing / unexpected / mis-shaped parameter, unsupported config key, unknown dtype, a destination
that is, contains or lies inside the source, --overwrite of a folder we did not write) or on an I/O
error (read-only or full file system, no permission; the message names the path). Interrupted
(SIGINT 130, SIGTERM 143): the partial output is removed. Nothing is ever left at DST unless the
conversion succeeded; a DST that another conversion created meanwhile is left alone (exit 2); --overwrite
through a symlink replaces its target. A parameter holding NaN/Inf values is reported as a warning
naming its key.
"""

from __future__ import annotations

import sys

from cfgbasin_jax.models.errors import ConversionError
from cfgbasin_jax.runtime.cli import OneLineParser, UsageError, fail, interrupted

PROG = "cfgbasin-convert"
SSCD_COMMAND = "sscd"


def _parser() -> OneLineParser:
    parser = OneLineParser(
        prog=PROG,
        description=(
            "Convert a diffusers-format Stable Diffusion folder (SD 1.x / 2.x, .safetensors or .bin "
            "weights) into one directory of Flax params (orbax) + configs + tokenizer + scheduler "
            f"config. '{PROG} {SSCD_COMMAND} FILE DST' converts SSCD weights instead; '{PROG} --cache-info' / "
            f"'--cache-clear' report / empty the conversion cache (load_pipeline's converted diffusers folders)."
        ),
    )
    parser.add_argument(
        "src", help="diffusers folder with model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/"
    )
    parser.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--dtype", default="float32", help="params dtype: float32 (default), bfloat16 or float16")
    parser.add_argument(
        "--unet", dest="unet_path", default=None,
        help="a separately fine-tuned diffusers unet/ folder (e.g. checkpoint-20000/unet) to use instead of SRC/unet",
    )
    parser.add_argument(
        "--variant", default=None,
        help="read the weight files of this diffusers variant (e.g. fp16: *.fp16.safetensors or its shard "
             "index) where a folder has them, else the plain ones (diffusers' from_pretrained(variant=...))",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    return parser


def _fail(message: str) -> int:
    return fail(PROG, message)


def _run_sscd(argv: list) -> int:
    try:
        from cfgbasin_jax.convert import sscd
    except ModuleNotFoundError as err:
        if err.name != "cfgbasin_jax.convert.sscd":
            raise
        return _fail("SSCD conversion is not available in this installation (no cfgbasin_jax.convert.sscd)")
    try:
        status = sscd.main(argv)
    except ConversionError as err:
        return _fail(str(err))
    return 0 if status is None else int(status)


CACHE_FLAGS = ("--cache-info", "--cache-clear")


def _run_cache(flag: str) -> int:
    """One line: the conversion cache's entries and size, or what --cache-clear removed."""
    import shutil

    from cfgbasin_jax.runtime import cache_dirs as C

    folder = C.conversion_cache_dir()
    if folder is None:
        print(f"conversion cache off (${C.CONVERSION_ENV}=0)")
        return 0
    found = C.entries(folder)
    size = sum(C.tree_size(p) for p in found)
    if flag == "--cache-info":
        print(f"{len(found)} converted model(s), {C.human_bytes(size)} in {folder}")
        return 0
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    print(f"removed {len(found)} converted model(s), {C.human_bytes(size)}, from {folder}")
    return 0


def main(argv=None) -> int:
    """Run the converter; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == SSCD_COMMAND:
        return _run_sscd(argv[1:])
    if len(argv) == 1 and argv[0] in CACHE_FLAGS:
        return _run_cache(argv[0])
    try:
        args = _parser().parse_args(argv)
    except UsageError as err:
        return _fail(str(err))
    from cfgbasin_jax.convert.sd_folder import convert
    from cfgbasin_jax.models.builders import resolve_dtype

    try:
        resolve_dtype(args.dtype)
    except ConversionError as err:
        return _fail(f"--dtype: {err}")
    from cfgbasin_jax.runtime import files

    def note(message: str) -> None:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    try:
        with files.terminate_raises():
            dst = convert(args.src, args.dst, dtype=args.dtype, unet_path=args.unet_path, overwrite=args.overwrite,
                          log=note, variant=args.variant)
    except ConversionError as err:
        return _fail(str(err))
    except OSError as err:
        return _fail(files.describe(files.with_path(err, args.dst)))
    except KeyboardInterrupt as err:
        return interrupted(PROG, err, args.dst)
    print(f"wrote {dst} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
