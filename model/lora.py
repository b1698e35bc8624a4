"""LoRA adapters on the stacks' projections, over full-precision or bitsandbytes (QLoRA) layers.

add_lora(model, LoraConfig()) wraps the attention and feed-forward projections of every encoder and
decoder block in a LoraLinear, freezes every other parameter and returns the adapters' parameters.
Targets are the Hugging Face projection names users know (q, k, v, o, wi_0, wi_1, wi, wo). Our fused
layers hold several of them (self-attention qkv: q|k|v; cross-attention kv: k|v; gated wi: wi_0|wi_1,
stacked on the output dim), and each one gets its own adapter, A [rank, in] and B [rows, rank], so the
adapters map 1:1 onto PEFT's per-projection ones and save in PEFT's layout (save_adapters). relu
checkpoints have one input projection, "wi": the default targets (gated wi_0, wi_1) leave it alone.

Quantize first, then add adapters (from_pretrained(..., quantization="nf4"), then add_lora): the base
stays frozen and quantized, the adapters run in their own dtype. merge_lora folds the adapters into
the base weights (a quantized base is dequantized first: the QLoRA recipe merges into full-precision
weights), so that save_pretrained writes a checkpoint transformers loads; it cannot save an unmerged
model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import weights
from .errors import ModelLoadError
from .modules import CrossAttention, FeedForward, SelfAttention

# The HF projection names a target may use; "wi" is the single input projection of relu checkpoints.
PROJECTION_NAMES = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")

# Our attributes that hold projections, by the module that owns them.
_OWNERS = ((SelfAttention, ("qkv", "o")), (CrossAttention, ("q", "kv", "o")), (FeedForward, ("wi", "wo")))

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q", "k", "v", "o", "wi_0", "wi_1", "wo")  # HF names, as users know them

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in PROJECTION_NAMES]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {list(self.targets)}: each must be one of {', '.join(PROJECTION_NAMES)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoraLinear(nn.Module):
    """A frozen projection (nn.Linear or a bitsandbytes layer) plus one low-rank adapter for each of the
    adapted parts stacked in its output: y = base(x) + scaling * B_part @ A_part @ dropout(x) per part.

    `parts` lists every part's (name, rows) in output order; `adapted` names the parts with adapters.
    One dropout mask is shared by the parts of a fused layer (PEFT draws one per projection: the same
    in distribution, not bit for bit during training; identical in eval).
    """

    def __init__(
        self, base: nn.Module, parts: list[tuple[str, int]], adapted: list[str], config: LoraConfig, dtype: torch.dtype
    ):
        super().__init__()
        self.base = base
        self.parts = parts
        self.adapted = adapted
        self.rank = config.rank
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        device = base.weight.device
        rows = dict(parts)
        # ParameterDict sorts the keys of a plain dict: the parts' order is self.adapted, never .values().
        self.lora_A = nn.ParameterDict(
            {
                name: nn.Parameter(torch.empty(config.rank, base.in_features, dtype=dtype, device=device))
                for name in adapted
            }
        )
        self.lora_B = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(rows[name], config.rank, dtype=dtype, device=device)) for name in adapted}
        )
        for a in self.lora_A.values():
            # PEFT's (and nn.Linear's) init; with B = 0 the model is unchanged until the first step.
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.train(base.training)

    # What code that reads a projection's attributes (FeedForward's wo dtype check, init_weights) expects.
    @property
    def weight(self):
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.lora_A.values())).dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a = torch.cat([self.lora_A[name] for name in self.adapted])  # [adapters * rank, in]
        # One matmul for all the parts' A's, then each part's B.
        h = (self.dropout(x.to(self.dtype)) @ a.T) * self.scaling  # [..., adapters * rank]
        deltas = {name: hp @ self.lora_B[name].T for name, hp in zip(self.adapted, h.split(self.rank, dim=-1))}
        if len(self.parts) == 1:
            return y + deltas[self.adapted[0]].to(y.dtype)
        if len(self.adapted) == len(self.parts):
            return y + torch.cat([deltas[name] for name, _ in self.parts], dim=-1).to(y.dtype)
        pieces = y.split([rows for _, rows in self.parts], dim=-1)
        return torch.cat(
            [
                piece + deltas[name].to(y.dtype) if name in deltas else piece
                for (name, _), piece in zip(self.parts, pieces)
            ],
            dim=-1,
        )

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base with the adapters folded in: the same nn.Linear updated in place, or for a
        bitsandbytes base a new nn.Linear holding its dequantized weight, in the adapters' dtype."""
        quantized = type(self.base) is not nn.Linear
        weight = _dequantized_weight(self.base) if quantized else self.base.weight
        total = weight.to(torch.float32, copy=True)  # the sum in float32, rounded once
        start = 0
        for name, rows in self.parts:
            if name in self.lora_A:
                total[start : start + rows] += self.scaling * (self.lora_B[name].float() @ self.lora_A[name].float())
            start += rows
        if not quantized:
            self.base.weight.copy_(total)
            return self.base
        layer = nn.Linear(
            self.in_features, self.out_features, bias=self.base.bias is not None, device=weight.device, dtype=self.dtype
        )
        layer.weight = nn.Parameter(total.to(self.dtype), requires_grad=False)
        if self.base.bias is not None:
            layer.bias = nn.Parameter(self.base.bias.detach().to(self.dtype), requires_grad=False)
        layer.train(self.training)
        return layer


def _dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The full-precision [out, in] weight of a bitsandbytes Linear4bit or Linear8bitLt."""
    import bitsandbytes.functional as bnbf

    weight = layer.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        # Never in bitsandbytes' AVX-512 BF16 repacked layout: quantize() keeps its layers off that path.
        return bnbf.dequantize_4bit(weight.data, weight.quant_state)
    if kind == "Int8Params":
        # The row scales sit on the weight until the first forward, then on the layer's state.
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
        return bnbf.int8_vectorwise_dequant(weight.data, scales)
    raise TypeError(f"cannot merge LoRA into a {type(layer).__name__}: expected nn.Linear, Linear4bit or Linear8bitLt")


def _projections(model: nn.Module):
    """(our module path, parent, attribute, layer) of every projection of the encoder and decoder blocks."""
    for path, module in model.named_modules():
        for owner, attrs in _OWNERS:
            if isinstance(module, owner):
                for attr in attrs:
                    yield f"{path}.{attr}", module, attr, getattr(module, attr)


def _wrappers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(path, layer) for path, _, _, layer in _projections(model) if isinstance(layer, LoraLinear)]


def _hf_modules(model: nn.Module, path: str, layer: nn.Module) -> list[tuple[str, int]]:
    """The HF module path and row count of each part stacked in one of our projections, in output order.
    weights.py owns the name mapping; it is asked with a meta tensor of the layer's shape."""
    meta = torch.empty(layer.out_features, layer.in_features, device="meta")
    return [
        (key.removesuffix(".weight"), part.shape[0])
        for key, part in weights.ours_to_hf(f"{path}.weight", meta, model.config.is_gated)
    ]


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The model's dtype: that of its first floating-point parameter (the embedding)."""
    return next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)


def add_lora(model: nn.Module, config: LoraConfig, *, dtype: torch.dtype | None = None) -> list[nn.Parameter]:
    """Wrap the target projections of the encoder and decoder blocks, freeze every other parameter and
    return the trainable adapter parameters (in a fixed order: the same on every DDP rank).

    dtype: the adapters' dtype. By default that of the base: its weight's for nn.Linear, its
    compute_dtype for a 4-bit layer (bf16 on GPU in the QLoRA recipe), the model's for an int8 layer.
    """
    if _wrappers(model):
        raise ValueError("the model already has LoRA adapters; merge_lora() it first, or load_adapters() into it")
    for path, parent, attr, layer in list(_projections(model)):
        parts = [(hf.rsplit(".", 1)[1], rows) for hf, rows in _hf_modules(model, path, layer)]
        adapted = [name for name, _ in parts if name in config.targets]
        if not adapted:
            continue
        if dtype is not None:
            adapter_dtype = dtype
        elif type(layer) is nn.Linear:
            adapter_dtype = layer.weight.dtype
        else:
            adapter_dtype = getattr(layer, "compute_dtype", None) or _float_dtype(model)
        setattr(parent, attr, LoraLinear(layer, parts, adapted, config, adapter_dtype))
    if not _wrappers(model):
        raise ValueError(f"no projection of this model matches the LoRA targets {list(config.targets)}")
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = lora_parameters(model)
    for p in adapters:
        p.requires_grad_(True)
    return adapters


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters, in add_lora's order (for an optimizer after load_adapters)."""
    return [
        p for _, layer in _wrappers(model) for name in layer.adapted for p in (layer.lora_A[name], layer.lora_B[name])
    ]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and remove the wrappers, in place; returns `model`.
    A quantized base becomes a plain nn.Linear in the adapters' dtype. Every parameter stays frozen."""
    for _, parent, attr, layer in list(_projections(model)):
        if isinstance(layer, LoraLinear):
            setattr(parent, attr, layer.merged())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's key names: base_model.model.<HF module>.lora_A.weight / lora_B.weight."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in _wrappers(model):
        for hf, _ in _hf_modules(model, path, layer.base):
            name = hf.rsplit(".", 1)[1]
            if name in layer.adapted:
                out[f"{_PEFT_PREFIX}{hf}.lora_A.weight"] = layer.lora_A[name].detach()
                out[f"{_PEFT_PREFIX}{hf}.lora_B.weight"] = layer.lora_B[name].detach()
    return out


def _check_matches(model: nn.Module, config: LoraConfig, where: str) -> None:
    for path, layer in _wrappers(model):
        if layer.rank != config.rank or not math.isclose(layer.scaling, config.scaling):
            raise ValueError(
                f"{where}: rank {config.rank} and alpha {config.alpha} do not match the model's adapters "
                f"(rank {layer.rank}, scaling {layer.scaling} at {path})"
            )


def save_adapters(model: nn.Module, out_dir: Path, config: LoraConfig) -> None:
    """Write adapter_model.safetensors and adapter_config.json in PEFT's layout, so that
    peft.PeftModel.from_pretrained(transformers_model, out_dir) loads them."""
    from safetensors.torch import save_file

    _check_matches(model, config, "save_adapters")
    tensors = {key: t.contiguous() for key, t in lora_state_dict(model).items()}
    if not tensors:
        raise ValueError("save_adapters: the model has no LoRA adapters")
    adapted = {name for _, layer in _wrappers(model) for name in layer.adapted}
    task = "SEQ_2_SEQ_LM" if type(model).__name__ == "MT5ForConditionalGeneration" else None
    peft_config = {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": [t for t in config.targets if t in adapted],
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")


def read_adapter_config(adapter_dir: Path) -> LoraConfig:
    """The LoraConfig of a PEFT adapter directory; PEFT options we do not implement are refused."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(
            f"{path} is missing: an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"
        ) from None
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path} is not valid JSON: {err}") from err
    unsupported = [
        key
        for key in (
            "use_dora",
            "use_rslora",
            "fan_in_fan_out",
            "modules_to_save",
            "rank_pattern",
            "alpha_pattern",
            "layers_to_transform",
        )
        if raw.get(key)
    ]
    if raw.get("bias", "none") != "none":
        unsupported.append("bias")
    if raw.get("peft_type") != "LORA" or not isinstance(raw.get("target_modules"), list) or unsupported:
        raise ModelLoadError(
            f"{path}: only plain LoRA with a list of target_modules is supported "
            f"(peft_type {raw.get('peft_type')!r}, unsupported options {unsupported})"
        )
    try:
        return LoraConfig(
            rank=raw["r"],
            alpha=float(raw["lora_alpha"]),
            dropout=float(raw.get("lora_dropout", 0.0)),
            targets=tuple(raw["target_modules"]),
        )
    except (KeyError, ValueError) as err:
        raise ModelLoadError(f"{path}: {err}") from err


def load_adapters(model: nn.Module, adapter_dir: Path) -> None:
    """Load adapters saved by save_adapters (or by PEFT) into `model`. A model without adapters gets
    them first (add_lora with the saved config); one with adapters must match it. Strict: the key sets
    and every shape must agree."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    if not _wrappers(model):
        add_lora(model, config)
    _check_matches(model, config, str(adapter_dir / ADAPTER_CONFIG))
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.exists():
        raise ModelLoadError(f"{path} is missing")
    stored = load_file(str(path))
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(
            f"{path} does not match the model's adapters: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    with torch.no_grad():
        for key, target in expected.items():
            if stored[key].shape != target.shape:
                raise ModelLoadError(
                    f"{path}: {key} has shape {list(stored[key].shape)}, the model's adapter {list(target.shape)}"
                )
            target.copy_(stored[key])
