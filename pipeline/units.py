"""Shards -> work units -> output names, and a unit's rows read back.

Consecutive groups of one file are packed into work units of about `rows_per_unit` rows, the unit of
dispatch, retry and commit. Each unit has a deterministic id and a deterministic output name
(`output_name`), so a rerun of a unit overwrites its earlier output instead of adding to it.

Output names mirror the input: a unit that covers a whole file is written at the file's path relative to
the input root (Hive partition folders such as `date=2026-11-01/` included) with a `.parquet` extension;
a unit that covers part of a file adds its row-group range: `part-0.rg00000-00004.parquet`.

A small Parquet file is planned from its listing alone (planned_from_listing): one whole-file unit whose
row groups and rows its replica learns from the footer (resolve_unit), and which it publishes only with exactly
those rows and while the file is still the one the plan listed (ensure_unchanged).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from . import footers
from .errors import InputError
from .footers import READ_ERRORS, ShardInfo, ShardReadError, check_columns, describe
from .listing import Shard, file_suffix, listed_identity, unchanged_since_listed

# A Parquet file of at most rows_per_unit × this many bytes is planned from its listing alone, as one unit,
# its footer read only by the replica that summarizes it (resolve_unit): a first plan of a lake of a million
# small files then reads no footer. Such a file is too small to be worth splitting: a row worth summarizing
# (a sentence or more of text, which compresses about 3:1, plus its id) takes more than 32 bytes, so it holds
# at most rows_per_unit rows. One that holds more (very short or repetitive rows) is summarized as one larger
# unit, streamed a row group at a time like any other: coarser to retry, as correct.
LISTED_ROW_BYTES = 32


@dataclass(frozen=True, slots=True)
class WorkUnit:
    shard: Shard
    start: int  # first row group / record batch
    # one past the last; None for a unit planned from the listing (a whole small file) until resolve_unit
    # reads its footer
    stop: int | None
    num_rows: int | None  # None likewise: not known before the footer is read
    whole_file: bool
    id: str  # deterministic, file-name safe, unique per (relative, start, stop, input identity)
    output_relative: str  # deterministic output path under the output root
    identity: str = ""  # the input file's (ShardInfo.identity)


def plan_units(
    infos: Sequence[ShardInfo], rows_per_unit: int, known: Sequence[WorkUnit] = (), listed: Sequence[Shard] = ()
) -> list[WorkUnit]:
    """Pack consecutive groups of each file into units of at most rows_per_unit rows (at least one group).

    Deterministic: the same footers and rows_per_unit give the same units, ids and names. A file with no
    rows still gets one (empty) unit, so that its output file exists. Two inputs that would be written at
    one output name (`part-0.arrow` and `part-0.parquet` side by side) are an InputError. `known` are
    units of unchanged files that an earlier run planned the same way (`known_units`); they join the plan.
    `listed` are small files planned from their listing (planned_from_listing): one whole-file unit each.
    """
    if rows_per_unit < 1:
        raise ValueError(f"rows_per_unit must be >= 1, got {rows_per_unit}")
    units: list[WorkUnit] = list(known)
    units.extend(map(listed_unit, listed))
    for info in infos:
        groups = info.group_rows
        start, rows = 0, 0
        for index, count in enumerate(groups):
            if index > start and rows + count > rows_per_unit:
                units.append(_unit(info, start, index, rows))
                start, rows = index, 0
            rows += count
        units.append(_unit(info, start, len(groups), rows))
    units.sort(key=lambda u: (u.shard.path, u.start))
    _check_output_names(units)
    return units


def planned_from_listing(shard: Shard, rows_per_unit: int) -> bool:
    """Whether the file is planned from its listing, its footer unread (see LISTED_ROW_BYTES): a small Parquet
    file whose listing says who it is (listed_identity). Arrow files are not: their identity needs the batch
    headers."""
    return (
        shard.format == "parquet"
        and shard.size <= rows_per_unit * LISTED_ROW_BYTES
        and listed_identity(shard) is not None
    )


def listed_unit(shard: Shard) -> WorkUnit:
    """The one unit of a file planned from its listing: the whole file, its groups and rows unknown until
    resolve_unit reads its footer. Its id holds the listed identity, so a rewritten file is a new unit."""
    identity = listed_identity(shard)
    unit_id = hashlib.sha256(f"{shard.relative}:whole:{identity}".encode()).hexdigest()[:24]
    return WorkUnit(shard, 0, None, None, True, unit_id, output_name(shard.relative, 0, 0, True), identity)


def resolve_unit(
    fs, unit: WorkUnit, schema: pa.Schema | None, text_column: str, id_column: str | None
) -> tuple[WorkUnit, pa.Schema]:
    """The unit as the replica runs it, and its input's schema: for a unit planned from the listing, its row
    groups and rows from the footer, read now, and its columns checked as the driver checks the files it
    inspects; for another unit sent without a schema, its schema likewise. The file must still be the one the
    plan listed (ensure_unchanged); write_unit then publishes the unit only with exactly the footer's rows.
    """
    if unit.stop is not None and schema is not None:
        return unit, schema
    ensure_unchanged(fs, unit)
    info = footers.inspect_shard(fs, unit.shard)  # ShardReadError for a corrupt file: the unit fails alone
    check_columns(info, text_column, id_column)
    if unit.stop is None:
        unit = replace(unit, stop=len(info.group_rows), num_rows=info.num_rows)
    return unit, info.schema


def ensure_unchanged(fs, unit: WorkUnit) -> None:
    """Raise ShardReadError if the unit's file is no longer the one the plan listed (a new size, store version or
    local stat): a unit is never published from another version of its input. A no-op for a file whose listing
    gave no identity (its plan read the footer, and the unit's row count was checked against it). The next run
    plans the new version as a new unit."""
    if listed_identity(unit.shard) is None:
        return
    try:
        unchanged = unchanged_since_listed(fs, unit.shard)
    except FileNotFoundError:
        raise ShardReadError(unit.shard, "deleted since the run planned it; not published") from None
    if not unchanged:
        raise ShardReadError(
            unit.shard, "changed since the run planned it; not published (the next run summarizes it anew)"
        )


def known_units(fs, shard: Shard, records: Sequence) -> list[WorkUnit] | None:
    """The units an earlier run planned for this file (commit.py's UnitRecords), if the file is unchanged.

    Unchanged means the same identity, read without parsing the footer (the store's version, the raw
    footer's hash, or for a local file whose stat is unchanged, the identity recorded with that stat): a
    rerun over a million unchanged files then reads no schema and no row-group list, and locally no footer.
    None for a changed file, or an Arrow one (whose identity needs its batch headers).
    """
    if shard.stat is not None and all(r.input_stat == shard.stat for r in records):
        identity = records[0].input_identity
    else:
        identity = footers.file_identity(fs, shard)
    if identity is None or any(r.input_identity != identity for r in records):
        return None
    return [WorkUnit(shard, r.start, r.stop, r.num_rows, r.whole_file, r.id, r.output, identity) for r in records]


def output_name(relative: str, start: int, stop: int, whole_file: bool) -> str:
    """Where a unit of input file `relative` (groups start..stop) is written, relative to the output root."""
    stem = relative[: len(relative) - len(file_suffix(relative))]  # posixpath.splitext's stem, faster
    return f"{stem}.parquet" if whole_file else f"{stem}.rg{start:05d}-{stop:05d}.parquet"


def _unit(info: ShardInfo, start: int, stop: int, rows: int) -> WorkUnit:
    relative = info.shard.relative
    whole = start == 0 and stop == len(info.group_rows)
    output = output_name(relative, start, stop, whole)
    # the input's identity is part of the id: a rewritten file's units are new units, summarized again
    unit_id = hashlib.sha256(f"{relative}:{start}:{stop}:{info.identity}".encode()).hexdigest()[:24]
    return WorkUnit(info.shard, start, stop, rows, whole, unit_id, output, info.identity)


def _check_output_names(units: list[WorkUnit]) -> None:
    seen: dict[str, WorkUnit] = {}
    for unit in units:
        other = seen.setdefault(unit.output_relative, unit)
        if other is not unit:
            raise InputError(
                f"{other.shard.relative} and {unit.shard.relative} would both be written to "
                f"{unit.output_relative}; keep only one of them in the input"
            )


# ----------------------------------------------------------------------------------------------------------------
# Reading


def read_unit(fs, unit: WorkUnit, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """The unit's rows in file order, one row group / record batch at a time (bounded memory).

    A read failure raises ShardReadError naming the file.
    """
    if unit.stop is None:
        raise ValueError(f"{unit.shard.relative} was planned from its listing: resolve_unit() it before reading it")
    try:
        with fs.open(unit.shard.path, "rb") as f:
            if unit.shard.format == "parquet":
                yield from _read_parquet(f, unit, columns)
            else:
                yield from _read_arrow(f, unit, columns)
    except READ_ERRORS as e:
        raise ShardReadError(unit.shard, describe(e)) from e


def _read_parquet(f, unit: WorkUnit, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    parquet = pq.ParquetFile(f)
    for group in range(unit.start, unit.stop):
        table = parquet.read_row_group(group, columns=columns)
        for batch in table.to_batches():
            yield batch.select(columns) if columns is not None else batch


def _read_arrow(f, unit: WorkUnit, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    try:
        reader = ipc.open_file(f)
    except pa.ArrowInvalid:
        # the streaming format (see _inspect_arrow): the whole file is the unit's one group
        if (unit.start, unit.stop) != (0, 1):
            raise ValueError(
                f"an Arrow stream file is one group, but the unit asks for groups {unit.start}-{unit.stop}"
            ) from None
        f.seek(0)
        for batch in ipc.open_stream(f):
            yield batch.select(columns) if columns is not None else batch
        return
    if columns is not None:
        # read only the columns asked for: IPC bodies are laid out per column
        names = reader.schema.names
        reader = ipc.open_file(f, options=ipc.IpcReadOptions(included_fields=sorted({names.index(c) for c in columns})))
    for index in range(unit.start, unit.stop):
        batch = reader.get_batch(index)
        yield batch.select(columns) if columns is not None else batch
