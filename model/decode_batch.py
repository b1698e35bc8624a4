"""The documents decoding together, and the rows, caches and encoder side they hold, as documents join and leave.

A document takes a slot: rows_per_document consecutive rows (num_beams for beam search, one per sample
when sampling several, else one), each with its sequence, length and self-attention caches, and one
encoder side (cross-attention keys and values, mask) shared by its rows. New documents are encoded
together, in groups of similar length, and start at position 0 while the others go on, each row at its
own length: the decoder's bias and cache writes are per row. Finished documents leave, or hand their
slots to the next ones, so that the steps compute only what is still decoding.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

import torch

from .modules import KVCache, grown

if TYPE_CHECKING:
    from .decode import Search
    from .generate import GenerationConfig

Document = tuple[Hashable, list[int]]  # (key, input token ids)

# A group encoded together pads each source to at most this much more than its own length.
ENCODE_PADDING = 1.1

# On CPU a group encoded together holds at most this many tokens, padding included. Each of the encoder's steps
# streams its input and output through memory, and a smaller group's intermediates stay nearer the core between them
# (mt5-small's gated wi writes 8 KB a token: 16 MB here, 64 MB at 16 sources of 512) and reuse freed memory rather
# than fault in fresh pages (glibc maps allocations over 32 MB anew each time). 16 sources of 512 tokens, int8-dynamic,
# one thread, AMD EPYC Zen 4: mt5-small 3.16 s in one group, 2.61 s capped; mt5-base 12.11 against 9.41 s. Of the
# caps measured (512 to 4,096), 2,048 was the best or within noise of it on varied and shorter sources too
# (benchmarks/encode_groups.py, benchmarks/README.md "cache-sized groups"). A GPU wants the biggest batch it is
# given, so no cap there.
ENCODE_TOKENS_CPU = 2048


def length_groups(lengths: list[int], max_tokens: int | None = None) -> list[list[int]]:
    """Indices of `lengths` in groups to encode together, longest first: a source joins the current group
    while the group's longest is within ENCODE_PADDING of it, so padding stays under ~10%, and, with
    `max_tokens`, while the group padded to its longest stays within that many tokens (a longer source is a
    group of its own)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and lengths[groups[-1][0]] <= ENCODE_PADDING * lengths[i]:
            if max_tokens is None or (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


class StepBuffers:
    """Vocabulary-sized tensors of a decode step, in memory reused from step to step. A fresh [rows, 250k]
    tensor per step costs more in page faults than in arithmetic: glibc serves allocations that big with
    new pages from the OS and returns them when freed, and each first touch faults (measured on CPU: a
    fresh 16 MiB copy 9.6 ms, into reused memory 1.7 ms; a [16, 512] x [512, 250k] matmul is ~110 ms)."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, like: torch.Tensor, vocab: int) -> torch.Tensor:
        """A [rows, vocab] tensor of `like`'s dtype and device (contents undefined)."""
        held = self.tensors.get(name)
        if held is None or held.shape[0] < rows or held.dtype != like.dtype or held.device != like.device:
            held = self.tensors[name] = torch.empty(
                max(rows, held.shape[0] if held is not None else 0), vocab, dtype=like.dtype, device=like.device
            )
        return held[:rows]

    def logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """model.lm_logits(hidden) [rows, vocab] as float32, written into the reused buffer."""
        rows = hidden.shape[0]
        return model.lm_logits(hidden, out=self.get("logits", rows, hidden, model.config.vocab_size)).float()


class DecodeBatch:
    """Per document (slot): its key, source length and encoder side. Per row: sequence [max_len] (past its
    length, decoder_start, which the logits processors rely on), length (decoder start included), whether
    it is still decoding, and the caches. The search (model/decode.py) keeps its own per-document state and
    is resized with the slots."""

    def __init__(self, model, config: GenerationConfig, search: Search):
        c = model.config
        self.model, self.config, self.search = model, config, search
        self.group = search.rows_per_document
        self.max_len = config.total_length()
        self.vocab_size = c.vocab_size
        self.device = model.device
        dtype = model.shared.weight.dtype
        self.keys: list[Hashable] = []
        self.source_lengths: list[int] = []
        self.sequences = torch.empty(0, self.max_len, dtype=torch.long, device=self.device)
        self.lengths = torch.empty(0, dtype=torch.long, device=self.device)
        self.decoding = torch.empty(0, dtype=torch.bool, device=self.device)
        self.caches = [
            KVCache(0, c.num_heads, self.max_len, c.d_kv, dtype, self.device) for _ in range(c.num_decoder_layers)
        ]
        self.spare: tuple[torch.Tensor, torch.Tensor] | None = None  # cache storage that reorders pass on
        # Per slot, the steps taken before its document joined: a row's length is at most 1 + the steps since,
        # so the oldest document bounds the cache positions a step reads, with no host sync.
        self.steps = 0
        self.joined: list[int] = []
        # On CPU the cross-attention values are held transposed, [slots, heads, d_kv, width] in memory (cross_kv holds
        # them as transposed views, the shape every reader expects): attend_decode_step's product then streams them
        # in long contiguous rows. On a GPU, SDPA wants them as they are.
        self.values_transposed = self.device.type == "cpu"
        empty = torch.empty(0, c.num_heads, 0, c.d_kv, dtype=dtype, device=self.device)
        empty_values = self._stored(empty.transpose(-1, -2).contiguous()) if self.values_transposed else empty
        self.cross_kv = [(empty, empty_values) for _ in range(c.num_decoder_layers)]
        self.encoder_mask = torch.empty(0, 0, dtype=torch.long, device=self.device)  # per slot
        self.buffers = StepBuffers()

    def __len__(self) -> int:
        return len(self.keys)

    def logits(self) -> torch.Tensor:
        """Logits [rows, vocab] (float32) for the next token of every row."""
        visible = min(1 + self.steps - min(self.joined, default=self.steps), self.max_len)
        for cache in self.caches:
            cache.visible = visible
        self.steps += 1
        positions = (self.lengths - 1)[:, None]
        tokens = torch.gather(self.sequences, 1, positions)
        hidden = self.model.decoder(
            self.model.shared(tokens), self.cross_kv, self.encoder_mask, caches=self.caches, positions=positions
        )
        return self.buffers.logits(self.model, hidden[:, -1])

    def reorder_rows(self, index: torch.Tensor) -> None:
        """Row i's caches continue from row index[i]'s (beam search)."""
        for cache in self.caches:
            self.spare = cache.select(index, self.spare)

    def finished(self) -> list[int]:
        """The slots none of whose rows is still decoding (a host sync)."""
        return (~self.decoding.view(-1, self.group).any(1)).nonzero().squeeze(1).tolist()

    # --- documents in and out -------------------------------------------------------------------------

    def refill(self, free: list[int], documents: list[Document]) -> None:
        """Put `documents` in the `free` slots (then in new ones), and drop the free slots left over."""
        reused, added = free[: len(documents)], len(documents) - min(len(free), len(documents))
        if documents:
            sources = [ids for _, ids in documents]
            if added:
                self._append(added)
            slots = reused + list(range(len(self) - added, len(self)))
            self._widen_sources(max(map(len, sources)))
            index = torch.tensor(slots, device=self.device)
            self._encode(sources, index)
            rows = self._rows(index)
            self.sequences[rows] = self.config.decoder_start_token_id
            self.lengths[rows] = 1
            self.decoding[rows] = True
            self.search.start(index)
            for slot, (key, ids) in zip(slots, documents):
                self.keys[slot], self.source_lengths[slot], self.joined[slot] = key, len(ids), self.steps
        leaving = set(free[len(documents) :])
        if leaving:
            self._select([s for s in range(len(self)) if s not in leaving])
        self._trim_sources()

    def _rows(self, slots: torch.Tensor) -> torch.Tensor:
        return (slots[:, None] * self.group + torch.arange(self.group, device=self.device)).view(-1)

    def _encode(self, sources: list[list[int]], slots: torch.Tensor) -> None:
        """Encode `sources` into the encoder side of `slots` (one each, wide enough: _widen_sources): each decoder
        layer's cross-attention keys and values at a source's positions, and its mask. A slot's positions past its
        source keep what they held (zeros, or a document before's finite values), which the mask hides. Encoded in
        groups of similar length (length_groups), since the encoder is compute-bound and every padded position
        costs it as much as a real one, and on CPU of at most ENCODE_TOKENS_CPU tokens; each group's keys and
        values are written straight into place, with no batch-wide copy of them in between (at 16 sources of 448
        tokens, 176 MB a copy for mt5-small)."""
        lengths = [len(source) for source in sources]
        mask = torch.zeros((len(sources), max(lengths)), dtype=torch.long)
        for n, length in enumerate(lengths):
            mask[n, :length] = 1
        mask = mask.to(self.device)
        self.encoder_mask[slots] = 0
        self.encoder_mask[slots, : mask.shape[1]] = mask
        for group in length_groups(lengths, ENCODE_TOKENS_CPU if self.device.type == "cpu" else None):
            width = lengths[group[0]]
            input_ids = torch.full((len(group), width), self.config.pad_token_id, dtype=torch.long)
            for n, i in enumerate(group):
                input_ids[n, : lengths[i]] = torch.tensor(sources[i])
            group = torch.tensor(group, device=self.device)
            encoded = self.model.encode(input_ids.to(self.device), mask[group, :width])
            index = slots[group]
            for (k, v), (new_k, new_v) in zip(self.cross_kv, self.model.decoder.project_cross_kv(encoded)):
                k[index, :, :width], v[index, :, :width] = new_k, new_v

    def _append(self, slots: int) -> None:
        """Room for `slots` more documents, at the end."""
        self.keys += [None] * slots
        self.source_lengths += [0] * slots
        self.joined += [self.steps] * slots
        rows = slots * self.group
        self.sequences = torch.cat([self.sequences, self.sequences.new_zeros(rows, self.max_len)])
        self.lengths = torch.cat([self.lengths, self.lengths.new_ones(rows)])
        self.decoding = torch.cat([self.decoding, self.decoding.new_zeros(rows)])
        self.search.grow(slots)
        self._append_storage(slots)

    def _stored(self, values: torch.Tensor) -> torch.Tensor:
        """Cross-attention values as held in memory (transposed where values_transposed), or back: its own inverse."""
        return values.transpose(-1, -2) if self.values_transposed else values

    def _append_storage(self, slots: int) -> None:
        """The encoder side and caches of `slots` more documents."""
        self.encoder_mask = grown(self.encoder_mask, 0, slots)
        self.cross_kv = [(grown(k, 0, slots), self._stored(grown(self._stored(v), 0, slots))) for k, v in self.cross_kv]
        for cache in self.caches:
            cache.append(slots * self.group)

    def _select(self, slots: list[int]) -> None:
        """Only these documents go on: the others' rows, caches and encoder side are dropped."""
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        rows = self._rows(index)
        self.keys = [self.keys[s] for s in slots]
        self.source_lengths = [self.source_lengths[s] for s in slots]
        self.joined = [self.joined[s] for s in slots]
        self._select_sources(index)
        self.sequences = self.sequences.index_select(0, rows)
        self.lengths = self.lengths.index_select(0, rows)
        self.decoding = self.decoding.index_select(0, rows)
        self.reorder_rows(rows)
        self.search.select(index)

    def _select_sources(self, index: torch.Tensor) -> None:
        """Only the encoder sides of these slots go on, in this order."""
        self.encoder_mask = self.encoder_mask.index_select(0, index)
        self.cross_kv = [
            (k.index_select(0, index), self._stored(self._stored(v).index_select(0, index))) for k, v in self.cross_kv
        ]

    def _widen_sources(self, width: int) -> None:
        """Room for a source of `width` tokens on the encoder side (padding: masked out)."""
        extra = width - self.encoder_mask.shape[1]
        if extra <= 0:
            return
        positions = -1 if self.values_transposed else 2  # the source positions' dimension of the values as held
        self.cross_kv = [
            (grown(k, 2, extra), self._stored(grown(self._stored(v), positions, extra))) for k, v in self.cross_kv
        ]
        self.encoder_mask = grown(self.encoder_mask, 1, extra)

    def _first_positions(self, values: torch.Tensor, width: int) -> torch.Tensor:
        """values[:, :, :width]: a view, or a compact copy where they are held transposed (see _trim_sources)."""
        if not self.values_transposed:
            return values[:, :, :width]
        return self._stored(self._stored(values)[..., :width].contiguous())

    def _trim_sources(self) -> None:
        """Cross-attention reads only as many source positions as the longest source still decoding. Keys keep their
        storage (each head's positions stay one contiguous block); transposed values are copied narrower, since a view
        would leave each row of d_kv values a short run of positions far apart, which reads slower than before (at
        149 of 448 positions, 2x the time of the values untransposed)."""
        width = max(self.source_lengths, default=0)
        if width < self.encoder_mask.shape[1]:
            self.cross_kv = [(k[:, :, :width], self._first_positions(v, width)) for k, v in self.cross_kv]
            self.encoder_mask = self.encoder_mask[:, :width]
