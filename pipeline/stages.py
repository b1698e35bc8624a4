"""The stages inside a replica: tokenize -> generate -> detokenize, over Arrow record batches.

`Summarizer.stream` overlaps them: while the model decodes (on its own thread, the only one that touches
the accelerator), the caller's thread reads and tokenizes the next windows of rows and detokenizes and
writes finished ones. A replica given CPUs to spare (a GPU replica) tokenizes in a pool of worker processes
instead (pipeline/tokenize_pool.py), several windows at once; the ids, and so the summaries, are the same.
Rows are sorted by length within a window (length bucketing). The model thread
decodes the rows of every window submitted, by every unit the replica runs, as one stream with continuous
batching within a token budget (model/decode.py), so the batch does not drain at a window's end; the
input order is restored on output. A row whose text is null, blank or not UTF-8, or that runs out of
memory on its own, gets an `error` and no summary; the other rows go on.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from model.decode import generate_stream

from .settings import SummarizeSettings
from .stats import Stats
from .tokenize_pool import TokenizePool, encode_with

EMPTY_TEXT = "empty text: nothing to summarize"
# A document is tokenized from its first CUT_CHARS_PER_TOKEN x max_input_tokens characters, a cut doubled while
# it holds too few tokens, up to MAX_CHARS_PER_TOKEN x max_input_tokens (Summarizer._token_ids). Natural text
# has a few characters per token, so one cut is the rule; 64 leaves room for markup and runs of whitespace.
CUT_CHARS_PER_TOKEN = 8
MAX_CHARS_PER_TOKEN = 64
# Rows read ahead of the model, in batches of batch_size rows: enough that it never waits for tokenization or
# I/O, and that the next windows' rows are queued before the current ones finish, so that its stream goes on.
# Counted in rows, not windows: a small row group makes a small window.
LOOKAHEAD_BATCHES = 16
# Rows per window, in batches: length bucketing sorts within a window, so larger windows pad less.
WINDOW_BATCHES = 8


@dataclass
class _Cuts:
    """The token ids of a window's texts, found a cut at a time (Summarizer._token_ids): the cut being tokenized,
    and the rows whose ids need a longer one."""

    texts: list[str]
    ids: list[list[int] | None]
    todo: list[int]  # the texts whose ids are not known yet
    chars: int  # the length of their cut
    cuts: list[str] = field(default_factory=list)
    future: Future | None = None  # the cuts' ids


@dataclass
class _Window:
    """Rows of one record batch in flight: their token ids and the model's future (none without text)."""

    batch: pa.RecordBatch
    errors: list[str | None]
    heads: list[int] = field(default_factory=list)  # the rows with text, whose ids `tokenizing` finds
    longer: set[int] = field(default_factory=set)  # rows whose text goes on past the head tokenized
    tokenizing: _Cuts | None = None
    ids: dict[int, list[int]] = field(default_factory=dict)  # row -> token ids, for the rows with text
    order: list[int] = field(default_factory=list)  # the rows with text, in the order they are decoded
    future: Future | None = None
    stats: Stats = field(default_factory=Stats)


@dataclass
class _Decoded:
    """What the model thread hands back for a window."""

    rows: list[tuple[int, list[int]]] = field(default_factory=list)  # (row, output ids), in the order they finished
    errors: dict[int, str] = field(default_factory=dict)  # row -> why it has no summary (out of memory alone)
    halvings: int = 0  # halvings of the budget charged to this window (its row was the first unfinished)
    seconds: float = 0.0  # the model's time up to each of its rows' ends since the previous row's


class _Job:
    """A window's rows on the model thread: done when every row has its output or its error."""

    def __init__(self, rows: int):
        self.future: Future = Future()
        self.decoded = _Decoded()
        self.left = rows


Document = tuple[int, list[int]]  # (key: the row's number among all rows submitted, token ids)


class _QueueFeed:
    """The queued rows as generate_stream reads them: next() hands out the oldest, noted in `taken`, or stops
    when none is queued *now*. generate_stream asks again at each sync, so rows queued meanwhile join the
    batch in flight."""

    def __init__(self, queue: deque[Document], lock: threading.Condition, taken: list[Document]):
        self.queue, self.lock, self.taken = queue, lock, taken

    def __iter__(self) -> Iterator[Document]:
        return self

    def __next__(self) -> Document:
        with self.lock:
            if not self.queue:
                raise StopIteration
            row = self.queue.popleft()
        self.taken.append(row)
        return row


class _ModelThread:
    """The one thread that drives the model. Windows queue their rows, and it decodes every queued row, in
    order, as one stream (generate_stream, which polls the queue at each sync: _QueueFeed): a window's
    last, longest rows share the batch with the next window's first ones rather than leaving it to drain.
    A stream ends only when its batch is empty and no row is queued: when the model has caught up with the
    reading.

    Out of memory, the rows the stream had taken and not finished are decoded again on their own, with half
    as many documents and tokens at once, down to one document; a document that runs out of memory alone
    gets an error and the others go on. The stream then takes queued rows again with the full budget: the
    rows after may be shorter. An error other than running out of memory fails every window in flight.
    """

    def __init__(self, model, config, settings: SummarizeSettings):
        self.model, self.config = model, config
        beams = config.rows_per_document()
        # documents x beams, and documents x beams x longest input, at once
        self.budget = (settings.batch_size * beams, settings.max_batch_tokens * beams)
        self._queue: deque[Document] = deque()
        self._owners: dict[int, tuple[_Job, int]] = {}  # key -> (its window's job, its row in the window)
        self._rows_submitted = 0
        self._jobs: set[_Job] = set()  # not done yet
        self._lock = threading.Condition()
        self._closed = False
        self._clock = 0.0  # when the model's time was last charged to a window
        self._thread = threading.Thread(target=self._run, name="model", daemon=True)
        self._thread.start()

    def submit(self, rows: list[tuple[int, list[int]]], window_rows: int) -> Future:
        """Queue (row, token ids) of a window of `window_rows` rows; the future gives its _Decoded."""
        job = _Job(len(rows))
        with self._lock:
            if self._closed:
                raise RuntimeError("the summarizer is closed")
            self._jobs.add(job)
            for row, ids in rows:
                key = self._rows_submitted + row
                self._owners[key] = job, row
                self._queue.append((key, ids))
            self._rows_submitted += window_rows
            self._lock.notify()
        return job.future

    def close(self) -> None:
        """Stop taking rows; windows not done are cancelled. The rows in the batch finish, unread, and then the
        thread ends: joined here, since a daemon thread still inside torch when the interpreter exits aborts
        the process ("terminate called without an active exception")."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            for job in self._jobs:
                job.future.cancel()
            self._jobs.clear()
            self._lock.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._queue or self._closed)
                if self._closed:
                    return
            self._clock = time.perf_counter()
            try:
                self._decode_queued()
            except Exception as error:  # the model's state is unknown: no window in flight can trust it
                with self._lock:
                    self._queue.clear()
                    self._owners.clear()
                    for job in self._jobs:
                        if not job.future.done():
                            job.future.set_exception(error)
                    self._jobs.clear()

    def _decode_queued(self) -> None:
        """One stream over the queued rows, and the retries of its rows if it runs out of memory."""
        beams = self.config.rows_per_document()
        max_rows, max_tokens = self.budget
        retry: list[Document] | None = None  # rows to decode again on their own; None: the queue's
        while True:
            unfinished = self._attempt(retry, max_rows, max_tokens)
            if unfinished is None:  # it ran to its end
                return
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()  # hand the failed attempt's blocks back before the smaller one
            if not unfinished:  # it ran out after the last row it had taken had finished
                return
            if max_rows > beams:
                max_rows = max(beams, max_rows // 2)
                max_tokens = max(beams * max(len(ids) for _, ids in unfinished), max_tokens // 2)
                with self._lock:
                    job, _ = self._owners[unfinished[0][0]]
                    job.decoded.halvings += 1
                retry = unfinished
            else:
                # one document at a time, in order: the one that ran out is the first not finished
                (key, ids), retry = unfinished[0], unfinished[1:]
                self._deliver(
                    key,
                    error=f"out of memory summarizing this document alone ({len(ids)} input tokens, "
                    f"{beams} beams); lower --max-input-tokens, --num-beams or --max-new-tokens",
                )
                if not retry:
                    return

    def _attempt(self, retry: list[Document] | None, max_rows: int, max_tokens: int) -> list[Document] | None:
        """Decode `retry`, or the queued rows as they come: None when done, else (out of memory) the rows taken
        and not finished, in order. Returning drops the error and its traceback, which hold the failed
        attempt's tensors."""
        taken: list[Document] = list(retry) if retry is not None else []
        finished: set[int] = set()
        feed = iter(retry) if retry is not None else _QueueFeed(self._queue, self._lock, taken)
        try:
            with torch.inference_mode():
                for key, ids in generate_stream(
                    self.model, feed, self.config, max_rows=max_rows, max_tokens=max_tokens
                ):
                    finished.add(key)
                    self._deliver(key, ids)
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if not _out_of_memory(e) or not taken:  # nothing to halve
                raise
            return [row for row in taken if row[0] not in finished]
        return None

    def _deliver(self, key: int, ids: list[int] | None = None, error: str | None = None) -> None:
        """Record a row's output ids (or error) in its window's _Decoded, charge it the model's time since the
        previous row's, and hand the window back once its last row is done."""
        now = time.perf_counter()
        with self._lock:
            job, row = self._owners.pop(key)
            if error is None:
                job.decoded.rows.append((row, ids))
            else:
                job.decoded.errors[row] = error
            job.decoded.seconds += now - self._clock
            self._clock = now
            job.left -= 1
            if job.left == 0:
                self._jobs.discard(job)
                if not job.future.done():  # cancelled by close()
                    job.future.set_result(job.decoded)


class Summarizer:
    """One model replica's inference: the tokenizer, the model and the thread that drives the model."""

    def __init__(self, model, tokenizer, settings: SummarizeSettings, tokenize_workers: int = 0):
        """`tokenize_workers`: processes that tokenize (pipeline/tokenize_pool.py); 0: the caller's thread does."""
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.generation = settings.generation()
        self.config = model.generation_config.updated(**self.generation)
        self.pad_id = tokenizer.pad_token_id
        # One thread owns the accelerator, and the windows of concurrent units share its one stream.
        self._model = _ModelThread(model, self.config, settings)
        self._pool = TokenizePool(tokenizer, tokenize_workers) if tokenize_workers else None

    def close(self) -> None:
        self._model.close()
        if self._pool is not None:
            self._pool.close()

    # --- stages -------------------------------------------------------------------------------------

    def _read(self, batch: pa.RecordBatch) -> _Window:
        """A window of the batch's rows, its texts' errors counted and their heads sent to be tokenized."""
        window = _Window(batch, [None] * batch.num_rows)
        window.stats.rows = batch.num_rows
        prefix, limit = self.settings.prefix, self.settings.max_input_tokens
        most = MAX_CHARS_PER_TOKEN * limit
        heads: dict[int, str] = {}  # row -> the start of prefix + text, all of it that may be tokenized
        longer: set[int] = set()  # rows whose text goes on past its head
        values = _text_bytes(batch.column(self.settings.text_column))
        for i in range(batch.num_rows):
            # one row at a time: the whole text lives only until its head is taken
            text, window.errors[i] = self._decode_text(values[i].as_py())
            if text is not None:
                heads[i] = (prefix + text[:most])[:most]
                if len(prefix) + len(text) > most:
                    longer.add(i)
            elif window.errors[i] == EMPTY_TEXT:
                window.stats.empty += 1
            else:
                window.stats.failed_rows += 1
        window.heads, window.longer = list(heads), longer
        window.tokenizing = self._start_token_ids(list(heads.values()))
        return window

    def _tokenized(self, window: _Window) -> _Window:
        """The window once its rows' ids have come: truncated, counted and ordered for the model."""
        limit = self.settings.max_input_tokens
        for i, row_ids in zip(window.heads, self._token_ids(window.tokenizing)):
            if len(row_ids) > limit or i in window.longer:
                window.stats.truncated += 1
            if len(row_ids) > limit:
                row_ids = row_ids[: limit - 1] + [self.tokenizer.eos_token_id]  # keep EOS last, as truncation does
            window.ids[i] = row_ids
            window.stats.input_tokens += len(row_ids)
        # Longest first: the first rows decoded together are the biggest, so a budget too big for the
        # accelerator fails at once, not at the end of a unit; and neighbours in the stream pad little.
        window.order = sorted(window.heads, key=lambda i: -len(window.ids[i]))
        window.tokenizing = None
        return window

    def _decode_text(self, value: bytes | None) -> tuple[str | None, str | None]:
        """(the text, None), or (None, why the row has none to summarize)."""
        if value is None:
            return None, EMPTY_TEXT
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, (
                f"column '{self.settings.text_column}' is not valid UTF-8 (byte 0x{value[e.start]:02x} "
                f"at offset {e.start}); fix the row in the input"
            )
        if not text or text.isspace():
            return None, EMPTY_TEXT
        return text, None

    def _start_token_ids(self, texts: list[str]) -> _Cuts:
        """Send the texts' first cuts to be tokenized; _token_ids waits for their ids."""
        job = _Cuts(
            texts, [None] * len(texts), list(range(len(texts))), CUT_CHARS_PER_TOKEN * self.settings.max_input_tokens
        )
        if job.todo:
            self._send_cuts(job)
        return job

    def _send_cuts(self, job: _Cuts) -> None:
        job.cuts = [job.texts[i][: job.chars] for i in job.todo]
        if self._pool is not None:
            job.future = self._pool.encode(job.cuts)
        else:
            job.future = Future()
            job.future.set_result(encode_with(self.tokenizer, job.cuts))

    def _token_ids(self, job: _Cuts) -> list[list[int]]:
        """Each text's ids, of which truncation to max_input_tokens keeps the same ones as for the whole text.

        A text is cut by characters before it is tokenized, so that tokenizing a row never holds more than
        MAX_CHARS_PER_TOKEN x max_input_tokens characters and their ids, however long the document (the
        caller passes at most that much). Why a cut gives the whole text's first ids: mT5's pieces never
        span a space, and words are segmented one by one (model/tokenizer.py), so every word of the cut
        but the last, which the cut may have shortened, tokenizes as in the whole text. Once the words
        before the last give max_input_tokens - 1 ids, those are the ids truncation keeps; a cut with
        fewer is doubled. Only a text whose head, MAX_CHARS_PER_TOKEN x max_input_tokens characters, has
        too few whole words (runs of whitespace, or long text with no space, as Chinese or Thai can be) is
        tokenized from its head alone: there the first pieces of one long word could in principle depend
        on text after the head.
        """
        limit = self.settings.max_input_tokens
        while job.todo:
            for i, cut, row_ids in zip(job.todo, job.cuts, job.future.result()):
                if len(cut) == len(job.texts[i]) or self._ids_before_last_word(row_ids) >= limit - 1:
                    job.ids[i] = row_ids
            job.todo = [i for i in job.todo if job.ids[i] is None]
            job.chars *= 2
            if job.todo:
                self._send_cuts(job)
        return job.ids

    def _ids_before_last_word(self, ids: list[int]) -> int:
        """How many ids come before the last one whose piece starts a word ("▁..."): a piece inside a word
        never does, as the word holds no space but its leading one."""
        for n in range(len(ids) - 1, -1, -1):
            if (self.tokenizer.convert_ids_to_tokens(ids[n]) or "").startswith("▁"):
                return n
        return 0

    def _submit(self, window: _Window) -> _Window:
        rows = [(i, window.ids[i]) for i in window.order]
        if rows:
            window.future = self._model.submit(rows, window.batch.num_rows)
        return window

    def _finish(self, window: _Window) -> tuple[pa.RecordBatch, Stats]:
        summaries: list[str | None] = [None] * window.batch.num_rows
        eos = self.tokenizer.eos_token_id
        if window.future is not None:
            decoded = window.future.result()
            window.stats.model_seconds += decoded.seconds
            window.stats.oom_retries += decoded.halvings
            window.stats.failed_rows += len(decoded.errors)
            for row, error in decoded.errors.items():
                window.errors[row] = error
            out = decoded.rows
            for _, ids in out:
                generated = ids[1:]
                generated = generated[: generated.index(eos)] if eos in generated else generated
                window.stats.output_tokens += sum(t != self.pad_id for t in generated)
            for (row, _), text in zip(
                out, self.tokenizer.batch_decode([ids for _, ids in out], skip_special_tokens=True)
            ):
                summaries[row] = text
        return self._output_batch(window.batch, summaries, window.errors), window.stats

    def _output_batch(self, batch: pa.RecordBatch, summaries, errors) -> pa.RecordBatch:
        columns = [batch.column(name) for name in batch.schema.names if name != self.settings.text_column]
        return pa.RecordBatch.from_arrays(
            columns + [pa.array(summaries, pa.string()), pa.array(errors, pa.string())],
            schema=output_schema(batch.schema, self.settings.text_column),
        )

    # --- drivers ------------------------------------------------------------------------------------

    def stream(self, batches: Iterable[pa.RecordBatch], stats: Stats) -> Iterator[pa.RecordBatch]:
        """Output record batches in input order, with LOOKAHEAD_BATCHES x batch_size rows read ahead of the
        oldest window in flight; `stats` is updated.

        With a tokenize pool of n workers, up to n + 1 windows more are being tokenized: the windows go to the
        model in order, each as soon as its ids have come, and the pool has the next ones to work on meanwhile."""
        tokenizing: deque[_Window] = deque()
        in_flight: deque[_Window] = deque()
        ahead = LOOKAHEAD_BATCHES * self.settings.batch_size
        pool_windows = self._pool.workers + 1 if self._pool is not None else 0

        def to_model(window: _Window) -> Iterator[pa.RecordBatch]:
            in_flight.append(self._submit(self._tokenized(window)))
            while sum(w.batch.num_rows for w in itertools.islice(in_flight, 1, None)) >= ahead:
                yield self._finished(in_flight.popleft(), stats)

        for batch in _windows(batches, WINDOW_BATCHES * self.settings.batch_size):
            tokenizing.append(self._read(batch))
            while len(tokenizing) > pool_windows:
                yield from to_model(tokenizing.popleft())
        while tokenizing:
            yield from to_model(tokenizing.popleft())
        while in_flight:
            yield self._finished(in_flight.popleft(), stats)

    def _finished(self, window: _Window, stats: Stats) -> pa.RecordBatch:
        out, window_stats = self._finish(window)
        stats.add(window_stats)
        return out

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


def _out_of_memory(error: RuntimeError) -> bool:
    # CUDA raises torch.OutOfMemoryError (torch.cuda.OutOfMemoryError is the same class); the CPU allocator a
    # plain RuntimeError with this message (c10/core/impl/alloc_cpu.cpp).
    return isinstance(error, torch.OutOfMemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(error)


# Text is decoded row by row from its bytes: Arrow does not check a string column's UTF-8, and to_pylist()
# would fail every row of the batch on one bad value. These casts reuse the string column's buffers.
_AS_BINARY = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary(), pa.string_view(): pa.binary_view()}


def _text_bytes(column: pa.Array) -> pa.Array:
    """The text column as bytes per row, whatever text type shards.check_columns let through."""
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    return column.cast(_AS_BINARY[column.type]) if column.type in _AS_BINARY else column


def output_schema(input_schema: pa.Schema, text_column: str) -> pa.Schema:
    """Every input column but the text, then summary and error (null when the row is fine)."""
    fields = [f for f in input_schema if f.name != text_column]
    return pa.schema(
        fields + [pa.field("summary", pa.string()), pa.field("error", pa.string())], metadata=input_schema.metadata
    )
