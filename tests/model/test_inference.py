"""model.load_for_inference: restrict, then quantize, then pack, whoever loads the model."""

from __future__ import annotations

import pytest
import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

import model as ours
from model.packed import PackedLinear, can_pack, pack_head_for_cpu, pack_linears_for_cpu
from model.quantization_methods import BITSANDBYTES
from model.quantize import Int8HeadBlocks, quantize, quantized_bytes
from model.vocabulary import RestrictedHead, restrict_vocabulary
from tests.model.helpers import FP32_ATOL, batch_with_padding, decoder_inputs, logits


def test_kept_ids_are_restricted_before_int8_dynamic_quantizes_the_smaller_head(tiny_checkpoint):
    model = ours.load_for_inference(tiny_checkpoint, quantization="int8-dynamic", kept_ids=range(100))
    assert type(model.lm_head) is RestrictedHead and type(model.lm_head.kept) is Int8HeadBlocks
    assert [type(block) for block in model.lm_head.kept.blocks] == [DynamicLinear]  # one block of 100 ids
    assert model.lm_head.kept.out_features == 100  # pad, eos and the decoder start are among the first 100


@pytest.mark.skipif(not can_pack(), reason="this torch has no oneDNN prepacked linear")
def test_a_cpu_float32_head_is_packed_with_the_logits_of_the_plain_model(tiny_checkpoint):
    plain = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    model = ours.load_for_inference(tiny_checkpoint)
    assert isinstance(model.lm_head, PackedLinear) and model.dtype == torch.float32 and not model.training
    torch.testing.assert_close(logits(model), logits(plain), atol=FP32_ATOL, rtol=0)

    restricted = ours.load_for_inference(tiny_checkpoint, kept_ids=range(0, 4000, 7))
    assert isinstance(restricted.lm_head.kept, PackedLinear)
    got, ids = logits(restricted), restricted.lm_head.kept_ids
    torch.testing.assert_close(got[..., ids], logits(plain)[..., ids], atol=FP32_ATOL, rtol=0)
    assert torch.isneginf(got).sum() == got[..., 0].numel() * (got.shape[-1] - len(ids))


def test_an_unknown_quantization_fails_before_any_weight_is_read(tmp_path):
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        ours.load_for_inference(tmp_path / "no-such-checkpoint", quantization="int4")


def test_auto_dtype_is_bfloat16_only_on_a_gpu_with_it_and_bfloat16_is_refused_elsewhere(monkeypatch):
    from model.inference import inference_dtype

    assert inference_dtype("auto", "cpu") == "float32"
    # A CPU machine has no GPU to ask: the GPU's answers are the two calls inference_dtype makes.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert inference_dtype("auto", "cuda") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert inference_dtype("auto", "cuda") == "float16"  # wo stays float32 (model/weights.py)
    assert inference_dtype("float16", "cuda") == "float16"
    with pytest.raises(ValueError, match="Tesla T4 has no bfloat16 arithmetic"):
        inference_dtype("bfloat16", "cuda")


# ------------------------------------------------------------------------------------------------------------------
# A quantized model is loaded in host memory and quantized layer by layer as it moves to its device


def quantized_after_loading(checkpoint, method: str, dtype, device="cpu", kept_ids=None):
    """The old order, the reference: the whole model loaded on `device` in `dtype`, then restricted, quantized and
    its head and float32 projections packed for a CPU (where it applies)."""
    model = ours.MT5ForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype, device=device)
    if kept_ids is not None:
        restrict_vocabulary(model, kept_ids)
    quantize(model, method)
    pack_head_for_cpu(model)
    pack_linears_for_cpu(model)
    return model


@pytest.mark.parametrize(
    "method,dtype",
    [("int8-weight-only", torch.bfloat16), ("int8-weight-only", torch.float32), ("nf4", torch.bfloat16),
     ("int8", torch.float32)],
)  # fmt: skip
def test_quantizing_while_loading_gives_the_logits_and_tokens_of_quantizing_after(tiny_checkpoint, method, dtype):
    """Bit for bit: each weight is cast to `dtype` once and quantized by the same arithmetic in either order. On a
    CPU both orders quantize where the weights are; the move itself is tested on meta (tests/model/test_quantize.py)
    and on a GPU below."""
    kept = range(4000)  # the ids the inputs use: the 4-bit head would otherwise dominate the time
    model = ours.load_for_inference(tiny_checkpoint, dtype=dtype, quantization=method, kept_ids=kept)
    reference = quantized_after_loading(tiny_checkpoint, method, dtype, kept_ids=kept)
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert torch.equal(logits(model), logits(reference))
    ids, mask = batch_with_padding(seed=3)
    settings = dict(num_beams=2, max_new_tokens=8)
    assert torch.equal(
        model.generate(input_ids=ids, attention_mask=mask, **settings),
        reference.generate(input_ids=ids, attention_mask=mask, **settings),
    )


# mt5-base's shape (580M parameters, 1.16 GB in bfloat16), with random weights.
MT5_BASE = dict(
    vocab_size=250112, d_model=768, d_kv=64, num_heads=12, d_ff=2048, num_layers=12, num_decoder_layers=12,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory, spiece_model):
    from synthetic.checkpoints import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("mt5-base"), MT5_BASE, spiece_model)


def _peak_cuda_bytes(load):
    """(what `load()` returns, the most CUDA memory allocated while it ran, above what was allocated before)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = load()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() - before


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["int8-weight-only", "nf4"])
def test_cuda_peak_memory_of_a_quantized_load_stays_below_the_bfloat16_weights(base_checkpoint, method):
    """The GPU never holds the bfloat16 model: its peak while loading is the quantized model plus one layer (and the
    quantizer's temporaries), below the bfloat16 weights. The old order, measured the same way, reaches them: the
    measurement can fail. Both orders give the same logits bit for bit."""
    if method in BITSANDBYTES:
        pytest.importorskip("bitsandbytes")
    with torch.device("meta"):
        bf16_bytes = 2 * sum(
            p.numel() for p in ours.MT5ForConditionalGeneration(ours.MT5Config(**MT5_BASE)).parameters()
        )

    model, peak = _peak_cuda_bytes(
        lambda: ours.load_for_inference(base_checkpoint, dtype="bfloat16", device="cuda", quantization=method)
    )
    held = quantized_bytes(model, "cuda")
    print(f"\n{method}: peak {peak / 2**20:.0f} MiB while loading, {held / 2**20:.0f} MiB held after, "
          f"bfloat16 weights {bf16_bytes / 2**20:.0f} MiB")  # fmt: skip
    assert all(t.device.type == "cuda" for t in (*model.parameters(), *model.buffers()))
    assert peak < bf16_bytes

    ids, mask = (t.cuda() for t in batch_with_padding())
    decoder_ids = decoder_inputs().cuda()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    del model
    torch.cuda.empty_cache()
    reference, old_peak = _peak_cuda_bytes(
        lambda: quantized_after_loading(base_checkpoint, method, torch.bfloat16, device="cuda")
    )
    print(f"{method}: the old order peaks at {old_peak / 2**20:.0f} MiB")
    assert old_peak >= bf16_bytes
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    assert torch.equal(got, expected)
