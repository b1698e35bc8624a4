"""The job on real Ray clusters: nodes removed mid-job, `ray job submit`, s3:// storage, the Ray Data adapter.

Each test starts its own Ray and stops exactly that one. Other Ray instances may run on the same machine
(other test sessions), so nothing here runs `ray stop`, which stops every Ray process on the machine:
a `ray start --head --block` process is stopped by signalling it, and a `ray.cluster_utils.Cluster`
writes its address file into a temporary RAY_TMPDIR, where no other `ray.init()` looks for it.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.driver import run
from pipeline.replica import UNITS_PER_REPLICA
from pipeline.settings import SummarizeSettings
from tests.fixtures.corpus import documents, write_shards
from tests.pipeline.test_summarize import SETTINGS, read_output

REPO = Path(__file__).resolve().parents[2]
# Fast generation: the tests here are about where rows go, not what the model says.
FAST = dict(SETTINGS, num_beams=1)


# --- a `ray start --head` of our own ------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_temp_dir() -> str:
    """Ray's unix socket paths must stay under ~107 bytes; pytest's tmp_path can be too deep for that."""
    return tempfile.mkdtemp(prefix="lakesum-ray-", dir="/tmp")


def ray_processes(root: psutil.Process, title: str) -> list[psutil.Process]:
    """Descendants of `root` whose process title starts with `title` (Ray sets `ray::Class.method`)."""
    found = []
    for proc in root.children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith(title) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def busy_replicas(root: psutil.Process, out: Path) -> list[psutil.Process]:
    """Replica processes under `root` summarizing a unit of the output `out`: the unit's staging file is open
    while its rows are summarized. (Not the process title: Ray sets it per call, and a replica's heartbeat,
    answered beside its units, sets it back to `ray::Replica`.)"""
    staging = os.path.realpath(out / "_lakesum" / "staging") + os.sep
    found = []
    for proc in ray_processes(root, "ray::Replica"):
        try:
            if any(f.path.startswith(staging) for f in proc.open_files()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def committed_count(out: Path) -> int:
    folder = out / "_lakesum" / "committed"
    return len(list(folder.glob("*.json"))) if folder.is_dir() else 0


class RayHead:
    """`ray start --head --block` in its own temp dir, with its own ports and auth token.

    Stopped with SIGTERM to the `ray start` process (which then stops the processes it started), and
    anything of it still alive after that is killed by pid.
    """

    def __init__(self, *, num_cpus: int, dashboard: bool = False):
        self.temp_dir = short_temp_dir()
        self.dashboard_port = free_port() if dashboard else None
        # A token of our own: Ray turns token auth on when ~/.ray/auth_token exists, and every client
        # (the job, `ray job submit`) must then present the same token.
        self.env = {**_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--num-cpus={num_cpus}",
               "--disable-usage-stats", f"--temp-dir={self.temp_dir}", f"--port={free_port()}",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               "--min-worker-port=0", "--max-worker-port=0"]
        if dashboard:
            cmd += ["--include-dashboard=true", f"--dashboard-port={self.dashboard_port}"]
        else:
            cmd += ["--include-dashboard=false"]
        self.log = open(Path(self.temp_dir) / "ray-start.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        try:
            address_file = Path(self.temp_dir) / "ray_current_cluster"
            wait_for(lambda: address_file.exists() or self.proc.poll() is not None, 120, "ray start --head")
            if self.proc.poll() is not None:
                raise AssertionError(f"ray start --head exited {self.proc.returncode}:\n{self.log_tail()}")
            self.address = address_file.read_text().strip()
            if dashboard:
                wait_for(self._dashboard_up, 60, "the dashboard (needs ray[default])")
        except BaseException:
            self.stop()
            raise

    def _dashboard_up(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.dashboard_port)) == 0

    def client_env(self) -> dict:
        """The environment of a process that joins this cluster as a driver."""
        return {**self.env, "RAY_ADDRESS": self.address}

    def replicas(self) -> list[psutil.Process]:
        try:
            return ray_processes(psutil.Process(self.proc.pid), "ray::Replica")
        except psutil.NoSuchProcess:
            return []

    def log_tail(self) -> str:
        self.log.flush()
        return (Path(self.temp_dir) / "ray-start.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        try:
            ours = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            ours = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for proc in ours:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(ours, timeout=10)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _env() -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = str(REPO)
    return env


def job_command(checkpoint, corpus, out, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "jobs/summarize.py"), "--model", str(checkpoint), "--input", str(corpus),
            "--output", str(out), "--num-beams", "1", "--max-new-tokens", str(FAST["max_new_tokens"]),
            "--rows-per-unit", str(FAST["rows_per_unit"]), "--batch-size", str(FAST["batch_size"]),
            "--max-input-tokens", str(FAST["max_input_tokens"]),
            "--max-batch-tokens", str(FAST["max_batch_tokens"]), *extra]


def assert_every_row_once(table, docs) -> None:
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "a row was written twice"
    assert sorted(ids) == sorted(d["id"] for d in docs)


# --- multi-node on one machine --------------------------------------------------------------------

@pytest.fixture
def two_nodes(monkeypatch):
    """A head node and a worker node with one CPU each, so each of two replicas lands on its own node."""
    import ray
    from ray.cluster_utils import Cluster

    temp = short_temp_dir()
    monkeypatch.setenv("RAY_TMPDIR", temp)  # the Cluster writes its address there, not in /tmp/ray
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "dashboard_agent_listen_port": free_port(),
        # notice a dead node in about a second, not the default fifteen
        "_system_config": {"health_check_period_ms": 200, "health_check_failure_threshold": 3,
                           "health_check_timeout_ms": 200}})
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
    cluster, worker = two_nodes
    docs = documents(160, seed=11)
    corpus = tmp_path / "corpus"
    write_shards(corpus, docs, files=4, row_group_size=10)
    out = tmp_path / "out"
    settings = SummarizeSettings(model=str(tiny_checkpoint), **FAST)

    result: dict = {}

    def job():
        try:
            result["report"] = run(settings, str(corpus), str(out), replicas=2, progress_every=1)
        except BaseException as err:  # handed to the test's thread
            result["error"] = err

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    wait_for(lambda: committed_count(out) >= 2 or not thread.is_alive(), 180, "the first units to commit")
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
        cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit",
               "--address", f"http://127.0.0.1:{head.dashboard_port}", "--working-dir", str(REPO),
               "--runtime-env-json", json.dumps({"excludes": excludes}), "--", *entrypoint]
        done = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=300)
    logs = done.stdout[-4000:] + done.stderr[-4000:]
    assert done.returncode == 0, logs
    assert "succeeded" in logs and '"lakesum": "done"' in logs, logs
    table = read_output(out)
    assert_every_row_once(table, docs)
    assert (out / "_SUCCESS").exists()


# --- s3:// ----------------------------------------------------------------------------------------

@pytest.fixture
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()


@pytest.fixture
def s3_then_ray(s3):
    """The bucket first, then Ray: Ray's workers inherit the S3 environment the `s3` fixture sets."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    yield s3
    ray.shutdown()


@pytest.mark.slow
def test_s3_input_and_output_against_a_local_s3_server(s3_then_ray, tiny_checkpoint, tmp_path):
    """Input listed and read, output staged, published and marked, all through s3:// on moto's server;
    the replicas reach it through the storage options the driver hands them."""
    from tests.pipeline.conftest import SECRET

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
    files = sorted(p[len(root):] for p in fs.find(root))
    data = [f for f in files if not f.startswith("_")]
    assert data and all(f.startswith(("lang_group=a/part-", "lang_group=b/part-")) and f.endswith(".parquet")
                        for f in data), files
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
def test_ray_data_adapter_carries_columns_and_matches_the_job(ray_local, tiny_checkpoint, tmp_path):
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
        SummarizeBatches, fn_constructor_kwargs={"settings": settings}, compute=ray.data.ActorPoolStrategy(size=1),
        batch_format="pyarrow", batch_size=16, num_cpus=1)
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
    assert {i: (r["summary"], r["error"]) for i, r in by_id.items()} == \
        {i: (r["summary"], r["error"]) for i, r in job.items()}
    assert sum(r["summary"] is not None for r in rows) == len(docs) - 1
