"""--quantization auto: the fastest quantization whose weights and decode budget fit a replica's share of a GPU.

`choose_quantization` is the rule, a pure function of the model's shape, the settings and the memory; `gpu_memory`
says how much memory a GPU replica has, from what the driver can see before any replica starts; `resolve` puts
the two together for the driver, once, so that every replica loads the same choice and the manifest records it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from model.config import MT5Config

from .errors import PlacementError

# Fastest first, each smaller than the one before for mT5 (the embedding stays in bfloat16 throughout).
# bfloat16 is first: measured on an H200, int8 weight-only is slower than bfloat16 in eager mode (each call
# converts the weight), and compiled it is faster only on the output head (0.9x its time at decode row counts)
# while the projections are slower; nf4 dequantizes through bitsandbytes' kernels, slower still. So the ladder
# trades speed for room, and a model that fits in bfloat16 runs in bfloat16. LLM.int8 and fp4 are never chosen:
# no faster than int8 weight-only, and no smaller than nf4.
LADDER = ("none", "int8-weight-only", "nf4")
# What auto means off a GPU: today's CPU default, float32 without quantization (int8-dynamic trades agreement
# with float32 for speed, so it stays a choice the user makes).
ON_CPU = "none"

# Memory a replica cannot use for weights or decoding: the CUDA context and cuBLAS workspace (about 0.5-1 GiB
# on current drivers), plus a tenth of its share for the caching allocator's fragmentation.
HEADROOM_BYTES = 1 << 30
HEADROOM_SHARE = 0.10
# Float32 [rows, vocab] tensors a decode step makes beside the logits buffer: the float copy, the log-softmax
# and the scores the search ranks (model/decode.py).
FLOAT32_VOCAB_COPIES = 3

# GiB of memory per GPU, by Ray's accelerator type (ray.util.accelerators). Where a type comes in several sizes
# (A100, V100), the smaller: a rule that may pick int8 where bfloat16 fits costs speed, one that picks bfloat16
# where it does not fit fails.
GPU_GIB = {
    "V100": 16,
    "P100": 16,
    "T4": 16,
    "P4": 8,
    "K80": 12,
    "A10G": 24,
    "L4": 24,
    "L40S": 48,
    "A100": 40,
    "A100-40G": 40,
    "A100-80G": 80,
    "H100": 80,
    "H200": 141,
    "H20": 96,
    "B200": 180,
    "B300": 288,
    "GB200": 186,
    "GB300": 288,
    "RTX-PRO-6000": 96,
}
# Assumed when nothing says which GPU the replicas get (an autoscaling cluster with no GPU node yet and no
# --accelerator-type): the smallest data-center GPU in the table.
UNKNOWN_GPU_GIB = 16


@dataclass(frozen=True)
class Fit:
    quantization: str
    reason: str


def weight_bytes(config: MT5Config, quantization: str, dtype_bytes: int = 2) -> int:
    """Bytes of the model's weights on the GPU once quantized (model/quantize.py's targets): the embedding; the
    stacks' projections, quantized but `wo`; the untied head, which int8 weight-only quantizes and bitsandbytes
    keeps. Norms and position biases (a few thousand values) are left out."""
    inner = config.num_heads * config.d_kv
    d, ff = config.d_model, config.d_ff * (2 if config.is_gated else 1)
    attention = 4 * d * inner  # q, k, v and o
    encoder = config.num_layers * (attention + d * ff)
    decoder = config.num_decoder_layers * (2 * attention + d * ff)  # self and cross attention
    wo = (config.num_layers + config.num_decoder_layers) * config.d_ff * d
    head = 0 if config.tie_word_embeddings else config.vocab_size * d
    per_weight = {"none": dtype_bytes, "int8-weight-only": 1, "nf4": 0.5 + 1 / 64}[quantization]  # nf4: + absmax
    quantized_head = quantization == "int8-weight-only"
    total = (encoder + decoder) * per_weight + wo * dtype_bytes + config.vocab_size * d * dtype_bytes
    total += head * (per_weight if quantized_head else dtype_bytes)
    return int(total)


def decode_bytes(config: MT5Config, settings, dtype_bytes: int = 2) -> int:
    """Bytes a replica's decoding needs at most, for `settings` (SummarizeSettings):

    rows = batch_size x num_beams, docs = batch_size, b = dtype_bytes, L = max_input_tokens, N = max_new_tokens
    self-attention KV cache   2 x decoder layers x rows x heads x d_kv x (N + 1) x b
    cross-attention K/V       2 x decoder layers x docs x heads x d_kv x L x b    (one copy per document)
    logits                    rows x vocab x (b + 4 x FLOAT32_VOCAB_COPIES)
    encoder, one batch        E x heads x L x L x b x 2  +  E x L x d_ff x b x 3
                              (E = min(docs, max_batch_tokens // L) documents: the position bias with the
                              mask and the scores; the gated feed-forward's hidden states)
    """
    c = config
    rows, docs, length = settings.batch_size * settings.num_beams, settings.batch_size, settings.max_input_tokens
    kv = c.num_heads * c.d_kv * dtype_bytes * c.num_decoder_layers * 2
    self_cache = kv * rows * (settings.max_new_tokens + 1)
    cross = kv * docs * length
    logits = rows * c.vocab_size * (dtype_bytes + 4 * FLOAT32_VOCAB_COPIES)
    encoded = max(1, min(docs, settings.max_batch_tokens // length))
    encoder = encoded * length * dtype_bytes * (2 * c.num_heads * length + 3 * c.d_ff)
    return self_cache + cross + logits + encoder


def choose_quantization(config: MT5Config, settings, gpu_bytes: int, gpus_per_replica: float) -> Fit:
    """The first of LADDER whose weights plus decode_bytes fit the replica's share of GPU memory,
    gpu_bytes x gpus_per_replica less HEADROOM_BYTES and HEADROOM_SHARE of it, in the settings' dtype (2 bytes a
    value for auto, bfloat16 and float16 on a GPU; 4 for float32). Raises PlacementError when none fits."""
    share = gpu_bytes * gpus_per_replica
    usable = share * (1 - HEADROOM_SHARE) - HEADROOM_BYTES
    dtype_bytes = 4 if settings.dtype == "float32" else 2
    decode = decode_bytes(config, settings, dtype_bytes)
    for quantization in LADDER:
        weights = weight_bytes(config, quantization, dtype_bytes)
        if weights + decode <= usable:
            return Fit(
                quantization,
                f"weights {_gib(weights)} + decoding {_gib(decode)} fit {_gib(usable)} of the replica's "
                f"{_gib(share)} ({gpus_per_replica:g} x {_gib(gpu_bytes)})",
            )
    raise PlacementError(
        f"--quantization auto: no setting fits: even nf4 needs weights {_gib(weights)} + "  # the last tried
        f"decoding {_gib(decode)}, and a replica has {_gib(usable)} usable of {_gib(share)}. Lower --batch-size, "
        "--num-beams or --max-input-tokens, or raise --gpus-per-replica"
    )


def gpu_memory(cluster: dict, accelerator_type: str | None, visible_bytes: int | None) -> tuple[int, str]:
    """(bytes of one GPU a replica gets, where that figure comes from). In order: --accelerator-type; the
    smallest accelerator type the cluster shows (Ray resources `accelerator_type:X`); the GPU the driver's torch
    sees (`visible_bytes`); else UNKNOWN_GPU_GIB, said so. Ray's resources carry no GPU memory figure."""
    if accelerator_type in GPU_GIB:
        return GPU_GIB[accelerator_type] << 30, f"--accelerator-type {accelerator_type}"
    shown = [name.split(":", 1)[1] for name in cluster if name.startswith("accelerator_type:")]
    known = sorted((GPU_GIB[name], name) for name in shown if name in GPU_GIB)
    if known:
        return known[0][0] << 30, f"the cluster's {known[0][1]} nodes"
    if visible_bytes:
        return visible_bytes, "the GPU the driver sees"
    return UNKNOWN_GPU_GIB << 30, f"no GPU type known yet: assumed {UNKNOWN_GPU_GIB} GiB (pass --accelerator-type)"


def resolve(settings, config: MT5Config, device: str, gpu: tuple[int, str], gpus_per_replica: float) -> Fit:
    """What --quantization auto means for replicas on `device` ("cuda" or "cpu"), with `gpu` from gpu_memory."""
    if device != "cuda":
        return Fit(ON_CPU, "on CPU, auto is float32 without quantization")
    gpu_bytes, source = gpu
    fit = choose_quantization(config, settings, gpu_bytes, gpus_per_replica)
    return Fit(fit.quantization, f"{fit.reason}; GPU memory from {source}")


def on_this_device(settings, directory, device: str) -> str:
    """--quantization auto for a model loaded without the driver (a notebook, a test): the same rule, with the
    memory of the GPU torch sees, whole. Other settings as they are."""
    if settings.quantization != "auto":
        return settings.quantization
    import torch

    from model.checkpoint import read_config

    config = read_config(directory)
    visible = torch.cuda.get_device_properties(device).total_memory if device.startswith("cuda") else 0
    return resolve(settings, config, "cuda" if visible else "cpu", (visible, "the GPU torch sees"), 1.0).quantization


def resolved(settings, device: str, placement, storage_options: dict | None, log):
    """`settings` with --quantization auto replaced by its choice for replicas on `device`, stated in the log;
    other settings as they are. Called by the driver before any replica starts, on the Ray it joined."""
    if settings.quantization != "auto":
        return settings
    import ray
    import torch

    from model.checkpoint import read_config, resolve_checkpoint

    directory = resolve_checkpoint(settings.model, revision=settings.revision, storage_options=storage_options)
    config = read_config(directory)
    visible = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    gpu = gpu_memory(ray.cluster_resources(), placement.accelerator_type, visible) if device == "cuda" else (0, "")
    fit = resolve(settings, config, device, gpu, placement.gpus_per_replica)
    log(
        "quantization",
        f"--quantization auto: {fit.quantization} ({fit.reason})",
        quantization=fit.quantization,
        reason=fit.reason,
    )
    return dataclasses.replace(settings, quantization=fit.quantization)


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"
