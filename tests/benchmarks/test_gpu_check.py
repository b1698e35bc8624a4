"""benchmarks/gpu_check.py runs end to end on CPU, without Ray, so that it does not first break on the GPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"

# The lent GPU machine has no Ray. A None in sys.modules makes every `import ray` (and ray.x) raise ImportError
# and importlib.util.find_spec("ray") answer None, as where Ray is not installed.
WITHOUT_RAY = """
import runpy, sys
sys.modules["ray"] = None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

PARTS = {"parity", "quantization", "fine-tuning", "speed", "decode-step", "pipeline"}


def test_gpu_check_runs_on_cpu_without_ray_and_every_check_passes_or_says_why_not(tmp_path):
    out = tmp_path / "gpu-check-cpu.json"
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY, str(SCRIPT), "--device", "cpu", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    rows = {(r["part"], r["name"]): r for r in report["rows"]}
    assert {part for part, _ in rows} == PARTS
    assert not report["ray_imported"]

    # On CPU every check runs or is skipped for a stated reason; none fails.
    for (part, name), row in rows.items():
        assert row["status"] in ("passed", "skipped", "not built"), (part, name, row.get("error"))
        if row["status"] != "passed":
            assert row["reason"], (part, name)

    parity = rows[("parity", "fp32 tokens vs transformers")]
    assert parity["status"] == "passed"
    assert parity["greedy"]["identical"] and parity["beam4"]["identical"]

    weight_only = rows[("quantization", "int8 weight-only vs its dequantized reference")]
    assert weight_only["status"] == "passed" and weight_only["largest_difference"] <= weight_only["bound"]

    full = rows[("fine-tuning", "full, DDP world size 1")]
    assert full["ddp"] and full["backend"] == "gloo"
    assert math.isfinite(full["first_loss"]) and math.isfinite(full["last_loss"])

    assert rows[("pipeline", "one replica (estimate)")].get("estimate") is True
