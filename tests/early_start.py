"""Subprocess checks started ahead of the tests that read them (tests/conftest.py's `early` fixture).

CI runs the suite on two cores and the in-process tests keep about one of them busy: the long
subprocess checks run one job after another on the other, in the order queued; a test that needs a
job not yet begun starts it at once.
"""

import subprocess
import threading


def selected(items, test: str) -> bool:
    """Whether the collected ``items`` include test function ``test`` (any parametrisation)."""
    return any(item.originalname == test for item in items)


class Started:
    """Commands run one after another, each with its stdout and stderr in files under ``logs``."""

    def __init__(self, commands: list, env: dict, logs):
        self.commands = [[str(c) for c in cmd] for cmd in commands]
        self.env, self.logs = env, logs
        self.results: list = []
        self._proc = None
        self._claimed = self._stopped = False
        self._lock = threading.Lock()
        self._done = threading.Event()

    def run(self) -> None:
        """Run the commands (once: a second call returns at once)."""
        with self._lock:
            if self._claimed:
                return
            self._claimed = True
        try:
            self.logs.mkdir(parents=True, exist_ok=True)
            for i, cmd in enumerate(self.commands):
                out_path, err_path = self.logs / f"{i}.stdout", self.logs / f"{i}.stderr"
                with self._lock, open(out_path, "wb") as out, open(err_path, "wb") as err:
                    if self._stopped:
                        return
                    try:
                        self._proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=err)
                    except OSError as e:  # no such program: as a shell reports it
                        self.results.append(subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]}: {e}"))
                        return
                self._proc.wait()
                read = lambda path: path.read_text(errors="replace")  # noqa: E731
                self.results.append(subprocess.CompletedProcess(cmd, self._proc.returncode, read(out_path),
                                                                read(err_path)))
        finally:
            self._done.set()

    def wait(self, timeout: float) -> list:
        """Run it now if not yet begun; wait at most ``timeout`` seconds; one CompletedProcess per command."""
        threading.Thread(target=self.run, daemon=True).start()
        if not self._done.wait(timeout):
            self.stop()
            raise TimeoutError(f"{self.commands} did not end within {timeout} s")
        return self.results

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()


def run_in_order(jobs: list) -> threading.Thread:
    """Run ``jobs`` (:class:`Started`) one after another in a background thread."""

    def run():
        for job in jobs:
            job.run()

    thread = threading.Thread(target=run, name="early subprocess checks", daemon=True)
    thread.start()
    return thread
