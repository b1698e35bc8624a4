"""Saving, loading and dtypes: round trips through transformers, strict loading, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

import model as ours
from model.errors import ModelLoadError
from tests.model.helpers import FP32_ATOL, batch_with_padding, decoder_inputs


def _logits(m, ids, mask, dec):
    with torch.no_grad():
        return m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits


@pytest.mark.parametrize("shard_bytes", [5 * 2**30, 8 * 2**20], ids=["single-file", "sharded"])
def test_save_pretrained_round_trips_through_transformers(tiny_checkpoint, tmp_path, shard_bytes):
    model = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    model.save_pretrained(tmp_path, max_shard_bytes=shard_bytes)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard_bytes < 2**30)
    reference = transformers.MT5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert not reference.config.tie_word_embeddings
    ids, mask = batch_with_padding()
    dec = decoder_inputs()
    torch.testing.assert_close(
        _logits(model, ids, mask, dec), _logits(reference, ids, mask, dec), atol=FP32_ATOL, rtol=0
    )
    # and we read back exactly what we wrote
    again = ours.MT5ForConditionalGeneration.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_tied_checkpoint_shares_and_scales_its_head(tiny_relu_tied_checkpoint, tmp_path):
    model = ours.MT5ForConditionalGeneration.from_pretrained(tiny_relu_tied_checkpoint)
    assert model.lm_head.weight is model.shared.weight
    model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["tie_word_embeddings"] is True


def test_untied_checkpoint_without_lm_head_is_refused(tiny_checkpoint, tmp_path):
    """Never fill an untied lm_head from the embedding (transformers #48154 did, and generation broke)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_checkpoint, tmp_path, dirs_exist_ok=True)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*lm_head\.weight.*never filled"):
        ours.MT5ForConditionalGeneration.from_pretrained(tmp_path)


def test_config_that_does_not_match_the_weights_is_named(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["d_ff"] += 32  # any width the weights do not have
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*DenseReluDense.*config does not match"):
        ours.MT5ForConditionalGeneration.from_pretrained(tmp_path)


def test_config_with_more_layers_than_the_weights_lists_missing_tensors(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_layers"] += 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"missing \['encoder\.block\.3\."):
        ours.MT5ForConditionalGeneration.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c.update(feed_forward_proj="swish"), "feed_forward_proj"),
        (lambda c: c.update(num_heads=0), "num_heads"),
        (lambda c: c.update(eos_token_id=300000), "eos_token_id"),
        (lambda c: c.update(model_type="bert"), "model_type"),
    ],
)
def test_inconsistent_config_gets_a_clear_error(tiny_checkpoint, tmp_path, edit, message):
    shutil.copytree(tiny_checkpoint, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ours.ConfigError, match=rf"config\.json.*{message}"):
        ours.MT5ForConditionalGeneration.from_pretrained(tmp_path)


def test_missing_and_truncated_files_are_named(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint, tmp_path / "no-config")
    (tmp_path / "no-config" / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        ours.MT5ForConditionalGeneration.from_pretrained(tmp_path / "no-config")

    shutil.copytree(tiny_checkpoint, tmp_path / "truncated")
    weights = tmp_path / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        ours.MT5ForConditionalGeneration.from_pretrained(tmp_path / "truncated")

    with pytest.raises(ModelLoadError, match="does-not-exist"):
        ours.MT5ForConditionalGeneration.from_pretrained(tmp_path / "does-not-exist")


def test_loads_from_an_fsspec_memory_uri(tiny_checkpoint, tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setenv("LAKESUM_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    for path in tiny_checkpoint.iterdir():
        fs.pipe(f"/models/tiny/{path.name}", path.read_bytes())
    model = ours.MT5ForConditionalGeneration.from_pretrained("memory://models/tiny")
    local = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    ids, mask = batch_with_padding()
    assert torch.equal(_logits(model, ids, mask, decoder_inputs()), _logits(local, ids, mask, decoder_inputs()))


# --- dtypes ------------------------------------------------------------------------------------------


def test_bfloat16_logits_stay_close_to_float32(tiny_checkpoint):
    fp32 = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint)
    bf16 = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype="bfloat16")
    assert bf16.shared.weight.dtype == torch.bfloat16
    ids, mask = batch_with_padding()
    dec = decoder_inputs()
    expected, got = _logits(fp32, ids, mask, dec), _logits(bf16, ids, mask, dec).float()
    # bf16 keeps 8 bits of mantissa: compare relative to the logits' scale, and the top token.
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


@pytest.fixture(scope="module")
def large_activation_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with feed-forward weights scaled up until float16 activations overflow."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("large-activations")
    shutil.copytree(tiny_checkpoint, out, dirs_exist_ok=True)
    tensors = load_file(out / "model.safetensors")
    for name in tensors:
        if "DenseReluDense.wi" in name:
            tensors[name] *= 12.0
        if "DenseReluDense.wo" in name:
            tensors[name] *= 1000.0
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_float16_keeps_wo_in_float32_so_logits_stay_finite_and_right(large_activation_checkpoint):
    ids, mask = batch_with_padding()
    dec = decoder_inputs()
    expected = _logits(ours.MT5ForConditionalGeneration.from_pretrained(large_activation_checkpoint), ids, mask, dec)
    model = ours.MT5ForConditionalGeneration.from_pretrained(large_activation_checkpoint, dtype=torch.float16)
    assert model.encoder.blocks[0].ff.wo.weight.dtype == torch.float32
    assert model.encoder.blocks[0].ff.wi.weight.dtype == torch.float16

    def error(logits):
        return ((logits.float() - expected).abs().max() / expected.abs().max()).item()

    logits = _logits(model, ids, mask, dec)
    assert torch.isfinite(logits).all()
    assert error(logits) < 0.01
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))

    # The same model with wo in float16 saturates (clamped inf) and is wrong: the checks above can fail.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32:
                module.weight.data = module.weight.data.half()
    assert error(_logits(model, ids, mask, dec)) > 0.5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bfloat16_matches_transformers_within_tolerance(tiny_checkpoint):
    """On a GPU: our bf16 against transformers' bf16. Tolerance: 2% of the logits' range, and the
    greedy tokens of the first 8 steps identical."""
    reference = (
        transformers.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint, torch_dtype=torch.bfloat16)
        .cuda()
        .eval()
    )
    model = ours.MT5ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype="bfloat16", device="cuda")
    ids, mask = (t.cuda() for t in batch_with_padding())
    dec = decoder_inputs().cuda()
    expected, got = _logits(reference, ids, mask, dec).float(), _logits(model, ids, mask, dec).float()
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()
    settings = dict(max_new_tokens=8)
    assert (
        model.generate(input_ids=ids, attention_mask=mask, **settings).tolist()
        == reference.generate(input_ids=ids, attention_mask=mask, **settings).tolist()
    )
