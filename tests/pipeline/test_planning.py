"""Planning small files from the listing: no footer read up front, and a unit published only with exactly its
footer's rows, from the file the plan listed."""

from __future__ import annotations

import io
import json
import os

import fsspec
import pyarrow as pa
import pytest

from pipeline import driver, listing
from pipeline.commit import OutputLocation
from pipeline.errors import InputError
from pipeline.footers import ShardReadError, inspect_shard
from pipeline.settings import SummarizeSettings
from pipeline.units import LISTED_ROW_BYTES, ensure_unchanged, resolve_unit
from tests.pipeline.helpers import numbered_rows, write_parquet

LOCAL = fsspec.filesystem("file", auto_mkdir=True)
ROWS_PER_UNIT = 100  # small files (a few rows, about 1 KiB) are under 100 × LISTED_ROW_BYTES; the big one is not
SMALL = ["date=1/a.parquet", "date=1/b.parquet", "date=1/c.parquet", "date=2/a.parquet", "date=2/b.parquet"]
BIG = "date=2/big.parquet"
OUT_SCHEMA = pa.schema([("id", pa.int64()), ("lang", pa.string()), ("summary", pa.string()), ("error", pa.string())])


@pytest.fixture
def settled(monkeypatch):
    """Stats trusted at once: files just written are otherwise within the clock tick and have their footers read."""
    monkeypatch.setattr(listing, "STAT_SETTLE_NS", 0)


def _lake(root) -> None:
    for i, relative in enumerate(SMALL):
        write_parquet(LOCAL, f"{root}/{relative}", numbered_rows(10 * i, 3 + i))
    write_parquet(LOCAL, f"{root}/{BIG}", numbered_rows(1000, 300), row_group_size=50)
    assert os.path.getsize(f"{root}/{BIG}") > ROWS_PER_UNIT * LISTED_ROW_BYTES
    assert max(os.path.getsize(f"{root}/{r}") for r in SMALL) <= ROWS_PER_UNIT * LISTED_ROW_BYTES


def _plan(root, checkpoint, location=None, monkeypatch=None) -> tuple[driver.Plan, list[str]]:
    """driver.plan over the lake, and the files whose footers it read."""
    read = []
    if monkeypatch is not None:
        real = driver.inspect_shards
        monkeypatch.setattr(driver, "inspect_shards", lambda fs, shards: read.extend(shards) or real(fs, shards))
    settings = SummarizeSettings(model=str(checkpoint), rows_per_unit=ROWS_PER_UNIT, quantization="none")
    return driver.plan(settings, str(root), None, None, location), [s.relative for s in read]


def _prepared(tmp_path, checkpoint) -> tuple[driver.Plan, OutputLocation]:
    """The lake, planned, and its output prepared as a run prepares it."""
    _lake(tmp_path / "lake")
    work, _ = _plan(tmp_path / "lake", checkpoint)
    location = OutputLocation(str(tmp_path / "out"))
    location.prepare(work.manifest, units=work.units, **work.selection)
    return work, location


def _batches(fs, unit, schema, drop: int = 0):
    """What a replica's stages hand write_unit: the unit's rows with a summary, `drop` of them lost."""
    from pipeline.units import read_unit

    table = pa.Table.from_batches(list(read_unit(fs, unit, ["id", "lang"])))
    table = table.slice(0, table.num_rows - drop)
    nulls = pa.nulls(table.num_rows, pa.string())
    yield from pa.table([*table.columns, nulls, nulls], schema=schema).to_batches()


def _unit(work: driver.Plan, relative: str):
    return next(u for u in work.units if u.shard.relative == relative)


def test_small_files_are_planned_from_the_listing_with_one_footer_read_a_folder(
    tmp_path, tiny_checkpoint, settled, monkeypatch
):
    _lake(tmp_path / "lake")
    work, read = _plan(tmp_path / "lake", tiny_checkpoint, monkeypatch=monkeypatch)
    # the big file is split by its row groups as before; of the small ones, only each folder's first is read
    assert sorted(read) == ["date=1/a.parquet", "date=2/a.parquet", BIG]
    assert [(u.start, u.stop, u.num_rows) for u in work.units if u.shard.relative == BIG] == [
        (0, 2, 100),
        (2, 4, 100),
        (4, 6, 100),
    ]
    listed = [u for u in work.units if u.num_rows is None]
    assert sorted(u.shard.relative for u in listed) == ["date=1/b.parquet", "date=1/c.parquet", "date=2/b.parquet"]
    assert all(u.whole_file and u.stop is None and u.shard.path not in work.schemas for u in listed)
    again, _ = _plan(tmp_path / "lake", tiny_checkpoint)
    assert [u.id for u in again.units] == [u.id for u in work.units]  # deterministic


def test_a_listed_unit_is_published_only_with_exactly_its_footers_rows(tmp_path, tiny_checkpoint, settled):
    work, location = _prepared(tmp_path, tiny_checkpoint)
    planned = _unit(work, "date=1/c.parquet")
    with pytest.raises(ValueError, match="row count is unknown"):  # never published unresolved
        location.write_unit(planned, OUT_SCHEMA, _batches(work.fs, planned, OUT_SCHEMA), attempt="a0")

    unit, schema = resolve_unit(work.fs, planned, None, "text", "id")
    assert (unit.id, unit.stop, unit.num_rows) == (planned.id, 1, 5) and schema.names == ["id", "text", "lang"]
    with pytest.raises(RuntimeError, match="4 output rows .* which hold 5; not committed"):
        location.write_unit(unit, OUT_SCHEMA, _batches(work.fs, unit, OUT_SCHEMA, drop=1), attempt="a1")
    assert not (tmp_path / "out" / unit.output_relative).exists() and unit.id not in location.committed_ids()

    unchanged = lambda: ensure_unchanged(work.fs, unit)  # noqa: E731
    assert (
        location.write_unit(unit, OUT_SCHEMA, _batches(work.fs, unit, OUT_SCHEMA), attempt="a2", unchanged=unchanged)
        == 5
    )
    marker = json.loads((tmp_path / "out" / "_lakesum" / "committed" / f"{unit.id}.json").read_text())
    assert (marker["num_rows"], marker["stop"], marker["input_identity"]) == (5, 1, planned.identity)
    assert marker["input_identity"].startswith(f"{planned.shard.size}:stat:")


def _rewrite(path, table, keep_size_and_mtime: bool = False) -> None:
    before = os.stat(path)
    write_parquet(LOCAL, str(path), table)
    if keep_size_and_mtime:
        assert os.path.getsize(path) == before.st_size
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_file_changed_between_plan_and_run_is_never_published(tmp_path, tiny_checkpoint, settled):
    work, location = _prepared(tmp_path, tiny_checkpoint)

    # rewritten before its replica starts: other rows; then with the same size and modification time
    before_run = _unit(work, "date=1/b.parquet")
    _rewrite(tmp_path / "lake" / before_run.shard.relative, numbered_rows(500, 9))
    with pytest.raises(ShardReadError, match="date=1/b.parquet: changed since the run planned it"):
        resolve_unit(work.fs, before_run, None, "text", "id")
    same_size = _unit(work, "date=2/b.parquet")
    _rewrite(tmp_path / "lake" / same_size.shard.relative, numbered_rows(50, 7), keep_size_and_mtime=True)
    with pytest.raises(ShardReadError, match="changed since the run planned it"):
        resolve_unit(work.fs, same_size, None, "text", "id")

    # rewritten while the unit is summarized: its rows were read, the check before publishing refuses them
    during = _unit(work, "date=1/c.parquet")
    unit, _ = resolve_unit(work.fs, during, None, "text", "id")

    def rewritten_meanwhile():
        yield from _batches(work.fs, unit, OUT_SCHEMA)
        _rewrite(tmp_path / "lake" / unit.shard.relative, numbered_rows(20, 5))  # the same row count

    with pytest.raises(ShardReadError, match="changed since the run planned it"):
        location.write_unit(
            unit, OUT_SCHEMA, rewritten_meanwhile(), attempt="a1", unchanged=lambda: ensure_unchanged(work.fs, unit)
        )
    deleted = _unit(work, "date=1/a.parquet")  # inspected at planning: checked by its stat all the same
    os.remove(tmp_path / "lake" / deleted.shard.relative)
    with pytest.raises(ShardReadError, match="deleted since the run planned it"):
        ensure_unchanged(work.fs, deleted)
    assert not any((tmp_path / "out").glob("date=*/*.parquet")) and not location.committed_ids()


def test_a_column_missing_from_a_folder_fails_fast_and_from_a_later_file_fails_its_unit(
    tmp_path, tiny_checkpoint, settled
):
    _lake(tmp_path / "lake")
    no_text = numbered_rows(0, 3).drop(["text"])
    write_parquet(LOCAL, str(tmp_path / "lake" / "date=1" / "d.parquet"), no_text)
    work, _ = _plan(tmp_path / "lake", tiny_checkpoint)
    with pytest.raises(InputError, match=r"date=1/d.parquet: column 'text' is missing .* pass --text-column"):
        resolve_unit(work.fs, _unit(work, "date=1/d.parquet"), None, "text", "id")

    write_parquet(LOCAL, str(tmp_path / "lake" / "date=0" / "a.parquet"), no_text)  # a folder's first file
    with pytest.raises(InputError, match=r"date=0/a.parquet: column 'text' is missing"):
        _plan(tmp_path / "lake", tiny_checkpoint)


def test_a_rerun_knows_committed_listed_units_without_footers_and_redoes_a_rewritten_one(
    tmp_path, tiny_checkpoint, settled, monkeypatch
):
    _lake(tmp_path / "lake")
    location = OutputLocation(str(tmp_path / "out"))
    work, _ = _plan(tmp_path / "lake", tiny_checkpoint, location)
    location.prepare(work.manifest, units=work.units, **work.selection)
    for planned in work.units:
        unit, _ = resolve_unit(work.fs, planned, work.schemas.get(planned.shard.path), "text", "id")
        location.write_unit(unit, OUT_SCHEMA, _batches(work.fs, unit, OUT_SCHEMA), attempt="a1")
    assert location.finish({})

    again, read = _plan(tmp_path / "lake", tiny_checkpoint, location, monkeypatch)
    assert read == [] and {u.id for u in again.units} == {u.id for u in work.units}
    rows = {u.shard.relative: u.num_rows for u in again.units}  # learned from the markers
    assert [rows[r] for r in SMALL] == [3, 4, 5, 6, 7]
    printed = io.StringIO()
    driver._print_plan(location.reconcile(again.manifest, units=again.units, **again.selection), again, printed)
    assert json.loads(printed.getvalue().splitlines()[-1])["skip"] == {"units": 8, "rows": 325}

    _rewrite(tmp_path / "lake" / "date=1/b.parquet", numbered_rows(700, 2))
    _rewrite(tmp_path / "lake" / "date=1/c.parquet", numbered_rows(800, 3))
    third, read = _plan(tmp_path / "lake", tiny_checkpoint, location, monkeypatch)
    assert read == [
        "date=1/b.parquet"
    ]  # the first changed file of its folder, for its columns; c is planned from its listing
    changes = location.reconcile(third.manifest, units=third.units, **third.selection)
    assert [u.relative for u in changes.redo] == ["date=1/b.parquet", "date=1/c.parquet"] and len(changes.skip) == 6
    printed = io.StringIO()
    driver._print_plan(changes, third, printed)
    plan = json.loads(printed.getvalue().splitlines()[-1])
    assert plan["redo"] == {"units": 2, "rows": None, "rows_known": 2, "units_rows_unknown": 1}
    assert "(+ those of 1 small files, read when run)" in printed.getvalue()


def test_progress_counts_the_rows_of_listed_units_as_they_commit(tmp_path, tiny_checkpoint, settled):
    _lake(tmp_path / "lake")
    work, _ = _plan(tmp_path / "lake", tiny_checkpoint)
    lines = io.StringIO()
    progress = driver.Progress(work.units, 0.0, driver.EventLog(lines, json_lines=True))
    report = driver.RunReport()
    progress.maybe_print(report, force=True)
    for planned in work.units:
        progress.learned(planned, resolve_unit(work.fs, planned, None, "text", "id")[0].num_rows)
    progress.maybe_print(report, force=True)
    first, last = (json.loads(line) for line in lines.getvalue().splitlines())
    assert (first["total_documents"], first["units_rows_unknown"]) == (300 + 3 + 6, 3)
    assert (last["total_documents"], last["units_rows_unknown"]) == (300 + 3 + 4 + 5 + 6 + 7, 0)


def test_a_listed_unit_is_read_whole_after_resolving_not_before(tmp_path, tiny_checkpoint, settled):
    from pipeline.units import read_unit

    _lake(tmp_path / "lake")
    work, _ = _plan(tmp_path / "lake", tiny_checkpoint)
    planned = _unit(work, "date=2/b.parquet")
    with pytest.raises(ValueError, match="resolve_unit"):
        next(read_unit(work.fs, planned))
    unit, _ = resolve_unit(work.fs, planned, None, "text", "id")
    ids = pa.Table.from_batches(list(read_unit(work.fs, unit, ["id"]))).column("id").to_pylist()
    assert ids == list(range(40, 47)) and unit.num_rows == inspect_shard(work.fs, unit.shard).num_rows == 7


@pytest.mark.slow
def test_a_run_summarizes_listed_units_once_each_and_a_corrupt_small_file_fails_alone(
    ray_per_test, tiny_checkpoint, tmp_path, settled
):
    """Through the driver and real replicas: the small files planned from their listing are read, checked and
    published by their replicas with exactly their footers' rows; a corrupt one fails as its unit, named."""
    from synthetic.corpus import documents, write_shards
    from tests.pipeline.helpers import FAST, assert_every_row_once, read_output

    docs = documents(60, seed=31, max_sentences=2)
    corpus = tmp_path / "corpus"
    write_shards(corpus, docs, files=6, row_group_size=4)
    corrupt = "lang_group=a/part-009.parquet"
    (corpus / corrupt).write_bytes(b"this is not parquet" * 50)
    out = tmp_path / "out"
    settings = SummarizeSettings(model=str(tiny_checkpoint), **dict(FAST, rows_per_unit=20_000))
    printed = io.StringIO()

    work = driver.plan(settings, str(corpus), None)
    assert sum(u.num_rows is None for u in work.units) == 5  # of 7 files, each folder's first is read
    report = driver.run(settings, str(corpus), str(out), replicas=1, out=printed, json_logs=True)

    assert set(report.failed) == {corrupt} and "not a Parquet file" in report.failed[corrupt]
    assert report.committed == 6 and report.stats.rows == len(docs)
    assert_every_row_once(read_output(out), docs)
    compacted = json.loads((out / "_lakesum" / "committed.json").read_text())["units"]  # the markers, at the end
    assert sorted(compacted["num_rows"]) == [10] * 6
    progress = [json.loads(line) for line in printed.getvalue().splitlines() if '"progress"' in line][-1]
    assert (progress["total_documents"], progress["units_rows_unknown"]) == (len(docs), 1)  # the corrupt one


def test_only_small_parquet_files_whose_listing_identifies_them_are_planned_from_it(tmp_path, memory_root, settled):
    from pipeline.listing import list_shards
    from pipeline.units import planned_from_listing
    from tests.pipeline.helpers import write_arrow

    write_parquet(LOCAL, f"{tmp_path}/a.parquet", numbered_rows(0, 3))
    write_arrow(LOCAL, f"{tmp_path}/b.arrow", numbered_rows(0, 3), batch_rows=3)
    _, (parquet, arrow) = list_shards(str(tmp_path))
    assert planned_from_listing(parquet, parquet.size // LISTED_ROW_BYTES + 1)
    assert not planned_from_listing(parquet, parquet.size // LISTED_ROW_BYTES - 1)  # big enough to be split
    assert not planned_from_listing(arrow, 20_000)  # an Arrow file's identity needs its batch headers
    memory = fsspec.filesystem("memory")
    write_parquet(memory, f"{memory_root}/a.parquet", numbered_rows(0, 3))
    _, [unversioned] = list_shards(f"memory://{memory_root}")
    assert not planned_from_listing(unversioned, 20_000)  # no version, no stat: its footer gives its identity


def test_a_shard_read_error_raised_in_a_replica_reaches_the_driver_whole():
    """Ray pickles a replica's exception to the driver: one it cannot rebuild arrives as a replica death, and the
    unit is retried as if it had killed its replica, instead of failing at once, named."""
    import pickle

    error = ShardReadError(listing.Shard("/lake/a.parquet", "a.parquet", "parquet", 9), "changed since planned")
    back = pickle.loads(pickle.dumps(error))
    assert (type(back), back.shard, back.reason, str(back)) == (ShardReadError, error.shard, error.reason, str(error))


def test_an_object_rewritten_on_s3_after_its_listing_is_never_published(s3):
    """On object stores the listing's ETag is the identity: a replica's checks ask the store for it again."""
    from pipeline.listing import list_shards
    from pipeline.units import listed_unit, planned_from_listing

    fs, bucket, options = s3
    write_parquet(fs, f"{bucket}/lake/date=1/a.parquet", numbered_rows(0, 4))
    input_fs, [shard] = list_shards(f"s3://{bucket}/lake", storage_options=options)
    assert shard.version is not None and planned_from_listing(shard, 20_000)
    unit, _ = resolve_unit(input_fs, listed_unit(shard), None, "text", "id")
    assert (unit.num_rows, unit.identity) == (4, f"{shard.size}:{shard.version}")
    ensure_unchanged(input_fs, unit)  # the same object: no error
    write_parquet(fs, f"{bucket}/lake/date=1/a.parquet", numbered_rows(100, 4))  # other rows: a new ETag
    with pytest.raises(ShardReadError, match="changed since the run planned it"):
        ensure_unchanged(input_fs, unit)
