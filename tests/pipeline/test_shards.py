"""Inputs -> shards -> work units -> output names, against real Parquet and Arrow files (local, memory://, s3://)."""

from __future__ import annotations

import os

import fsspec
import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileSystem

from model.storage import open_filesystem
from pipeline.errors import InputError
from pipeline.footers import ShardInfo, ShardReadError, check_columns, inspect_shard, inspect_shards
from pipeline.listing import Shard, list_shards
from pipeline.units import WorkUnit, known_units, plan_units, read_unit
from tests.pipeline.helpers import SECRET, numbered_rows, write_arrow, write_feather, write_parquet

LOCAL = fsspec.filesystem("file", auto_mkdir=True)  # for writing test lakes


def _lake(root, fs=LOCAL) -> None:
    """A Hive-partitioned lake with the files Spark and friends leave around."""
    write_parquet(fs, f"{root}/date=2026-11-01/part-0.parquet", numbered_rows(0, 10), row_group_size=4)
    write_parquet(fs, f"{root}/date=2026-11-01/part-1.parquet", numbered_rows(10, 5))
    write_parquet(fs, f"{root}/date=2026-11-02/part-0.parquet", numbered_rows(15, 7), row_group_size=3)
    write_arrow(fs, f"{root}/date=2026-11-02/part-1.arrow", numbered_rows(22, 6), batch_rows=2)
    write_parquet(fs, f"{root}/date=2026-12-01/part-0.parquet", numbered_rows(28, 2))
    fs.pipe(f"{root}/_SUCCESS", b"")
    fs.pipe(f"{root}/date=2026-11-01/.part-0.parquet.crc", b"crc")
    fs.pipe(f"{root}/date=2026-11-01/_part-9.parquet", b"not committed")
    write_parquet(fs, f"{root}/_temporary/0/part-0.parquet", numbered_rows(100, 1))
    write_parquet(fs, f"{root}/.hidden/part-0.parquet", numbered_rows(200, 1))
    fs.pipe(f"{root}/date=2026-11-01/notes.txt", b"not a shard")


LAKE_FILES = [
    "date=2026-11-01/part-0.parquet",
    "date=2026-11-01/part-1.parquet",
    "date=2026-11-02/part-0.parquet",
    "date=2026-11-02/part-1.arrow",
    "date=2026-12-01/part-0.parquet",
]


def _all_rows(fs, units: list[WorkUnit], column: str = "id") -> list:
    return [value for unit in units for batch in read_unit(fs, unit) for value in batch.column(column).to_pylist()]


# ---------------------------------------------------------------------------------------------------------------
# list_shards


def test_directory_input_is_walked_sorted_and_skips_underscore_and_dot_names(tmp_path):
    _lake(tmp_path / "lake")
    fs, shards = list_shards(str(tmp_path / "lake"))

    assert [s.relative for s in shards] == LAKE_FILES
    assert [s.path for s in shards] == [f"{tmp_path}/lake/{r}" for r in LAKE_FILES]
    assert [s.format for s in shards] == ["parquet"] * 3 + ["arrow", "parquet"]
    assert all(s.size == (tmp_path / "lake" / s.relative).stat().st_size for s in shards)


def test_trailing_slash_and_file_uri_give_the_same_shards(tmp_path):
    _lake(tmp_path / "lake")
    _, plain = list_shards(str(tmp_path / "lake"))
    _, slashed = list_shards(f"{tmp_path}/lake/")
    _, uri = list_shards((tmp_path / "lake").as_uri())
    assert plain == slashed == uri


def test_glob_is_relative_to_its_directory_prefix_and_double_star_may_prefix_a_name(tmp_path):
    _lake(tmp_path / "lake")
    _, shards = list_shards(f"{tmp_path}/lake/date=2026-11-*/**.parquet")
    assert [s.relative for s in shards] == [
        "date=2026-11-01/part-0.parquet",
        "date=2026-11-01/part-1.parquet",
        "date=2026-11-02/part-0.parquet",
    ]


def test_glob_matching_partition_folders_takes_every_shard_below_them(tmp_path):
    _lake(tmp_path / "lake")
    _, shards = list_shards(f"{tmp_path}/lake/date=2026-11-0[2]")
    assert [s.relative for s in shards] == ["date=2026-11-02/part-0.parquet", "date=2026-11-02/part-1.arrow"]


def test_list_of_files_is_relative_to_their_common_parent(tmp_path):
    _lake(tmp_path / "lake")
    _, shards = list_shards(
        [f"{tmp_path}/lake/date=2026-12-01/part-0.parquet", f"{tmp_path}/lake/date=2026-11-01/part-1.parquet"]
    )
    assert [s.relative for s in shards] == ["date=2026-11-01/part-1.parquet", "date=2026-12-01/part-0.parquet"]


def test_single_file_is_relative_to_its_folder(tmp_path):
    _lake(tmp_path / "lake")
    _, shards = list_shards(f"{tmp_path}/lake/date=2026-12-01/part-0.parquet")
    assert [s.relative for s in shards] == ["part-0.parquet"]


def test_list_of_partition_folders_keeps_the_partitions_in_relative_paths(tmp_path):
    _lake(tmp_path / "lake")
    _, shards = list_shards(
        [
            f"{tmp_path}/lake/date=2026-12-01",
            f"{tmp_path}/lake/date=2026-11-02",
            f"{tmp_path}/lake/date=2026-11-02/part-0.parquet",
        ]
    )  # named twice: listed once
    assert [s.relative for s in shards] == [
        "date=2026-11-02/part-0.parquet",
        "date=2026-11-02/part-1.arrow",
        "date=2026-12-01/part-0.parquet",
    ]


def test_no_shards_is_an_input_error_naming_the_input(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_SUCCESS").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty: no \.parquet, \.arrow, \.feather or \.ipc files found"):
        list_shards(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="no such file or directory") as error:
        list_shards(str(tmp_path / "missing"))
    assert str(tmp_path / "missing") in str(error.value)
    with pytest.raises(InputError, match="nothing-.*: no .parquet"):
        list_shards(f"{tmp_path}/nothing-*.parquet")


def test_explicit_file_of_another_format_is_refused_not_skipped(tmp_path):
    (tmp_path / "docs.csv").write_text("id,text\n1,a\n")
    with pytest.raises(InputError, match=r"docs\.csv: not a shard"):
        list_shards(str(tmp_path / "docs.csv"))


def test_inputs_on_two_filesystems_are_refused(tmp_path, memory_root):
    _lake(tmp_path / "lake")
    with pytest.raises(InputError, match="inputs must be on one filesystem"):
        list_shards([str(tmp_path / "lake"), f"memory://{memory_root}"])


def test_unknown_protocol_is_an_input_error_without_the_credentials():
    with pytest.raises(InputError, match="cannot open") as error:
        list_shards(f"nosuchfs://user:{SECRET}@host/lake")
    assert SECRET not in str(error.value)


def test_open_filesystem_takes_the_first_of_a_list(tmp_path):
    fs, root = open_filesystem([str(tmp_path), "/elsewhere"], None, error=InputError)
    assert root == str(tmp_path)
    assert isinstance(fs, type(LOCAL))


# ---------------------------------------------------------------------------------------------------------------
# inspect_shard


def test_parquet_footer_gives_rows_per_row_group_and_the_schema(tmp_path):
    _lake(tmp_path / "lake")
    fs, shards = list_shards(str(tmp_path / "lake"))
    info = inspect_shard(fs, shards[0])
    assert info.group_rows == (4, 4, 2)
    assert info.num_rows == 10
    assert info.schema.names == ["id", "text", "lang"]


@pytest.mark.parametrize("kind", ["arrow", "feather", "ipc-compressed"])
def test_arrow_ipc_files_give_rows_per_record_batch(tmp_path, kind):
    table = numbered_rows(0, 11)
    path = f"{tmp_path}/shard.{'feather' if kind == 'feather' else kind.split('-')[0]}"
    if kind == "feather":
        write_feather(LOCAL, path, table, chunk_rows=4)
    else:
        write_arrow(LOCAL, path, table, batch_rows=4, compression="zstd" if kind == "ipc-compressed" else None)
    fs, [shard] = list_shards(path)

    info = inspect_shard(fs, shard)
    assert shard.format == "arrow"
    assert info.group_rows == (4, 4, 3)
    assert info.schema.names == ["id", "text", "lang"]
    [unit] = plan_units([info], rows_per_unit=100)
    assert _all_rows(fs, [unit]) == list(range(11))


def test_arrow_batch_counts_match_pyarrow_with_dictionaries_and_empty_batches(tmp_path):
    """The row counts come from a hand-read footer and batch headers: check them against pyarrow's own."""
    text = pa.array(["a", "b", "a", "c", "b", "a", "a"]).dictionary_encode()
    table = pa.table({"id": pa.array(range(7), pa.int64()), "text": pa.array(["x"] * 7), "tag": text})
    path = tmp_path / "dict.arrow"
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_batch(table.to_batches()[0].slice(0, 3))
        writer.write_batch(table.to_batches()[0].slice(3, 0))
        writer.write_batch(table.to_batches()[0].slice(3, 4))
    fs, [shard] = list_shards(str(path))

    info = inspect_shard(fs, shard)
    reader = pa.ipc.open_file(str(path))
    assert info.group_rows == tuple(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    assert info.group_rows == (3, 0, 4)


class _CountingFileSystem(LocalFileSystem):
    """A local filesystem that counts the bytes read through it."""

    def __init__(self):
        super().__init__(skip_instance_cache=True)
        self.bytes_read = 0

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        read, readinto = f.read, f.f.readinto

        def counted_read(*args):
            data = read(*args)
            self.bytes_read += len(data)
            return data

        def counted_readinto(buffer):
            count = readinto(buffer)
            self.bytes_read += count or 0
            return count

        f.read, f.readinto = counted_read, counted_readinto
        return f


def test_arrow_row_counts_come_from_the_footer_and_batch_headers_not_the_data(tmp_path):
    """Over an object store, reading whole batches to count rows would read the corpus in the driver."""
    table = pa.table({"id": pa.array(range(100_000), pa.int64()), "text": pa.array(["x" * 100] * 100_000)})
    write_arrow(LOCAL, f"{tmp_path}/big.arrow", table, batch_rows=10_000)
    _, [shard] = list_shards(f"{tmp_path}/big.arrow")
    fs = _CountingFileSystem()

    info = inspect_shard(fs, shard)
    assert info.group_rows == (10_000,) * 10
    assert shard.size > 10_000_000
    assert fs.bytes_read < 20_000


def test_arrow_file_without_batches_is_a_zero_row_shard(tmp_path):
    path = tmp_path / "empty.arrow"
    with pa.ipc.new_file(str(path), numbered_rows(0, 0).schema):
        pass
    fs, [shard] = list_shards(str(path))
    info = inspect_shard(fs, shard)
    assert (info.num_rows, info.group_rows) == (0, ())


def test_arrow_stream_format_is_read_as_one_group(tmp_path):
    write_arrow(LOCAL, f"{tmp_path}/stream.ipc", numbered_rows(0, 9), batch_rows=2, stream=True)
    fs, [shard] = list_shards(f"{tmp_path}/stream.ipc")

    info = inspect_shard(fs, shard)
    assert (info.num_rows, info.group_rows) == (9, (9,))
    [unit] = plan_units([info], rows_per_unit=4)  # cannot be split: a stream has no random access
    assert (unit.start, unit.stop, unit.whole_file) == (0, 1, True)
    assert _all_rows(fs, [unit]) == list(range(9))


def _parquet_layouts() -> dict[str, tuple[pa.Table, dict]]:
    """Tables and pq.write_table options: the layouts a footer can take."""
    rows = numbered_rows(0, 30)
    return {
        "row groups": (rows, {"row_group_size": 7}),
        "dictionary text": (rows.set_column(1, "text", rows["text"].dictionary_encode()), {}),
        "large_string": (
            rows.cast(pa.schema([("id", pa.int64()), ("text", pa.large_string()), ("lang", pa.string())])),
            {},
        ),
        "nested and other types": (
            numbered_rows(
                0,
                30,
                tags=pa.array([[f"t{i}"] * (i % 3) for i in range(30)], pa.list_(pa.string())),
                point=pa.array([{"x": i, "y": float(i)} for i in range(30)]),
                at=pa.array(range(30), pa.timestamp("ms", tz="UTC")),
                price=pa.array([i / 4 for i in range(30)]).cast(pa.decimal128(9, 2)),
                flag=pa.array([i % 2 == 0 for i in range(30)]),
                blob=pa.array([b"\xff" * i for i in range(30)], pa.binary()),
            ),
            {"row_group_size": 11},
        ),
        "no Arrow schema stored": (rows, {"store_schema": False, "compression": "none"}),
        "pandas metadata": (pa.Table.from_pandas(rows.to_pandas()), {}),
        "empty": (numbered_rows(0, 0), {}),
        "footer over 64 KiB": (
            pa.table(
                {f"column_{i:04d}_{'x' * 40}": pa.array([i, i + 1], pa.int32()) for i in range(1500)}
            ).append_column("text", pa.array(["a", "b"])),
            {"row_group_size": 1},
        ),
    }


def test_parquet_footers_read_from_the_files_end_equal_pyarrows_on_every_layout(tmp_path, monkeypatch):
    """The fast footer path (one read of the file's end, pyarrow's reader on those bytes, one Arrow conversion per
    distinct schema) against ParquetFile on each layout, in one lake, so that a schema is reused only where it is
    equal."""
    import pyarrow.parquet as pq

    from pipeline import footers

    layouts = _parquet_layouts()
    for i, (table, options) in enumerate(layouts.values()):
        for copy in range(3):  # the first of each schema goes through pyarrow, the others must not
            rows = table.slice(copy, max(0, table.num_rows - 2 * copy))
            with LOCAL.open(f"{tmp_path}/lake/layout={i}/part-{copy}.parquet", "wb") as f:
                pq.write_table(rows, f, **options)
    fs, shards = list_shards(str(tmp_path / "lake"))
    through_pyarrow = []
    real_inspect = footers.inspect_shard
    monkeypatch.setattr(
        footers, "inspect_shard", lambda fs, shard: through_pyarrow.append(shard) or real_inspect(fs, shard)
    )

    infos, errors = inspect_shards(fs, shards)

    assert errors == [] and len(infos) == 3 * len(layouts)
    for info in infos:
        parquet = pq.ParquetFile(info.shard.path)
        assert info.num_rows == parquet.metadata.num_rows, info.shard.relative
        assert info.group_rows == tuple(
            parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)
        ), info.shard.relative
        assert info.schema.equals(parquet.schema_arrow, check_metadata=True), info.shard.relative
        assert info == real_inspect(fs, info.shard)  # the identity too
    # one pyarrow read per distinct schema: the fast path was taken for the others
    assert sorted(s.relative for s in through_pyarrow) == [f"layout={i}/part-0.parquet" for i in range(len(layouts))]


@pytest.mark.parametrize("damage", ["thrift", "row counts", "length", "truncated"])
def test_a_damaged_footer_after_good_ones_gives_pyarrows_error(tmp_path, damage):
    """The fast path has seen the schema; a damaged footer of the same schema must fail as pyarrow fails it."""
    write_parquet(LOCAL, f"{tmp_path}/lake/part-0.parquet", numbered_rows(0, 10), row_group_size=4)
    write_parquet(LOCAL, f"{tmp_path}/lake/part-1.parquet", numbered_rows(10, 10), row_group_size=4)
    victim = tmp_path / "lake" / "part-1.parquet"
    data = bytearray(victim.read_bytes())
    length = int.from_bytes(data[-8:-4], "little")
    footer = len(data) - 8 - length
    if damage == "thrift":
        data[footer + length // 2 : footer + length // 2 + 16] = b"\xff" * 16
    elif damage == "row counts":  # FileMetaData.num_rows, right after the schema (field 3, i64): 10 -> 11
        at = data.index(bytes([0x16, 20]), footer)  # short field header (delta 1, i64), zigzag varint of 10
        data[at + 1] = 22
    elif damage == "length":
        data[-8:-4] = (len(data) - 11).to_bytes(4, "little")
    else:
        data = data[:footer] + data[-8:]
    victim.write_bytes(bytes(data))
    fs, shards = list_shards(str(tmp_path / "lake"))

    infos, errors = inspect_shards(fs, shards)

    assert [i.shard.relative for i in infos] == ["part-0.parquet"]
    [error] = errors
    with pytest.raises(ShardReadError) as pyarrows:
        _inspect_through_pyarrow(fs, error.shard)
    assert error.reason == pyarrows.value.reason and error.reason
    if damage == "row counts":
        assert "its row groups hold 10 rows, its total says 11" in error.reason


def _inspect_through_pyarrow(fs, shard):
    """The pyarrow path alone (ParquetFile), as inspect_shard took it before the fast path."""
    from pipeline import footers

    try:
        return footers._inspect_parquet(fs, shard)
    except footers.READ_ERRORS as e:
        raise ShardReadError(shard, footers.describe(e)) from e


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_parquet_fails_alone_naming_the_file(tmp_path, damage):
    _lake(tmp_path / "lake")
    victim = tmp_path / "lake" / "date=2026-11-02" / "part-0.parquet"
    data = victim.read_bytes()
    victim.write_bytes(
        {"garbage": b"this is not parquet" * 50, "truncated": data[: len(data) // 2], "empty": b""}[damage]
    )
    fs, shards = list_shards(str(tmp_path / "lake"))

    infos, errors = inspect_shards(fs, shards)
    assert [i.shard.relative for i in infos] == [r for r in LAKE_FILES if r != "date=2026-11-02/part-0.parquet"]
    [error] = errors
    assert error.shard.relative == "date=2026-11-02/part-0.parquet"
    assert str(error).startswith("date=2026-11-02/part-0.parquet: ")
    assert error.reason
    with pytest.raises(ShardReadError, match="date=2026-11-02/part-0.parquet"):
        inspect_shard(fs, error.shard)


def test_footers_read_by_worker_processes_equal_those_read_inline(tmp_path):
    _lake(tmp_path / "lake")
    (tmp_path / "lake" / "date=2026-11-02" / "part-0.parquet").write_bytes(b"this is not parquet" * 50)
    fs, shards = list_shards(str(tmp_path / "lake"))
    inline = inspect_shards(fs, shards)
    in_processes = inspect_shards(fs, shards, processes_from=1)
    assert in_processes[0] == inline[0] and len(inline[0]) == len(LAKE_FILES) - 1
    assert [(e.shard, e.reason) for e in in_processes[1]] == [(e.shard, e.reason) for e in inline[1]]


def test_an_unchanged_local_file_is_known_by_its_stat_and_a_rewrite_is_not(tmp_path, monkeypatch):
    from pipeline import commit, footers, listing

    _lake(tmp_path / "lake")
    fs, listed = list_shards(str(tmp_path / "lake"))
    assert all(shard.stat is None for shard in listed)  # just written: within the settle time, not trusted
    monkeypatch.setattr(listing, "STAT_SETTLE_NS", 0)
    fs, listed = list_shards(str(tmp_path / "lake"))
    records = {
        u.shard.relative: [commit._unit_record(u)] for u in plan_units(inspect_shards(fs, listed)[0], 4) if u.start == 0
    }
    reads = []
    real_footer = footers._parquet_footer
    monkeypatch.setattr(footers, "_parquet_footer", lambda *args: reads.append(1) or real_footer(*args))
    shard = next(s for s in listed if s.relative == "date=2026-11-01/part-1.parquet")
    [known] = known_units(fs, shard, records[shard.relative])
    assert known.id == records[shard.relative][0].id and reads == []

    # Rewritten with other text and its modification time put back: the change time and inode tell.
    path = tmp_path / "lake" / shard.relative
    before = path.stat()
    write_parquet(LOCAL, str(path), numbered_rows(20, 5))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    fs, relisted = list_shards(str(tmp_path / "lake"))
    shard = next(s for s in relisted if s.relative == shard.relative)
    assert known_units(fs, shard, records[shard.relative]) is None and reads == [1]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_arrow_fails_naming_the_file(tmp_path, damage):
    path = tmp_path / "part-0.arrow"
    write_arrow(LOCAL, str(path), numbered_rows(0, 50), batch_rows=10)
    data = path.read_bytes()
    path.write_bytes(b"\x00garbage" * 40 if damage == "garbage" else data[: len(data) - 30])
    fs, [shard] = list_shards(str(path))
    with pytest.raises(ShardReadError, match="part-0.arrow: "):
        inspect_shard(fs, shard)


# ---------------------------------------------------------------------------------------------------------------
# check_columns


def _info(schema: pa.Schema, relative: str = "date=1/part-0.parquet") -> ShardInfo:
    return ShardInfo(Shard(f"/lake/{relative}", relative, "parquet", 1), 0, (), schema)


def test_missing_text_column_names_shard_columns_and_flag():
    info = _info(pa.schema([("id", pa.int64()), ("body", pa.string()), ("lang", pa.string())]))
    with pytest.raises(InputError) as error:
        check_columns(info, "text", "id")
    assert str(error.value) == (
        "date=1/part-0.parquet: column 'text' is missing (columns: id, body, lang); pass --text-column"
    )


def test_text_column_of_the_wrong_type_is_named_with_its_type():
    info = _info(pa.schema([("id", pa.int64()), ("text", pa.int64())]))
    with pytest.raises(InputError) as error:
        check_columns(info, "text", "id")
    assert str(error.value) == "date=1/part-0.parquet: column 'text' has type int64, expected a string column"


def test_missing_explicit_id_column_is_named():
    info = _info(pa.schema([("doc", pa.int64()), ("text", pa.string())]))
    with pytest.raises(InputError) as error:
        check_columns(info, "text", "id")
    assert str(error.value) == ("date=1/part-0.parquet: column 'id' is missing (columns: doc, text); pass --id-column")
    check_columns(info, "text", None)  # no id column asked for: fine


@pytest.mark.parametrize("column", ["summary", "error"])
def test_input_column_named_like_an_output_column_is_refused(column):
    info = _info(pa.schema([("id", pa.int64()), ("text", pa.string()), (column, pa.string())]))
    with pytest.raises(InputError) as error:
        check_columns(info, "text", "id")
    assert str(error.value) == (
        f"date=1/part-0.parquet: column '{column}' collides with the output column of that "
        "name (outputs add summary, error); rename it in the input"
    )


@pytest.mark.parametrize("text_type", [pa.string(), pa.large_string(), pa.string_view(), pa.null()])
def test_string_types_and_all_null_text_are_accepted(text_type):
    check_columns(_info(pa.schema([("id", pa.int64()), ("text", text_type)])), "text", "id")


def test_text_column_named_summary_is_not_a_collision():
    """The text column is not carried to the output, so its name is free."""
    check_columns(_info(pa.schema([("id", pa.int64()), ("summary", pa.string())])), "summary", "id")


# ---------------------------------------------------------------------------------------------------------------
# plan_units


def _sized(relative: str, group_rows: tuple[int, ...]) -> ShardInfo:
    fmt = "arrow" if relative.endswith((".arrow", ".feather", ".ipc")) else "parquet"
    return ShardInfo(
        Shard(f"/lake/{relative}", relative, fmt, 1), sum(group_rows), group_rows, pa.schema([("text", pa.string())])
    )


def test_big_file_is_split_into_consecutive_row_group_ranges():
    units = plan_units([_sized("date=1/part-0.parquet", (3, 3, 3, 3, 3))], rows_per_unit=7)
    assert [(u.start, u.stop, u.num_rows, u.whole_file) for u in units] == [
        (0, 2, 6, False),
        (2, 4, 6, False),
        (4, 5, 3, False),
    ]
    assert [u.output_relative for u in units] == [
        "date=1/part-0.rg00000-00002.parquet",
        "date=1/part-0.rg00002-00004.parquet",
        "date=1/part-0.rg00004-00005.parquet",
    ]


def test_a_row_group_bigger_than_a_unit_is_a_unit_of_its_own():
    units = plan_units([_sized("a.parquet", (2, 50, 2, 2))], rows_per_unit=10)
    assert [(u.start, u.stop, u.num_rows) for u in units] == [(0, 1, 2), (1, 2, 50), (2, 4, 4)]


def test_file_that_fits_is_one_whole_unit_named_like_its_input_as_parquet():
    units = plan_units([_sized("date=1/part-0.arrow", (3, 4)), _sized("date=1/part-1.parquet", (5,))], rows_per_unit=7)
    assert [(u.start, u.stop, u.num_rows, u.whole_file, u.output_relative) for u in units] == [
        (0, 2, 7, True, "date=1/part-0.parquet"),
        (0, 1, 5, True, "date=1/part-1.parquet"),
    ]


def test_zero_row_files_still_get_one_unit():
    units = plan_units([_sized("empty.parquet", ()), _sized("empty-groups.parquet", (0, 0))], rows_per_unit=5)
    assert [(u.shard.relative, u.start, u.stop, u.num_rows, u.whole_file) for u in units] == [
        ("empty-groups.parquet", 0, 2, 0, True),
        ("empty.parquet", 0, 0, 0, True),
    ]


def test_planning_is_deterministic_and_ids_are_unique_and_file_name_safe():
    infos = [_sized(f"date={d}/part-{p}.parquet", (4,) * 7) for d in range(3) for p in range(2)]
    first = plan_units(infos, rows_per_unit=10)
    again = plan_units(list(reversed(infos)), rows_per_unit=10)
    assert first == again
    assert len({u.id for u in first}) == len(first) == 6 * 4
    assert all(len(u.id) == 24 and u.id.isalnum() for u in first)
    assert plan_units(infos, rows_per_unit=12) != first


def test_two_inputs_with_one_output_name_are_refused():
    with pytest.raises(
        InputError, match="part-0.arrow and date=1/part-0.parquet would both be written to date=1/part-0.parquet"
    ):
        plan_units([_sized("date=1/part-0.arrow", (1,)), _sized("date=1/part-0.parquet", (1,))], rows_per_unit=5)


# ---------------------------------------------------------------------------------------------------------------
# read_unit


def test_read_unit_streams_exactly_its_rows_in_order(tmp_path):
    _lake(tmp_path / "lake")
    fs, shards = list_shards(str(tmp_path / "lake"))
    infos, errors = inspect_shards(fs, shards)
    assert not errors
    units = plan_units(infos, rows_per_unit=4)
    assert [(u.shard.relative, u.start, u.stop) for u in units][:4] == [
        ("date=2026-11-01/part-0.parquet", 0, 1),
        ("date=2026-11-01/part-0.parquet", 1, 2),
        ("date=2026-11-01/part-0.parquet", 2, 3),
        ("date=2026-11-01/part-1.parquet", 0, 1),
    ]

    for unit in units:
        batches = list(read_unit(fs, unit))
        assert sum(b.num_rows for b in batches) == unit.num_rows
    assert _all_rows(fs, units) == list(range(30))
    arrow_units = [u for u in units if u.shard.format == "arrow"]
    assert [(u.start, u.stop) for u in arrow_units] == [(0, 2), (2, 3)]
    assert _all_rows(fs, arrow_units[1:]) == [26, 27]


def test_read_unit_projects_columns_in_the_order_asked(tmp_path):
    _lake(tmp_path / "lake")
    fs, shards = list_shards(str(tmp_path / "lake"))
    units = plan_units(inspect_shards(fs, shards)[0], rows_per_unit=100)
    for unit in units:
        for batch in read_unit(fs, unit, columns=["text", "id"]):
            assert batch.schema.names == ["text", "id"]


def test_read_unit_of_a_zero_row_file_yields_nothing(tmp_path):
    write_parquet(LOCAL, f"{tmp_path}/empty.parquet", numbered_rows(0, 0))
    fs, shards = list_shards(str(tmp_path))
    [unit] = plan_units(inspect_shards(fs, shards)[0], rows_per_unit=5)
    assert unit.num_rows == 0
    assert sum(b.num_rows for b in read_unit(fs, unit)) == 0


def test_read_failure_after_planning_is_a_shard_read_error_naming_the_file(tmp_path):
    write_parquet(LOCAL, f"{tmp_path}/part-0.parquet", numbered_rows(0, 20), row_group_size=5)
    fs, shards = list_shards(str(tmp_path))
    [unit] = plan_units(inspect_shards(fs, shards)[0], rows_per_unit=100)
    data = (tmp_path / "part-0.parquet").read_bytes()
    (tmp_path / "part-0.parquet").write_bytes(data[:200] + b"\xff" * 300 + data[500:])  # pages overwritten
    with pytest.raises(ShardReadError, match="part-0.parquet: "):
        list(read_unit(fs, unit))


# ---------------------------------------------------------------------------------------------------------------
# memory:// and s3://


def test_memory_filesystem_lake_lists_plans_and_reads(memory_root):
    fs = fsspec.filesystem("memory")
    _lake(memory_root, fs)
    fs_, shards = list_shards(f"memory://{memory_root}")
    assert [s.relative for s in shards] == LAKE_FILES
    infos, errors = inspect_shards(fs_, shards)
    assert not errors
    assert _all_rows(fs_, plan_units(infos, rows_per_unit=5)) == list(range(30))


def test_s3_lake_lists_by_directory_and_glob_and_reads_every_row_once(s3):
    fs, bucket, options = s3
    _lake(f"{bucket}/lake", fs)

    s3fs_, shards = list_shards(f"s3://{bucket}/lake", storage_options=options)
    assert [s.relative for s in shards] == LAKE_FILES
    assert shards[0].path == f"{bucket}/lake/{LAKE_FILES[0]}"
    infos, errors = inspect_shards(s3fs_, shards)
    assert not errors
    assert infos[3].group_rows == (2, 2, 2)  # the Arrow shard, counted from its footer and batch headers
    assert _all_rows(s3fs_, plan_units(infos, rows_per_unit=5)) == list(range(30))

    _, globbed = list_shards(f"s3://{bucket}/lake/date=2026-11-*/**.parquet", storage_options=options)
    assert [s.relative for s in globbed] == LAKE_FILES[:3]


def test_s3_missing_prefix_is_an_input_error_without_credentials(s3):
    fs, bucket, options = s3
    with pytest.raises(InputError, match="no such file or directory") as error:
        list_shards(f"s3://{bucket}/no-such-lake", storage_options=options)
    assert SECRET not in str(error.value)
