"""The Hugging Face state-dict layout <-> our modules: key names, fused projections, a strict loader.

This is the only module that knows HF key names. Fused tensors (q|k|v, cross k|v, wi_0|wi_1) are
concatenated along the output dimension on load and split again on save.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .errors import ModelLoadError

_STACK = r"(?P<pre>(?:transformer\.)?)(?P<stack>encoder|decoder)\.block\.(?P<i>\d+)\.layer"
_DECODER = r"(?P<pre>(?:transformer\.)?)(?P<stack>decoder)\.block\.(?P<i>\d+)\.layer"

# (HF key pattern, our key template, part index in the fused tensor, number of parts)
_RULES: list[tuple[re.Pattern, str, int, int]] = [
    (
        re.compile(
            r"(?P<pre>(?:transformer\.)?)(?P<stack>encoder|decoder)\.block\.0\.layer\.0\.SelfAttention"
            r"\.relative_attention_bias\.weight"
        ),
        "{pre}{stack}.relative_bias.embedding.weight",
        0,
        1,
    ),
    *[
        (re.compile(_STACK + rf"\.0\.SelfAttention\.{p}\.weight"), "{pre}{stack}.blocks.{i}.self_attn.qkv.weight", n, 3)
        for n, p in enumerate("qkv")
    ],
    (re.compile(_STACK + r"\.0\.SelfAttention\.o\.weight"), "{pre}{stack}.blocks.{i}.self_attn.o.weight", 0, 1),
    (re.compile(_STACK + r"\.0\.layer_norm\.weight"), "{pre}{stack}.blocks.{i}.self_attn_norm.weight", 0, 1),
    (re.compile(_DECODER + r"\.1\.EncDecAttention\.q\.weight"), "{pre}{stack}.blocks.{i}.cross_attn.q.weight", 0, 1),
    *[
        (
            re.compile(_DECODER + rf"\.1\.EncDecAttention\.{p}\.weight"),
            "{pre}{stack}.blocks.{i}.cross_attn.kv.weight",
            n,
            2,
        )
        for n, p in enumerate("kv")
    ],
    (re.compile(_DECODER + r"\.1\.EncDecAttention\.o\.weight"), "{pre}{stack}.blocks.{i}.cross_attn.o.weight", 0, 1),
    (re.compile(_DECODER + r"\.1\.layer_norm\.weight"), "{pre}{stack}.blocks.{i}.cross_attn_norm.weight", 0, 1),
]
# The feed-forward is sub-layer 1 in the encoder and 2 in the decoder (after cross-attention).
for _stack, _ff in (("encoder", 1), ("decoder", 2)):
    _FF = rf"(?P<pre>(?:transformer\.)?)(?P<stack>{_stack})\.block\.(?P<i>\d+)\.layer\.{_ff}"
    _RULES += [
        *[
            (re.compile(_FF + rf"\.DenseReluDense\.wi_{n}\.weight"), "{pre}{stack}.blocks.{i}.ff.wi.weight", n, 2)
            for n in range(2)
        ],
        (re.compile(_FF + r"\.DenseReluDense\.wi\.weight"), "{pre}{stack}.blocks.{i}.ff.wi.weight", 0, 1),
        (re.compile(_FF + r"\.DenseReluDense\.wo\.weight"), "{pre}{stack}.blocks.{i}.ff.wo.weight", 0, 1),
        (re.compile(_FF + r"\.layer_norm\.weight"), "{pre}{stack}.blocks.{i}.ff_norm.weight", 0, 1),
    ]
_RULES += [
    (
        re.compile(r"(?P<pre>(?:transformer\.)?)(?P<stack>encoder|decoder)\.final_layer_norm\.weight"),
        "{pre}{stack}.final_norm.weight",
        0,
        1,
    ),
]

# Keys transformers writes or tolerates that carry nothing we need.
_IGNORED = re.compile(
    r"(?:transformer\.)?decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"
)
# The stacks' embed_tokens alias shared.weight (older checkpoints store all three).
_EMBED_ALIAS = re.compile(r"(?P<pre>(?:transformer\.)?)(?:encoder|decoder)\.embed_tokens\.weight")


def hf_to_ours(name: str) -> tuple[str, int, int]:
    """Our key, the part index and the part count for an HF key (aliases and ignored keys excluded)."""
    for pattern, template, part, parts in _RULES:
        m = pattern.fullmatch(name)
        if m:
            return template.format(**m.groupdict()), part, parts
    return name, 0, 1  # shared.weight, lm_head.weight and the heads keep their names


def ours_to_hf(name: str, tensor: torch.Tensor, gated: bool) -> list[tuple[str, torch.Tensor]]:
    """Split one of our tensors back into HF keys and tensors."""
    m = re.fullmatch(r"(?P<pre>(?:transformer\.)?)(?P<stack>encoder|decoder)\.(?P<rest>.+)", name)
    if not m:
        return [(name, tensor)]
    pre, stack, rest = m["pre"], m["stack"], m["rest"]
    ff = "1" if stack == "encoder" else "2"
    if rest == "relative_bias.embedding.weight":
        return [(f"{pre}{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", tensor)]
    if rest == "final_norm.weight":
        return [(f"{pre}{stack}.final_layer_norm.weight", tensor)]
    b = re.fullmatch(r"blocks\.(\d+)\.(.+)", rest)
    if not b:
        raise KeyError(name)
    base = f"{pre}{stack}.block.{b[1]}.layer"
    sub = b[2]
    if sub == "self_attn.qkv.weight":
        return [(f"{base}.0.SelfAttention.{p}.weight", t) for p, t in zip("qkv", tensor.chunk(3, dim=0))]
    if sub == "cross_attn.kv.weight":
        return [(f"{base}.1.EncDecAttention.{p}.weight", t) for p, t in zip("kv", tensor.chunk(2, dim=0))]
    if sub == "ff.wi.weight":
        if gated:
            return [(f"{base}.{ff}.DenseReluDense.wi_{n}.weight", t) for n, t in enumerate(tensor.chunk(2, dim=0))]
        return [(f"{base}.{ff}.DenseReluDense.wi.weight", tensor)]
    simple = {
        "self_attn.o.weight": "0.SelfAttention.o.weight",
        "self_attn_norm.weight": "0.layer_norm.weight",
        "cross_attn.q.weight": "1.EncDecAttention.q.weight",
        "cross_attn.o.weight": "1.EncDecAttention.o.weight",
        "cross_attn_norm.weight": "1.layer_norm.weight",
        "ff.wo.weight": f"{ff}.DenseReluDense.wo.weight",
        "ff_norm.weight": f"{ff}.layer_norm.weight",
    }
    return [(f"{base}.{simple[sub]}", tensor)]


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our parameters under HF names. A tied lm_head is left out, as transformers does."""
    gated = model.config.is_gated
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        for hf_name, part in ours_to_hf(name, tensor.detach(), gated):
            out[hf_name] = part.contiguous()
    return out


def _target_dtype(our_name: str, dtype: torch.dtype) -> torch.dtype:
    # keep wo in float32 under float16: mT5's feed-forward outputs overflow float16 (transformers does too).
    if dtype == torch.float16 and our_name.endswith("ff.wo.weight"):
        return torch.float32
    return dtype


def check(model: nn.Module, checkpoint_dir: Path) -> dict[str, str]:
    """Compare the checkpoint's key set and every shape with the model's (built on the meta device),
    from the safetensors headers alone. Returns, for each HF key the model needs, the key in the file.
    A config that does not match the weights fails here, naming the file and the tensors.
    """
    tied = model.config.tie_word_embeddings and hasattr(model, "lm_head")
    expected = {name: tuple(t.shape) for name, t in to_hf_state_dict(model).items()}  # meta tensors: no data
    header = checkpoint.tensor_shapes(checkpoint_dir)  # file key -> (shape, dtype)
    where = f"{checkpoint_dir} ({', '.join(p.name for p in checkpoint.weight_files(checkpoint_dir))})"

    source: dict[str, str] = {}  # expected HF key -> key in the file
    unexpected = []
    for name in header:
        alias = _EMBED_ALIAS.fullmatch(name)
        if _IGNORED.fullmatch(name) or (tied and name == "lm_head.weight"):
            continue  # transformers ignores these too
        if alias:
            source.setdefault(f"{alias['pre']}shared.weight", name)
        elif name in expected:
            source[name] = name
        else:
            unexpected.append(name)
    for name in header:  # a real shared.weight wins over an alias
        if name in expected:
            source[name] = name
    missing = sorted(set(expected) - set(source))
    if missing or unexpected:
        details = []
        if missing:
            hint = " (an untied lm_head is never filled from the embedding)" if "lm_head.weight" in missing else ""
            details.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}{hint}")
        if unexpected:
            details.append(f"unexpected {sorted(unexpected)[:8]}")
        raise ModelLoadError(f"{where} does not match config.json for {type(model).__name__}: " + "; ".join(details))
    for name, stored in source.items():
        if tuple(header[stored][0]) != expected[name]:
            raise ModelLoadError(
                f"{where}: {stored} has shape {list(header[stored][0])}, but config.json implies "
                f"{list(expected[name])}; the config does not match the weights"
            )

    return source


def load_into(model: nn.Module, checkpoint_dir: Path, *, dtype: torch.dtype, device: torch.device | str) -> None:
    """Fill a model built on the meta device from the checkpoint's safetensors, after `check`."""
    tied = model.config.tie_word_embeddings and hasattr(model, "lm_head")
    source = check(model, checkpoint_dir)
    wanted = {stored: name for name, stored in source.items()}
    pending: dict[str, dict[int, torch.Tensor]] = {}
    state: dict[str, torch.Tensor] = {}
    for stored, tensor in checkpoint.load_tensors(
        checkpoint_dir,
        device=device,
        dtype_for=lambda stored, _: _target_dtype(hf_to_ours(wanted.get(stored, stored))[0], dtype),
    ):
        if stored not in wanted:
            continue  # ignored keys, or a duplicate embedding alias
        ours, part, parts = hf_to_ours(wanted[stored])
        if parts == 1:
            state[ours] = tensor
            continue
        pending.setdefault(ours, {})[part] = tensor
        if len(pending[ours]) == parts:
            state[ours] = torch.cat([pending[ours][i] for i in range(parts)], dim=0)
            del pending[ours]
    if tied:
        state["lm_head.weight"] = state["shared.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.shared.weight
