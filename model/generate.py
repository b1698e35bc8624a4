"""Generation: greedy, beam search and sampling over a static KV cache, matching transformers' generate.

The encoder runs once. Each decoder layer's cross-attention keys and values are projected once per
source and shared by its beams. Self-attention caches are preallocated for the whole output. On a GPU
the loop checks for completion only every SYNC_EVERY steps, so it does not stall the device with a host
sync per token; the extra steps cannot change the result (finished rows only receive padding). On CPU
there is nothing to stall and it checks every step (sync_every). At those syncs, finished rows (greedy, sampling) and sources whose results can no longer change (beam search)
leave the batch, caches included, so the remaining steps compute only what is still decoding.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import MT5Config
from .modules import KVCache

SYNC_EVERY = 4
NEG_INF = float("-inf")


def sync_every(device: torch.device) -> int:
    """Steps between completion checks: on CPU every step, since a finished row kept for the steps up to a
    check costs a row's share of each step (a whole step's lm_head at one row), and a check costs nothing."""
    return 1 if device.type == "cpu" else SYNC_EVERY


@dataclass
class GenerationConfig:
    max_length: int = 20
    max_new_tokens: int | None = None
    min_length: int = 0
    min_new_tokens: int | None = None
    do_sample: bool = False
    num_beams: int = 1
    num_return_sequences: int = 1
    early_stopping: bool | str = False
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int | None = None
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    # Fields of generation_config.json we do not use, written back on save.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_beams < 1 or self.num_return_sequences < 1:
            raise ValueError("num_beams and num_return_sequences must be >= 1")
        if self.num_return_sequences > self.num_beams and not self.do_sample:
            raise ValueError(f"num_return_sequences={self.num_return_sequences} needs num_beams >= that "
                             f"(got {self.num_beams}) or do_sample=True")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @classmethod
    def from_dict(cls, raw: dict, model_config: MT5Config | None = None) -> "GenerationConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {}
        if model_config is not None:
            values.update(pad_token_id=model_config.pad_token_id, eos_token_id=model_config.eos_token_id,
                          decoder_start_token_id=model_config.decoder_start_token_id)
        values.update({k: v for k, v in raw.items() if k in known and v is not None})
        if isinstance(values.get("eos_token_id"), list):
            values["eos_token_id"] = values["eos_token_id"][0]
        return cls(**values, extra={k: v for k, v in raw.items() if k not in known})

    @classmethod
    def from_model_config(cls, config: MT5Config) -> "GenerationConfig":
        """Defaults when a checkpoint has no generation_config.json: generation fields in config.json, as
        transformers does for older checkpoints."""
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls.from_dict({k: v for k, v in config.extra.items() if k in known}, config)

    def updated(self, **settings) -> "GenerationConfig":
        known = {f.name for f in dataclasses.fields(self)} - {"extra"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"generate() got unknown settings {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **settings)

    def total_length(self) -> int:
        """Output length cap, counting the decoder start token as transformers does."""
        return 1 + self.max_new_tokens if self.max_new_tokens is not None else self.max_length

    def save(self, out_dir: Path) -> None:
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "seed")})
        out = {k: v for k, v in out.items() if v is not None}
        (out_dir / "generation_config.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")


class LogitsProcessor:
    """The logits processors transformers applies, in its order, as tensor ops with no host sync."""

    def __init__(self, config: GenerationConfig):
        self.config = config

    def __call__(self, sequences: torch.Tensor, scores: torch.Tensor,
                 lengths: torch.Tensor | None = None) -> torch.Tensor:
        """sequences [rows, cur_len] (decoder start included); scores [rows, vocab] float32, changed in place.

        With `lengths` [rows], each row has its own length (continuous batching): sequences is then the
        whole [rows, max_len] buffer, whose positions past a row's length hold decoder_start (a token every
        sequence has, so the repetition penalty is unchanged by them)."""
        c = self.config
        cur_len = sequences.shape[1]
        if c.repetition_penalty != 1.0:
            seen = torch.gather(scores, 1, sequences)
            seen = torch.where(seen < 0, seen * c.repetition_penalty, seen / c.repetition_penalty)
            scores = scores.scatter(1, sequences, seen)
        if c.no_repeat_ngram_size > 0 and (lengths is not None or cur_len + 1 >= c.no_repeat_ngram_size):
            scores = ban_repeated_ngrams(sequences, scores, c.no_repeat_ngram_size, lengths)
        if lengths is not None and (c.min_length > 0 or c.min_new_tokens is not None):
            too_short = (lengths < c.min_length) | (lengths - 1 < (c.min_new_tokens or 0))
            scores[:, c.eos_token_id] = scores[:, c.eos_token_id].masked_fill(too_short, NEG_INF)
        elif cur_len < c.min_length or (c.min_new_tokens is not None and cur_len - 1 < c.min_new_tokens):
            scores[:, c.eos_token_id] = NEG_INF
        if c.do_sample:
            scores = self.warp(scores)
        return scores

    def warp(self, scores: torch.Tensor) -> torch.Tensor:
        c = self.config
        # Beam sampling keeps one token besides EOS so that beams can continue.
        keep = 2 if c.num_beams > 1 else 1
        if c.temperature != 1.0:
            scores = scores / c.temperature
        if c.top_k:
            k = min(max(c.top_k, keep), scores.shape[-1])
            threshold = torch.topk(scores, k)[0][..., -1, None]
            scores = scores.masked_fill(scores < threshold, NEG_INF)
        if c.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= (1 - c.top_p)
            drop[..., -keep:] = False
            scores = scores.masked_fill(drop.scatter(1, order, drop), NEG_INF)
        return scores


def ban_repeated_ngrams(sequences: torch.Tensor, scores: torch.Tensor, n: int,
                        lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Forbid, in place, any token that would complete an n-gram already present in the sequence.

    sequences [rows, cur_len], or [rows, max_len] with each row's length in `lengths` [rows]. The bans are
    written straight into `scores` at the few ids concerned (O(rows x length) work): a [rows, vocab] mask
    of the 250k vocabulary would cost three passes over it per step."""
    rows, cur_len = sequences.shape
    if cur_len < n:
        return scores
    windows = sequences.unfold(1, n, 1)  # [rows, cur_len - n + 1, n]
    if lengths is None:
        prefix = sequences[:, cur_len - n + 1:]  # the last n-1 tokens
        match = (windows[:, :, :-1] == prefix[:, None, :]).all(-1)  # [rows, windows]
    else:
        last = lengths[:, None] - n + 1 + torch.arange(n - 1, device=sequences.device)
        prefix = torch.gather(sequences, 1, last.clamp(min=0))
        inside = torch.arange(windows.shape[1], device=sequences.device)[None, :] + n <= lengths[:, None]
        match = (windows[:, :, :-1] == prefix[:, None, :]).all(-1) & inside
    # min(score, +inf) leaves a score as it is and min(score, -inf) bans it, whatever the duplicates' order.
    ban = torch.where(match, NEG_INF, float("inf")).to(scores.dtype)
    return scores.scatter_reduce_(1, windows[:, :, -1], ban, reduce="amin")


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
            held = self.tensors[name] = torch.empty(max(rows, held.shape[0] if held is not None else 0), vocab,
                                                   dtype=like.dtype, device=like.device)
        return held[:rows]

    def logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """model.lm_logits(hidden) [rows, vocab] as float32, written into the reused buffer."""
        rows = hidden.shape[0]
        return model.lm_logits(hidden, out=self.get("logits", rows, hidden, model.config.vocab_size)).float()


# exp() of anything below this is a float32 denormal or 0. x86 computes denormals in microcode, 50-100x
# slower: with a 250k vocabulary most of a row lies that far below its maximum, and exp() took 134 ms
# per step at 64 rows. Raised to this floor, each such term is still below 2e-38, and the sum they join
# is at least 1 (the maximum's term), so the normalizer does not move.
EXP_FLOOR = -87.0


def logsumexp(x: torch.Tensor, buffers: StepBuffers) -> torch.Tensor:
    """torch.logsumexp(x, -1, keepdim=True) for rows with a finite maximum, with its [rows, vocab]
    temporary in reused memory and no denormal arithmetic."""
    top = x.amax(-1, keepdim=True)
    shifted = torch.sub(x, top, out=buffers.get("shifted", x.shape[0], x, x.shape[1]))
    return shifted.clamp_(min=EXP_FLOOR).exp_().sum(-1, keepdim=True).log_() + top


def beam_candidates(logits: torch.Tensor, sequences: torch.Tensor, running_scores: torch.Tensor,
                    process: LogitsProcessor, keep: int, generator: torch.Generator | None,
                    buffers: StepBuffers, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search's `keep` best continuations of each source: (scores, beam * vocab + token), each
    [sources, keep], where a continuation scores running_scores + the processed log_softmax of `logits`.

    logits [sources * beams, vocab] float32; sequences and lengths as LogitsProcessor takes them."""
    sources, beams = running_scores.shape
    vocab = logits.shape[-1]
    c = process.config
    if c.do_sample or c.repetition_penalty != 1.0:
        # Sampling draws from every continuation, and a repetition penalty scales log-probabilities.
        scores = process(sequences, torch.log_softmax(logits, dim=-1), lengths).view(sources, beams, vocab)
        scores = (scores + running_scores[:, :, None]).view(sources, beams * vocab)
        if c.do_sample:
            candidates = torch.multinomial(scores.softmax(-1), keep, generator=generator)
            return torch.gather(scores, 1, candidates), candidates
        return torch.topk(scores, keep)
    # log_softmax moves a row by a constant and the other processors only ban tokens, so a source's best
    # continuations are among each of its rows' best `keep` logits: only those become log-probabilities,
    # rather than [rows, vocab] of them (three passes over 250k ids per row and step).
    normalizer = logsumexp(logits, buffers)  # [rows, 1]
    top_logits, top_tokens = torch.topk(process(sequences, logits, lengths), keep)  # [rows, keep]
    scores = ((top_logits - normalizer).view(sources, beams, keep) + running_scores[:, :, None]).view(sources, -1)
    candidate_scores, picked = torch.topk(scores, keep)  # picked: beam * keep + rank
    tokens = torch.gather(top_tokens.view(sources, beams * keep), 1, picked)
    return candidate_scores, picked // keep * vocab + tokens


class DecodeState:
    """The encoder output and per-layer caches for one generate call."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, rows: int,
                 max_len: int):
        self.model = model
        encoded = model.encode(input_ids, attention_mask)
        self.cross_kv = model.decoder.project_cross_kv(encoded)
        self.encoder_mask = attention_mask
        c: MT5Config = model.config
        self.caches = [KVCache(rows, c.num_heads, max_len, c.d_kv, encoded.dtype, encoded.device)
                       for _ in range(c.num_decoder_layers)]
        self.buffers = StepBuffers()

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits [rows, vocab] (float32) for the next token after `tokens` [rows] at position `pos`."""
        hidden = self.model.decoder(self.model.shared(tokens[:, None]), self.cross_kv, self.encoder_mask,
                                    caches=self.caches, pos=pos)
        return self.buffers.logits(self.model, hidden[:, -1])

    def reorder(self, index: torch.Tensor) -> None:
        for cache in self.caches:
            cache.select(index)

    def keep(self, rows: torch.Tensor, sources: torch.Tensor) -> None:
        """Drop finished work: only `rows` of the caches and `sources` of the encoder side go on."""
        for cache in self.caches:
            cache.select(rows)
        self.cross_kv = [(k.index_select(0, sources), v.index_select(0, sources)) for k, v in self.cross_kv]
        if self.encoder_mask is not None:
            self.encoder_mask = self.encoder_mask.index_select(0, sources)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             config: GenerationConfig) -> torch.Tensor:
    """Token ids [batch * num_return_sequences, length], starting with decoder_start as transformers returns."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {list(input_ids.shape)}")
    input_ids = input_ids.to(model.device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(model.device)
    generator = None
    if config.do_sample:
        generator = torch.Generator(device=model.device)
        generator.manual_seed(config.seed if config.seed is not None else torch.seed())
    if config.num_beams > 1:
        return beam_search(model, input_ids, attention_mask, config, generator)
    if config.num_return_sequences > 1:  # independent samples of each input
        input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
    return greedy_or_sample(model, input_ids, attention_mask, config, generator)


def greedy_or_sample(model, input_ids, attention_mask, config: GenerationConfig, generator) -> torch.Tensor:
    rows, device = input_ids.shape[0], input_ids.device
    max_len = config.total_length()
    state = DecodeState(model, input_ids, attention_mask, rows, max_len)
    process = LogitsProcessor(config)
    sequences = torch.full((rows, max_len), config.pad_token_id, dtype=torch.long, device=device)
    sequences[:, 0] = config.decoder_start_token_id
    live = sequences.clone()  # the rows still decoding ...
    alive = torch.arange(rows, device=device)  # ... and where they belong in `sequences`
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    cur_len, sync = 1, sync_every(device)
    while cur_len < max_len:
        scores = process(live[:, :cur_len], state.step(live[:, cur_len - 1], cur_len - 1))
        if config.do_sample:
            next_tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            next_tokens = scores.argmax(-1)
        next_tokens = torch.where(unfinished, next_tokens, config.pad_token_id)
        live[:, cur_len] = next_tokens
        unfinished &= next_tokens != config.eos_token_id
        cur_len += 1
        if cur_len % sync == 0:
            if not unfinished.any():
                break
            if not unfinished.all():  # finished rows leave the batch: summary lengths vary widely
                sequences[alive] = live
                keep = unfinished.nonzero().squeeze(1)
                live, alive, unfinished = live[keep], alive[keep], unfinished[keep]
                state.keep(keep, keep)
    sequences[alive] = live
    # transformers stops at the step where the last row finished: trim the padding-only tail.
    finished_at = torch.where(sequences == config.eos_token_id, torch.arange(max_len, device=device),
                              max_len).amin(1)
    length = int(torch.clamp(finished_at + 1, max=cur_len).max())
    return sequences[:, :length]


def beam_search(model, input_ids, attention_mask, config: GenerationConfig, generator) -> torch.Tensor:
    """transformers' vectorised beam search: keep 2*num_beams candidates per step, move those ending in
    EOS to the finished set (scored with the length penalty), continue with the best num_beams others.

    A source whose finished set can no longer change (transformers' per-source "done") leaves the batch
    at the next sync; its beams' results are kept aside."""
    batch, beams, vocab = input_ids.shape[0], config.num_beams, model.config.vocab_size
    max_len = config.total_length()
    device = input_ids.device
    keep, sync = 2 * beams, sync_every(device)
    state = DecodeState(model, input_ids, attention_mask, batch * beams, max_len)
    process = LogitsProcessor(config)

    running = torch.full((batch, beams, max_len), config.eos_token_id, dtype=torch.long, device=device)
    running[:, :, 0] = config.decoder_start_token_id
    finished = running.clone()
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = -1e9  # all beams start identical: expand only the first
    finished_scores = torch.full((batch, beams), -1e9, device=device)
    finished_flags = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    finished_lengths = torch.zeros(batch, beams, dtype=torch.long, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    done = torch.zeros((), dtype=torch.bool, device=device)
    top_beams = torch.arange(keep, device=device) < beams
    row_offset = torch.arange(batch, device=device)[:, None] * beams
    results, result_lengths = finished.clone(), finished_lengths.clone()  # each source's, once it leaves
    alive = torch.arange(batch, device=device)  # the sources still searching

    cur_len = 1
    while cur_len < max_len:
        flat = running[:, :, :cur_len].reshape(batch * beams, cur_len)
        candidate_scores, candidates = beam_candidates(state.step(flat[:, -1], cur_len - 1), flat, running_scores,
                                                       process, keep, generator, state.buffers)
        parent = candidates // vocab  # [batch, keep]
        candidate_seqs = torch.take_along_dim(running, parent[:, :, None], dim=1)
        candidate_seqs[:, :, cur_len] = candidates % vocab
        ends = (candidate_seqs[:, :, cur_len] == config.eos_token_id) | (cur_len + 1 >= max_len)

        # Continue with the best num_beams candidates that did not end.
        alive_scores = candidate_scores + ends.float() * -1e9
        best = torch.topk(alive_scores, beams)[1]
        running = torch.take_along_dim(candidate_seqs, best[:, :, None], dim=1)
        running_scores = torch.take_along_dim(alive_scores, best, dim=1)
        state.reorder((torch.take_along_dim(parent, best, dim=1) + row_offset).view(-1))

        # Merge candidates that just ended (among the top num_beams) into the finished set. After `done`
        # transformers would have stopped, so nothing more may enter it.
        just_ended = ends & top_beams[None, :]
        scored = candidate_scores / (cur_len ** config.length_penalty)
        full = finished_flags.all(-1, keepdim=True) & (config.early_stopping is True)
        blocked = full | ~improvable | ~just_ended | done
        scored = scored + blocked.float() * -1e9
        merged_scores = torch.cat([finished_scores, scored], dim=1)
        chosen = torch.topk(merged_scores, beams)[1]
        finished = torch.take_along_dim(torch.cat([finished, candidate_seqs], 1), chosen[:, :, None], dim=1)
        finished_scores = torch.take_along_dim(merged_scores, chosen, dim=1)
        finished_flags = torch.take_along_dim(torch.cat([finished_flags, just_ended & ~done], 1), chosen, dim=1)
        new_lengths = torch.full((batch, keep), cur_len, dtype=torch.long, device=device)
        finished_lengths = torch.take_along_dim(torch.cat([finished_lengths, new_lengths], 1), chosen, dim=1)
        cur_len += 1

        # Could a running beam still beat the worst finished one?
        if config.early_stopping == "never" and config.length_penalty > 0.0:
            best_length = max_len - 1
        else:
            best_length = cur_len - 1
        best_running = running_scores[:, :1] / (best_length ** config.length_penalty)
        worst_finished = torch.where(finished_flags, finished_scores.amin(1, keepdim=True), -1.0e9)
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        if config.early_stopping is True:
            improvable = improvable & ~finished_flags.all(-1, keepdim=True)
        done = done | ~improvable.any() | ends.all()
        if cur_len % sync == 0:
            if bool(done):
                break
            searching = improvable[:, 0]
            if not bool(searching.all()):  # sources whose finished set can no longer change leave the batch
                results[alive], result_lengths[alive] = finished, finished_lengths
                sources = searching.nonzero().squeeze(1)
                rows = (sources[:, None] * beams + torch.arange(beams, device=device)).view(-1)
                (running, running_scores, finished, finished_scores, finished_flags, finished_lengths,
                 improvable, alive) = (t[sources] for t in (running, running_scores, finished, finished_scores,
                                                           finished_flags, finished_lengths, improvable, alive))
                batch = sources.shape[0]
                row_offset = torch.arange(batch, device=device)[:, None] * beams
                state.keep(rows, sources)
    results[alive], result_lengths[alive] = finished, finished_lengths

    n = config.num_return_sequences
    out = results[:, :n].reshape(-1, max_len)
    length = int(result_lengths[:, :n].max()) + 1
    return out[:, :length]
