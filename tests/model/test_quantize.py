"""Quantized replicas through bitsandbytes (int8, nf4, fp4) and torch's dynamic int8: layers, bytes, agreement,
transformers parity, misuse.

The tiny checkpoint has random weights, so how closely quantized logits follow the float32 ones says
little about summaries from a real checkpoint; the agreement thresholds below only catch a broken
quantization (wrong layout, wrong scales, a layer left in an undefined state).
"""

from __future__ import annotations

import copy
import gc
import importlib
import sys
import weakref
from collections import Counter

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import model as ours
from model.modules import FeedForward, gated_gelu_by_sigmoid, gelu_new
from model.quantize import (
    FEW_ROWS,
    HEAD_BLOCK_IDS,
    METHODS,
    QUANTIZE_BLOCK_ROWS,
    Int8HeadBlocks,
    is_quantized,
    native_bfloat16,
    quantize,
    quantized_bytes,
)
from tests.model.helpers import batch_with_padding, decoder_inputs, logits

model_quantize = importlib.import_module("model.quantize")  # the module: `model.quantize` is also the function

QUANTIZED = ("int8", "nf4", "fp4")

# Lowest cosine similarity, over all positions, between quantized and float32 logits on the test batch. 4-bit
# layers compute the same way on every CPU (model/quantize.py). Measured margins: benchmarks/README.md, "Numerics".
MIN_COSINE = {"int8": 0.99, "nf4": 0.85, "fp4": 0.80}


def load(checkpoint, method: str, **kwargs):
    return quantize(ours.MT5ForConditionalGeneration.from_pretrained(checkpoint), method, **kwargs)


def projections(model) -> dict[str, nn.Module]:
    """The stacks' projections quantize() may replace (all but wo), by name."""
    return {
        name: m
        for name, m in model.named_modules()
        if name.split(".")[0] in ("encoder", "decoder") and name.split(".")[-1] in ("qkv", "q", "kv", "o", "wi")
    }


@pytest.fixture(scope="module")
def float32_logits(tiny_checkpoint):
    return logits(ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint))


@pytest.mark.parametrize("method", QUANTIZED)
def test_each_method_uses_bitsandbytes_layers_and_runs_forward_and_beam_search(tiny_checkpoint, method):
    model = load(tiny_checkpoint, method)
    expected = bnb.nn.Linear8bitLt if method == "int8" else bnb.nn.Linear4bit
    layers = projections(model)
    assert len(layers) == 3 * 3 + 2 * 6  # per encoder block: qkv, o, wi; per decoder block: qkv, o, q, kv, o, wi
    for name, layer in layers.items():
        assert type(layer) is expected, name
        assert layer.weight.dtype == (torch.int8 if method == "int8" else torch.uint8), name
        assert getattr(layer.weight, "quant_type", method) == method, name
    # transformers' rule for mT5: wo and the (untied) output head stay in full precision.
    for name, layer in model.named_modules():
        if name.endswith("ff.wo") or name == "lm_head":
            assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32, name

    ids, mask = batch_with_padding()
    out = logits(model)
    assert out.shape == (4, 7, model.config.vocab_size) and torch.isfinite(out).all()
    generated = model.generate(input_ids=ids, attention_mask=mask, num_beams=2, max_new_tokens=8)
    assert generated.shape[0] == 4 and 2 <= generated.shape[1] <= 9
    assert ((generated >= 0) & (generated < model.config.vocab_size)).all()


@pytest.mark.parametrize("method", QUANTIZED)
def test_quantized_logits_follow_float32_logits(tiny_checkpoint, float32_logits, method):
    got = logits(load(tiny_checkpoint, method))
    cosine = F.cosine_similarity(got.flatten(0, 1), float32_logits.flatten(0, 1), dim=-1)
    assert cosine.min() > MIN_COSINE[method], f"{method}: lowest cosine {cosine.min():.4f}"


def test_bytes_shrink_by_the_width_of_the_weights_plus_their_statistics(tiny_checkpoint):
    """Weights shrink 4x (int8) and 8x (4-bit) exactly; the statistics beside them are int8's float32
    scale per output row, and 4-bit's 8-bit absmax per block of 64 plus two small code books per layer
    (about 1.1 kB: a large share of these tiny layers, 0.4% of mt5-small's 4-bit projection bytes).
    Nothing else in the model changes size."""
    full = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    full_layers = projections(full)
    full_bytes = sum(quantized_bytes(layer) for layer in full_layers.values())
    totals = {"fp32": quantized_bytes(full)}
    for method in QUANTIZED:
        model = load(tiny_checkpoint, method)
        layers = projections(model)
        for name, layer in layers.items():
            numel = full_layers[name].weight.numel()
            payload = layer.weight.numel() * layer.weight.element_size()
            assert payload == numel // (1 if method == "int8" else 2), name
            statistics = quantized_bytes(layer) - payload
            if method == "int8":
                assert statistics == 4 * layer.out_features, name
            else:
                assert numel // 64 <= statistics <= numel // 64 + 1_200, name
        quantized_layer_bytes = sum(quantized_bytes(layer) for layer in layers.values())
        totals[method] = quantized_bytes(model)
        # The model shrinks by exactly what its projections shrink: no full-precision copy is kept.
        assert totals["fp32"] - totals[method] == full_bytes - quantized_layer_bytes
    assert totals["nf4"] == totals["fp4"] < totals["int8"] < totals["fp32"]


def test_quantize_releases_the_full_precision_weights(tiny_checkpoint):
    model = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    originals = [weakref.ref(layer.weight) for layer in projections(model).values()]
    quantize(model, "nf4")
    gc.collect()
    assert all(ref() is None for ref in originals)


def test_none_leaves_the_model_untouched(tiny_checkpoint, float32_logits):
    model = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    before = {name: type(m) for name, m in model.named_modules()}
    assert quantize(model, "none") is model
    assert {name: type(m) for name, m in model.named_modules()} == before
    torch.testing.assert_close(logits(model), float32_logits, atol=0, rtol=0)


def test_skip_keeps_the_named_modules_and_empty_skip_quantizes_the_untied_head(tiny_checkpoint):
    model = load(tiny_checkpoint, "nf4", skip=("lm_head", "decoder", "self_attn.o"))
    for name, layer in projections(model).items():
        kept = name.startswith("decoder.") or name.endswith("self_attn.o")
        assert (type(layer) is nn.Linear) == kept, name
    model = load(tiny_checkpoint, "int8", skip=())
    assert type(model.lm_head) is bnb.nn.Linear8bitLt
    assert type(model.encoder.blocks[0].ff.wo) is nn.Linear  # wo is never quantized


def test_tied_head_stays_the_embedding(tiny_relu_tied_checkpoint):
    model = load(tiny_relu_tied_checkpoint, "nf4", skip=())
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.shared.weight
    assert type(model.encoder.blocks[0].ff.wi) is bnb.nn.Linear4bit
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_quantize_and_compute_in_their_dtype(tiny_checkpoint, dtype):
    model = quantize(ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=dtype), "nf4")
    assert model.encoder.blocks[0].self_attn.qkv.compute_dtype == dtype
    # float16 keeps wo in float32 from loading on (model/weights.py); quantize leaves it so.
    assert model.encoder.blocks[0].ff.wo.weight.dtype == (torch.float32 if dtype == torch.float16 else dtype)
    out = logits(model)
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_unknown_method_is_a_value_error_listing_the_methods(tiny_checkpoint):
    model = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    with pytest.raises(ValueError, match="'int4'.*none, int8, nf4, fp4, int8-dynamic, int8-weight-only"):
        quantize(model, "int4")
    assert METHODS == ("none", "int8", "nf4", "fp4", "int8-dynamic", "int8-weight-only")


def test_missing_bitsandbytes_is_an_import_error_saying_how_to_install(tiny_checkpoint, monkeypatch):
    model = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an absent package looks like to import
    with pytest.raises(ImportError, match=r"pip install 'bitsandbytes>=0\.46'"):
        quantize(model, "nf4")
    assert quantize(model, "none") is model  # "none" needs no bitsandbytes


def test_bitsandbytes_without_kernels_for_the_device_is_a_clear_error_before_any_layer_changes(
    tiny_checkpoint, monkeypatch
):
    def no_kernel(*args, **kwargs):
        raise NotImplementedError("Could not run 'bitsandbytes::quantize_4bit' with arguments from the 'CPU' backend")

    model = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    monkeypatch.setattr(bnb.functional, "quantize_4bit", no_kernel)
    with pytest.raises(RuntimeError, match=r"cannot run nf4 on cpu.*python -m bitsandbytes"):
        quantize(model, "nf4")
    assert all(type(layer) is nn.Linear for layer in projections(model).values())


@pytest.mark.parametrize("method", ["nf4", "fp4"])
@pytest.mark.parametrize("width", [(128, 64), (40, 96)], ids=["multiples-of-64", "40-to-96"])
def test_4bit_layers_multiply_by_their_dequantized_weight_in_float32_on_every_cpu(method, width):
    """On AVX-512 BF16 CPUs bitsandbytes' eval-mode kernel would cast activations and scales to bfloat16 (off by
    about 2^-9 of each value) and fails on widths not in multiples of 64; quantize()'s layers take the generic
    path there too, as on every other CPU. What remains is float32 rounding of a dot product of at most 128
    terms of magnitude below 4: well under 1e-5."""
    from model.quantize import _quantized_layer

    torch.manual_seed(0)
    layer = _quantized_layer(bnb, nn.Linear(*width, bias=False), method, torch.float32).eval()
    x = torch.randn(5, width[0])
    with torch.no_grad():
        got = layer(x)
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(got, x @ weight.T, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_fused_4bit_weight_dequantizes_as_its_parts_without_double_quantization(tiny_checkpoint, method):
    """Why fusing q|k|v costs 4-bit parity only through double quantization (see the next tests)."""
    qkv = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint).encoder.blocks[0].self_attn.qkv.weight
    fused = bnb.functional.dequantize_4bit(*bnb.functional.quantize_4bit(qkv.detach(), quant_type=method))
    parts = [
        bnb.functional.dequantize_4bit(*bnb.functional.quantize_4bit(part, quant_type=method))
        for part in qkv.detach().chunk(3)
    ]
    assert torch.equal(fused, torch.cat(parts))


# --- parity with transformers' own bitsandbytes path -------------------------------------------------


def transformers_quantized(checkpoint, method: str):
    """transformers' MT5ForConditionalGeneration through BitsAndBytesConfig, float32 outside the
    quantized layers, on CPU."""
    pytest.importorskip(
        "accelerate",
        reason="transformers loads bitsandbytes models only with accelerate "
        "installed, and the test extras do not install it",
    )
    import transformers

    if method == "int8":
        config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=method,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    return transformers.MT5ForConditionalGeneration.from_pretrained(
        checkpoint, quantization_config=config, dtype=torch.float32, device_map="cpu"
    ).eval()


def fused_pairs(model, reference):
    """(our fused layer, transformers' layers it concatenates) for every quantized projection."""
    for i, block in enumerate(model.encoder.blocks):
        layers = reference.encoder.block[i].layer
        yield block.self_attn.qkv, [getattr(layers[0].SelfAttention, p) for p in "qkv"]
        yield block.ff.wi, [layers[1].DenseReluDense.wi_0, layers[1].DenseReluDense.wi_1]
    for i, block in enumerate(model.decoder.blocks):
        layers = reference.decoder.block[i].layer
        yield block.self_attn.qkv, [getattr(layers[0].SelfAttention, p) for p in "qkv"]
        yield block.cross_attn.kv, [layers[1].EncDecAttention.k, layers[1].EncDecAttention.v]
        yield block.ff.wi, [layers[2].DenseReluDense.wi_0, layers[2].DenseReluDense.wi_1]


def test_int8_matches_transformers_bitsandbytes_in_weights_logits_and_beam_search(tiny_checkpoint):
    """LLM.int8 scales each output row on its own, so fusing q|k|v along the output rows quantizes
    exactly as separate layers do: same int8 weights, same row scales, same logits and tokens."""
    reference = transformers_quantized(tiny_checkpoint, "int8")
    model = load(tiny_checkpoint, "int8")
    assert type(reference.encoder.block[0].layer[1].DenseReluDense.wo) is nn.Linear  # transformers keeps wo too
    for fused, parts in fused_pairs(model, reference):
        assert torch.equal(fused.weight.data, torch.cat([p.weight.data for p in parts]))
        assert torch.equal(fused.weight.SCB, torch.cat([p.weight.SCB for p in parts]))
    ids, mask = batch_with_padding()
    dec = decoder_inputs()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(logits(model), expected, atol=1e-4, rtol=0)
    settings = dict(num_beams=2, max_new_tokens=8)
    assert torch.equal(
        model.generate(input_ids=ids, attention_mask=mask, **settings),
        reference.generate(input_ids=ids, attention_mask=mask, **settings),
    )


@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_4bit_matches_transformers_bitsandbytes_codes_exactly_and_logits_closely(tiny_checkpoint, method):
    """Not exact, because of double quantization. The 4-bit codes are identical: blocks of 64 run along
    the flattened weight, and each of q, k, v (wi_0, wi_1) has a multiple of 64 weights (d_model 64 x
    128 rows here; any mT5 with d_model a multiple of 64), so the fused weight's blocks are exactly the
    separate layers' blocks. But each block's absmax is quantized again to 8 bits around the mean absmax
    of the whole tensor: fused, that mean and the 8-bit scale are shared by q, k and v; separate, each
    has its own. The dequantized weights so differ by the 8-bit rounding of the absmax, and the logits by about a
    percent of their range (figures: benchmarks/README.md, "Numerics"; on CPUs with AVX-512 BF16 transformers'
    layers compute in bfloat16, ours in float32)."""
    reference = transformers_quantized(tiny_checkpoint, method)
    model = load(tiny_checkpoint, method)
    for fused, parts in fused_pairs(model, reference):
        assert torch.equal(fused.weight.data.view(-1), torch.cat([p.weight.data.view(-1) for p in parts]))
        ours_w = bnb.functional.dequantize_4bit(fused.weight.data, fused.weight.quant_state)
        theirs_w = torch.cat([bnb.functional.dequantize_4bit(p.weight.data, p.weight.quant_state) for p in parts])
        torch.testing.assert_close(ours_w, theirs_w, atol=0.01 * theirs_w.abs().max().item(), rtol=0)
    ids, mask = batch_with_padding()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_inputs()).logits
    got = logits(model)
    span = (expected.max() - expected.min()).item()
    torch.testing.assert_close(got, expected, atol=0.02 * span, rtol=0)
    assert F.cosine_similarity(got.flatten(0, 1), expected.flatten(0, 1), dim=-1).min() > 0.999


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", QUANTIZED)
def test_cuda_weights_are_quantized_on_the_gpu(tiny_checkpoint, method):
    model = quantize(
        ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype="bfloat16", device="cuda"), method
    )
    layer = model.encoder.blocks[0].self_attn.qkv
    assert layer.weight.device.type == "cuda" and layer.weight.dtype in (torch.int8, torch.uint8)
    ids, mask = (t.cuda() for t in batch_with_padding())
    out = model.generate(input_ids=ids, attention_mask=mask, num_beams=2, max_new_tokens=8)
    assert out.device.type == "cuda"


# --- int8-dynamic: torch's dynamic int8 on CPU ------------------------------------------------------------

from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear  # noqa: E402

# Lowest per-position cosine and largest absolute difference (of the float32 logits' range) over the three
# batches below. Random weights: these only catch a broken path. Measured margins: benchmarks/README.md.
DYNAMIC_MIN_COSINE = 0.98
DYNAMIC_MAX_DIFF = 0.10  # of the float32 logits' range


def test_int8_dynamic_from_pretrained_replaces_every_projection_wo_and_the_head_and_generates(tiny_checkpoint):
    model = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint, quantization="int8-dynamic")
    layers = projections(model)
    assert len(layers) == 3 * 3 + 2 * 6
    for name, layer in {**layers, "lm_head": model.lm_head}.items():
        assert type(layer) is DynamicLinear and layer.weight().dtype == torch.qint8, name
        assert layer.weight().qscheme() == torch.per_channel_affine, name  # one scale per output row
    # wo is left unquantized (DYNAMIC_KEEP_UNQUANTIZED), in bfloat16 where this CPU multiplies it natively, and
    # nothing else is left behind
    kept = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    assert set(kept) == {f"{stack}.blocks.{i}.ff.wo" for stack, n in (("encoder", 3), ("decoder", 2)) for i in range(n)}
    wo_dtype = torch.bfloat16 if native_bfloat16() else torch.float32
    assert {m.weight.dtype for m in kept.values()} == {wo_dtype}
    assert model.shared.weight.dtype == torch.float32  # the embedding is not a projection
    assert is_quantized(model)
    assert {m.sigmoid_gelu for m in model.modules() if isinstance(m, FeedForward)} == {True}
    assert not ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint).encoder.blocks[0].ff.sigmoid_gelu

    ids, mask = batch_with_padding()
    for settings in (dict(num_beams=1), dict(num_beams=4, no_repeat_ngram_size=2)):
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **settings)
        assert generated.shape[0] == 4 and 2 <= generated.shape[1] <= 9
        assert ((generated >= 0) & (generated < model.config.vocab_size)).all()


def test_the_sigmoid_gelu_of_int8_dynamic_is_as_close_to_the_exact_gelu_as_the_formula_in_float32_is():
    """int8-dynamic's FeedForward computes GELU as x sigmoid(2 u), not by the reference's formula op by op.
    Against the formula in float64, each is within 2 eps (|x| + 1): 0.5 x (1 + tanh u) rounds t = 1 + tanh u to about
    an eps (tanh's own rounding, and u's few roundings, damped by tanh's slope: |u| sech^2 u < 0.45), and x t / 2
    multiplies that by |x|, with a last rounding of the product; x sigmoid(2 u) alike, sigmoid's values lying in
    [0, 1]. Measured: 0.69 for the formula, 0.82 for the sigmoid. Where the GELU is not tiny the sigmoid is the closer
    relatively: the formula's 1 + tanh u cancels for u < 0 (measured where |gelu| > 1e-2: 7.5e-7 against 4.3e-6)."""
    torch.manual_seed(0)
    x = torch.cat([torch.linspace(-12, 12, 200_001), 3 * torch.randn(1_000_000)])
    exact = gelu_new(x.double())
    bound = 2 * torch.finfo(torch.float32).eps * (x.abs().double() + 1)
    by_sigmoid, formula = gated_gelu_by_sigmoid(x, torch.ones_like(x)), gelu_new(x)
    for got in (by_sigmoid, formula):
        assert ((got.double() - exact).abs() <= bound).all()
    shown = exact.abs() > 1e-2
    relative = [((got.double() - exact).abs() / exact.abs())[shown].max() for got in (by_sigmoid, formula)]
    assert relative[0] < relative[1]
    linear = torch.randn_like(x)
    ff = FeedForward(ours.MT5Config(d_model=4, d_ff=x.numel(), feed_forward_proj="gated-gelu", dropout_rate=0.0))
    ff.wi = nn.Identity()  # the FeedForward's input is then [gate, linear] itself
    with torch.no_grad():
        formula = ff(torch.cat([x, linear]))
        ff.sigmoid_gelu = True
        by_sigmoid = ff(torch.cat([x, linear]))
        assert torch.equal(by_sigmoid, ff.wo(gated_gelu_by_sigmoid(x, linear)))
        assert torch.equal(formula, ff.wo(gelu_new(x) * linear))
    assert not torch.equal(by_sigmoid, formula)  # the two round apart somewhere in a million values


@pytest.mark.parametrize("wo_in_bfloat16", [True, False], ids=["wo-bfloat16", "wo-float32"])
@pytest.mark.parametrize("seed", [0, 2, 4])
def test_int8_dynamic_logits_follow_float32_logits(tiny_checkpoint, seed, wo_in_bfloat16, monkeypatch):
    # Both of int8-dynamic's `wo`s on every CPU: bfloat16 runs without native instructions too, only slower.
    monkeypatch.setattr(model_quantize, "native_bfloat16", lambda: wo_in_bfloat16)
    full = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    dynamic = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint, quantization="int8-dynamic")
    assert dynamic.encoder.blocks[0].ff.wo.weight.dtype == (torch.bfloat16 if wo_in_bfloat16 else torch.float32)
    expected, got = logits(full, seed), logits(dynamic, seed)
    cosine = F.cosine_similarity(got.flatten(0, 1), expected.flatten(0, 1), dim=-1)
    assert cosine.min() > DYNAMIC_MIN_COSINE, f"lowest cosine {cosine.min():.4f}"
    span = (expected.max() - expected.min()).item()
    torch.testing.assert_close(got, expected, atol=DYNAMIC_MAX_DIFF * span, rtol=0)


def test_int8_dynamic_weights_take_a_quarter_of_the_bytes_plus_their_row_statistics(tiny_checkpoint):
    full = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    dynamic = quantize(ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint), "int8-dynamic")
    dynamic_layers = {name: m for name, m in dynamic.named_modules() if type(m) is DynamicLinear}
    replaced = {name: m for name, m in full.named_modules() if name in dynamic_layers}
    assert len(replaced) == 3 * 3 + 2 * 6 + 1  # the projections but wo, and lm_head
    for name, layer in dynamic_layers.items():  # int8 weights, plus a float64 scale and an int64 zero point per row
        assert quantized_bytes(layer) == replaced[name].weight.numel() + 16 * layer.out_features, name
    saved = sum(3 * m.weight.numel() - 16 * m.out_features for m in replaced.values())
    if native_bfloat16():  # wo held in bfloat16: two bytes a weight instead of four
        saved += sum(2 * m.weight.numel() for name, m in full.named_modules() if name.endswith(".ff.wo"))
    assert quantized_bytes(full) - quantized_bytes(dynamic) == saved  # no float32 copy is kept


@pytest.mark.parametrize("rows", [1, QUANTIZE_BLOCK_ROWS, 2 * QUANTIZE_BLOCK_ROWS + 3])
def test_int8_dynamic_weights_are_torch_aos_codes_bit_for_bit_ties_and_extremes_included(rows):
    """_dynamic_int8_weight computes the codes itself (not through torch.quantize_per_channel): against torch.ao's
    from_float on weights with values at or next to halfway between two codes (where the rounding decides), at a
    row's extremes (±127), at zero, and in a row of one repeated value, in one block and across blocks."""
    from torch.ao.quantization import per_channel_dynamic_qconfig

    from model.quantize import _dynamic_int8_weight

    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(rows, 96, generator=generator)
    weight[:, 0] = weight.abs().amax(1) + 0.5  # each row's scale: max |w| / 127.5
    scales = (weight[:, :1] / 127.5).float()
    halves = torch.randint(-127, 127, (rows, 48), generator=generator).float() + 0.5
    weight[:, 1:49] = halves * scales
    weight[:, 49] = -weight[:, 0]
    weight[:, 50] = 0.0
    if rows > 1:
        weight[-1] = 0.75  # one value throughout
    layer = nn.Linear(96, rows, bias=False)
    layer.weight.data = weight
    layer.qconfig = per_channel_dynamic_qconfig
    expected = DynamicLinear.from_float(layer).weight()
    got = _dynamic_int8_weight(layer)
    assert_same_state(got, expected)
    assert (got.int_repr().abs() == 127).any() and (got.int_repr() == 0).any()


def test_int8_head_blocks_give_the_whole_layers_logits_into_the_buffer_they_are_given(tiny_checkpoint):
    model = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    whole = quantize(ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint), "int8-dynamic").lm_head
    ids = model.config.vocab_size
    blocks = Int8HeadBlocks.from_float(model.lm_head, torch.backends.quantized.engine, block_ids=ids // 3 + 5)
    assert [b.out_features for b in blocks.blocks] == [ids // 3 + 5] * 2 + [ids - 2 * (ids // 3 + 5)]  # and a tail
    hidden = torch.randn(2, 3, model.config.d_model, generator=torch.Generator().manual_seed(0))
    expected = whole(hidden)
    # Each block quantizes the same rows alike and holds its ids' codes and scales: equal, not merely close.
    assert torch.equal(blocks(hidden), expected)
    buffer = torch.full((8, ids), float("nan"))  # a decode step's reused buffer, with rows to spare
    written = blocks(hidden, out=buffer[:6])
    assert written.data_ptr() == buffer.data_ptr() and torch.equal(written, expected)
    assert torch.isnan(buffer[6:]).all()  # the rows past the step's are left alone
    assert quantized_bytes(blocks) == quantized_bytes(whole)  # the same int8 codes and row statistics, split


@pytest.mark.skipif(
    "onednn" not in torch.backends.quantized.supported_engines, reason="an int8 head is packed for oneDNN where it runs"
)
def test_int8_head_blocks_for_onednn_multiply_up_to_few_rows_through_a_copy_for_fbgemm(tiny_checkpoint):
    from model.quantize import dynamic_int8_engine

    model = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    ids = model.config.vocab_size
    blocks = Int8HeadBlocks.from_float(model.lm_head, "onednn", block_ids=ids // 3 + 5)
    whole = {
        engine: quantize(ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint), "int8-dynamic").lm_head
        for engine in ("fbgemm", "onednn")
    }
    for engine, layer in whole.items():
        model_quantize.pack_dynamic_int8(layer, *layer._packed_params._weight_bias(), engine)
    assert {dynamic_int8_engine(layer) for layer in blocks.blocks} == {"onednn"}
    assert {dynamic_int8_engine(layer) for layer in blocks.few_rows} == {"fbgemm"}
    for block, copy_for_few_rows in zip(blocks.blocks, blocks.few_rows):  # the same codes, scales and zero points
        assert_same_state(copy_for_few_rows.weight(), block.weight())
    ran = []
    for layer in [*blocks.blocks, *blocks.few_rows]:
        layer.register_forward_hook(lambda layer, args, out: ran.append(dynamic_int8_engine(layer)))
    g = torch.Generator().manual_seed(0)
    for rows, engine in [(1, "fbgemm"), (FEW_ROWS, "fbgemm"), (FEW_ROWS + 1, "onednn"), (4 * FEW_ROWS, "onednn")]:
        ran.clear()
        hidden = torch.randn(rows, model.config.d_model, generator=g)
        assert torch.equal(blocks(hidden), whole[engine](hidden)), rows  # the whole layer's logits on that kernel
        assert ran == [engine] * len(blocks.blocks), rows
    # Held twice: the int8 codes and row statistics once for each kernel.
    assert quantized_bytes(blocks) == 2 * quantized_bytes(whole["onednn"])
    assert Int8HeadBlocks.from_float(model.lm_head, "fbgemm").few_rows == ()  # fbgemm's blocks need no copy
    keys = set(ours.load_for_inference(tiny_checkpoint, quantization="int8-dynamic").state_dict())
    assert "lm_head.blocks.0._packed_params._packed_params" in keys  # and the copy is no part of the state dict
    assert not [key for key in keys if "few_rows" in key]


def test_int8_dynamic_skip_keeps_the_named_modules_and_a_tied_head(tiny_checkpoint, tiny_relu_tied_checkpoint):
    model = load(tiny_checkpoint, "int8-dynamic", skip=("lm_head", "decoder"))
    assert type(model.lm_head) is nn.Linear and type(model.decoder.blocks[0].ff.wi) is nn.Linear
    assert type(model.encoder.blocks[0].ff.wi) is DynamicLinear
    # a skipped part is left as it was, its wo too, whatever the CPU
    assert model.decoder.blocks[0].ff.wo.weight.dtype == model.lm_head.weight.dtype == torch.float32
    tied = load(tiny_relu_tied_checkpoint, "int8-dynamic")
    assert type(tied.lm_head) is nn.Linear and tied.lm_head.weight is tied.shared.weight
    assert torch.isfinite(logits(tied)).all()


def test_int8_dynamic_refuses_a_cuda_model_naming_the_method_and_the_device():
    """Without a GPU: a model whose tensors claim to be on cuda (fake tensors: no memory, no kernels)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    config = ours.MT5Config(
        vocab_size=64, d_model=16, d_kv=4, num_heads=2, d_ff=32, num_layers=1, tie_word_embeddings=False
    )
    with torch.device("meta"):
        model = ours.MT5ForConditionalGeneration(config)
    with FakeTensorMode():
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(torch.empty(param.shape, device="cuda"), requires_grad=False))
    assert model.lm_head.weight.device.type == "cuda"
    with pytest.raises(ValueError, match=r"'int8-dynamic' runs on CPU only.*cuda"):
        quantize(model, "int8-dynamic")
    assert type(model.lm_head) is nn.Linear


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int8_dynamic_refuses_a_model_loaded_on_the_gpu(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"'int8-dynamic' runs on CPU only.*cuda"):
        ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint, device="cuda", quantization="int8-dynamic")


def test_int8_dynamic_refuses_half_precision(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"'int8-dynamic' computes in float32.*bfloat16"):
        ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype="bfloat16", quantization="int8-dynamic")


@pytest.mark.parametrize("method", ["int8", "int8-dynamic"])
def test_a_quantized_model_is_recognised_as_one(tiny_checkpoint, method):
    assert not is_quantized(ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint))
    assert is_quantized(load(tiny_checkpoint, method))


def test_saving_an_int8_dynamic_model_is_refused_like_bitsandbytes(tiny_checkpoint, tmp_path):
    model = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint, quantization="int8-dynamic")
    with pytest.raises(ValueError, match="save the model before quantizing it"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_saving_a_bitsandbytes_model_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="save the model before quantizing it"):
        load(tiny_checkpoint, "int8").save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------------------
# Quantizing while moving to a device (quantize(..., device=)): what load_for_inference does for a GPU

# A model whose projections hold most of its bytes (a 1,024-row vocabulary instead of 250,112), as in mt5-xl/xxl:
# there the full-precision model is far above the quantized one plus one layer, so the bound below can tell the
# orders apart. With mT5's 250k-row embedding and head dominating the tiny checkpoint, it could not.
LAYER_HEAVY = dict(
    vocab_size=1024, d_model=256, d_kv=32, num_heads=8, d_ff=512, num_layers=4, num_decoder_layers=4,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
)  # fmt: skip


def layer_heavy_model(**shape) -> nn.Module:
    torch.manual_seed(0)
    config = ours.MT5Config(**{**LAYER_HEAVY, **shape})
    return ours.MT5ForConditionalGeneration(config).init_weights().to(torch.bfloat16).eval()


def full_precision_linears_on(model: nn.Module, device: str) -> list[str]:
    """The nn.Linear layers on `device`, but wo (never quantized): the layers quantize() replaces, and a kept head."""
    return [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear and m.weight.device.type == device and not name.endswith(".wo")
    ]


@pytest.mark.parametrize("method", ["int8-weight-only", *QUANTIZED])
def test_moving_to_a_device_holds_at_most_the_quantized_model_plus_one_full_precision_layer(method):
    """The meta device stands for the GPU: tensors moved there keep their sizes and lose their data, so the bytes
    each step places there are counted exactly, and bitsandbytes and int8-weight-only quantize there as on a GPU
    (shapes only). `observe` sees the model after each layer arrives in full precision, before it is quantized:
    the points where the device holds the most."""
    model = layer_heavy_model()
    targets = full_precision_linears_on(model, "cpu")
    kept_head = [] if method == "int8-weight-only" else ["lm_head"]  # bitsandbytes keeps it (transformers' rule)
    targets = [name for name in targets if name not in kept_head]
    largest_layer = max(quantized_bytes(model.get_submodule(name)) for name in targets)
    full_precision = quantized_bytes(model)

    resident, full_layers = [], []
    quantize(
        model,
        method,
        device="meta",
        observe=lambda m: (
            resident.append(quantized_bytes(m, "meta")),
            full_layers.append(full_precision_linears_on(m, "meta")),
        ),
    )
    assert quantized_bytes(model) == 0, "every tensor moved: nothing is left in host memory"
    quantized = quantized_bytes(model, "meta")
    assert len(resident) == len(targets) + 1 and resident[-1] == quantized
    assert max(resident) <= quantized + largest_layer, (max(resident), quantized, largest_layer)
    # one layer in full precision at a time; a kept head moves last, with the embedding and the norms
    assert all(len(names) == 1 for names in full_layers[:-1]) and full_layers[-1] == kept_head
    # The old order (load in full precision on the device, then quantize) first holds the whole full-precision
    # model there. This bound rejects that state by a wide margin, so the assertion above can fail.
    old_order_first_state = quantized_bytes(layer_heavy_model().to("meta"), "meta")
    assert old_order_first_state == full_precision > quantized + largest_layer


def layout(model: nn.Module) -> dict[str, tuple]:
    """Each module's type, and the name, dtype and shape of each tensor it holds itself."""
    return {
        name: (
            type(m),
            [(n, t.dtype, t.shape) for n, t in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False))],
        )
        for name, m in model.named_modules()
    }


@pytest.mark.parametrize("method", ["int8-weight-only", "nf4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_moving_to_a_device_gives_the_layout_and_ties_of_quantizing_in_place(tiny_relu_tied_checkpoint, method, dtype):
    """Against the old order, tensor by tensor: the same modules, dtypes and shapes, nothing left in host memory,
    the tied head still the embedding, and `wo` still float32 in a float16 model (the values:
    tests/model/test_inference.py)."""
    moved, in_place = (
        quantize(
            ours.MT5ForConditionalGeneration.from_pretrained(tiny_relu_tied_checkpoint, dtype=dtype), method, device=d
        )
        for d in ("meta", None)
    )
    assert layout(moved) == layout(in_place)
    assert all(t.is_meta for t in (*moved.parameters(), *moved.buffers()))
    assert moved.lm_head.weight is moved.shared.weight
    assert moved.encoder.blocks[0].ff.wo.weight.dtype == (torch.float32 if dtype == torch.float16 else dtype)


# --- int8-dynamic's load: each layer packed once, the model torch.ao builds ---------------------------------


def torch_ao_int8_dynamic(checkpoint, kept_ids=None, names=()):
    """The reference for load_for_inference(quantization="int8-dynamic"): the modules `names` quantized by torch.ao's
    own quantize_dynamic under per_channel_dynamic_qconfig (each packed for the engine set now), then the head
    unpacked and packed again for oneDNN where pack_head_for_cpu runs it there, and so are the projections over source
    tokens where int8_source_engine says."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from model.packed import int8_head_engine, int8_source_engine
    from model.quantize import runs_over_sources
    from model.vocabulary import restrict_vocabulary

    model = ours.MT5ForConditionalGeneration.from_pretrained(checkpoint)
    if kept_ids is not None:
        restrict_vocabulary(model, kept_ids)
    quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in names}, inplace=True)
    for module in model.modules():
        if isinstance(module, FeedForward):
            module.sigmoid_gelu = True  # int8-dynamic's GELU
    if native_bfloat16():  # int8-dynamic's rule for the wo it leaves: bfloat16 on such a CPU
        for name, layer in model.named_modules():
            if name.endswith(".ff.wo"):
                layer.to(torch.bfloat16)
    head_name = "lm_head.kept" if kept_ids is not None else "lm_head"
    onednn = [name for name in names if runs_over_sources(name)] if int8_source_engine() == "onednn" else []
    if int8_head_engine(model) == "onednn":
        onednn.append(head_name)
    for name in onednn:
        repack(model.get_submodule(name), "onednn")
    if int8_head_engine(model) == "onednn":
        on_fbgemm_at_few_rows(model.get_submodule(head_name))
    return model


def repack(layer, engine: str) -> None:
    """Pack a torch.ao dynamic linear's weight again for `engine`, as torch.ao packs it under that engine."""
    current, torch.backends.quantized.engine = torch.backends.quantized.engine, engine
    try:
        layer._packed_params.set_weight_bias(*layer._packed_params._weight_bias())
    finally:
        torch.backends.quantized.engine = current


def on_fbgemm_at_few_rows(head: nn.Module) -> None:
    """The reference for an int8 head packed for oneDNN (Int8HeadBlocks.few_rows): torch.ao's one layer, multiplying
    through a copy packed for fbgemm at up to FEW_ROWS rows (its forward replaced, in place)."""
    few_rows, many_rows = copy.deepcopy(head), head.forward
    repack(few_rows, "fbgemm")
    head.forward = lambda x: (few_rows if x.numel() // x.shape[-1] <= FEW_ROWS else many_rows)(x)


def assert_same_state(got, expected, key: str = "") -> None:
    """Equal bit for bit: quantized tensors by their int8 codes, per-channel scales, zero points and axis."""
    if isinstance(expected, (tuple, list)):
        assert type(got) is type(expected) and len(got) == len(expected), key
        for g, e in zip(got, expected):
            assert_same_state(g, e, key)
    elif isinstance(expected, torch.Tensor) and expected.is_quantized:
        assert got.dtype == expected.dtype and got.qscheme() == expected.qscheme(), key
        assert torch.equal(got.int_repr(), expected.int_repr()), key
        assert torch.equal(got.q_per_channel_scales(), expected.q_per_channel_scales()), key
        assert torch.equal(got.q_per_channel_zero_points(), expected.q_per_channel_zero_points()), key
        assert got.q_per_channel_axis() == expected.q_per_channel_axis(), key
    elif isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and torch.equal(got, expected), key
    else:
        assert got == expected, key


@pytest.mark.parametrize("kept_ids", [None, range(0, 4000, 7)], ids=["full", "restricted"])
def test_int8_dynamic_load_packs_each_layer_once_into_the_model_torch_ao_builds(tiny_checkpoint, kept_ids, monkeypatch):
    from model.packed import int8_head_engine, int8_source_engine
    from model.quantize import dynamic_int8_engine, runs_over_sources

    packs, unpacks = [], []
    prepack, unpack = torch.ops.quantized.linear_prepack, torch.ops.quantized.linear_unpack
    monkeypatch.setattr(torch.ops.quantized, "linear_prepack", lambda w, b=None: packs.append(w.shape) or prepack(w, b))
    monkeypatch.setattr(torch.ops.quantized, "linear_unpack", lambda p: unpacks.append(1) or unpack(p))
    model = ours.load_for_inference(tiny_checkpoint, quantization="int8-dynamic", kept_ids=kept_ids)
    monkeypatch.undo()
    head_name = "lm_head.kept" if kept_ids is not None else "lm_head"
    head = model.get_submodule(head_name)
    assert type(head) is Int8HeadBlocks  # the head in vocabulary blocks, written into the decode step's buffer
    layers = {name: m for name, m in model.named_modules() if type(m) is DynamicLinear and "lm_head" not in name}
    assert len(layers) == 3 * 3 + 2 * 6
    assert [b.out_features for b in head.blocks] == [
        min(HEAD_BLOCK_IDS, head.out_features - start) for start in range(0, head.out_features, HEAD_BLOCK_IDS)
    ]
    # One pack of each weight at its size (the head's in its blocks), no unpack. Besides: the 1 x 1 placeholders the
    # layers are built with, and the 64 x 64 probe layer quantize() runs first (_check_dynamic_int8).
    full_size = Counter(tuple(shape) for shape in packs if tuple(shape) != (1, 1))
    packed = Counter((m.out_features, m.in_features) for m in [*layers.values(), *head.blocks, *head.few_rows])
    assert full_size == packed + Counter({(64, 64): 1})
    assert unpacks == []
    engine = int8_head_engine(model) or torch.backends.quantized.engine
    assert {dynamic_int8_engine(block) for block in head.blocks} == {engine}
    # The encoder's projections and the cross-attention's keys and values (thousands of rows a call) on oneDNN where
    # its VNNI kernel runs; the decoder's per-step ones on the engine set now.
    over_sources = {"encoder.blocks.0.self_attn.qkv", "encoder.blocks.2.ff.wi", "decoder.blocks.1.cross_attn.kv"}
    per_step = {"decoder.blocks.0.self_attn.qkv", "decoder.blocks.1.cross_attn.q", "decoder.blocks.1.ff.wi"}
    assert {runs_over_sources(name) for name in over_sources} == {True}
    assert {runs_over_sources(name) for name in per_step} == {False}
    assert runs_over_sources("transformer.encoder.blocks.0.ff.wi")  # the task heads hold the stacks one level down
    assert not runs_over_sources("transformer.decoder.blocks.0.ff.wi")
    assert {dynamic_int8_engine(layers[name]) for name in over_sources} == {
        int8_source_engine() or torch.backends.quantized.engine
    }
    assert {dynamic_int8_engine(layers[name]) for name in per_step} == {torch.backends.quantized.engine}

    expected = torch_ao_int8_dynamic(tiny_checkpoint, kept_ids, names=[*layers, head_name])
    assert {n for n, m in expected.named_modules() if type(m) is DynamicLinear} == {*layers, head_name}
    # A restricted model refuses state_dict() (it cannot be saved), and the head is in blocks: the stacks and the
    # embedding are compared as they are, the head's blocks against the reference's one layer.
    for part in ["encoder", "decoder", "shared"]:
        got_state, expected_state = model.get_submodule(part).state_dict(), expected.get_submodule(part).state_dict()
        assert list(got_state) == list(expected_state), part
        for key, value in expected_state.items():
            assert_same_state(got_state[key], value, f"{part}.{key}")
    whole = expected.get_submodule(head_name).weight()
    blocks = [block.weight() for block in head.blocks]
    assert torch.equal(torch.cat([b.int_repr() for b in blocks]), whole.int_repr())
    assert torch.equal(torch.cat([b.q_per_channel_scales() for b in blocks]), whole.q_per_channel_scales())
    assert torch.equal(torch.cat([b.q_per_channel_zero_points() for b in blocks]), whole.q_per_channel_zero_points())
    # The same kernels on the same packed weights: the logits and tokens are equal, not merely close.
    for seed in (0, 3):
        assert torch.equal(logits(model, seed), logits(expected, seed))
    ids, mask = batch_with_padding()
    for settings in (dict(num_beams=1), dict(num_beams=4, no_repeat_ngram_size=2)):
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **settings)
        assert torch.equal(got, expected.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **settings))
