"""benchmarks/end_to_end.py runs at a tiny size: every setting writes every document, each summary runs to the cap."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "end_to_end.py"
SETTINGS = ["ray-data-transformers", "ray-data-ct2-int8", "lakesum-fp32"]


def test_end_to_end_runs_every_setting_to_the_cap_and_times_its_start_up(tmp_path, tiny_checkpoint):
    out = tmp_path / "end-to-end.json"
    new_tokens, docs = 40, 4  # at 40 tokens, half of these documents end sooner without min_new_tokens
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny_checkpoint), "--work", str(tmp_path / "work")]
        + ["--docs", str(docs), "--files", "2", "--chars", "200", "--max-new-tokens", str(new_tokens)]
        + ["--replicas", "1", "--settings", ",".join(SETTINGS), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    rows = {row["setting"]: row for row in report["rows"]}

    expected = set(SETTINGS)
    if importlib.util.find_spec("ctranslate2") is None:
        assert "not installed" in report["skipped"]["ray-data-ct2-int8"]
        expected.remove("ray-data-ct2-int8")
    assert set(rows) == expected
    assert report["documents"]["count"] == docs and len(report["documents"]["scripts"]) > 1
    assert report["machine"]["simd"] and report["machine"]["cpu"]

    for name, row in rows.items():
        assert row["documents_written"] == [docs], name
        # min_new_tokens = max_new_tokens reached the engine: outputs run to the cap (a random model may emit the
        # pad id now and then, which is not counted: one in 40 is allowed)
        assert new_tokens - 1 <= row["output_tokens_per_doc"]["mean"] <= new_tokens, (
            name,
            row["output_tokens_per_doc"],
        )
        assert 0 < row["median_startup_seconds"] < row["median_seconds"], name
        assert row["docs_per_second_without_startup"] > row["docs_per_second"], name
    # the job and transformers, both float32 and greedy, did the same work from the same input ids (the fast
    # tokenizer the script saves agrees with ours): the same summaries
    assert report["agreement"]["lakesum-fp32 vs ray-data-transformers"] == 1.0
    assert "placed" in {e["event"] for e in rows["lakesum-fp32"]["events_first_run"]}
    assert {"lakesum-fp32 / ray-data-transformers (docs_per_second)"} <= set(report["ratios"])
