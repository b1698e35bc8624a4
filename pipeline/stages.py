"""The stages inside a replica: tokenize -> batch -> generate -> detokenize, over Arrow record batches.

`Summarizer.stream` overlaps them: while the model works on one window of rows (on its own thread, the
only one that touches the accelerator), the caller's thread reads and tokenizes the next windows and
detokenizes and writes finished ones. Rows are sorted by length within a window (length bucketing) and
decoded with continuous batching within a token budget (model/continuous.py); the input order is
restored on output.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from model.continuous import generate_stream

from .settings import SummarizeSettings

EMPTY_TEXT = "empty text: nothing to summarize"
# Windows of rows read ahead of the model: enough that it never waits for tokenization or I/O.
LOOKAHEAD_WINDOWS = 2
# Rows per window, in batches: length bucketing sorts within a window, so larger windows pad less.
WINDOW_BATCHES = 8


@dataclass
class Stats:
    rows: int = 0
    empty: int = 0
    truncated: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    model_seconds: float = 0.0

    def add(self, other: "Stats") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class _Window:
    """Rows of one record batch in flight: their token ids and the model's future (none without text)."""
    batch: pa.RecordBatch
    errors: list[str | None]
    ids: dict[int, list[int]] = field(default_factory=dict)  # row -> token ids, for the rows with text
    order: list[int] = field(default_factory=list)  # the rows with text, in the order they are decoded
    future: Future | None = None
    stats: Stats = field(default_factory=Stats)


class Summarizer:
    """One model replica's inference: the tokenizer, the model and the thread that drives the model."""

    def __init__(self, model, tokenizer, settings: SummarizeSettings):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.generation = settings.generation()
        self.config = model.generation_config.updated(**self.generation)
        self.pad_id = tokenizer.pad_token_id
        # One thread owns the accelerator, so that concurrent units share it in turn.
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def close(self) -> None:
        self._model_thread.shutdown(wait=False, cancel_futures=True)

    # --- stages -------------------------------------------------------------------------------------

    def _tokenize(self, batch: pa.RecordBatch) -> _Window:
        texts = batch.column(self.settings.text_column).to_pylist()
        errors: list[str | None] = [None] * len(texts)
        keep = []
        for i, text in enumerate(texts):
            if text is None or not text.strip():
                errors[i] = EMPTY_TEXT
            else:
                keep.append(i)
        window = _Window(batch, errors)
        window.stats.rows = len(texts)
        window.stats.empty = len(texts) - len(keep)
        ids = self.tokenizer([self.settings.prefix + texts[i] for i in keep])["input_ids"] if keep else []
        limit = self.settings.max_input_tokens
        for i, row_ids in zip(keep, ids):
            if len(row_ids) > limit:
                window.stats.truncated += 1
                row_ids = row_ids[: limit - 1] + [self.tokenizer.eos_token_id]  # keep EOS last, as truncation does
            window.ids[i] = row_ids
            window.stats.input_tokens += len(row_ids)
        # Longest first: the first rows decoded together are the biggest, so a budget too big for the
        # accelerator fails at once, not at the end of a unit; and neighbours in the stream pad little.
        window.order = sorted(keep, key=lambda i: -len(window.ids[i]))
        return window

    def _generate(self, rows: list[tuple[int, list[int]]]) -> tuple[list[tuple[int, list[int]]], float]:
        """Runs on the model thread: a window's (row, token ids) with continuous batching (a finished
        document's slot takes the next one), at most batch_size documents and max_batch_tokens
        (documents x longest input) at once."""
        start = time.perf_counter()
        beams = self.config.num_beams
        with torch.inference_mode():
            out = list(generate_stream(self.model, rows, self.config, max_rows=self.settings.batch_size * beams,
                                       max_tokens=self.settings.max_batch_tokens * beams))
        return out, time.perf_counter() - start

    def _submit(self, window: _Window) -> _Window:
        rows = [(i, window.ids[i]) for i in window.order]
        if rows:
            window.future = self._model_thread.submit(self._generate, rows)
        return window

    def _finish(self, window: _Window) -> tuple[pa.RecordBatch, Stats]:
        summaries: list[str | None] = [None] * window.batch.num_rows
        eos = self.tokenizer.eos_token_id
        if window.future is not None:
            out, seconds = window.future.result()
            window.stats.model_seconds += seconds
            for row, ids in out:
                generated = ids[1:]
                generated = generated[: generated.index(eos)] if eos in generated else generated
                window.stats.output_tokens += sum(t != self.pad_id for t in generated)
            for (row, _), text in zip(out, self.tokenizer.batch_decode([ids for _, ids in out],
                                                                       skip_special_tokens=True)):
                summaries[row] = text
        return self._output_batch(window.batch, summaries, window.errors), window.stats

    def _output_batch(self, batch: pa.RecordBatch, summaries, errors) -> pa.RecordBatch:
        keep = [name for name in batch.schema.names if name != self.settings.text_column]
        columns = [batch.column(name) for name in keep]
        return pa.RecordBatch.from_arrays(
            columns + [pa.array(summaries, pa.string()), pa.array(errors, pa.string())],
            schema=output_schema(batch.schema, self.settings.text_column))

    # --- drivers ------------------------------------------------------------------------------------

    def stream(self, batches: Iterable[pa.RecordBatch], stats: Stats) -> Iterator[pa.RecordBatch]:
        """Output record batches in input order, reading ahead LOOKAHEAD_WINDOWS batches; `stats` is updated."""
        in_flight: deque[_Window] = deque()
        for batch in _windows(batches, WINDOW_BATCHES * self.settings.batch_size):
            in_flight.append(self._submit(self._tokenize(batch)))
            while len(in_flight) > LOOKAHEAD_WINDOWS:
                out, window_stats = self._finish(in_flight.popleft())
                stats.add(window_stats)
                yield out
        while in_flight:
            out, window_stats = self._finish(in_flight.popleft())
            stats.add(window_stats)
            yield out

    def summarize_table(self, table: pa.Table) -> tuple[pa.Table, Stats]:
        """A whole table at once (the Ray Data adapter's unit of work)."""
        stats = Stats()
        schema = output_schema(table.schema, self.settings.text_column)
        out = list(self.stream(table.to_batches(), stats))
        return pa.Table.from_batches(out, schema=schema), stats


def _windows(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Re-cut record batches (a row group can hold 100k rows) into windows of at most `rows` rows."""
    for batch in batches:
        for start in range(0, batch.num_rows, rows):
            yield batch.slice(start, rows)
        if batch.num_rows == 0:
            yield batch


def output_schema(input_schema: pa.Schema, text_column: str) -> pa.Schema:
    """Every input column but the text, then summary and error (null when the row is fine)."""
    fields = [f for f in input_schema if f.name != text_column]
    return pa.schema(fields + [pa.field("summary", pa.string()), pa.field("error", pa.string())],
                     metadata=input_schema.metadata)
