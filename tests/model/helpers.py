"""What the model tests share: inputs, generation settings, logits, and the tolerances that compare them."""

from __future__ import annotations

import torch

# For tests that compare our own model with itself in another layout (packed head, merged adapters, reloaded
# weights) on the tiny checkpoints: logits are O(10), and 3 + 2 layers of width 64 put their float32 error against
# float64 near 1e-6 on any CPU, a hundredth of this.
FP32_ATOL = 1e-4

# Both engines compute in float32 and differ only in the order of their roundings: fused projections, SDPA,
# oneDNN against MKL, AVX2 against AVX-512 accumulators. Against the same transformers model run in float64,
# each one's error is a sum of roundings in reductions of the same lengths and magnitudes, so the largest
# error over a tensor has the same size for both, on whatever CPU they run: ours may be ROUNDING_MARGIN times
# transformers' own. A real defect (a wrong mask, bias, scale or dtype) is orders of magnitude above that.
# An absolute bound instead would be a bound on one CPU's rounding (benchmarks/README.md, "Numerics").
ROUNDING_MARGIN = 4.0

# Generation settings that transformers' generate() and ours must agree on token for token.
GENERATE_SETTINGS = {
    "greedy": dict(max_new_tokens=24),
    "xlsum_beam": dict(num_beams=4, no_repeat_ngram_size=2, length_penalty=0.6, max_new_tokens=24),
    "beam_early_stopping_two_returned": dict(
        num_beams=3, early_stopping=True, num_return_sequences=2, max_new_tokens=16
    ),
    "beam_never_stop": dict(num_beams=2, early_stopping="never", length_penalty=1.2, max_new_tokens=12),
    "greedy_min_new_tokens_repetition_penalty": dict(max_new_tokens=20, min_new_tokens=8, repetition_penalty=1.3),
    "greedy_max_length": dict(max_length=9, no_repeat_ngram_size=3),
    "beam_repetition_penalty": dict(num_beams=3, repetition_penalty=1.2, no_repeat_ngram_size=2, max_new_tokens=12),
}

# The same, for documents streamed through continuous batching one sequence each.
STREAM_SETTINGS = {
    "greedy_xlsum": dict(max_new_tokens=30, no_repeat_ngram_size=2),
    "greedy_min_new_tokens_repetition_penalty": dict(
        max_new_tokens=20, min_new_tokens=6, repetition_penalty=1.3, no_repeat_ngram_size=3
    ),
    "beam_xlsum": dict(num_beams=4, no_repeat_ngram_size=2, length_penalty=0.6, max_new_tokens=30),
    "beam_early_stopping": dict(num_beams=3, early_stopping=True, max_new_tokens=20),
    "beam_never_stop": dict(num_beams=2, early_stopping="never", length_penalty=1.2, max_new_tokens=14),
}


def batch_with_padding(seed: int = 0, batch: int = 4, length: int = 14):
    """Inputs of different lengths, each ending in EOS, right-padded with pad id 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 4000, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, used in enumerate(torch.linspace(length, 4, batch).long().tolist()):
        ids[row, used - 1] = 1
        ids[row, used:] = 0
        mask[row, used:] = 0
    return ids, mask


def decoder_inputs(seed: int = 1, batch: int = 4, length: int = 7):
    g = torch.Generator().manual_seed(seed)
    dec = torch.randint(3, 4000, (batch, length), generator=g)
    dec[:, 0] = 0
    return dec


def token_documents(count: int = 14, seed: int = 0) -> list[tuple[int, list[int]]]:
    """(key, token ids) sources of varied length, each ending in EOS, for continuous batching."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for key in range(count):
        length = int(torch.randint(4, 40, (1,), generator=g))
        out.append((key, torch.randint(3, 4000, (length,), generator=g).tolist() + [1]))
    return out


def logits(model, seed: int = 0) -> torch.Tensor:
    """The model's logits on batch_with_padding(seed) and decoder_inputs(seed + 1)."""
    ids, mask = batch_with_padding(seed)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_inputs(seed + 1)).logits


def assert_as_close_to_float64_as_transformers(got: torch.Tensor, expected: torch.Tensor, exact: torch.Tensor):
    """`got` (ours, float32) is within ROUNDING_MARGIN times transformers' float32 error (`expected`) of
    transformers in float64 (`exact`), plus a few ulps of the largest value for tensors it gets exact."""
    ours_error = float((got.double() - exact).abs().max())
    reference_error = float((expected.double() - exact).abs().max())
    floor = 4 * torch.finfo(torch.float32).eps * float(exact.abs().max())
    assert ours_error <= ROUNDING_MARGIN * reference_error + floor, (
        f"our float32 error {ours_error:.3g} against float64, transformers' {reference_error:.3g}"
    )
