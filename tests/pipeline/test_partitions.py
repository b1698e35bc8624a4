"""--partition-filter: scheduled runs that summarize only the new partitions of a lake, into one output."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.driver import run
from pipeline.errors import InputError
from pipeline.partitions import parse_filter, partitions_of
from pipeline.settings import SummarizeSettings
from synthetic.corpus import documents

SETTINGS = dict(num_beams=1, max_new_tokens=4, rows_per_unit=50, batch_size=8)


@pytest.mark.parametrize(
    "text,partitions,expected",
    [
        ("date>=2026-11-02", {"date": "2026-11-02"}, True),
        ("date>=2026-11-02", {"date": "2026-11-01"}, False),
        ("date=2026-11-01,lang=en", {"date": "2026-11-01", "lang": "en"}, True),
        ("date=2026-11-01,lang=en", {"date": "2026-11-01", "lang": "hi"}, False),
        ("hour<10", {"hour": "9"}, True),  # numbers compare as numbers, not strings
        ("date!=2026-11-01", {"lang": "en"}, False),  # a shard without the key does not match
    ],
)
def test_conditions(text, partitions, expected):
    assert all(c.holds(partitions) for c in parse_filter(text)) is expected


def test_unreadable_filter_is_an_input_error():
    with pytest.raises(InputError, match="cannot read 'yesterday'"):
        parse_filter("date>=2026-11-01,yesterday")
    assert partitions_of("date=2026-11-01/lang=en/part-0.parquet") == {"date": "2026-11-01", "lang": "en"}


def test_nightly_runs_add_new_partitions_to_one_output(ray_local, tiny_checkpoint, tmp_path):
    lake = tmp_path / "lake"
    for n, day in enumerate(["2026-11-01", "2026-11-02", "2026-11-03"]):
        (lake / f"date={day}").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(documents(6, seed=n)), lake / f"date={day}" / "part-0.parquet")
    out = tmp_path / "out"
    settings = SummarizeSettings(model=str(tiny_checkpoint), **SETTINGS)
    first = run(settings, str(lake), str(out), replicas=1, partition_filter="date<=2026-11-01")
    assert first.success and first.stats.rows == 6
    second = run(settings, str(lake), str(out), replicas=1, partition_filter="date>=2026-11-02")
    assert second.success and second.stats.rows == 12
    manifest = json.loads((out / "_lakesum" / "manifest.json").read_text())
    assert len(manifest["units"]["id"]) == 3
    table = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 18 and len(set(table.column("id").to_pylist())) == 18
    assert (out / "_SUCCESS").exists()
    with pytest.raises(InputError, match="matches --partition-filter"):
        run(settings, str(lake), str(out), replicas=1, partition_filter="date>=2027-01-01")


def test_a_file_renamed_inside_the_selection_leaves_each_row_once(ray_local, tiny_checkpoint, tmp_path):
    """Finding 1 of issue 12: a renamed (or compacted) file inside the filtered partitions doubled its rows, with
    exit 0 and `_SUCCESS`."""
    lake, out = tmp_path / "lake", tmp_path / "out"
    (lake / "date=2026-11-01").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(documents(8, seed=3)), lake / "date=2026-11-01" / "a.parquet")
    settings = SummarizeSettings(model=str(tiny_checkpoint), **SETTINGS)
    assert run(settings, str(lake), str(out), replicas=1, partition_filter="date=2026-11-01").success
    (lake / "date=2026-11-01" / "a.parquet").rename(lake / "date=2026-11-01" / "b.parquet")

    again = run(settings, str(lake), str(out), replicas=1, partition_filter="date=2026-11-01")
    assert again.success and again.removed == 1
    table = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()
    assert sorted(table.column("id").to_pylist()) == sorted(d["id"] for d in documents(8, seed=3))
    assert sorted(p.name for p in (out / "date=2026-11-01").iterdir()) == ["b.parquet"]


def test_the_partition_filter_prunes_the_listing_itself(tmp_path, monkeypatch):
    """Only folders that may match are listed: the README promises --partition-filter limits the listing."""
    from fsspec.implementations.memory import MemoryFileSystem

    from pipeline.listing import list_shards

    fs, lake = MemoryFileSystem(), f"/lakesum-test-{tmp_path.name}"
    for day in ["2026-11-01", "2026-11-02", "2026-11-03"]:
        for lang in ["en", "hi"]:
            with fs.open(f"{lake}/date={day}/lang={lang}/part-0.parquet", "wb") as f:
                pq.write_table(pa.Table.from_pylist(documents(2, seed=1)), f)
    listed = []
    ls = MemoryFileSystem.ls

    def recording_ls(self, path, detail=False, **kwargs):
        listed.append(path.rstrip("/")[len(lake) :].lstrip("/"))
        return ls(self, path, detail=detail, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "ls", recording_ls)
    try:
        _, shards = list_shards(f"memory://{lake}", conditions=parse_filter("date=2026-11-02,lang=hi"))
    finally:
        fs.rm(lake, recursive=True)
    assert [s.relative for s in shards] == ["date=2026-11-02/lang=hi/part-0.parquet"]
    assert sorted(listed) == ["", "date=2026-11-02", "date=2026-11-02/lang=hi"]


def test_dry_run_prints_what_would_change_and_touches_nothing(ray_local, tiny_checkpoint, tmp_path):
    import io

    lake, out = tmp_path / "lake", tmp_path / "out"
    for day in ["2026-11-01", "2026-11-02"]:
        (lake / f"date={day}").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(documents(4, seed=7)), lake / f"date={day}" / "a.parquet")
    settings = SummarizeSettings(model=str(tiny_checkpoint), **SETTINGS)
    assert run(settings, str(lake), str(out), replicas=1).success
    (lake / "date=2026-11-01" / "a.parquet").rename(lake / "date=2026-11-01" / "b.parquet")
    pq.write_table(pa.Table.from_pylist(documents(6, seed=8)), lake / "date=2026-11-03.parquet")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    printed = io.StringIO()
    report = run(settings, str(lake), str(out), replicas=1, dry_run=True, out=printed)
    assert report.success
    plan = json.loads(printed.getvalue().strip().splitlines()[-1])
    assert plan["run"] == {"units": 2, "rows": 10} and plan["skip"] == {"units": 1, "rows": 4}
    assert plan["remove"] == {"units": 1, "rows": 4} and plan["redo"] == {"units": 0, "rows": 0}
    assert "date=2026-11-01/a.parquet" in printed.getvalue()  # the files of each action are named
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written, no lease taken
