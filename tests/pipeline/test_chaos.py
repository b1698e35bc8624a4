"""The chaos test: three nights over a lake that changes, each night's job SIGKILLed at random points (the driver,
a replica) and rerun until it finishes; then every current row exactly once, nothing of a deleted or replaced
file, and summaries equal to an uninterrupted run's.

Seeded (CHAOS_SEED, default 12): the lake and the kill plan reproduce; when a kill lands depends on the
machine's speed. It prints its figures (kills survived, rows checked,
duplicates) on one line starting "chaos:", which the README's reliability section quotes.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from synthetic.corpus import documents
from tests.pipeline.helpers import RayHead, job_command, wait_for

SEED = int(os.environ.get("CHAOS_SEED", "12"))
LEASE_TIMEOUT = 2.0  # seconds: a killed driver's lease lapses quickly, so reruns take it over
KILLS_PER_NIGHT = 3
CORRUPT = "date=2026-11-02/corrupt.parquet"
SCHEMA = pa.schema([("id", pa.string()), ("lang", pa.string()), ("text", pa.string())])


class Lake:
    """The input lake and what each of its files holds now (id -> text), to check the output against."""

    def __init__(self, root: Path):
        self.root = root
        self.files: dict[str, dict[str, str | None]] = {}  # relative -> {id: text}

    def write(self, relative: str, rows: list[dict], *, dictionary: bool = False, invalid_utf8: int | None = None):
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        if invalid_utf8 is not None:  # one value with bytes that are not UTF-8, as a broken writer leaves them
            raw = [r["text"].encode() for r in rows]
            raw[invalid_utf8] = b"caf\xe9 \xff broken"
            offsets = pa.array([0, *__import__("itertools").accumulate(len(b) for b in raw)], pa.int32())
            text = pa.StringArray.from_buffers(len(raw), offsets.buffers()[1], pa.py_buffer(b"".join(raw)))
            table = table.set_column(2, "text", text)
        if dictionary:
            table = table.set_column(2, "text", table.column("text").dictionary_encode())
        pq.write_table(table, path, row_group_size=4)
        self.files[relative] = {r["id"]: r["text"] for r in rows}
        if invalid_utf8 is not None:
            self.files[relative][rows[invalid_utf8]["id"]] = None  # summarized as an error

    def corrupt(self, relative: str):
        (self.root / relative).parent.mkdir(parents=True, exist_ok=True)
        (self.root / relative).write_bytes(b"PAR1 this is not a parquet file PAR1")

    def rename(self, old: str, new: str):
        (self.root / old).rename(self.root / new)
        self.files[new] = self.files.pop(old)

    def delete(self, relative: str):
        (self.root / relative).unlink()
        del self.files[relative]

    def expected_ids(self) -> list[str]:
        return sorted(i for rows in self.files.values() for i in rows)


def _rows(rng: random.Random, night: int, name: str, count: int) -> list[dict]:
    docs = documents(count, seed=rng.randrange(1 << 30), max_sentences=3)
    return [{**d, "id": f"{name}-n{night}-{k}"} for k, d in enumerate(docs)]


def _night(lake: Lake, rng: random.Random, night: int) -> None:
    if night == 0:  # 40 shards in 4 partitions, an empty file, a corrupt one, a dictionary and a broken row
        for p in range(4):
            for f in range(10):
                relative = f"date=2026-11-0{p + 1}/part-{f:02d}.parquet"
                lake.write(
                    relative,
                    _rows(rng, night, relative, rng.randint(2, 6)),
                    dictionary=(p, f) == (0, 3),
                    invalid_utf8=1 if (p, f) == (1, 4) else None,
                )
        lake.write("date=2026-11-03/empty.parquet", [])
        lake.corrupt(CORRUPT)
    elif night == 1:  # files added, one rewritten in place, one renamed, one deleted
        for f in range(10, 13):
            relative = f"date=2026-11-04/part-{f:02d}.parquet"
            lake.write(relative, _rows(rng, night, relative, rng.randint(2, 6)))
        rewritten = "date=2026-11-01/part-05.parquet"
        ids = list(lake.files[rewritten])
        lake.write(rewritten, [{**d, "id": i} for d, i in zip(_rows(rng, night, rewritten, len(ids)), ids)])
        lake.rename("date=2026-11-02/part-07.parquet", "date=2026-11-02/compacted-07.parquet")
        lake.delete("date=2026-11-03/part-02.parquet")
    else:  # a partition added, and another file rewritten with a new layout (more rows, more row groups)
        for f in range(5):
            relative = f"date=2026-11-05/part-{f:02d}.parquet"
            lake.write(relative, _rows(rng, night, relative, rng.randint(2, 6)))
        lake.write("date=2026-11-04/part-10.parquet", _rows(rng, night, "grown", 11))


def _run_with_kills(head: RayHead, command: list[str], out: Path, rng: random.Random, log: Path) -> dict:
    """Run the job, SIGKILLing it (driver or a replica) at random moments KILLS_PER_NIGHT times; then let it finish.

    A killed replica is restarted by Ray inside the same job, so the next kill may hit that job again; a killed
    driver ends its job, which is started again once its lease lapses.
    """
    kills = {"driver": 0, "replica": 0}
    # both kinds every night, in a random order; the rest of the kills chosen at random
    victims = ["driver", "replica", *(rng.choice(["driver", "replica"]) for _ in range(KILLS_PER_NIGHT - 2))]
    rng.shuffle(victims)
    for _ in range(KILLS_PER_NIGHT + 4):
        with open(log, "ab") as f:
            job = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=head.client_env())
        try:
            while victims and job.poll() is None:
                deadline = time.monotonic() + rng.uniform(2.0, 7.0)
                while time.monotonic() < deadline and job.poll() is None:
                    time.sleep(0.05)
                if job.poll() is not None:
                    break
                victim, replicas = victims[0], head.replicas()
                if victim == "replica" and not replicas:
                    continue  # its replicas are still starting (placed once their model loads): wait for one
                victims.pop(0)
                if victim == "replica":
                    rng.choice(replicas).send_signal(signal.SIGKILL)
                    kills["replica"] += 1
                else:
                    job.send_signal(signal.SIGKILL)
                    kills["driver"] += 1
                    break
            status = job.wait(timeout=600)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
        if status == -signal.SIGKILL:
            # the dead driver's replicas are killed by Ray; its lease lapses after LEASE_TIMEOUT
            wait_for(lambda: not head.replicas(), 60, "the dead driver's replicas to go")
            time.sleep(LEASE_TIMEOUT + 0.5)
            continue
        if status in (0, 1) and _only_the_corrupt_shard_failed(out):
            return kills
    raise AssertionError(f"the job did not finish after {KILLS_PER_NIGHT + 4} starts: {log.read_text()[-3000:]}")


def _only_the_corrupt_shard_failed(out: Path) -> bool:
    import json

    report = out / "_lakesum" / "report.json"
    return report.exists() and set(json.loads(report.read_text())["failed"]) == {CORRUPT}


def _summaries(out: Path) -> pa.Table:
    return pads.dataset(str(out), format="parquet", partitioning="hive").to_table(columns=["id", "summary", "error"])


@pytest.mark.slow
def test_three_nights_of_kills_leave_every_current_row_once_as_an_uninterrupted_run_writes_it(
    tiny_checkpoint, tmp_path, capsys
):
    # two generators: the lake's content does not depend on how many kills a machine's speed let happen
    lake_rng, kill_rng = random.Random(SEED), random.Random(SEED + 1)
    lake = Lake(tmp_path / "lake")
    out = tmp_path / "out"
    extra = ("--replicas", "2", "--rows-per-unit", "8", "--lease-timeout", str(LEASE_TIMEOUT))
    kills, rows_checked, duplicates = {"driver": 0, "replica": 0}, 0, 0
    with RayHead(num_cpus=2) as head:
        for night in range(3):
            _night(lake, lake_rng, night)
            survived = _run_with_kills(
                head,
                job_command(tiny_checkpoint, lake.root, out, *extra),
                out,
                kill_rng,
                tmp_path / f"night-{night}.log",
            )
            kills = {k: kills[k] + survived[k] for k in kills}
            clean = tmp_path / f"clean-{night}"
            reference = subprocess.run(
                job_command(tiny_checkpoint, lake.root, clean, *extra),
                capture_output=True,
                text=True,
                env=head.client_env(),
                timeout=600,
            )
            assert reference.returncode == 1 and _only_the_corrupt_shard_failed(clean), reference.stderr[-3000:]

            got, want = _summaries(out), _summaries(clean)
            ids = got.column("id").to_pylist()
            duplicates += len(ids) - len(set(ids))
            assert len(ids) == len(set(ids)), f"night {night}: a row was written twice"
            assert sorted(ids) == lake.expected_ids(), f"night {night}: rows missing, or of deleted files"
            assert got.sort_by("id").equals(want.sort_by("id")), f"night {night}: summaries differ from a clean run"
            errors = dict(zip(ids, got.column("error").to_pylist()))
            broken = [i for rows in lake.files.values() for i, text in rows.items() if text is None]
            assert broken and all("UTF-8" in errors[i] for i in broken)
            assert not (out / "_SUCCESS").exists()  # the corrupt shard keeps failing, named in the report
            rows_checked += len(ids)
            shutil.rmtree(clean)
    with capsys.disabled():
        print(
            f"\nchaos: seed {SEED}, 3 nights, kills survived: {kills['driver']} driver + {kills['replica']} "
            f"replica, rows checked: {rows_checked}, duplicates found: {duplicates}"
        )
