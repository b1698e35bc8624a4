"""benchmarks/quality_descriptions.py at toy scale: both fine-tunings see the same batches and start from the same
loss, every model is scored, and every speed setting is compared with float32."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from synthetic.checkpoints import build_trainable_checkpoint
from synthetic.corpus import first_words_task
from tests.benchmarks.helpers import run_benchmark


def _task(path: Path, count: int, seed: int) -> Path:
    rows = [{"text": r["text"], "summary": r["summary"], "language": r["lang"]} for r in first_words_task(count, seed)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_trainer_replays_our_order_from_the_same_loss_and_every_setting_is_scored(tmp_path, spiece_model):
    steps = 4
    base = build_trainable_checkpoint(tmp_path / "base", spiece_model, d_model=32)
    arguments = (
        ["--base", str(base), "--work", str(tmp_path / "work")]
        + ["--train", str(_task(tmp_path / "train.parquet", 48, seed=1))]
        + ["--eval", str(_task(tmp_path / "eval.parquet", 24, seed=2))]
        + ["--seeds", "0", "--steps", str(steps), "--batch-size", "4", "--log-every", "2", "--warmup-steps", "1"]
        + ["--max-input-tokens", "32", "--max-target-tokens", "8", "--max-new-tokens", "6", "--lr", "1e-2"]
        + ["--eval-per-language", "2", "--spot-check", "4", "--vocabulary-rows", "40", "--jobs", "1"]
    )
    report = run_benchmark("quality_descriptions.py", arguments, tmp_path / "quality.json")
    assert report["machine"]["simd"] and report["machine"]["cpu"]
    runs = {run["arm"]: run for run in report["runs"]}
    assert set(runs) == {"ours", "trainer"}

    trainer = runs["trainer"]
    # the Trainer was handed exactly our job's batches (pipeline/train.py's order), tokenized to the same ids
    assert trainer["data_order_identical"] is True and trainer["batches_checked"] == steps
    assert trainer["tokenized_texts_differing_from_ours"] == 0
    # Step 1 is the same forward from the same weights on the same ids, in float32 by both: the two means of a few
    # dozen token losses over a 4,096-row softmax differ by summation order alone, about 1e-6 relative; 1e-4 leaves
    # a hundredfold margin, while a different loss (unsmoothed, per-row mean, another batch) is off by percents.
    assert report["loss_curves_ours_vs_trainer"]["0"]["first_step_relative_difference"] < 1e-4
    for run in runs.values():
        assert [point["step"] for point in run["loss_curve"]] == [2, 4]
        # our engine generates what transformers generates from the same checkpoint and ids
        spot = run["transformers_spot_check"]
        assert spot["documents"] == 4 and spot["greedy"] == 4 and spot["beam4"] == 4, spot
        for decoding in ("greedy", "beam4"):
            assert set(run["scores"][decoding]) == {"overall", *report["lead_baseline"]["k"]}

    assert set(report["lead_baseline"]["k"]) == set(report["setup"]["rows"]["eval_file"])
    assert report["setup"]["rows"]["scored"] == sum(min(2, n) for n in report["setup"]["rows"]["eval_file"].values())
    settings = {(row["setting"], row["decoding"]) for row in report["quantization"]}
    assert settings == {
        (s, d) for s in ("fp32", "int8-dynamic", "bnb-int8", "bnb-nf4", "vocab") for d in ("greedy", "beam4")
    }
    for row in report["quantization"]:
        if row["setting"] == "fp32":
            assert row["sequence_agreement"] == 1.0 and row["token_agreement"] == 1.0

    # --arms ours: our job alone (a long headline run), reported from the same work folder without the Trainer
    ours_alone = run_benchmark("quality_descriptions.py", [*arguments, "--arms", "ours"], tmp_path / "ours.json")
    assert [run["arm"] for run in ours_alone["runs"]] == ours_alone["setup"]["arms"] == ["ours"]
    assert ours_alone["runs"][0]["scores"] == runs["ours"]["scores"]
    assert set(ours_alone["summary"]["greedy"]) == {"ours"} and ours_alone["loss_curves_ours_vs_trainer"] == {}
