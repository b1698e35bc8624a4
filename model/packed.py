"""oneDNN weight prepacking of float32 linear layers, for CPU inference.

At the few rows of a decode step, mT5's [250112, d_model] float32 head is more than half of the step's
time on CPU. oneDNN, given the weight reordered once into its blocked layout for a small row count, runs
that GEMM faster than MKL does on the plain layout, row- or column-major, from 4 rows up
(benchmarks/README.md has the figures). It is the one CPU layout of the head. The blocks' projections gain too:
on AMD CPUs MKL's float32 GEMM takes its generic path, and oneDNN ran every projection of mt5-small 1.9-2.6x
faster, from 16 rows (a decode step) to 2,000 (an encoder batch) (AMD EPYC, one thread). The outputs agree to
float32 rounding, not bit for bit: oneDNN sums in another order.

pack_head_for_cpu(model) replaces the head's float nn.Linear (lm_head itself, or the one inside a
restricted head) with a PackedLinear, in place; pack_linears_for_cpu(model) does the same for the encoder's and
decoder's projections. The packed copy replaces the plain weight, so memory does not grow. It is for inference:
the packed weight takes no gradient, and training a packed model fails with a clear error; unpack(model) puts the
plain nn.Linear layers back first (pipeline/train.py does, as a replica fine-tunes the model it serves).
state_dict() and save_pretrained unpack them, so a packed model saves the same checkpoint as before.
model.load_for_inference packs after restricting the vocabulary and quantizing; the compiled decode step cannot
trace a packed weight, so a model loaded for it packs its head alone, which that step runs after the graph.

An int8-dynamic head (torch's dynamically quantized Linear, model/quantize.py) runs its int8 weight on oneDNN's
kernel rather than fbgemm's (torch's "x86" engine picks fbgemm for dynamic linears) on CPUs with VNNI.
load_for_inference has quantize() make it an Int8HeadBlocks (vocabulary blocks written into the decode step's
reused buffer) packed for oneDNN there (int8_head_engine), for the engine set now elsewhere, so that its 250k rows
are packed once and pack_head_for_cpu finds nothing to do; a one-layer head packed for fbgemm is repacked in place.
There oneDNN runs the head's u8 x s8 GEMM with VNNI or AMX tiles, 1.6-2x fbgemm's speed at 64 rows (beam 4's
16 x 4) and on par at 16 on an AVX-512 / AMX Xeon (benchmarks/README.md). At up to quantize.FEW_ROWS rows the
head multiplies through a second copy of its blocks packed for fbgemm (Int8HeadBlocks.few_rows): there the weight's
bytes bound the product, and fbgemm streams them faster (0.47-0.83x oneDNN's time at 1-16 rows, AMD EPYC Zen 4).
Both quantize the input alike (per tensor, 7 bits: reduce_range) and sum the int8 products exactly in int32;
only the float rescaling of each sum is rounded in another order, so the logits agree to float32 rounding.
The int8-dynamic projections over source tokens (the encoder's, and the cross-attention's keys and values:
quantize.runs_over_sources) are packed for oneDNN too on such CPUs (int8_source_engine), as they are quantized;
pack_linears_for_cpu repacks them after a copy. At an encoder batch's thousands of rows oneDNN's kernel is the
faster one (mt5-small's fused q/k/v at [3,200, 512] x [512, 1,152]: 5.6 against fbgemm's 15.7 ms; an encode at
[16, 200] tokens 608 -> 504 ms, AMD EPYC Zen 5, one thread); the decoder's per-step projections stay where they
are, as fbgemm is 5-15 us a call faster at a step's 1-64 rows. Over an encoder's million input values, a few lie
within float rounding of half an int8 step, and the two kernels round those apart: some outputs then differ by one
step of one input value (3e-3 at outputs of 3), each as far from float32's product as the other.
"""

from __future__ import annotations

import torch
from torch import nn

from . import cpu_isa
from .quantize import Int8HeadBlocks, dynamic_int8_engine, pack_dynamic_int8, runs_over_sources

# The row count oneDNN's layout is chosen for: a decode step's rows (batch x beams). Measured on the head
# at 1-64 rows, layouts picked for 16 and for 64 rows ran within noise of each other.
ROWS_HINT = 16


def can_pack() -> bool:
    """Whether this torch has oneDNN's prepacked linear (CPU builds with MKL-DNN have it)."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class PackedLinear(nn.Module):
    """A bias-free float32 nn.Linear on CPU whose weight is held in oneDNN's prepacked layout."""

    def __init__(self, linear: nn.Linear, rows_hint: int = ROWS_HINT):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rows_hint = rows_hint
        # An opaque oneDNN tensor, deliberately not a parameter or buffer: .to() and optimizers cannot use it.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)

    @property
    def weight(self) -> torch.Tensor:
        """The plain [out_features, in_features] weight, unpacked (a copy)."""
        return self.packed.to_dense()

    def plain(self) -> nn.Linear:
        """The plain nn.Linear this layer packs (its weight unpacked, a copy)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(self.weight, requires_grad=False)
        return linear.train(self.training)

    def __deepcopy__(self, memo) -> PackedLinear:
        # The packed tensor is opaque (it has no storage to copy): the copy packs the plain weight again.
        copied = memo[id(self)] = PackedLinear(self.plain(), self.rows_hint).train(self.training)
        return copied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError(
                "a packed linear layer is for inference only: unpack the model (model.packed.unpack) to train it"
            )
        rows = x.reshape(-1, self.in_features).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, None, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        weight = state_dict[key].detach().to(torch.float32)
        if tuple(weight.shape) != (self.out_features, self.in_features):
            error_msgs.append(
                f"{key}: shape {tuple(weight.shape)} in the state dict, "
                f"{(self.out_features, self.in_features)} in the model"
            )
            return
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), self.rows_hint)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN prepacked"


def is_dynamic_int8(linear) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return isinstance(linear, DynamicLinear) and linear._packed_params.dtype == torch.qint8


def can_pack_int8() -> bool:
    """Whether an int8-dynamic head gains from oneDNN's kernel: torch has the engine, and the CPU VNNI (on
    AVX2 without it, u8 x s8 products go through 16-bit sums, and fbgemm stays), as oneDNN runs it (cpu_isa)."""
    return "onednn" in torch.backends.quantized.supported_engines and cpu_isa.onednn_vnni()


def repack_dynamic_int8(linear, engine: str = "onednn") -> bool:
    """Prepack an int8-dynamic layer's weight (and bias) for the kernels of torch's quantized `engine`, in
    place (again, if it was). Its state dict is unchanged."""
    pack_dynamic_int8(linear, *linear._packed_params._weight_bias(), engine)
    return True


def int8_head_engine(model: nn.Module) -> str | None:
    """The quantized engine pack_head_for_cpu runs an int8-dynamic head on: "onednn" where it would repack it (see
    the module docstring), else None (it stays on the engine it was packed for). quantize(head_engine=...) packs the
    head for it straight away, and pack_head_for_cpu then has nothing to repack."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    return "onednn" if not tied and can_pack() and can_pack_int8() else None


def int8_source_engine() -> str | None:
    """The quantized engine an int8-dynamic model's projections over source tokens (quantize.runs_over_sources) are
    packed for: "onednn" where its VNNI kernel runs (can_pack_int8), else None (the engine set now). At an encoder
    batch's thousands of rows oneDNN is the faster kernel, up to 2.8x for mt5-small's fused q/k/v at 3,200 rows;
    at a decode step's 1-64 rows fbgemm is, by 5-15 us a call, so the decoder's per-step projections stay there
    (AMD EPYC, one thread; benchmarks/README.md, "on AMD")."""
    return "onednn" if can_pack_int8() else None


def _head_slot(model: nn.Module) -> tuple[nn.Module, str]:
    """(module, attribute) holding the head's linear: lm_head, or the kept rows of a head over kept ids."""
    head = getattr(model, "lm_head", None)
    return (head, "kept") if getattr(head, "kept_ids", None) is not None else (model, "lm_head")


def is_packed(model: nn.Module) -> bool:
    """Whether the model's output head is a PackedLinear."""
    module, name = _head_slot(model)
    return isinstance(getattr(module, name, None), PackedLinear)


def _packable(linear) -> bool:
    return (
        type(linear) is nn.Linear
        and linear.bias is None
        and linear.weight.device.type == "cpu"
        and linear.weight.dtype == torch.float32
    )


def pack_head_for_cpu(model: nn.Module, rows_hint: int = ROWS_HINT) -> bool:
    """Prepack the output head's weight for CPU inference, in place (see the module docstring). Returns
    whether the head is packed now (an int8-dynamic one already packed for oneDNN counts): a tied, float16, non-CPU
    or already packed head, a quantized one but int8-dynamic on a CPU with VNNI, or a torch without oneDNN, is left
    as it is."""
    if getattr(model.config, "tie_word_embeddings", False) or not can_pack():
        return False  # a tied head is the input embedding too: packing it would unshare the two
    owner, name = _head_slot(model)
    linear = getattr(owner, name, None)
    # An int8-dynamic head, one layer or in blocks (quantize(head_engine=...) makes them), is packed for its engine
    # already; a copy of it, or a loaded state dict, was packed again for the engine set then and is repacked.
    int8_layers = linear.blocks if isinstance(linear, Int8HeadBlocks) else [linear] if is_dynamic_int8(linear) else []
    if int8_layers:
        engine = int8_head_engine(model)
        if engine is None:
            return False
        repacked = [repack_dynamic_int8(layer, engine) for layer in int8_layers if dynamic_int8_engine(layer) != engine]
        if isinstance(linear, Int8HeadBlocks):
            linear.pack_few_rows(again=bool(repacked))  # weights loaded into the blocks since are the copy's too
        return True
    if not _packable(linear):
        return False
    setattr(owner, name, PackedLinear(linear, rows_hint).train(linear.training))
    return True


def pack_linears_for_cpu(model: nn.Module, rows_hint: int = ROWS_HINT) -> int:
    """Prepack the encoder's and decoder's float32 projections for CPU inference, in place (see the module
    docstring), and repack int8-dynamic projections over source tokens for int8_source_engine where a copy or a
    loaded state dict packed them again for another; the head is pack_head_for_cpu's. Returns how many layers it
    packed: quantized (but those), float16, non-CPU or already packed layers, or a torch without oneDNN, are left as
    they are."""
    if not can_pack():
        return 0
    head_owner, head_name = _head_slot(model)
    source_engine = int8_source_engine()
    packed = 0
    for path, owner in list(model.named_modules()):
        for name, linear in list(owner.named_children()):
            if (owner, name) == (head_owner, head_name) or name == "lm_head":
                continue
            if _packable(linear):
                setattr(owner, name, PackedLinear(linear, rows_hint).train(linear.training))
                packed += 1
            elif (
                source_engine is not None
                and is_dynamic_int8(linear)
                and runs_over_sources(f"{path}.{name}" if path else name)
                and dynamic_int8_engine(linear) != source_engine
            ):
                packed += repack_dynamic_int8(linear, source_engine)
    return packed


def unpack(model: nn.Module) -> int:
    """Put plain nn.Linear layers back in place of packed ones, the head's included (for training); returns how
    many there were."""
    unpacked = 0
    for owner in list(model.modules()):
        for name, layer in list(owner.named_children()):
            if isinstance(layer, PackedLinear):
                setattr(owner, name, layer.plain())
                unpacked += 1
    return unpacked


def pack_for_cpu(model: nn.Module, *, projections: bool = True) -> None:
    """Lay `model` out for CPU inference as load_for_inference does: its head packed, and with `projections` its
    encoder's and decoder's float32 projections too (a model for the compiled decode step packs its head alone)."""
    pack_head_for_cpu(model)
    if projections:
        pack_linears_for_cpu(model)


def has_packed_projections(model: nn.Module) -> bool:
    """Whether any layer but the head is a PackedLinear (pack_linears_for_cpu packed them)."""
    owner, name = _head_slot(model)
    head = getattr(owner, name, None)
    return any(isinstance(m, PackedLinear) and m is not head for m in model.modules())
