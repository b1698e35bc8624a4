"""Output-vocabulary restriction: exact logits on the kept ids, -inf elsewhere, never an id outside, int8-dynamic."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

import model as ours
from model.quantize import quantize
from model.vocabulary import RestrictedHead, kept_ids_from_text, restrict_vocabulary
from synthetic.corpus import documents
from tests.model.helpers import batch_with_padding, logits


def sample_ids(checkpoint) -> set[int]:
    """The pieces of some English and Russian text: a few dozen of the 250k."""
    tokenizer = ours.MT5Tokenizer.from_pretrained(checkpoint)
    return kept_ids_from_text(tokenizer, [d["text"] for d in documents(40, seed=3) if d["lang"] in ("en", "ru")])


def test_kept_ids_score_exactly_as_the_full_head_and_every_other_id_is_minus_infinity(each_tiny_checkpoint):
    kept = sample_ids(each_tiny_checkpoint)
    full = ours.MT5ForConditionalGeneration.from_pretrained(each_tiny_checkpoint)
    model = restrict_vocabulary(ours.MT5ForConditionalGeneration.from_pretrained(each_tiny_checkpoint), kept)
    ids = model.lm_head.kept_ids
    assert set(ids.tolist()) == kept | {0, 1}  # pad, eos (= decoder start) always kept
    assert model.lm_head.kept.weight.shape == (len(ids), model.config.d_model)
    for seed in (0, 3):
        expected, got = logits(full, seed), logits(model, seed)
        assert got.shape == expected.shape
        # the same dot products of the same rows (the tied model's d_model**-0.5 rescale included)
        assert torch.equal(got[..., ids], expected[..., ids])
        outside = torch.ones(got.shape[-1], dtype=torch.bool)
        outside[ids] = False
        assert torch.isneginf(got[..., outside]).all()


def test_generation_never_emits_an_id_outside_the_kept_set(each_tiny_checkpoint):
    kept = sample_ids(each_tiny_checkpoint)
    model = restrict_vocabulary(ours.MT5ForConditionalGeneration.from_pretrained(each_tiny_checkpoint), kept)
    ids, mask = batch_with_padding()
    for settings in (dict(num_beams=1), dict(num_beams=4, no_repeat_ngram_size=2), dict(do_sample=True, seed=1)):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, **settings)
        assert set(out.flatten().tolist()) <= kept | {0, 1}, settings


def test_restricting_then_int8_dynamic_quantizes_the_smaller_head(tiny_checkpoint):
    kept = sample_ids(tiny_checkpoint)
    model = restrict_vocabulary(ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint), kept)
    quantize(model, "int8-dynamic")
    assert type(model.lm_head) is RestrictedHead and type(model.lm_head.kept) is DynamicLinear
    assert model.lm_head.kept.out_features == len(kept | {0, 1})
    ids, mask = batch_with_padding()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, num_beams=4, no_repeat_ngram_size=2)
    assert set(out.flatten().tolist()) <= kept | {0, 1}
    # close to the restricted float32 model on the kept ids (the int8 path's tolerance, test_quantize.py)
    expected = logits(restrict_vocabulary(ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint), kept))
    got = logits(model)
    keep = model.lm_head.kept_ids
    span = (expected[..., keep].max() - expected[..., keep].min()).item()
    torch.testing.assert_close(got[..., keep], expected[..., keep], atol=0.1 * span, rtol=0)
    assert torch.isneginf(got[..., 2]).all() and 2 not in kept  # <unk> is not in the sample


def test_kept_ids_are_the_pieces_of_the_sample_text(tiny_checkpoint):
    tokenizer = ours.MT5Tokenizer.from_pretrained(tiny_checkpoint)
    texts = ["the summary of a long report", "это река озеро город"]
    assert kept_ids_from_text(tokenizer, texts) == {i for t in texts for i in tokenizer.encode(t)}
    assert kept_ids_from_text(tokenizer, texts, batch=1) == kept_ids_from_text(tokenizer, texts)


def test_misuse_is_a_clear_error(tiny_checkpoint, tmp_path):
    model = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 250112\)"):
        restrict_vocabulary(model, {5, 250112})
    assert type(model.lm_head) is nn.Linear
    with pytest.raises(ValueError, match="load it unquantized, restrict it, then quantize"):
        restrict_vocabulary(
            quantize(ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint), "int8-dynamic"), {5}
        )
    restrict_vocabulary(model, {5})
    with pytest.raises(ValueError, match="already restricted"):
        restrict_vocabulary(model, {6})
    # saving would write a checkpoint without lm_head.weight
    with pytest.raises(ValueError, match="before restricting its output vocabulary"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
