"""The stages inside a replica: tokenize -> batch -> generate -> detokenize, over Arrow record batches.

`Summarizer.stream` overlaps them: while the model works on one window of rows (on its own thread, the
only one that touches the accelerator), the caller's thread reads and tokenizes the next windows and
detokenizes and writes finished ones. Rows are sorted by length within a window (length bucketing) and
decoded with continuous batching within a token budget (model/continuous.py); the input order is
restored on output. A row whose text is null, blank or not UTF-8, or that runs out of memory on its own,
gets an `error` and no summary; the other rows go on.
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
# A document is tokenized from its first CUT_CHARS_PER_TOKEN x max_input_tokens characters, a cut doubled while
# it holds too few tokens, up to MAX_CHARS_PER_TOKEN x max_input_tokens (Summarizer._token_ids). Natural text
# has a few characters per token, so one cut is the rule; 64 leaves room for markup and runs of whitespace.
CUT_CHARS_PER_TOKEN = 8
MAX_CHARS_PER_TOKEN = 64
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
    failed_rows: int = 0  # rows with an error of their own (invalid UTF-8, out of memory alone); not the empty ones
    oom_retries: int = 0  # windows halved after generation ran out of memory

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


@dataclass
class _Decoded:
    """What the model thread hands back for a window."""
    rows: list[tuple[int, list[int]]]  # (row, output ids), in the order they finished
    errors: dict[int, str]  # row -> why it has no summary (out of memory alone)
    halvings: int
    seconds: float


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
        for i, row_ids in zip(heads, self._token_ids(list(heads.values()))):
            if len(row_ids) > limit or i in longer:
                window.stats.truncated += 1
            if len(row_ids) > limit:
                row_ids = row_ids[: limit - 1] + [self.tokenizer.eos_token_id]  # keep EOS last, as truncation does
            window.ids[i] = row_ids
            window.stats.input_tokens += len(row_ids)
        # Longest first: the first rows decoded together are the biggest, so a budget too big for the
        # accelerator fails at once, not at the end of a unit; and neighbours in the stream pad little.
        window.order = sorted(heads, key=lambda i: -len(window.ids[i]))
        return window

    def _decode_text(self, value: bytes | None) -> tuple[str | None, str | None]:
        """(the text, None), or (None, why the row has none to summarize)."""
        if value is None:
            return None, EMPTY_TEXT
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, (f"column '{self.settings.text_column}' is not valid UTF-8 (byte 0x{value[e.start]:02x} "
                          f"at offset {e.start}); fix the row in the input")
        if not text or text.isspace():
            return None, EMPTY_TEXT
        return text, None

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
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
        ids: list[list[int] | None] = [None] * len(texts)
        todo, chars = list(range(len(texts))), CUT_CHARS_PER_TOKEN * limit
        while todo:
            cuts = [texts[i][:chars] for i in todo]
            for i, cut, row_ids in zip(todo, cuts, self.tokenizer(cuts)["input_ids"]):
                if len(cut) == len(texts[i]) or self._ids_before_last_word(row_ids) >= limit - 1:
                    ids[i] = row_ids
            todo = [i for i in todo if ids[i] is None]
            chars *= 2
        return ids

    def _ids_before_last_word(self, ids: list[int]) -> int:
        """How many ids come before the last one whose piece starts a word ("▁..."): a piece inside a word
        never does, as the word holds no space but its leading one."""
        for n in range(len(ids) - 1, -1, -1):
            if (self.tokenizer.convert_ids_to_tokens(ids[n]) or "").startswith("▁"):
                return n
        return 0

    def _generate(self, rows: list[tuple[int, list[int]]]) -> _Decoded:
        """Runs on the model thread: a window's (row, token ids) with continuous batching (a finished
        document's slot takes the next one), at most batch_size documents and max_batch_tokens
        (documents x longest input) at once.

        Out of memory, the rows not finished yet are decoded again with half as many documents and
        tokens at once, down to one document; a document that runs out of memory alone gets an error and
        the others go on. The next window starts from the settings again: its rows may be shorter.
        """
        start = time.perf_counter()
        beams = self.config.num_beams
        max_rows, max_tokens = self.settings.batch_size * beams, self.settings.max_batch_tokens * beams
        done: list[tuple[int, list[int]]] = []
        errors: dict[int, str] = {}
        halvings = 0
        pending = rows
        while pending:
            if self._generate_into(done, pending, max_rows, max_tokens):
                break
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()  # hand the failed attempt's blocks back before the smaller one
            finished = {row for row, _ in done}
            pending = [(row, ids) for row, ids in pending if row not in finished]
            if not pending:  # it ran out after the last row had finished
                break
            if max_rows > beams:
                max_rows = max(beams, max_rows // 2)
                max_tokens = max(beams * max(len(ids) for _, ids in pending), max_tokens // 2)
                halvings += 1
            else:
                # one document at a time, in order: the one that ran out is the first not finished
                (row, ids), pending = pending[0], pending[1:]
                errors[row] = (f"out of memory summarizing this document alone ({len(ids)} input tokens, "
                               f"{beams} beams); lower --max-input-tokens, --num-beams or --max-new-tokens")
        return _Decoded(done, errors, halvings, time.perf_counter() - start)

    def _generate_into(self, done: list[tuple[int, list[int]]], rows: list[tuple[int, list[int]]], max_rows: int,
                       max_tokens: int) -> bool:
        """Appends each finished (row, output ids) to `done`; False if memory ran out first. Returning
        drops the error and its traceback, which hold the failed attempt's tensors."""
        try:
            with torch.inference_mode():
                for finished in generate_stream(self.model, rows, self.config, max_rows=max_rows,
                                                max_tokens=max_tokens):
                    done.append(finished)
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if not _out_of_memory(e):
                raise
            return False
        return True

    def _submit(self, window: _Window) -> _Window:
        rows = [(i, window.ids[i]) for i in window.order]
        if rows:
            window.future = self._model_thread.submit(self._generate, rows)
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
    return pa.schema(fields + [pa.field("summary", pa.string()), pa.field("error", pa.string())],
                     metadata=input_schema.metadata)
