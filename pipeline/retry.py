"""Transient storage errors, told apart from lasting ones, and retried with exponential backoff.

A reset connection, a timeout, an object store's throttling (S3 SlowDown, HTTP 429) or its 5xx pass on their
own: the replica waits and tries the same read or write again. A missing file, a refused permission or corrupt
data do not, and fail the unit at once. The caller counts the retries, and the run reports them.

A unit is read and written as a stream, so a retry never summarizes a row twice: `read_resuming` reopens the
input and resumes after the rows already handed on, and `Replayable` keeps the output so that a failed write
starts over from it.
"""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pyarrow as pa

from .units import WorkUnit, read_unit

T = TypeVar("T")

# errno values of failures that pass: the network's, and those s3fs gives throttling (SlowDown and 503 become
# EBUSY) and S3's InternalError (EREMOTEIO). Plain EIO is not among them: on a local disk it is a failing device.
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EAGAIN",
        "EBUSY",
        "ETIMEDOUT",
        "ECONNRESET",
        "ECONNABORTED",
        "ECONNREFUSED",
        "EPIPE",
        "ENETDOWN",
        "ENETUNREACH",
        "ENETRESET",
        "EHOSTUNREACH",
        "EHOSTDOWN",
        "EREMOTEIO",
    )
    if hasattr(errno, name)
)
# HTTP statuses of the same: request timeout, throttling, and the server's own errors.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Backoff:
    """How often to try and how long to wait: `first` seconds before the second try, doubled each time up to
    `most`, each wait drawn between half and all of that (so that replicas retrying at once spread out).
    The defaults try 6 times over about half a minute, longer than an object store's usual throttling."""

    tries: int = 6
    first: float = 1.0
    most: float = 30.0

    def wait(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1 for the second try)."""
        ceiling = min(self.most, self.first * 2 ** (retry - 1))
        return random.uniform(ceiling / 2, ceiling)


def with_retries(
    call: Callable[[], T],
    *,
    backoff: Backoff = Backoff(),
    retry_if: Callable[[BaseException], bool] | None = None,
    on_retry: Callable[[BaseException], None] = lambda error: None,
) -> T:
    """call(), tried again after a transient error (`retry_if`, by default `is_transient`) until it succeeds
    or `backoff.tries` are spent; then, or on any other error, that error is raised."""
    retry_if = retry_if or is_transient
    for retry in range(1, backoff.tries + 1):
        try:
            return call()
        except Exception as error:
            if retry == backoff.tries or not retry_if(error):
                raise
            on_retry(error)
            time.sleep(backoff.wait(retry))
    raise AssertionError("unreachable")


def is_transient(error: BaseException) -> bool:
    """Whether `error` is a storage failure that passes on its own.

    Wrappers (ShardReadError, an OSError without an errno) say nothing themselves, so the chain of causes is
    followed to the first error that does: a lasting one (FileNotFoundError, PermissionError, corrupt data)
    stops the search, so a retry never hides it.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        verdict = _verdict(error)
        if verdict is not None:
            return verdict
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return False


def _verdict(error: BaseException) -> bool | None:
    """True: transient; False: lasting; None: it does not say (look at its cause)."""
    if isinstance(error, (ConnectionError, TimeoutError)):  # resets, refusals, broken pipes; socket and fsspec timeouts
        return True
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(error, OSError):
        if error.errno in TRANSIENT_ERRNOS:
            return True
        # s3fs wraps an S3 error code it does not know as EIO, with botocore's error (and its HTTP status) as cause
        return None if error.errno in (None, errno.EIO) else False
    if isinstance(error, (ValueError, EOFError, LookupError, TypeError)):  # corrupt data (ArrowInvalid), bugs
        return False
    status = _http_status(error)
    if status is not None:
        return status in TRANSIENT_STATUSES
    if isinstance(error, _transport_errors()):
        return True
    return None


def _http_status(error: BaseException) -> int | None:
    """The HTTP status an object store's client attached to its error: botocore's ClientError keeps the response,
    aiohttp's ClientResponseError a `status`, gcsfs's HttpError a `code`."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status if isinstance(status, int) else None
    for name in ("status", "code"):
        value = getattr(error, name, None)
        if isinstance(value, int) and 100 <= value <= 599:
            return value
    return None


_TRANSPORT: tuple[type, ...] | None = None


def _transport_errors() -> tuple[type, ...]:
    """Connection failures of the object stores' HTTP clients that are not OSErrors: botocore's (endpoint
    unreachable, connection closed, read timeout) and aiohttp's. Only those of installed libraries."""
    global _TRANSPORT
    if _TRANSPORT is None:
        import http.client

        found: list[type] = [http.client.IncompleteRead]
        try:
            from botocore.exceptions import HTTPClientError

            found.append(HTTPClientError)
        except ImportError:
            pass
        try:
            from aiohttp import ClientConnectionError, ClientPayloadError

            found += [ClientConnectionError, ClientPayloadError]
        except ImportError:
            pass
        _TRANSPORT = tuple(found)
    return _TRANSPORT


# --- a unit's read and write ---------------------------------------------------------------------------


def read_resuming(
    fs, unit: WorkUnit, *, on_retry: Callable[[BaseException], None], backoff: Backoff = Backoff()
) -> Iterator[pa.RecordBatch]:
    """read_unit, reopened after a transient storage error and resumed at the first row not yet handed on.

    The rows before it are read again and dropped, so nothing is summarized twice. `backoff.tries` bounds the
    tries in a row without a new row in between; a lasting error, or one more transient error, is raised.
    """
    passed = 0  # rows handed on
    tries = 0
    while True:
        seen = 0  # rows of this read so far
        progressed = False
        try:
            for batch in read_unit(fs, unit):
                skip = min(max(passed - seen, 0), batch.num_rows)
                seen += batch.num_rows
                if skip == batch.num_rows and batch.num_rows:
                    continue
                batch = batch.slice(skip) if skip else batch
                passed += batch.num_rows
                progressed = progressed or batch.num_rows > 0
                yield batch
            return
        except Exception as error:
            tries = 1 if progressed else tries + 1
            if tries >= backoff.tries or not is_transient(error):
                raise
            on_retry(error)
            time.sleep(backoff.wait(tries))


class Replayable:
    """The summarizer's output batches, kept as they pass, so that a write failed on a transient storage error
    starts over from them instead of summarizing the unit again.

    It holds a unit's output until the unit commits: about what the Parquet writer buffers anyway (a row group
    of up to 64k rows) for units of the default 20,000 rows.
    """

    def __init__(self, batches: Iterable[pa.RecordBatch]):
        self._source = iter(batches)
        self._kept: list[pa.RecordBatch] = []
        self.intact = True  # False once the source itself failed (its input did): there is nothing to replay

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        yield from list(self._kept)
        while True:
            try:
                batch = next(self._source)
            except StopIteration:
                return
            except BaseException:
                self.intact = False
                raise
            self._kept.append(batch)
            yield batch
