"""Shards -> what their footers say: rows per row group (Parquet) or record batch (Arrow IPC), the schema,
and the file's identity for resume; and whether the columns a job needs are there.

Footers are read, never the data, so that counting the rows of a lake on an object store does not download
it. A Parquet footer is read with one read of the file's end, decoded by pyarrow's reader from those bytes,
and its schema converted to Arrow once per distinct schema (the files of a lake mostly share one). Arrow IPC's are
read as the footer and each batch's header. Small Parquet files are planned without their footers
(units.planned_from_listing): their replicas read them (units.resolve_unit).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
import struct
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

# The reader under pq.ParquetFile, opened on the bytes of a file's end: its footer decoded without ParquetFile's
# Python set-up or its Arrow schema (half of ParquetFile's cost a footer). (pyarrow._parquet's
# _reconstruct_filemetadata decodes faster still, but aborts the process on a corrupt footer.)
from pyarrow._parquet import ParquetReader

from .errors import InputError
from .listing import Shard

# Columns every output file gets; an input column of the same name would be silently replaced.
OUTPUT_COLUMNS = ("summary", "error")
# Types a text column may have, also as a dictionary's values. Binary is taken as UTF-8: the summarizer decodes
# every row itself (string columns too), so a value that is not UTF-8 fails its row only. null: an all-null column.
TEXT_TYPES = (
    pa.string(),
    pa.large_string(),
    pa.string_view(),
    pa.binary(),
    pa.large_binary(),
    pa.binary_view(),
    pa.null(),
)
# A Parquet file's end is read once in this size: a footer is rarely longer (a few KiB for hundreds of columns),
# and a longer one is read again whole.
PARQUET_TAIL_BYTES = 64 * 1024
# What a failed read of a file looks like: pyarrow's errors (ArrowInvalid is a ValueError, ArrowIOError an
# OSError) and the storage's. Anything else is a bug and is not dressed up as a bad shard.
READ_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError)


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """What a shard's footer (Parquet) or IPC footer and batch headers (Arrow) say."""

    shard: Shard
    num_rows: int
    group_rows: tuple[int, ...]  # rows per row group (Parquet) or per record batch (Arrow)
    schema: pa.Schema
    # What the file holds, for resume: size plus the store's version, or else a hash of the footer (see
    # _identity). A unit's id includes it, so a rewritten file is summarized again.
    identity: str = ""


class ShardReadError(Exception):
    """One shard cannot be read (corrupt, truncated, not the format its name says). It fails alone."""

    def __init__(self, shard: Shard, reason: str):
        super().__init__(f"{shard.relative}: {reason}")
        self.shard = shard
        self.reason = reason

    def __reduce__(self):
        # raised in a replica, it travels to the driver pickled: rebuilt from its own arguments, not from
        # Exception's args (the message alone), which Ray would report as an UnserializableException, a death
        return type(self), (self.shard, self.reason)


def inspect_shard(fs, shard: Shard) -> ShardInfo:
    """Row counts per group and the schema, from the footer; raises ShardReadError for an unreadable one."""
    try:
        if shard.format == "parquet":
            return _inspect_parquet(fs, shard)
        return _inspect_arrow(fs, shard)
    except READ_ERRORS as e:
        raise ShardReadError(shard, describe(e)) from e


def inspect_shards(
    fs, shards: Sequence[Shard], threads: int = 16, processes_from: int = 100_000
) -> tuple[list[ShardInfo], list[ShardReadError]]:
    """inspect_shard over many shards at once.

    Both lists keep the shards' order; a corrupt shard only lands in the second. Footer reads from object
    stores are latency-bound: threads. Local ones are CPU-bound (pyarrow parses each footer holding the GIL):
    from `processes_from` shards on, a process a core, which a first plan over a million files needs.
    """
    if not isinstance(fs, LocalFileSystem):
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as pool:
            results = list(pool.map(_Inspector(fs), shards))
    elif len(shards) >= processes_from and (os.cpu_count() or 1) > 1:
        results = _inspect_in_processes(fs, shards)
    else:
        inspect = _Inspector(fs)
        results = [inspect(shard) for shard in shards]
    return ([r for r in results if isinstance(r, ShardInfo)], [r for r in results if isinstance(r, ShardReadError)])


class _Inspector:
    """inspect_shard over many files, keeping one copy of each schema (the files of a lake mostly share one) and
    converting each distinct Parquet schema to Arrow once."""

    def __init__(self, fs):
        self.fs = fs
        self.schemas: dict[pa.Schema, pa.Schema] = {}
        # (_schema_key..., Arrow schema) of the latest distinct footers; the first is the one the last file had
        self.parquet_schemas: list[tuple] = []

    def __call__(self, shard: Shard) -> ShardInfo | ShardReadError:
        try:
            if shard.format == "parquet" and (info := self._parquet(shard)) is not None:
                return info
            return self._shared(inspect_shard(self.fs, shard))
        except ShardReadError as e:
            return e

    def _shared(self, info: ShardInfo) -> ShardInfo:
        return replace(info, schema=self.schemas.setdefault(info.schema, info.schema))

    def _parquet(self, shard: Shard) -> ShardInfo | None:
        """The footer from one read of the file's end, decoded by pyarrow's reader on those bytes, its Arrow schema
        the one of an earlier file with the same Parquet schema. None (read the file through inspect_shard,
        whose error names what is wrong) for a file this does not take; a new schema goes through
        inspect_shard once."""
        try:
            tail, length = _read_parquet_tail(self.fs, shard)
            reader = ParquetReader()
            reader.open(pa.BufferReader(tail))
            metadata = reader.metadata
            group_rows = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
            if sum(group_rows) != metadata.num_rows:
                return None
            schema = self._arrow_schema(metadata)
        except READ_ERRORS:
            return None
        if schema is None:
            info = self._shared(inspect_shard(self.fs, shard))
            self.parquet_schemas.insert(0, (*_schema_key(metadata), info.schema))
            del self.parquet_schemas[_DISTINCT_SCHEMAS:]
            return info
        return ShardInfo(shard, metadata.num_rows, group_rows, schema, _identity(shard, _parquet_footer(tail, length)))

    def _arrow_schema(self, metadata) -> pa.Schema | None:
        """The Arrow schema pyarrow gave a file with the same Parquet schema, key-value metadata (where Arrow
        keeps its own types: large_string, dictionary), writer and format version, if one was seen."""
        schema, *rest = _schema_key(metadata)
        for i, (other, *other_rest, arrow) in enumerate(self.parquet_schemas):
            if rest == other_rest and schema.equals(other):
                if i:
                    self.parquet_schemas.insert(0, self.parquet_schemas.pop(i))
                return arrow
        return None


def _schema_key(metadata) -> tuple:
    """What pyarrow's Arrow schema of a Parquet file depends on."""
    return metadata.schema, metadata.metadata, metadata.created_by, metadata.format_version


# Distinct Parquet schemas an _Inspector remembers: a lake holds a few, one per partition at most
_DISTINCT_SCHEMAS = 16


def _inspect_in_processes(fs, shards: Sequence[Shard]) -> list[ShardInfo | ShardReadError]:
    # spawn, not fork: the driver may hold Ray's threads, and a forked child can inherit their locks held
    context = multiprocessing.get_context("spawn")
    chunk = 4096
    inspector = _Inspector(fs)
    results: list[ShardInfo | ShardReadError] = []
    with ProcessPoolExecutor(max_workers=os.cpu_count(), mp_context=context) as pool:
        chunks = [shards[i : i + chunk] for i in range(0, len(shards), chunk)]
        # tuples, not Shards: unpickling a frozen dataclass costs more than reading its footer
        sent = [[(s.path, s.format, s.size, s.version) for s in part] for part in chunks]
        for part, found in zip(chunks, pool.map(_inspect_chunk, sent)):
            for shard, result in zip(part, found):
                if isinstance(result, str):
                    results.append(ShardReadError(shard, result))
                else:
                    rows, group_rows, schema, identity = result
                    schema = inspector.schemas.setdefault(schema, schema)
                    results.append(ShardInfo(shard, rows, group_rows, schema, identity))
    return results


def _inspect_chunk(shards: Sequence[tuple[str, str, int, str | None]]) -> list[tuple | str]:
    """In a worker process: each (path, format, size, version)'s footer as a tuple (sent back with each schema
    pickled once a chunk), or the reason it is unreadable."""
    inspect = _Inspector(LocalFileSystem())
    found = []
    for path, format, size, version in shards:
        info = inspect(Shard(path, path, format, size, version))
        found.append(
            info.reason
            if isinstance(info, ShardReadError)
            else (info.num_rows, info.group_rows, info.schema, info.identity)
        )
    return found


def _inspect_parquet(fs, shard: Shard) -> ShardInfo:
    """Through pyarrow's reader: for a file _Inspector._parquet does not take, and for each new schema."""
    identity = _identity(shard, _read_parquet_footer(fs, shard) if shard.version is None else b"")
    with _open(fs, shard.path) as f:
        parquet = pq.ParquetFile(f)
        metadata = parquet.metadata
        group_rows = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
        schema = parquet.schema_arrow
    if sum(group_rows) != metadata.num_rows:
        raise ValueError(
            f"corrupt footer: its row groups hold {sum(group_rows)} rows, its total says {metadata.num_rows}"
        )
    return ShardInfo(shard, metadata.num_rows, group_rows, schema, identity)


def _open(fs, path: str):
    """A file for pyarrow: local files as pyarrow's own (twice as fast to read a footer from as a Python file
    object, which matters at a million files), others through fsspec."""
    if isinstance(fs, LocalFileSystem):
        return pa.OSFile(path)
    return fs.open(path, "rb")


def _identity(shard: Shard, footer: bytes) -> str:
    """A file's identity for resume: its size and the store's version, or else a hash of its footer.

    A Parquet footer records every column chunk's offset and compressed size and each column's min and
    max, so a rewrite with other text changes it, short of an edit that keeps every compressed size and
    statistic; stores that version their objects are exact.
    """
    if shard.version is not None:
        return f"{shard.size}:{shard.version}"
    return f"{shard.size}:footer:{hashlib.sha256(footer).hexdigest()[:32]}"


def file_identity(fs, shard: Shard) -> str | None:
    """The shard's identity (as inspect_shard gives it) without parsing its footer: the store's version, or
    the hash of a Parquet file's raw footer. None for an Arrow file (whose identity needs its batch headers)
    or an unreadable one."""
    if shard.version is not None:
        return _identity(shard, b"")
    if shard.format != "parquet":
        return None
    try:
        return _identity(shard, _read_parquet_footer(fs, shard))
    except READ_ERRORS:
        return None


def _read_parquet_footer(fs, shard: Shard) -> bytes:
    """The shard's raw footer: file metadata (thrift), without its length (int32) and "PAR1"."""
    tail, length = _read_parquet_tail(fs, shard)
    return _parquet_footer(tail, length)


def _read_parquet_tail(fs, shard: Shard) -> tuple[bytes, int]:
    """The end of the file that holds its footer, and the footer's length, in one read of the file's end (two
    for a footer over PARQUET_TAIL_BYTES): locally with pread, on object stores with one ranged GET."""
    if isinstance(fs, LocalFileSystem):
        fd = os.open(shard.path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            return _parquet_tail(lambda start: os.pread(fd, size - start, start), size)
        finally:
            os.close(fd)
    return _parquet_tail(lambda start: fs.cat_file(shard.path, start=start, end=shard.size), shard.size)


def _parquet_tail(read_from, size: int) -> tuple[bytes, int]:
    """The file's last PARQUET_TAIL_BYTES (or the footer and all after it, if longer) and the footer's length;
    `read_from(start)` gives the file's bytes from start to its end (`size`)."""
    if size < 12:
        raise ValueError(f"not a Parquet file: {size} bytes")
    tail = _read_exactly(read_from, max(0, size - PARQUET_TAIL_BYTES), size)
    if tail[-4:] != b"PAR1":
        raise ValueError("not a Parquet file: no PAR1 at its end")
    length = int.from_bytes(tail[-8:-4], "little")
    if length > size - 12:
        raise ValueError(f"corrupt Parquet footer length {length}")
    if length + 8 > len(tail):
        tail = _read_exactly(read_from, size - 8 - length, size)
    return tail, length


def _read_exactly(read_from, start: int, size: int) -> bytes:
    data = read_from(start)
    if len(data) != size - start:
        raise ValueError(f"the file changed while read: {len(data)} bytes from {start}, not {size - start}")
    return data


def _parquet_footer(tail: bytes, length: int) -> bytes:
    return tail[len(tail) - 8 - length : len(tail) - 8]


def _inspect_arrow(fs, shard: Shard) -> ShardInfo:
    with fs.open(shard.path, "rb") as f:
        try:
            reader = ipc.open_file(f)  # reads the footer only
        except pa.ArrowInvalid as file_error:
            # The streaming format has no footer and no random access: it is counted by reading it
            # through, and the whole file is one group (one unit), read front to back.
            f.seek(0)
            try:
                stream = ipc.open_stream(f)
            except pa.ArrowInvalid:
                raise ValueError(f"not an Arrow IPC file or stream ({file_error})") from None
            rows = sum(batch.num_rows for batch in stream)
            return ShardInfo(shard, rows, (rows,), stream.schema, _identity(shard, _whole(fs, shard)))
        schema, batches = reader.schema, reader.num_record_batches
    group_rows, footer = _ipc_batch_rows(fs, shard)
    if len(group_rows) != batches:
        raise ValueError(f"corrupt footer: it lists {len(group_rows)} record batches, pyarrow reads {batches}")
    return ShardInfo(shard, sum(group_rows), group_rows, schema, _identity(shard, footer))


def _whole(fs, shard: Shard) -> bytes:
    """A stream file has no footer: its identity hashes all of it (it is read through to count its rows anyway)."""
    if shard.version is not None:
        return b""
    digest = hashlib.sha256()
    with fs.open(shard.path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.digest()


# Arrow IPC file layout: "ARROW1" + padding, the stream's messages, the footer (a flatbuffer),
# its length (int32), "ARROW1". The footer lists each record batch's Block (offset, metadata length,
# body length) but not its row count, which sits in the batch's message header. pyarrow reads whole
# batches to count rows, which over an object store means reading the whole corpus in the driver;
# reading the footer and the few hundred bytes of each header is enough.
_IPC_MAGIC = b"ARROW1"
_RECORD_BATCH_HEADER = 3  # MessageHeader union tag of RecordBatch (Message.fbs)


def _ipc_batch_rows(fs, shard: Shard) -> tuple[tuple[int, ...], bytes]:
    """Rows per record batch, and the footer and batch headers (which record every buffer's size)."""
    size = shard.size
    tail = fs.cat_file(shard.path, start=size - 10, end=size)
    if len(tail) != 10 or tail[4:] != _IPC_MAGIC:
        raise ValueError("not an Arrow IPC file: no ARROW1 at its end")
    footer_size = int.from_bytes(tail[:4], "little", signed=True)
    if not 0 < footer_size <= size - 10 - 8:
        raise ValueError(f"corrupt IPC footer length {footer_size}")
    footer = fs.cat_file(shard.path, start=size - 10 - footer_size, end=size - 10)
    try:
        blocks = _footer_blocks(footer)
        if not blocks:
            return (), footer
        headers = fs.cat_ranges(
            [shard.path] * len(blocks),
            [offset for offset, _ in blocks],
            [offset + length for offset, length in blocks],
            on_error="raise",
        )
        return tuple(_message_rows(header) for header in headers), footer + b"".join(headers)
    except (struct.error, IndexError) as e:
        raise ValueError(f"corrupt IPC footer or batch header ({e})") from None


def _footer_blocks(footer: bytes) -> list[tuple[int, int]]:
    """(offset, metadata length) of each record batch, from the Footer table (File.fbs)."""
    table = _FlatTable(footer, _u32(footer, 0))
    start, count = table.vector(3)  # Footer.recordBatches: [Block]
    # struct Block { offset: long; metaDataLength: int; (4 bytes padding) bodyLength: long; } = 24 bytes
    return [
        (struct.unpack_from("<q", footer, start + 24 * i)[0], struct.unpack_from("<i", footer, start + 24 * i + 8)[0])
        for i in range(count)
    ]


def _message_rows(header: bytes) -> int:
    """RecordBatch.length from an encapsulated message's metadata: [0xFFFFFFFF] int32 size, Message table."""
    offset = 8 if header[:4] == b"\xff\xff\xff\xff" else 4  # files before Arrow 0.15 have no continuation marker
    body = header[offset:]
    message = _FlatTable(body, _u32(body, 0))
    if message.u8(1) != _RECORD_BATCH_HEADER:  # Message.header_type
        raise ValueError("a record batch block does not hold a record batch")
    return message.table(2).i64(0)  # Message.header -> RecordBatch.length


def _u32(buf: bytes, pos: int) -> int:
    return struct.unpack_from("<I", buf, pos)[0]


class _FlatTable:
    """Just enough of a flatbuffers table reader for the fields above (scalars, sub-tables, vectors)."""

    def __init__(self, buf: bytes, pos: int):
        self.buf, self.pos = buf, pos
        self.vtable = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vtable_size = struct.unpack_from("<H", buf, self.vtable)[0]

    def _field(self, slot: int) -> int:
        entry = 4 + 2 * slot
        return struct.unpack_from("<H", self.buf, self.vtable + entry)[0] if entry < self.vtable_size else 0

    def u8(self, slot: int) -> int:
        field = self._field(slot)
        return self.buf[self.pos + field] if field else 0

    def i64(self, slot: int) -> int:
        field = self._field(slot)
        return struct.unpack_from("<q", self.buf, self.pos + field)[0] if field else 0

    def table(self, slot: int) -> _FlatTable:
        field = self._field(slot)
        if not field:
            raise ValueError(f"flatbuffer field {slot} is missing")
        where = self.pos + field
        return _FlatTable(self.buf, where + _u32(self.buf, where))

    def vector(self, slot: int) -> tuple[int, int]:
        """(position of the first element, element count); (0, 0) when absent."""
        field = self._field(slot)
        if not field:
            return 0, 0
        where = self.pos + field
        start = where + _u32(self.buf, where)
        return start + 4, _u32(self.buf, start)


def describe(error: BaseException) -> str:
    """An error in one line, for reports and failure records. For a Ray error, the exception the task or actor
    raised: its `cause` where Ray keeps one, else the last exception of the traceback that Ray gives as text."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return describe(cause)
    text = f"{type(error).__name__}: {error}"
    raised = list(re.finditer(r"^[A-Za-z_][\w.]*(Error|Exception)\b.*", text, re.MULTILINE))
    if len(raised) > 1:  # a traceback's text: the exception it ends with
        return " ".join(text[raised[-1].start() :].split())[:500]
    return text.splitlines()[0][:500]


# ----------------------------------------------------------------------------------------------------------------
# Columns


def check_columns(info: ShardInfo, text_column: str, id_column: str | None) -> None:
    """Fail fast, naming the shard and the column, on input every unit of the job would trip over."""
    schema, relative = info.schema, info.shard.relative
    listed = ", ".join(schema.names)
    wanted = [(text_column, "--text-column")]
    if id_column is not None:
        wanted.append((id_column, "--id-column"))
    for column, flag in wanted:
        count = schema.names.count(column)
        if count == 0:
            raise InputError(f"{relative}: column '{column}' is missing (columns: {listed}); pass {flag}")
        if count > 1:
            raise InputError(f"{relative}: column '{column}' appears {count} times")
    text_type = schema.field(text_column).type
    value_type = text_type.value_type if pa.types.is_dictionary(text_type) else text_type
    if value_type not in TEXT_TYPES:
        raise InputError(f"{relative}: column '{text_column}' has type {text_type}, expected a string column")
    for column in OUTPUT_COLUMNS:
        if column in schema.names and column != text_column:  # the text column is not carried to the output
            raise InputError(
                f"{relative}: column '{column}' collides with the output column of that name "
                f"(outputs add {', '.join(OUTPUT_COLUMNS)}); rename it in the input"
            )
