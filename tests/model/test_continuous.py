"""Continuous batching: every document gets the tokens generate() and transformers give it alone."""

from __future__ import annotations

import threading

import pytest
import torch
import transformers

import model as ours
from model import decode_batch
from model.decode import Greedy, cpu_streams, generate_stream
from model.decode_batch import DecodeBatch, length_groups
from tests.model.helpers import STREAM_SETTINGS, token_documents


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    reference = transformers.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    return reference, ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)


@pytest.mark.parametrize("settings", STREAM_SETTINGS.values(), ids=STREAM_SETTINGS.keys())
def test_each_document_gets_the_tokens_of_generate_and_transformers_alone(pair, settings, monkeypatch):
    reference, model = pair
    refills = []
    original = DecodeBatch.refill
    monkeypatch.setattr(
        DecodeBatch,
        "refill",
        lambda self, free, docs: (refills.append((len(free), len(docs))), original(self, free, docs)),
    )
    docs = token_documents()
    rows = 4 * settings.get("num_beams", 1)  # four documents at once
    got = dict(generate_stream(model, docs, model.generation_config.updated(**settings), max_rows=rows))
    assert sorted(got) == [key for key, _ in docs]  # every document once
    for key, ids in docs:
        alone = model.generate(input_ids=torch.tensor([ids]), **settings)[0].tolist()
        expected = reference.generate(input_ids=torch.tensor([ids]), **settings)[0].tolist()
        assert got[key] == alone == expected, key
    lengths = {len(out) for out in got.values()}
    assert len(lengths) > 2, "summaries of one length: the fixture no longer exercises refilling"
    assert any(free and docs for free, docs in refills[1:]), "no finished slot was refilled"


def test_rows_and_tokens_stay_within_the_budget(pair, monkeypatch):
    _, model = pair
    seen = []
    original = DecodeBatch.logits  # once a step
    monkeypatch.setattr(
        DecodeBatch,
        "logits",
        lambda self, *a: (seen.append((len(self), max(self.source_lengths))), original(self, *a))[1],
    )
    docs = token_documents(count=12, seed=1)
    out = list(
        generate_stream(model, docs, model.generation_config.updated(max_new_tokens=12), max_rows=5, max_tokens=90)
    )
    assert len(out) == 12
    assert max(rows for rows, _ in seen) <= 5
    assert all(rows * longest <= 90 or rows == 1 for rows, longest in seen)


def test_a_document_longer_than_the_budget_still_runs_alone(pair):
    _, model = pair
    docs = [(0, list(range(3, 60)) + [1])]
    out = list(
        generate_stream(model, docs, model.generation_config.updated(max_new_tokens=5), max_rows=4, max_tokens=20)
    )
    assert [key for key, _ in out] == [0]


def test_sampling_with_a_seed_is_reproducible(pair):
    _, model = pair
    config = model.generation_config.updated(do_sample=True, top_k=20, seed=3, max_new_tokens=10)
    first = dict(generate_stream(model, token_documents(6), config, max_rows=3))
    again = dict(generate_stream(model, token_documents(6), config, max_rows=3))
    assert first == again and len(first) == 6


def test_several_sequences_per_document_and_empty_streams(pair):
    _, model = pair
    with pytest.raises(ValueError, match="one sequence per document"):
        list(
            generate_stream(
                model,
                token_documents(2),
                model.generation_config.updated(num_beams=4, num_return_sequences=2),
                max_rows=2,
            )
        )
    assert list(generate_stream(model, [], model.generation_config.updated(max_new_tokens=4), max_rows=2)) == []


@pytest.mark.parametrize(
    "settings", [STREAM_SETTINGS["greedy_xlsum"], STREAM_SETTINGS["beam_xlsum"]], ids=["greedy", "beam"]
)
def test_streams_give_each_document_the_tokens_of_one_stream_each_on_one_thread(pair, settings, monkeypatch):
    _, model = pair
    steps = []  # (thread, torch threads, rows) of each step
    original = DecodeBatch.logits
    monkeypatch.setattr(
        DecodeBatch,
        "logits",
        lambda self: (
            steps.append((threading.current_thread().name, torch.get_num_threads(), self.sequences.shape[0])),
            original(self),
        )[1],
    )
    docs = token_documents(count=12, seed=2)
    config = model.generation_config.updated(**settings)
    beams = settings.get("num_beams", 1)
    threads = torch.get_num_threads()
    one = dict(generate_stream(model, docs, config, max_rows=5 * beams, streams=1))
    steps.clear()
    two = dict(generate_stream(model, docs, config, max_rows=5 * beams, streams=2))
    assert two == one and sorted(two) == [key for key, _ in docs]  # every document once, with the same tokens
    assert {name for name, _, _ in steps} == {"decode-stream-0", "decode-stream-1"}
    assert {count for _, count, _ in steps} == {1}  # one torch thread each
    rows = {name: max(n for other, _, n in steps if other == name) for name, _, _ in steps}
    assert rows == {"decode-stream-0": 3 * beams, "decode-stream-1": 2 * beams}  # 5 documents at once, shared out
    assert torch.get_num_threads() == threads


def test_an_error_in_one_stream_stops_the_others_and_reaches_the_caller(pair, monkeypatch):
    _, model = pair
    original, calls = DecodeBatch.logits, []

    def failing(self):
        calls.append(threading.current_thread().name)
        if threading.current_thread().name == "decode-stream-1" and calls.count("decode-stream-1") == 3:
            raise RuntimeError("stream 1 failed")
        return original(self)

    monkeypatch.setattr(DecodeBatch, "logits", failing)
    threads = torch.get_num_threads()
    config = model.generation_config.updated(max_new_tokens=30, min_new_tokens=30)  # no stream ends before
    with pytest.raises(RuntimeError, match="stream 1 failed"):
        list(generate_stream(model, token_documents(count=8), config, max_rows=4, streams=2))
    assert not [t for t in threading.enumerate() if t.name.startswith("decode-stream")]
    assert calls.count("decode-stream-0") < 30  # stopped at its next step, not decoded to the end
    assert torch.get_num_threads() == threads


def test_cpu_decodes_in_a_stream_per_thread_but_sampling_and_the_compiled_step(pair, monkeypatch):
    _, model = pair
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    config = model.generation_config
    assert cpu_streams(torch.device("cpu"), config.updated(num_beams=4)) == 3
    assert cpu_streams(torch.device("cpu"), config.updated(do_sample=True)) == 1
    assert cpu_streams(torch.device("cpu"), config.updated(compile=True)) == 1
    assert cpu_streams(torch.device("cuda"), config) == 1


def test_length_groups_keep_padding_within_ten_percent():
    lengths = [100, 12, 95, 91, 40, 11, 38, 300]
    groups = length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert groups == [[7], [0, 2, 3], [4, 6], [1, 5]]
    for group in groups:
        assert all(lengths[group[0]] <= 1.1 * lengths[i] for i in group)


def test_length_groups_hold_at_most_max_tokens_padded():
    lengths = [100, 12, 95, 91, 40, 11, 38, 300, 99, 97]
    groups = length_groups(lengths, max_tokens=250)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    # 300 alone exceeds the cap: a group of its own; of 100, 99, 97, 95, 91 (within 10 %) no three fit in 250.
    assert groups == [[7], [0, 8], [9, 2], [3], [4, 6], [1, 5]]
    assert all(len(g) * lengths[g[0]] <= 250 for g in groups[1:])
    assert length_groups(lengths, max_tokens=10_000) == length_groups(lengths)


@pytest.mark.parametrize("capped", [False, True])
def test_sources_encoded_in_length_groups_match_one_padded_batch(pair, monkeypatch, capped):
    _, model = pair
    rows = [ids for _, ids in token_documents(10, seed=4)]
    calls = []
    original = model.encode
    monkeypatch.setattr(model, "encode", lambda ids, mask: (calls.append(ids.shape), original(ids, mask))[1])
    longest = max(map(len, rows))
    groups = length_groups(list(map(len, rows)))
    if capped:  # on CPU, a cap on tokens that splits the biggest group
        biggest = max(groups, key=len)
        monkeypatch.setattr(decode_batch, "ENCODE_TOKENS_CPU", len(rows[biggest[0]]) * (len(biggest) - 1))
    with torch.inference_mode():
        batch = DecodeBatch(model, model.generation_config, Greedy(model.generation_config))
        batch._append(len(rows) + 2)
        batch._widen_sources(longest + 3)
        slots = torch.tensor([2, 0, 1, *range(3, len(rows) + 2)])[: len(rows)]  # not in order, not all of them
        batch._encode(rows, slots)
        assert len(calls) > 2, "one group: the fixture no longer exercises grouping"
        assert all(docs == 1 or docs * width <= decode_batch.ENCODE_TOKENS_CPU for docs, width in calls)
        assert len(calls) == len(groups) if not capped else len(calls) > len(groups)
        ids = torch.tensor([r + [0] * (longest - len(r)) for r in rows])
        expected = model.decoder.project_cross_kv(original(ids, (ids != 0).long()))
    mask = batch.encoder_mask[slots]
    assert torch.equal(mask[:, :longest], (ids != 0).long()) and not mask[:, longest:].any()
    assert not batch.encoder_mask[[len(rows), len(rows) + 1]].any()  # the slots not written
    mask = mask[:, :longest]
    k_v = [(k[slots, :, :longest], v[slots, :, :longest]) for k, v in batch.cross_kv]
    for (k, v), (want_k, want_v) in zip(k_v, expected):
        keep = mask.bool()[:, None, :, None]
        torch.testing.assert_close(k * keep, want_k * keep, atol=1e-5, rtol=0)
        torch.testing.assert_close(v * keep, want_v * keep, atol=1e-5, rtol=0)
    # On CPU the values are held transposed, and stay compact as the batch narrows to its longest source left.
    assert all(v.transpose(-1, -2).is_contiguous() for _, v in batch.cross_kv)
    batch.source_lengths = [longest - 1] * len(batch)
    batch._trim_sources()
    assert all(v.shape[2] == longest - 1 and v.transpose(-1, -2).is_contiguous() for _, v in batch.cross_kv)
