"""Sampled tokens follow the softmax of the processed logits: temperature, top-k, top-p, and beam sampling.

The logits are fixed rows over a small vocabulary, and each row is drawn from many times in one step (many rows
of a batch). Two things are checked:
- the processed logits are transformers' (its TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper on
  the same logits), bit for bit: the same ops in the same order;
- the tokens a step draws are distributed as the softmax of those processed logits.

The distribution check is an L1 bound that no seed is tuned to: by the Bretagnolle-Huber-Carol inequality, the
empirical distribution p^ of n draws from p over k categories satisfies P(|p^ - p|_1 >= l) <= 2^k exp(-n l^2 / 2).
We take l so that this is FALSE_FAILURE = 1e-9 per check; with under 20 checks in this file a correct sampler
fails it with probability under 2e-8, whatever the seed and the CPU. The rows are shaped so that what the
processors decide shows at that resolution: the tokens at the top-k and top-p boundaries each hold a few
percent of the mass, and a temperature of 0.7 moves L1 by more than 0.2.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from model.decode import BeamSearch, Sampling
from model.generate import GenerationConfig
from model.logits import LogitsProcessor

VOCAB = 40
EOS = 1
DRAWS = 100_000  # per distinct row
FALSE_FAILURE = 1e-9


def _l1_bound(categories: int, draws: int) -> float:
    """The L1 distance an empirical distribution exceeds with probability FALSE_FAILURE (Bretagnolle-Huber-Carol)."""
    return math.sqrt(2 * (categories * math.log(2) + math.log(1 / FALSE_FAILURE)) / draws)


def _logits(rows: int, seed: int) -> torch.Tensor:
    """[rows, VOCAB]: a few likely tokens, then a long tail, in a different order in each row."""
    generator = torch.Generator().manual_seed(seed)
    levels = torch.linspace(2.0, -2.0, VOCAB) + 0.3 * torch.randn(VOCAB, generator=generator)
    return torch.stack([levels[torch.randperm(VOCAB, generator=generator)] for _ in range(rows)])


def _transformers_warped(scores: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """What transformers' _get_logits_processor applies when sampling, in its order."""
    keep = 2 if config.num_beams > 1 else 1  # one token besides the single EOS
    warpers = []
    if config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k:
        warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=keep))
    if config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=keep))
    for warper in warpers:
        scores = warper(None, scores)
    return scores


def _processed(config: GenerationConfig, scores: torch.Tensor) -> torch.Tensor:
    rows = scores.shape[0]
    sequences, lengths = torch.zeros(rows, 1, dtype=torch.long), torch.ones(rows, dtype=torch.long)
    ours = LogitsProcessor(config)(sequences, scores.clone(), lengths)
    theirs = _transformers_warped(scores.clone(), config)
    assert torch.equal(ours.isinf(), theirs.isinf())
    assert torch.equal(ours, theirs)
    return ours


def _off_by_one(config: GenerationConfig, scores: torch.Tensor, expected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Distributions a slightly wrong processor would give: one token more or fewer kept at the top-k or top-p
    boundary, or the temperature left out."""
    scaled, kept, rows = scores / config.temperature, expected > 0, torch.arange(len(scores))
    wrong = {}
    if config.top_k or config.top_p < 1.0:
        more, fewer = kept.clone(), kept.clone()
        more[rows, scaled.masked_fill(kept, -math.inf).argmax(-1)] = True
        fewer[rows, scaled.masked_fill(~kept, math.inf).argmin(-1)] = False
        for name, mask in [("one token more", more), ("one token fewer", fewer)]:
            wrong[name] = scaled.masked_fill(~mask, -math.inf).softmax(-1)
    if config.temperature != 1.0:
        wrong["no temperature"] = scores.masked_fill(~kept, -math.inf).softmax(-1)
    return wrong


def _assert_follows(draws: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """draws [n] of categories 0..len(expected)-1, against the probabilities `expected`."""
    assert bool((expected[draws] > 0).all()), f"{what}: drew a token the processors removed"
    empirical = torch.bincount(draws, minlength=expected.numel()).double() / draws.numel()
    distance = float((empirical - expected.double()).abs().sum())
    bound = _l1_bound(int((expected > 0).sum()), draws.numel())
    assert distance < bound, f"{what}: L1 {distance:.4f} from the softmax of the processed logits (bound {bound:.4f})"


SAMPLING = {
    "temperature": dict(temperature=0.7, top_k=0),
    "top-k": dict(top_k=6),
    "top-p": dict(top_p=0.6, top_k=0),
    "temperature, top-k and top-p": dict(temperature=1.3, top_k=12, top_p=0.9),
}


@pytest.mark.parametrize("settings", SAMPLING.values(), ids=SAMPLING.keys())
def test_sampled_tokens_follow_the_softmax_of_transformers_processed_logits(settings):
    config = GenerationConfig(do_sample=True, eos_token_id=EOS, **settings)
    distinct = _logits(3, seed=0)
    expected = _processed(config, distinct).softmax(-1)
    # What the processors decide shows at the test's resolution: a step off by one token at the top-k or top-p
    # boundary, or the temperature left out, moves each row by more than twice the bound (then even draws at the
    # bound's distance from the truth stay out of reach of that wrong distribution).
    bound = _l1_bound(int((expected[0] > 0).sum()), DRAWS)
    for name, wrong in _off_by_one(config, distinct, expected).items():
        assert float((wrong - expected).abs().sum(-1).min()) > 2 * bound, name

    # one step of a batch of 3 * DRAWS rows, each row one of the three, as a document's rows decode
    rows = distinct.repeat(DRAWS, 1)
    search = Sampling(config, torch.Generator().manual_seed(0))
    batch = SimpleNamespace(
        sequences=torch.zeros(len(rows), 2, dtype=torch.long),
        lengths=torch.ones(len(rows), dtype=torch.long),
        decoding=torch.ones(len(rows), dtype=torch.bool),
        max_len=2,
        logits=lambda: rows.clone(),
    )
    search.step(batch)
    tokens = batch.sequences[:, 1].view(DRAWS, 3)
    for row in range(3):
        _assert_follows(tokens[:, row], expected[row], f"row {row}")


def test_beam_sampling_draws_continuations_without_replacement_from_the_processed_softmax():
    """transformers' beam sampling draws 2 x num_beams continuations of a document's beams, without replacement,
    from softmax(processed log_softmax + the beam's running score) over beams x vocabulary: the first draw
    follows that distribution q, and the second q_j * sum over i != j of q_i / (1 - q_i)."""
    beams = 2
    config = GenerationConfig(do_sample=True, num_beams=beams, temperature=0.8, top_k=6, top_p=0.9, eos_token_id=EOS)
    logits = _logits(beams, seed=1)  # one document's beams
    running = torch.tensor([0.0, -0.7])
    processed = _processed(config, torch.log_softmax(logits, -1))  # keeps 2 tokens at least: EOS and one more
    expected_scores = (processed + running[:, None]).view(-1)
    q = expected_scores.softmax(-1).double()

    search = BeamSearch(config, torch.Generator().manual_seed(0), torch.device("cpu"))
    search.running_scores = running.repeat(DRAWS, 1)  # DRAWS documents with the same beams
    batch = SimpleNamespace(
        sequences=torch.zeros(DRAWS * beams, 2, dtype=torch.long), lengths=torch.ones(DRAWS * beams, dtype=torch.long)
    )
    scores, picked = search.candidates(logits.repeat(DRAWS, 1), batch)
    assert picked.shape == (DRAWS, 2 * beams)
    assert bool((picked.sort(-1).values.diff(dim=-1) > 0).all())  # without replacement
    assert torch.equal(scores, expected_scores[picked])

    _assert_follows(picked[:, 0], q, "first draw")
    others = (q / (1 - q)).sum() - q / (1 - q)  # sum over i != j of q_i / (1 - q_i)
    _assert_follows(picked[:, 1], q * others, "second draw")
