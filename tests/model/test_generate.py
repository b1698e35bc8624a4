"""Generation behaviour beyond parity: sampling, settings, and the cache layout that makes it fast."""

from __future__ import annotations

import pytest
import torch

import model as ours
from model.decode import BeamSearch, logsumexp
from model.decode_batch import DecodeBatch, StepBuffers
from model.logits import TOP_K_CHUNK, TOP_K_MARGIN, argmax, ban_repeated_ngrams, chunk_maxima, top_k
from tests.model.helpers import batch_with_padding


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)


def test_sampling_with_a_seed_is_reproducible_and_varies_with_it(tiny):
    ids, mask = batch_with_padding()
    settings = dict(do_sample=True, top_k=20, top_p=0.9, temperature=1.5, max_new_tokens=12)
    first = tiny.generate(input_ids=ids, attention_mask=mask, seed=7, **settings)
    again = tiny.generate(input_ids=ids, attention_mask=mask, seed=7, **settings)
    other = tiny.generate(input_ids=ids, attention_mask=mask, seed=8, **settings)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_sampling_with_top_k_one_is_greedy(tiny):
    ids, mask = batch_with_padding()
    greedy = tiny.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12)
    sampled = tiny.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=1, seed=3, max_new_tokens=12)
    assert torch.equal(greedy, sampled)


def test_num_return_sequences_with_sampling_gives_that_many_rows(tiny):
    ids, mask = batch_with_padding(batch=2)
    out = tiny.generate(
        input_ids=ids, attention_mask=mask, do_sample=True, num_return_sequences=3, seed=1, max_new_tokens=6
    )
    assert out.shape[0] == 6


def test_rows_per_document_is_the_searchs_rows_beam_sampling_included():
    """One rule sizes a batch's rows (decode_stream's search, decode_streams' shares, generate, the pipeline's
    budget): beam sampling takes a row per beam, not per returned sequence."""
    settings = ours.GenerationConfig
    assert settings().rows_per_document() == 1
    assert settings(do_sample=True, num_return_sequences=3).rows_per_document() == 3
    assert settings(num_beams=4, num_return_sequences=2).rows_per_document() == 4
    assert settings(num_beams=4, do_sample=True, num_return_sequences=2).rows_per_document() == 4


def test_unknown_or_invalid_settings_are_refused(tiny):
    ids, mask = batch_with_padding(batch=1)
    with pytest.raises(TypeError, match="num_beam"):
        tiny.generate(input_ids=ids, attention_mask=mask, num_beam=4)
    with pytest.raises(ValueError, match="num_return_sequences"):
        tiny.generate(input_ids=ids, attention_mask=mask, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="top_p"):
        tiny.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_p=0.0)


def test_cross_attention_kv_is_per_document_not_per_beam_and_cache_is_preallocated(tiny):
    ids, mask = batch_with_padding(batch=3)
    config = tiny.generation_config.updated(num_beams=4, max_length=20, max_new_tokens=None)
    state = DecodeBatch(tiny, config, BeamSearch(config, None, tiny.device))
    with torch.no_grad():
        state.refill([], [(i, row[m.bool()].tolist()) for i, (row, m) in enumerate(zip(ids, mask))])
    k, v = state.cross_kv[0]
    assert k.shape[0] == 3 and v.shape[0] == 3  # shared by the 4 beams of each document
    assert state.caches[0].k.shape == (12, tiny.config.num_heads, 20, tiny.config.d_kv)


def test_steps_read_and_reorder_only_the_cache_positions_written_so_far(tiny):
    """A beam decode at its 4th step reads 4 cache positions of 20: NaN past them changes neither its logits
    nor, after a reorder of the beams, the positions read next (a NaN read would spread to both)."""
    ids, mask = batch_with_padding(batch=3)
    config = tiny.generation_config.updated(num_beams=4, max_length=20, max_new_tokens=None, eos_token_id=-1)
    sources = [(i, row[m.bool()].tolist()) for i, (row, m) in enumerate(zip(ids, mask))]
    reorder = torch.arange(12).flip(0)

    def fourth_step(poison: bool):
        search = BeamSearch(config, None, tiny.device)
        state = DecodeBatch(tiny, config, search)
        with torch.no_grad():
            state.refill([], sources)
            for _ in range(3):
                search.step(state)
            if poison:
                for cache in state.caches:
                    cache.k[:, :, 4:] = float("nan")
                    cache.v[:, :, 4:] = float("nan")
            logits = state.logits()
            state.reorder_rows(reorder)
        return state, logits

    clean, clean_logits = fourth_step(poison=False)
    poisoned, poisoned_logits = fourth_step(poison=True)
    assert clean.caches[0].visible == 4 and int(clean.lengths.max()) == 4
    assert torch.equal(poisoned_logits, clean_logits) and poisoned_logits.isfinite().all()
    for cache, reference in zip(poisoned.caches, clean.caches):
        assert torch.equal(cache.k[:, :, :4], reference.k[:, :, :4]) and cache.k[:, :, :4].isfinite().all()
        assert torch.equal(cache.v[:, :, :4], reference.v[:, :, :4])


def test_no_repeat_ngram_bans_exactly_the_completing_tokens():
    sequences = torch.tensor([[0, 5, 6, 7, 5], [0, 1, 2, 3, 4]])
    scores = torch.zeros(2, 10)
    banned = ban_repeated_ngrams(sequences, scores, 2, torch.tensor([5, 5])).isinf()
    assert banned[0].nonzero().flatten().tolist() == [6]  # "5 6" seen, last token is 5
    assert not banned[1].any()


def test_no_repeat_ngram_with_row_lengths_reads_only_each_rows_tokens():
    # Row 0 is [0, 5, 7] (length 3): what lies past its length must not count, whatever it holds.
    sequences = torch.tensor([[0, 5, 7, 7, 8], [0, 5, 6, 7, 5]])
    scores = torch.zeros(2, 10)
    banned = ban_repeated_ngrams(sequences, scores, 2, torch.tensor([3, 5])).isinf()
    assert not banned[0].any()
    assert banned[1].nonzero().flatten().tolist() == [6]


@pytest.mark.parametrize("n", [250112, 40 * TOP_K_CHUNK + 77, 3 * TOP_K_CHUNK])
def test_chunked_top_k_equals_torch_topk(n):
    # Distinct scores (a permutation), so that the indices are defined too; row 0 holds its best scores in
    # one chunk, row 1 in the tail past the last whole chunk, row 2 has most ids banned (-inf).
    k, rows = 8, 5
    generator = torch.Generator().manual_seed(0)
    scores = torch.stack([torch.randperm(n, generator=generator).float() for _ in range(rows)])
    scores[0, TOP_K_CHUNK : TOP_K_CHUNK + 2 * k] += n
    scores[1, n - 5 :] += n
    scores[2, : n - 3 * k] = float("-inf")
    values, ids = top_k(scores, k)
    expected_values, expected_ids = torch.topk(scores, k)
    assert torch.equal(values, expected_values)
    assert torch.equal(ids, expected_ids)


@pytest.mark.parametrize("n", [250112, 40 * TOP_K_CHUNK + 77])
def test_top_k_from_maxima_taken_before_bans_equals_torch_topk_after_them(n):
    # Beam search takes the chunk maxima, then the logits processors ban ids (-inf), then top_k reads the maxima
    # as bounds. Row 0 loses its single best id; row 1 the maxima of TOP_K_MARGIN + 1 of its best chunks; row 2
    # every id of its k + TOP_K_MARGIN best chunks, so that the chunks the bounds point to hold nothing (only a
    # search anew finds its best); row 3 is banned nowhere; row 4's best ids are its last ones (past the last
    # whole chunk where n leaves a tail).
    k, rows = 8, 5
    generator = torch.Generator().manual_seed(1)
    scores = torch.stack([torch.randperm(n, generator=generator).float() for _ in range(rows)])
    scores[4, n - 3 :] += n
    bounds, top = chunk_maxima(scores)
    assert torch.equal(top, scores.amax(-1, keepdim=True))
    chunks = scores[:, : n - n % TOP_K_CHUNK].view(rows, -1, TOP_K_CHUNK)
    scores[0, scores[0].argmax()] = float("-inf")
    for c in bounds[1].topk(TOP_K_MARGIN + 1)[1]:
        chunks[1, c, chunks[1, c].argmax()] = float("-inf")
    chunks[2, bounds[2].topk(k + TOP_K_MARGIN)[1]] = float("-inf")
    values, ids = top_k(scores, k, bounds)
    expected_values, expected_ids = torch.topk(scores, k)
    assert torch.equal(values, expected_values)
    assert torch.equal(ids, expected_ids)


def test_normalizer_from_a_given_row_maximum_is_the_same():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 250_112, generator=generator) * 4
    assert torch.equal(logsumexp(x, StepBuffers(), chunk_maxima(x)[1]), logsumexp(x, StepBuffers()))


@pytest.mark.parametrize("n", [250112, 40 * TOP_K_CHUNK + 77, 3 * TOP_K_CHUNK, TOP_K_CHUNK - 1])
def test_chunked_argmax_equals_torch_argmax(n):
    # Scores from few values, so that most rows hold their maximum many times: argmax is the first of them.
    # Row 0 ties its maximum across two chunks; row 1's only maximum is in the tail past the last whole
    # chunk, row 2 ties the best whole-chunk score in the tail (the earlier id wins); row 3 is all -inf;
    # rows 4 and 5 hold a NaN, which argmax takes as the maximum, in a chunk and in the tail.
    rows = 8
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (rows, n), generator=generator).float()
    scores[0, [n // 2, 7]] = 9.0
    scores[1, n - 1] = 9.0
    scores[2, [3, n - 2]] = 9.0
    scores[3] = float("-inf")
    scores[4, [n // 3, n - 1]] = float("nan")
    scores[5, n - 1] = float("nan")
    assert torch.equal(argmax(scores), scores.argmax(-1))


def test_beam_search_normalizer_is_logsumexp_to_float32_rounding():
    """The log-softmax normalizer beam search computes (exp2 of scaled differences, terms below exp's floor
    raised to it) against float64's, over mT5's vocabulary: rows of several spreads, one with banned (-inf)
    ids, one with most ids far below its maximum. float32 sums of 250k positive terms in torch's cascade
    err by a few ulps relative; the log turns that into as much absolute error, and adding the maximum
    rounds once more: 64 eps + 2 ulps of the result bounds both with room."""
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(250_112, generator=generator) * spread for spread in (0.1, 1.0, 5.0, 30.0)]
    banned = torch.randn(250_112, generator=generator)
    banned[::3] = float("-inf")
    far = torch.full((250_112,), -200.0)
    far[:10] = torch.randn(10, generator=generator)
    x = torch.stack([*rows, banned, far])
    ours_ = logsumexp(x, StepBuffers()).squeeze(1).double()
    reference = torch.logsumexp(x.double(), -1)
    eps = torch.finfo(torch.float32).eps
    assert ((ours_ - reference).abs() <= 64 * eps + 2 * eps * reference.abs()).all(), (ours_ - reference).tolist()
