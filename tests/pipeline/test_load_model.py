"""What a replica loads: the settings' vocabulary restriction, quantization and CPU head packing, in order."""

from __future__ import annotations

import pytest

from model.packed import PackedLinear, can_pack
from model.quantize import Int8HeadBlocks
from model.vocabulary import RestrictedHead
from pipeline.replica import load_model
from pipeline.settings import SummarizeSettings


@pytest.mark.skipif(not can_pack(), reason="this torch has no oneDNN prepacked linear")
def test_a_cpu_float32_replica_packs_its_head_and_an_int8_one_quantizes_it(tiny_checkpoint, tmp_path):
    model, _ = load_model(SummarizeSettings(model=str(tiny_checkpoint)), "cpu")
    assert isinstance(model.lm_head, PackedLinear)

    sample = tmp_path / "sample.txt"
    sample.write_text("a river and a lake\nein Fluss und ein See\n", encoding="utf-8")
    model, _ = load_model(SummarizeSettings(model=str(tiny_checkpoint), output_vocabulary=str(sample)), "cpu")
    assert isinstance(model.lm_head, RestrictedHead) and isinstance(model.lm_head.kept, PackedLinear)

    model, _ = load_model(SummarizeSettings(model=str(tiny_checkpoint), quantization="int8-dynamic"), "cpu")
    assert isinstance(model.lm_head, Int8HeadBlocks)  # int8-dynamic, in vocabulary blocks


def test_a_checkpoint_on_object_storage_loads_with_the_jobs_storage_options(s3, tiny_checkpoint, tmp_path, monkeypatch):
    from pipeline.driver import model_fingerprint

    fs, bucket, options = s3  # the credentials are in `options` only, not in the environment
    monkeypatch.setenv("LAKESUM_CACHE", str(tmp_path / "cache"))
    for path in tiny_checkpoint.iterdir():
        fs.put_file(str(path), f"{bucket}/ck/{path.name}")
    settings = SummarizeSettings(model=f"s3://{bucket}/ck")
    model, tokenizer = load_model(settings, "cpu", options)
    assert tokenizer("a lake").input_ids and model.config.d_model
    assert model_fingerprint(settings.model, storage_options=options)["model_hash"]  # the driver's check, too
