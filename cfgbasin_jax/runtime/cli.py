"""What the command lines share: an argument parser whose errors are one line, and the one-line
error and interruption messages (exit status 2, 130 for SIGINT, 143 for SIGTERM)."""

from __future__ import annotations

import argparse
import signal
import sys


class UsageError(ValueError):
    """A bad command line (argparse's message, one line)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse without the usage dump: a bad flag or value raises :class:`UsageError` with argparse's
    one-line message (``argument --threshold: invalid float value: 'abc'``); --help still works."""

    def error(self, message):
        raise UsageError(message)


def fail(prog: str, message: str) -> int:
    """Print ``PROG: error: MESSAGE`` on one line (whitespace runs folded) to stderr; returns 2."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def interrupted(prog: str, err: KeyboardInterrupt, dst) -> int:
    """The line for a conversion stopped by SIGINT (KeyboardInterrupt) or SIGTERM
    (:class:`cfgbasin_jax.runtime.files.Terminated`); returns 128 + the signal number."""
    from cfgbasin_jax.runtime.files import Terminated

    terminated = isinstance(err, Terminated)
    print(f"{prog}: {'terminated' if terminated else 'interrupted'}; nothing written at {dst}", file=sys.stderr)
    return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
