"""Prometheus metrics are emitted during a run and can be scraped from Ray's metrics endpoint."""

from __future__ import annotations

import time
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.driver import run
from pipeline.settings import SummarizeSettings
from synthetic.corpus import documents
from tests.pipeline.helpers import free_port, local_ray


@pytest.fixture
def ray_with_metrics():
    port = free_port()
    with local_ray(_metrics_export_port=port, _system_config={"metrics_report_interval_ms": 1000}):
        yield port


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


@pytest.mark.slow
def test_documents_and_tokens_are_scraped_from_rays_metrics_endpoint(ray_with_metrics, tiny_checkpoint, tmp_path):
    docs = documents(20, seed=4)
    docs[0]["text"] = ""
    pq.write_table(pa.Table.from_pylist(docs), tmp_path / "part-0.parquet")
    settings = SummarizeSettings(model=str(tiny_checkpoint), num_beams=1, max_new_tokens=4, batch_size=8)
    assert run(settings, str(tmp_path / "part-0.parquet"), str(tmp_path / "out"), replicas=1).success

    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = scrape(ray_with_metrics)
        if "lakesum_documents_total{" in text and "lakesum_accelerator_memory_bytes{" in text:
            break
        time.sleep(1)
    lines = [line for line in text.splitlines() if line.startswith("ray_lakesum_")]
    documents_total = [line for line in lines if line.startswith("ray_lakesum_documents_total{")]
    summarized = [line for line in documents_total if 'outcome="summarized"' in line]
    empty = [line for line in documents_total if 'outcome="empty"' in line]
    assert summarized and float(summarized[0].rsplit(" ", 1)[1]) == 19, lines
    assert empty and float(empty[0].rsplit(" ", 1)[1]) == 1, lines
    assert any(line.startswith("ray_lakesum_tokens_total{") and 'kind="generated"' in line for line in lines), lines
    assert any(line.startswith("ray_lakesum_accelerator_memory_bytes{") for line in lines), lines
