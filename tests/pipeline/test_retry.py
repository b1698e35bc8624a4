"""Transient storage errors: which errors are retried, the backoff, a read resumed and a write replayed."""

from __future__ import annotations

import errno
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from pipeline.footers import ShardReadError
from pipeline.listing import Shard
from pipeline.retry import Backoff, Replayable, is_transient, read_resuming, with_retries
from pipeline.units import WorkUnit

FAST = Backoff(tries=3, first=0.001, most=0.001)


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )


def _translated(code: str, status: int) -> OSError:
    """What s3fs raises after its own retries: botocore's error translated, with it as the cause."""
    from s3fs.errors import translate_boto_error

    return translate_boto_error(_client_error(code, status))


def _wrapped(error: BaseException) -> ShardReadError:
    """As read_unit raises it: ShardReadError from the storage's error."""
    shard = Shard("lake/part-0.parquet", "part-0.parquet", "parquet", 1)
    try:
        raise ShardReadError(shard, str(error)) from error
    except ShardReadError as wrapped:
        return wrapped


@pytest.mark.parametrize(
    "error",
    [
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        BrokenPipeError(errno.EPIPE, "Broken pipe"),
        TimeoutError("read timed out"),
        OSError(errno.ETIMEDOUT, "Connection timed out"),
        _translated("SlowDown", 503),  # throttling
        _translated("InternalError", 500),
        _translated("SomethingNew", 502),  # a code s3fs does not know: EIO, with the 502 in its cause
        _client_error("RequestLimitExceeded", 429),
    ],
    ids=lambda e: type(e).__name__ + ":" + str(getattr(e, "errno", "")),
)
def test_transient_storage_errors_are_retried_even_inside_a_shard_read_error(error):
    assert is_transient(error)
    assert is_transient(_wrapped(error))


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError(errno.ENOENT, "No such file"),
        PermissionError(errno.EACCES, "Permission denied"),
        _translated("NoSuchKey", 404),
        _translated("AccessDenied", 403),
        _translated("SomethingNew", 400),
        OSError(errno.EIO, "Input/output error"),  # a failing local disk
        pa.ArrowInvalid("Parquet magic bytes not found in footer"),  # corrupt data
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        RuntimeError("a bug"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_lasting_errors_are_not_retried(error):
    assert not is_transient(error)
    assert not is_transient(_wrapped(error))


def test_a_lasting_error_raised_while_handling_a_transient_one_is_not_retried():
    try:
        try:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        except ConnectionResetError:
            raise FileNotFoundError(errno.ENOENT, "gone meanwhile")  # noqa: B904 (the implicit chain is the case)
    except FileNotFoundError as error:
        assert not is_transient(error)


def test_with_retries_waits_out_transient_errors_and_counts_them():
    calls, retried = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        return "done"

    assert with_retries(flaky, backoff=FAST, on_retry=retried.append) == "done"
    assert len(calls) == 3 and [type(e) for e in retried] == [ConnectionResetError] * 2


def test_with_retries_raises_a_lasting_error_at_once_and_a_transient_one_after_the_last_try():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError(errno.ENOENT, "No such file")

    with pytest.raises(FileNotFoundError):
        with_retries(missing, backoff=FAST)
    assert len(calls) == 1

    def always_reset():
        calls.append(1)
        raise ConnectionResetError(errno.ECONNRESET, "reset")

    calls.clear()
    with pytest.raises(ConnectionResetError):
        with_retries(always_reset, backoff=FAST)
    assert len(calls) == FAST.tries


def test_backoff_doubles_up_to_its_ceiling_with_jitter():
    backoff = Backoff(tries=8, first=1.0, most=30.0)
    random.seed(0)
    for retry, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (7, 30.0)]:
        assert ceiling / 2 <= backoff.wait(retry) <= ceiling


class _DropsOnce(LocalFileSystem):
    """Local files whose first read of byte `offset` fails with a reset connection, as a dropped stream does."""

    def __init__(self, offset: int):
        super().__init__(skip_instance_cache=True)
        self.offset, self.dropped = offset, False

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode=mode, **kwargs)
        read = f.read

        def dropping(length=-1):
            start = f.tell()
            if not self.dropped and start <= self.offset and (length < 0 or self.offset < start + length):
                self.dropped = True
                raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
            return read(length)

        f.read = dropping
        return f


def test_a_read_dropped_mid_unit_resumes_after_the_rows_already_handed_on(tmp_path):
    rng = random.Random(5)
    rows = 6000
    # incompressible text, so that each row group is larger than the footer read (the file's last 64 KiB)
    table = pa.table({"id": list(range(rows)), "text": [f"{rng.getrandbits(400):0100x}" for _ in range(rows)]})
    path = tmp_path / "part-0.parquet"
    pq.write_table(table, path, row_group_size=2000)
    second_group = pq.ParquetFile(path).metadata.row_group(1).column(0)
    fs = _DropsOnce(second_group.dictionary_page_offset or second_group.data_page_offset)
    shard = Shard(str(path), "part-0.parquet", "parquet", path.stat().st_size)
    unit = WorkUnit(shard, 0, 3, rows, True, "part-0", "part-0.parquet")
    retried = []

    batches, dropped_before = [], []
    for batch in read_resuming(fs, unit, on_retry=retried.append, backoff=FAST):
        dropped_before.append(fs.dropped)
        batches.append(batch)
    out = pa.Table.from_batches(batches)

    assert dropped_before[0] is False and dropped_before[-1] is True  # dropped mid-unit, after rows were handed on
    assert len(retried) == 1 and is_transient(retried[0])
    assert out.column("id").to_pylist() == list(range(rows))  # every row once, in order


def test_a_read_that_keeps_failing_without_progress_gives_up(tmp_path):
    path = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"id": [1, 2]}), path)
    shard = Shard(str(path), "part-0.parquet", "parquet", path.stat().st_size)
    unit = WorkUnit(shard, 0, 1, 2, True, "part-0", "part-0.parquet")

    class Unreachable(LocalFileSystem):
        def _open(self, path, mode="rb", **kwargs):
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    retried = []
    with pytest.raises(ShardReadError):
        list(read_resuming(Unreachable(skip_instance_cache=True), unit, on_retry=retried.append, backoff=FAST))
    assert len(retried) == FAST.tries - 1


def test_replayable_gives_a_failed_write_the_same_batches_without_pulling_its_source_again():
    pulled = []

    def source():
        for i in range(3):
            pulled.append(i)
            yield pa.record_batch({"id": [i]})

    out = Replayable(source())
    first = iter(out)
    assert next(first).column(0).to_pylist() == [0]  # a write that failed after one batch
    assert [b.column(0)[0].as_py() for b in out] == [0, 1, 2]  # the retry: the kept batch, then the rest
    assert pulled == [0, 1, 2] and out.intact


def test_replayable_is_not_intact_once_its_source_failed():
    def source():
        yield pa.record_batch({"id": [0]})
        raise ConnectionResetError(errno.ECONNRESET, "reset while reading the input")

    out = Replayable(source())
    with pytest.raises(ConnectionResetError):
        list(out)
    assert not out.intact
