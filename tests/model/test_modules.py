"""The decoder's building blocks where a faster path replaces the reference's: the same results to rounding."""

from __future__ import annotations

import pytest
import torch

from model.modules import attend, attend_decode_step, mask_to_bias


@pytest.mark.parametrize("values_transposed", [False, True])
@pytest.mark.parametrize("queries", [1, 4])
@pytest.mark.parametrize("heads,src_len", [(6, 448), (12, 37)])
def test_decode_step_attention_is_sdpas_to_float32_rounding(heads, src_len, queries, values_transposed):
    """A decode step's attention on CPU (one query per row, or a document's beams folded into the query axis of
    its cross-attention) goes through two matrix products instead of SDPA. Scores are 64-term dot products of
    unit-normal entries: float32 rounds each term to about 2^-24 of its size, and the two paths sum them in other
    orders, so a score moves by about sqrt(64) * 2^-24 * 40 = 2e-5 at most (scores reach about 40 here) and each
    weight by that relative amount; an output, a weighted mean of unit-normal values (at most about 4), by under
    1e-4. Masked positions must weigh nothing in both. `values_transposed`: the values held [.., 64, src_len] in
    memory, as DecodeBatch holds the cross-attention's on CPU (another product, the same bound)."""
    torch.manual_seed(0)
    sources = 5
    q = torch.randn(sources, heads, queries, 64)
    k, v = torch.randn(sources, heads, src_len, 64), torch.randn(sources, heads, src_len, 64)
    if values_transposed:
        v = v.transpose(-1, -2).contiguous().transpose(-1, -2)
    mask = torch.ones(sources, src_len, dtype=torch.long)
    mask[1, src_len // 2 :] = 0
    mask[3, 1:] = 0  # one key only: its value, exactly
    bias = mask_to_bias(mask, torch.float32)
    expected = attend(q, k, v, bias, 0.0)
    got = attend_decode_step(q, k, v, bias)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(got[3], v[3, :, :1].expand(heads, queries, 64), rtol=0, atol=1e-6)
    # What lies past a source's length is masked: poisoning it with large values changes nothing.
    k[1, :, src_len // 2 :], v[1, :, src_len // 2 :] = 1e4, 1e4
    torch.testing.assert_close(attend_decode_step(q, k, v, bias)[1], got[1], rtol=0, atol=0)


def test_decode_step_self_attention_with_a_bias_per_head_is_sdpas_to_float32_rounding():
    """A self-attention step: each row's query against its cache, with a relative position bias per head and the
    positions past the row's length masked (the decoder's bias [rows, heads, 1, visible]). Same bound as above."""
    torch.manual_seed(1)
    rows, heads, visible = 7, 6, 40
    q = torch.randn(rows, heads, 1, 64)
    k, v = torch.randn(rows, heads, visible, 64), torch.randn(rows, heads, visible, 64)
    lengths = torch.randint(1, visible + 1, (rows,))
    bias = torch.randn(rows, heads, 1, visible) * 3
    bias = bias.masked_fill(
        torch.arange(visible)[None, None, None, :] >= lengths[:, None, None, None], torch.finfo(torch.float32).min
    )
    torch.testing.assert_close(attend_decode_step(q, k, v, bias), attend(q, k, v, bias, 0.0), rtol=0, atol=1e-4)
