"""Shared fixtures for the pipeline tests: a local Ray, an S3 bucket on loopback, and shard writers."""
from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

SECRET = "hunter2-do-not-log"


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for the module's tests, two CPUs as on this project's machines."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """A fresh bucket: (s3fs filesystem, bucket name, storage_options)."""
    import s3fs

    # keep botocore away from any real AWS configuration on this machine
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    # the region comes from the environment: given in client_kwargs, s3fs would send it as a LocationConstraint,
    # which S3 (and moto) reject for us-east-1
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    options = {"key": "lakesum-test", "secret": SECRET, "client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**options)
    bucket = f"lakesum-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    return fs, bucket, options


@pytest.fixture
def memory_root():
    """A fresh folder in fsspec's in-memory filesystem, removed afterwards."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/lakesum-test-{uuid.uuid4().hex}"
    yield root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def documents(start: int, count: int, **extra) -> pa.Table:
    """`count` rows of (id, text, lang) with ids start..start+count-1, plus any extra columns."""
    ids = list(range(start, start + count))
    columns = {"id": pa.array(ids, pa.int64()), "text": pa.array([f"document {i}" for i in ids]),
               "lang": pa.array(["en" if i % 2 else "hi" for i in ids])}
    columns.update(extra)
    return pa.table(columns)


def write_parquet(fs, path: str, table: pa.Table, row_group_size: int | None = None) -> None:
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, row_group_size=row_group_size)


def write_arrow(fs, path: str, table: pa.Table, batch_rows: int, *, stream: bool = False,
                compression: str | None = None) -> None:
    options = ipc.IpcWriteOptions(compression=compression)
    with fs.open(path, "wb") as f:
        writer = (ipc.new_stream if stream else ipc.new_file)(f, table.schema, options=options)
        with writer:
            for batch in table.to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)


def write_feather(fs, path: str, table: pa.Table, chunk_rows: int) -> None:
    with fs.open(path, "wb") as f:
        feather.write_feather(table, f, chunksize=chunk_rows)  # Feather v2 = Arrow IPC file, lz4 by default
