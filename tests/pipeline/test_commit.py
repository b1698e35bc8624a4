"""The commit protocol against real files: manifest, resume, overwrite, staging, publish, markers, _SUCCESS."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.commit import OutputLocation, manifest_units
from pipeline.errors import OutputError
from pipeline.footers import inspect_shards
from pipeline.listing import list_shards
from pipeline.retry import Backoff
from pipeline.units import WorkUnit, plan_units, read_unit
from tests.pipeline.helpers import SECRET, numbered_rows, write_arrow, write_parquet

SETTINGS = {
    "model": "csebuetnlp/mT5_multilingual_XLSum",
    "model_hash": "0f3c",
    "num_beams": 4,
    "max_new_tokens": 84,
    "text_column": "text",
    "id_column": "id",
    "rows_per_unit": 4,
}
LOCAL = fsspec.filesystem("file", auto_mkdir=True)  # for writing test lakes


OUT_SCHEMA = pa.schema([("id", pa.int64()), ("lang", pa.string()), ("summary", pa.string()), ("error", pa.string())])


class Killed(BaseException):
    """Stands for SIGKILL at a chosen point: nothing after it runs (raised where no cleanup code is around)."""


def _plan(
    fs, root: str, rows_per_unit: int = 4, protocol: str = "", storage_options=None
) -> tuple[fsspec.AbstractFileSystem, list[WorkUnit]]:
    """Write a Hive-partitioned lake (30 rows: ids 0..29) at root on fs, then list and plan it by URL."""
    write_parquet(fs, f"{root}/date=2026-11-01/part-0.parquet", numbered_rows(0, 10), row_group_size=4)
    write_parquet(fs, f"{root}/date=2026-11-01/part-1.parquet", numbered_rows(10, 2))
    write_arrow(fs, f"{root}/date=2026-11-02/part-0.arrow", numbered_rows(12, 18), batch_rows=3)
    write_parquet(fs, f"{root}/date=2026-11-02/empty.parquet", numbered_rows(0, 0))
    input_fs, shards = list_shards(f"{protocol}{root}", storage_options)
    infos, errors = inspect_shards(input_fs, shards)
    assert not errors
    return input_fs, plan_units(infos, rows_per_unit)


def _plan_only(root: str) -> tuple[fsspec.AbstractFileSystem, list[WorkUnit]]:
    input_fs, shards = list_shards(root)
    infos, errors = inspect_shards(input_fs, shards)
    assert not errors
    return input_fs, plan_units(infos, 4)


def _summarized(fs, unit: WorkUnit):
    """What the stages would emit for the unit: the input without its text, plus summary and error."""
    for batch in read_unit(fs, unit):
        yield pa.RecordBatch.from_arrays(
            [
                batch.column("id"),
                batch.column("lang"),
                pc.binary_join_element_wise("summary of ", batch.column("text"), ""),
                pa.nulls(batch.num_rows, pa.string()),
            ],
            schema=OUT_SCHEMA,
        )


def _commit(location: OutputLocation, fs, units, attempt: str = "a1") -> None:
    for unit in units:
        assert location.write_unit(unit, OUT_SCHEMA, _summarized(fs, unit), attempt=attempt) == unit.num_rows


def _files(root) -> set[str]:
    fs = fsspec.filesystem("file")
    return {p[len(str(root)) + 1 :] for p in fs.find(str(root))}


def _data_files(root) -> set[str]:
    return {p for p in _files(root) if not p.startswith(("_lakesum/", "_SUCCESS"))}


@pytest.fixture
def lake(tmp_path):
    fs, units = _plan(LOCAL, f"{tmp_path}/lake")
    return fs, units, tmp_path / "out"


# ---------------------------------------------------------------------------------------------------------------
# prepare


def test_prepare_writes_the_manifest_with_settings_and_each_units_row_count(lake):
    fs, units, out = lake
    OutputLocation(str(out)).prepare(SETTINGS, units=units)

    manifest = json.loads((out / "_lakesum" / "manifest.json").read_text())
    assert manifest["settings"] == SETTINGS
    assert [(u.relative, u.start, u.stop, u.num_rows, u.output) for u in manifest_units(manifest)] == [
        (u.shard.relative, u.start, u.stop, u.num_rows, u.output_relative) for u in units
    ]
    assert sum(manifest["units"]["num_rows"]) == 30
    assert _files(out) == {"_lakesum/manifest.json"}


def test_same_settings_resume_keeps_what_was_committed(lake):
    fs, units, out = lake
    location = OutputLocation(str(out))
    location.prepare(SETTINGS, units=units)
    _commit(location, fs, units[:3])
    before = {p: (out / p).stat().st_mtime_ns for p in _data_files(out)}

    again = OutputLocation(str(out))
    again.prepare(dict(reversed(list(SETTINGS.items()))), units=units)  # key order does not matter

    assert set(again.committed_units()) == {u.id for u in units[:3]}
    assert {p: (out / p).stat().st_mtime_ns for p in _data_files(out)} == before


def test_different_settings_are_refused_naming_each_differing_key(lake):
    fs, units, out = lake
    location = OutputLocation(str(out))
    location.prepare(SETTINGS, units=units)
    _commit(location, fs, units[:2])
    files = _files(out)

    with pytest.raises(OutputError) as error:
        location.prepare({**SETTINGS, "num_beams": 2, "prefix": "summarize: "}, units=units)
    message = str(error.value)
    assert "num_beams: 4 -> 2" in message
    assert "prefix: '(unset)' -> 'summarize: '" in message
    assert "pass --overwrite" in message
    assert "max_new_tokens" not in message
    assert _files(out) == files  # refused means untouched


def test_overwrite_deletes_exactly_the_old_outputs_and_leaves_foreign_files_alone(lake):
    fs, units, out = lake
    location = OutputLocation(str(out))
    location.prepare(SETTINGS, units=units)
    _commit(location, fs, units)
    assert location.finish({})
    old_outputs = {u.output_relative for u in units}
    foreign = {"notes.txt", "date=2026-11-01/someone-elses.parquet", "other/x.parquet", "_lakesum.bak"}
    for name in foreign:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"not ours")

    # new settings, and a plan with other output names (whole files instead of row-group ranges)
    new_units = plan_units(inspect_shards(fs, list_shards(str(out.parent / "lake"))[1])[0], rows_per_unit=100)
    assert {u.output_relative for u in new_units} != old_outputs
    location.prepare({**SETTINGS, "rows_per_unit": 100}, units=new_units, overwrite=True)

    assert _files(out) == foreign | {"_lakesum/manifest.json"}
    assert all((out / name).read_bytes() == b"not ours" for name in foreign)
    assert location.committed_units() == {}
    assert json.loads((out / "_lakesum" / "manifest.json").read_text())["settings"]["rows_per_unit"] == 100
    assert not (out / "date=2026-11-02").exists()  # emptied partition folders go too


def test_prepare_sweeps_staging_left_by_killed_runs(lake):
    fs, units, out = lake
    location = OutputLocation(str(out))
    location.prepare(SETTINGS, units=units)
    staging = out / "_lakesum" / "staging"
    staging.mkdir()
    (staging / f"{units[0].id}.dead1.parquet").write_bytes(b"half a file")

    location.prepare(SETTINGS, units=units)
    assert not staging.exists() or not any(staging.iterdir())
    assert _data_files(out) == set()


def test_added_files_join_the_plan_and_resume(lake):
    fs, units, out = lake
    location = OutputLocation(str(out))
    location.prepare(SETTINGS, units=units[1:])
    _commit(location, fs, units[1:3])

    changes = location.prepare(SETTINGS, units=units)  # a new file arrived: its units are added to the plan
    assert json.loads((out / "_lakesum" / "manifest.json").read_text())["units"]["id"] == [u.id for u in units]
    assert set(location.committed_units()) == {u.id for u in units[1:3]}
    assert [u.id for u in changes.skip] == [u.id for u in units[1:3]]
    assert changes.remove == [] and changes.redo == []


def _gone(relative):
    return False


def test_a_deleted_inputs_output_is_removed_only_once_the_input_is_confirmed_gone(lake):
    fs, units, out = lake
    location = OutputLocation(str(out))
    location.prepare(SETTINGS, units=units)
    _commit(location, fs, units)
    arrow = [u for u in units if u.shard.format == "arrow"]  # date=2026-11-02/part-0.arrow, 18 rows in 5 units
    rest = [u for u in units if u not in arrow]

    # the listing left the file out, but it is still there: an incomplete listing; nothing is deleted
    changes = location.prepare(SETTINGS, units=rest, input_exists=lambda relative: True)
    assert [u.id for u in changes.missed] == [u.id for u in arrow] and changes.remove == []
    assert {u.output_relative for u in arrow} <= _data_files(out)
    assert set(location.committed_units()) == {u.id for u in units}

    changes = location.prepare(SETTINGS, units=rest, input_exists=_gone)
    assert [u.id for u in changes.remove] == [u.id for u in arrow]
    assert _data_files(out) == {u.output_relative for u in rest}
    assert set(location.committed_units()) == {u.id for u in rest}
    assert json.loads((out / "_lakesum" / "manifest.json").read_text())["units"]["id"] == [u.id for u in rest]


def test_a_renamed_file_leaves_no_rows_under_its_old_name(tmp_path):
    """Finding 1 of issue 12: a file renamed inside the selection was kept under its old name too."""
    fs, units = _plan(LOCAL, f"{tmp_path}/lake")
    out = tmp_path / "out"
    location = OutputLocation(str(out))
    location.prepare(SETTINGS, units=units)
    _commit(location, fs, units)
    LOCAL.mv(f"{tmp_path}/lake/date=2026-11-01/part-1.parquet", f"{tmp_path}/lake/date=2026-11-01/renamed.parquet")
    fs, units = _plan_only(f"{tmp_path}/lake")

    changes = location.prepare(SETTINGS, units=units, input_exists=lambda r: LOCAL.exists(f"{tmp_path}/lake/{r}"))
    assert {u.relative for u in changes.remove} == {"date=2026-11-01/part-1.parquet"}
    assert {u.relative for u in changes.run} == {"date=2026-11-01/renamed.parquet"}
    _commit(location, fs, [u for u in units if u.id in changes.todo()])
    ids = pa.concat_tables(pq.read_table(out / p).select(["id"]) for p in _data_files(out)).column("id").to_pylist()
    assert sorted(ids) == list(range(30))


def test_a_rewritten_file_is_redone_and_its_new_output_replaces_the_old(lake):
    """Finding 4 of issue 12: a file rewritten in place with the same row groups kept its stale summaries."""
    fs, units, out = lake
    location = OutputLocation(str(out))
    location.prepare(SETTINGS, units=units)
    _commit(location, fs, units)
    path = [u for u in units if u.shard.relative == "date=2026-11-01/part-1.parquet"][0].shard.path
    write_parquet(LOCAL, path, numbered_rows(10, 2).set_column(1, "text", pa.array(["new text 10", "new text 11"])))
    _, replanned = _plan_only(str(out.parent / "lake"))
    assert [u.output_relative for u in replanned] == [u.output_relative for u in units]  # same layout

    changes = location.prepare(SETTINGS, units=replanned, input_exists=_gone)
    [redo] = changes.redo
    assert redo.relative == "date=2026-11-01/part-1.parquet" and changes.run == []
    assert [u.relative for u in changes.remove] == [redo.relative]
    assert redo.output in _data_files(out)  # the old output stays until the new one replaces it
    _commit(location, fs, [u for u in replanned if u.id == redo.id])
    assert pq.read_table(out / redo.output).column("summary").to_pylist() == [
        "summary of new text 10",
        "summary of new text 11",
    ]
    assert set(location.committed_units()) == {u.id for u in replanned}


def test_units_outside_the_selection_are_kept_and_inside_it_mirror_the_input(lake):
    fs, units, out = lake
    location = OutputLocation(str(out))
    location.prepare(SETTINGS, units=units)
    _commit(location, fs, units)
    first_day = [u for u in units if u.shard.relative.startswith("date=2026-11-01/")]
    in_selection = lambda relative: relative.startswith("date=2026-11-02/")  # noqa: E731

    changes = location.prepare(
        SETTINGS,
        units=[
            u
            for u in units
            if not u.shard.relative.startswith("date=2026-11-01/")
            and u.shard.relative != "date=2026-11-02/empty.parquet"
        ],
        in_selection=in_selection,
        input_exists=_gone,
    )
    assert {u.relative for u in changes.remove} == {"date=2026-11-02/empty.parquet"}
    assert {u.output_relative for u in first_day} <= _data_files(out)
    assert "date=2026-11-02/empty.parquet" not in _data_files(out)


def test_markers_are_compacted_into_one_file_that_reads_back_the_same(lake):
    fs, units, out = lake
    location = OutputLocation(str(out))
    location.prepare(SETTINGS, units=units)
    _commit(location, fs, units[:4])
    before = location.committed_units()
    assert location.finish({}) is False
    assert not list((out / "_lakesum" / "committed").glob("*.json"))
    assert location.committed_units() == before
    _commit(location, fs, units[4:])
    assert location.finish({}) is True
    assert set(json.loads((out / "_lakesum" / "committed.json").read_text())["units"]["id"]) == {u.id for u in units}
    marker = location.committed_units()[units[0].id]
    assert marker["input_identity"] == units[0].identity and ":footer:" in marker["input_identity"]


def test_fresh_output_refuses_files_at_its_names_unless_overwrite(lake):
    fs, units, out = lake
    target = out / units[0].output_relative
    target.parent.mkdir(parents=True)
    target.write_bytes(b"someone else's")
    with pytest.raises(OutputError, match="already holds 1 file"):
        OutputLocation(str(out)).prepare(SETTINGS, units=units)
    OutputLocation(str(out)).prepare(SETTINGS, units=units, overwrite=True)


def test_output_over_the_input_is_refused_even_with_overwrite(tmp_path):
    fs, units = _plan(LOCAL, f"{tmp_path}/lake", rows_per_unit=100)
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="would be written over an input file"):
            OutputLocation(str(tmp_path / "lake")).prepare(SETTINGS, units=units, overwrite=overwrite)


def test_manifest_naming_files_outside_the_output_is_not_trusted_for_deletion(lake):
    fs, units, out = lake
    location = OutputLocation(str(out))
    location.prepare(SETTINGS, units=units)
    manifest = json.loads((out / "_lakesum" / "manifest.json").read_text())
    manifest["units"]["output"][0] = "../lake/date=2026-11-01/part-1.parquet"
    (out / "_lakesum" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(OutputError, match="outside the output location"):
        location.prepare(SETTINGS, units=units, overwrite=True)
    assert (out.parent / "lake" / "date=2026-11-01" / "part-1.parquet").exists()


# ---------------------------------------------------------------------------------------------------------------
# write_unit


def test_write_unit_publishes_at_the_final_name_then_marks_it(lake):
    fs, units, out = lake
    location = OutputLocation(str(out))
    location.prepare(SETTINGS, units=units)
    unit = units[1]
    assert location.write_unit(unit, OUT_SCHEMA, _summarized(fs, unit), attempt="a1") == 4

    table = pq.read_table(out / unit.output_relative)
    assert table.schema == OUT_SCHEMA
    assert table.column("id").to_pylist() == [4, 5, 6, 7]
    assert table.column("summary").to_pylist() == [f"summary of document {i}" for i in range(4, 8)]
    marker = location.committed_units()[unit.id]
    assert (marker["num_rows"], marker["output"], marker["attempt"]) == (4, unit.output_relative, "a1")
    assert not list((out / "_lakesum" / "staging").iterdir())


def test_batches_raising_midway_publish_nothing_and_a_rerun_writes_the_unit_once(tmp_path):
    fs, units = _plan(LOCAL, f"{tmp_path}/lake", rows_per_unit=100)
    out = tmp_path / "out"
    location = OutputLocation(str(out))
    location.prepare(SETTINGS, units=units)
    [unit] = [u for u in units if u.shard.format == "arrow"]  # 18 rows in 6 record batches

    def dies_after_one_batch():
        batches = _summarized(fs, unit)
        yield next(batches)
        raise RuntimeError("replica lost its GPU")

    with pytest.raises(RuntimeError, match="lost its GPU"):
        location.write_unit(unit, OUT_SCHEMA, dies_after_one_batch(), attempt="a1")
    assert _data_files(out) == set()
    assert location.committed_units() == {}

    location.write_unit(unit, OUT_SCHEMA, _summarized(fs, unit), attempt="a2")
    assert _data_files(out) == {unit.output_relative}
    assert pq.read_table(out / unit.output_relative).column("id").to_pylist() == [
        r for b in read_unit(fs, unit) for r in b.column("id").to_pylist()
    ]


def test_killed_between_publish_and_marker_then_rerun_leaves_one_file_with_the_rows_once(lake):
    fs, units, out = lake

    class DiesBeforeTheMarker(OutputLocation):
        def _put_json(self, path, obj):
            if "/committed/" in path:
                raise Killed
            super()._put_json(path, obj)

    dying = DiesBeforeTheMarker(str(out))
    dying.prepare(SETTINGS, units=units)
    with pytest.raises(Killed):
        dying.write_unit(units[0], OUT_SCHEMA, _summarized(fs, units[0]), attempt="a1")
    assert _data_files(out) == {units[0].output_relative}  # published, but not committed
    assert dying.committed_units() == {}

    rerun = OutputLocation(str(out))
    rerun.prepare(SETTINGS, units=units)
    todo = [u for u in units if u.id not in rerun.committed_units()]
    assert todo == units
    _commit(rerun, fs, todo, attempt="a2")
    assert rerun.finish({})
    assert sorted(ds.dataset(str(out), format="parquet").to_table().column("id").to_pylist()) == list(range(30))


# Run in a child process that is SIGKILLed while it streams a unit into staging.
_WRITER = r"""
import pathlib, sys, time
import pyarrow as pa
from pipeline.commit import OutputLocation
from pipeline.footers import inspect_shards
from pipeline.listing import list_shards
from pipeline.units import plan_units, read_unit

lake, out, ready = sys.argv[1:]
fs, shards = list_shards(lake)
[unit] = [u for u in plan_units(inspect_shards(fs, shards)[0], 100) if u.shard.format == "arrow"]

def batches():
    for i, batch in enumerate(read_unit(fs, unit, ["id"])):
        yield batch
        if i == 2:
            pathlib.Path(ready).touch()
            time.sleep(60)

OutputLocation(out).write_unit(unit, pa.schema([("id", pa.int64())]), batches(), attempt="killed")
"""


def test_sigkill_while_staging_publishes_nothing_and_the_next_prepare_sweeps_it(tmp_path):
    fs, units = _plan(LOCAL, f"{tmp_path}/lake", rows_per_unit=100)
    [unit] = [u for u in units if u.shard.format == "arrow"]
    out, ready = tmp_path / "out", tmp_path / "ready"
    OutputLocation(str(out)).prepare(SETTINGS, units=units)

    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, f"{tmp_path}/lake", str(out), str(ready)], cwd=Path(__file__).parents[2]
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert writer.poll() is None, "the writer exited before it was killed"
            assert time.monotonic() < deadline, "the writer never got going"
            time.sleep(0.05)
    finally:
        writer.kill()  # SIGKILL: no cleanup runs
        writer.wait()
    assert _files(out) == {"_lakesum/manifest.json", f"_lakesum/staging/{unit.id}.killed.parquet"}

    location = OutputLocation(str(out))
    location.prepare(SETTINGS, units=units)
    assert _files(out) == {"_lakesum/manifest.json"}
    location.write_unit(unit, pa.schema([("id", pa.int64())]), read_unit(fs, unit, ["id"]), attempt="a2")
    assert _data_files(out) == {unit.output_relative}
    assert pq.read_table(out / unit.output_relative).column("id").to_pylist() == list(range(12, 30))


def test_row_count_other_than_the_units_is_not_committed(lake):
    fs, units, out = lake
    location = OutputLocation(str(out))
    location.prepare(SETTINGS, units=units)
    short = (b.slice(0, b.num_rows - 1) for b in _summarized(fs, units[0]))
    with pytest.raises(RuntimeError, match="3 output rows for row groups 0-1, which hold 4; not committed"):
        location.write_unit(units[0], OUT_SCHEMA, short, attempt="a1")
    assert _data_files(out) == set()
    assert location.committed_units() == {}


def test_small_batches_are_gathered_into_few_row_groups(tmp_path):
    write_parquet(LOCAL, f"{tmp_path}/lake/part-0.parquet", numbered_rows(0, 5000))
    fs, shards = list_shards(f"{tmp_path}/lake")
    [unit] = plan_units(inspect_shards(fs, shards)[0], rows_per_unit=10_000)
    location = OutputLocation(str(tmp_path / "out"))
    location.prepare(SETTINGS, units=[unit])
    small = (piece for batch in _summarized(fs, unit) for piece in _split(batch, 32))  # as the stages emit them
    location.write_unit(unit, OUT_SCHEMA, small, attempt="a1")
    assert pq.ParquetFile(tmp_path / "out" / "part-0.parquet").metadata.num_row_groups == 1


def _split(batch: pa.RecordBatch, rows: int):
    return [batch.slice(start, rows) for start in range(0, batch.num_rows, rows)]


def test_zero_row_unit_writes_an_empty_file_with_the_schema(lake):
    fs, units, out = lake
    location = OutputLocation(str(out))
    location.prepare(SETTINGS, units=units)
    [empty] = [u for u in units if u.num_rows == 0]
    assert location.write_unit(empty, OUT_SCHEMA, _summarized(fs, empty), attempt="a1") == 0
    table = pq.read_table(out / "date=2026-11-02" / "empty.parquet")
    assert (table.num_rows, table.schema) == (0, OUT_SCHEMA)


# ---------------------------------------------------------------------------------------------------------------
# failures, finish, _SUCCESS


def test_failure_record_is_cleared_by_a_later_success(lake):
    fs, units, out = lake
    location = OutputLocation(str(out))
    location.prepare(SETTINGS, units=units)
    location.record_failure(units[2], "ShardReadError: date=2026-11-01/part-0.parquet: bad page")

    record = location.failed_units()[units[2].id]
    assert (record["relative"], record["start"], record["stop"]) == ("date=2026-11-01/part-0.parquet", 2, 3)
    assert record["reason"].endswith("bad page")

    _commit(location, fs, [units[2]])
    assert location.failed_units() == {}


def test_success_is_written_only_when_every_unit_committed(lake):
    fs, units, out = lake
    location = OutputLocation(str(out))
    location.prepare(SETTINGS, units=units)
    _commit(location, fs, units[:-1])
    assert not location.finish({"committed": len(units) - 1})
    assert not (out / "_SUCCESS").exists()
    assert json.loads((out / "_lakesum" / "report.json").read_text()) == {"committed": len(units) - 1, "success": False}

    location.prepare(SETTINGS, units=units)
    _commit(location, fs, units[-1:])
    assert location.finish({"committed": 1})
    assert (out / "_SUCCESS").read_bytes() == b""
    assert json.loads((out / "_lakesum" / "report.json").read_text())["success"] is True


def test_a_stale_success_goes_when_the_plan_grows(lake):
    fs, units, out = lake
    location = OutputLocation(str(out))
    location.prepare(SETTINGS, units=units[:2])
    _commit(location, fs, units[:2])
    assert location.finish({})

    location.prepare(SETTINGS, units=units)
    assert not (out / "_SUCCESS").exists()
    assert not location.finish({})


def test_an_unreadable_shard_keeps_success_away(lake):
    fs, units, out = lake
    location = OutputLocation(str(out))
    location.prepare(SETTINGS, units=units)
    _commit(location, fs, units)
    location.record_failure(units[0].shard, "ShardReadError: corrupt footer")  # a shard that never had units

    assert not location.finish({})
    assert not (out / "_SUCCESS").exists()
    [record] = location.failed_units().values()
    assert record["relative"] == units[0].shard.relative


def test_dataset_reader_sees_exactly_the_data_rows_with_hive_partitions(lake):
    fs, units, out = lake
    location = OutputLocation(str(out))
    location.prepare(SETTINGS, units=units)
    _commit(location, fs, units)
    location.record_failure(units[0], "kept to prove _lakesum/ is skipped")
    (out / "_lakesum" / "staging" / "junk.parquet").write_bytes(b"junk")
    location.finish({})

    table = ds.dataset(str(out), format="parquet", partitioning="hive").to_table()
    assert sorted(table.column("id").to_pylist()) == list(range(30))
    days = dict(zip(table.column("id").to_pylist(), table.column("date").to_pylist()))
    assert {days[i] for i in range(12)} == {"2026-11-01"}
    assert {days[i] for i in range(12, 30)} == {"2026-11-02"}


def test_the_report_carries_no_credentials(lake):
    """The report repeats the settings, model URI included (a presigned or token-bearing URL, say)."""
    fs, units, out = lake
    location = OutputLocation(str(out))
    location.prepare(SETTINGS, units=units)
    location.write_report({"settings": {**SETTINGS, "model": f"file:///models/mt5?token={SECRET}"}, "failures": []})
    report = (out / "_lakesum" / "report.json").read_text()
    assert SECRET not in report
    assert "file:///models/mt5?***" in report


def test_settings_in_the_manifest_carry_no_credentials(lake):
    fs, units, out = lake
    OutputLocation(str(out)).prepare({**SETTINGS, "input": [f"s3://admin:{SECRET}@bucket/lake"]}, units=units)
    manifest = (out / "_lakesum" / "manifest.json").read_text()
    assert SECRET not in manifest
    assert "s3://***@bucket/lake" in manifest


def test_attempt_names_must_be_file_name_safe(lake):
    fs, units, out = lake
    with pytest.raises(ValueError, match="attempt"):
        OutputLocation(str(out)).write_unit(units[0], OUT_SCHEMA, iter(()), attempt="../x")


# ---------------------------------------------------------------------------------------------------------------
# memory:// and s3://


def test_memory_output_end_to_end(tmp_path, memory_root):
    fs, units = _plan(LOCAL, f"{tmp_path}/lake")
    location = OutputLocation(f"memory://{memory_root}/out")
    location.prepare(SETTINGS, units=units)
    _commit(location, fs, units)
    assert location.finish({})

    memory = fsspec.filesystem("memory")
    table = ds.dataset(f"{memory_root}/out", format="parquet", filesystem=memory, partitioning="hive").to_table()
    assert sorted(table.column("id").to_pylist()) == list(range(30))
    assert memory.exists(f"{memory_root}/out/_SUCCESS")


def test_s3_input_and_output_end_to_end_with_resume_and_overwrite(s3):
    s3fs_, bucket, options = s3
    fs, units = _plan(s3fs_, f"{bucket}/lake", protocol="s3://", storage_options=options)
    url = f"s3://{bucket}/out"

    location = OutputLocation(url, options)
    location.prepare(SETTINGS, units=units)
    _commit(location, fs, units[:3])
    assert not location.finish({})

    # a fresh process resumes: what is committed is skipped
    resumed = OutputLocation(url, options)
    resumed.prepare(SETTINGS, units=units)
    todo = [u for u in units if u.id not in resumed.committed_units()]
    assert todo == units[3:]
    _commit(resumed, fs, todo, attempt="a2")
    assert resumed.finish({})

    table = ds.dataset(f"{bucket}/out", format="parquet", filesystem=s3fs_, partitioning="hive").to_table()
    assert sorted(table.column("id").to_pylist()) == list(range(30))
    s3fs_.invalidate_cache()
    assert not s3fs_.find(f"{bucket}/out/_lakesum/staging")
    assert SECRET not in s3fs_.cat_file(f"{bucket}/out/_lakesum/manifest.json").decode()

    with pytest.raises(OutputError, match="num_beams: 4 -> 1") as error:
        resumed.prepare({**SETTINGS, "num_beams": 1}, units=units)
    assert SECRET not in str(error.value)

    s3fs_.pipe(f"{bucket}/out/README.txt", b"not ours")
    resumed.prepare({**SETTINGS, "num_beams": 1}, units=units, overwrite=True)
    s3fs_.invalidate_cache()
    assert sorted(p[len(bucket) + 5 :] for p in s3fs_.find(f"{bucket}/out")) == ["README.txt", "_lakesum/manifest.json"]


class FlakyMemoryFileSystem(MemoryFileSystem):
    """memory://, where the first write and the first read of each path fail as a dropped connection does."""

    protocol = ("flakymemory",)
    failed: set[tuple[str, str]] = set()

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).replace("flakymemory://", "memory://", 1))

    def _fail_once(self, op: str, path: str) -> None:
        if (op, path) not in self.failed:
            self.failed.add((op, path))
            raise ConnectionResetError(f"{op} {path}: connection reset by peer (injected)")

    def pipe_file(self, path, value, *args, **kwargs):
        self._fail_once("write", self._strip_protocol(path))
        return super().pipe_file(path, value, *args, **kwargs)

    def cat_file(self, path, *args, **kwargs):
        self._fail_once("read", self._strip_protocol(path))
        return super().cat_file(path, *args, **kwargs)

    def rm(self, path, *args, **kwargs):
        """A delete of several files drops its connection once, after the first file is gone."""
        if isinstance(path, list) and len(path) > 1 and ("rm", "several") not in self.failed:
            self.failed.add(("rm", "several"))
            super().rm(path[0])
            raise ConnectionResetError("rm: connection reset by peer (injected)")
        return super().rm(path, *args, **kwargs)


def test_the_runs_own_files_are_written_and_read_through_transient_storage_errors(tmp_path, memory_root):
    """Manifest, markers, failure records, report and _SUCCESS each meet a dropped connection first: the run
    retries them (an unattended nightly run must not fail on one throttled request) and says how often."""
    fsspec.register_implementation("flakymemory", FlakyMemoryFileSystem, clobber=True)
    FlakyMemoryFileSystem.failed = set()
    fs, units = _plan(LOCAL, f"{tmp_path}/lake")
    location = OutputLocation(f"flakymemory://{memory_root}/out")
    location.backoff = Backoff(first=0.0)  # no waiting in a test

    location.prepare(SETTINGS, units=units)
    _commit(location, fs, units)
    location.record_failure(units[0], "a failure recorded through a dropped connection")
    assert not location.finish({})
    assert units[0].id in location.failed_units()

    resumed = OutputLocation(f"flakymemory://{memory_root}/out")
    resumed.backoff = Backoff(first=0.0)
    resumed.prepare(SETTINGS, units=units)  # clears the failure: every unit is committed
    assert set(resumed.committed_units()) == {u.id for u in units}
    assert resumed.finish({})
    written = {path for op, path in FlakyMemoryFileSystem.failed if op == "write"}
    for name in ("_lakesum/manifest.json", "_lakesum/committed.json", "_lakesum/report.json", "_SUCCESS"):
        assert f"{memory_root}/out/{name}" in written, name
    assert location.storage_retries >= len(units) + 4 and resumed.storage_retries > 0
    table = ds.dataset(f"{memory_root}/out", format="parquet", filesystem=fsspec.filesystem("memory")).to_table()
    assert sorted(table.column("id").to_pylist()) == list(range(30))


def test_a_delete_retried_after_a_dropped_connection_removes_what_is_left(tmp_path, memory_root):
    """Replacing an output deletes its files in one call; a connection dropped part-way is retried, and the files
    the first try removed are not an error (fs.rm raises FileNotFoundError for them)."""
    fsspec.register_implementation("flakymemory", FlakyMemoryFileSystem, clobber=True)
    fs, units = _plan(LOCAL, f"{tmp_path}/lake")
    location = OutputLocation(f"memory://{memory_root}/out")
    location.prepare(SETTINGS, units=units)
    _commit(location, fs, units)
    assert location.finish({})

    FlakyMemoryFileSystem.failed = set()
    replaced = OutputLocation(f"flakymemory://{memory_root}/out")
    replaced.backoff = Backoff(first=0.0)
    replaced.prepare({**SETTINGS, "num_beams": 1}, units=units, overwrite=True)
    assert ("rm", "several") in FlakyMemoryFileSystem.failed and replaced.storage_retries > 0
    left = fsspec.filesystem("memory").find(f"{memory_root}/out")
    assert [p for p in left if p.endswith(".parquet")] == []
