"""model.load_for_inference: restrict, then quantize, then pack, whoever loads the model."""

from __future__ import annotations

import pytest
import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

import model as ours
from model.packed import PackedLinear, can_pack
from model.vocabulary import RestrictedHead
from tests.model.helpers import FP32_ATOL, logits


def test_kept_ids_are_restricted_before_int8_dynamic_quantizes_the_smaller_head(tiny_checkpoint):
    model = ours.load_for_inference(tiny_checkpoint, quantization="int8-dynamic", kept_ids=range(100))
    assert type(model.lm_head) is RestrictedHead and type(model.lm_head.kept) is DynamicLinear
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
