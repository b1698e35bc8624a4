"""Prometheus metrics through Ray's metrics API: Ray's metrics agent on every node serves them, so the
cluster's Prometheus scrapes them like Ray's own (names get Ray's `ray_` prefix)."""

from __future__ import annotations

import os

import torch


class PipelineMetrics:
    def __init__(self):
        from ray.util.metrics import Counter, Gauge

        self.documents = Counter("lakesum_documents", "Documents written, by outcome", tag_keys=("outcome",))
        self.tokens = Counter("lakesum_tokens", "Tokens read and generated", tag_keys=("kind",))
        self.unit_failures = Counter("lakesum_unit_failures", "Work units that failed on their own data")
        self.unit_retries = Counter("lakesum_unit_retries", "Work units handed out again after a replica died")
        self.storage_retries = Counter(
            "lakesum_storage_retries", "Reads and writes tried again after a transient storage error"
        )
        self.hung_replicas = Counter("lakesum_hung_replicas", "Replicas killed for making no progress")
        self.memory = Gauge(
            "lakesum_accelerator_memory_bytes",
            "Peak accelerator memory of a replica (process RSS on CPU)",
            tag_keys=("replica",),
        )

    def unit_done(self, stats: dict) -> None:
        summarized = stats["rows"] - stats["empty"] - stats["failed_rows"]
        if summarized:
            self.documents.inc(summarized, tags={"outcome": "summarized"})
        if stats["empty"]:
            self.documents.inc(stats["empty"], tags={"outcome": "empty"})
        if stats["failed_rows"]:  # invalid UTF-8, or out of memory alone: the row carries its error
            self.documents.inc(stats["failed_rows"], tags={"outcome": "failed"})
        if stats["truncated"]:
            self.documents.inc(stats["truncated"], tags={"outcome": "truncated"})
        if stats["input_tokens"]:
            self.tokens.inc(stats["input_tokens"], tags={"kind": "input"})
        if stats["output_tokens"]:
            self.tokens.inc(stats["output_tokens"], tags={"kind": "generated"})
        if stats.get("storage_retries"):
            self.storage_retries.inc(stats["storage_retries"])
        self.memory.set(_peak_memory(), tags={"replica": str(os.getpid())})


def _peak_memory() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return float(torch.cuda.max_memory_allocated())
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB
