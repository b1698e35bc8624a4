"""Where bytes live: filesystems opened from URLs, URLs kept free of credentials in messages, atomic writes.

The one place that the model's checkpoint sources and the pipeline's inputs, outputs and lease open
storage and publish files. URLs may carry user:password@ or a presigned query string: every message shows
them redacted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

# A file being written beside its target: the dot keeps Spark, DuckDB and pyarrow from reading it, and
# no glob for *.json or *.safetensors matches it.
PARTIAL_SUFFIX = ".partial"


def url_secrets(url: str) -> list[str]:
    """The parts of a URL that may hold credentials: user:password@ and the query string (presigned URLs)."""
    secrets = []
    for part in url.split("::"):  # fsspec chains URLs: simplecache::s3://bucket/path
        split = urlsplit(part)
        if "@" in split.netloc:
            secrets.append(split.netloc.rsplit("@", 1)[0])
        if split.query:
            secrets.append(split.query)
    return secrets


def scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def redact_url(url: str) -> str:
    """The URL as it may appear in logs and errors."""
    return scrub(url, url_secrets(url))


def open_filesystem(
    url: str | Sequence[str], storage_options: dict | None, *, error: type[Exception]
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of `url` (local path, memory://, s3://, ...) and the path on it, without protocol.

    Given a list of URLs, the first one's. Credentials come from `storage_options` or the environment,
    as fsspec does it; they never appear in a message. An unknown protocol raises `error`.
    """
    if not isinstance(url, str):
        url = list(url)[0]
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as e:
        # an unknown protocol, or one whose package is missing: fsspec's message names the package
        raise error(f"cannot open {redact_url(url)}: {scrub(str(e), url_secrets(url))}") from None
    return fs, path.rstrip("/") or "/"


def is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def partial_path(target: str) -> str:
    """A fresh temporary name beside `target` (see PARTIAL_SUFFIX)."""
    folder, name = posixpath.split(str(target))
    return posixpath.join(folder, f".{name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A local temporary path beside `target`; once the block succeeds, the file is synced to the device and
    renamed onto target, so a reader sees the old file or the whole new one even across a kill or a power
    loss. The temporary file is removed in any case."""
    temporary = Path(partial_path(str(target)))
    try:
        yield temporary
        sync_file(temporary)
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def write_atomically(fs, path: str, chunks: Iterable[bytes]) -> None:
    """Publish a small file whole or not at all: locally through atomic_path, elsewhere as one PUT (an object
    appears only when its upload completes)."""
    if not is_local(fs):
        fs.pipe_file(path, b"".join(chunks))
        return
    os.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    with atomic_path(path) as temporary, open(temporary, "wb") as f:
        for chunk in chunks:
            f.write(chunk)


def write_aside(target: str, data: bytes) -> str:
    """Local: `data` in a fresh temporary file beside target, synced to the device; its path. For a caller
    that publishes it otherwise than by rename (a hard link creates a name only if it is free)."""
    temporary = partial_path(target)
    with open(temporary, "wb") as f:
        f.write(data)
    sync_file(temporary)
    return temporary


def sync_file(path: str | os.PathLike) -> None:
    """Flush a local file's bytes, or a folder's entries, to the device: a rename is durable only after both."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        # Some network and FUSE file systems cannot sync a folder; their renames are still atomic.
        if not (os.path.isdir(path) and err.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)
