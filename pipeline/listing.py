"""Inputs -> shards: the Parquet and Arrow IPC files an input names, listed once.

A shard is one file of the input. The listing gives its size and, where the store has one, its version;
locally, a stat that lets a rerun know an unchanged file without reading it (see Shard.stat).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from model.storage import open_filesystem, redact_url, scrub, url_secrets

from .errors import InputError
from .partitions import Condition, matches, may_hold_matches

FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow"}


@dataclass(frozen=True, slots=True)  # slots: a lake can list a million of these
class Shard:
    path: str  # the path as the filesystem wants it (no protocol): "bucket/lake/date=2026-11-01/part-0.parquet"
    relative: str  # "/"-separated, relative to the input root: "date=2026-11-01/part-0.parquet"
    format: str  # "parquet" or "arrow" (Arrow IPC file format; the streaming format is read as one group)
    size: int  # bytes
    # The store's version of the object when its listing gives one (S3 ETag, GCS generation, Azure etag):
    # it changes whenever the object is rewritten.
    version: str | None = None
    # Local files: a hash of size, mtime, ctime and inode, as git's index keeps them. An equal stat lets a
    # rerun reuse the identity it recorded instead of hashing the footer again; None when the file changed
    # too recently for its stat to tell (a change within the same clock tick would keep it), or on stores
    # that give no stat. (A hash of ints is the same in every process and an int is a third of the string.)
    stat: int | None = None


def list_shards(
    inputs: str | Sequence[str], storage_options: dict | None = None, conditions: list[Condition] | None = None
) -> tuple[fsspec.AbstractFileSystem, list[Shard]]:
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
    fs, _ = open_filesystem(urls[0], storage_options, error=InputError)
    found: dict[str, tuple[int, str | None, int | None]] = {}  # path -> (size, store version, stat)
    bases: list[str] = []
    for url in urls:
        other, path = open_filesystem(url, storage_options, error=InputError)
        if type(other) is not type(fs):
            raise InputError(
                f"inputs must be on one filesystem: {redact_url(url)} is not on the same one as {redact_url(urls[0])}"
            )
        try:
            base, files = _expand(fs, path, redact_url(url), conditions)
        except OSError as e:
            raise InputError(
                f"cannot list {redact_url(url)}: {type(e).__name__}: {scrub(str(e), url_secrets(url))}"
            ) from None
        if not files and not conditions:
            raise InputError(
                f"{redact_url(url)}: no .parquet, .arrow, .feather or .ipc files found "
                "(names starting with _ or . are skipped)"
            )
        bases.append(base)
        if found:
            found.update(files)
        else:
            found = files  # one input: no copy of a million entries
    root = bases[0] if len(bases) == 1 else posixpath.commonpath(bases)
    if conditions:
        found = {p: entry for p, entry in found.items() if matches(_relative(p, root), conditions)}
    return fs, [
        Shard(path, _relative(path, root), FORMATS[file_suffix(path)], size, version, stat)
        for path, (size, version, stat) in sorted(found.items())
    ]


# Listing fields that name an object's version, by store: s3fs (ETag; VersionId in versioned buckets),
# gcsfs (generation), adlfs (etag). Local and memory filesystems have none: their files are identified by
# their footers.
_VERSION_FIELDS = ("VersionId", "ETag", "generation", "etag")
# Filesystems stamp times at a coarse tick (jiffies on Linux, 2 s on FAT): a file changed within this much
# of its listing may change again with the same stat, so its footer is hashed.
STAT_SETTLE_NS = 2_000_000_000


def _entry(info: dict) -> tuple[int, str | None, int | None]:
    """(size, store version, local stat) from a listing entry."""
    for name in _VERSION_FIELDS:
        if info.get(name):
            return info["size"], f"{name}:{str(info[name]).strip(chr(34))}", None  # S3 quotes its ETags
    return info["size"], None, info.get("stat")


def _expand(
    fs, path: str, shown: str, conditions: list[Condition] | None = None
) -> tuple[str, dict[str, tuple[int, str | None, int | None]]]:
    """One input's base directory and its shard files (path -> (size, store version, stat))."""
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
        return path, _walk(fs, path, conditions)
    if fs.isfile(path):
        if file_suffix(path) not in FORMATS:
            raise InputError(f"{shown}: not a shard: use .parquet, .arrow, .feather or .ipc files")
        return posixpath.dirname(path), {path: _entry(fs.info(path))}
    raise InputError(f"{shown}: no such file or directory")


def _walk(fs, root: str, conditions: list[Condition] | None) -> dict[str, tuple[int, str | None, int | None]]:
    """Every shard file below root (path -> (size, store version, stat)), listing only the folders that may hold
    matching shards; none named _ or ., as _is_shard has it."""
    files, folders = {}, [root]
    while folders:
        folder = folders.pop()
        for name, is_folder, entry in _entries(fs, folder):
            if posixpath.basename(name).startswith(("_", ".")):
                continue
            if not is_folder:
                if file_suffix(name) in FORMATS:
                    files[name] = entry
            elif not conditions or may_hold_matches(_relative(name, root), conditions):
                folders.append(name)
    return files


def _entries(fs, folder: str) -> Iterator[tuple[str, bool, tuple[int, str | None, int | None] | None]]:
    """(path, is a folder, (size, store version, stat) of a file) for each entry of one folder.

    Local folders are read with os.scandir, which gets sizes without fsspec's per-file info dicts: ten times
    faster, which is most of listing a million files.
    """
    if isinstance(fs, LocalFileSystem):
        # a stat is trusted only if the file's last change is older than the clock tick of this listing
        settled = time.time_ns() - STAT_SETTLE_NS
        prefix = folder.rstrip("/") + "/"
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir():
                    yield prefix + entry.name, True, None
                    continue
                st = entry.stat()
                stat = _stat_hash(st) if max(st.st_mtime_ns, st.st_ctime_ns) < settled else None
                yield prefix + entry.name, False, (st.st_size, None, stat)
        return
    for info in fs.ls(folder, detail=True):
        is_folder = info["type"] == "directory"
        yield info["name"].rstrip("/"), is_folder, None if is_folder else _entry(info)


def _stat_hash(st: os.stat_result) -> int:
    """A settled stat as one int, the same in every Python: it is kept in commit markers from run to run."""
    packed = struct.pack("<4Q", st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little", signed=True)


def listed_identity(shard: Shard) -> str | None:
    """What the listing alone says of the file's identity: size plus the store's version, or locally size plus a
    settled stat (Shard.stat); None where it says nothing trustworthy (a file changed too recently, a store
    without versions), and the footer must be read."""
    if shard.version is not None:
        return f"{shard.size}:{shard.version}"  # as footers._identity has it: the same file, the same id
    if shard.stat is not None:
        return f"{shard.size}:stat:{shard.stat}"
    return None


def unchanged_since_listed(fs, shard: Shard) -> bool:
    """Whether the file is still the one the listing saw: the same size and store version, or locally the same
    stat. Only for shards whose listing gave one of those (listed_identity is not None). A local rewrite, in
    place or by rename, changes the modification or change time or the inode; the listing trusted only stats
    older than the clock's tick, so one within that tick cannot keep the stat."""
    if isinstance(fs, LocalFileSystem):
        st = os.stat(shard.path)
        return st.st_size == shard.size and _stat_hash(st) == shard.stat
    fs.invalidate_cache(shard.path)
    size, version, _ = _entry(fs.info(shard.path))
    return size == shard.size and version == shard.version


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
    return path[len(base) :].lstrip("/") if path.startswith(base) else path


def file_suffix(path: str) -> str:
    """posixpath.splitext(path)[1].lower(), without its cost a file (a lake lists a million)."""
    name = path[path.rfind("/") + 1 :]
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 and name[:dot].lstrip(".") else ""


def _is_shard(relative: str) -> bool:
    if any(part.startswith(("_", ".")) for part in relative.split("/")):
        return False
    return file_suffix(relative) in FORMATS
