"""Stats: what summarizing a work unit counted. The replica fills one per unit, the driver adds them up for the
run's report. Torch-free, so the driver imports it without torch (jobs/summarize.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Stats:
    rows: int = 0
    empty: int = 0
    truncated: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    model_seconds: float = 0.0
    failed_rows: int = 0  # rows with an error of their own (invalid UTF-8, out of memory alone); not the empty ones
    oom_retries: int = 0  # windows halved after generation ran out of memory

    def add(self, other: "Stats") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))
