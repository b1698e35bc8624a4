"""Kill tests: processes SIGKILLed mid-run (the driver, a replica), and still every row exactly once.

The helpers that start and stop a Ray of our own (never `ray stop`, which would stop every Ray on the
machine) live in test_cluster.py.
"""
from __future__ import annotations

import re
import signal
import subprocess
import threading
from pathlib import Path

import psutil
import pytest

from pipeline.driver import MAX_ATTEMPTS, run
from pipeline.replica import UNITS_PER_REPLICA
from pipeline.settings import SummarizeSettings
from tests.fixtures.corpus import documents, write_shards
from tests.pipeline.test_cluster import ray_local  # noqa: F401 (a fixture)
from tests.pipeline.test_cluster import (FAST, RayHead, assert_every_row_once, committed_count, job_command,
                                         ray_processes, wait_for)
from tests.pipeline.test_summarize import read_output


def data_files(out: Path) -> dict[str, bytes]:
    """Every output file but `_SUCCESS` and `_lakesum/`, by relative path."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not p.relative_to(out).as_posix().startswith("_")}


@pytest.mark.slow
def test_driver_sigkill_then_rerun_gives_every_row_once_identical_to_uninterrupted(tiny_checkpoint, tmp_path):
    """jobs/summarize.py against a `ray start --head`, SIGKILLed once some units committed; the same command
    again resumes, and the output is byte for byte that of a run never interrupted."""
    docs = documents(120, seed=21)
    corpus = tmp_path / "corpus"
    write_shards(corpus, docs, files=4, row_group_size=10)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    with RayHead(num_cpus=2) as head:
        command = lambda out: job_command(tiny_checkpoint, corpus, out, "--replicas", "2")  # noqa: E731
        with open(tmp_path / "killed.log", "wb") as log:
            driver = subprocess.Popen(command(killed), stdout=log, stderr=subprocess.STDOUT, env=head.client_env())
            try:
                wait_for(lambda: committed_count(killed) >= 3 or driver.poll() is not None, 180,
                         "three units to commit")
                assert driver.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert head.replicas(), "the job's replicas are not where this test looks for them"
                driver.send_signal(signal.SIGKILL)
            finally:
                driver.kill()
                driver.wait(timeout=30)
        assert driver.returncode == -signal.SIGKILL
        # Its replicas are owned by the dead driver: Ray kills them. Wait, so none commits behind the rerun.
        wait_for(lambda: not head.replicas(), 60, "the dead driver's replicas to go")
        units = 12
        assert committed_count(killed) < units, "the driver was killed after the job had done its work"
        assert not (killed / "_SUCCESS").exists()

        rerun = subprocess.run(command(killed), capture_output=True, text=True, timeout=300, env=head.client_env())
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        resumed = re.search(r"resuming: (\d+) of (\d+) units already committed", rerun.stderr)
        assert resumed, rerun.stderr[-3000:]
        assert 0 < int(resumed[1]) < int(resumed[2]) == units

        uninterrupted = subprocess.run(command(clean), capture_output=True, text=True, timeout=300,
                                       env=head.client_env())
        assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
        assert "resuming" not in uninterrupted.stderr

    assert_every_row_once(read_output(killed), docs)
    assert (killed / "_SUCCESS").exists() and (clean / "_SUCCESS").exists()
    # Byte for byte: the same files at the same names, each unit's rows in input order.
    assert data_files(killed) == data_files(clean)
    assert not list((killed / "_lakesum").glob("staging/*"))


@pytest.mark.slow
def test_replica_killed_mid_unit_job_finishes_with_every_row_once(ray_local, tiny_checkpoint, tmp_path):
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
        busy = lambda: ray_processes(me, "ray::Replica.process")  # noqa: E731
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
def test_a_unit_whose_replica_dies_every_time_is_given_up_and_a_rerun_completes_it(ray_local, tiny_checkpoint,
                                                                                   tmp_path):
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
            for proc in ray_processes(me, "ray::Replica.process"):
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
    assert re.fullmatch(rf"its replica died {MAX_ATTEMPTS} times \(\w+Error\)", report.failed["part-000.parquet"])
    assert not (out / "part-000.parquet").exists() and not (out / "_SUCCESS").exists()
    assert [r["relative"] for r in _failed_records(out)] == ["part-000.parquet"]

    again = run(settings, str(corpus), str(out), replicas=1)
    assert again.success and again.skipped == 0 and again.committed == 1
    assert_every_row_once(read_output(out), docs)
    assert not _failed_records(out)


def _failed_records(out: Path) -> list[dict]:
    import json

    return [json.loads(p.read_text()) for p in sorted((out / "_lakesum" / "failed").glob("*.json"))]
