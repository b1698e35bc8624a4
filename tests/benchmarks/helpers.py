"""What the benchmark tests share: run a benchmark script at toy scale and read the results file it wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_benchmark(script: str, arguments: list[str], out: Path, timeout: int = 600) -> dict:
    """`python benchmarks/<script> <arguments> --out <out>` from the repository root; its results JSON, after
    asserting it exited 0 (the failure shows the end of its stderr)."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *arguments, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text(encoding="utf-8"))
