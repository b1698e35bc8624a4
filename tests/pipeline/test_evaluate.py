"""ROUGE-1/2/L over any script: hand-computed cases, non-Latin scripts, normalization, rouge_score on English."""

from __future__ import annotations

import random

import pytest

from pipeline.evaluate import lcs_length, rouge, tokenize


def scores(prediction: str, reference: str) -> dict[str, float]:
    return rouge([prediction], [reference])


def assert_scores(got: dict[str, float], rouge1: float, rouge2: float, rougeL: float) -> None:
    assert got == pytest.approx({"rouge1": rouge1, "rouge2": rouge2, "rougeL": rougeL}, abs=1e-9)


def test_identical_text_scores_100_and_disjoint_text_0():
    text = "The quick brown fox jumps over the lazy dog."
    assert_scores(scores(text, text), 100, 100, 100)
    assert_scores(scores("alpha beta gamma", "delta epsilon"), 0, 0, 0)


def test_hand_computed_overlap():
    # unigrams: the x2, cat, on, mat shared = 5 of 6 each side; bigrams: the-cat, on-the, the-mat = 3 of 5;
    # LCS: the cat on the mat = 5 of 6
    assert_scores(scores("the cat sat on the mat", "the cat is on the mat"), 500 / 6, 60, 500 / 6)


def test_hand_computed_order_and_clipping_and_length():
    # same words, reversed: every unigram, no bigram, an LCS of one token
    assert_scores(scores("a b c d", "d c b a"), 100, 0, 25)
    # "the" predicted three times but present once: clipped to 1; P 1/3, R 1/2 -> F1 0.4
    assert_scores(scores("the the the", "the cat"), 40, 0, 40)
    # P 1, R 1/3 -> F1 0.5; a one-token prediction has no bigram
    assert_scores(scores("cat", "the cat sat"), 50, 0, 50)


def test_scores_are_averaged_over_documents():
    assert_scores(rouge(["a b", "x"], ["a b", "y"]), 50, 50, 50)


def test_lcs_matches_dynamic_programming():
    def table(a, b):
        rows = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                rows[i + 1][j + 1] = rows[i][j] + 1 if x == y else max(rows[i][j + 1], rows[i + 1][j])
        return rows[-1][-1]

    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 70))]  # past 64 bits too
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 70))]
        assert lcs_length(a, b) == lcs_length(b, a) == table(a, b)


def test_chinese_and_japanese_score_one_token_per_character():
    assert tokenize("今天天气很好") == list("今天天气很好")
    # 4 of 6 characters; bigrams 今天 天天 天气 of 5; LCS 今天天气
    assert_scores(scores("今天天气很好", "今天天气不错"), 400 / 6, 60, 400 / 6)
    assert tokenize("東京は晴れです。") == list("東京は晴れです")
    got = scores("東京は晴れです", "東京は雨です")  # 5 shared of 7 and 6: F1 = 10/13
    assert got["rouge1"] == pytest.approx(1000 / 13) and got["rougeL"] == pytest.approx(1000 / 13)
    assert 0 < got["rouge2"] < 100
    assert tokenize("ภาษาไทย") == list("ภาษาไทย")  # Thai, marks included: one token per character


def test_hindi_keeps_vowel_signs_and_viramas_inside_words():
    assert tokenize("भारत की राजधानी नई दिल्ली है") == ["भारत", "की", "राजधानी", "नई", "दिल्ली", "है"]
    got = scores("भारत की राजधानी नई दिल्ली है", "नई दिल्ली भारत की राजधानी है")
    assert got["rouge1"] == pytest.approx(100)
    assert got["rougeL"] == pytest.approx(400 / 6)  # भारत की राजधानी है
    assert 0 < got["rouge2"] < 100


def test_arabic_and_russian_score_whole_words():
    assert tokenize("مَرْحَبًا بالعالم") == ["مَرْحَبًا", "بالعالم"]  # harakat stay in the word
    # unigrams: all 3 of 4 (P 1, R 3/4); bigrams: 1 of 2 and 3; LCS: عاصمة مصر, 2 of 3 and 4
    assert_scores(scores("القاهرة عاصمة مصر", "عاصمة مصر هي القاهرة"), 600 / 7, 40, 400 / 7)
    assert tokenize("Москва — столица России.") == ["москва", "столица", "россии"]
    assert_scores(scores("Москва — столица России", "столица России Москва"), 100, 50, 200 / 3)


def test_casefold_and_nfkc_make_equivalent_spellings_equal():
    for a, b in [
        ("Straße", "STRASSE"),
        ("ＡＢＣ １２３", "abc 123"),
        ("ﬁne", "fine"),
        ("cafe\u0301", "caf\u00e9"),
        ("ｶﾀｶﾅ", "カタカナ"),
        ("ΣΊΣΥΦΟΣ", "σίσυφος"),
    ]:
        assert tokenize(a) == tokenize(b), (a, b)
        assert_scores(scores(a, b), 100, 100 if len(tokenize(a)) > 1 else 0, 100)


def test_empty_or_punctuation_only_text_scores_zero():
    assert_scores(scores("", "a reference summary"), 0, 0, 0)
    assert_scores(scores("... !!", "a reference summary"), 0, 0, 0)
    assert_scores(scores("a prediction", ""), 0, 0, 0)
    assert_scores(scores("", ""), 0, 0, 0)  # as rouge_score: nothing to match


def test_mismatched_or_empty_inputs_are_refused():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no documents"):
        rouge([], [])


ENGLISH = (
    "The U.S. economy grew 3.5% in Q2, officials said on Tuesday. Don't expect rates to fall; "
    "the Fed's e-mail (sent 10/12) hinted at 2 more hikes. Analysts at JPMorgan & Co. were SURPRISED "
    "by the 4th-quarter numbers and the company's forecast for 2025"
).split()


def test_english_equals_rouge_score_without_stemming():
    """rouge_score lowercases and keeps runs of [a-z0-9]; on ASCII text ours tokenizes the same. They part
    on non-ASCII letters: rouge_score drops them (café -> caf, Hindi or Chinese -> nothing, scored 0),
    ours keeps them, after NFKC and casefolding (Straße -> strasse, full-width -> ASCII)."""
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="pip install rouge-score to compare")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    rng = random.Random(0)
    predictions, references = [], []
    for _ in range(200):
        predictions.append(" ".join(rng.choice(ENGLISH) for _ in range(rng.randint(0, 25))))
        references.append(" ".join(rng.choice(ENGLISH) for _ in range(rng.randint(1, 40))))
    predictions[:2] = references[:2]  # and a few exact matches
    expected = {name: 0.0 for name in ("rouge1", "rouge2", "rougeL")}
    for prediction, reference in zip(predictions, references):
        for name, score in scorer.score(reference, prediction).items():
            expected[name] += 100 * score.fmeasure / len(predictions)
    assert rouge(predictions, references) == pytest.approx(expected, abs=1e-9)

    hindi = "भारत की राजधानी नई दिल्ली है"
    assert scorer.score(hindi, hindi)["rouge1"].fmeasure == 0  # what a Latin-only tokenizer does to Hindi
    assert scores(hindi, hindi)["rouge1"] == 100
