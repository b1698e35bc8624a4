"""Continuous (in-flight) batching for greedy decoding and sampling: a finished row's slot takes the next document.

generate() decodes one fixed batch: as its shorter summaries finish, rows leave it and the weights are
read for fewer and fewer rows, and the next batch waits for the longest summary of this one. Here the
documents stream in instead. At every sync (SYNC_EVERY steps, when the loop looks at the host anyway)
the finished rows are handed back and their slots refilled from the stream: the new documents are
encoded together and start at position 0 while the other rows go on, each at its own position (the
decoder's per-row position bias and cache writes). Rows without a replacement leave the batch.

Each document gets the tokens generate() gives it: every row is decoded independently (its own cache,
cross-attention keys and values and logits processors), only the batch it shares a step with changes.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator

import torch

from .config import MT5Config
from .generate import SYNC_EVERY, GenerationConfig, LogitsProcessor
from .modules import KVCache


class Slots:
    """The rows decoding together: their sequences, caches and encoder side, each row at its own length."""

    def __init__(self, model, config: GenerationConfig):
        c: MT5Config = model.config
        self.model, self.config = model, config
        self.max_len = config.total_length()
        self.device = model.device
        self.keys: list[Hashable] = []
        self.source_lengths: list[int] = []
        self.sequences = torch.empty(0, self.max_len, dtype=torch.long, device=self.device)
        self.lengths = torch.empty(0, dtype=torch.long, device=self.device)  # decoder start included
        self.unfinished = torch.empty(0, dtype=torch.bool, device=self.device)
        dtype = model.shared.weight.dtype
        self.caches = [KVCache(0, c.num_heads, self.max_len, c.d_kv, dtype, self.device)
                       for _ in range(c.num_decoder_layers)]
        self.cross_kv = [(torch.empty(0, c.num_heads, 0, c.d_kv, dtype=dtype, device=self.device),) * 2
                         for _ in range(c.num_decoder_layers)]
        self.encoder_mask = torch.empty(0, 0, dtype=torch.long, device=self.device)

    def __len__(self) -> int:
        return len(self.keys)

    def step(self, process: LogitsProcessor, generator: torch.Generator | None) -> None:
        """One token for every row, each at its own position."""
        c = self.config
        positions = self.lengths - 1
        tokens = torch.gather(self.sequences, 1, positions[:, None])
        hidden = self.model.decoder(self.model.shared(tokens), self.cross_kv, self.encoder_mask,
                                    caches=self.caches, pos=positions)
        scores = process(self.sequences, self.model.lm_logits(hidden[:, -1]).float(), self.lengths)
        if c.do_sample:
            next_tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            next_tokens = scores.argmax(-1)
        # A finished row keeps its sequence: its slot is emptied or refilled at the next sync.
        at = self.lengths.clamp(max=self.max_len - 1)[:, None]
        current = torch.gather(self.sequences, 1, at).squeeze(1)
        self.sequences.scatter_(1, at, torch.where(self.unfinished, next_tokens, current)[:, None])
        self.lengths += self.unfinished.long()
        self.unfinished &= (next_tokens != c.eos_token_id) & (self.lengths < self.max_len)

    def take_finished(self) -> tuple[list[int], list[tuple[Hashable, list[int]]]]:
        """(the rows that finished, their (key, token ids)), the ids starting with decoder_start."""
        rows = (~self.unfinished).nonzero().squeeze(1).tolist()
        lengths = self.lengths.tolist()
        sequences = self.sequences[rows].tolist() if rows else []
        return rows, [(self.keys[r], seq[: lengths[r]]) for r, seq in zip(rows, sequences)]

    def refill(self, free: list[int], documents: list[tuple[Hashable, list[int]]]) -> None:
        """Put `documents` in the `free` rows (then in new rows), and drop the free rows left over."""
        c = self.config
        reused, added = free[: len(documents)], len(documents) - min(len(free), len(documents))
        if documents:
            k_v, mask = self._encode([ids for _, ids in documents])
            if added:
                self._append(added)
            rows = reused + list(range(len(self.keys) - added, len(self.keys)))
            self._widen_sources(mask.shape[1])
            index = torch.tensor(rows, device=self.device)
            width = mask.shape[1]
            for (k, v), (new_k, new_v) in zip(self.cross_kv, k_v):
                k[index, :, :width], v[index, :, :width] = new_k, new_v
            self.encoder_mask[index] = 0
            self.encoder_mask[index, :width] = mask
            self.sequences[index] = c.decoder_start_token_id
            self.lengths[index] = 1
            self.unfinished[index] = True
            for row, (key, ids) in zip(rows, documents):
                self.keys[row], self.source_lengths[row] = key, len(ids)
        leaving = free[len(documents):]
        if leaving:
            staying = sorted(set(range(len(self.keys))) - set(leaving))
            self._keep(staying)
        self._trim_sources()

    def _encode(self, rows: list[list[int]]):
        longest = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), longest), self.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for n, row in enumerate(rows):
            input_ids[n, : len(row)] = torch.tensor(row)
            mask[n, : len(row)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        encoded = self.model.encode(input_ids, mask)
        return self.model.decoder.project_cross_kv(encoded), mask

    def _append(self, rows: int) -> None:
        self.keys += [None] * rows
        self.source_lengths += [0] * rows
        self.sequences = torch.cat([self.sequences, self.sequences.new_zeros(rows, self.max_len)])
        self.lengths = torch.cat([self.lengths, self.lengths.new_ones(rows)])
        self.unfinished = torch.cat([self.unfinished, self.unfinished.new_zeros(rows)])
        for cache in self.caches:
            cache.append(rows)
        self.cross_kv = [(torch.cat([k, k.new_zeros(rows, *k.shape[1:])]), torch.cat([v, v.new_zeros(rows, *v.shape[1:])]))
                         for k, v in self.cross_kv]
        self.encoder_mask = torch.cat([self.encoder_mask, self.encoder_mask.new_zeros(rows, self.encoder_mask.shape[1])])

    def _widen_sources(self, width: int) -> None:
        """Room for a source of `width` tokens in the encoder side (padding: masked out)."""
        extra = width - self.encoder_mask.shape[1]
        if extra <= 0:
            return
        self.cross_kv = [(torch.cat([k, k.new_zeros(k.shape[0], k.shape[1], extra, k.shape[3])], 2),
                          torch.cat([v, v.new_zeros(v.shape[0], v.shape[1], extra, v.shape[3])], 2))
                         for k, v in self.cross_kv]
        self.encoder_mask = torch.cat([self.encoder_mask, self.encoder_mask.new_zeros(len(self), extra)], 1)

    def _trim_sources(self) -> None:
        """Cross-attention reads only as many source positions as the longest source still decoding."""
        width = max(self.source_lengths, default=0)
        if width < self.encoder_mask.shape[1]:
            self.cross_kv = [(k[:, :, :width], v[:, :, :width]) for k, v in self.cross_kv]
            self.encoder_mask = self.encoder_mask[:, :width]

    def _keep(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.keys = [self.keys[r] for r in rows]
        self.source_lengths = [self.source_lengths[r] for r in rows]
        self.sequences, self.lengths, self.unfinished = (t.index_select(0, index) for t in
                                                         (self.sequences, self.lengths, self.unfinished))
        for cache in self.caches:
            cache.keep(index)
        self.cross_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross_kv]
        self.encoder_mask = self.encoder_mask.index_select(0, index)


@torch.no_grad()
def generate_stream(model, documents: Iterable[tuple[Hashable, list[int]]], config: GenerationConfig, *,
                    max_rows: int, max_tokens: int | None = None) -> Iterator[tuple[Hashable, list[int]]]:
    """Greedy decoding or sampling of a stream of (key, input token ids), at most `max_rows` rows at once
    and, with `max_tokens`, at most that many rows x longest source; yields (key, output ids starting
    with decoder_start, EOS included when emitted) in the order they finish."""
    if config.num_beams != 1 or config.num_return_sequences != 1:
        raise ValueError("continuous batching decodes greedily or by sampling, one sequence per document: "
                         f"got num_beams={config.num_beams}, num_return_sequences={config.num_return_sequences}")
    generator = None
    if config.do_sample:
        generator = torch.Generator(device=model.device)
        generator.manual_seed(config.seed if config.seed is not None else torch.seed())
    pending = iter(documents)
    upcoming: list[tuple[Hashable, list[int]]] = []  # read from the stream but not yet admitted

    def admit(staying: list[int]) -> list[tuple[Hashable, list[int]]]:
        """The next documents to join the rows `staying`, within max_rows and max_tokens."""
        taken: list[tuple[Hashable, list[int]]] = []
        longest = max(staying, default=0)
        while len(staying) + len(taken) < max_rows:
            if not upcoming:
                document = next(pending, None)
                if document is None:
                    break
                upcoming.append(document)
            width = max(longest, len(upcoming[0][1]))
            rows = len(staying) + len(taken) + 1
            if max_tokens is not None and rows > 1 and rows * width > max_tokens:
                break
            longest = width
            taken.append(upcoming.pop(0))
        return taken

    slots = Slots(model, config)
    process = LogitsProcessor(config)
    slots.refill([], admit([]))
    step = 0
    while len(slots):
        slots.step(process, generator)
        step += 1
        if step % SYNC_EVERY:
            continue
        free, finished = slots.take_finished()
        yield from finished
        gone = set(free)
        slots.refill(free, admit([n for r, n in enumerate(slots.source_lengths) if r not in gone]))
