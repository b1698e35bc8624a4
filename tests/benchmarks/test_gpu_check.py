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

PARTS = {"parity", "quantization", "fine-tuning", "speed", "decode-step", "pipeline", "load"}


def gpu_check_on_cpu(out: Path, *args: str) -> dict:
    """The script's report of a run with `args` on CPU, without Ray."""
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_RAY, str(SCRIPT), "--device", "cpu", "--out", str(out), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text(encoding="utf-8"))


def test_gpu_check_runs_on_cpu_without_ray_and_every_check_passes_or_says_why_not(tmp_path):
    report = gpu_check_on_cpu(tmp_path / "gpu-check-cpu.json")
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
    # the compiled decode step's checks and GPU memory skip on CPU by default, saying why
    for key in [
        ("pipeline", "stages, compiled decode"),
        ("quantization", "int8 weight-only compiled vs eager, float32"),
    ]:
        assert rows[key]["status"] == "skipped" and "--compile-backend" in rows[key]["reason"]
    assert {r["status"] for (part, _), r in rows.items() if part == "load"} == {"skipped"}


def test_gpu_check_pipeline_stages_compiled_give_eager_summaries_on_cpu(tmp_path):
    """The pipeline check's own path, on CPU with dynamo's eager backend (traced whole, as on CUDA, without
    inductor's code generation): the stages decoding through the compiled step answer every row, and their
    float32 summaries are the eager stages'."""
    report = gpu_check_on_cpu(
        tmp_path / "gpu-check-cpu-pipeline.json", "--parts", "pipeline", "--compile-backend", "eager"
    )
    rows = {r["name"]: r for r in report["rows"]}
    stages = rows["stages, compiled decode"]
    assert stages["status"] == "passed", stages.get("error") or stages.get("summary")
    assert stages["every_row_answered"] and stages["float32_identical_to_eager"]
    assert stages["graphs_compiled"]["first_pass"] > 0  # it did decode through the compiled step
    assert stages["rows_with_summary"] == stages["documents"] - 2  # the null and the blank row have errors
