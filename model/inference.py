"""The one way to load a model for summarizing: the checkpoint in the dtype it runs in on its device, its output
vocabulary restricted, quantized, and its head laid out for the CPU, in that order.

The replica and the Ray Data adapter (pipeline/replica.py) and the benchmarks load through
load_for_inference, so that what they measure is what a job runs. It chooses the dtype and asks
MT5ForConditionalGeneration.from_pretrained for the rest, whose order is the recipe, written there once:
- restrict before quantizing, so that int8-dynamic quantizes the smaller head (model/vocabulary.py);
- quantize while moving to the device: a quantized model is loaded in host memory and each layer is quantized as it
  reaches the GPU, which never holds more than the quantized model plus one full-precision layer;
- pack last: a float32 head and float32 projections on CPU are packed for oneDNN, and an int8-dynamic head is
  packed for oneDNN on a CPU with VNNI; other quantized layers stay as they are (model/packed.py). A model for the
  compiled decode step packs its head alone: torch.compile cannot trace a packed weight.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from .mt5 import MT5ForConditionalGeneration


def load_for_inference(
    source: str | Path,
    *,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device = "cpu",
    quantization: str = "none",
    kept_ids: Iterable[int] | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    compile_decode: bool = False,
) -> MT5ForConditionalGeneration:
    """An mT5 model ready to generate, in eval mode and for inference only (a packed layer takes no gradient:
    model.packed.unpack puts the plain ones back for training).

    source, revision, cache_dir: as MT5ForConditionalGeneration.from_pretrained.
    dtype: as inference_dtype.
    quantization: one of model.quantize.METHODS; a quantized model is loaded in host memory and quantized layer by
        layer as it moves to `device` (from_pretrained): where --quantization auto chose it because the
        full-precision model does not fit the GPU's share, loading it there first would run out of memory.
    kept_ids: the only ids the model may generate (restrict_vocabulary), or None for the whole vocabulary.
    compile_decode: the model will decode through the compiled step (generation's `compile`), which cannot run
        packed projections: only the head is packed.
    """
    device = torch.device(device)
    return MT5ForConditionalGeneration.from_pretrained(
        source,
        dtype=inference_dtype(dtype, device),
        device=device,
        quantization=quantization,
        kept_ids=kept_ids,
        pack_head=True,
        pack_linears=not compile_decode,
        revision=revision,
        cache_dir=cache_dir,
    )


def inference_dtype(dtype: torch.dtype | str, device: str | torch.device) -> torch.dtype | str:
    """The dtype a model runs in on `device`. "auto": float32 on CPU (which int8-dynamic and the packed head need);
    on a GPU, bfloat16 where it has bf16 arithmetic (Ampere and later), else float16 (T4, V100), with each
    feed-forward's `wo` kept in float32 (model/weights.py) because mT5's activations overflow float16.

    Raises ValueError for bfloat16 on a GPU without it: emulated, it would run many times slower.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return "float32" if dtype == "auto" else dtype
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if dtype == "auto":
        return "bfloat16" if bf16 else "float16"
    if dtype in ("bfloat16", torch.bfloat16) and not bf16:
        raise ValueError(
            f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 arithmetic; use --dtype auto "
            "(float16 there, with wo kept in float32) or float16"
        )
    return dtype
