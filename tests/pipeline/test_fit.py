"""--quantization auto's rule: mT5's five sizes on an 80 GB and a 16 GB GPU, whole and at a quarter share."""

from __future__ import annotations

import json

import pytest

from model.config import MT5Config
from pipeline.errors import PlacementError
from pipeline.fit import (
    GPU_GIB,
    HEADROOM_BYTES,
    UNKNOWN_GPU_GIB,
    choose_quantization,
    decode_bytes,
    gpu_memory,
    resolve,
    weight_bytes,
)
from pipeline.settings import SummarizeSettings

GIB = 1 << 30
# d_model, d_ff, heads, layers (each stack) of google/mt5-{small,base,large,xl,xxl}; d_kv 64, 250,112 ids, untied
SHAPES = {
    "small": (512, 1024, 6, 8),
    "base": (768, 2048, 12, 12),
    "large": (1024, 2816, 16, 24),
    "xl": (2048, 5120, 32, 24),
    "xxl": (4096, 10240, 64, 24),
}
# (GPU GiB, --gpus-per-replica) -> the choice for each size at the default settings (32 documents x 4 beams,
# 512 input and 84 new tokens) and at --batch-size 8; "-" where nothing fits (a usage error).
GPUS = [(80, 1.0), (16, 1.0), (80, 0.25), (16, 0.25)]
EXPECTED = {
    32: {
        "small": ["none", "none", "none", "none"],
        "base": ["none", "none", "none", "-"],
        "large": ["none", "none", "none", "-"],
        "xl": ["none", "int8-weight-only", "none", "-"],
        "xxl": ["none", "-", "-", "-"],
    },
    8: {
        "small": ["none", "none", "none", "none"],
        "base": ["none", "none", "none", "none"],
        "large": ["none", "none", "none", "int8-weight-only"],
        "xl": ["none", "none", "none", "-"],
        "xxl": ["none", "-", "nf4", "-"],
    },
}


def mt5(size: str) -> MT5Config:
    d, ff, heads, layers = SHAPES[size]
    return MT5Config(
        vocab_size=250112,
        d_model=d,
        d_ff=ff,
        d_kv=64,
        num_heads=heads,
        num_layers=layers,
        num_decoder_layers=layers,
        tie_word_embeddings=False,
    )


@pytest.mark.parametrize("batch_size", EXPECTED)
@pytest.mark.parametrize("size", SHAPES)
def test_auto_picks_the_fastest_setting_that_fits_each_size_and_share(size, batch_size):
    settings = SummarizeSettings(model="m", batch_size=batch_size)
    got = []
    for gib, share in GPUS:
        try:
            got.append(choose_quantization(mt5(size), settings, gib * GIB, share).quantization)
        except PlacementError as err:
            assert "no setting fits" in str(err) and "--batch-size" in str(err)
            got.append("-")
    assert got == EXPECTED[batch_size][size]


def test_small_base_and_large_run_in_bfloat16_on_any_data_center_gpu_at_modest_batches():
    settings = SummarizeSettings(model="m", batch_size=8)
    smallest = min(gib for gib in GPU_GIB.values() if gib >= 16)
    for size in ("small", "base", "large"):
        assert choose_quantization(mt5(size), settings, smallest * GIB, 1.0).quantization == "none", size


def test_weights_shrink_with_each_step_of_the_ladder_as_counted():
    """mt5-xxl: 13B weights, 24 GiB in bfloat16; int8 halves the quantized projections and the head, nf4 quarters
    the projections; the embedding and `wo` stay in bfloat16 throughout."""
    config = mt5("xxl")
    none, int8, nf4 = (weight_bytes(config, q) / GIB for q in ("none", "int8-weight-only", "nf4"))
    assert 23.5 < none < 24.5 and nf4 < int8 < none
    embedding = 250112 * 4096 * 2 / GIB
    assert none - int8 == pytest.approx((none - 2 * embedding - 48 * 10240 * 4096 * 2 / GIB) / 2 + embedding / 2)


def test_decode_budget_is_the_formula_of_its_docstring():
    config = MT5Config(vocab_size=100, d_model=8, d_ff=16, d_kv=2, num_heads=3, num_layers=1, num_decoder_layers=2)
    settings = SummarizeSettings(model="m", batch_size=5, num_beams=2, max_input_tokens=7, max_new_tokens=4)
    rows, b = 10, 2
    self_cache = 2 * 2 * rows * 3 * 2 * 5 * b
    cross = 2 * 2 * 5 * 3 * 2 * 7 * b
    logits = rows * 100 * (b + 4 * 3)
    encoder = 5 * 3 * 7 * 7 * b * 2 + 5 * 7 * 16 * b * 3
    assert decode_bytes(config, settings) == self_cache + cross + logits + encoder


def test_float32_counts_four_bytes_a_value():
    config = mt5("xl")
    bf16, fp32 = SummarizeSettings(model="m", batch_size=8), SummarizeSettings(model="m", batch_size=8, dtype="float32")
    assert choose_quantization(config, bf16, 16 * GIB, 1.0).quantization == "none"
    assert choose_quantization(config, fp32, 16 * GIB, 1.0).quantization == "int8-weight-only"


def test_headroom_is_taken_from_the_share():
    config, settings = mt5("small"), SummarizeSettings(model="m", batch_size=1, num_beams=1)
    need = weight_bytes(config, "none") + decode_bytes(config, settings)
    just_enough = (need + HEADROOM_BYTES) / 0.9 + 1
    assert choose_quantization(config, settings, int(just_enough), 1.0).quantization == "none"
    assert choose_quantization(config, settings, int(just_enough) - 2**20, 1.0).quantization == "int8-weight-only"


def test_gpu_memory_comes_from_the_flag_then_the_cluster_then_the_driver_then_a_stated_guess():
    cluster = {"GPU": 8, "accelerator_type:A100-80G": 1, "accelerator_type:T4": 1}
    assert gpu_memory(cluster, "H100", None) == (80 * GIB, "--accelerator-type H100")
    assert gpu_memory(cluster, None, 40 * GIB) == (16 * GIB, "the cluster's T4 nodes")  # the smallest type
    assert gpu_memory({"GPU": 1}, None, 141 * GIB) == (141 * GIB, "the GPU the driver sees")
    gib, why = gpu_memory({}, "RTX-9999", None)
    assert gib == UNKNOWN_GPU_GIB * GIB and "--accelerator-type" in why


def test_on_cpu_auto_is_float32_without_quantization():
    fit = resolve(SummarizeSettings(model="m"), mt5("xxl"), "cpu", (0, "none"), 1.0)
    assert fit.quantization == "none" and "CPU" in fit.reason


def test_the_driver_records_the_resolved_choice_and_refuses_to_resume_with_another(
    ray_local, tiny_checkpoint, tmp_path, monkeypatch
):
    """auto is resolved once in the driver: the manifest and report.json hold the choice, not "auto", so a resumed
    run whose auto comes out otherwise (here: as if on a smaller GPU) is refused as written with other settings."""
    import io

    from pipeline import fit
    from pipeline.driver import run
    from pipeline.errors import OutputError
    from pipeline.fit import Fit
    from synthetic.corpus import documents, write_shards
    from tests.pipeline.helpers import FAST

    write_shards(tmp_path / "lake", documents(6, seed=2), files=1, row_group_size=6, partition=None)
    settings = SummarizeSettings(model=str(tiny_checkpoint), **FAST)
    assert settings.quantization == "auto"
    log = io.StringIO()
    report = run(settings, str(tmp_path / "lake"), str(tmp_path / "out"), replicas=1, out=log)
    assert report.success and "--quantization auto: none (on CPU" in log.getvalue()
    meta = tmp_path / "out" / "_lakesum"
    for name in ("manifest.json", "report.json"):
        assert json.loads((meta / name).read_text())["settings"]["quantization"] == "none", name

    monkeypatch.setattr(fit, "resolve", lambda *args: Fit("int8-weight-only", "as if on a smaller GPU"))
    with pytest.raises(OutputError, match="other settings \\(quantization: 'none' -> 'int8-weight-only'\\)"):
        run(settings, str(tmp_path / "lake"), str(tmp_path / "out"), replicas=1, out=io.StringIO())
