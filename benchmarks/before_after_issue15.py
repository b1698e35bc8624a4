"""benchmarks/run.py with engines as the code was at a git revision, beside today's: `--engines NAME@REV` runs the
engine NAME (any of benchmarks/engines.py's) on the `model` package of revision REV. It takes turns with the others
in the same process, so that a loaded machine slows the two versions alike and the ratios are fair. Issue 15's
before and after, the revision before its beam-step and int8-head changes being 34ce186:

    python benchmarks/before_after_issue15.py --engines ct2-int8,ours-int8-dynamic-continuous@34ce186,\\
        ours-int8-dynamic-continuous --decoding greedy,beam4 --docs 32 --repeats 2 --threads 1 --no-memory

The revision's `model` package is exported with `git archive` into a temporary folder, imported from there under
its own name `model`, and swapped in for today's (in sys.modules) while its engine loads and runs: the engines'
code finds it where it finds today's. Other arguments as run.py's, but --no-memory: the memory probes run run.py,
which has no NAME@REV engines.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import engines, run  # noqa: E402

PACKAGE = "model"


def _ours(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


class Code:
    """The `model` package as it was at `revision`, with the modules it has imported so far (kept while swapped out)."""

    def __init__(self, revision: str):
        self.revision = revision
        folder = Path(tempfile.mkdtemp(prefix=f"lakesum-{revision}-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        archive = subprocess.run(["git", "archive", revision, PACKAGE], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
        self.init = folder / PACKAGE / "__init__.py"
        self.modules: dict = {}

    @contextlib.contextmanager
    def swapped_in(self):
        today = {name: sys.modules.pop(name) for name in list(sys.modules) if _ours(name)}
        if not self.modules:
            spec = importlib.util.spec_from_file_location(
                PACKAGE, self.init, submodule_search_locations=[str(self.init.parent)]
            )
            package = importlib.util.module_from_spec(spec)
            sys.modules[PACKAGE] = package
            spec.loader.exec_module(package)
        sys.modules.update(self.modules)
        try:
            yield
        finally:
            self.modules = {name: sys.modules.pop(name) for name in list(sys.modules) if _ours(name)}
            sys.modules.update(today)


class AtRevision:
    """An engine built and run with `code` swapped in."""

    def __init__(self, code: Code, build):
        self.code = code
        with code.swapped_in():
            self.engine = build()
        self.output = self.engine.output

    def run(self, docs, decoding):
        with self.code.swapped_in():
            return self.engine.run(docs, decoding)

    def peak_device_bytes(self):
        return self.engine.peak_device_bytes()


def register(names: list[str]) -> None:
    """Add engines.ENGINES entries for the NAME@REV among `names`, one Code per revision."""
    code: dict[str, Code] = {}
    for name in names:
        if "@" not in name:
            continue
        base, revision = name.split("@", 1)
        if base not in engines.ENGINES:
            raise SystemExit(f"unknown engine {base!r} in {name!r}; use one of {', '.join(engines.ENGINES)}")
        if revision not in code:
            code[revision] = Code(revision)
        devices, build = engines.ENGINES[base]
        engines.ENGINES[name] = (
            devices,
            lambda ctx, shared, build=build, code=code[revision]: AtRevision(code, lambda: build(ctx, {})),
        )


if __name__ == "__main__":
    register(run.parse_args().engines.split(","))
    run.main()
