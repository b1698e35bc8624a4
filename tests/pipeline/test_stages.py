"""The Summarizer's stages on their own (no Ray): bad rows are rows, every text type reads, long documents are cut
before tokenizing, and running out of memory in generation costs a smaller window, not the rows."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model import MT5ForConditionalGeneration, MT5Tokenizer
from model.decode import generate_stream
from pipeline.errors import InputError
from pipeline.footers import ShardInfo, check_columns
from pipeline.listing import Shard
from pipeline.settings import SummarizeSettings
from pipeline.stages import MAX_CHARS_PER_TOKEN, Summarizer
from synthetic.corpus import documents
from synthetic.spiece import CJK_WORDS, WORDS

# Two beams, so that the window arithmetic (rows = documents x beams) is exercised; four documents at once.
SETTINGS = dict(num_beams=2, max_new_tokens=6, batch_size=4, max_input_tokens=64, max_batch_tokens=1024)
BAD_ROW = 3
BAD_BYTES = "un café noir".encode("latin-1")  # é as the single byte 0xe9: not UTF-8


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_checkpoint):
    return MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint), MT5Tokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def docs():
    return documents(10, seed=5)


@pytest.fixture(scope="module")
def clean(model_and_tokenizer, tiny_checkpoint, docs):
    """Summaries of the documents from a plain string column, with nothing going wrong."""
    table, _ = _summarize(model_and_tokenizer, tiny_checkpoint, pa.Table.from_pylist(docs))
    return table.column("summary").to_pylist()


def _summarize(model_and_tokenizer, checkpoint, table: pa.Table, tokenizer=None, **settings):
    model, own_tokenizer = model_and_tokenizer
    summarizer = Summarizer(
        model, tokenizer or own_tokenizer, SummarizeSettings(model=str(checkpoint), **{**SETTINGS, **settings})
    )
    try:
        return summarizer.summarize_table(table)
    finally:
        summarizer.close()


def _text_column(docs, text_type: pa.DataType) -> pa.Array:
    """The documents' texts as `text_type`, the row BAD_ROW holding bytes that are not UTF-8."""
    values = [d["text"].encode() for d in docs]
    values[BAD_ROW] = BAD_BYTES
    column = pa.array(values, pa.binary())
    value_type = text_type.value_type if pa.types.is_dictionary(text_type) else text_type
    if value_type in (pa.string(), pa.large_string(), pa.string_view()):
        column = column.cast(pa.string(), safe=False).cast(value_type, safe=False)  # Arrow holds bad UTF-8 as is
    else:
        column = column.cast(value_type)
    return column.dictionary_encode() if pa.types.is_dictionary(text_type) else column


def _info(schema: pa.Schema) -> ShardInfo:
    return ShardInfo(Shard("/lake/date=1/part-0.parquet", "date=1/part-0.parquet", "parquet", 1), 0, (), schema)


# --- bad rows are rows ----------------------------------------------------------------------------------------


def test_invalid_utf8_in_a_parquet_file_fails_only_its_row(model_and_tokenizer, tiny_checkpoint, docs, clean, tmp_path):
    """Parquet keeps the bad bytes and pyarrow reads them back unchecked: the row gets an error naming the byte and
    its offset, and every other row gets the summary of a clean run."""
    table = pa.table({"id": [d["id"] for d in docs], "text": _text_column(docs, pa.string())})
    pq.write_table(table, tmp_path / "part-0.parquet")
    out, stats = _summarize(model_and_tokenizer, tiny_checkpoint, pq.read_table(tmp_path / "part-0.parquet"))

    rows = out.to_pylist()
    assert rows[BAD_ROW]["summary"] is None
    assert rows[BAD_ROW]["error"] == (
        "column 'text' is not valid UTF-8 (byte 0xe9 at offset 6); fix the row in the input"
    )
    for n, (row, summary) in enumerate(zip(rows, clean)):
        if n != BAD_ROW:
            assert row["summary"] == summary and row["error"] is None, n
    assert stats.rows == len(docs) and stats.failed_rows == 1 and stats.empty == 0


TEXT_TYPES = [
    pa.string(),
    pa.large_string(),
    pa.string_view(),
    pa.binary(),
    pa.large_binary(),
    pa.binary_view(),
    pa.dictionary(pa.int32(), pa.string()),
    pa.dictionary(pa.int32(), pa.large_string()),
    pa.dictionary(pa.int32(), pa.binary()),
]


@pytest.mark.parametrize("text_type", TEXT_TYPES, ids=str)
def test_every_text_type_is_accepted_and_summarized_as_a_string_column(
    model_and_tokenizer, tiny_checkpoint, docs, clean, text_type
):
    """Dictionary-encoded, large, view and UTF-8 binary text columns pass the job's column check and give the
    summaries of a plain string column; a value that is not UTF-8 fails its own row in each of them."""
    table = pa.table({"id": [d["id"] for d in docs], "text": _text_column(docs, text_type)})
    assert table.schema.field("text").type == text_type
    check_columns(_info(table.schema), "text", "id")

    out, stats = _summarize(model_and_tokenizer, tiny_checkpoint, table)
    summaries, errors = out.column("summary").to_pylist(), out.column("error").to_pylist()
    assert summaries[:BAD_ROW] + summaries[BAD_ROW + 1 :] == clean[:BAD_ROW] + clean[BAD_ROW + 1 :]
    assert summaries[BAD_ROW] is None and "not valid UTF-8 (byte 0xe9 at offset 6)" in errors[BAD_ROW]
    assert stats.failed_rows == 1


@pytest.mark.parametrize("text_type", [pa.int64(), pa.dictionary(pa.int32(), pa.int64())], ids=str)
def test_check_columns_still_refuses_a_text_column_that_is_not_text(text_type):
    schema = pa.schema([("id", pa.int64()), ("text", text_type)])
    with pytest.raises(InputError) as error:
        check_columns(_info(schema), "text", "id")
    assert str(error.value) == f"date=1/part-0.parquet: column 'text' has type {text_type}, expected a string column"
    # and the accepted types really are accepted: dictionaries of text and binary, refused before
    for accepted in (pa.dictionary(pa.int32(), pa.string()), pa.binary(), pa.large_binary()):
        check_columns(_info(pa.schema([("id", pa.int64()), ("text", accepted)])), "text", "id")


# --- long documents -------------------------------------------------------------------------------------------


class RecordingTokenizer:
    """The real tokenizer, noting the longest text it is asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.longest = 0

    def __call__(self, texts, *args, **kwargs):
        self.longest = max([self.longest] + [len(t) for t in ([texts] if isinstance(texts, str) else texts)])
        return self.tokenizer(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def _long_text(kind: str, chars: int) -> str:
    rng = random.Random(7)
    if kind == "unspaced":  # Chinese as it is written: one "word" of two million characters
        words, separator = [w for words in CJK_WORDS.values() for w in words], ""
    else:
        words = [w for words in WORDS.values() for w in words]
        # wide: more characters per token than the first cut allows for, so the cut has to be doubled
        separator = " " * 12 if kind == "wide-spaced" else " "
    pieces, length = [], 0
    while length < chars:
        pieces.append(rng.choice(words))
        length += len(pieces[-1]) + len(separator)
    return separator.join(pieces)[:chars]


@pytest.mark.parametrize("kind", ["spaced", "wide-spaced", "unspaced"])
def test_long_document_is_cut_before_tokenizing_and_summarized_as_its_token_truncation(
    model_and_tokenizer, tiny_checkpoint, docs, kind
):
    """A 2-million-character document: the tokenizer never sees more than MAX_CHARS_PER_TOKEN x max_input_tokens
    characters of it, and its summary is generate()'s on the whole document truncated to max_input_tokens."""
    model, tokenizer = model_and_tokenizer
    text = _long_text(kind, 2_000_000)
    rows = [{"id": "long", "text": text}] + [{"id": d["id"], "text": d["text"]} for d in docs[:3]]
    recording = RecordingTokenizer(tokenizer)
    out, stats = _summarize(model_and_tokenizer, tiny_checkpoint, pa.Table.from_pylist(rows), tokenizer=recording)

    limit = SETTINGS["max_input_tokens"]
    assert 0 < recording.longest <= MAX_CHARS_PER_TOKEN * limit
    settings = SummarizeSettings(model=str(tiny_checkpoint), **SETTINGS)
    for row, summary in zip(rows, out.column("summary").to_pylist()):
        ids = tokenizer([row["text"]], max_length=limit, truncation=True, return_tensors="pt")
        expected = model.generate(**ids, **settings.generation())
        assert summary == tokenizer.batch_decode(expected, skip_special_tokens=True)[0], row["id"]
    assert stats.truncated >= 1


# --- out of memory in generation ------------------------------------------------------------------------------

CPU_OUT_OF_MEMORY = RuntimeError(
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
    "memory: you tried to allocate 1125899906842624 bytes. Error code 12 (Cannot "
    "allocate memory)"
)


@pytest.mark.parametrize(
    "fault", [torch.OutOfMemoryError("CUDA out of memory (injected)"), CPU_OUT_OF_MEMORY], ids=["cuda", "cpu"]
)
def test_out_of_memory_halves_the_window_and_redoes_only_unfinished_rows(
    model_and_tokenizer, tiny_checkpoint, docs, clean, monkeypatch, fault
):
    """Generation runs out of memory whenever it is asked for more than one document at once, after finishing
    one: the window is halved twice (4 documents, 2, 1), the rows already finished are not decoded again, and
    the summaries are a clean run's."""
    beams = SETTINGS["num_beams"]
    asked: list[list] = []
    finished: list = []

    def faulty_stream(model, rows, config, max_rows, max_tokens):
        rows = list(rows)
        asked.append([row for row, _ in rows])
        stream = generate_stream(model, rows, config, max_rows=max_rows, max_tokens=max_tokens)
        for n, (row, ids) in enumerate(stream):
            if n == 1 and max_rows > beams:
                raise fault
            finished.append(row)
            yield row, ids

    monkeypatch.setattr("pipeline.stages.generate_stream", faulty_stream)
    out, stats = _summarize(model_and_tokenizer, tiny_checkpoint, pa.Table.from_pylist(docs))
    assert out.column("summary").to_pylist() == clean
    assert stats.oom_retries == 2 and stats.failed_rows == 0
    assert len(finished) == len(set(finished)) == len(docs)  # no row decoded twice
    assert len(asked) == 3 and asked[1] == [row for row in asked[0] if row != finished[0]]

    def broken_stream(model, rows, config, max_rows, max_tokens):
        raise RuntimeError("CUDA error: device-side assert triggered")
        yield

    monkeypatch.setattr("pipeline.stages.generate_stream", broken_stream)
    with pytest.raises(RuntimeError, match="device-side assert"):  # not taken for running out of memory
        _summarize(model_and_tokenizer, tiny_checkpoint, pa.Table.from_pylist(docs))


def test_document_out_of_memory_alone_fails_only_its_row(
    model_and_tokenizer, tiny_checkpoint, docs, clean, monkeypatch
):
    """One document runs out of memory whenever it is admitted: the window is halved down to one document, then
    that document alone gets an error and every other one its summary."""
    poison = 6

    def poisoned_stream(model, rows, config, max_rows, max_tokens):
        def documents():
            for row, ids in rows:
                if row == poison:
                    raise torch.OutOfMemoryError("CUDA out of memory (injected)")
                yield row, ids

        return generate_stream(model, documents(), config, max_rows=max_rows, max_tokens=max_tokens)

    monkeypatch.setattr("pipeline.stages.generate_stream", poisoned_stream)
    out, stats = _summarize(model_and_tokenizer, tiny_checkpoint, pa.Table.from_pylist(docs))
    summaries, errors = out.column("summary").to_pylist(), out.column("error").to_pylist()
    assert summaries[poison] is None and errors[poison].startswith("out of memory summarizing this document alone")
    assert summaries[:poison] + summaries[poison + 1 :] == clean[:poison] + clean[poison + 1 :]
    assert errors[:poison] + errors[poison + 1 :] == [None] * (len(docs) - 1)
    assert stats.oom_retries == 2 and stats.failed_rows == 1


# --- one stream -----------------------------------------------------------------------------------------------


def test_windows_of_small_row_groups_share_one_stream(model_and_tokenizer, tiny_checkpoint, docs, clean, monkeypatch):
    """Row groups of two rows make windows of two rows. Their rows join one stream, batch_size documents at once,
    rather than a stream per window that drains at its end; the summaries are a clean run's. (Each decode step
    is slowed, so that the windows are all queued while the first one decodes.)"""
    import time

    from model.decode_batch import DecodeBatch
    from pipeline.stats import Stats

    streams, widths = [], []

    def counted_stream(model, rows, config, max_rows, max_tokens):
        streams.append(max_rows)
        return generate_stream(model, rows, config, max_rows=max_rows, max_tokens=max_tokens)

    original = DecodeBatch.logits

    def slow_logits(self):
        widths.append(len(self))
        time.sleep(0.05)
        return original(self)

    monkeypatch.setattr("pipeline.stages.generate_stream", counted_stream)
    monkeypatch.setattr(DecodeBatch, "logits", slow_logits)
    model, tokenizer = model_and_tokenizer
    summarizer = Summarizer(model, tokenizer, SummarizeSettings(model=str(tiny_checkpoint), **SETTINGS))
    try:
        out = list(summarizer.stream(pa.Table.from_pylist(docs).to_batches(max_chunksize=2), Stats()))
    finally:
        summarizer.close()
    assert pa.Table.from_batches(out).column("summary").to_pylist() == clean
    assert len(streams) == 1
    assert max(widths) == SETTINGS["batch_size"]


def test_close_ends_the_model_thread(model_and_tokenizer, tiny_checkpoint, docs):
    """A daemon thread still inside torch when the interpreter exits aborts the process: close() joins it, after
    the rows it was decoding finish."""
    model, tokenizer = model_and_tokenizer
    summarizer = Summarizer(model, tokenizer, SummarizeSettings(model=str(tiny_checkpoint), **SETTINGS))
    summarizer.summarize_table(pa.Table.from_pylist(docs))
    thread = summarizer._model._thread
    summarizer.close()
    assert not thread.is_alive()
