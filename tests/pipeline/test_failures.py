"""Kill tests: processes SIGKILLed mid-run (the driver, a replica), and still every row exactly once.
Faults contained: a poison unit fails alone, Ray's memory monitor and a hung replica cost retries, never the
job, and transient storage errors are retried.

The helpers that start and stop a Ray of our own (never `ray stop`, which would stop every Ray on the
machine) live in tests/pipeline/helpers.py; the faulty:// filesystem that injects faults lives in tests/faults.py.
"""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest

from pipeline.driver import MAX_ATTEMPTS, run
from pipeline.replica import UNITS_PER_REPLICA
from pipeline.settings import SummarizeSettings
from synthetic.corpus import documents, write_shards
from tests import faults
from tests.pipeline.helpers import (
    FAST,
    REPO,
    RayHead,
    assert_every_row_once,
    busy_replicas,
    committed_count,
    job_command,
    local_ray,
    read_output,
    wait_for,
)

# seconds: a SIGKILLed driver's lease lapses this soon, so the rerun takes it over
LEASE_TIMEOUT = 3.0


def data_files(out: Path) -> dict[str, bytes]:
    """Every output file but `_SUCCESS` and `_lakesum/`, by relative path."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and not p.relative_to(out).as_posix().startswith("_")
    }


@pytest.mark.slow
def test_driver_sigkill_then_rerun_gives_every_row_once_identical_to_uninterrupted(tiny_checkpoint, tmp_path):
    """jobs/summarize.py against a `ray start --head`, SIGKILLed once some units committed; the same command
    again resumes, and the output is byte for byte that of a run never interrupted."""
    docs = documents(120, seed=21)
    corpus = tmp_path / "corpus"
    write_shards(corpus, docs, files=4, row_group_size=10)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    with RayHead(num_cpus=2) as head:

        def command(out):
            return job_command(tiny_checkpoint, corpus, out, "--replicas", "2", "--lease-timeout", str(LEASE_TIMEOUT))

        with open(tmp_path / "killed.log", "wb") as log:
            driver = subprocess.Popen(command(killed), stdout=log, stderr=subprocess.STDOUT, env=head.client_env())
            try:
                wait_for(
                    lambda: committed_count(killed) >= 3 or driver.poll() is not None, 180, "three units to commit"
                )
                assert driver.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert head.replicas(), "the job's replicas are not where this test looks for them"
                driver.send_signal(signal.SIGKILL)
            finally:
                driver.kill()
                driver.wait(timeout=30)
        assert driver.returncode == -signal.SIGKILL
        # Its replicas are owned by the dead driver: Ray kills them. Wait, so none commits behind the rerun.
        wait_for(lambda: not head.replicas(), 60, "the dead driver's replicas to go")
        time.sleep(LEASE_TIMEOUT + 0.5)  # the dead driver's lease lapses; the rerun takes it over
        units = 12
        assert committed_count(killed) < units, "the driver was killed after the job had done its work"
        assert not (killed / "_SUCCESS").exists()

        rerun = subprocess.run(command(killed), capture_output=True, text=True, timeout=300, env=head.client_env())
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        resumed = re.search(r"resuming: (\d+) of (\d+) units already committed", rerun.stderr)
        assert resumed, rerun.stderr[-3000:]
        assert 0 < int(resumed[1]) < int(resumed[2]) == units

        uninterrupted = subprocess.run(
            command(clean), capture_output=True, text=True, timeout=300, env=head.client_env()
        )
        assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
        assert "resuming" not in uninterrupted.stderr

    assert_every_row_once(read_output(killed), docs)
    assert (killed / "_SUCCESS").exists() and (clean / "_SUCCESS").exists()
    # Byte for byte: the same files at the same names, each unit's rows in input order.
    assert data_files(killed) == data_files(clean)
    assert not list((killed / "_lakesum").glob("staging/*"))


@pytest.mark.slow
def test_replica_killed_mid_unit_job_finishes_with_every_row_once(ray_per_test, tiny_checkpoint, tmp_path):
    """SIGKILL one replica's process while it is summarizing: Ray restarts it, its units go out again and
    nothing else is redone."""
    docs = documents(200, seed=22)
    corpus = tmp_path / "corpus"
    write_shards(corpus, docs, files=4, row_group_size=10)
    out = tmp_path / "out"
    settings = SummarizeSettings(model=str(tiny_checkpoint), **FAST)
    me = psutil.Process()  # this process started Ray: the replicas are among its descendants
    done = threading.Event()
    seen: dict = {"killed": None}

    def kill_a_busy_replica():
        busy = lambda: busy_replicas(me, out)  # noqa: E731
        try:
            victim = wait_for(lambda: committed_count(out) >= 2 and busy() or done.is_set(), 180, "a busy replica")
            if done.is_set():
                return
            seen["committed_at_kill"] = committed_count(out)
            seen["killed"] = victim[0].pid
            victim[0].kill()
        except AssertionError as err:
            seen["error"] = err

    killer = threading.Thread(target=kill_a_busy_replica, daemon=True)
    killer.start()
    try:
        report = run(settings, str(corpus), str(out), replicas=2, progress_every=2)
    finally:
        done.set()
        killer.join(timeout=30)
    assert "error" not in seen, seen["error"]
    assert seen["killed"] and seen["committed_at_kill"] < report.units, "no replica was killed mid-run"
    assert not psutil.pid_exists(seen["killed"]) or psutil.Process(seen["killed"]).status() == psutil.STATUS_ZOMBIE
    assert report.success and not report.failed, report.failed
    assert 1 <= report.retries <= UNITS_PER_REPLICA  # only the units the dead replica held
    assert report.committed == report.units and report.stats.rows == len(docs)
    assert_every_row_once(read_output(out), docs)
    assert (out / "_SUCCESS").exists()


@pytest.mark.slow
def test_a_unit_whose_replica_dies_every_time_is_given_up_and_a_rerun_completes_it(
    ray_per_test, tiny_checkpoint, tmp_path
):
    """A poison unit (its replica's process dies each time it runs it) is given up after MAX_ATTEMPTS; the
    job ends, exit status unsuccessful, the unit named; nothing of it is published. A rerun redoes it."""
    docs = documents(10, seed=23)
    corpus = tmp_path / "corpus"
    write_shards(corpus, docs, files=1, row_group_size=10, partition=None)
    out = tmp_path / "out"
    settings = SummarizeSettings(model=str(tiny_checkpoint), **FAST)
    me = psutil.Process()
    done = threading.Event()
    kills: list[int] = []

    def kill_whoever_runs_it():
        while not done.wait(0.02):
            for proc in busy_replicas(me, out):
                if proc.pid not in kills:
                    kills.append(proc.pid)
                    proc.kill()

    killer = threading.Thread(target=kill_whoever_runs_it, daemon=True)
    killer.start()
    try:
        report = run(settings, str(corpus), str(out), replicas=1, progress_every=2)
    finally:
        done.set()
        killer.join(timeout=30)
    assert len(kills) == MAX_ATTEMPTS
    assert not report.success and report.committed == 0
    assert list(report.failed) == ["part-000.parquet"]
    assert re.fullmatch(
        rf"its replica died {MAX_ATTEMPTS} times while running it alone \(last: \w+Error\)",
        report.failed["part-000.parquet"],
    )
    assert not (out / "part-000.parquet").exists() and not (out / "_SUCCESS").exists()
    assert [r["relative"] for r in _failed_records(out)] == ["part-000.parquet"]

    again = run(settings, str(corpus), str(out), replicas=1)
    assert again.success and again.skipped == 0 and again.committed == 1
    assert_every_row_once(read_output(out), docs)
    assert not _failed_records(out)


def _failed_records(out: Path) -> list[dict]:
    import json

    return [json.loads(p.read_text()) for p in sorted((out / "_lakesum" / "failed").glob("*.json"))]


# --- faults contained ---------------------------------------------------------------------------------------


@pytest.fixture
def ray_with_faults():
    """start(*faults, system_config=None): a local Ray (two CPUs) whose worker processes inject `faults` under
    faulty:// (tests/faults.py); this process, the driver, reads and writes without faults."""
    with ExitStack() as stack:

        def start(*injected: dict, system_config: dict | None = None):
            faults.register()  # here too: the driver lists and plans faulty:// inputs
            return stack.enter_context(
                local_ray(
                    runtime_env={
                        "worker_process_setup_hook": "tests.faults.register",
                        # workers import tests.faults from the repository, which is not installed
                        "env_vars": {faults.ENV: json.dumps(list(injected)), "PYTHONPATH": str(REPO)},
                    },
                    _system_config=system_config or {},
                )
            )

        yield start


def _poison_and_innocent(tmp_path: Path, tiny_checkpoint) -> tuple[Path, list[dict], SummarizeSettings]:
    """Two shards of one unit each, part-000.parquet (the poison one) and part-001.parquet; the latter's docs; the
    settings. 200 rows a unit: the innocent unit is still running when the poison one kills their replica."""
    docs = documents(400, seed=25, max_sentences=3)
    corpus = tmp_path / "corpus"
    write_shards(corpus, docs, files=2, row_group_size=50, partition=None)
    return corpus, docs[200:], SummarizeSettings(model=str(tiny_checkpoint), **dict(FAST, rows_per_unit=200))


def _assert_poison_failed_alone(report, out: Path, innocent: list[dict]) -> None:
    assert list(report.failed) == ["part-000.parquet"], report.failed
    assert re.fullmatch(
        rf"its replica died {MAX_ATTEMPTS} times while running it alone \(last: .+\)", report.failed["part-000.parquet"]
    ), report.failed
    assert report.committed == 1 and not report.success
    assert_every_row_once(read_output(out), innocent)
    assert [r["relative"] for r in _failed_records(out)] == ["part-000.parquet"]


@pytest.mark.slow
def test_a_poison_unit_fails_alone_and_the_unit_beside_it_commits(ray_with_faults, tiny_checkpoint, tmp_path):
    """One replica runs both units at once; reading part-000 SIGKILLs the replica's process every time. Both units
    were in flight, so neither is blamed: each runs alone next. The poison unit dies alone MAX_ATTEMPTS times and
    fails; the innocent one commits."""
    corpus, innocent, settings = _poison_and_innocent(tmp_path, tiny_checkpoint)
    out = tmp_path / "out"
    ray_with_faults(faults.fault("open:rb", "*/part-000.parquet", "kill"))

    report = run(settings, f"faulty://{corpus}", str(out), replicas=1, progress_every=1)

    _assert_poison_failed_alone(report, out, innocent)
    # both went out again after the first death; the poison unit after each of its deaths alone but the last
    assert report.retries == UNITS_PER_REPLICA + MAX_ATTEMPTS - 1


@pytest.mark.slow
def test_replicas_killed_by_rays_memory_monitor_are_retried_and_only_the_hog_fails(
    ray_with_faults, tiny_checkpoint, tmp_path
):
    """Reading part-000 allocates memory until Ray's memory monitor kills the replica (its threshold set 3 GiB
    above what this machine uses now). Each kill is a retry, never a driver traceback; the unit that hogs memory
    fails alone and the one beside it commits."""
    used = psutil.virtual_memory().total - psutil.virtual_memory().available
    threshold = (used + (3 << 30)) / psutil.virtual_memory().total
    if threshold > 0.9:
        pytest.skip("less than 3 GiB of memory free")
    corpus, innocent, settings = _poison_and_innocent(tmp_path, tiny_checkpoint)
    out = tmp_path / "out"
    ray_with_faults(
        faults.fault("open:rb", "*/part-000.parquet", "hog"),
        system_config={"memory_usage_threshold": threshold, "memory_monitor_refresh_ms": 100},
    )

    report = run(settings, f"faulty://{corpus}", str(out), replicas=1, progress_every=1)

    _assert_poison_failed_alone(report, out, innocent)
    assert "MemoryError" not in report.failed["part-000.parquet"], "the memory monitor never killed the replica"


@pytest.mark.slow
def test_transient_storage_errors_are_retried_with_backoff_and_counted(ray_with_faults, tiny_checkpoint, tmp_path):
    """The replica's connection is reset twice opening part-001 and once publishing a unit: each read and write
    is tried again after a wait, the job succeeds with every row once, nothing is summarized twice, and the run
    reports the three retries."""
    docs = documents(40, seed=26)
    corpus = tmp_path / "corpus"
    write_shards(corpus, docs, files=2, row_group_size=10, partition=None)
    out = tmp_path / "out"
    ray_with_faults(
        faults.fault("open:rb", "*/part-001.parquet", "reset", times=2),
        faults.fault("mv", "*/_lakesum/staging/*", "reset", times=1),
    )
    settings = SummarizeSettings(model=str(tiny_checkpoint), **dict(FAST, rows_per_unit=20))
    printed = io.StringIO()

    report = run(settings, f"faulty://{corpus}", f"faulty://{out}", replicas=1, out=printed)

    assert report.success and not report.failed, report.failed
    assert report.storage_retries == 3 and report.retries == 0
    assert report.stats.rows == len(docs)  # summarized once: a retry reads or writes again, never summarizes
    assert_every_row_once(read_output(out), docs)
    assert json.loads(printed.getvalue().splitlines()[-1])["storage_retries"] == 3
    assert json.loads((out / "_lakesum" / "report.json").read_text())["storage_retries"] == 3


@pytest.mark.slow
def test_progress_counts_rows_as_they_are_summarized_before_their_unit_commits(ray_per_test, tiny_checkpoint, tmp_path):
    """One unit of 480 rows, summarized 32 rows at a time: the replica's heartbeats make the progress line count
    rows while the unit runs, not only once it commits."""
    docs = documents(480, seed=27, max_sentences=3)
    corpus = tmp_path / "corpus"
    write_shards(corpus, docs, files=1, row_group_size=480, partition=None)
    settings = SummarizeSettings(model=str(tiny_checkpoint), **dict(FAST, rows_per_unit=480))
    printed = io.StringIO()

    report = run(
        settings, str(corpus), str(tmp_path / "out"), replicas=1, progress_every=0.2, out=printed, json_logs=True
    )

    assert report.success
    lines = [json.loads(line) for line in printed.getvalue().splitlines() if line.startswith('{"time"')]
    partial = [
        line["documents"]
        for line in lines
        if line["event"] == "progress" and line["units"] == 0 and 0 < line["documents"] < len(docs)
    ]
    assert partial, [line for line in lines if line["event"] == "progress"]
    assert partial == sorted(partial)


@pytest.mark.slow
def test_a_hung_replica_is_killed_after_replica_timeout_and_the_job_completes(tiny_checkpoint, tmp_path):
    """jobs/summarize.py --replica-timeout 20: the replica's process is stopped (SIGSTOP) while it summarizes.
    Twenty seconds without a summarized row, the driver kills it; Ray restarts it, its units go out again, and
    the job succeeds with every row once."""
    docs = documents(120, seed=28)
    corpus = tmp_path / "corpus"
    write_shards(corpus, docs, files=4, row_group_size=10)
    out = tmp_path / "out"
    with RayHead(num_cpus=2) as head:
        command = job_command(
            tiny_checkpoint, corpus, out, "--replicas", "1", "--progress-every", "1", "--replica-timeout", "20"
        )
        with open(tmp_path / "job.log", "wb") as log:
            driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=head.client_env())
            try:
                busy = lambda: busy_replicas(psutil.Process(head.proc.pid), out)  # noqa: E731
                victim = wait_for(
                    lambda: committed_count(out) >= 1 and busy() or driver.poll() is not None, 180, "a busy replica"
                )
                assert driver.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
                stopped = victim[0]
                stopped.send_signal(signal.SIGSTOP)
                driver.wait(timeout=300)
            finally:
                driver.kill()
                driver.wait(timeout=30)
    printed = (tmp_path / "job.log").read_text()
    assert driver.returncode == 0, printed[-3000:]
    summary = json.loads(next(line for line in reversed(printed.splitlines()) if line.startswith('{"lakesum"')))
    assert summary["hung_replicas"] >= 1 and summary["retries"] >= 1, summary
    assert "no row summarized for 20 s" in printed
    assert not psutil.pid_exists(stopped.pid) or stopped.status() == psutil.STATUS_ZOMBIE
    assert_every_row_once(read_output(out), docs)
    assert (out / "_SUCCESS").exists()
