"""The decoder's building blocks where a faster path replaces the reference's: the same results to rounding."""

from __future__ import annotations

import pytest
import torch

from model.modules import attend, attend_one_query, mask_to_bias


@pytest.mark.parametrize("heads,src_len", [(6, 448), (12, 37)])
def test_one_query_attention_is_sdpas_to_float32_rounding(heads, src_len):
    """A greedy step's cross-attention (one query per source) goes through two matrix-vector products instead of
    SDPA. Scores are 64-term dot products of unit-normal entries: float32 rounds each term to about 2^-24 of
    its size, and the two paths sum them in other orders, so a score moves by about sqrt(64) * 2^-24 * 40 = 2e-5
    at most (scores reach about 40 here) and each weight by that relative amount; an output, a weighted mean of
    unit-normal values (at most about 4), by under 1e-4. Masked positions must weigh nothing in both."""
    torch.manual_seed(0)
    sources = 5
    q = torch.randn(sources, heads, 1, 64)
    k, v = torch.randn(sources, heads, src_len, 64), torch.randn(sources, heads, src_len, 64)
    mask = torch.ones(sources, src_len, dtype=torch.long)
    mask[1, src_len // 2 :] = 0
    mask[3, 1:] = 0  # one key only: its value, exactly
    bias = mask_to_bias(mask, torch.float32)
    expected = attend(q, k, v, bias, 0.0)
    got = attend_one_query(q, k, v, bias)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(got[3], v[3, :, :1], rtol=0, atol=1e-6)
    # What lies past a source's length is masked: poisoning it with large values changes nothing.
    k[1, :, src_len // 2 :], v[1, :, src_len // 2 :] = 1e4, 1e4
    torch.testing.assert_close(attend_one_query(q, k, v, bias)[1], got[1], rtol=0, atol=0)
