"""What the pipeline tests share: shard writers, the tests' summarize settings and output reader, and a
`ray start --head` of their own with the job's command line.

Nothing here runs `ray stop`, which stops every Ray process on the machine (other test sessions may run one):
a `ray start --head --block` process is stopped by signalling it.
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
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.feather as feather
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
# storage credentials that must never reach a log, an error or the output
SECRET = "hunter2-do-not-log"
# Small and quick: units of 10 rows, a few tokens each.
SETTINGS = dict(
    num_beams=2, max_new_tokens=8, rows_per_unit=10, batch_size=4, max_input_tokens=256, max_batch_tokens=1024
)
# Fast generation, for tests about where rows go, not what the model says.
FAST = dict(SETTINGS, num_beams=1)


def read_output(out) -> pa.Table:
    return pads.dataset(str(out), format="parquet", partitioning="hive").to_table()


def assert_every_row_once(table, docs) -> None:
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "a row was written twice"
    assert sorted(ids) == sorted(d["id"] for d in docs)


def committed_count(out: Path) -> int:
    folder = out / "_lakesum" / "committed"
    return len(list(folder.glob("*.json"))) if folder.is_dir() else 0


# --- shards ---------------------------------------------------------------------------------------


def numbered_rows(start: int, count: int, **extra) -> pa.Table:
    """`count` rows of (id, text, lang) with ids start..start+count-1, plus any extra columns."""
    ids = list(range(start, start + count))
    columns = {
        "id": pa.array(ids, pa.int64()),
        "text": pa.array([f"document {i}" for i in ids]),
        "lang": pa.array(["en" if i % 2 else "hi" for i in ids]),
    }
    columns.update(extra)
    return pa.table(columns)


def write_parquet(fs, path: str, table: pa.Table, row_group_size: int | None = None) -> None:
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, row_group_size=row_group_size)


def write_arrow(
    fs, path: str, table: pa.Table, batch_rows: int, *, stream: bool = False, compression: str | None = None
) -> None:
    options = ipc.IpcWriteOptions(compression=compression)
    with fs.open(path, "wb") as f:
        writer = (ipc.new_stream if stream else ipc.new_file)(f, table.schema, options=options)
        with writer:
            for batch in table.to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)


def write_feather(fs, path: str, table: pa.Table, chunk_rows: int) -> None:
    with fs.open(path, "wb") as f:
        feather.write_feather(table, f, chunksize=chunk_rows)  # Feather v2 = Arrow IPC file, lz4 by default


# --- Rays of the tests' own -------------------------------------------------------------------------


@contextmanager
def local_ray(**options):
    """A local Ray with two CPUs, as on this project's machines, for the block; `options` go to ray.init()."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning", **options)
    try:
        yield ray
    finally:
        ray.shutdown()


# --- a `ray start --head` of our own ------------------------------------------------------------


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
        self.env = {
            **_env(),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            f"--num-cpus={num_cpus}",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
            f"--port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--min-worker-port=0",
            "--max-worker-port=0",
        ]
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


def local_job_env(**extra: str) -> dict:
    """The environment of a job run as a subprocess on a local Ray of its own, not one that `ray start` left on
    this machine; the checkout first on its path, as `ray job submit --working-dir .` puts it."""
    return {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO), **extra}


def job_command(checkpoint, corpus, out, *extra: str) -> list[str]:
    """jobs/summarize.py with FAST's settings, as a subprocess runs it."""
    return [
        sys.executable,
        str(REPO / "jobs/summarize.py"),
        "--model",
        str(checkpoint),
        "--input",
        str(corpus),
        "--output",
        str(out),
        "--num-beams",
        "1",
        "--max-new-tokens",
        str(FAST["max_new_tokens"]),
        "--rows-per-unit",
        str(FAST["rows_per_unit"]),
        "--batch-size",
        str(FAST["batch_size"]),
        "--max-input-tokens",
        str(FAST["max_input_tokens"]),
        "--max-batch-tokens",
        str(FAST["max_batch_tokens"]),
        *extra,
    ]
