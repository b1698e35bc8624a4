"""The oneDNN-prepacked output head and projections: the same tokens as transformers, the same checkpoint saved,
and the cases they must leave alone."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import model as ours
from model.decode import generate_stream
from model.packed import (
    PackedLinear,
    can_pack,
    can_pack_int8,
    pack_head_for_cpu,
    pack_linears_for_cpu,
    unpack,
)
from model.quantize import FEW_ROWS, Int8HeadBlocks, quantize
from model.vocabulary import restrict_vocabulary
from tests.model.helpers import (
    FP32_ATOL,
    GENERATE_SETTINGS,
    STREAM_SETTINGS,
    batch_with_padding,
    decoder_inputs,
    logits,
    token_documents,
)

pytestmark = pytest.mark.skipif(not can_pack(), reason="this torch has no oneDNN prepacked linear")


# Each block's projections: self-attention qkv and o, feed-forward wi and wo; the decoder's cross-attention q, kv, o.
PROJECTIONS_PER_LAYER = {"encoder": 4, "decoder": 7}


def packed(checkpoint):
    """The model laid out as load_for_inference lays it out on CPU: head and projections packed."""
    model = ours.MT5ForConditionalGeneration.from_pretrained(checkpoint)
    assert pack_head_for_cpu(model)
    c = model.config
    projections = (
        PROJECTIONS_PER_LAYER["encoder"] * c.num_layers + PROJECTIONS_PER_LAYER["decoder"] * c.num_decoder_layers
    )
    assert pack_linears_for_cpu(model) == projections
    assert isinstance(model.lm_head, PackedLinear) and isinstance(model.decoder.blocks[0].ff.wo, PackedLinear)
    assert not any(type(m) is nn.Linear for m in model.modules())
    return model


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return transformers.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()


def test_packed_logits_agree_with_the_plain_head_to_float32_rounding(tiny_checkpoint):
    plain = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    model = packed(tiny_checkpoint)
    for seed in (0, 2):
        torch.testing.assert_close(logits(model, seed), logits(plain, seed), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("settings", GENERATE_SETTINGS.values(), ids=GENERATE_SETTINGS.keys())
def test_packed_generate_is_token_identical_to_transformers(tiny_checkpoint, reference, settings):
    model = packed(tiny_checkpoint)
    ids, mask = batch_with_padding(seed=3, batch=6)
    expected = reference.generate(input_ids=ids, attention_mask=mask, **settings)
    assert model.generate(input_ids=ids, attention_mask=mask, **settings).tolist() == expected.tolist()


@pytest.mark.parametrize("name", ["greedy_xlsum", "beam_xlsum"])
def test_packed_continuous_batching_is_token_identical_to_transformers(tiny_checkpoint, reference, name):
    model = packed(tiny_checkpoint)
    settings = STREAM_SETTINGS[name]
    docs = token_documents()
    got = dict(
        generate_stream(
            model, docs, model.generation_config.updated(**settings), max_rows=4 * settings.get("num_beams", 1)
        )
    )
    for key, ids in docs:
        assert got[key] == reference.generate(input_ids=torch.tensor([ids]), **settings)[0].tolist(), key


def test_a_packed_model_deep_copies_into_an_equal_packed_model(tiny_checkpoint):
    """copy.deepcopy (benchmarks and users copy models) cannot copy oneDNN's opaque tensor: the copy packs again."""
    import copy

    model = packed(tiny_checkpoint)
    copied = copy.deepcopy(model)
    assert isinstance(copied.decoder.blocks[0].ff.wo, PackedLinear)
    assert copied.decoder.blocks[0].ff.wo.packed is not model.decoder.blocks[0].ff.wo.packed
    assert torch.equal(logits(copied), logits(model))


def test_a_packed_model_saves_the_checkpoint_it_was_loaded_from(tiny_checkpoint, tmp_path):
    plain = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    model = packed(tiny_checkpoint)
    state, expected = model.state_dict(), plain.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[name], expected[name]) for name in expected)  # unpacked bit for bit
    model.save_pretrained(tmp_path)
    reloaded = transformers.MT5ForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(reloaded.lm_head.weight, plain.lm_head.weight)
    wo = reloaded.decoder.block[0].layer[2].DenseReluDense.wo.weight
    assert torch.equal(wo, plain.decoder.blocks[0].ff.wo.weight)


def test_loading_a_state_dict_repacks_the_head(tiny_checkpoint):
    model = packed(tiny_checkpoint)
    state = model.state_dict()
    state["lm_head.weight"] = state["lm_head.weight"] * 2
    model.load_state_dict(state)
    doubled = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        doubled.lm_head.weight *= 2
    torch.testing.assert_close(logits(model), logits(doubled), atol=2 * FP32_ATOL, rtol=0)
    state["lm_head.weight"] = state["lm_head.weight"][:10]
    with pytest.raises(RuntimeError, match="lm_head.weight: shape"):
        model.load_state_dict(state)


def test_training_through_a_packed_head_fails_clearly(tiny_checkpoint):
    model = packed(tiny_checkpoint).train()
    ids, mask = batch_with_padding()
    with pytest.raises(RuntimeError, match="packed linear layer is for inference only"):
        model(input_ids=ids, attention_mask=mask, labels=decoder_inputs()).loss.backward()


def test_unpacking_restores_a_trainable_plain_model(tiny_checkpoint):
    plain = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    model = packed(tiny_checkpoint)
    assert unpack(model) == sum(type(m) is nn.Linear for m in plain.modules()) and not unpack(model)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert all(torch.equal(model.state_dict()[name], weight) for name, weight in plain.state_dict().items())
    model.requires_grad_(True)
    ids, mask = batch_with_padding()
    model.train()(input_ids=ids, attention_mask=mask, labels=decoder_inputs()).loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    assert model.encoder.blocks[0].self_attn.qkv.weight.grad.abs().sum() > 0


def test_restricted_head_packs_its_kept_rows(tiny_checkpoint):
    kept = range(0, 4000, 7)
    plain = restrict_vocabulary(ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint), kept)
    model = restrict_vocabulary(ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint), kept)
    assert pack_head_for_cpu(model) and isinstance(model.lm_head.kept, PackedLinear)
    expected, got = logits(plain), logits(model)
    ids = plain.lm_head.kept_ids
    torch.testing.assert_close(got[..., ids], expected[..., ids], atol=FP32_ATOL, rtol=0)
    assert torch.equal(torch.isneginf(got), torch.isneginf(expected))


def test_heads_it_cannot_pack_are_left_alone(tiny_checkpoint, tiny_relu_tied_checkpoint):
    tied = ours.MT5ForConditionalGeneration.from_pretrained(tiny_relu_tied_checkpoint)
    assert not pack_head_for_cpu(tied)
    assert tied.lm_head.weight is tied.shared.weight

    int8 = quantize(ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint), "int8-dynamic")
    head = int8.lm_head
    assert pack_head_for_cpu(int8) == can_pack_int8() and int8.lm_head is head  # repacked in place, or left

    half = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype="bfloat16")
    assert not pack_head_for_cpu(half) and type(half.lm_head) is nn.Linear

    model = packed(tiny_checkpoint)
    assert not pack_head_for_cpu(model)  # already packed


@pytest.mark.skipif(not can_pack_int8(), reason="the int8 head is prepacked for oneDNN on CPUs with VNNI only")
def test_int8_dynamic_head_prepacked_for_onednn_keeps_fbgemms_logits_to_rounding_and_tokens(tiny_checkpoint):
    int8 = quantize(ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint), "int8-dynamic")
    expected, weight, keys = logits(int8), int8.lm_head.weight(), set(int8.state_dict())
    settings = STREAM_SETTINGS["beam_xlsum"]
    config, docs = int8.generation_config.updated(**settings), token_documents()
    # One stream: int8-dynamic's tokens depend on which documents share a step, and in streams that is timing's.
    tokens = dict(generate_stream(int8, docs, config, max_rows=16, streams=1))
    assert pack_head_for_cpu(int8)
    # Both kernels quantize the input alike and sum the int8 products exactly (|sum| <= 127 * 127 * d_model, an
    # integer float32 holds exactly); each then rounds at most three float products (scales, sum): each result
    # is within 1.5 eps of the exact one, relative, so within 3 eps of the other.
    torch.testing.assert_close(logits(int8), expected, rtol=4 * torch.finfo(torch.float32).eps, atol=0)
    assert set(int8.state_dict()) == keys  # the same checkpoint: same int8 weight and scales
    assert torch.equal(int8.lm_head.weight().int_repr(), weight.int_repr())
    assert torch.equal(int8.lm_head.weight().q_per_channel_scales(), weight.q_per_channel_scales())
    assert dict(generate_stream(int8, docs, config, max_rows=16, streams=1)) == tokens


@pytest.mark.skipif(not can_pack_int8(), reason="the int8 head is prepacked for oneDNN on CPUs with VNNI only")
def test_an_int8_dynamic_head_packed_again_elsewhere_is_repacked_for_onednn(tiny_checkpoint):
    """load_for_inference packs the head for oneDNN once; a copy (packed again for the engine set then, fbgemm) or
    a loaded state dict must not pass for one packed for oneDNN, or pack_head_for_cpu would leave it on fbgemm."""
    import copy

    from model.packed import is_dynamic_int8
    from model.quantize import dynamic_int8_engine, runs_over_sources

    def engines(model) -> set:
        return {dynamic_int8_engine(block) for block in model.lm_head.blocks}  # the head is in vocabulary blocks

    def few_rows_engines(model) -> set:
        return {dynamic_int8_engine(layer) for layer in model.lm_head.few_rows}  # its copy for a few rows

    model = ours.load_for_inference(tiny_checkpoint, quantization="int8-dynamic")
    assert engines(model) == {"onednn"} and few_rows_engines(model) == {"fbgemm"}
    expected = logits(model)
    copied = copy.deepcopy(model)
    assert engines(copied) == few_rows_engines(copied) == {None}
    assert pack_head_for_cpu(copied) and engines(copied) == {"onednn"} and few_rows_engines(copied) == {"fbgemm"}
    # The projections over source tokens were packed again too, for the engine set now: pack_linears_for_cpu
    # repacks them (and packs the float32 `wo` layers, as it does for any model).
    over_sources = [m for name, m in copied.named_modules() if is_dynamic_int8(m) and runs_over_sources(name)]
    float_wo = [m for m in copied.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32]
    assert len(over_sources) == 3 * 3 + 2  # the encoder's qkv, o and wi in its 3 blocks; kv in the decoder's 2
    assert {dynamic_int8_engine(layer) for layer in over_sources} == {None}
    assert pack_linears_for_cpu(copied) == len(float_wo) + len(over_sources)
    assert {dynamic_int8_engine(layer) for layer in over_sources} == {"onednn"}
    assert torch.equal(logits(copied), expected)  # the same kernels again: equal, not merely close
    model.lm_head.load_state_dict(model.lm_head.state_dict())
    assert engines(model) == {None}
    assert pack_head_for_cpu(model) and torch.equal(logits(model), expected)
    assert engines(model) == {"onednn"} and few_rows_engines(model) == {"fbgemm"}
    # Other weights loaded into the blocks reach the copy for a few rows too.
    negated = nn.Linear(model.config.d_model, model.config.vocab_size, bias=False)
    negated.weight.data = -ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint).lm_head.weight.data
    other = Int8HeadBlocks.from_float(negated, "onednn")
    model.lm_head.load_state_dict(other.state_dict())
    assert pack_head_for_cpu(model)
    hidden = torch.randn(FEW_ROWS, model.config.d_model)
    assert torch.equal(model.lm_head(hidden), other(hidden)) and not torch.equal(other(hidden), copied.lm_head(hidden))


def test_projections_it_cannot_pack_are_left_alone(tiny_checkpoint):
    int8 = quantize(ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint), "int8-dynamic")
    from model.packed import int8_source_engine, is_dynamic_int8
    from model.quantize import runs_over_sources

    float_wo = [m for m in int8.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32]
    # int8-dynamic keeps wo unquantized: those are packed, and of the int8 layers (quantize() packed them for the
    # engine set now) those over source tokens are repacked where int8_source_engine says, the rest left.
    over_sources = [m for name, m in int8.named_modules() if is_dynamic_int8(m) and runs_over_sources(name)]
    assert pack_linears_for_cpu(int8) == len(float_wo) + (len(over_sources) if int8_source_engine() else 0)
    assert pack_linears_for_cpu(int8) == 0
    half = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype="bfloat16")
    assert pack_linears_for_cpu(half) == 0
    model = packed(tiny_checkpoint)
    assert pack_linears_for_cpu(model) == 0  # already packed


def test_a_model_for_the_compiled_step_packs_its_head_alone_and_a_packed_one_is_refused(tiny_checkpoint):
    from model.compiled_decode import CompiledDecodeBatch
    from model.decode import Greedy

    for_compile = ours.load_for_inference(tiny_checkpoint, compile_decode=True)
    assert isinstance(for_compile.lm_head, PackedLinear)
    assert sum(isinstance(m, PackedLinear) for m in for_compile.modules()) == 1
    model = ours.load_for_inference(tiny_checkpoint)
    config = model.generation_config.updated(compile=True)
    with pytest.raises(ValueError, match="compile_decode=True"):
        CompiledDecodeBatch(model, config, Greedy(config), 4)
