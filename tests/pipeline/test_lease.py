"""One writer per output: the lease on local disk, S3 (moto's server) and memory://, and a second job refused."""

from __future__ import annotations

import json
import subprocess
import time

import fsspec
import pyarrow as pa
import pytest

from pipeline.commit import OutputLocation
from pipeline.footers import inspect_shards
from pipeline.lease import LeaseHeld, LeaseLost
from pipeline.listing import list_shards
from pipeline.units import plan_units
from synthetic.corpus import documents, write_shards
from tests.pipeline.helpers import FAST, job_command, numbered_rows, write_parquet

SETTINGS = {"model": "m", "model_hash": "0f3c", "rows_per_unit": 4}
OUT_SCHEMA = pa.schema([("id", pa.int64()), ("summary", pa.string()), ("error", pa.string())])


def _units(root: str):
    fs = fsspec.filesystem("file", auto_mkdir=True)
    write_parquet(fs, f"{root}/part-0.parquet", numbered_rows(0, 4))
    input_fs, shards = list_shards(root)
    infos, _ = inspect_shards(input_fs, shards)
    return plan_units(infos, 4)


def _batches(unit):
    yield pa.RecordBatch.from_arrays(
        [
            pa.array(range(unit.num_rows), pa.int64()),
            pa.array(["s"] * unit.num_rows),
            pa.nulls(unit.num_rows, pa.string()),
        ],
        schema=OUT_SCHEMA,
    )


@pytest.fixture(params=["local", "memory", "s3"])
def output_url(request, tmp_path, memory_root):
    if request.param == "local":
        return str(tmp_path / "out"), None
    if request.param == "memory":
        return f"memory://{memory_root}/out", None
    fs, bucket, options = request.getfixturevalue("s3")
    return f"s3://{bucket}/out", options


def test_a_second_writer_is_refused_naming_the_holder_until_the_first_gives_the_lease_back(output_url):
    url, options = output_url
    first = OutputLocation(url, options).lease(timeout=60)
    with pytest.raises(LeaseHeld, match=r"being written by another run \(.* pid \d+, generation 1, .*last heartbeat"):
        OutputLocation(url, options).lease(timeout=60)
    first.release()
    second = OutputLocation(url, options).lease(timeout=60)
    assert second.generation == 1  # nothing was written under generation 1: no manifest records it
    second.release()


def test_a_silent_lease_is_taken_over_with_a_note_and_its_holder_can_publish_no_more(output_url, tmp_path):
    url, options = output_url
    units = _units(str(tmp_path / "lake"))
    dead = OutputLocation(url, options)
    dead.lease(timeout=0.5)  # no heartbeat: as if its process was SIGKILLed
    dead.prepare(SETTINGS, units=units)
    time.sleep(0.7)
    notes = []
    taker = OutputLocation(url, options)
    lease = taker.lease(timeout=60, note=notes.append)
    assert lease.generation == 2
    assert len(notes) == 1 and "took over the lease" in notes[0] and "generation 1" in notes[0]

    with pytest.raises(LeaseLost, match="generation 1\\) lost its lease"):
        dead.write_unit(units[0], OUT_SCHEMA, _batches(units[0]), attempt="a1")
    assert dead.committed_units() == {}
    fs, root = dead.fs, dead.root
    assert not fs.exists(f"{root}/{units[0].output_relative}")

    # a replica of the new generation publishes, and its marker carries the generation
    replica = OutputLocation(url, options, generation=lease.generation)
    replica.write_unit(units[0], OUT_SCHEMA, _batches(units[0]), attempt="a2")
    assert replica.committed_units()[units[0].id]["generation"] == 2
    lease.release()


def test_the_heartbeat_keeps_a_lease_past_its_timeout(tmp_path):
    url = str(tmp_path / "out")
    lease = OutputLocation(url).lease(timeout=0.6)
    lease.start_heartbeat()
    try:
        time.sleep(1.5)
        with pytest.raises(LeaseHeld):
            OutputLocation(url).lease(timeout=0.6)
        record = json.loads((tmp_path / "out" / "_lakesum" / "lease.json").read_text())
        assert time.time() - record["heartbeat_unix"] < 0.6
    finally:
        lease.release()
    assert not (tmp_path / "out" / "_lakesum" / "lease.json").exists()


def test_a_job_on_an_output_another_run_holds_exits_2_and_runs_once_it_is_free(ray_local, tiny_checkpoint, tmp_path):
    """Finding 5 of issue 12: a second run on an output being written was accepted, and both exited 0."""
    from pipeline.driver import run
    from pipeline.settings import SummarizeSettings

    corpus, out = tmp_path / "corpus", tmp_path / "out"
    write_shards(corpus, documents(20, seed=5), files=2, row_group_size=10)
    holder = OutputLocation(str(out)).lease(timeout=60)  # the first run, alive and renewing
    holder.start_heartbeat()
    try:
        second = subprocess.run(job_command(tiny_checkpoint, corpus, out), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert "is being written by another run" in second.stderr and "last heartbeat" in second.stderr
        assert sorted(p.name for p in out.rglob("*")) == ["_lakesum", "lease.json"]  # nothing else touched
    finally:
        holder.release()
    report = run(SummarizeSettings(model=str(tiny_checkpoint), **FAST), str(corpus), str(out), replicas=1)
    assert report.success and not (out / "_lakesum" / "lease.json").exists()
