"""Fixtures for the pipeline tests: a local Ray, an S3 bucket on loopback, an in-memory folder. Plain helpers
(shard writers, the Ray head of the cluster tests) are in helpers.py."""

from __future__ import annotations

import os
import uuid

import pytest

from tests.pipeline.helpers import SECRET, local_ray


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray shared by the module's tests (starting one takes seconds)."""
    with local_ray() as ray:
        yield ray


@pytest.fixture
def ray_per_test():
    """A local Ray for one test, for modules whose other tests start a Ray of their own (a cluster, workers that
    inject faults, a `ray start --head`): a process joins one Ray at a time, and an idle one would take CPUs."""
    with local_ray() as ray:
        yield ray


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
def s3_then_ray(s3):
    """The bucket first, then Ray: Ray's workers inherit the S3 environment the `s3` fixture sets."""
    with local_ray():
        yield s3


@pytest.fixture
def memory_root():
    """A fresh folder in fsspec's in-memory filesystem, removed afterwards."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/lakesum-test-{uuid.uuid4().hex}"
    yield root
    if fs.exists(root):
        fs.rm(root, recursive=True)
