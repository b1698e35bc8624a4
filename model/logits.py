"""The logits processors transformers applies before choosing a token, in its order, as tensor ops with no
host sync. Each row has its own length: rows of a decode batch joined it at different steps."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .generate import GenerationConfig

NEG_INF = float("-inf")


class LogitsProcessor:
    def __init__(self, config: GenerationConfig):
        self.config = config

    def __call__(self, sequences: torch.Tensor, scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """scores [rows, vocab] float32, changed in place, for the next token after each row's first
        `lengths` [rows] tokens of `sequences` [rows, max_len] (decoder start included). Past its length a row
        holds decoder_start, a token every sequence has, so the repetition penalty is unchanged by it."""
        c = self.config
        if c.repetition_penalty != 1.0:
            seen = torch.gather(scores, 1, sequences)
            seen = torch.where(seen < 0, seen * c.repetition_penalty, seen / c.repetition_penalty)
            scores = scores.scatter(1, sequences, seen)
        if c.no_repeat_ngram_size > 0:
            scores = ban_repeated_ngrams(sequences, scores, c.no_repeat_ngram_size, lengths)
        if c.min_length > 0 or c.min_new_tokens is not None:
            too_short = (lengths < c.min_length) | (lengths - 1 < (c.min_new_tokens or 0))
            scores[:, c.eos_token_id] = scores[:, c.eos_token_id].masked_fill(too_short, NEG_INF)
        if c.do_sample:
            scores = self.warp(scores)
        return scores

    def warp(self, scores: torch.Tensor) -> torch.Tensor:
        """Temperature, top-k and top-p, for sampling."""
        c = self.config
        # Beam sampling leaves one token besides EOS, so that beams can continue.
        min_tokens_to_keep = 2 if c.num_beams > 1 else 1
        if c.temperature != 1.0:
            scores = scores / c.temperature
        if c.top_k:
            k = min(max(c.top_k, min_tokens_to_keep), scores.shape[-1])
            threshold = top_k(scores, k)[0][..., -1, None]
            scores = scores.masked_fill(scores < threshold, NEG_INF)
        if c.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= (1 - c.top_p)
            drop[..., -min_tokens_to_keep:] = False
            scores = scores.masked_fill(drop.scatter(1, order, drop), NEG_INF)
        return scores


def ban_repeated_ngrams(sequences: torch.Tensor, scores: torch.Tensor, n: int, lengths: torch.Tensor) -> torch.Tensor:
    """Forbid, in place, any token that would complete an n-gram already in a row's first `lengths` tokens.

    sequences [rows, max_len]. The bans are written straight into `scores` at the few ids concerned
    (O(rows x length) work): a [rows, vocab] mask of the 250k vocabulary would cost three passes over it
    per step."""
    if sequences.shape[1] < n:
        return scores
    windows = sequences.unfold(1, n, 1)  # [rows, max_len - n + 1, n]
    last = lengths[:, None] - n + 1 + torch.arange(n - 1, device=sequences.device)
    prefix = torch.gather(sequences, 1, last.clamp(min=0))  # each row's last n-1 tokens
    inside = torch.arange(windows.shape[1], device=sequences.device)[None, :] + n <= lengths[:, None]
    match = (windows[:, :, :-1] == prefix[:, None, :]).all(-1) & inside  # [rows, windows]
    # min(score, +inf) leaves a score as it is and min(score, -inf) bans it, whatever the duplicates' order.
    ban = torch.where(match, NEG_INF, float("inf")).to(scores.dtype)
    return scores.scatter_reduce_(1, windows[:, :, -1], ban, reduce="amin")


# top_k's first pass reads each row in chunks of this many scores and keeps each chunk's maximum.
TOP_K_CHUNK = 256

# Chunks top_k searches beyond k when it is given chunk maxima taken before the logits processors banned ids.
# A ban can only lower a chunk's maximum, so those maxima bound the scores from above; the k best are then shown
# to lie in the chunks searched unless more than this many of them lost their maximum to a ban (an n-gram ban
# strikes the few tokens that followed the last one before, min_length strikes EOS), and otherwise searched anew.
TOP_K_MARGIN = 4


def chunk_maxima(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(each whole chunk's maximum [rows, n // TOP_K_CHUNK], each row's maximum [rows, 1]) of scores [rows, n],
    in one pass over them: the row's maximum is that of its chunks' and of the ids past the last whole chunk."""
    rows, n = scores.shape
    whole = n - n % TOP_K_CHUNK
    maxima = scores[:, :whole].view(rows, whole // TOP_K_CHUNK, TOP_K_CHUNK).amax(-1)
    top = maxima.amax(-1, keepdim=True) if whole else scores.new_full((rows, 1), float("-inf"))
    if whole < n:
        top = torch.maximum(top, scores[:, whole:].amax(-1, keepdim=True))
    return maxima, top


def top_k(scores: torch.Tensor, k: int, bounds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(scores, k) (largest, sorted) over the last dimension of [rows, n], for k far below n.

    torch.topk partially sorts every row: at 64 rows of mT5's 250k ids it took longer than the whole
    normalizer. Here one pass takes each chunk's maximum, and only the k chunks with the largest maxima are
    searched. They hold the k best scores: every chunk holding one of them has a maximum at least the k-th
    best score, and each chunk whose maximum is above it holds one of the others. So the values are
    torch.topk's exactly, and so are the indices but for ties between equal scores, whose order torch.topk
    does not define either.

    `bounds` [rows, n // TOP_K_CHUNK], chunk maxima of the scores before some of them were lowered (chunk_maxima
    before the logits processors' bans), save that pass: the k + TOP_K_MARGIN chunks of largest bound are
    searched, and the k best found are the row's k best when the k-th is above the largest bound left out (no
    score outside can reach it). Checking that reads a result back to the host, so bounds are for CPU tensors;
    where the check fails, the row's chunks are searched anew."""
    rows, n = scores.shape
    chunk = TOP_K_CHUNK
    whole = n - n % chunk  # the ids in whole chunks; the rest (fewer than `chunk`) are always searched
    searched = k if bounds is None else k + TOP_K_MARGIN
    if searched * chunk >= whole:
        return torch.topk(scores, k)
    if bounds is None:
        maxima = scores[:, :whole].view(rows, whole // chunk, chunk).amax(-1)  # [rows, chunks]
        best = torch.topk(maxima, k, sorted=False)[1]
    else:
        ranked, order = torch.topk(bounds, searched + 1)  # the last: the largest bound left out
        best = order[:, :searched]
    best = best.sort(-1)[0]  # in id order, as torch.topk would meet them
    ids = (best[:, :, None] * chunk + torch.arange(chunk, device=scores.device)).view(rows, searched * chunk)
    if whole < n:
        ids = torch.cat([ids, torch.arange(whole, n, device=scores.device).expand(rows, n - whole)], 1)
    values, picked = torch.topk(torch.gather(scores, 1, ids), k)
    if bounds is not None and not bool((values[:, -1] > ranked[:, -1]).all()):
        return top_k(scores, k)
    return values, torch.gather(ids, 1, picked)


def argmax(scores: torch.Tensor) -> torch.Tensor:
    """scores.argmax(-1) over [rows, n], exactly, the first of equal maxima included.

    torch.argmax tracks an index beside every comparison and does not vectorize: over 16 rows of mT5's
    250k ids it took 2.1 ms on one AMD EPYC core where amax took 0.2 (on Intel, 7.6 ms of a 94 ms greedy
    step). Here amax takes each chunk's maximum, argmax over those few thousand maxima finds the first
    chunk holding the row's maximum, and argmax searches that chunk alone. The first chunk holding the
    maximum holds its first occurrence, so the index is argmax's. A NaN, which argmax and amax both treat
    as the maximum, is found the same way."""
    rows, n = scores.shape
    chunk = TOP_K_CHUNK
    whole = n - n % chunk
    # A GPU's argmax is one reduction kernel already.
    if whole == 0 or rows == 0 or scores.device.type != "cpu":
        return scores.argmax(-1)
    chunks = scores[:, :whole].reshape(rows, whole // chunk, chunk)
    maxima = chunks.amax(-1)
    first = maxima.argmax(-1)  # [rows]
    best = first * chunk + chunks[torch.arange(rows), first].argmax(-1)
    if whole == n:
        return best
    # The ids past the last whole chunk (a restricted vocabulary's odd size) win only on a larger score:
    # on a tie the earlier id is argmax's.
    tail = scores[:, whole:]
    tail_best, whole_best = tail.amax(-1), maxima.amax(-1)
    tail_wins = (tail_best > whole_best) | (tail_best.isnan() & ~whole_best.isnan())
    return torch.where(tail_wins, whole + tail.argmax(-1), best)
