"""Our Adafactor, step by step against transformers' on a small MLP, as fine-tuning drives it.

tests/pipeline/test_optim.py compares single updates on fixed gradients. Here the gradients come from training a
model, so the steps cover what a run goes through: 50 steps of second moments decaying at 1 - t^-0.8, updates
clipped and not, weight decay, and the fine-tuning job's own settings (its learning rate, schedule and gradient
clipping, read from FinetuneSettings).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import transformers

from pipeline.optim import Adafactor, linear_schedule
from pipeline.train import FinetuneSettings

STEPS = 50
F32_EPS = torch.finfo(torch.float32).eps
JOB = {field.name: field.default for field in dataclasses.fields(FinetuneSettings)}  # the job's defaults


@pytest.fixture(autouse=True)
def one_thread():
    """The model is tiny: torch's threads only wait on each other (10x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mlp(seed: int) -> torch.nn.Module:
    """Matrices (factored second moments) and biases (full ones)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 48), torch.nn.GELU(), torch.nn.Linear(48, 32), torch.nn.GELU(), torch.nn.Linear(32, 10)
    )


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and the classes a fixed random linear map gives them: something to learn."""
    teacher = torch.randn(16, 10, generator=torch.Generator().manual_seed(99))
    inputs = torch.randn(64, 16, generator=torch.Generator().manual_seed(100 + step)) * 2
    return inputs, (inputs @ teacher).argmax(-1)


def _pair(lr: float, weight_decay: float):
    ours_model, theirs_model = _mlp(0), _mlp(0)
    ours = Adafactor(list(ours_model.parameters()), lr=lr, weight_decay=weight_decay)
    theirs = transformers.Adafactor(
        list(theirs_model.parameters()),
        lr=lr,
        scale_parameter=False,
        relative_step=False,
        warmup_init=False,
        beta1=None,
        weight_decay=weight_decay,
    )
    return ours_model, ours, theirs_model, theirs


def _gradients(model: torch.nn.Module, step: int, label_smoothing: float, max_grad_norm: float | None) -> float:
    model.zero_grad()
    inputs, labels = _batch(step)
    loss = F.cross_entropy(model(inputs), labels, label_smoothing=label_smoothing)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    return loss.item()


# Tolerance of one step, started from the same weights and gradients. The two optimizers compute the same float32
# expressions in another order (the factors multiply the gradient in another order; weight decay is a multiply
# here and an add there), so each intermediate differs by a few ulps of itself. The second moments are running
# averages of the same squared gradients: a relative rounding difference of a few ulps enters them each step and
# their decay never amplifies it, so after t steps they, and through rsqrt the update, differ by at most about
# 4t ulps of the update. Applying weight decay and the update rounds the weight twice on each side (and the
# decay factor once), half an ulp of the weight each: 3 ulps of the largest weight bound that. A wrong decay
# rate, factor, clip or weight decay changes a step by a sizeable fraction of the update: at step 50 that is still
# over 10^4 times this bound (a decay rate of -0.79 for -0.8 is caught 1,000-fold).
def _step_tolerance(step: int, update: torch.Tensor, weight: torch.Tensor) -> float:
    return (step + 1) * 4 * F32_EPS * float(update.abs().max()) + 3 * F32_EPS * float(weight.abs().max())


def _assert_steps_match(lr: float, weight_decay: float, label_smoothing: float, max_grad_norm, schedule: bool):
    ours_model, ours, theirs_model, theirs = _pair(lr, weight_decay)
    schedules = [linear_schedule(opt, JOB["warmup_steps"], STEPS) for opt in (ours, theirs)] if schedule else []
    start = [p.detach().clone() for p in ours_model.parameters()]
    losses = []
    for step in range(STEPS):
        # both start the step from our weights and our gradient: each step is compared on its own, so the
        # tolerance is one step's rounding, not 50 steps of it fed back through the model
        losses.append(_gradients(ours_model, step, label_smoothing, max_grad_norm))
        for mine, other in zip(ours_model.parameters(), theirs_model.parameters()):
            other.data.copy_(mine.data)
            other.grad = mine.grad.clone()
        before = [p.detach().clone() for p in theirs_model.parameters()]
        ours.step()
        theirs.step()
        for s in schedules:
            s.step()
        for (name, mine), other, old in zip(ours_model.named_parameters(), theirs_model.parameters(), before):
            difference = float((mine - other).detach().abs().max())
            tolerance = _step_tolerance(step, other.detach() - old, other.detach())
            assert difference <= tolerance, (step, name, difference, tolerance)
    if lr >= 1e-2:
        assert losses[-1] < losses[0] / 2, losses  # it learned
    moved = min(float((p - s).detach().abs().max()) for p, s in zip(ours_model.parameters(), start))
    assert moved > lr, moved  # every tensor moved, a million times its tolerance


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adafactor_steps_match_transformers_on_an_mlp(weight_decay):
    _assert_steps_match(lr=1e-2, weight_decay=weight_decay, label_smoothing=0.0, max_grad_norm=None, schedule=False)


def test_adafactor_steps_match_transformers_with_the_finetune_jobs_settings():
    """--optimizer adafactor as the job runs it by default: its lr, weight decay, label smoothing, gradient
    clipping and linear schedule (the lr changes every step, which the second moments do not see)."""
    assert JOB["optimizer"] == "adafactor"
    _assert_steps_match(
        lr=JOB["lr"],
        weight_decay=JOB["weight_decay"],
        label_smoothing=JOB["label_smoothing"],
        max_grad_norm=JOB["max_grad_norm"],
        schedule=True,
    )


def test_adafactor_trajectory_stays_with_transformers_for_50_steps():
    """Left to run on their own, the two trajectories also stay together: 50 steps of lr 1e-2 with weight decay.

    Here rounding differences do feed back through the gradients, so the bound is no longer one step's rounding:
    it is lr / 1000. A wrong formula moves weights by a fraction of lr in one step. The rounding of 50 steps, a few
    ulps of a weight per step (1e-8 to 1e-7 here; 4e-7 in all after 50), would have to grow 25-fold more through
    a model whose updates are normalized and clipped to RMS 1 to get there.
    """
    lr = 1e-2
    ours_model, ours, theirs_model, theirs = _pair(lr, weight_decay=0.1)
    for step in range(STEPS):
        ours_loss = _gradients(ours_model, step, 0.0, None)
        theirs_loss = _gradients(theirs_model, step, 0.0, None)
        assert abs(ours_loss - theirs_loss) <= 1e-5 * abs(theirs_loss), step
        ours.step()
        theirs.step()
    for (name, mine), other in zip(ours_model.named_parameters(), theirs_model.parameters()):
        torch.testing.assert_close(mine, other, rtol=0, atol=lr / 1000, msg=name)
