"""Quantized replicas: bitsandbytes (LLM.int8, NF4, FP4) or torch's dynamic int8, in place of the projections.

quantize(model, "nf4") swaps the attention and feed-forward nn.Linear layers of the encoder and
decoder blocks (qkv, q, kv, o, wi) for bitsandbytes layers, in place. Each weight is quantized on the
device it already lies on (CPU or GPU) with bitsandbytes' own quantization functions, one layer at a
time, and its full-precision tensor is released with the nn.Linear it belonged to: the quantized
model holds no full-precision copy of those weights. quantize(model, method, device="cuda") does the same while
moving a model from host memory: each layer is quantized as it arrives, so the GPU never holds the
full-precision model.

What stays as it was, as transformers does for mT5 under bitsandbytes:
- each feed-forward output projection `wo` (see KEEP_UNQUANTIZED for why);
- `lm_head` by default (transformers' get_keys_to_not_convert keeps the output embedding), and always
  when it is tied to the embedding: quantizing it would break the tie and save nothing;
- the embedding, the norms, the relative position biases and the task heads (classifier, qa_outputs,
  classification_head), which are not projections of the stacks.

quantize(model, "int8-dynamic") is the fast CPU path: torch's dynamic quantization (int8 weights with one
scale per output channel; each input quantized per tensor at run time; int8 matmuls through fbgemm /
oneDNN, float32 outputs). Both the bytes read and the arithmetic shrink, where bitsandbytes on CPU
dequantizes and multiplies in float. It quantizes the stacks' projections but `wo` (see
DYNAMIC_KEEP_UNQUANTIZED; held in bfloat16 on a CPU that multiplies it natively, see native_bfloat16), and an
untied lm_head by default: at mT5's 250k rows the head is the largest
matmul of each decoding step. That is where most of its disagreement with float32 comes from, not its
ROUGE (benchmarks/quality.py: 89% of sequences identical with the head kept, skip=("lm_head",), 74% with
it quantized; ROUGE-L 46.0 and 46.3 against float32's 46.2). CPU and float32 only.

quantize(model, "int8-weight-only") halves the weight bytes of a bfloat16 model, on GPU and CPU: int8 weights
with one symmetric scale per output channel, and activations left as they are. Each matmul is
`F.linear(x, codes.to(x.dtype)) * scales`, gpt-fast's WeightOnlyInt8Linear. Its purpose here is room (what
`--quantization auto` takes when bfloat16 does not fit), not speed: in eager mode each call converts the whole
weight first, slower than bfloat16 on GPU and several times slower than float32 on CPU; compiled, inductor reads
only the codes where it fuses the conversion (the output head at a decode step's rows), not everywhere. On CPU
in bfloat16, up to FUSED_CPU_MAX_ROWS rows, torch's fused kernel `_weight_int8pack_mm` replaces the formula (on
CUDA that kernel is slower than the formula at every measured shape). On CPU, int8-dynamic stays the fast path.
Same targets as int8-dynamic: the projections but `wo`, and an untied lm_head (restricted or not) unless
skipped; a tied head stays the embedding.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_isa
from .quantization_methods import METHODS

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

# int8-dynamic keeps `wo` in float32 too, for a reason of its own. The bitsandbytes rule is about float16
# (LLM.int8 casts `wo`'s input to float16, where mT5's activations overflow); dynamic int8 never goes
# through float16, but it quantizes each input with ONE scale over the whole tensor, and the input of `wo`
# is where mT5's activations have their large outliers: one of them coarsens the step for every other value.
# Measured with benchmarks/quality.py on the model it fine-tunes (1,556 held-out documents, sequences
# identical to float32's): wo kept 73.7% greedy / 73.5% beam 4, wo quantized 71.2% / 68.6%, ROUGE-L
# unchanged within noise (46.3 vs 45.9, 46.4 vs 46.5). Quantizing it would save about a quarter of the
# stacks' weight bytes; the agreement it costs is measured here, and on real checkpoints the outliers
# that motivate the rule are larger than in that small model.
DYNAMIC_KEEP_UNQUANTIZED = ("wo",)


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512_BF16, or AMX tiles), as oneDNN runs it (cpu_isa).

    int8-dynamic then holds the `wo` it leaves unquantized in bfloat16: mT5's activation dtype in its TPU
    pretraining, with float32's range (so none of float16's overflow) and a rounding of each value on its own (so
    none of per-tensor int8's coarsening by outliers). There oneDNN multiplies it 4x faster than float32 (at 490 rows
    of mt5-small's `wo` on AMD EPYC, 1.07 against 4.5 ms): there int8-dynamic's encoder took 1.3 s instead of
    1.7, and against CTranslate2 int8 greedy went from 1.02x to 1.24x, beam 4 from 0.73x to 0.88x
    (benchmarks/README.md, "on AMD"). Without those instructions oneDNN converts bfloat16 to float32 on the fly,
    4x slower than float32 (measured with ONEDNN_MAX_CPU_ISA=AVX2), so `wo` stays float32 there. Quality, on
    benchmarks/quality.py's trained model (1,556 held-out documents): sequences identical to float32's 75.5 %
    greedy / 76.0 % beam 4 with `wo` in bfloat16, 75.8 % / 76.3 % with it in float32; ROUGE-L 44.8 / 46.0
    against 45.0 / 45.9 (results/quality-first-words-wo-bf16.json)."""
    return cpu_isa.onednn_bfloat16()


# int8-weight-only keeps `wo` as the other methods do, so that every method quantizes the same layers. Its own
# reason would be weaker: its scales are per output row of the weight and the activations are not quantized, so
# the outliers entering `wo` do not coarsen anything. Quantizing `wo` would save a quarter of the stacks' weight
# bytes; it waits for a measurement of agreement on a real checkpoint (benchmarks/quality.py).
WEIGHT_ONLY_KEEP_UNQUANTIZED = ("wo",)

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
            "pip install 'bitsandbytes>=0.46'"
        ) from err
    return bitsandbytes


def _matches(path: str, names: tuple[str, ...]) -> bool:
    """True if one of `names` is the module's path or a run of whole components of it ("wo", "decoder")."""
    dotted = f".{path}."
    return any(f".{name}." in dotted for name in names)


def _tied(model: nn.Module, layer: nn.Linear) -> bool:
    shared = getattr(model, "shared", None)
    return shared is not None and layer.weight is shared.weight


def _targets(model: nn.Module, skip: tuple[str, ...], keep: tuple[str, ...]) -> list[tuple[nn.Module, str, str, bool]]:
    """(parent module, attribute name, dotted path, whether it is the output head) of each nn.Linear to replace.

    The output head is `lm_head` itself, or the nn.Linear inside it when model/vocabulary.py has put a
    restricted head there; either way `skip=("lm_head",)` leaves it.
    """
    found = []
    for path, module in model.named_modules():
        in_stack = bool({"encoder", "decoder"} & set(path.split(".")))
        in_head = path.split(".")[0] == "lm_head"
        for attr, child in module.named_children():
            full = f"{path}.{attr}" if path else attr
            if type(child) is not nn.Linear or attr in keep or _matches(full, skip):
                continue
            head = attr == "lm_head" or in_head
            if (in_stack and attr in PROJECTIONS) or (head and not _tied(model, child)):
                found.append((module, attr, full, head))
    return found


def runs_over_sources(path: str) -> bool:
    """Whether the projection at `path` multiplies every source token of a batch at once (the encoder's, and the
    cross-attention's key/value projection, run once per source), rather than a decode step's few rows."""
    return "encoder" in path.split(".") or path.endswith("cross_attn.kv")  # "transformer.encoder..." in the heads


def _quantized_layer(bnb, layer: nn.Linear, method: str, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes layer holding `layer`'s weight, quantized on the weight's own device."""
    weight = layer.weight.detach()
    bias = layer.bias is not None
    if method == "int8":
        # Built on meta so that no throwaway float weight is allocated; the real one is assigned below.
        new = bnb.nn.Linear8bitLt(
            layer.in_features,
            layer.out_features,
            bias=bias,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
            device="meta",
        )
        # Row-wise absmax int8, what Int8Params does on .to(device). Called directly because Int8Params
        # quantizes only when it leaves the CPU, and a weight already on the GPU never does.
        codes, row_scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        new.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=row_scales)
    else:
        new = bnb.nn.Linear4bit(
            layer.in_features,
            layer.out_features,
            bias=bias,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type=method,
            device="meta",
        )
        # What Params4bit.to(device) does on its first move, done where the weight is.
        packed, state = bnb.functional.quantize_4bit(
            weight.contiguous(),
            blocksize=BLOCKSIZE_4BIT,
            compress_statistics=True,
            quant_type=method,
            quant_storage=torch.uint8,
        )
        new.weight = bnb.nn.Params4bit(
            packed,
            requires_grad=False,
            quant_state=state,
            blocksize=BLOCKSIZE_4BIT,
            compress_statistics=True,
            quant_type=method,
            quant_storage=torch.uint8,
            module=new,
            bnb_quantized=True,
        )
        new.quant_state = state
        # On CPUs with AVX-512 BF16, bitsandbytes (0.50) runs an eval-mode 4-bit layer through a kernel that
        # casts the activations and the block scales to bfloat16 whatever compute_dtype says, and that fails
        # for widths not in multiples of 64. Its generic path, which every other CPU takes, dequantizes to
        # compute_dtype and multiplies there: kept on every CPU, a 4-bit model computes in the dtype asked
        # for, and the same on every CPU kind (tests/model/test_quantize.py holds that).
        new.support_avx512bf16_for_cpu = False
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
            "its CUDA build must match torch's CUDA version."
        ) from err


# Rows of a weight that _dynamic_int8_weight quantizes at once: their float32 scaled copy (1 MB at mt5-small's width of
# 512) stays in the core's cache between its passes. mt5-small's head, one thread, AMD EPYC Zen 4: 0.30 s at 512 to
# 2,048 rows, 0.36-0.43 s at 128.
QUANTIZE_BLOCK_ROWS = 512


def _dynamic_int8_weight(layer: nn.Linear) -> torch.Tensor:
    """`layer`'s weight as int8 with one scale per output row, as DynamicLinear.from_float(layer) quantizes it under
    per_channel_dynamic_qconfig, bit for bit: that qconfig's observer gives the scales and zero points from each row's
    minimum and maximum, and each code is what torch's per-channel quantize computes (quantize_val: the value times
    the float32 inverse of its row's scale, rounded half to even, plus the zero point, clamped to int8).

    Computed here rather than by the observer's forward and torch.quantize_per_channel, which take 0.7 and 1.0 s on
    mt5-small's 250k-row head (one thread, AMD EPYC Zen 4): amin / amax and the codes in blocks of rows take
    0.3 s, and every replica's load pays it (tests/model/test_quantize.py compares the result with torch.ao's)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig

    weight = layer.weight.detach().float()
    with warnings.catch_warnings():
        # torch.ao.quantization warns on every quantized tensor it creates that it moves to torchao; the
        # layers it builds run the same kernels (fbgemm / oneDNN) in torch 2.13.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        observer = per_channel_dynamic_qconfig.weight()  # qint8 weights, symmetric per-channel scales
        observer.min_val, observer.max_val = weight.amin(1), weight.amax(1)  # what its forward finds, exactly
        scales, zero_points = observer.calculate_qparams()
        info = torch.iinfo(torch.int8)
        inverse = (1.0 / scales.float())[:, None]
        zeros = zero_points.float()[:, None]
        codes = torch.empty(weight.shape, dtype=torch.int8)
        scaled = weight.new_empty(min(QUANTIZE_BLOCK_ROWS, weight.shape[0]), weight.shape[1])
        for start in range(0, weight.shape[0], QUANTIZE_BLOCK_ROWS):
            end = min(start + QUANTIZE_BLOCK_ROWS, weight.shape[0])
            part = torch.mul(weight[start:end], inverse[start:end], out=scaled[: end - start])
            codes[start:end] = part.round_().add_(zeros[start:end]).clamp_(info.min, info.max)
        return torch._make_per_channel_quantized_tensor(codes, scales.double(), zero_points.long(), 0)


def _packed_dynamic_int8(weight: torch.Tensor, bias: torch.Tensor | None, engine: str | None) -> nn.Module:
    """torch's dynamically quantized Linear holding the qint8 `weight`, packed once for `engine`. It is built at 1 x 1
    and given its size after: from_float builds it at full size, which packs an all-zero weight of that size before
    the real one is packed again (for mT5's 250k-row head, seconds each)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        new = DynamicLinear(1, 1, bias_=False)
    new.out_features, new.in_features = weight.shape
    pack_dynamic_int8(new, weight, bias, engine)
    return new


def _dynamic_int8_layer(layer: nn.Linear, engine: str | None = None) -> nn.Module:
    """torch's dynamically quantized Linear holding `layer`'s weight as int8, one scale per output row, packed once,
    for the kernels of torch's quantized `engine` (by default the one set now). The module is the one
    DynamicLinear.from_float(layer) builds, bit for bit (tests/model/test_quantize.py compares a loaded model with
    what torch.ao.quantization.quantize_dynamic builds)."""
    new = _packed_dynamic_int8(_dynamic_int8_weight(layer), layer.bias, engine)
    new.train(layer.training)
    return new


# The int8-dynamic head's vocabulary blocks (Int8HeadBlocks): ids per block. At 128 rows (32 documents x 4 beams) a
# block's float32 output is 16 MiB, under glibc's largest mmap threshold (32 MiB).
HEAD_BLOCK_IDS = 32768

# Rows up to which an int8-dynamic head packed for oneDNN multiplies through the same codes packed for fbgemm
# (Int8HeadBlocks.few_rows). At a few rows the product is bound by the head's bytes, and fbgemm streams them faster
# than oneDNN's VNNI kernel; from some tens of rows on the products bound it, and oneDNN is the faster. fbgemm's time
# over oneDNN's on an AMD EPYC Zen 4 (AVX-512 VNNI), the whole head in its blocks: mt5-small, one thread, at 1 / 4 /
# 8 / 16 / 24 / 32 / 64 rows 0.47 / 0.51 / 0.57 / 0.83 / 0.97 / 1.00 / 1.09; two threads 0.57 / 0.44 / 0.55 /
# 0.60 / 0.88 / 0.93 / 1.10; mt5-base, one thread, 0.71 / 0.78 / 0.78 / 1.00 / 1.07 / 1.19 / 1.13
# (benchmarks/README.md, "The int8 head at a few rows").
FEW_ROWS = 16
FEW_ROWS_ENGINE = "fbgemm"


class Int8HeadBlocks(nn.Module):
    """An int8-dynamic output head as vocabulary blocks, each an int8-dynamic layer of its own, written into one
    output: the decode step's reused logits buffer where it passes one (MT5ForConditionalGeneration.lm_logits).

    Neither torch's dynamic linear nor oneDNN's takes `out=`. A fresh [rows, 250k] float32 output above glibc's mmap
    threshold (33 rows and more: beam 4 from 9 documents) is mapped from the OS at every step and faults in every
    4 KiB page as it is written. A block's output comes from memory freed by the block before, and the copy into
    `out` costs less than the faults did: on an AMD EPYC, one thread, oneDNN, 8 blocks against the whole head,
    16 rows 8.7 -> 8.5 ms, 48 rows 36.0 -> 19.3 ms, 128 rows 95.2 -> 42.6 ms (benchmarks/README.md, "on AMD").
    The logits are the whole layer's, bit for bit: a block holds its rows' int8 codes and per-channel scales, and
    every block quantizes the same input rows alike.

    Blocks packed for oneDNN come with a second set packed for fbgemm (`few_rows`), which multiplies batches of up to
    FEW_ROWS rows: there the weight's bytes bound the product, and fbgemm streams them faster (see FEW_ROWS). The
    second set holds the same codes and scales: it costs the head's int8 bytes once more, and takes no place in the
    state dict."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, engine: str | None, block_ids: int = HEAD_BLOCK_IDS
    ):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.starts = list(range(0, self.out_features, block_ids))
        codes, scales, zeros = weight.int_repr(), weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
        parts = []
        for start in self.starts:
            end = min(start + block_ids, self.out_features)
            part = torch._make_per_channel_quantized_tensor(
                codes[start:end].contiguous(), scales[start:end], zeros[start:end], 0
            )
            parts.append((part, None if bias is None else bias[start:end]))
        self.blocks = nn.ModuleList(_packed_dynamic_int8(part, part_bias, engine) for part, part_bias in parts)
        self.few_rows: tuple[nn.Module, ...] = ()  # a plain attribute, not submodules: out of the state dict
        if engine == "onednn" and FEW_ROWS_ENGINE in torch.backends.quantized.supported_engines:
            self.few_rows = tuple(_packed_dynamic_int8(part, part_bias, FEW_ROWS_ENGINE) for part, part_bias in parts)

    @classmethod
    def from_float(cls, layer: nn.Linear, engine: str | None, block_ids: int = HEAD_BLOCK_IDS) -> Int8HeadBlocks:
        return cls(_dynamic_int8_weight(layer), layer.bias, engine, block_ids).train(layer.training)

    def pack_few_rows(self, again: bool = False) -> None:
        """Pack the few-rows set for fbgemm from the blocks, in place, where torch has fbgemm: `again` (the blocks were
        packed anew, their weights maybe loaded from a state dict), or where the set is not packed for it (a copy)."""
        if FEW_ROWS_ENGINE not in torch.backends.quantized.supported_engines:
            return
        if again or not self.few_rows or any(dynamic_int8_engine(layer) != FEW_ROWS_ENGINE for layer in self.few_rows):
            self.few_rows = tuple(
                _packed_dynamic_int8(*block._packed_params._weight_bias(), FEW_ROWS_ENGINE) for block in self.blocks
            )

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The logits of `x` [..., in_features], written into `out` [rows, out_features] where given."""
        rows = x.reshape(-1, self.in_features)
        if out is None:
            out = rows.new_empty(rows.shape[0], self.out_features)
        blocks = self.few_rows if self.few_rows and rows.shape[0] <= FEW_ROWS else self.blocks
        for start, block in zip(self.starts, blocks):
            out[:, start : start + block.out_features] = block(rows)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        blocks = f"{len(self.blocks)} int8 blocks" + (f", fbgemm at up to {FEW_ROWS} rows" if self.few_rows else "")
        return f"in_features={self.in_features}, out_features={self.out_features}, {blocks}"


# The engine pack_dynamic_int8 packed each layer for, with the packed object it made, held weakly on both sides: a
# copy of the layer (deepcopy, pickle) is packed again for the engine set then, and load_state_dict packs a new object,
# so neither may inherit the note.
_PACKED_FOR: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def pack_dynamic_int8(linear, weight: torch.Tensor, bias: torch.Tensor | None, engine: str | None = None) -> None:
    """Pack a qint8 `weight` and a float `bias` into an int8-dynamic layer, in place, for the kernels of torch's
    quantized `engine` ("onednn", "fbgemm", "x86"; by default the one set now, and "x86" packs dynamic linears for
    fbgemm), and note which (dynamic_int8_engine): the packed object does not say."""
    current = torch.backends.quantized.engine
    engine = engine or current
    torch.backends.quantized.engine = engine  # quantized.linear_prepack packs for the engine set now
    try:
        linear._packed_params.set_weight_bias(weight, bias)
    finally:
        torch.backends.quantized.engine = current
    _PACKED_FOR[linear] = (engine, weakref.ref(linear._packed_params._packed_params))


def dynamic_int8_engine(linear) -> str | None:
    """The engine pack_dynamic_int8 packed this int8-dynamic layer for, or None if it did not, or if the layer's
    weight was packed again since by other means (load_state_dict, a copy: for the engine set then)."""
    engine, packed = _PACKED_FOR.get(linear, (None, lambda: None))
    return engine if packed() is linear._packed_params._packed_params else None


def _check_dynamic_int8(device: torch.device, dtype: torch.dtype) -> None:
    """int8-dynamic runs where torch's quantized CPU engine runs, on float32 inputs; say so before any layer changes."""
    if device.type != "cpu":
        raise ValueError(
            f"quantization 'int8-dynamic' runs on CPU only, and the model is on {device}: "
            "on GPUs use int8-weight-only, int8, nf4 or fp4 (bitsandbytes), or bfloat16 without quantization"
        )
    if dtype != torch.float32:
        raise ValueError(
            f"quantization 'int8-dynamic' computes in float32, and the model is in {dtype}: "
            "load it with dtype=float32 (--dtype float32, or auto on CPU)"
        )
    try:
        _dynamic_int8_layer(nn.Linear(64, 64, bias=False))(torch.ones(2, 64))
    except (RuntimeError, NotImplementedError) as err:
        raise RuntimeError(
            f"torch {torch.__version__} cannot run int8-dynamic with its quantized engine "
            f"{torch.backends.quantized.engine!r}: {err}"
        ) from err


# Rows up to which int8-weight-only multiplies through torch's fused CPU kernel (bfloat16 only). The kernel
# reads the int8 weight once per block of 4 rows, without making a bfloat16 copy; measured on mt5-small's
# projections and a 32k-row head, one thread, AVX-512: faster than the plain formula up to 12 rows and than
# bfloat16 F.linear up to 4-8, slower than both from 16 rows on, where oneDNN's GEMM takes over.
FUSED_CPU_MAX_ROWS = 12
# The fused CPU kernel's bfloat16 path loads 16 (AVX-512) or 8 (AVX2) values at a time with aligned loads: with
# a width not a multiple of 16 it returns garbage or crashes (torch 2.13), and with a misaligned input it faults.
FUSED_CPU_WIDTH_MULTIPLE = 16
FUSED_CPU_ALIGNMENT = 64


class Int8WeightOnlyLinear(nn.Module):
    """A bias-optional linear layer over int8 codes [out, in] with one scale per output row [out]:
    y = (x @ codes.T) * scales + bias, in x's dtype. The codes are symmetric (-127..127), the scales in the
    dtype the model computes in. For inference: the codes are buffers, and take no gradient."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("weight", codes)  # int8 [out, in]
        self.register_buffer("scales", scales)  # [out]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self._fused_cpu_kernel_applies(rows):
            out = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales).view(*x.shape[:-1], -1)
        else:  # gpt-fast's formula: compiled, inductor can fold the conversion into the matmul's reads
            out = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return out if self.bias is None else out + self.bias

    def _fused_cpu_kernel_applies(self, rows: torch.Tensor) -> bool:
        # Not while compiling: the compiled formula is the fused path there, and data_ptr() cannot be traced.
        return (
            not torch.compiler.is_compiling()
            and rows.device.type == "cpu"
            and rows.dtype == torch.bfloat16
            and self.scales.dtype == torch.bfloat16
            and rows.shape[0] <= FUSED_CPU_MAX_ROWS
            and self.in_features % FUSED_CPU_WIDTH_MULTIPLE == 0
            and rows.is_contiguous()
            and rows.data_ptr() % FUSED_CPU_ALIGNMENT == 0
        )

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, [out, in] in the scales' dtype: what a float model would hold
        to compute what this layer computes, up to rounding."""
        return self.weight.to(self.scales.dtype) * self.scales[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


# Rows quantized at a time: bounds the float32 temporaries to this many rows of the widest layer (mT5's head
# has 250,112 rows; in one piece, mt5-xxl's would take 4 GiB of float32 beside the model).
QUANTIZE_ROWS_AT_ONCE = 8192


def int8_weight_only(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [out, in], scales [out] in weight's dtype) with |weight - codes * scales| <= scales / 2, up to
    the float32 rounding of weight / scale (at most 127 * 2^-24 of a scale) where a weight lies half-way.

    The scale is rounded to the weight's dtype first and the codes are computed against that rounded scale, so
    the bound holds for the scale the layer multiplies by. Rounding it moves it by at most 2^-9 (bfloat16), so
    the row's largest weight maps to at most 127 * (1 + 2^-8) < 127.5 and the clamp to 127 costs nothing."""
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device)
    tiny = torch.finfo(weight.dtype).tiny  # an all-zero row gets codes 0 and a scale that divides safely
    for start in range(0, weight.shape[0], QUANTIZE_ROWS_AT_ONCE):
        rows = weight[start : start + QUANTIZE_ROWS_AT_ONCE].float()
        scale = (rows.abs().amax(dim=1) / 127).to(weight.dtype).clamp_min(tiny)
        codes[start : start + len(rows)] = (rows / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
        scales[start : start + len(rows)] = scale
    return codes, scales


def _int8_weight_only_layer(layer: nn.Linear) -> Int8WeightOnlyLinear:
    codes, scales = int8_weight_only(layer.weight.detach())
    bias = None if layer.bias is None else layer.bias.detach()
    return Int8WeightOnlyLinear(codes, scales, bias).train(layer.training)


def quantize(
    model: nn.Module,
    method: str,
    *,
    compute_dtype: torch.dtype | None = None,
    skip: tuple[str, ...] | None = None,
    device: str | torch.device | None = None,
    observe: Callable[[nn.Module], None] | None = None,
    head_engine: str | None = None,
    source_engine: str | None = None,
) -> nn.Module:
    """Replace the stacks' projections of `model` with quantized layers, in place; returns `model`.

    method: "none" (the model as it is), "int8" (LLM.int8: row-wise int8 weights; activation columns
        with an outlier above 6.0 are multiplied in float16, the rest in int8; the input is cast to
        float16 inside bitsandbytes whatever the model's dtype), "nf4" or "fp4" (4-bit in blocks of
        64 weights, double quantized, as QLoRA), "int8-dynamic" (torch's dynamic int8 on CPU: per-channel
        int8 weights, per-tensor int8 activations, float32 in and out), "int8-weight-only" (per-channel int8
        weights dequantized inside each matmul, activations in the model's dtype; CPU and GPU).
    compute_dtype: the dtype the 4-bit weights are dequantized to for their matmuls; by default the
        model's dtype. Used by nf4 and fp4 only.
    skip: names of modules, or dotted runs of names, to leave as they are: "lm_head", "decoder",
        "cross_attn", "encoder.blocks.0". By default ("lm_head",) for bitsandbytes and () for
        int8-dynamic and int8-weight-only. `wo` is always left (KEEP_UNQUANTIZED, DYNAMIC_KEEP_UNQUANTIZED,
        WEIGHT_ONLY_KEEP_UNQUANTIZED), and a tied lm_head too: it is the embedding.
    device: where the quantized model goes (by default, where it is). Each layer to quantize moves there alone, in
        full precision, is quantized there and replaces the original before the next one moves; the rest of the
        model (embedding, norms, position biases, `wo`, an unquantized head) moves last, in the dtype it has. So
        `device` never holds more than the quantized model plus one full-precision layer (and the quantizer's
        temporaries: for int8-weight-only, QUANTIZE_ROWS_AT_ONCE rows in float32): a model loaded in host memory
        reaches a GPU too small for it in full precision (model/inference.py).
    observe: called with `model` after each move, the full-precision layer in place before it is quantized: the
        points where `device` holds the most. For tests that count the bytes there (quantized_bytes(model, device)).
    head_engine: int8-dynamic only: where given, the output head becomes an Int8HeadBlocks whose blocks are packed for
        that quantized engine's kernels (by default the head is one layer packed for the engine set now, as the stacks'
        layers are). load_for_inference passes model.packed.int8_head_engine(model), or the engine set now, so that
        the head is packed once, in the layout it decodes with.
    source_engine: int8-dynamic only: where given, the engine the projections that run over source tokens
        (runs_over_sources: thousands of rows a call) are packed for; the decoder's per-step projections (tens of
        rows) stay on the engine set now. load_for_inference passes model.packed.int8_source_engine().
    """
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; use one of {', '.join(METHODS)}")
    if method == "none":
        return model if device is None else _move_keeping_ties(model, torch.device(device))
    dynamic, weight_only = method == "int8-dynamic", method == "int8-weight-only"
    if skip is None:
        skip = () if dynamic or weight_only else ("lm_head",)
    keep = {"int8-dynamic": DYNAMIC_KEEP_UNQUANTIZED, "int8-weight-only": WEIGHT_ONLY_KEEP_UNQUANTIZED}
    targets = _targets(model, tuple(skip), keep.get(method, KEEP_UNQUANTIZED))
    if not targets:
        return model if device is None else _move_keeping_ties(model, torch.device(device))
    parent, attr, _, _ = targets[0]
    source, dtype = getattr(parent, attr).weight.device, getattr(parent, attr).weight.dtype
    if source.type == "meta":
        raise ValueError("quantize() needs the weights: the model is on the meta device; load it first")
    device = source if device is None else torch.device(device)
    if dynamic:
        _check_dynamic_int8(device, dtype)

        def make_layer(layer: nn.Linear, path: str, head: bool) -> nn.Module:
            if head:
                return (
                    _dynamic_int8_layer(layer) if head_engine is None else Int8HeadBlocks.from_float(layer, head_engine)
                )
            return _dynamic_int8_layer(layer, source_engine if runs_over_sources(path) else None)

    elif weight_only:

        def make_layer(layer: nn.Linear, path: str, head: bool) -> nn.Module:
            return _int8_weight_only_layer(layer)

    else:
        bnb = _bitsandbytes()
        compute_dtype = compute_dtype or dtype
        if method == "int8":
            logging.getLogger("bitsandbytes.autograd._functions").addFilter(_CAST_NOTICE_FILTER)  # idempotent
        # Nothing runs on meta, where tests count the bytes a move would place: the probe runs where the weights
        # are, which also gives bitsandbytes' cached code book (made on first use, on that tensor's device) data.
        _check_runs(bnb, method, source if device.type == "meta" else device, compute_dtype)

        def make_layer(layer: nn.Linear, path: str, head: bool) -> nn.Module:
            return _quantized_layer(bnb, layer, method, compute_dtype)

    if dynamic:
        from .modules import FeedForward  # here: modules imports packed, which imports this module

        for module in model.modules():
            if isinstance(module, FeedForward):
                module.sigmoid_gelu = True  # see FeedForward: int8's rounding dwarfs its GELU's
    if dynamic and native_bfloat16():
        # `wo`, left unquantized, in bfloat16 (native_bfloat16); FeedForward casts its input to match.
        for name, layer in model.named_modules():
            if _matches(name, ("wo",)) and type(layer) is nn.Linear and not _matches(name, skip):
                layer.to(torch.bfloat16)
    for parent, attr, path, head in targets:
        # One layer at a time, on the device it will run on (bitsandbytes quantizes there on a weight's first
        # move too): its full-precision weight is released by the setattr below, before the next one moves, so
        # the peak there is the quantized model plus one full-precision layer.
        getattr(parent, attr).to(device)  # in place: no other reference to the full-precision weight is kept
        if observe is not None:
            observe(model)
        setattr(parent, attr, make_layer(getattr(parent, attr), path, head))
    if device != source:
        # The rest, in the dtype each part has (`wo` stays float32 in a float16 model). The quantized layers are
        # there already, and moving them again to their own device copies nothing.
        _move_keeping_ties(model, device)
    if observe is not None:
        observe(model)
    return model


def _move_keeping_ties(model: nn.Module, device: torch.device) -> nn.Module:
    """model.to(device), with each parameter shared by several modules (a tied head is the embedding) still one
    parameter afterwards: Module.to replaces a parameter by a new one per module where it cannot swap the data in
    place (to and from the meta device)."""
    first_owner: dict[int, tuple[nn.Module, str]] = {}
    shared = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in first_owner:
                shared.append((module, name, *first_owner[id(param)]))
            else:
                first_owner[id(param)] = (module, name)
    model.to(device)
    for module, name, owner, owner_name in shared:
        setattr(module, name, getattr(owner, owner_name))
    return model


def dequantize_weight_only(model: nn.Module) -> nn.Module:
    """Replace each int8 weight-only layer of `model` with an nn.Linear holding its dequantized weight, in place;
    returns `model`. The result is the float model that computes what the quantized one does, up to rounding:
    its reference in tests/model/test_weight_only.py and benchmarks/gpu_check.py."""
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, Int8WeightOnlyLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                linear.weight = nn.Parameter(child.dequantized(), requires_grad=False)
                if child.bias is not None:
                    linear.bias = child.bias
                setattr(parent, attr, linear.train(child.training))
    return model


def is_quantized(model: nn.Module) -> bool:
    """True if quantize() replaced any of `model`'s layers (bitsandbytes, int8-dynamic or int8-weight-only): such
    a model holds no full-precision copy of those weights and cannot be saved as a checkpoint."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return any(
        type(m).__module__.startswith("bitsandbytes") or isinstance(m, (DynamicLinear, Int8WeightOnlyLinear))
        for m in model.modules()
    )


def quantized_bytes(model: nn.Module, device: str | torch.device | None = None) -> int:
    """Bytes held by `model`'s parameters and buffers, with the quantization statistics that live
    outside them (absmax, nested absmax, offsets and code books of 4-bit layers; row scales of int8
    layers; int8-dynamic's packed int8 weights with their per-row scales and zero points; int8-weight-only's
    codes and scales are buffers). A tensor shared by several modules, such as a tied embedding, counts once.

    device: count only what lies there (the meta device included, whose tensors have sizes but no data); by
    default, everything but meta tensors."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    wanted = None if device is None else torch.device(device)

    def counted(where: torch.device) -> bool:
        if wanted is None:
            return where.type != "meta"
        return where.type == wanted.type and wanted.index in (None, where.index)

    seen: set = set()
    total = 0

    def add(tensor) -> None:
        nonlocal total
        if not isinstance(tensor, torch.Tensor) or not counted(tensor.device):
            return
        nbytes = tensor.numel() * tensor.element_size()
        key = id(tensor) if tensor.is_meta else (tensor.data_ptr(), nbytes)  # meta tensors all sit at address 0
        if key not in seen:
            seen.add(key)
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
        # int8-dynamic, on CPU only: packed for fbgemm or oneDNN, neither parameter nor buffer (an int8 head's set for
        # a few rows is not even a submodule)
        dynamic = [module] if isinstance(module, DynamicLinear) else list(getattr(module, "few_rows", ()))
        for layer in dynamic if counted(torch.device("cpu")) else []:
            weight = layer.weight()
            # int8 codes, a float64 scale and an int64 zero point per row
            total += weight.numel() + 8 * 2 * weight.q_per_channel_scales().numel()
    return total
