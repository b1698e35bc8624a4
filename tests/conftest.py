"""Shared fixtures: a sentencepiece model and random mT5 checkpoints, built once per test session."""
from __future__ import annotations

import pytest

from tests.fixtures.checkpoints import MT5_SMALL, TINY, TINY_RELU_TIED, build_checkpoint
from tests.fixtures.spiece import build_spiece_model


@pytest.fixture(scope="session")
def spiece_model(tmp_path_factory):
    return build_spiece_model(tmp_path_factory.mktemp("spiece"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, spiece_model):
    """gated-gelu, untied lm_head (as real mT5), 3 encoder and 2 decoder layers, d_model != heads * d_kv."""
    return build_checkpoint(tmp_path_factory.mktemp("tiny"), TINY, spiece_model)


@pytest.fixture(scope="session")
def tiny_relu_tied_checkpoint(tmp_path_factory, spiece_model):
    """The original T5 variant: relu feed-forward and an lm_head tied to the embedding."""
    return build_checkpoint(tmp_path_factory.mktemp("tiny-relu-tied"), TINY_RELU_TIED, spiece_model)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory, spiece_model):
    """mt5-small's shape: d_model 512, d_ff 1024, 8+8 layers, 6 heads, vocab 250,112 (1.2 GB in float32)."""
    return build_checkpoint(tmp_path_factory.mktemp("mt5-small"), MT5_SMALL, spiece_model)

