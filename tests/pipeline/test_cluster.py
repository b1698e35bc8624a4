"""The job on real Ray clusters: nodes removed mid-job, `ray job submit`, s3:// storage, the Ray Data adapter.

Each test starts its own Ray and stops exactly that one. Other Ray instances may run on the same machine
(other test sessions), so nothing here runs `ray stop`, which stops every Ray process on the machine:
a `ray start --head --block` process is stopped by signalling it, and a `ray.cluster_utils.Cluster`
writes its address file into a temporary RAY_TMPDIR, where no other `ray.init()` looks for it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.driver import run
from pipeline.replica import UNITS_PER_REPLICA
from pipeline.settings import SummarizeSettings
from synthetic.corpus import documents, write_shards
from tests.pipeline.helpers import (
    FAST,
    REPO,
    SECRET,
    RayHead,
    assert_every_row_once,
    busy_replicas,
    committed_count,
    free_port,
    job_command,
    read_output,
    short_temp_dir,
    wait_for,
)

# --- multi-node on one machine --------------------------------------------------------------------


@pytest.fixture
def two_nodes(monkeypatch):
    """A head node and a worker node with one CPU each, so each of two replicas lands on its own node."""
    import ray
    from ray.cluster_utils import Cluster

    temp = short_temp_dir()
    monkeypatch.setenv("RAY_TMPDIR", temp)  # the Cluster writes its address there, not in /tmp/ray
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": False,
            "dashboard_agent_listen_port": free_port(),
            # Notice a dead node within seconds, not the default half minute, yet never mistake a live one
            # for dead: a raylet must miss answers for 5 s in a row. (At 0.6 s, as once set here, a head
            # raylet busy on a loaded 2-core machine was declared dead, and with it this test's driver: the
            # test process exited 1 mid-run, before pytest could report anything.)
            "_system_config": {
                "health_check_period_ms": 500,
                "health_check_failure_threshold": 10,
                "health_check_timeout_ms": 1000,
            },
        },
    )
    try:
        worker = cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, logging_level="warning")
        yield cluster, worker
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_node_removed_mid_job_job_completes(two_nodes, tiny_checkpoint, tmp_path):
    """The worker node dies (all its processes SIGKILLed) while its replica is mid-unit, and no node replaces
    it: the replica on the head takes over its units, and every row is written once."""
    from ray._private import ray_constants

    cluster, worker = two_nodes
    # Enough units that the head replica alone needs seconds for what is left when the node goes: the whole
    # node's processes take a while to die, and with 16 units (as once here) the worker's replica had finished
    # its share before they did, so nothing was redone and the test saw no failover at all.
    docs = documents(480, seed=11)
    corpus = tmp_path / "corpus"
    write_shards(corpus, docs, files=4, row_group_size=10)
    out = tmp_path / "out"
    settings = SummarizeSettings(model=str(tiny_checkpoint), **FAST)
    # the worker node's replica is a descendant of that node's raylet
    worker_raylet = psutil.Process(worker.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)

    result: dict = {}

    def job():
        try:
            result["report"] = run(settings, str(corpus), str(out), replicas=2, progress_every=1)
        except BaseException as err:  # handed to the test's thread
            result["error"] = err

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    wait_for(
        lambda: committed_count(out) >= 2 and busy_replicas(worker_raylet, out) or not thread.is_alive(),
        180,
        "the worker node's replica mid-unit",
    )
    assert thread.is_alive(), f"the job ended before the node was removed: {result}"
    committed_before = committed_count(out)
    cluster.remove_node(worker, allow_graceful=False)
    thread.join(timeout=240)
    assert not thread.is_alive(), "the job did not finish after its node was removed"
    assert "error" not in result, result.get("error")
    report = result["report"]
    assert committed_before < report.units, "the node was removed after the job had finished its work"
    assert report.success and not report.failed, report.failed
    # Only the units in flight on the removed node were redone: none was handed to its replica while it
    # waited for a node to restart on (each such hand-out fails and costs the unit one of its attempts).
    assert 1 <= report.retries <= UNITS_PER_REPLICA
    assert_every_row_once(read_output(out), docs)
    assert (out / "_SUCCESS").exists()


# --- ray job submit -------------------------------------------------------------------------------


@pytest.mark.slow
def test_ray_job_submit_against_ray_start_head(tiny_checkpoint, tmp_path):
    """As the README says to run it: the repository uploaded as the job's working dir, the entrypoint
    run by the cluster's job server, replicas on the cluster; exit status 0 and every row once."""
    docs = documents(40, seed=12)
    corpus = tmp_path / "corpus"
    write_shards(corpus, docs, files=2, row_group_size=10)
    out = tmp_path / "out"
    with RayHead(num_cpus=2, dashboard=True) as head:
        entrypoint = ["python", "jobs/summarize.py", *job_command(tiny_checkpoint, corpus, out, "--replicas", "1")[2:]]
        excludes = [".venv", ".git", "*.safetensors", "__pycache__", ".pytest_cache", "demo_out", "build"]
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{head.dashboard_port}",
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            json.dumps({"excludes": excludes}),
            "--",
            *entrypoint,
        ]
        done = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=300)
    logs = done.stdout[-4000:] + done.stderr[-4000:]
    assert done.returncode == 0, logs
    assert "succeeded" in logs and '"lakesum": "done"' in logs, logs
    table = read_output(out)
    assert_every_row_once(table, docs)
    assert (out / "_SUCCESS").exists()


# --- s3:// ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_s3_input_and_output_against_a_local_s3_server(s3_then_ray, tiny_checkpoint, tmp_path):
    """Input listed and read, output staged, published and marked, all through s3:// on moto's server;
    the replicas reach it through the storage options the driver hands them."""
    fs, bucket, options = s3_then_ray
    docs = documents(40, seed=13)
    local = tmp_path / "corpus"
    for path in write_shards(local, docs, files=2, row_group_size=10):
        fs.put_file(str(path), f"{bucket}/corpus/{path.relative_to(local).as_posix()}")
    settings = SummarizeSettings(model=str(tiny_checkpoint), **FAST)

    report = run(settings, f"s3://{bucket}/corpus", f"s3://{bucket}/out", replicas=1, storage_options=options)
    assert report.success and not report.failed and report.stats.rows == len(docs)

    fs.invalidate_cache()
    root = f"{bucket}/out/"
    files = sorted(p[len(root) :] for p in fs.find(root))
    data = [f for f in files if not f.startswith("_")]
    assert data and all(
        f.startswith(("lang_group=a/part-", "lang_group=b/part-")) and f.endswith(".parquet") for f in data
    ), files
    tables = []
    for name in data:
        with fs.open(root + name, "rb") as f:
            tables.append(pq.read_table(f))
    assert_every_row_once(pa.concat_tables(tables), docs)
    assert "_SUCCESS" in files and "_lakesum/manifest.json" in files and "_lakesum/report.json" in files
    assert not [f for f in files if f.startswith("_lakesum/staging/")]
    for name in files:  # the credentials never reach what the output's readers can see
        assert SECRET.encode() not in fs.cat_file(root + name), name


# --- Ray Data -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ray_data_adapter_carries_columns_and_matches_the_job(ray_per_test, tiny_checkpoint, tmp_path):
    import ray

    from pipeline.ray_data import SummarizeBatches
    from pipeline.stages import EMPTY_TEXT

    docs = documents(48, seed=14)
    docs[5]["text"] = "  "
    corpus = tmp_path / "corpus"
    write_shards(corpus, docs, files=2, row_group_size=8)
    settings = SummarizeSettings(model=str(tiny_checkpoint), **FAST)

    # One CPU for the actor, the other for Ray Data's read tasks (with none left they never run).
    ds = ray.data.read_parquet(str(corpus)).map_batches(
        SummarizeBatches,
        fn_constructor_kwargs={"settings": settings},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_format="pyarrow",
        batch_size=16,
        num_cpus=1,
    )
    rows = ds.take_all()
    by_id = {row["id"]: row for row in rows}
    assert len(rows) == len(by_id) == len(docs) and set(by_id) == {d["id"] for d in docs}
    assert set(rows[0]) == {"id", "lang", "lang_group", "summary", "error"}
    for doc in docs:
        assert by_id[doc["id"]]["lang"] == doc["lang"]
    assert by_id[docs[5]["id"]]["summary"] is None and by_id[docs[5]["id"]]["error"] == EMPTY_TEXT

    report = run(settings, str(corpus), str(tmp_path / "out"), replicas=1)
    assert report.success
    job = {row["id"]: row for row in read_output(tmp_path / "out").to_pylist()}
    assert {i: (r["summary"], r["error"]) for i, r in by_id.items()} == {
        i: (r["summary"], r["error"]) for i, r in job.items()
    }
    assert sum(r["summary"] is not None for r in rows) == len(docs) - 1
