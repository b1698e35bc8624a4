"""Shards -> work units -> output names, and a unit's rows read back.

Consecutive groups of one file are packed into work units of about `rows_per_unit` rows, the unit of
dispatch, retry and commit. Each unit has a deterministic id and a deterministic output name
(`output_name`), so a rerun of a unit overwrites its earlier output instead of adding to it.

Output names mirror the input: a unit that covers a whole file is written at the file's path relative to
the input root (Hive partition folders such as `date=2026-11-01/` included) with a `.parquet` extension;
a unit that covers part of a file adds its row-group range: `part-0.rg00000-00004.parquet`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from . import footers
from .errors import InputError
from .footers import READ_ERRORS, ShardInfo, ShardReadError, describe
from .listing import Shard, file_suffix


@dataclass(frozen=True, slots=True)
class WorkUnit:
    shard: Shard
    start: int  # first row group / record batch
    stop: int  # one past the last
    num_rows: int
    whole_file: bool
    id: str  # deterministic, file-name safe, unique per (relative, start, stop, input identity)
    output_relative: str  # deterministic output path under the output root
    identity: str = ""  # the input file's (ShardInfo.identity)


def plan_units(infos: Sequence[ShardInfo], rows_per_unit: int, known: Sequence[WorkUnit] = ()) -> list[WorkUnit]:
    """Pack consecutive groups of each file into units of at most rows_per_unit rows (at least one group).

    Deterministic: the same footers and rows_per_unit give the same units, ids and names. A file with no
    rows still gets one (empty) unit, so that its output file exists. Two inputs that would be written at
    one output name (`part-0.arrow` and `part-0.parquet` side by side) are an InputError. `known` are
    units of unchanged files that an earlier run planned the same way (`known_units`); they join the plan.
    """
    if rows_per_unit < 1:
        raise ValueError(f"rows_per_unit must be >= 1, got {rows_per_unit}")
    units: list[WorkUnit] = list(known)
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
