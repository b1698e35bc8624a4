"""Our mT5 against transformers on the same checkpoints: logits, hidden states, losses, every head, generate."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import model as ours
from tests.model.helpers import (
    GENERATE_SETTINGS,
    assert_as_close_to_float64_as_transformers,
    batch_with_padding,
    decoder_inputs,
)


def assert_outputs_as_close_as_transformers(reference, model, names: tuple[str, ...], **inputs) -> None:
    """Each named output of ours within ROUNDING_MARGIN of transformers' own float32 error (tests/model/helpers.py)."""
    with torch.no_grad():
        expected, got = reference(**inputs), model(**inputs)
        exact = copy.deepcopy(reference).double()(**inputs)  # the exact values, to float32's eyes
    for name in names:
        assert_as_close_to_float64_as_transformers(getattr(got, name), getattr(expected, name), getattr(exact, name))


@pytest.fixture(scope="module")
def pair(each_tiny_checkpoint):
    """(transformers model, our model) from the same directory."""
    reference = transformers.MT5ForConditionalGeneration.from_pretrained(each_tiny_checkpoint).eval()
    return reference, ours.MT5ForConditionalGeneration.from_pretrained(each_tiny_checkpoint)


def test_logits_and_encoder_states_match_transformers_with_padding(pair):
    reference, model = pair
    ids, mask = batch_with_padding()
    dec = decoder_inputs()
    assert_outputs_as_close_as_transformers(
        reference,
        model,
        ("logits", "encoder_last_hidden_state"),
        input_ids=ids,
        attention_mask=mask,
        decoder_input_ids=dec,
    )


def test_loss_with_ignored_labels_matches_transformers(pair):
    reference, model = pair
    ids, mask = batch_with_padding()
    labels = decoder_inputs(seed=2)[:, 1:].contiguous()
    labels[1, 3:] = -100
    assert_outputs_as_close_as_transformers(
        reference, model, ("loss", "logits"), input_ids=ids, attention_mask=mask, labels=labels
    )


@pytest.mark.parametrize("settings", GENERATE_SETTINGS.values(), ids=GENERATE_SETTINGS.keys())
def test_generate_is_token_identical_to_transformers(pair, settings):
    reference, model = pair
    ids, mask = batch_with_padding(seed=3, batch=6)
    expected = reference.generate(input_ids=ids, attention_mask=mask, **settings)
    got = model.generate(input_ids=ids, attention_mask=mask, **settings)
    assert got.tolist() == expected.tolist()


def test_generation_fixture_exercises_eos(pair):
    """Parity is only meaningful if some sequences stop early: check the fixture makes them."""
    _, model = pair
    ids, mask = batch_with_padding(seed=3, batch=6)
    out = model.generate(input_ids=ids, attention_mask=mask, **GENERATE_SETTINGS["xlsum_beam"])
    finished = (out == 1).any(1)
    assert finished.any()


def test_generation_config_json_supplies_defaults(tiny_checkpoint, tmp_path):
    reference = transformers.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    reference.generation_config.update(num_beams=3, max_new_tokens=10, no_repeat_ngram_size=2)
    reference.save_pretrained(tmp_path)
    (tmp_path / "spiece.model").write_bytes((tiny_checkpoint / "spiece.model").read_bytes())
    model = ours.MT5ForConditionalGeneration.from_pretrained(tmp_path)
    assert (model.generation_config.num_beams, model.generation_config.max_new_tokens) == (3, 10)
    ids, mask = batch_with_padding(seed=4)
    assert (
        model.generate(input_ids=ids, attention_mask=mask).tolist()
        == reference.generate(input_ids=ids, attention_mask=mask).tolist()
    )


@pytest.mark.slow
def test_mt5_small_shape_matches_transformers(small_checkpoint):
    reference = transformers.MT5ForConditionalGeneration.from_pretrained(small_checkpoint).eval()
    model = ours.MT5ForConditionalGeneration.from_pretrained(small_checkpoint)
    ids, mask = batch_with_padding(batch=3, length=24)
    assert_outputs_as_close_as_transformers(
        reference, model, ("logits",), input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_inputs(batch=3)
    )
    for settings in (
        dict(max_new_tokens=12),
        dict(num_beams=4, no_repeat_ngram_size=2, length_penalty=0.6, max_new_tokens=12),
    ):
        assert (
            model.generate(input_ids=ids, attention_mask=mask, **settings).tolist()
            == reference.generate(input_ids=ids, attention_mask=mask, **settings).tolist()
        )


# --- the other five classes -------------------------------------------------------------------------


def _head_pair(cls_name: str, tiny_checkpoint, tmp_path, **config_overrides):
    config = transformers.MT5Config.from_pretrained(tiny_checkpoint, **config_overrides)
    torch.manual_seed(5)
    reference = getattr(transformers, cls_name)(config).eval()
    reference.save_pretrained(tmp_path)
    return reference, getattr(ours, cls_name).from_pretrained(tmp_path)


def test_mt5_model_and_encoder_model_match_transformers(tiny_checkpoint, tmp_path):
    ids, mask = batch_with_padding()
    dec = decoder_inputs()
    reference, model = _head_pair("MT5Model", tiny_checkpoint, tmp_path / "bare")
    assert_outputs_as_close_as_transformers(
        reference,
        model,
        ("last_hidden_state", "encoder_last_hidden_state"),
        input_ids=ids,
        attention_mask=mask,
        decoder_input_ids=dec,
    )
    reference, model = _head_pair("MT5EncoderModel", tiny_checkpoint, tmp_path / "encoder")
    assert_outputs_as_close_as_transformers(
        reference, model, ("last_hidden_state",), input_ids=ids, attention_mask=mask
    )


@pytest.mark.parametrize(
    "problem,labels",
    [
        ("regression", torch.tensor([0.5, -1.0, 2.0, 0.0])),
        ("single_label_classification", torch.tensor([0, 2, 1, 2])),
        ("multi_label_classification", torch.tensor([[1.0, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]])),
    ],
)
def test_sequence_classification_logits_and_loss_match_transformers(tiny_checkpoint, tmp_path, problem, labels):
    num_labels = 1 if problem == "regression" else 3
    reference, model = _head_pair(
        "MT5ForSequenceClassification", tiny_checkpoint, tmp_path, num_labels=num_labels, problem_type=problem
    )
    ids, mask = batch_with_padding()  # one EOS per row
    assert_outputs_as_close_as_transformers(
        reference, model, ("logits", "loss"), input_ids=ids, attention_mask=mask, labels=labels
    )


def test_token_classification_matches_transformers(tiny_checkpoint, tmp_path):
    reference, model = _head_pair("MT5ForTokenClassification", tiny_checkpoint, tmp_path, num_labels=5)
    ids, mask = batch_with_padding()
    labels = torch.randint(0, 5, ids.shape, generator=torch.Generator().manual_seed(6))
    assert_outputs_as_close_as_transformers(
        reference, model, ("logits", "loss"), input_ids=ids, attention_mask=mask, labels=labels
    )


def test_question_answering_matches_transformers(tiny_checkpoint, tmp_path):
    reference, model = _head_pair("MT5ForQuestionAnswering", tiny_checkpoint, tmp_path)
    ids, mask = batch_with_padding()
    start, end = torch.tensor([1, 3, 0, 50]), torch.tensor([2, 5, 1, 60])  # 50, 60: outside, ignored
    assert_outputs_as_close_as_transformers(
        reference,
        model,
        ("start_logits", "end_logits", "loss"),
        input_ids=ids,
        attention_mask=mask,
        start_positions=start,
        end_positions=end,
    )


@pytest.mark.parametrize("name", ["greedy", "xlsum_beam", "beam_early_stopping_two_returned"])
def test_rows_leave_the_batch_once_finished_and_tokens_stay_identical(pair, name, monkeypatch):
    """Finished rows (greedy) and settled sources (beam search) are dropped from the batch mid-decode;
    the parity above only proves that safe if it happens in these runs, so count it here."""
    from model.decode_batch import DecodeBatch

    reference, model = pair
    kept = []
    original = DecodeBatch._select
    monkeypatch.setattr(DecodeBatch, "_select", lambda self, slots: (kept.append(len(slots)), original(self, slots)))
    settings = dict(GENERATE_SETTINGS[name], max_new_tokens=40)
    ids, mask = batch_with_padding(seed=5, batch=8)
    expected = reference.generate(input_ids=ids, attention_mask=mask, **settings)
    got = model.generate(input_ids=ids, attention_mask=mask, **settings)
    assert got.tolist() == expected.tolist()
    assert kept, "no row left the batch: the fixture no longer exercises compaction"
