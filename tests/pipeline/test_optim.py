"""Our Adafactor against transformers' (the recipe's reference), and free of host syncs."""

from __future__ import annotations

import pytest
import torch
import transformers

from pipeline.optim import Adafactor

STEPS = 6
LR = 1e-2


def _parameters(seed: int) -> list[torch.nn.Parameter]:
    """A matrix and a stack of matrices (factored second moments) and a vector (a full one)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in [(16, 24), (3, 8, 5), (24,)]]


def _set_gradients(params: list[torch.nn.Parameter], step: int) -> None:
    """Gradients of scales from 1e-3 to 1e2, so that some updates are clipped to RMS 1 and some are not."""
    generator = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 10.0 ** torch.randint(-3, 3, p.shape, generator=generator)


# The two compute the same float32 expressions in another order: the factors multiply the gradient in another
# order, and weight decay is a multiply here and an add there. Each step's update then differs by a few ulps of
# itself (it is at most LR in RMS) and the add by an ulp of the weight: a few float32 ulps of the weights' scale
# per step bound that on any CPU. A wrong decay, factor or clip moves a weight by a fraction of LR.
ULPS_PER_STEP = 4


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adafactor_matches_transformers_without_relative_step_or_parameter_scaling(weight_decay):
    ours, theirs = _parameters(seed=0), _parameters(seed=0)
    initial = [p.detach().clone() for p in ours]
    optimizer = Adafactor(ours, lr=LR, weight_decay=weight_decay)
    reference = transformers.Adafactor(
        theirs,
        lr=LR,
        scale_parameter=False,
        relative_step=False,
        warmup_init=False,
        beta1=None,
        weight_decay=weight_decay,
    )
    for step in range(STEPS):
        _set_gradients(ours, step)
        _set_gradients(theirs, step)
        optimizer.step()
        reference.step()
    for got, want, start in zip(ours, theirs, initial):
        assert (want - start).abs().max() > LR / 2  # the steps moved every tensor
        atol = ULPS_PER_STEP * STEPS * torch.finfo(torch.float32).eps * float(want.detach().abs().max())
        torch.testing.assert_close(got, want, rtol=0, atol=atol)


def test_adafactor_step_reads_nothing_back_from_the_device(monkeypatch):
    """A host read of a CUDA tensor waits for the GPU; Adafactor once made one per parameter per step."""
    params = _parameters(seed=0)
    optimizer = Adafactor(params, lr=LR, weight_decay=0.1)
    reads, counting = [], [False]
    for name in ("item", "tolist", "__float__", "__int__", "__index__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def recording(self, *args, _name=name, _original=original, **kwargs):
            if counting[0]:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, recording)
    for step in range(3):  # the first step creates the state, the later ones update it
        _set_gradients(params, step)
        counting[0] = True
        optimizer.step()
        counting[0] = False
    assert reads == []
    assert all(torch.isfinite(p).all() for p in params)
