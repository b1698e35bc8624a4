"""The job on real Ray clusters: nodes removed mid-job, `ray job submit`, s3:// storage, the Ray Data adapter.

Each test starts its own Ray and stops exactly that one. Other Ray instances may run on the same machine
(other test sessions), so nothing here runs `ray stop`, which stops every Ray process on the machine:
a `ray start --head --block` process is stopped by signalling it, and a `ray.cluster_utils.Cluster`
writes its address file into a temporary RAY_TMPDIR, where no other `ray.init()` looks for it.
"""
from __future__ import annotations

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
import pyarrow.parquet as pq
import pytest

from pipeline.driver import run
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
    assert report.success and not report.failed, (report.failed, report.retries)
    assert report.retries >= 1  # the removed node's replica had units in flight
    assert_every_row_once(read_output(out), docs)
    assert (out / "_SUCCESS").exists()
