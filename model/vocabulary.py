"""Output-vocabulary restriction: the output head computes only the pieces a user's languages need.

mT5's lm_head has 250,112 rows, one per piece of every language it knows; a job summarizing a known set
of languages uses a small share of them. restrict_vocabulary(model, kept_ids) replaces lm_head with a
head holding only the kept rows ([kept, d_model]), whose scores are for its `kept_ids` alone; the
model's lm_logits gives every other id -inf. Decoding code is unchanged and can never pick an id
outside the kept set.

This is a quality trade-off, not an exact optimisation: a summary that needs a piece never seen in the
sample text (a name, a number written another way, a word of another language) is written with kept
pieces instead. benchmarks/quality.py measures it. The usual way to build the set is
kept_ids_from_text(tokenizer, sample): every piece that tokenizing a sample of text in the languages
summarized produces.

Restrict before quantizing: quantize(model, "int8-dynamic") then quantizes the smaller head (quantize()
finds the nn.Linear inside it), and model.load_for_inference does it in that order. A restricted model is
for inference only and cannot be saved.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class RestrictedHead(nn.Module):
    """lm_head over the kept ids only: scores [..., kept] for the ids in `kept_ids` [kept], ascending."""

    def __init__(self, kept_ids: torch.Tensor, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("kept_ids", kept_ids, persistent=False)
        self.kept = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.kept.weight = nn.Parameter(weight, requires_grad=False)  # [kept, d_model]
        # Saving would write "lm_head.kept.weight" and no lm_head: a checkpoint that loads as garbage.
        self.register_state_dict_pre_hook(_refuse_saving)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.kept(hidden)  # [..., kept]


def _refuse_saving(module, prefix, keep_vars) -> None:
    raise ValueError(
        "a model with a restricted output vocabulary cannot be saved: save it before restricting its "
        "output vocabulary (restrict_vocabulary, which load_for_inference applies for kept_ids)"
    )


def restrict_vocabulary(model: nn.Module, kept_ids: Iterable[int]) -> nn.Module:
    """Replace `model.lm_head` with a RestrictedHead over `kept_ids`, in place; returns `model`.

    pad, eos and the decoder start id are always kept, so every sequence can end and be padded. A tied
    lm_head (the embedding, used after the d_model**-0.5 rescale in lm_logits) works too: the kept rows
    are copied and the embedding stays as it is. The head must still be a plain nn.Linear: restrict
    first, then quantize.
    """
    config = model.config
    head = getattr(model, "lm_head", None)
    if getattr(head, "kept_ids", None) is not None:
        raise ValueError("the output vocabulary is already restricted; restrict a freshly loaded model once")
    if type(head) is not nn.Linear:
        raise ValueError(
            f"restrict_vocabulary needs a model whose lm_head is an nn.Linear, not "
            f"{type(head).__name__}: load it unquantized, restrict it, then quantize(model, method)"
        )
    ids = set(int(i) for i in kept_ids) | {config.pad_token_id, config.eos_token_id, config.decoder_start_token_id}
    outside = [i for i in ids if not 0 <= i < config.vocab_size]
    if outside:
        raise ValueError(f"kept ids {sorted(outside)[:5]} are outside the vocabulary [0, {config.vocab_size})")
    weight = head.weight.detach()
    kept = torch.tensor(sorted(ids), dtype=torch.long, device=weight.device)
    # A copy of the kept rows: an untied head's full weight is released with it; a tied one is the embedding.
    model.lm_head = RestrictedHead(kept, weight.index_select(0, kept)).train(head.training)
    return model


def kept_ids_from_text(tokenizer, texts: Iterable[str], batch: int = 1024) -> set[int]:
    """Every piece id the tokenizer produces from `texts` (a sample of text in the languages summarized),
    eos included; restrict_vocabulary adds pad and the decoder start."""
    seen: set[int] = set()
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == batch:
            seen.update(i for ids in tokenizer(chunk).input_ids for i in ids)
            chunk = []
    if chunk:
        seen.update(i for ids in tokenizer(chunk).input_ids for i in ids)
    return seen
