"""Run Python code with some packages made unimportable, as if they were broken installs.

    python tests/blocked_imports.py torch,diffusers -c "import cfgbasin_jax; ..."
    python tests/blocked_imports.py torch,diffusers -m cfgbasin_jax.apps.demo --steps 2
    python tests/blocked_imports.py --allow-attempts torch -c "..."

A meta-path finder in front of every other one hands out a spec for each blocked package (and its
submodules) whose loader raises ImportError. So ``importlib.util.find_spec`` still finds them (they
look installed, and libraries that probe for them behave as they would with them installed) but any
``import`` of them fails. Every attempt is recorded, so an import that the code catches and works
around (one that would succeed where the package is installed) is caught too: at exit, any attempt
is an error (exit 3, naming the module and the importing line) unless ``--allow-attempts``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import runpy
import sys
import traceback


class BlockedImport(ImportError):
    pass


class _Loader(importlib.abc.Loader):
    def __init__(self, attempts: list):
        self.attempts = attempts

    def create_module(self, spec):
        caller = next((f for f in reversed(traceback.extract_stack()[:-1]) if "importlib" not in f.filename), None)
        self.attempts.append(f"{spec.name} (from {caller.filename}:{caller.lineno})" if caller else spec.name)
        raise BlockedImport(f"import of {spec.name!r} is blocked (tests/blocked_imports.py)", name=spec.name)

    def exec_module(self, module):  # never reached: create_module raises
        raise BlockedImport(f"import of {module.__name__!r} is blocked", name=module.__name__)


class BlockingFinder(importlib.abc.MetaPathFinder):
    def __init__(self, names):
        self.names = tuple(names)
        self.attempts: list = []

    def blocks(self, fullname: str) -> bool:
        return any(fullname == n or fullname.startswith(n + ".") for n in self.names)

    def find_spec(self, fullname, path=None, target=None):
        if self.blocks(fullname):
            return importlib.machinery.ModuleSpec(fullname, _Loader(self.attempts))
        return None


def install(names) -> BlockingFinder:
    finder = BlockingFinder(names)
    sys.meta_path.insert(0, finder)
    return finder


def main(argv) -> int:
    allow_attempts = bool(argv) and argv[0] == "--allow-attempts"
    names, mode, target, *rest = argv[1:] if allow_attempts else argv
    finder = install(names.split(","))
    sys.argv = [target, *rest]
    try:
        if mode == "-c":
            exec(compile(target, "<blocked_imports -c>", "exec"), {"__name__": "__main__"})
        elif mode == "-m":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            raise SystemExit(f"blocked_imports: use -c CODE or -m MODULE, not {mode!r}")
    except SystemExit as exit_:
        code = exit_.code
    else:
        code = 0
    leaked = sorted(m for m in sys.modules if finder.blocks(m))
    if leaked or (finder.attempts and not allow_attempts):
        print(f"blocked_imports: imports of blocked modules were attempted: {'; '.join(finder.attempts)}"
              + (f"; present in sys.modules: {', '.join(leaked)}" if leaked else ""), file=sys.stderr)
        return 3
    return code if isinstance(code, int) else (0 if code is None else 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
