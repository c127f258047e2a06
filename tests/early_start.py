"""Subprocess checks started ahead of the tests that read them (tests/conftest.py's `early` fixture).

CI runs the suite on two cores and the in-process tests keep about one of them busy: the long
subprocess checks run one after another on the other, in the order queued; a test that needs one
not yet begun starts it at once.
"""

import subprocess
import threading


class Started:
    """A subprocess, its stdout and stderr written to files under ``logs``."""

    def __init__(self, cmd: list, env: dict, logs):
        self.cmd, self.env, self.logs = [str(c) for c in cmd], env, logs
        self.proc = None
        self._lock = threading.Lock()
        self._stopped = False

    def start(self) -> None:
        with self._lock:
            if self.proc is None and not self._stopped:
                self.logs.mkdir(parents=True, exist_ok=True)
                with open(self.logs / "stdout", "wb") as out, open(self.logs / "stderr", "wb") as err:
                    self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=err)

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        """Start it if not yet begun, wait (at most ``timeout`` seconds from now); exit status and output."""
        self.start()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        read = lambda name: (self.logs / name).read_text(errors="replace")  # noqa: E731
        return subprocess.CompletedProcess(self.cmd, self.proc.returncode, read("stdout"), read("stderr"))

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def run_in_order(jobs: list) -> threading.Thread:
    """Start ``jobs`` (:class:`Started`) one after another, each when the one before has ended."""

    def run():
        for job in jobs:
            job.start()
            if job.proc is not None:
                job.proc.wait()

    thread = threading.Thread(target=run, name="early subprocess checks", daemon=True)
    thread.start()
    return thread
