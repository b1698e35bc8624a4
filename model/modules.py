"""The building blocks of mT5: norm, attention with relative position bias, feed-forward, blocks, stacks.

Parameter names here are ours (fused q/k/v, fused wi_0/wi_1); model/weights.py maps them to and from
the Hugging Face layout, so nothing here knows the file format.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import MT5Config
from .packed import PackedLinear


class Embedding(nn.Embedding):
    """nn.Embedding that leaves a meta tensor unfilled. Models are built on the meta device before their weights
    are loaded, and torch's normal_ has no meta kernel: its Python fallback imports for seconds (6 s on a
    busy 2-core machine), at every job start and every replica load."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean, no bias; the variance is always accumulated in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    # Written out rather than F.gelu(approximate="tanh"): that kernel is not bit-identical to the
    # reference's formula, and greedy parity on near-ties depends on the last bits.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gated_gelu(gate: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
    """gelu_new(gate) * linear. Without autograd, the same operations in the same order run in place in
    one new tensor: the same bits, and 2x faster on CPU, where each of the formula's eight temporaries
    is a pass over memory (an encoder's [tokens, d_ff] is tens of MB). Halving last instead of first is
    exact: scaling by a power of two commutes with rounding."""
    if torch.is_grad_enabled() and (gate.requires_grad or linear.requires_grad):
        return gelu_new(gate) * linear  # tanh's backward needs its output, which the in-place chain overwrites
    out = torch.pow(gate, 3.0)
    out.mul_(0.044715).add_(gate).mul_(math.sqrt(2.0 / math.pi)).tanh_().add_(1.0)
    return out.mul_(gate).mul_(0.5).mul_(linear)


# sigmoid(2 u) for the u = sqrt(2 / pi) (x + 0.044715 x^3) of gelu_new.
SIGMOID_SCALE = 2.0 * math.sqrt(2.0 / math.pi)


def gated_gelu_by_sigmoid(gate: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
    """gelu_new(gate) * linear through 0.5 (1 + tanh u) = sigmoid(2 u), in place in one new tensor (no autograd).
    Not the formula's bits, and closer to the exact value than the formula itself (whose 1 + tanh u cancels
    where u < 0): a few float32 ulps. On CPU it is also the fast one: torch's `tanh`, and its fused tanh GELU,
    take 2.5 and 1.7 ns a value on AMD (MKL's generic path), `sigmoid` 0.4; on a group of [1,212, 1,024] gates
    split from the fused wi, 2.4 against the fused GELU's 5.7 ms (AMD EPYC Zen 4, one thread)."""
    out = torch.mul(gate, gate)
    out.mul_(0.044715 * SIGMOID_SCALE).add_(SIGMOID_SCALE).mul_(gate).sigmoid_()
    return out.mul_(gate).mul_(linear)


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """Mesh TensorFlow's bucketing: exact buckets for small distances, log-spaced ones up to max_distance."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).to(torch.long) * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_bucket = max_exact + (
        torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    log_bucket = torch.clamp(log_bucket, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """One per stack: computed once per forward and shared by every block (T5 stores it in block 0)."""

    def __init__(self, config: MT5Config, bidirectional: bool):
        super().__init__()
        self.embedding = Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance

    def forward(self, positions: torch.Tensor, key_length: int) -> torch.Tensor:
        """The bias of queries at `positions` [rows, q_len] (rows may be 1, shared by the batch) over keys at
        0..key_length-1: [rows, heads, q_len, k_len]."""
        memory = torch.arange(key_length, device=positions.device)
        relative = memory[None, None, :] - positions[:, :, None]  # [rows, q_len, k_len]
        buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        # Contiguous, so that the biases built from it are too: SDPA's CPU kernel copies a strided (permuted) mask
        # contiguous at every call, in every layer (50 of 546 ms of an encode at [16, 200] tokens).
        return self.embedding(buckets).permute(0, 3, 1, 2).contiguous()


def mask_to_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 0/1 key mask [batch, k_len] -> an additive bias [batch, 1, 1, k_len] (0 keep, dtype-min drop)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, dropout: float, decode_step: bool = False
) -> torch.Tensor:
    """Attention of q over k, v with an additive bias. `decode_step`: each row has one position and nothing trains,
    so on CPU attend_decode_step computes it."""
    if decode_step and q.device.type == "cpu":
        return attend_decode_step(q, k, v, bias)
    # T5 does not scale scores by 1/sqrt(d_kv): that scale is folded into the initialisation.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout, scale=1.0)


def attend_decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """attend() without dropout for a decode step's few queries per (batch, head) on CPU: one per row in
    self-attention and in greedy cross-attention, a document's beams folded in beam search's cross-attention.
    Keys @ queries, then weights @ values, each a matrix product that streams the keys or values once, with the
    scores made contiguous for the softmax. SDPA's CPU kernel spends more setting up each (batch, head) than reading
    them takes (AMD EPYC, one thread, mt5-small beam 4 in place: cross-attention 0.35 -> 0.28 s, self-attention
    0.16 -> 0.14 s over the same steps; mt5-base greedy's cross-attention at [16, 12, 448, 64] 2.7 -> 2.0 ms a
    call). The softmax is in float32, as in the reference."""
    scores = torch.matmul(k, q.contiguous().transpose(-1, -2)).transpose(-1, -2)  # [batch, heads, queries, key_len]
    scores = scores.to(torch.float32, memory_format=torch.contiguous_format).add_(bias)
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    if v.stride(-1) != 1:
        # Values held transposed, [.., d_kv, key_len] in memory (DecodeBatch's cross-attention on CPU): values @ weights
        # makes each output one long dot product over contiguous memory, where weights @ values would stream the same
        # bytes in short rows (mt5-small's 8 layers at 16 rows of 448 positions: 4 against 6-7 ms, AMD EPYC one thread).
        return torch.matmul(v.transpose(-1, -2), weights.transpose(-1, -2)).transpose(-1, -2)
    return torch.matmul(weights, v)


def grown(tensor: torch.Tensor, dim: int, extra: int) -> torch.Tensor:
    """`tensor` with `extra` zeros more along `dim`, in one new tensor: torch.cat with a tensor of zeros would
    write those zeros twice (in the zeros, then in the copy), and a batch's cross-attention keys and values are
    tens of MB."""
    shape = list(tensor.shape)
    shape[dim] += extra
    out = tensor.new_zeros(shape)
    out.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return out


class KVCache(nn.Module):
    """A preallocated self-attention cache, written in place one step at a time.

    Attention reads only the first `visible` positions, and a reorder copies only those: the caller keeps every
    row's length within them (DecodeBatch: the oldest document's length), so a step early in a document's
    decode reads and copies a short cache rather than all max_len positions. What lies past a row's length, in
    the visible part or not, is stale but finite (zeros at first, then other rows' keys and values): the
    attention bias masks it, and a NaN there would not stay masked."""

    def __init__(self, batch: int, heads: int, max_len: int, d_kv: int, dtype: torch.dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, heads, max_len, d_kv, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(batch, heads, max_len, d_kv, dtype=dtype, device=device))
        self.visible = max_len

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [rows, heads, len, d_kv] at `positions` [rows, len] (each row at its own) and return
        the cache of those rows, its visible positions: the attention bias masks what lies past a row's
        positions. The cache may hold more rows than are written (the compiled step's preallocated storage)."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[rows, :, positions] = k.transpose(1, 2)  # indexed: [rows, len, heads, d_kv]
        self.v[rows, :, positions] = v.transpose(1, 2)
        return self.k[: k.shape[0], :, : self.visible], self.v[: k.shape[0], :, : self.visible]

    def select(self, index: torch.Tensor, spare: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Row i continues from row index[i] (beam search); rows left out are dropped (finished work), so
        later steps skip them. One pass over the visible positions, into `spare` (k, v storage of another
        cache of this shape, with at least len(index) rows: it holds finite values throughout) or else new
        zeroed storage; returns the storage this cache held, to be the next cache's spare. Beam search
        reorders every step: passing the storage on, a decode copies no position it has not written and
        allocates nothing."""
        rows, heads, max_len, d_kv = len(index), *self.k.shape[1:]
        if spare is None or spare[0].shape[0] < rows or spare[0].shape[1:] != self.k.shape[1:]:
            spare = tuple(self.k.new_zeros(rows, heads, max_len, d_kv) for _ in range(2))
        held = self.k, self.v
        k, v = spare[0][:rows], spare[1][:rows]
        torch.index_select(self.k[:, :, : self.visible], 0, index, out=k[:, :, : self.visible])
        torch.index_select(self.v[:, :, : self.visible], 0, index, out=v[:, :, : self.visible])
        self.k, self.v = k, v
        return held

    def append(self, rows: int) -> None:
        """Room for `rows` more rows (continuous batching: new documents join the batch)."""
        self.k, self.v = grown(self.k, 0, rows), grown(self.v, 0, rows)


class SelfAttention(nn.Module):
    def __init__(self, config: MT5Config):
        super().__init__()
        self.heads, self.d_kv, self.inner = config.num_heads, config.d_kv, config.inner_dim
        self.qkv = nn.Linear(config.d_model, 3 * self.inner, bias=False)
        self.o = nn.Linear(self.inner, config.d_model, bias=False)
        self.dropout = config.dropout_rate

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor, cache: KVCache | None = None, positions: torch.Tensor | None = None
    ):
        batch, length, _ = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, self.d_kv).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [batch, heads, length, d_kv]
        if cache is not None:
            k, v = cache.update(positions, k, v)
        dropout = self.dropout if self.training else 0.0
        out = attend(q, k, v, bias, dropout, decode_step=length == 1 and not self.training)
        return self.o(out.transpose(1, 2).reshape(batch, length, self.inner))


class CrossAttention(nn.Module):
    """Decoder-to-encoder attention. Keys and values are projected once per sequence (project_kv) and
    shared by all of that sequence's beams: the beams are folded into the query axis, not copied."""

    def __init__(self, config: MT5Config):
        super().__init__()
        self.heads, self.d_kv, self.inner = config.num_heads, config.d_kv, config.inner_dim
        self.q = nn.Linear(config.d_model, self.inner, bias=False)
        self.kv = nn.Linear(config.d_model, 2 * self.inner, bias=False)
        self.o = nn.Linear(self.inner, config.d_model, bias=False)
        self.dropout = config.dropout_rate

    def project_kv(self, encoder_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, _ = encoder_states.shape
        kv = self.kv(encoder_states).view(batch, length, 2, self.heads, self.d_kv).permute(2, 0, 3, 1, 4)
        return kv[0], kv[1]  # each [batch, heads, src_len, d_kv]

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        rows, length, _ = x.shape
        batch = k.shape[0]
        group = rows // batch  # beams per source sequence
        q = self.q(x).view(batch, group * length, self.heads, self.d_kv).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        # [batch, heads, group*len, d_kv]
        out = attend(q, k, v, bias, dropout, decode_step=length == 1 and not self.training)
        return self.o(out.transpose(1, 2).reshape(rows, length, self.inner))


class FeedForward(nn.Module):
    """`sigmoid_gelu`: the gate's GELU through gated_gelu_by_sigmoid rather than the reference's formula (gated_gelu).
    Within a few float32 ulps of the exact value, not the formula's bits, and 2.4x faster on CPU. int8-dynamic sets it
    (model/quantize.py): its int8 products are off by far more than that, and it owes no bit-parity with
    transformers; float models keep the formula, whose last bits greedy parity needs."""

    sigmoid_gelu = False

    def __init__(self, config: MT5Config):
        super().__init__()
        self.gated = config.is_gated
        self.d_ff = config.d_ff
        # Gated: wi_0 (activation branch) and wi_1 (linear branch) fused into one matmul.
        self.wi = nn.Linear(config.d_model, (2 if self.gated else 1) * config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.wi(x)
        if self.gated:
            gate, linear = h.split(self.d_ff, dim=-1)
            h = gated_gelu_by_sigmoid(gate, linear) if self.sigmoid_gelu else gated_gelu(gate, linear)
        else:
            h = F.relu(h)
        h = self.dropout(h)
        # wo may be kept in float32 while the rest is float16 (see keep_wo_in_float32). A packed wo is float32 in a
        # float32 model, and its weight would be unpacked (a copy) to be asked.
        wo = None if isinstance(self.wo, PackedLinear) else self.wo.weight
        if isinstance(wo, torch.Tensor) and wo.dtype != h.dtype and wo.dtype.is_floating_point:
            h = h.to(wo.dtype)
        return self.wo(h)


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    # mT5's activations overflow float16; the reference clamps after every sub-layer, so do we.
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return torch.clamp(x, min=-limit, max=limit)


class EncoderBlock(nn.Module):
    def __init__(self, config: MT5Config):
        super().__init__()
        self.self_attn_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.self_attn = SelfAttention(config)
        self.ff_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.ff = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = clamp_fp16(x + self.dropout(self.self_attn(self.self_attn_norm(x), bias)))
        return clamp_fp16(x + self.dropout(self.ff(self.ff_norm(x))))


class DecoderBlock(nn.Module):
    def __init__(self, config: MT5Config):
        super().__init__()
        self.self_attn_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.self_attn = SelfAttention(config)
        self.cross_attn_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.cross_attn = CrossAttention(config)
        self.ff_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.ff = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(
        self,
        x,
        self_bias,
        cross_k,
        cross_v,
        cross_bias,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
    ):
        x = clamp_fp16(x + self.dropout(self.self_attn(self.self_attn_norm(x), self_bias, cache, positions)))
        x = clamp_fp16(x + self.dropout(self.cross_attn(self.cross_attn_norm(x), cross_k, cross_v, cross_bias)))
        return clamp_fp16(x + self.dropout(self.ff(self.ff_norm(x))))


class Encoder(nn.Module):
    """The encoder stack. It takes embeddings: the embedding table is the model's, shared with the decoder."""

    def __init__(self, config: MT5Config):
        super().__init__()
        self.relative_bias = RelativePositionBias(config, bidirectional=True)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.gradient_checkpointing = False

    def forward(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.dropout(embeds)
        length = embeds.shape[1]
        bias = self.relative_bias(torch.arange(length, device=x.device)[None, :], length)  # [1, heads, len, len]
        if attention_mask is not None:
            bias = bias + mask_to_bias(attention_mask, bias.dtype)  # [batch, heads, len, len]
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, bias, use_reentrant=False)
            else:
                x = block(x, bias)
        return self.dropout(self.final_norm(x))


class Decoder(nn.Module):
    """The decoder stack; like the encoder, it takes embeddings."""

    def __init__(self, config: MT5Config):
        super().__init__()
        self.relative_bias = RelativePositionBias(config, bidirectional=False)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.num_decoder_layers))
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.gradient_checkpointing = False

    def project_cross_kv(self, encoder_states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's cross-attention keys and values: computed once per source, reused every step."""
        return [block.cross_attn.project_kv(encoder_states) for block in self.blocks]

    def forward(
        self,
        embeds: torch.Tensor,
        cross_kv: list[tuple[torch.Tensor, torch.Tensor]],
        encoder_mask: torch.Tensor | None,
        decoder_mask: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run `embeds` [rows, len, d_model] at `positions` [rows, len], each row at its own (by default the
        whole sequence, 0..len-1). With caches, the keys and values of earlier positions come from them, and
        these are written in. encoder_mask is [sources, src_len]; rows may be a multiple of sources (beams)."""
        x = self.dropout(embeds)
        length = embeds.shape[1]
        if positions is None:
            positions = torch.arange(length, device=x.device)[None, :]
        key_length = caches[0].visible if caches is not None else length
        self_bias = self.relative_bias(positions, key_length)  # [rows or 1, heads, len, key_len]
        # A query sees the keys at its position and before: causal, and blind to a cache's stale entries.
        future = torch.arange(key_length, device=x.device)[None, None, :] > positions[:, :, None]
        self_bias = self_bias.masked_fill(future[:, None], torch.finfo(self_bias.dtype).min)
        if decoder_mask is not None:
            self_bias = self_bias + mask_to_bias(decoder_mask[:, :key_length], self_bias.dtype)
        dtype = cross_kv[0][0].dtype if cross_kv else x.dtype
        if encoder_mask is not None:
            cross_bias = mask_to_bias(encoder_mask, dtype)  # [sources, 1, 1, src_len]
        else:
            cross_bias = torch.zeros(1, 1, 1, 1, dtype=dtype, device=x.device)
        for i, block in enumerate(self.blocks):
            cache = caches[i] if caches is not None else None
            k, v = cross_kv[i]
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, self_bias, k, v, cross_bias, use_reentrant=False)
            else:
                x = block(x, self_bias, k, v, cross_bias, cache, positions)
        return self.dropout(self.final_norm(x))
