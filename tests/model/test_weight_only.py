"""int8 weight-only quantization: the layers it replaces, its error bound, and the same tokens as its dequantized
reference (a plain float model holding the weights the int8 layers multiply by), through generate() and through
continuous batching.

Against its dequantized reference, an int8 layer differs only in where the scale is applied: it computes
(x @ codes.T) * scales, the reference x @ (codes * scales).T. In float32 each product codes * scale is rounded
once (2^-24 relative) and the matmuls are the same kernel on the same shapes, so the logits differ by float32
rounding of the 3 + 2 layers of width 64: helpers.FP32_ATOL, as for our other same-model layouts. Where logits
agree that closely, tokens agree unless two candidates tie to within 1e-4, which random weights do not produce.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import model as ours
from model.decode import generate_stream
from model.inference import load_for_inference
from model.quantize import (
    FUSED_CPU_MAX_ROWS,
    Int8WeightOnlyLinear,
    dequantize_weight_only,
    int8_weight_only,
    is_quantized,
    quantize,
    quantized_bytes,
)
from model.vocabulary import restrict_vocabulary
from tests.model.helpers import FP32_ATOL, batch_with_padding, logits, token_documents

METHOD = "int8-weight-only"
# greedy and beam 4, as the pipeline decodes (the XL-Sum settings)
SETTINGS = {
    "greedy": dict(max_new_tokens=12, no_repeat_ngram_size=2),
    "beam4": dict(num_beams=4, no_repeat_ngram_size=2, length_penalty=0.6, max_new_tokens=12),
}


def quantized_and_reference(checkpoint, dtype=torch.float32, kept_ids=None):
    """(the int8 weight-only model, a plain model whose quantized layers hold their dequantized weights), with
    the output vocabulary restricted to `kept_ids` in both when given."""
    model = ours.MT5ForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype)
    if kept_ids is not None:  # restricted first, then quantized, as load_for_inference does
        restrict_vocabulary(model, kept_ids)
    quantize(model, METHOD)
    return model, dequantize_weight_only(copy.deepcopy(model))


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    return quantized_and_reference(tiny_checkpoint)


@pytest.fixture(scope="module")
def restricted_pair(tiny_checkpoint):
    """The pair over the ids the test inputs use: the same comparison, without converting a 250k-row head to
    float32 at every step (the eager formula's cost, which would take this file past a minute)."""
    return quantized_and_reference(tiny_checkpoint, kept_ids=range(4000))


def test_replaces_every_projection_but_wo_and_the_untied_head(pair):
    model, _ = pair
    replaced = {name for name, m in model.named_modules() if isinstance(m, Int8WeightOnlyLinear)}
    assert len(replaced) == 3 * 3 + 2 * 6 + 1  # per encoder block qkv, o, wi; per decoder block 6; lm_head
    assert "lm_head" in replaced
    # wo stays as loaded (WEIGHT_ONLY_KEEP_UNQUANTIZED), and nothing else is left behind
    assert {name for name, m in model.named_modules() if type(m) is nn.Linear} == {
        f"{stack}.blocks.{i}.ff.wo" for stack, n in (("encoder", 3), ("decoder", 2)) for i in range(n)
    }
    assert is_quantized(model)
    for name in replaced:
        layer = model.get_submodule(name)
        assert layer.weight.dtype == torch.int8 and layer.scales.dtype == torch.float32, name
        # one byte a weight plus one scale a row: a quarter of float32's bytes, half of bfloat16's
        assert quantized_bytes(layer) == layer.weight.numel() + 4 * layer.out_features, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_weight_is_within_half_a_scale_of_its_dequantized_value(tiny_checkpoint, dtype):
    full = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=dtype)
    model = quantize(ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=dtype), METHOD)
    for name, layer in model.named_modules():
        if not isinstance(layer, Int8WeightOnlyLinear):
            continue
        weight = full.get_submodule(name).weight.double()
        scales = layer.scales.double()[:, None]
        error = (weight - layer.weight.double() * scales).abs()  # exact in float64: no rounding of its own
        # half a scale, plus float32's rounding of weight / scale (|quotient| <= 127) for a weight half-way
        assert (error <= scales * (0.5 + 127 * 2**-24)).all(), f"{name}: {(error / scales).max():.8f} scales"
        assert layer.weight.abs().max() <= 127


def test_logits_agree_with_the_dequantized_reference_to_float32_rounding(pair):
    model, reference = pair
    for seed in (0, 2):
        torch.testing.assert_close(logits(model, seed), logits(reference, seed), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_generate_gives_the_tokens_of_the_dequantized_reference(restricted_pair, settings):
    model, reference = restricted_pair
    ids, mask = batch_with_padding(seed=3, batch=3)
    expected = reference.generate(input_ids=ids, attention_mask=mask, **settings)
    assert model.generate(input_ids=ids, attention_mask=mask, **settings).tolist() == expected.tolist()


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_continuous_batching_gives_the_tokens_of_the_dequantized_reference(restricted_pair, settings):
    model, reference = restricted_pair
    docs = token_documents(4)
    rows = 4 * settings.get("num_beams", 1)
    config = model.generation_config.updated(**settings)
    assert dict(generate_stream(model, docs, config, max_rows=rows)) == dict(
        generate_stream(reference, docs, config, max_rows=rows)
    )


def test_bfloat16_logits_agree_with_the_dequantized_reference_to_bfloat16_rounding(tiny_checkpoint):
    """In bfloat16 the int8 layer rounds twice where the reference rounds once: its matmul output to bfloat16
    before the scale, then the product (each 2^-9 relative), and the fused CPU kernel (up to 12 rows) sums in
    another order; the reference rounds each dequantized weight instead. Each layer's output so carries a few
    bfloat16 roundings more or less, and through 5 layers the logits differ by a few bfloat16 steps of the
    largest logit (a step is at most 2^-7 of the value; measured: 2.25 steps). Four steps bound that on any CPU
    without hiding a defect: a wrong scale or a transposed weight moves logits by whole units."""
    model, reference = quantized_and_reference(tiny_checkpoint, torch.bfloat16)
    got, expected = logits(model).float(), logits(reference).float()
    torch.testing.assert_close(got, expected, atol=4 * 2**-7 * expected.abs().max().item(), rtol=0)
    assert F.cosine_similarity(got.flatten(0, 1), expected.flatten(0, 1), dim=-1).min() > 0.999


@pytest.mark.parametrize("rows", [1, 4, FUSED_CPU_MAX_ROWS, FUSED_CPU_MAX_ROWS + 1, 40])
@pytest.mark.parametrize("width", [64, 40], ids=["multiple-of-16", "40"])
def test_a_bfloat16_layer_computes_its_dequantized_product_on_every_path(rows, width):
    """Up to FUSED_CPU_MAX_ROWS rows of a width in multiples of 16, torch's fused CPU kernel; otherwise the plain
    formula (a width of 40 would give garbage or crash in the kernel). Both sum float32 products of bfloat16
    values: against the float32 product of the same inputs, each differs by at most two roundings to bfloat16
    (half a step each, at most 2^-8 of the value) and by float32 summation order (about 2^-24 x 64 terms): 2^-6 of
    the largest output bounds that with a margin of two."""
    torch.manual_seed(0)
    layer = Int8WeightOnlyLinear(*int8_weight_only(torch.randn(96, width).bfloat16()))
    x = torch.randn(rows, width).bfloat16()
    expected = x.float() @ layer.dequantized().float().T
    atol = 2**-6 * expected.abs().max().item()
    torch.testing.assert_close(layer(x).float(), expected, atol=atol, rtol=0)
    torch.testing.assert_close(layer(x[None]).float()[0], expected, atol=atol, rtol=0)  # any leading shape


def test_restricted_head_is_quantized_and_generates_only_kept_ids(tiny_checkpoint):
    kept = list(range(3, 300))
    model = load_for_inference(tiny_checkpoint, quantization=METHOD, kept_ids=kept)
    assert isinstance(model.lm_head.kept, Int8WeightOnlyLinear)  # restricted first, then quantized (not packed)
    ids, mask = batch_with_padding()
    out = model.generate(input_ids=ids, attention_mask=mask, num_beams=4, max_new_tokens=8)
    assert set(out.flatten().tolist()) <= set(kept) | {0, 1}


def test_tied_head_stays_the_embedding(tiny_relu_tied_checkpoint):
    model = quantize(ours.MT5ForConditionalGeneration.from_pretrained(tiny_relu_tied_checkpoint), METHOD)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.shared.weight
    assert isinstance(model.encoder.blocks[0].ff.wi, Int8WeightOnlyLinear)
    assert torch.isfinite(logits(model)).all()


def test_saving_is_refused_like_the_other_methods(tiny_checkpoint, tmp_path):
    model = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint, quantization=METHOD)
    with pytest.raises(ValueError, match="save the model before quantizing it"):
        model.save_pretrained(tmp_path / "out")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bfloat16_model_gives_the_tokens_of_its_dequantized_reference(tiny_checkpoint):
    model, reference = (m.cuda() for m in quantized_and_reference(tiny_checkpoint, torch.bfloat16))
    assert model.encoder.blocks[0].self_attn.qkv.weight.device.type == "cuda"
    ids, mask = (t.cuda() for t in batch_with_padding(seed=3, batch=6))
    got = model.generate(input_ids=ids, attention_mask=mask, **SETTINGS["greedy"])
    assert got.tolist() == reference.generate(input_ids=ids, attention_mask=mask, **SETTINGS["greedy"]).tolist()


def test_compiled_decode_step_gives_the_tokens_of_the_dequantized_reference(restricted_pair, monkeypatch):
    """Through torch.compile(fullgraph=True) the layer takes the plain formula, the one gpt-fast compiles into a
    single kernel (the fused CPU kernel's data_ptr check cannot be traced). Dynamo's eager backend traces the same
    whole graph in seconds; inductor's kernels compute the same formula."""
    from model import compiled_decode

    monkeypatch.setattr(compiled_decode, "BACKEND", "eager")
    model, reference = restricted_pair
    docs = [(key, ids) for key, ids in token_documents(20, seed=2) if 17 <= len(ids) <= 32][:4]  # one width bucket
    settings = SETTINGS["greedy"]
    compiled = generate_stream(model, docs, model.generation_config.updated(**settings, compile=True), max_rows=4)
    eager = generate_stream(reference, docs, reference.generation_config.updated(**settings), max_rows=4)
    assert dict(compiled) == dict(eager)
