"""Optimizers and the learning-rate schedule for fine-tuning.

Adafactor is written here because torch.optim.Adafactor always scales the step by the parameter's RMS
and caps it at 1/sqrt(t) (the relative-step variant). The XL-Sum recipe for mT5 uses the other one:
scale_parameter=False, relative_step=False, a plain learning rate (5e-4) with linear warmup and decay.
"""

from __future__ import annotations

import math

import torch


class Adafactor(torch.optim.Optimizer):
    """Adafactor (Shazeer & Stern, 2018) without parameter scaling or relative steps, and without momentum:
    factored second moments for matrices, update clipped to RMS <= clip_threshold, step = lr * update.

    No host syncs: a device tensor is never read back (hundreds of waits per step on a GPU). The step count is
    a Python int, as in transformers' Adafactor, so the decay of the second moments is host arithmetic."""

    def __init__(
        self,
        params,
        lr: float,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        weight_decay: float = 0.0,
    ):
        if lr <= 0:
            raise ValueError(f"Adafactor needs an explicit learning rate > 0, got {lr}")
        super().__init__(
            params,
            dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, weight_decay=weight_decay),
        )

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            eps1, _ = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                factored = grad.dim() >= 2
                if not state:
                    state["step"] = 0
                    if factored:
                        state["row"] = torch.zeros(grad.shape[:-1], device=grad.device)
                        state["col"] = torch.zeros(grad.shape[:-2] + grad.shape[-1:], device=grad.device)
                    else:
                        state["second"] = torch.zeros_like(grad)
                state["step"] += 1
                beta2 = 1.0 - math.pow(state["step"], group["decay_rate"])
                squared = grad * grad + eps1
                if factored:
                    state["row"].mul_(beta2).add_(squared.mean(-1), alpha=1 - beta2)
                    state["col"].mul_(beta2).add_(squared.mean(-2), alpha=1 - beta2)
                    row_factor = (state["row"] / state["row"].mean(-1, keepdim=True)).rsqrt().unsqueeze(-1)
                    update = grad * row_factor * state["col"].rsqrt().unsqueeze(-2)
                else:
                    state["second"].mul_(beta2).add_(squared, alpha=1 - beta2)
                    update = grad * state["second"].rsqrt()
                rms = update.norm(2) / math.sqrt(update.numel())
                update.div_((rms / group["clip_threshold"]).clamp_(min=1.0)).mul_(group["lr"])
                if group["weight_decay"]:
                    p.mul_(1 - group["weight_decay"] * group["lr"])
                p.add_(-update.to(p.dtype))


OPTIMIZERS = ("adafactor", "adamw", "sgd")


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """sgd is plain SGD without momentum: each update is the learning rate times the gradient, so replicas that
    agree on the gradient to rounding agree on the weights to rounding (tests/pipeline/test_finetune.py)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        return Adafactor(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"--optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup from 0 to the learning rate, then linear decay to 0 at total_steps (transformers'
    get_linear_schedule_with_warmup, so recipes carry over)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
