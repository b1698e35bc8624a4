"""Continuous (in-flight) batching: a finished document's slot takes the next document of a stream.

generate() decodes one fixed batch: as its shorter summaries finish, they leave the batch and the
weights are read for fewer and fewer rows, and the next batch waits for the longest summary of this
one. Here documents stream in instead. At every sync (generate.sync_every: when the loop looks at the
host anyway) the finished documents are handed back and their slots refilled from the stream: the new
documents are encoded together, in groups of similar length, and start at position 0 while the others go on, each at its own length
(the decoder's per-row position bias and cache writes). Slots without a replacement leave the batch.

A slot holds one document: one row for greedy decoding and sampling, num_beams rows for beam search,
whose bookkeeping is generate()'s, kept per slot. Each document gets the tokens generate() gives it
alone: its rows are decoded independently of the others (their own caches, cross-attention keys and
values, logits processors and beam scores); only the batch they share a step with changes.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator

import torch

from .config import MT5Config
from .generate import GenerationConfig, LogitsProcessor, StepBuffers, beam_candidates, sync_every
from .modules import KVCache

Document = tuple[Hashable, list[int]]  # (key, input token ids)


def penalty(lengths: torch.Tensor, length_penalty: float) -> torch.Tensor:
    """lengths ** length_penalty as generate() computes it (in double, from Python ints), in float32."""
    return (lengths.double() ** length_penalty).float()


# A group encoded together pads each source to at most this much more than its own length.
ENCODE_PADDING = 1.1


def length_groups(lengths: list[int]) -> list[list[int]]:
    """Indices of `lengths` in groups to encode together, longest first: a source joins the current group
    while the group's longest is within ENCODE_PADDING of it, so padding stays under ~10%."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups and lengths[groups[-1][0]] <= ENCODE_PADDING * lengths[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class Slots:
    """The documents decoding together. Per slot: its key, length and search state; per row (a slot's
    num_beams rows, consecutive): the sequence and the self-attention caches."""

    def __init__(self, model, config: GenerationConfig):
        c: MT5Config = model.config
        self.model, self.config = model, config
        self.beams = config.num_beams
        self.max_len = config.total_length()
        self.device = model.device
        dtype = model.shared.weight.dtype
        self.keys: list[Hashable] = []
        self.source_lengths: list[int] = []
        self.lengths = torch.empty(0, dtype=torch.long, device=self.device)  # decoder start included
        self.searching = torch.empty(0, dtype=torch.bool, device=self.device)
        self.sequences = torch.empty(0, self.max_len, dtype=torch.long, device=self.device)  # per row
        self.caches = [KVCache(0, c.num_heads, self.max_len, c.d_kv, dtype, self.device)
                       for _ in range(c.num_decoder_layers)]
        empty = torch.empty(0, c.num_heads, 0, c.d_kv, dtype=dtype, device=self.device)
        self.cross_kv = [(empty, empty) for _ in range(c.num_decoder_layers)]  # per slot
        self.encoder_mask = torch.empty(0, 0, dtype=torch.long, device=self.device)
        self.buffers = StepBuffers()
        if self.beams > 1:  # generate.beam_search's state, per slot
            b = self.beams
            self.running_scores = torch.empty(0, b, device=self.device)
            self.finished = torch.empty(0, b, self.max_len, dtype=torch.long, device=self.device)
            self.finished_scores = torch.empty(0, b, device=self.device)
            self.finished_flags = torch.empty(0, b, dtype=torch.bool, device=self.device)
            self.finished_lengths = torch.empty(0, b, dtype=torch.long, device=self.device)
            self.improvable = torch.empty(0, dtype=torch.bool, device=self.device)
            self.top_beams = torch.arange(2 * b, device=self.device) < b

    def __len__(self) -> int:
        return len(self.keys)

    # --- decoding -------------------------------------------------------------------------------------

    def _logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [rows, vocab] float32, each row's length [rows]) for the next token of every row."""
        row_lengths = self.lengths.repeat_interleave(self.beams)
        positions = row_lengths - 1
        tokens = torch.gather(self.sequences, 1, positions[:, None])
        hidden = self.model.decoder(self.model.shared(tokens), self.cross_kv, self.encoder_mask,
                                    caches=self.caches, pos=positions)
        return self.buffers.logits(self.model, hidden[:, -1]), row_lengths

    def step(self, process: LogitsProcessor, generator: torch.Generator | None) -> None:
        if self.beams > 1:
            self._beam_step(process, generator)
            return
        c = self.config
        logits, lengths = self._logits()
        scores = process(self.sequences, logits, lengths)
        if c.do_sample:
            next_tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            next_tokens = scores.argmax(-1)
        # A finished row keeps its sequence: its slot is emptied or refilled at the next sync.
        at = self.lengths.clamp(max=self.max_len - 1)[:, None]
        current = torch.gather(self.sequences, 1, at).squeeze(1)
        self.sequences.scatter_(1, at, torch.where(self.searching, next_tokens, current)[:, None])
        self.lengths += self.searching.long()
        self.searching &= (next_tokens != c.eos_token_id) & (self.lengths < self.max_len)

    def _beam_step(self, process: LogitsProcessor, generator: torch.Generator | None) -> None:
        """generate.beam_search's step, with each slot at its own length (`cur` [slots])."""
        c = self.config
        slots, beams, vocab = len(self), self.beams, self.model.config.vocab_size
        keep = 2 * beams
        logits, lengths = self._logits()
        candidate_scores, candidates = beam_candidates(logits, self.sequences, self.running_scores, process, keep,
                                                       generator, self.buffers, lengths)
        cur = self.lengths.clamp(max=self.max_len - 1)
        parent = candidates // vocab  # [slots, keep]
        running = self.sequences.view(slots, beams, self.max_len)
        candidate_seqs = torch.take_along_dim(running, parent[:, :, None], dim=1)
        new_tokens = candidates % vocab
        candidate_seqs.scatter_(2, cur[:, None, None].expand(slots, keep, 1), new_tokens[:, :, None])
        ends = (new_tokens == c.eos_token_id) | (self.lengths + 1 >= self.max_len)[:, None]

        alive_scores = candidate_scores + ends.float() * -1e9
        best = torch.topk(alive_scores, beams)[1]
        self.sequences = torch.take_along_dim(candidate_seqs, best[:, :, None], dim=1).view(slots * beams, -1)
        self.running_scores = torch.take_along_dim(alive_scores, best, dim=1)
        offsets = torch.arange(slots, device=self.device)[:, None] * beams
        for cache in self.caches:
            cache.select((torch.take_along_dim(parent, best, dim=1) + offsets).view(-1))

        settled = ~self.searching[:, None]
        just_ended = ends & self.top_beams[None, :]
        scored = candidate_scores / penalty(self.lengths[:, None], c.length_penalty)
        full = self.finished_flags.all(-1, keepdim=True) & (c.early_stopping is True)
        blocked = full | ~just_ended | settled  # a slot no longer improvable is settled
        merged_scores = torch.cat([self.finished_scores, scored + blocked.float() * -1e9], dim=1)
        chosen = torch.topk(merged_scores, beams)[1]
        self.finished = torch.take_along_dim(torch.cat([self.finished, candidate_seqs], 1), chosen[:, :, None], dim=1)
        self.finished_scores = torch.take_along_dim(merged_scores, chosen, dim=1)
        self.finished_flags = torch.take_along_dim(torch.cat([self.finished_flags, just_ended & ~settled], 1),
                                                   chosen, dim=1)
        new_lengths = self.lengths[:, None].expand(slots, keep)
        self.finished_lengths = torch.take_along_dim(torch.cat([self.finished_lengths, new_lengths], 1), chosen, dim=1)
        self.lengths = (self.lengths + 1).clamp(max=self.max_len)

        if c.early_stopping == "never" and c.length_penalty > 0.0:
            best_length = torch.full_like(self.lengths, self.max_len - 1)
        else:
            best_length = self.lengths - 1
        best_running = self.running_scores[:, :1] / penalty(best_length[:, None], c.length_penalty)
        worst_finished = torch.where(self.finished_flags, self.finished_scores.amin(1, keepdim=True), -1.0e9)
        self.improvable &= (best_running > worst_finished).any(-1)
        if c.early_stopping is True:
            self.improvable &= ~self.finished_flags.all(-1)
        self.searching &= self.improvable & ~ends.all(-1)

    def take_finished(self) -> tuple[list[int], list[tuple[Hashable, list[int]]]]:
        """(the slots whose document is done, their (key, output ids starting with decoder_start))."""
        slots = (~self.searching).nonzero().squeeze(1).tolist()
        if not slots:
            return [], []
        if self.beams > 1:  # the best finished hypothesis, as generate() returns with num_return_sequences=1
            lengths = (self.finished_lengths[slots, 0] + 1).tolist()
            sequences = self.finished[slots, 0].tolist()
        else:
            lengths = self.lengths[slots].tolist()
            sequences = self.sequences[slots].tolist()
        return slots, [(self.keys[s], seq[:n]) for s, seq, n in zip(slots, sequences, lengths)]

    # --- slots ----------------------------------------------------------------------------------------

    def refill(self, free: list[int], documents: list[Document]) -> None:
        """Put `documents` in the `free` slots (then in new ones), and drop the free slots left over."""
        c = self.config
        reused, added = free[: len(documents)], len(documents) - min(len(free), len(documents))
        if documents:
            k_v, mask = self._encode([ids for _, ids in documents])
            if added:
                self._append(added)
            slots = reused + list(range(len(self) - added, len(self)))
            self._widen_sources(mask.shape[1])
            index = torch.tensor(slots, device=self.device)
            rows = (index[:, None] * self.beams + torch.arange(self.beams, device=self.device)).view(-1)
            width = mask.shape[1]
            for (k, v), (new_k, new_v) in zip(self.cross_kv, k_v):
                k[index, :, :width], v[index, :, :width] = new_k, new_v
            self.encoder_mask[index] = 0
            self.encoder_mask[index, :width] = mask
            # Past its length a row holds decoder_start, which the logits processors rely on.
            self.sequences[rows] = c.decoder_start_token_id
            self.lengths[index] = 1
            self.searching[index] = True
            if self.beams > 1:
                self.running_scores[index] = 0.0
                self.running_scores[index, 1:] = -1e9  # all beams start identical: expand only the first
                self.finished[index] = c.decoder_start_token_id
                self.finished_scores[index] = -1e9
                self.finished_flags[index] = False
                self.finished_lengths[index] = 0
                self.improvable[index] = True
            for slot, (key, ids) in zip(slots, documents):
                self.keys[slot], self.source_lengths[slot] = key, len(ids)
        leaving = set(free[len(documents):])
        if leaving:
            self._keep([s for s in range(len(self)) if s not in leaving])
        self._trim_sources()

    def _encode(self, rows: list[list[int]]):
        """Each decoder layer's cross-attention (keys, values) [docs, heads, longest, d_kv] for these sources,
        and their mask [docs, longest]. Encoded in groups of similar length (length_groups), since
        the encoder is compute-bound and every padded position costs it as much as a real one."""
        c = self.model.config
        longest = max(len(r) for r in rows)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for n, row in enumerate(rows):
            mask[n, : len(row)] = 1
        mask = mask.to(self.device)
        dtype = self.model.shared.weight.dtype
        k_v = [(torch.zeros(len(rows), c.num_heads, longest, c.d_kv, dtype=dtype, device=self.device),
                torch.zeros(len(rows), c.num_heads, longest, c.d_kv, dtype=dtype, device=self.device))
               for _ in range(c.num_decoder_layers)]
        for group in length_groups([len(r) for r in rows]):
            width = len(rows[group[0]])
            input_ids = torch.full((len(group), width), self.config.pad_token_id, dtype=torch.long)
            for n, i in enumerate(group):
                input_ids[n, : len(rows[i])] = torch.tensor(rows[i])
            input_ids, index = input_ids.to(self.device), torch.tensor(group, device=self.device)
            encoded = self.model.encode(input_ids, mask[index, :width])
            for (k, v), (new_k, new_v) in zip(k_v, self.model.decoder.project_cross_kv(encoded)):
                k[index, :, :width], v[index, :, :width] = new_k, new_v
        return k_v, mask

    def _per_slot(self) -> list[str]:
        names = ["lengths", "searching", "encoder_mask"]
        if self.beams > 1:
            names += ["running_scores", "finished", "finished_scores", "finished_flags", "finished_lengths",
                      "improvable"]
        return names

    def _append(self, slots: int) -> None:
        self.keys += [None] * slots
        self.source_lengths += [0] * slots
        for name in self._per_slot():
            t = getattr(self, name)
            setattr(self, name, torch.cat([t, t.new_zeros(slots, *t.shape[1:])]))
        self.sequences = torch.cat([self.sequences, self.sequences.new_zeros(slots * self.beams, self.max_len)])
        for cache in self.caches:
            cache.append(slots * self.beams)
        self.cross_kv = [(torch.cat([k, k.new_zeros(slots, *k.shape[1:])]), torch.cat([v, v.new_zeros(slots, *v.shape[1:])]))
                         for k, v in self.cross_kv]

    def _keep(self, slots: list[int]) -> None:
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        rows = (index[:, None] * self.beams + torch.arange(self.beams, device=self.device)).view(-1)
        self.keys = [self.keys[s] for s in slots]
        self.source_lengths = [self.source_lengths[s] for s in slots]
        for name in self._per_slot():
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.sequences = self.sequences.index_select(0, rows)
        for cache in self.caches:
            cache.select(rows)
        self.cross_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross_kv]

    def _widen_sources(self, width: int) -> None:
        """Room for a source of `width` tokens on the encoder side (padding: masked out)."""
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


@torch.no_grad()
def generate_stream(model, documents: Iterable[Document], config: GenerationConfig, *, max_rows: int,
                    max_tokens: int | None = None) -> Iterator[tuple[Hashable, list[int]]]:
    """Decode a stream of (key, input token ids) with at most `max_rows` rows at once (num_beams rows a
    document) and, with `max_tokens`, at most that many rows x longest source; yields (key, output ids
    starting with decoder_start, EOS included when emitted) in the order the documents finish."""
    if config.num_return_sequences != 1:
        raise ValueError("continuous batching returns one sequence per document: "
                         f"got num_return_sequences={config.num_return_sequences}")
    generator = None
    if config.do_sample:
        generator = torch.Generator(device=model.device)
        generator.manual_seed(config.seed if config.seed is not None else torch.seed())
    pending = iter(documents)
    upcoming: list[Document] = []  # read from the stream, not admitted yet
    beams = config.num_beams

    def admit(staying: list[int]) -> list[Document]:
        """The next documents to join the slots whose sources have lengths `staying`."""
        taken: list[Document] = []
        longest = max(staying, default=0)
        while (len(staying) + len(taken) + 1) * beams <= max(max_rows, beams):
            if not upcoming:
                document = next(pending, None)
                if document is None:
                    break
                upcoming.append(document)
            width = max(longest, len(upcoming[0][1]))
            slots = len(staying) + len(taken) + 1
            if max_tokens is not None and slots > 1 and slots * beams * width > max_tokens:
                break
            longest = width
            taken.append(upcoming.pop(0))
        return taken

    slots = Slots(model, config)
    process = LogitsProcessor(config)
    slots.refill([], admit([]))
    step, sync = 0, sync_every(slots.device)
    while len(slots):
        slots.step(process, generator)
        step += 1
        if step % sync:
            continue
        free, finished = slots.take_finished()
        yield from finished
        gone = set(free)
        slots.refill(free, admit([n for s, n in enumerate(slots.source_lengths) if s not in gone]))
