"""ROUGE-1, ROUGE-2 and ROUGE-L for summaries in any script.

Method: both texts are NFKC-normalized and casefolded. A token is a maximal run of letters, combining
marks and digits (Unicode categories L*, M*, N*; so Cyrillic, Arabic and Devanagari words stay whole,
vowel signs and viramas included), except that every character of a script written without spaces
(Han, Hiragana, Katakana, Thai, Lao, Khmer, Myanmar) is a token of its own. Everything else
(spaces, punctuation, symbols) separates tokens. No stemming, no stop words. ROUGE-N is the F1 of
clipped n-gram overlap; ROUGE-L is the F1 of the longest common subsequence of the two token
sequences (sentence-level, not summary-level). Each score is averaged over documents and reported x100.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from collections import Counter

# Scripts written without spaces between words: each character is a token. Ranges of their blocks
# (after NFKC, so half-width Katakana and compatibility ideographs have already become standard forms).
NO_SPACE_RANGES = (
    (0x0E00, 0x0E7F),  # Thai
    (0x0E80, 0x0EFF),  # Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x19E0, 0x19FF),  # Khmer symbols
    (0x2E80, 0x2FDF),  # CJK and Kangxi radicals
    (0x3005, 0x3007),  # 々 〆 〇
    (0x3040, 0x309F),  # Hiragana
    (0x30A0, 0x30FF),  # Katakana (with the prolonged sound mark ー)
    (0x31F0, 0x31FF),  # Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xA9E0, 0xA9FF),  # Myanmar extended-B
    (0xAA60, 0xAA7F),  # Myanmar extended-A
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFF9F),  # half-width Katakana
    (0x1B000, 0x1B16F),  # Kana supplement and extensions
    (0x20000, 0x323AF),  # CJK extensions B-H and the compatibility supplement
)

METRICS = ("rouge1", "rouge2", "rougeL")


def _class(ranges: list[tuple[int, int]]) -> str:
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)


@functools.cache
def _token_pattern() -> re.Pattern:
    """One character of a no-space script, or a run of other letters, marks and digits. Built once from
    unicodedata (about 0.2 s): Python's re has no \\p{L} classes."""

    def no_space(cp: int) -> bool:
        return any(a <= cp <= b for a, b in NO_SPACE_RANGES)

    word, single = [], []
    for cp in range(sys.maxunicode + 1):
        if 0xD800 <= cp <= 0xDFFF or unicodedata.category(chr(cp))[0] not in "LMN":
            continue
        ranges = single if no_space(cp) else word
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1] = (ranges[-1][0], cp)
        else:
            ranges.append((cp, cp))
    return re.compile(f"[{_class(single)}]|[{_class(word)}]+")


def tokenize(text: str) -> list[str]:
    """The tokens ROUGE compares (see the module docstring)."""
    return _token_pattern().findall(unicodedata.normalize("NFKC", text).casefold())


def _f1(overlap: int, predicted: int, reference: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / predicted, overlap / reference
    return 2 * precision * recall / (precision + recall)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(zip(*(tokens[i:] for i in range(n))))


def rouge_n(predicted: list[str], reference: list[str], n: int) -> float:
    """F1 of the n-gram overlap, each n-gram counted at most as often as it occurs in either text."""
    pred, ref = _ngrams(predicted, n), _ngrams(reference, n)
    overlap = sum((pred & ref).values())
    return _f1(overlap, sum(pred.values()), sum(ref.values()))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyro 2004): one big-int step per token
    of `b` instead of a len(a) x len(b) table, which keeps 10k long CJK pairs to seconds."""
    if not a or not b:
        return 0
    positions: dict[str, int] = {}
    for i, token in enumerate(a):
        positions[token] = positions.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full  # a 0 bit at i: a[i] ends a match of the LCS so far
    for token in b:
        u = v & positions.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(predicted: list[str], reference: list[str]) -> float:
    """Sentence-level ROUGE-L: F1 of the longest common subsequence of the two token sequences."""
    return _f1(lcs_length(reference, predicted), len(predicted), len(reference))


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L F1, averaged over documents, x100. An empty prediction or reference scores 0."""
    if len(predictions) != len(references):
        raise ValueError(f"rouge: {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("rouge: no documents to score")
    totals = dict.fromkeys(METRICS, 0.0)
    for prediction, reference in zip(predictions, references):
        pred, ref = tokenize(prediction), tokenize(reference)
        totals["rouge1"] += rouge_n(pred, ref, 1)
        totals["rouge2"] += rouge_n(pred, ref, 2)
        totals["rougeL"] += rouge_l(pred, ref)
    return {name: 100 * total / len(predictions) for name, total in totals.items()}
