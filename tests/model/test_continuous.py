"""Continuous batching: every document gets the tokens generate() and transformers give it alone."""
from __future__ import annotations

import pytest
import torch
import transformers

import model as ours
from model.continuous import Slots, generate_stream, length_groups


def documents(count: int = 14, seed: int = 0) -> list[tuple[int, list[int]]]:
    """Sources of varied length, each ending in EOS."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for key in range(count):
        length = int(torch.randint(4, 40, (1,), generator=g))
        out.append((key, torch.randint(3, 4000, (length,), generator=g).tolist() + [1]))
    return out


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    reference = transformers.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    return reference, ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)


SETTINGS = {
    "greedy_xlsum": dict(max_new_tokens=30, no_repeat_ngram_size=2),
    "greedy_min_new_tokens_repetition_penalty": dict(max_new_tokens=20, min_new_tokens=6, repetition_penalty=1.3,
                                                     no_repeat_ngram_size=3),
    "beam_xlsum": dict(num_beams=4, no_repeat_ngram_size=2, length_penalty=0.6, max_new_tokens=30),
    "beam_early_stopping": dict(num_beams=3, early_stopping=True, max_new_tokens=20),
    "beam_never_stop": dict(num_beams=2, early_stopping="never", length_penalty=1.2, max_new_tokens=14),
}


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_each_document_gets_the_tokens_of_generate_and_transformers_alone(pair, settings, monkeypatch):
    reference, model = pair
    refills = []
    original = Slots.refill
    monkeypatch.setattr(Slots, "refill", lambda self, free, docs: (refills.append((len(free), len(docs))),
                                                                   original(self, free, docs)))
    docs = documents()
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
    original = Slots.step
    monkeypatch.setattr(Slots, "step", lambda self, *a: (seen.append((len(self), max(self.source_lengths))),
                                                         original(self, *a)))
    docs = documents(count=12, seed=1)
    out = list(generate_stream(model, docs, model.generation_config.updated(max_new_tokens=12),
                               max_rows=5, max_tokens=90))
    assert len(out) == 12
    assert max(rows for rows, _ in seen) <= 5
    assert all(rows * longest <= 90 or rows == 1 for rows, longest in seen)


def test_a_document_longer_than_the_budget_still_runs_alone(pair):
    _, model = pair
    docs = [(0, list(range(3, 60)) + [1])]
    out = list(generate_stream(model, docs, model.generation_config.updated(max_new_tokens=5), max_rows=4,
                               max_tokens=20))
    assert [key for key, _ in out] == [0]


def test_sampling_with_a_seed_is_reproducible(pair):
    _, model = pair
    config = model.generation_config.updated(do_sample=True, top_k=20, seed=3, max_new_tokens=10)
    first = dict(generate_stream(model, documents(6), config, max_rows=3))
    again = dict(generate_stream(model, documents(6), config, max_rows=3))
    assert first == again and len(first) == 6


def test_several_sequences_per_document_and_empty_streams(pair):
    _, model = pair
    with pytest.raises(ValueError, match="one sequence per document"):
        list(generate_stream(model, documents(2), model.generation_config.updated(num_beams=4, num_return_sequences=2),
                             max_rows=2))
    assert list(generate_stream(model, [], model.generation_config.updated(max_new_tokens=4), max_rows=2)) == []


def test_length_groups_keep_padding_within_ten_percent():
    lengths = [100, 12, 95, 91, 40, 11, 38, 300]
    groups = length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert groups == [[7], [0, 2, 3], [4, 6], [1, 5]]
    for group in groups:
        assert all(lengths[group[0]] <= 1.1 * lengths[i] for i in group)


def test_sources_encoded_in_length_groups_match_one_padded_batch(pair, monkeypatch):
    _, model = pair
    rows = [ids for _, ids in documents(10, seed=4)]
    calls = []
    original = model.encode
    monkeypatch.setattr(model, "encode", lambda ids, mask: (calls.append(ids.shape), original(ids, mask))[1])
    with torch.inference_mode():
        k_v, mask = Slots(model, model.generation_config)._encode(rows)
        assert len(calls) > 2, "one group: the fixture no longer exercises grouping"
        longest = max(map(len, rows))
        ids = torch.tensor([r + [0] * (longest - len(r)) for r in rows])
        expected = model.decoder.project_cross_kv(original(ids, (ids != 0).long()))
    assert torch.equal(mask, (ids != 0).long())
    for (k, v), (want_k, want_v) in zip(k_v, expected):
        keep = mask.bool()[:, None, :, None]
        torch.testing.assert_close(k * keep, want_k * keep, atol=1e-5, rtol=0)
        torch.testing.assert_close(v * keep, want_v * keep, atol=1e-5, rtol=0)
