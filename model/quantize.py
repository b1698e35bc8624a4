"""Quantized replicas through bitsandbytes: LLM.int8, NF4 or FP4 in place of the stacks' projections.

quantize(model, "nf4") swaps the attention and feed-forward nn.Linear layers of the encoder and
decoder blocks (qkv, q, kv, o, wi) for bitsandbytes layers, in place. Each weight is quantized on the
device it already lies on (CPU or GPU) with bitsandbytes' own quantization functions, one layer at a
time, and its full-precision tensor is released with the nn.Linear it belonged to: the quantized
model holds no full-precision copy of those weights.

What stays as it was, as transformers does for mT5 under bitsandbytes:
- each feed-forward output projection `wo` (see KEEP_UNQUANTIZED for why);
- `lm_head` by default (transformers' get_keys_to_not_convert keeps the output embedding), and always
  when it is tied to the embedding: quantizing it would break the tie and save nothing;
- the embedding, the norms, the relative position biases and the task heads (classifier, qa_outputs,
  classification_head), which are not projections of the stacks.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

METHODS = ("none", "int8", "nf4", "fp4")

# The stacks' projections, by their attribute names in model/modules.py.
PROJECTIONS = ("qkv", "q", "kv", "o", "wi", "wo")

# `wo` is never quantized, by any method. This is transformers' rule for (m)T5 under bitsandbytes:
# MT5PreTrainedModel._keep_in_fp32_modules = ["wo"], and modeling_utils applies that list whenever a
# bitsandbytes quantizer is active (use_keep_in_fp32_modules is True for 8-bit and 4-bit alike) and
# adds it to modules_to_not_convert, so `wo` stays an nn.Linear there (checked on transformers 4.57).
# The reason is numeric (transformers #20287: flan-t5-xxl in 8-bit gave garbage): the activations
# entering `wo` overflow float16, and LLM.int8 casts its input to float16 whatever the model's dtype
# (bitsandbytes' MatMul8bitLt). We leave `wo` as loaded: float32 in a float16 model (model/weights.py),
# the model's dtype otherwise (transformers upcasts it in bfloat16 too, which prevents no overflow).
# Measured: in mt5-small's shape `wo` is 32 MiB in float32 (16 in bfloat16), about 64% of the stacks'
# bytes once the rest is nf4. On the tiny random checkpoint, quantizing `wo` as well moved the lowest
# per-position cosine of the logits against float32 from 0.932 to 0.915 (nf4), 0.921 to 0.923 (fp4)
# and 0.9996 to 0.9994 (int8): no signal either way, since random weights are too small to overflow.
# So the rule stays, for the real checkpoints it was made for; it also gives exact int8 parity.
KEEP_UNQUANTIZED = ("wo",)

# bitsandbytes' defaults, spelled out: 4-bit blocks of 64 weights along the flattened weight, whose
# absmax values are quantized again (double quantization); LLM.int8's outlier threshold of 6.0 on the
# activations (transformers' llm_int8_threshold).
BLOCKSIZE_4BIT = 64
INT8_THRESHOLD = 6.0


class _DropFloat16CastNotice(logging.Filter):
    """LLM.int8 casts its input to float16 by design (see quantize's docstring), and bitsandbytes logs
    that at WARNING on every call of every layer: thousands of identical lines per generate()."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


_CAST_NOTICE_FILTER = _DropFloat16CastNotice()


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            "quantization needs bitsandbytes, which runs int8, nf4 and fp4 on CPU and CUDA from 0.46 on: "
            "pip install 'bitsandbytes>=0.46'") from err
    return bitsandbytes


def _matches(path: str, names: tuple[str, ...]) -> bool:
    """True if one of `names` is the module's path or a run of whole components of it ("wo", "decoder")."""
    dotted = f".{path}."
    return any(f".{name}." in dotted for name in names)


def _tied(model: nn.Module, layer: nn.Linear) -> bool:
    shared = getattr(model, "shared", None)
    return shared is not None and layer.weight is shared.weight


def _targets(model: nn.Module, skip: tuple[str, ...]) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute name) of each nn.Linear to replace."""
    found = []
    for path, module in model.named_modules():
        in_stack = bool({"encoder", "decoder"} & set(path.split(".")))
        for attr, child in module.named_children():
            full = f"{path}.{attr}" if path else attr
            if type(child) is not nn.Linear or attr in KEEP_UNQUANTIZED or _matches(full, skip):
                continue
            if (in_stack and attr in PROJECTIONS) or (attr == "lm_head" and not _tied(model, child)):
                found.append((module, attr))
    return found


def _quantized_layer(bnb, layer: nn.Linear, method: str, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes layer holding `layer`'s weight, quantized on the weight's own device."""
    weight = layer.weight.detach()
    bias = layer.bias is not None
    if method == "int8":
        # Built on meta so that no throwaway float weight is allocated; the real one is assigned below.
        new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias, has_fp16_weights=False,
                                  threshold=INT8_THRESHOLD, device="meta")
        # Row-wise absmax int8, what Int8Params does on .to(device). Called directly because Int8Params
        # quantizes only when it leaves the CPU, and a weight already on the GPU never does.
        codes, row_scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        new.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=row_scales)
    else:
        new = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias, compute_dtype=compute_dtype,
                                compress_statistics=True, quant_type=method, device="meta")
        # What Params4bit.to(device) does on its first move, done where the weight is.
        packed, state = bnb.functional.quantize_4bit(weight.contiguous(), blocksize=BLOCKSIZE_4BIT,
                                                     compress_statistics=True, quant_type=method,
                                                     quant_storage=torch.uint8)
        new.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=BLOCKSIZE_4BIT,
                                       compress_statistics=True, quant_type=method, quant_storage=torch.uint8,
                                       module=new, bnb_quantized=True)
        new.quant_state = state
    if bias:
        new.bias = nn.Parameter(layer.bias.detach(), requires_grad=False)
    new.train(layer.training)
    return new


def _check_runs(bnb, method: str, device: torch.device, compute_dtype: torch.dtype) -> None:
    """Quantize and run one small layer first, so that a bitsandbytes build without kernels for this
    device fails with one message that says so, rather than midway through the model."""
    probe = nn.Linear(64, 64, bias=False, device=device, dtype=compute_dtype)
    try:
        layer = _quantized_layer(bnb, probe, method, compute_dtype)
        with torch.no_grad():
            layer(torch.ones(2, 64, device=device, dtype=compute_dtype))
    except (RuntimeError, NotImplementedError) as err:
        raise RuntimeError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run {method} on {device}: {err}. "
            "`python -m bitsandbytes` diagnoses the install; bitsandbytes>=0.46 runs on CPU and CUDA, and "
            "its CUDA build must match torch's CUDA version.") from err


def quantize(model: nn.Module, method: str, *, compute_dtype: torch.dtype | None = None,
             skip: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """Replace the stacks' projections of `model` with bitsandbytes layers, in place; returns `model`.

    method: "none" (the model as it is), "int8" (LLM.int8: row-wise int8 weights; activation columns
        with an outlier above 6.0 are multiplied in float16, the rest in int8; the input is cast to
        float16 inside bitsandbytes whatever the model's dtype), "nf4" or "fp4" (4-bit in blocks of
        64 weights, double quantized, as QLoRA).
    compute_dtype: the dtype the 4-bit weights are dequantized to for their matmuls; by default the
        model's dtype. Not used by int8.
    skip: names of modules, or dotted runs of names, to leave as they are: "lm_head", "decoder",
        "cross_attn", "encoder.blocks.0". `wo` is always left (see KEEP_UNQUANTIZED); pass skip=() to
        quantize an untied lm_head too.
    """
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; use one of {', '.join(METHODS)}")
    if method == "none":
        return model
    bnb = _bitsandbytes()
    targets = _targets(model, tuple(skip))
    if not targets:
        return model
    parent, attr = targets[0]
    device, dtype = getattr(parent, attr).weight.device, getattr(parent, attr).weight.dtype
    if device.type == "meta":
        raise ValueError("quantize() needs the weights: the model is on the meta device; load it first")
    compute_dtype = compute_dtype or dtype
    if method == "int8":
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_CAST_NOTICE_FILTER)  # idempotent
    _check_runs(bnb, method, device, compute_dtype)
    for parent, attr in targets:
        # One layer at a time: the old layer, and with it the full-precision weight, is released by the
        # setattr, so the peak is the model plus one quantized layer.
        setattr(parent, attr, _quantized_layer(bnb, getattr(parent, attr), method, compute_dtype))
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by `model`'s parameters and buffers, with the quantization statistics that live
    outside them (absmax, nested absmax, offsets and code books of 4-bit layers; row scales of int8
    layers). A tensor shared by several modules, such as a tied embedding, counts once."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(tensor) -> None:
        nonlocal total
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        nbytes = tensor.numel() * tensor.element_size()
        if (tensor.data_ptr(), nbytes) not in seen:
            seen.add((tensor.data_ptr(), nbytes))
            total += nbytes

    for tensor in (*model.parameters(), *model.buffers()):
        add(tensor)
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)  # 4-bit
        while state is not None:
            for name in ("absmax", "code", "offset"):
                add(getattr(state, name, None))
            state = state.state2
        # LLM.int8: the row scales sit on the weight until the first forward, then on module.state.
        for owner in (getattr(module, "weight", None), getattr(module, "state", None)):
            add(getattr(owner, "SCB", None))
    return total
