"""The summarize job end to end on a local Ray: exactly once, in order, equal to generate, bad input answered."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model import ModelLoadError, MT5ForConditionalGeneration, MT5Tokenizer
from model.generate import GenerationConfig
from pipeline.driver import model_fingerprint, run
from pipeline.errors import InputError, OutputError
from pipeline.settings import SummarizeSettings
from pipeline.stages import EMPTY_TEXT, Summarizer
from pipeline.stats import Stats
from synthetic.corpus import documents, write_shards
from tests.pipeline.helpers import REPO, SETTINGS, local_job_env, read_output


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 documents in 3 files under Hive folders, row groups of 8, with empty, blank, null and long texts."""
    docs = documents(60, seed=1)
    docs[3]["text"] = None
    docs[5]["text"] = "   \n "
    docs[7]["text"] = ""
    docs[10]["text"] = " ".join([docs[10]["text"]] * 30)  # far past max_input_tokens
    root = tmp_path_factory.mktemp("corpus")
    write_shards(root, docs, files=3, row_group_size=8)
    return root, docs


def test_every_row_once_in_order_and_equal_to_generate(ray_local, corpus, tiny_checkpoint, tmp_path):
    root, docs = corpus
    settings = SummarizeSettings(model=str(tiny_checkpoint), **SETTINGS)
    report = run(settings, str(root), str(tmp_path / "out"), replicas=2, progress_every=5)
    assert report.success and not report.failed
    assert report.stats.rows == 60 and report.stats.empty == 3 and report.stats.truncated == 1

    table = read_output(tmp_path / "out")
    assert sorted(table.column("id").to_pylist()) == sorted(d["id"] for d in docs)  # each exactly once
    assert set(table.column_names) == {"id", "lang", "summary", "error", "lang_group"}
    assert (tmp_path / "out" / "_SUCCESS").exists()

    # Order within each input file is kept, split units included.
    for source in sorted(root.rglob("*.parquet")):
        relative = source.relative_to(root)
        outputs = sorted((tmp_path / "out" / relative.parent).glob(relative.stem + "*.parquet"))
        got = [i for path in outputs for i in pq.read_table(path).column("id").to_pylist()]
        assert got == pq.read_table(source).column("id").to_pylist()

    # Summaries are what the model's own generate gives for those rows.
    model = MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    tokenizer = MT5Tokenizer.from_pretrained(tiny_checkpoint)
    by_id = {row["id"]: row for row in table.to_pylist()}
    fine = [d for d in docs if d["text"] and d["text"].strip()]
    for start in range(0, len(fine), 8):
        chunk = fine[start : start + 8]
        batch = tokenizer(
            [d["text"] for d in chunk], max_length=256, truncation=True, padding=True, return_tensors="pt"
        )
        out = model.generate(**batch, **settings.generation())
        for doc, summary in zip(chunk, tokenizer.batch_decode(out, skip_special_tokens=True)):
            assert by_id[doc["id"]]["summary"] == summary, doc["id"]
            assert by_id[doc["id"]]["error"] is None
    for doc in docs:
        if not (doc["text"] and doc["text"].strip()):
            assert by_id[doc["id"]]["summary"] is None and by_id[doc["id"]]["error"] == EMPTY_TEXT


def test_rerun_skips_committed_units_and_other_settings_are_refused(ray_local, corpus, tiny_checkpoint, tmp_path):
    root, _ = corpus
    out = tmp_path / "out"
    settings = SummarizeSettings(model=str(tiny_checkpoint), **SETTINGS)
    first = run(settings, str(root), str(out), replicas=1)
    before = {p: p.read_bytes() for p in out.rglob("*.parquet")}
    again = run(settings, str(root), str(out), replicas=1)
    assert again.success and again.skipped == again.units == first.units and again.stats.rows == 0
    assert {p: p.read_bytes() for p in out.rglob("*.parquet")} == before

    other = SummarizeSettings(model=str(tiny_checkpoint), **{**SETTINGS, "num_beams": 1})
    with pytest.raises(OutputError, match="num_beams.*--overwrite"):
        run(other, str(root), str(out), replicas=1)
    replaced = run(other, str(root), str(out), replicas=1, overwrite=True)
    assert replaced.success and replaced.skipped == 0
    assert read_output(out).num_rows == 60


def test_missing_or_mistyped_text_column_fails_before_any_replica(ray_local, corpus, tiny_checkpoint, tmp_path):
    root, _ = corpus
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    pq.write_table(pa.table({"id": ["x"], "body": ["some text"]}), bad / "lang_group=a" / "zz-no-text.parquet")
    settings = SummarizeSettings(model=str(tiny_checkpoint), **SETTINGS)
    with pytest.raises(InputError, match=r"lang_group=a/zz-no-text\.parquet.*'text'"):
        run(settings, str(bad), str(tmp_path / "out"), replicas=1)
    (bad / "lang_group=a" / "zz-no-text.parquet").unlink()
    pq.write_table(pa.table({"id": ["x"], "text": [3]}), bad / "lang_group=b" / "zz-int.parquet")
    with pytest.raises(InputError, match=r"zz-int\.parquet.*'text'.*int64"):
        run(settings, str(bad), str(tmp_path / "out"), replicas=1)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))


def test_broken_model_fails_before_the_cluster_works(ray_local, corpus, tiny_checkpoint, tmp_path):
    root, _ = corpus
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "spiece.model").unlink()
    with pytest.raises(ModelLoadError, match="spiece.model"):
        run(SummarizeSettings(model=str(broken), **SETTINGS), str(root), str(tmp_path / "out"), replicas=1)
    with pytest.raises(ModelLoadError, match="nowhere"):
        run(
            SummarizeSettings(model=str(tmp_path / "nowhere"), **SETTINGS), str(root), str(tmp_path / "out"), replicas=1
        )
    assert not (tmp_path / "out").exists()


def test_corrupt_shard_fails_alone_and_the_job_exits_1(corpus, tiny_checkpoint, tmp_path):
    """Through the CLI, as users run it: the corrupt shard is named on stderr, every other row is written."""
    root, docs = corpus
    data = tmp_path / "data"
    shutil.copytree(root, data)
    (data / "lang_group=b" / "part-999.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    cmd = [
        sys.executable,
        str(REPO / "jobs/summarize.py"),
        "--model",
        str(tiny_checkpoint),
        "--input",
        str(data),
        "--output",
        str(tmp_path / "out"),
        "--replicas",
        "1",
        "--num-beams",
        "1",
        "--max-new-tokens",
        "4",
        "--rows-per-unit",
        "30",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=local_job_env())
    assert done.returncode == 1, done.stderr
    assert "FAILED lang_group=b/part-999.parquet" in done.stderr
    assert read_output(tmp_path / "out").num_rows == len(docs)
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    report = json.loads((tmp_path / "out" / "_lakesum" / "report.json").read_text())
    assert "lang_group=b/part-999.parquet" in json.dumps(report)


def test_usage_errors_exit_2(tiny_checkpoint, tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "jobs/summarize.py"),
        "--model",
        str(tiny_checkpoint),
        "--input",
        str(tmp_path),
        "--output",
        str(tmp_path / "out"),
        "--num-beams",
        "0",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=local_job_env())
    assert done.returncode == 2 and "--num-beams must be >= 1" in done.stderr


@pytest.mark.parametrize("num_beams", [1, 3])
def test_summaries_with_continuous_batching_equal_generate_per_document(corpus, tiny_checkpoint, num_beams):
    """A finished document's slot takes the window's next one: each row still gets what generate()
    gives it alone, and the empty rows keep their error."""
    _, docs = corpus
    model = MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    tokenizer = MT5Tokenizer.from_pretrained(tiny_checkpoint)
    settings = SummarizeSettings(
        model=str(tiny_checkpoint),
        num_beams=num_beams,
        max_new_tokens=12,
        batch_size=4,
        max_input_tokens=256,
        max_batch_tokens=512,
    )
    summarizer = Summarizer(model, tokenizer, settings)
    table, stats = summarizer.summarize_table(pa.Table.from_pylist(docs))
    summarizer.close()
    assert table.column("id").to_pylist() == [d["id"] for d in docs]
    assert stats.output_tokens > 0
    for doc, row in zip(docs, table.to_pylist()):
        if not (doc["text"] and doc["text"].strip()):
            assert row["summary"] is None and row["error"] == EMPTY_TEXT
            continue
        ids = tokenizer([doc["text"]], max_length=256, truncation=True, return_tensors="pt")
        expected = model.generate(**ids, **settings.generation())
        assert row["summary"] == tokenizer.batch_decode(expected, skip_special_tokens=True)[0], doc["id"]


# --- overlap ----------------------------------------------------------------------------------------


class SleepingModel:
    """Stands in for the accelerator: 0.2 s per batch_size documents, then EOS right away."""

    generation_config = GenerationConfig()

    def __init__(self, seconds: float):
        self.seconds = seconds

    def stream(self, model, rows, config, max_rows, max_tokens):
        rows = list(rows)
        for start in range(0, len(rows), max_rows):
            time.sleep(self.seconds)
            yield from ((key, [0, 1]) for key, _ in rows[start : start + max_rows])


def test_reading_tokenizing_and_writing_hide_behind_the_model(tiny_checkpoint, monkeypatch):
    """With a model that takes 0.2 s a batch and a reader that takes 0.1 s a record batch, wall time is the
    model's time plus one read, not their sum."""
    tokenizer = MT5Tokenizer.from_pretrained(tiny_checkpoint)
    settings = SummarizeSettings(model=str(tiny_checkpoint), batch_size=8, max_batch_tokens=4096, num_beams=1)
    model = SleepingModel(0.2)
    monkeypatch.setattr("pipeline.stages.generate_stream", model.stream)
    summarizer = Summarizer(model, tokenizer, settings)
    docs = documents(8 * 12, seed=2)

    def slow_reader():
        for start in range(0, len(docs), 8):
            time.sleep(0.1)
            yield pa.RecordBatch.from_pylist(docs[start : start + 8])

    stats = Stats()
    start = time.perf_counter()
    written = 0
    for batch in summarizer.stream(slow_reader(), stats):
        time.sleep(0.05)  # a slow writer too
        written += batch.num_rows
    wall = time.perf_counter() - start
    model_time = 12 * 0.2
    assert written == len(docs)
    assert stats.model_seconds == pytest.approx(model_time, rel=0.2)
    assert wall < model_time + 0.1 + 0.05 + 0.6, f"wall {wall:.2f}s vs model {model_time:.2f}s: stages not overlapped"
    summarizer.close()


def test_json_logs_are_one_object_per_line_and_the_report_is_written(ray_local, corpus, tiny_checkpoint, tmp_path):
    import io

    root, _ = corpus
    stream = io.StringIO()
    settings = SummarizeSettings(model=str(tiny_checkpoint), **SETTINGS)
    run(settings, str(root), str(tmp_path / "out"), replicas=1, out=stream, json_logs=True, progress_every=1)
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert {"progress", "done"} <= {e.get("event", "done" if "lakesum" in e else None) for e in events}
    assert all("time" in e for e in events if "event" in e)
    report = json.loads((tmp_path / "out" / "_lakesum" / "report.json").read_text())
    assert report["stats"]["rows"] == 60 and report["settings"]["num_beams"] == SETTINGS["num_beams"]


def test_model_identity_is_its_bytes_not_its_file_times(tiny_checkpoint, tmp_path):
    """A nightly run on a fresh cluster downloads or copies the model anew: new mtimes, same bytes. It is the same
    model, so the output written with it stays valid; a checkpoint rewritten in place with new weights is not."""
    model = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    before = model_fingerprint(str(model))["model_hash"]
    for path in model.iterdir():
        path.touch()
    assert model_fingerprint(str(model))["model_hash"] == before

    weights = model / "model.safetensors"
    middle = weights.stat().st_size // 2  # one weight deep inside the file: not in any header
    with open(weights, "r+b") as f:
        f.seek(middle)
        byte = f.read(1)[0]
        f.seek(middle)
        f.write(bytes([byte ^ 1]))
    assert model_fingerprint(str(model))["model_hash"] != before


def test_a_hub_id_is_pinned_to_one_commit_recorded_in_the_manifest_and_loaded_by_every_replica(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """No hub is reachable here: an HF cache laid out as huggingface_hub writes it, read offline by the job and by
    its replicas (a local Ray started by the job, so they share its environment)."""
    commit, later = "0123456789abcdef0123456789abcdef01234567", "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hf_home" / "hub" / "models--lakesum-test--tiny-mt5"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    write_shards(corpus, documents(12, seed=4), files=2, row_group_size=6)
    env = {**_job_env(), "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "local"}
    command = [
        sys.executable,
        str(REPO / "jobs/summarize.py"),
        "--model",
        "lakesum-test/tiny-mt5",
        "--input",
        str(corpus),
        "--output",
        str(out),
        "--num-beams",
        "1",
        "--max-new-tokens",
        "4",
    ]

    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "_lakesum" / "manifest.json").read_text())
    assert manifest["model_revision"] == commit and "model_revision" not in manifest["settings"]

    assert read_output(out).num_rows == 12

    # main moves to a commit with the same weights: the same model (the settings compare model_hash, and the
    # revision is only recorded), so the next night's run resumes this output rather than being refused
    from huggingface_hub import constants as hf_constants

    shutil.copytree(tiny_checkpoint, repo / "snapshots" / later)
    (repo / "refs" / "main").write_text(later)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    moved = model_fingerprint("lakesum-test/tiny-mt5")
    assert moved["model_revision"] == later and moved["model_hash"] == manifest["settings"]["model_hash"]


def _job_env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "HF_"))}


def test_a_rerun_parses_only_the_footers_of_files_that_changed(ray_local, tiny_checkpoint, tmp_path, monkeypatch):
    """Planning at lake scale: an unchanged file's units come from the manifest (its identity is read, its footer
    not parsed), so a nightly rerun over a million files does not parse a million footers."""
    import pipeline.driver

    corpus, out = tmp_path / "corpus", tmp_path / "out"
    paths = write_shards(corpus, documents(24, seed=6), files=3, row_group_size=4)
    settings = SummarizeSettings(model=str(tiny_checkpoint), **dict(SETTINGS, num_beams=1, max_new_tokens=4))
    inspected = []
    real = pipeline.driver.inspect_shards
    monkeypatch.setattr(
        pipeline.driver,
        "inspect_shards",
        lambda fs, shards: inspected.append([s.relative for s in shards]) or real(fs, shards),
    )

    assert run(settings, str(corpus), str(out), replicas=1).success
    assert run(settings, str(corpus), str(out), replicas=1).success
    rewritten = pq.read_table(paths[1])
    pq.write_table(
        rewritten.set_column(2, "text", pa.array(["new text"] * rewritten.num_rows)), paths[1], row_group_size=4
    )
    again = run(settings, str(corpus), str(out), replicas=1)
    assert again.success and again.redone == 1 and again.stats.rows == 8
    assert [len(x) for x in inspected] == [3, 0, 1] and inspected[2] == [paths[1].relative_to(corpus).as_posix()]
    assert read_output(out).num_rows == 24
