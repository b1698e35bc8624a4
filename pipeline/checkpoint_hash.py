"""The content hash of a checkpoint's files: the model's identity in the manifest (driver.model_fingerprint).

Content, not file times (issue 12): a fresh download or copy of the same bytes is the same model, and a checkpoint
rewritten in place with new weights is another. Reading every byte costs about a second per GB on every run (mt5-xl
is 15 GB), so the hash is kept in a small JSON file in the user's cache directory ($LAKESUM_CACHE, else
$XDG_CACHE_HOME/lakesum, else ~/.cache/lakesum), keyed by the stat of every file it covers: name, size, mtime_ns,
ctime_ns, inode and device. Any write to a file changes its ctime, and a new copy is another inode, so a cached hash
is used only for the files exactly as they were when hashed.

One race is closed apart. A filesystem stamps times with a coarse clock (a kernel tick, milliseconds), so a file
rewritten with its size unchanged within the tick of the stat taken when it was hashed would keep that stat. A hash
is therefore cached only when every file last changed STAT_SETTLE_NS before hashing began (git's rule for "racily
clean" files, as the listing has it for input files: pipeline/listing.py): a checkpoint written just before a run is
hashed again by the next one, and cached then.

The cache only saves reading: a cache that cannot be read, is corrupt or cannot be written means hashing again, never
an error. It is written atomically (model/storage.py atomic_path) and holds the MAX_ENTRIES directories hashed last;
runs writing it at once may drop each other's entry, which costs a hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from model.storage import atomic_path

from .listing import STAT_SETTLE_NS

# The checkpoint files the hash covers: config.json and generation_config.json, the weights, spiece.model.
SUFFIXES = (".json", ".safetensors", ".model")
CACHE_NAME = "model-hashes.json"
MAX_ENTRIES = 64
VERSION = 1

log = logging.getLogger(__name__)


def checkpoint_hash(directory: Path) -> str:
    """32 hex digits of SHA-256 over the checkpoint's files (SUFFIXES) in name order, each as its name and size, then
    its bytes: the manifest's model_hash. Read from the cache when no file has changed since it was hashed."""
    directory = Path(directory).resolve()
    started = time.time_ns()
    files = _stat(directory)
    cache = _cache_path()
    entries = _read(cache)
    entry = entries.get(str(directory))
    if isinstance(entry, dict) and entry.get("files") == files and _is_hash(entry.get("hash")):
        return entry["hash"]
    digest = _digest(directory, files)
    settled = started - STAT_SETTLE_NS
    if _stat(directory) == files and all(max(mtime, ctime) < settled for _, _, mtime, ctime, _, _ in files):
        entries.pop(str(directory), None)  # written last, so pruned last
        entries[str(directory)] = {"files": files, "hash": digest}
        _write(cache, dict(list(entries.items())[-MAX_ENTRIES:]))
    return digest


def _stat(directory: Path) -> list[list]:
    """[name, size, mtime_ns, ctime_ns, inode, device] of each file the hash covers, in the order it reads them (a
    link is its target's: the hub's cache links a snapshot's files to its blobs)."""
    files = []
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix in SUFFIXES:
            stat = path.stat()
            files.append([path.name, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev])
    return files


def _digest(directory: Path, files: list[list]) -> str:
    digest = hashlib.sha256()
    for name, size, *_ in files:
        digest.update(f"{name}:{size}\n".encode())
        with open(directory / name, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:32]


def _is_hash(value) -> bool:
    return isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def _cache_path() -> Path:
    root = os.environ.get("LAKESUM_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        root = os.path.join(xdg if os.path.isabs(xdg) else "~/.cache", "lakesum")  # XDG: a relative path is ignored
    return Path(root).expanduser() / CACHE_NAME


def _read(cache: Path) -> dict:
    """The cache's entries, {} where there is no readable cache of this VERSION."""
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # missing, unreadable, not UTF-8, not JSON
        if not isinstance(err, FileNotFoundError):
            log.info("ignoring the model hash cache %s: %s", cache, err)
        return {}
    entries = data.get("entries") if isinstance(data, dict) and data.get("version") == VERSION else None
    return entries if isinstance(entries, dict) else {}


def _write(cache: Path, entries: dict) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as temporary:
            temporary.write_text(json.dumps({"version": VERSION, "entries": entries}), encoding="utf-8")
    except OSError as err:  # a read-only home, a full disk: the next run hashes again
        log.info("could not write the model hash cache %s: %s", cache, err)
