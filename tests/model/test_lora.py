"""LoRA and QLoRA adapters on our fused projections: identity at init, what trains, merge, PEFT's layout.

Merged and unmerged logits agree to float32 rounding over a plain base and over nf4 (a 4-bit layer multiplies by
its dequantized weight on every CPU, which is what the merge adds the adapters to). Ours against PEFT on
transformers is held to the float64 argument of the parity tests. Over an int8 base the merge is only close:
LLM.int8 also quantizes the activations, which the merged float32 layer does not. Measured margins:
benchmarks/README.md, "Numerics".
"""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from torch import nn

import model as ours
from model.errors import ModelLoadError
from model.lora import (
    LoraConfig,
    LoraLinear,
    add_lora,
    load_adapters,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    save_adapters,
)
from tests.model.helpers import (
    FP32_ATOL,
    assert_as_close_to_float64_as_transformers,
    batch_with_padding,
    decoder_inputs,
    logits,
)

# Merged vs unmerged, in float32: FP32_ATOL, our own model in two layouts.
MERGE_ATOL = FP32_ATOL
# int8: the lowest per-position cosine of merged vs unmerged logits.
INT8_MIN_COSINE = 0.999
PROJECTIONS = ("qkv", "q", "kv", "o", "wi", "wo")


def load(checkpoint, **kwargs):
    return ours.MT5ForConditionalGeneration.from_pretrained(checkpoint, **kwargs)


def train(model, params, steps: int = 3, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps on the test batch's seq2seq loss; returns the losses."""
    ids, mask = batch_with_padding()
    labels = decoder_inputs(seed=2)
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def stack_layers(model) -> dict[str, nn.Module]:
    return {
        name: m
        for name, m in model.named_modules()
        if name.split(".")[0] in ("encoder", "decoder") and name.split(".")[-1] in PROJECTIONS
    }


def expected_adapter_sizes(config, lora: LoraConfig) -> list[int]:
    """rank * (in + out) for each adapted HF projection of a gated model, from its config."""
    d, inner, ff = config.d_model, config.inner_dim, config.d_ff
    attention = [("q", d, inner), ("k", d, inner), ("v", d, inner), ("o", inner, d)]
    feed_forward = [("wi_0", d, ff), ("wi_1", d, ff), ("wo", ff, d)]
    layers = config.num_layers * (attention + feed_forward) + config.num_decoder_layers * (
        attention + attention + feed_forward
    )  # self, cross, ff
    return [lora.rank * (fan_in + fan_out) for name, fan_in, fan_out in layers if name in lora.targets]


@pytest.fixture(scope="module")
def base_logits(tiny_checkpoint):
    return logits(load(tiny_checkpoint))


def test_adding_lora_leaves_logits_unchanged(tiny_checkpoint, base_logits):
    model = load(tiny_checkpoint)
    add_lora(model, LoraConfig())
    layers = stack_layers(model)
    assert len(layers) == 3 * 4 + 2 * 7 and all(isinstance(m, LoraLinear) for m in layers.values())
    torch.testing.assert_close(logits(model), base_logits, atol=0, rtol=0)  # B = 0: exactly the base


def test_only_adapters_require_grad_and_count_rank_times_in_plus_out_per_projection(tiny_checkpoint):
    model = load(tiny_checkpoint)
    config = LoraConfig()
    params = add_lora(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in params] == [id(p) for p in lora_parameters(model)]  # one order, on every DDP rank
    assert {id(p) for p in params} == {id(p) for p in trainable}
    assert all(".lora_A." in n or ".lora_B." in n for n, p in model.named_parameters() if p.requires_grad)
    sizes = [a.numel() + b.numel() for a, b in zip(params[::2], params[1::2])]
    assert sorted(sizes) == sorted(expected_adapter_sizes(model.config, config))
    assert len(sizes) == 3 * 7 + 2 * 11  # encoder: q k v o wi_0 wi_1 wo; decoder: + cross q k v o
    # each adapter is A [rank, in], B [out_part, rank]; B starts at zero, A does not
    for a, b in zip(params[::2], params[1::2]):
        assert a.shape[0] == b.shape[1] == config.rank
        assert b.abs().sum() == 0 and a.abs().sum() > 0
    assert not list(model.buffers())  # DDP broadcasts buffers: adapters add none


def test_a_few_optimizer_steps_change_logits_and_leave_the_base_alone(tiny_checkpoint, base_logits):
    model = load(tiny_checkpoint)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train(model, add_lora(model, LoraConfig()))
    assert losses[-1] < losses[0]
    assert (logits(model) - base_logits).abs().max() > 1.0
    for name, param in model.named_parameters():
        if "lora_" not in name:
            torch.testing.assert_close(param, frozen[name.replace(".base.", ".")], atol=0, rtol=0)


@pytest.mark.parametrize(
    "checkpoint_name, targets",
    [
        ("tiny_checkpoint", LoraConfig().targets),
        ("tiny_relu_tied_checkpoint", ("q", "k", "v", "o", "wi", "wo")),  # relu checkpoints name it "wi"
    ],
)
def test_merge_matches_unmerged_and_saves_a_checkpoint_transformers_loads(request, tmp_path, checkpoint_name, targets):
    checkpoint = request.getfixturevalue(checkpoint_name)
    model = load(checkpoint)
    train(model, add_lora(model, LoraConfig(targets=targets)))
    unmerged = logits(model)
    ids, mask = batch_with_padding()
    tokens = model.generate(ids, mask, max_new_tokens=6, num_beams=2)

    assert merge_lora(model) is model
    assert all(type(m) is nn.Linear for m in stack_layers(model).values())
    torch.testing.assert_close(logits(model), unmerged, atol=MERGE_ATOL, rtol=0)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=6, num_beams=2), tokens)

    model.save_pretrained(tmp_path)
    reference = transformers.MT5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reference), unmerged, atol=MERGE_ATOL, rtol=0)


def test_targets_subset_adapts_only_those_parts_of_the_fused_layers(tiny_checkpoint):
    model = load(tiny_checkpoint)
    config = LoraConfig(targets=("q", "v"), dropout=0.0)
    params = add_lora(model, config)
    assert sorted(a.numel() + b.numel() for a, b in zip(params[::2], params[1::2])) == sorted(
        expected_adapter_sizes(model.config, config)
    )
    block = model.decoder.blocks[0]
    assert block.self_attn.qkv.adapted == ["q", "v"] and block.cross_attn.q.adapted == ["q"]
    assert block.cross_attn.kv.adapted == ["v"]
    for layer in (block.self_attn.o, block.cross_attn.o, block.ff.wi, block.ff.wo):
        assert type(layer) is nn.Linear

    qkv = block.self_attn.qkv
    with torch.no_grad():
        for b in qkv.lora_B.values():
            b.normal_()
        x = torch.randn(2, 5, model.config.d_model)
        got, base = qkv(x).chunk(3, dim=-1), qkv.base(x).chunk(3, dim=-1)
    assert torch.equal(got[1], base[1])  # k: untouched
    assert not torch.allclose(got[0], base[0]) and not torch.allclose(got[2], base[2])


def test_unknown_or_unmatched_targets_and_double_wrapping_are_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="targets"):
        LoraConfig(targets=("query",))
    model = load(tiny_checkpoint)
    with pytest.raises(ValueError, match="no projection"):
        add_lora(model, LoraConfig(targets=("wi",)))  # a gated checkpoint has wi_0 and wi_1
    add_lora(model, LoraConfig())
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(model, LoraConfig())


def test_gradient_checkpointing_gives_the_same_gradients_with_adapter_dropout(tiny_checkpoint):
    grads = []
    for checkpointing in (False, True):
        model = load(tiny_checkpoint)
        torch.manual_seed(0)
        params = add_lora(model, LoraConfig(dropout=0.3))
        with torch.no_grad():
            for p in params[1::2]:
                p.normal_(0, 0.1)  # B != 0, so that A gets gradients too
        model.encoder.gradient_checkpointing = model.decoder.gradient_checkpointing = checkpointing
        model.train()
        ids, mask = batch_with_padding()
        torch.manual_seed(1)  # the same dropout masks; checkpointing replays them in the recomputation
        model(input_ids=ids, attention_mask=mask, labels=decoder_inputs(seed=2)).loss.backward()
        grads.append([p.grad for p in params])
    assert all(g.abs().sum() > 0 for g in grads[0])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, atol=1e-6, rtol=1e-5)


def test_ddp_wraps_the_adapted_model_and_trains_two_steps(tiny_checkpoint, tmp_path):
    model = load(tiny_checkpoint)
    params = add_lora(model, LoraConfig())
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        ids, mask = batch_with_padding()
        ddp.train()
        for _ in range(2):  # a second step fails if the first left a gradient unreduced
            ddp(input_ids=ids, attention_mask=mask, labels=decoder_inputs(seed=2)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        dist.destroy_process_group()
    assert all(p.abs().sum() > 0 for p in params[1::2])


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_qlora_trains_adapters_over_a_frozen_quantized_base_and_merges_into_full_precision(
    tiny_checkpoint, tmp_path, method
):
    model = load(tiny_checkpoint, quantization=method)
    quantized = logits(model)
    layer_type = bnb.nn.Linear4bit if method == "nf4" else bnb.nn.Linear8bitLt
    codes = {n: m.weight.detach().clone() for n, m in stack_layers(model).items() if type(m) is layer_type}
    params = add_lora(model, LoraConfig())
    torch.testing.assert_close(logits(model), quantized, atol=0, rtol=0)
    assert {p.dtype for p in params} == {torch.float32}  # the compute dtype on CPU

    losses = train(model, params)
    assert losses[-1] < losses[0]
    for name, layer in stack_layers(model).items():
        if isinstance(layer, LoraLinear) and name in codes:
            assert type(layer.base) is layer_type and not layer.base.weight.requires_grad
            assert torch.equal(layer.base.weight, codes[name])  # still the same 4-bit / 8-bit codes
    unmerged = logits(model)
    assert (unmerged - quantized).abs().max() > 1.0

    merge_lora(model)
    layers = stack_layers(model)
    assert all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in layers.values())
    merged = logits(model)
    if method == "nf4":
        torch.testing.assert_close(merged, unmerged, atol=MERGE_ATOL, rtol=0)
    else:
        assert F.cosine_similarity(merged, unmerged, dim=-1).min() > INT8_MIN_COSINE
    model.save_pretrained(tmp_path)
    reference = transformers.MT5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reference), merged, atol=MERGE_ATOL, rtol=0)


def test_qlora_adapters_in_bfloat16_over_a_float32_nf4_base(tiny_checkpoint):
    model = load(tiny_checkpoint, quantization="nf4")
    params = add_lora(model, LoraConfig(), dtype=torch.bfloat16)
    assert {p.dtype for p in params} == {torch.bfloat16}
    losses = train(model, params)
    assert losses[-1] < losses[0] and logits(model).dtype == torch.float32  # cast to the base's output dtype
    merge_lora(model)
    dtypes = {name.rsplit(".", 1)[1]: m.weight.dtype for name, m in stack_layers(model).items()}
    assert dtypes == {
        "qkv": torch.bfloat16,
        "q": torch.bfloat16,
        "kv": torch.bfloat16,
        "o": torch.bfloat16,
        "wi": torch.bfloat16,
        "wo": torch.float32,
    }  # wo was never quantized: merged in place


def test_adapters_round_trip_through_save_and_load(tiny_checkpoint, tmp_path):
    model = load(tiny_checkpoint)
    config = LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "wi_1", "wo"))
    train(model, add_lora(model, config))
    save_adapters(model, tmp_path, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    fresh = load(tiny_checkpoint)
    load_adapters(fresh, tmp_path)  # adds the adapters from adapter_config.json, then fills them
    assert lora_state_dict(fresh).keys() == lora_state_dict(model).keys()
    for key, tensor in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(fresh)[key], tensor), key
    torch.testing.assert_close(logits(fresh), logits(model), atol=0, rtol=0)
    assert [p.requires_grad for p in lora_parameters(fresh)] == [True] * len(lora_parameters(fresh))

    other = load(tiny_checkpoint)
    add_lora(other, LoraConfig(rank=2, targets=config.targets))
    with pytest.raises(ValueError, match="do not match"):
        load_adapters(other, tmp_path)
    with pytest.raises(ModelLoadError, match="adapter_config.json is missing"):
        load_adapters(load(tiny_checkpoint), tmp_path / "nowhere")


@pytest.fixture
def peft():
    return pytest.importorskip("peft", reason="PEFT compatibility needs `pip install peft`")


def test_saved_adapters_load_in_peft_on_transformers_with_the_same_logits(peft, tiny_checkpoint, tmp_path):
    model = load(tiny_checkpoint)
    config = LoraConfig(targets=("q", "v", "o", "wi_1", "wo"))
    params = add_lora(model, config)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)  # far from zero: every adapter must land on the right projection
    save_adapters(model, tmp_path, config)
    reference = transformers.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    adapted = peft.PeftModel.from_pretrained(reference, tmp_path).eval()
    assert adapted.peft_config["default"].target_modules == set(config.targets)
    expected = logits(adapted)
    assert (expected - logits(load(tiny_checkpoint))).abs().max() > 1.0
    assert_as_close_to_float64_as_transformers(logits(model), expected, logits(copy.deepcopy(adapted).double()))


def test_adapters_saved_by_peft_load_into_our_model(peft, tiny_checkpoint, tmp_path):
    reference = transformers.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    adapted = peft.get_peft_model(
        reference, peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=12, target_modules=["k", "v", "wi_0", "o"])
    )
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    adapted.save_pretrained(tmp_path)
    model = load(tiny_checkpoint)
    load_adapters(model, tmp_path)
    adapted.eval()
    assert_as_close_to_float64_as_transformers(logits(model), logits(adapted), logits(copy.deepcopy(adapted).double()))
