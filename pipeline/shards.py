"""Inputs -> shards -> work units -> output names.

A shard is one Parquet or Arrow IPC file of the input. Its footer says how many rows each row group
(Parquet) or record batch (Arrow) holds; consecutive groups of one file are packed into work units of
about `rows_per_unit` rows, the unit of dispatch, retry and commit. Each unit has a deterministic id and
a deterministic output name, so a rerun of a unit overwrites its earlier output instead of adding to it.

Output names mirror the input: a unit that covers a whole file is written at the file's path relative to
the input root (Hive partition folders such as `date=2026-11-01/` included) with a `.parquet` extension;
a unit that covers part of a file adds its row-group range: `part-0.rg00000-00004.parquet`.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import re
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace


import fsspec
from fsspec.implementations.local import LocalFileSystem
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from model.redact import redact_url, scrub, url_secrets

from .errors import InputError
from .partitions import Condition, matches, may_hold_matches

FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}
# Columns every output file gets; an input column of the same name would be silently replaced.
OUTPUT_COLUMNS = ("summary", "error")
# Types a text column may have, also as a dictionary's values. Binary is taken as UTF-8: the summarizer decodes
# every row itself (string columns too), so a value that is not UTF-8 fails its row only. null: an all-null column.
TEXT_TYPES = (pa.string(), pa.large_string(), pa.string_view(), pa.binary(), pa.large_binary(), pa.binary_view(),
              pa.null())
# What a failed read of a file looks like: pyarrow's errors (ArrowInvalid is a ValueError, ArrowIOError an
# OSError) and the storage's. Anything else is a bug and is not dressed up as a bad shard.
READ_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError)


@dataclass(frozen=True, slots=True)  # slots: a lake can list a million of these
class Shard:
    path: str  # the path as the filesystem wants it (no protocol): "bucket/lake/date=2026-11-01/part-0.parquet"
    relative: str  # "/"-separated, relative to the input root: "date=2026-11-01/part-0.parquet"
    format: str  # "parquet" or "arrow" (Arrow IPC file format; the streaming format is read as one group)
    size: int  # bytes
    # The store's version of the object when its listing gives one (S3 ETag, GCS generation, Azure etag):
    # it changes whenever the object is rewritten.
    version: str | None = None


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


class ShardReadError(Exception):
    """One shard cannot be read (corrupt, truncated, not the format its name says). It fails alone."""

    def __init__(self, shard: Shard, reason: str):
        super().__init__(f"{shard.relative}: {reason}")
        self.shard = shard
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------------
# URLs and filesystems


def open_filesystem(url: str | Sequence[str], storage_options: dict | None = None, *,
                    error: type[Exception] = InputError) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of `url` (local path, memory://, s3://, ...) and the path on it, without protocol.

    Given a list of inputs, the first one's. Credentials come from `storage_options` or the environment,
    as fsspec does it; they never appear in a message.
    """
    if not isinstance(url, str):
        url = list(url)[0]
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as e:
        # an unknown protocol, or one whose package is missing: fsspec's message names the package
        raise error(f"cannot open {redact_url(url)}: {scrub(str(e), url_secrets(url))}") from None
    return fs, _strip_slash(path)


def _strip_slash(path: str) -> str:
    return path.rstrip("/") or "/"


# ----------------------------------------------------------------------------------------------------------------
# Listing


def list_shards(inputs: str | Sequence[str], storage_options: dict | None = None,
                conditions: list[Condition] | None = None) -> tuple[fsspec.AbstractFileSystem, list[Shard]]:
    """Every .parquet / .arrow / .feather / .ipc file the inputs name, sorted by path.

    `inputs` is a directory (walked recursively), a glob (`s3://b/lake/date=2026-11-*/**.parquet`), or a
    list of them and of files, all on one filesystem. Names starting with `_` or `.` (files and folders)
    are skipped, as Spark and pyarrow skip `_SUCCESS`, `_temporary/` and `.crc` files; a file named
    explicitly is always taken. `relative` is relative to the directory given, to a glob's longest
    directory prefix without wildcards, or, for a list, to the common parent of those.

    With `conditions` (a --partition-filter), only shards whose Hive folders match are returned, and a
    directory's walk lists only the folders that may hold them. The result may then be empty.
    """
    urls = [inputs] if isinstance(inputs, str) else list(inputs)
    if not urls:
        raise InputError("no input given: pass --input (a directory, a glob, or files)")
    fs, _ = open_filesystem(urls[0], storage_options)
    found: dict[str, tuple[int, str | None]] = {}  # path -> (size, store version)
    bases: list[str] = []
    for url in urls:
        other, path = open_filesystem(url, storage_options)
        if type(other) is not type(fs):
            raise InputError(f"inputs must be on one filesystem: {redact_url(url)} is not on the same one as "
                             f"{redact_url(urls[0])}")
        try:
            base, files = _expand(fs, path, redact_url(url), conditions)
        except OSError as e:
            raise InputError(f"cannot list {redact_url(url)}: {type(e).__name__}: "
                             f"{scrub(str(e), url_secrets(url))}") from None
        if not files and not conditions:
            raise InputError(f"{redact_url(url)}: no .parquet, .arrow, .feather or .ipc files found "
                             "(names starting with _ or . are skipped)")
        bases.append(base)
        found.update(files)
    root = bases[0] if len(bases) == 1 else posixpath.commonpath(bases)
    if conditions:
        found = {p: entry for p, entry in found.items() if matches(_relative(p, root), conditions)}
    return fs, [Shard(path, _relative(path, root), FORMATS[_suffix(path)], size, version)
                for path, (size, version) in sorted(found.items())]


# Listing fields that name an object's version, by store: s3fs (ETag; VersionId in versioned buckets),
# gcsfs (generation), adlfs (etag). Local and memory filesystems have none: their files are identified by
# their footers.
_VERSION_FIELDS = ("VersionId", "ETag", "generation", "etag")


def _entry(info: dict) -> tuple[int, str | None]:
    """(size, store version) from a listing entry."""
    for name in _VERSION_FIELDS:
        if info.get(name):
            return info["size"], f"{name}:{str(info[name]).strip(chr(34))}"  # S3 quotes its ETags
    return info["size"], None


def _expand(fs, path: str, shown: str, conditions: list[Condition] | None = None
            ) -> tuple[str, dict[str, tuple[int, str | None]]]:
    """One input's base directory and its shard files (path -> (size, store version))."""
    if _has_magic(path):
        pattern = _whole_component_double_stars(path)
        base = _glob_base(pattern)
        try:
            matches = fs.glob(pattern, detail=True)
        except ValueError as e:  # fsspec's verdict on a malformed pattern
            raise InputError(f"{shown}: {e}") from None
        files = {}
        for name, info in matches.items():
            if info["type"] == "directory":  # a glob over partition folders: take everything below them
                files.update({p: _entry(i) for p, i in fs.find(name, detail=True).items()})
            else:
                files[name] = _entry(info)
        return base, {p: s for p, s in files.items() if _is_shard(_relative(p, base))}
    if fs.isdir(path):
        files = _walk(fs, path, conditions)
        return path, {p: _entry(i) for p, i in files.items() if _is_shard(_relative(p, path))}
    if fs.isfile(path):
        if _suffix(path) not in FORMATS:
            raise InputError(f"{shown}: not a shard: use .parquet, .arrow, .feather or .ipc files")
        return posixpath.dirname(path), {path: _entry(fs.info(path))}
    raise InputError(f"{shown}: no such file or directory")


def _walk(fs, root: str, conditions: list[Condition] | None) -> dict[str, dict]:
    """Every file below root, listing only the folders that may hold matching shards (and none named _ or .)."""
    files, folders = {}, [root]
    while folders:
        folder = folders.pop()
        for name, is_folder, info in _entries(fs, folder):
            if not is_folder:
                files[name] = info
                continue
            relative = _relative(name, root)
            if not posixpath.basename(relative).startswith(("_", ".")) and (
                    not conditions or may_hold_matches(relative, conditions)):
                folders.append(name)
    return files


def _entries(fs, folder: str) -> Iterator[tuple[str, bool, dict | None]]:
    """(path, is a folder, listing info of a file) for each entry of one folder.

    Local folders are read with os.scandir, which gets sizes without fsspec's per-file info dicts: ten times
    faster, which is most of listing a million files.
    """
    if isinstance(fs, LocalFileSystem):
        with os.scandir(folder) as entries:
            for entry in entries:
                path = f"{folder.rstrip('/')}/{entry.name}"
                if entry.is_dir():
                    yield path, True, None
                else:
                    yield path, False, {"size": entry.stat().st_size}
        return
    for info in fs.ls(folder, detail=True):
        yield info["name"].rstrip("/"), info["type"] == "directory", info


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


def _whole_component_double_stars(pattern: str) -> str:
    """`lake/**.parquet` -> `lake/**/*.parquet`: fsspec only takes `**` as a whole path component."""
    return "/".join(re.sub(r"^\*\*([^*].*)$", r"**/*\1", part) for part in pattern.split("/"))


def _glob_base(pattern: str) -> str:
    parts = pattern.split("/")
    first_magic = next(i for i, part in enumerate(parts) if _has_magic(part))
    return "/".join(parts[:first_magic]) or ("/" if pattern.startswith("/") else "")


def _relative(path: str, base: str) -> str:
    if not base:
        return path
    return path[len(base):].lstrip("/") if path.startswith(base) else path


def _suffix(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def _is_shard(relative: str) -> bool:
    if any(part.startswith(("_", ".")) for part in relative.split("/")):
        return False
    return _suffix(relative) in FORMATS


# ----------------------------------------------------------------------------------------------------------------
# Footers


def inspect_shard(fs, shard: Shard) -> ShardInfo:
    """Row counts per group and the schema, from the footer; raises ShardReadError for an unreadable one."""
    try:
        if shard.format == "parquet":
            return _inspect_parquet(fs, shard)
        return _inspect_arrow(fs, shard)
    except READ_ERRORS as e:
        raise ShardReadError(shard, _describe(e)) from e


def inspect_shards(fs, shards: Sequence[Shard], threads: int = 16
                   ) -> tuple[list[ShardInfo], list[ShardReadError]]:
    """inspect_shard over many shards at once (footer reads are latency-bound on object stores).

    Both lists keep the shards' order; a corrupt shard only lands in the second.
    """
    # The files of a lake mostly share one schema: keep one copy of each, not one per file.
    schemas: dict[pa.Schema, pa.Schema] = {}

    def inspect(shard):
        try:
            info = inspect_shard(fs, shard)
        except ShardReadError as e:
            return e
        return replace(info, schema=schemas.setdefault(info.schema, info.schema))

    if isinstance(fs, LocalFileSystem):  # CPU-bound here, not latency-bound: a pool only adds its overhead
        results = [inspect(shard) for shard in shards]
    else:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as pool:
            results = list(pool.map(inspect, shards))
    return ([r for r in results if isinstance(r, ShardInfo)],
            [r for r in results if isinstance(r, ShardReadError)])


def _inspect_parquet(fs, shard: Shard) -> ShardInfo:
    with _open(fs, shard.path) as f:
        identity = _identity(shard, _parquet_footer(f) if shard.version is None else b"")
        f.seek(0)
        parquet = pq.ParquetFile(f)
        metadata = parquet.metadata
        group_rows = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
        schema = parquet.schema_arrow
    if sum(group_rows) != metadata.num_rows:
        raise ValueError(f"corrupt footer: its row groups hold {sum(group_rows)} rows, its total says "
                         f"{metadata.num_rows}")
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


def _parquet_footer(f) -> bytes:
    """The raw footer: file metadata (thrift), then its length (int32) and "PAR1"."""
    size = f.seek(0, 2)
    if size < 12:
        raise ValueError(f"not a Parquet file: {size} bytes")
    f.seek(size - 8)
    tail = f.read(8)
    if tail[4:] != b"PAR1":
        raise ValueError("not a Parquet file: no PAR1 at its end")
    length = int.from_bytes(tail[:4], "little")
    if length > size - 12:
        raise ValueError(f"corrupt Parquet footer length {length}")
    f.seek(size - 8 - length)
    return f.read(length)


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
        headers = fs.cat_ranges([shard.path] * len(blocks), [offset for offset, _ in blocks],
                                [offset + length for offset, length in blocks], on_error="raise")
        return tuple(_message_rows(header) for header in headers), footer + b"".join(headers)
    except (struct.error, IndexError) as e:
        raise ValueError(f"corrupt IPC footer or batch header ({e})") from None


def _footer_blocks(footer: bytes) -> list[tuple[int, int]]:
    """(offset, metadata length) of each record batch, from the Footer table (File.fbs)."""
    table = _FlatTable(footer, _u32(footer, 0))
    start, count = table.vector(3)  # Footer.recordBatches: [Block]
    # struct Block { offset: long; metaDataLength: int; (4 bytes padding) bodyLength: long; } = 24 bytes
    return [(struct.unpack_from("<q", footer, start + 24 * i)[0],
             struct.unpack_from("<i", footer, start + 24 * i + 8)[0]) for i in range(count)]


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


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:500]


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
            raise InputError(f"{relative}: column '{column}' collides with the output column of that name "
                             f"(outputs add {', '.join(OUTPUT_COLUMNS)}); rename it in the input")


# ----------------------------------------------------------------------------------------------------------------
# Work units


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


def known_units(fs, shard: Shard, records: Sequence[dict]) -> list[WorkUnit] | None:
    """The units an earlier run planned for this file (commit.py's unit records), if the file is unchanged.

    Unchanged means the same identity, read without parsing the footer (the store's version, or the raw
    footer's hash): a rerun over a million unchanged files then reads no schema and no row-group list.
    None for a changed file, or an Arrow one (whose identity needs its batch headers).
    """
    if shard.version is not None:
        identity = _identity(shard, b"")
    elif shard.format == "parquet":
        try:
            with _open(fs, shard.path) as f:
                identity = _identity(shard, _parquet_footer(f))
        except READ_ERRORS:
            return None
    else:
        return None
    if any(r["input_identity"] != identity for r in records):
        return None
    return [WorkUnit(shard, r["start"], r["stop"], r["num_rows"], r["whole_file"], r["id"], r["output"], identity)
            for r in records]


def _unit(info: ShardInfo, start: int, stop: int, rows: int) -> WorkUnit:
    relative = info.shard.relative
    whole = start == 0 and stop == len(info.group_rows)
    stem = posixpath.splitext(relative)[0]
    output = f"{stem}.parquet" if whole else f"{stem}.rg{start:05d}-{stop:05d}.parquet"
    # the input's identity is part of the id: a rewritten file's units are new units, summarized again
    unit_id = hashlib.sha256(f"{relative}:{start}:{stop}:{info.identity}".encode()).hexdigest()[:24]
    return WorkUnit(info.shard, start, stop, rows, whole, unit_id, output, info.identity)


def _check_output_names(units: list[WorkUnit]) -> None:
    seen: dict[str, WorkUnit] = {}
    for unit in units:
        other = seen.setdefault(unit.output_relative, unit)
        if other is not unit:
            raise InputError(f"{other.shard.relative} and {unit.shard.relative} would both be written to "
                             f"{unit.output_relative}; keep only one of them in the input")


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
        raise ShardReadError(unit.shard, _describe(e)) from e


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
            raise ValueError(f"an Arrow stream file is one group, but the unit asks for groups "
                             f"{unit.start}-{unit.stop}") from None
        f.seek(0)
        for batch in ipc.open_stream(f):
            yield batch.select(columns) if columns is not None else batch
        return
    if columns is not None:
        # read only the columns asked for: IPC bodies are laid out per column
        names = reader.schema.names
        reader = ipc.open_file(f, options=ipc.IpcReadOptions(
            included_fields=sorted({names.index(c) for c in columns})))
    for index in range(unit.start, unit.stop):
        batch = reader.get_batch(index)
        yield batch.select(columns) if columns is not None else batch
