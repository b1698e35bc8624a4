"""Candidate engine fixes, measured by monkeypatching our engine inside the benchmark process only.

model/ is not changed: each experiment is an engine (`ours-fp32+ngram`, ...) whose patches are applied
while it runs and removed afterwards, so the other engines of the same run see the code as it is.
Each fix is meant to be token-identical to ours-fp32 (the agreement columns check it), except the
vocabulary restriction, which is a quality trade-off measured by agreement.

- ngram: ban_repeated_ngrams without a [rows, vocab] scratch tensor. Today it allocates an int32
  tensor of the full 250k vocabulary per row, scatter-adds into it and then masked_fills the scores
  (three passes over rows x 250k per step). scatter_reduce_(amin) writes -inf straight into the scores
  at the few banned ids, in place: O(rows x length) work.
- compact: drop finished rows from the batch. Today greedy keeps computing every row (lm_head
  included) until the last one emits EOS, and beam search keeps every source until the last one is
  done; summaries of varied length waste about half the work. CTranslate2 drops finished examples.
  Every SYNC_EVERY steps (when the loop syncs anyway) finished rows / sources leave the caches, the
  cross-attention keys and values and the bookkeeping tensors; their outputs are kept aside.
- lmhead-t: lm_head's weight kept transposed ([d_model, vocab], contiguous) and applied as hidden @ W.
  F.linear on the [vocab, d_model] weight runs a transposed-B GEMM that is ~1.25x slower at 16 rows on
  AVX2 with torch's MKL, and gives bit-identical results. A load-time layout choice, like the fused qkv.
- vocab: lm_head restricted to the first N ids (a stand-in for "the pieces of the languages you
  summarize"); every other id gets -inf. Not token-identical in general.
- int8: torch dynamic int8 quantization of every nn.Linear, lm_head included (engines.quantize_dynamic_int8).
"""
from __future__ import annotations

import contextlib

import torch

from benchmarks.engines import ENGINES, GROUPS, TorchEngine, ours, quantize_dynamic_int8

# The restricted vocabulary of the `vocab` experiment: the test tokenizer's trained pieces lie below 4,000
# and real mT5 text in a handful of languages uses some tens of thousands of its 250k pieces.
RESTRICTED_VOCAB = 32768


def ban_repeated_ngrams_in_place(sequences: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    rows, cur_len = sequences.shape
    if cur_len < n:
        return scores
    windows = sequences.unfold(1, n, 1)  # [rows, windows, n]
    prefix = sequences[:, cur_len - n + 1:]
    match = (windows[:, :, :-1] == prefix[:, None, :]).all(-1)  # [rows, windows]
    ban = torch.where(match, float("-inf"), float("inf")).to(scores.dtype)
    # min(score, +inf) leaves a score alone; min(score, -inf) bans it, whatever the order of duplicates.
    return scores.scatter_reduce_(1, windows[:, :, -1], ban, reduce="amin")


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def ngram_patch():
    from model import generate as g

    return patched(g, "ban_repeated_ngrams", ban_repeated_ngrams_in_place)


def _compact_state(state, rows: torch.Tensor, sources: torch.Tensor) -> None:
    for cache in state.caches:
        cache.k = cache.k.index_select(0, rows)
        cache.v = cache.v.index_select(0, rows)
    state.cross_kv = [(k.index_select(0, sources), v.index_select(0, sources)) for k, v in state.cross_kv]
    if state.encoder_mask is not None:
        state.encoder_mask = state.encoder_mask.index_select(0, sources)


def greedy_compacting(model, input_ids, attention_mask, config, generator):
    """model.generate.greedy_or_sample, with finished rows dropped from the batch every SYNC_EVERY steps."""
    from model import generate as g

    if config.do_sample:
        return _ORIGINAL["greedy_or_sample"](model, input_ids, attention_mask, config, generator)
    rows, device = input_ids.shape[0], input_ids.device
    max_len = config.total_length()
    state = g.DecodeState(model, input_ids, attention_mask, rows, max_len)
    process = g.LogitsProcessor(config)
    sequences = torch.full((rows, max_len), config.pad_token_id, dtype=torch.long, device=device)
    sequences[:, 0] = config.decoder_start_token_id
    live = sequences.clone()  # the rows still decoding
    alive = torch.arange(rows, device=device)  # their indices in `sequences`
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    cur_len = 1
    while cur_len < max_len:
        scores = process(live[:, :cur_len], state.step(live[:, cur_len - 1], cur_len - 1))
        next_tokens = torch.where(unfinished, scores.argmax(-1), config.pad_token_id)
        live[:, cur_len] = next_tokens
        unfinished &= next_tokens != config.eos_token_id
        cur_len += 1
        if cur_len % g.SYNC_EVERY == 0:
            if not unfinished.any():
                break
            if not unfinished.all():
                sequences[alive] = live
                keep = unfinished.nonzero().squeeze(1)
                live, alive, unfinished = live[keep], alive[keep], unfinished[keep]
                _compact_state(state, keep, keep)
    sequences[alive] = live
    finished_at = torch.where(sequences == config.eos_token_id, torch.arange(max_len, device=device), max_len).amin(1)
    length = int(torch.clamp(finished_at + 1, max=cur_len).max())
    return sequences[:, :length]


def beam_search_compacting(model, input_ids, attention_mask, config, generator):
    """model.generate.beam_search, with sources that can no longer improve dropped every SYNC_EVERY steps."""
    from model import generate as g

    if config.do_sample:
        return _ORIGINAL["beam_search"](model, input_ids, attention_mask, config, generator)
    batch, beams, vocab = input_ids.shape[0], config.num_beams, model.config.vocab_size
    max_len = config.total_length()
    device = input_ids.device
    keep_n = 2 * beams
    state = g.DecodeState(model, input_ids, attention_mask, batch * beams, max_len)
    process = g.LogitsProcessor(config)

    running = torch.full((batch, beams, max_len), config.eos_token_id, dtype=torch.long, device=device)
    running[:, :, 0] = config.decoder_start_token_id
    finished = running.clone()
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = -1e9
    finished_scores = torch.full((batch, beams), -1e9, device=device)
    finished_flags = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    finished_lengths = torch.zeros(batch, beams, dtype=torch.long, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    done = torch.zeros((), dtype=torch.bool, device=device)
    top_beams = torch.arange(keep_n, device=device) < beams
    row_offset = torch.arange(batch, device=device)[:, None] * beams
    out_finished, out_lengths = finished.clone(), finished_lengths.clone()
    alive = torch.arange(batch, device=device)

    cur_len = 1
    while cur_len < max_len:
        flat = running[:, :, :cur_len].reshape(batch * beams, cur_len)
        log_probs = torch.log_softmax(state.step(flat[:, -1], cur_len - 1), dim=-1)
        log_probs = process(flat, log_probs).view(batch, beams, vocab) + running_scores[:, :, None]
        log_probs = log_probs.view(batch, beams * vocab)
        candidate_scores, candidates = torch.topk(log_probs, keep_n)
        parent = candidates // vocab
        candidate_seqs = torch.take_along_dim(running, parent[:, :, None], dim=1)
        candidate_seqs[:, :, cur_len] = candidates % vocab
        ends = (candidate_seqs[:, :, cur_len] == config.eos_token_id) | (cur_len + 1 >= max_len)
        alive_scores = candidate_scores + ends.float() * -1e9
        best = torch.topk(alive_scores, beams)[1]
        running = torch.take_along_dim(candidate_seqs, best[:, :, None], dim=1)
        running_scores = torch.take_along_dim(alive_scores, best, dim=1)
        state.reorder((torch.take_along_dim(parent, best, dim=1) + row_offset).view(-1))
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
        new_lengths = torch.full((batch, keep_n), cur_len, dtype=torch.long, device=device)
        finished_lengths = torch.take_along_dim(torch.cat([finished_lengths, new_lengths], 1), chosen, dim=1)
        cur_len += 1
        if config.early_stopping == "never" and config.length_penalty > 0.0:
            best_length = max_len - 1
        else:
            best_length = cur_len - 1
        best_running = running_scores[:, :1] / (best_length ** config.length_penalty)
        worst_finished = torch.where(finished_flags, finished_scores.amin(1, keepdim=True), -1.0e9)
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        done = done | ~improvable.any() | ends.all()
        if config.early_stopping is True:
            done = done | finished_flags.all()
        if cur_len % g.SYNC_EVERY == 0:
            if bool(done):
                break
            keep = improvable[:, 0]
            if not bool(keep.all()):  # sources whose finished set can no longer change leave the batch
                out_finished[alive], out_lengths[alive] = finished, finished_lengths
                keep = keep.nonzero().squeeze(1)
                rows = (keep[:, None] * beams + torch.arange(beams, device=device)).view(-1)
                (running, running_scores, finished, finished_scores, finished_flags, finished_lengths,
                 improvable, alive) = (t[keep] for t in (running, running_scores, finished, finished_scores,
                                                        finished_flags, finished_lengths, improvable, alive))
                batch = keep.shape[0]
                row_offset = torch.arange(batch, device=device)[:, None] * beams
                _compact_state(state, rows, keep)
    out_finished[alive], out_lengths[alive] = finished, finished_lengths
    n = config.num_return_sequences
    out = out_finished[:, :n].reshape(-1, max_len)
    length = int(out_lengths[:, :n].max()) + 1
    return out[:, :length]


_ORIGINAL: dict = {}


def compact_patch():
    from model import generate as g

    _ORIGINAL.setdefault("greedy_or_sample", g.greedy_or_sample)
    _ORIGINAL.setdefault("beam_search", g.beam_search)
    stack = contextlib.ExitStack()
    stack.enter_context(patched(g, "greedy_or_sample", greedy_compacting))
    stack.enter_context(patched(g, "beam_search", beam_search_compacting))
    return stack


def lm_head_transposed_patch():
    """MT5ForConditionalGeneration.lm_logits as hidden @ W^T-stored, for models given a `_lm_head_t`."""
    from model.mt5 import MT5ForConditionalGeneration

    original = MT5ForConditionalGeneration.lm_logits

    def lm_logits(self, hidden):
        weight_t = self.__dict__.get("_lm_head_t")
        if weight_t is None:
            return original(self, hidden)
        return hidden @ weight_t

    return patched(MT5ForConditionalGeneration, "lm_logits", lm_logits)


def with_transposed_head(engine: TorchEngine) -> TorchEngine:
    model = engine.model
    if not model.config.tie_word_embeddings and isinstance(model.lm_head, torch.nn.Linear):
        model._lm_head_t = model.lm_head.weight.detach().t().contiguous()  # [d_model, vocab]
    return engine


class PatchedEngine(TorchEngine):
    def __init__(self, inner: TorchEngine, patches):
        super().__init__(inner.ctx, inner.model)
        self.patches = patches

    def run(self, docs, decoding):
        with contextlib.ExitStack() as stack:
            for make in self.patches:
                stack.enter_context(make())
            return super().run(docs, decoding)


def restrict_vocabulary(engine: TorchEngine, keep: int) -> TorchEngine:
    """lm_head keeps only its first `keep` rows; the other ids score -inf (a per-instance patch)."""
    model = engine.model
    vocab = model.config.vocab_size
    head = torch.nn.Linear(model.config.d_model, keep, bias=False)
    head.weight = torch.nn.Parameter(model.lm_head.weight[:keep].detach().clone(), requires_grad=False)
    model.lm_head = head  # quantize_dynamic_int8 afterwards quantizes the smaller head

    def lm_logits(hidden):
        logits = torch.full((*hidden.shape[:-1], vocab), float("-inf"), dtype=hidden.dtype, device=hidden.device)
        logits[..., :keep] = model.lm_head(hidden)
        return logits

    model.lm_logits = lm_logits
    return engine


def _restricted_int8(ctx) -> TorchEngine:
    engine = restrict_vocabulary(ours(ctx), RESTRICTED_VOCAB)
    quantize_dynamic_int8(engine.model)
    return engine


def _fp32(ctx, shared) -> TorchEngine:
    """ours-fp32's model when it is loaded (the patches do not touch the model), else a new one."""
    return TorchEngine(ctx, shared["ours-fp32"].model) if "ours-fp32" in shared else ours(ctx)


def _int8(ctx, shared) -> TorchEngine:
    if "ours-int8-dynamic" in shared:
        return TorchEngine(ctx, shared["ours-int8-dynamic"].model)
    return ours(ctx, dynamic_int8=True)


EXPERIMENTS = {
    "ours-fp32+ngram": (("cpu", "cuda"), lambda ctx, shared: PatchedEngine(_fp32(ctx, shared), [ngram_patch])),
    "ours-fp32+compact": (("cpu", "cuda"), lambda ctx, shared: PatchedEngine(_fp32(ctx, shared), [compact_patch])),
    "ours-fp32+compact+ngram": (("cpu", "cuda"), lambda ctx, shared: PatchedEngine(_fp32(ctx, shared),
                                                                                   [compact_patch, ngram_patch])),
    "ours-int8-dynamic+compact+ngram": (("cpu",), lambda ctx, shared: PatchedEngine(_int8(ctx, shared),
                                                                                    [compact_patch, ngram_patch])),
    "ours-fp32+compact+ngram+lmhead-t": (("cpu", "cuda"), lambda ctx, shared: PatchedEngine(
        with_transposed_head(_fp32(ctx, shared)), [compact_patch, ngram_patch, lm_head_transposed_patch])),
    # a model of its own: the restriction replaces its lm_logits
    "ours-fp32+vocab32k": (("cpu", "cuda"), lambda ctx, shared: restrict_vocabulary(ours(ctx), RESTRICTED_VOCAB)),
    "ours-int8-dynamic+compact+ngram+vocab32k": (("cpu",), lambda ctx, shared: PatchedEngine(
        _restricted_int8(ctx), [compact_patch, ngram_patch])),
}


def register() -> None:
    ENGINES.update(EXPERIMENTS)
    GROUPS["experiments"] = list(EXPERIMENTS)
