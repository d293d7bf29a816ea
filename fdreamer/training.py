"""Single-process training pieces (no Ray): optimizer, EMA, one optimizer step with accumulation, validation.

The Ray Train loop (``training/loop.py``) and the overhead benchmark's bare PyTorch loop
(``tests/bench/bench_train.py``) call exactly these, so the two differ only in distribution and data
loading. Randomness (timesteps, noise, CFG dropout) is drawn from generators seeded by
``(seed, rank, step, micro-batch)``: a resumed run draws the same numbers without storing RNG state.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fdreamer.batching import TrainBatch
from fdreamer.models.conditions import Conditions, null_conditions
from fdreamer.objective import diffusion_objective
from fdreamer.schedule import NoiseSchedule


def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """A CPU generator unique to (seed, rank, step, micro-batch): reproducible after a resume."""
    key = ((seed * 1_000_003 + rank) * 1_000_003 + step) * 1_000 + micro
    return torch.Generator().manual_seed(key % (2**63 - 1))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: Sequence[float], eps: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (frozen groups are left out)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (every group is frozen)")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)


def lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """Constant learning rate after a linear warmup (paper §4.1 uses a constant 5e-5)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr


class EMA:
    """Exponential moving average of the trainable parameters (kept in fp32 on the parameters' device)."""

    def __init__(self, model: nn.Module, decay: float, start: int = 0) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.start = decay, start
        self.shadow = {n: p.detach().float().clone() for n, p in _named_trainable(model)}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """shadow <- d * shadow + (1 - d) * param (a copy while ``step < start``)."""
        d = self.decay if step >= self.start else 0.0
        for n, p in _named_trainable(model):
            self.shadow[n].mul_(d).add_(p.detach().float(), alpha=1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state misses {len(missing)} parameters (e.g. {sorted(missing)[:3]})")
        for n in self.shadow:
            self.shadow[n].copy_(state[n])


def _named_trainable(model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
    inner = getattr(model, "module", model)  # DDP wraps the model
    return ((n, p) for n, p in inner.named_parameters() if p.requires_grad)


@dataclass
class StepResult:
    loss: float
    l_df: float
    l_flow: float | None
    grad_norm: float


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: NoiseSchedule,
    micro_batches: Sequence[TrainBatch],
    *,
    null: Conditions | None,
    drop_probs: tuple[float, float, float],
    gamma: float,
    grad_clip: float,
    seed: int,
    rank: int,
    step: int,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
) -> StepResult:
    """One optimizer step over ``micro_batches`` (gradient accumulation; mean of their losses).

    ``no_sync`` (DDP's ``model.no_sync``) skips the gradient all-reduce on all but the last micro-batch.
    """
    optimizer.zero_grad(set_to_none=True)
    n = len(micro_batches)
    totals = {"loss": 0.0, "l_df": 0.0, "l_flow": 0.0}
    has_flow = False
    for i, mb in enumerate(micro_batches):
        gen = step_generator(seed, rank, step, i)
        sync = contextlib.nullcontext() if (no_sync is None or i == n - 1) else no_sync()
        with sync, (autocast or contextlib.nullcontext()):
            nulls = null_conditions(mb.cond, null.text_tokens, null.t5_tokens, null.t5_mask) if null is not None else None
            out = diffusion_objective(model, schedule, mb.latents, mb.cond, flow=mb.flow, gamma=gamma,
                                      null=nulls, drop_probs=drop_probs, generator=gen)
            (out.loss / n).backward()
        totals["loss"] += float(out.loss) / n
        totals["l_df"] += float(out.l_df) / n
        if out.l_flow is not None:
            has_flow = True
            totals["l_flow"] += float(out.l_flow) / n
    params = [p for p in model.parameters() if p.requires_grad]
    if grad_clip > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    else:
        norm = math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in params if p.grad is not None))
    optimizer.step()
    return StepResult(totals["loss"], totals["l_df"], totals["l_flow"] if has_flow else None, norm)


@torch.no_grad()
def validation_loss(
    model: nn.Module, schedule: NoiseSchedule, batch: TrainBatch, timesteps: Sequence[int], seed: int = 1234,
) -> dict[str, float]:
    """L_DF of ``batch`` at each fixed timestep with fixed noise (no dropout): ``{"val_loss": mean, "val_loss_t<k>": ...}``.

    The noise depends only on ``seed`` and the batch shape, so evaluations at different steps of a
    run (or of different runs) compare the same problems.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch.latents.shape, generator=gen).to(batch.latents)
    out: dict[str, float] = {}
    for t in timesteps:
        ts = torch.full((batch.latents.shape[0],), int(t), dtype=torch.long)
        res = diffusion_objective(model, schedule, batch.latents, batch.cond, timesteps=ts, noise=noise)
        out[f"val_loss_t{int(t)}"] = float(res.l_df)
    out["val_loss"] = sum(out.values()) / len(timesteps)
    model.train(was_training)
    return out


__all__ = ["EMA", "StepResult", "lr_at", "make_optimizer", "optimizer_step", "step_generator", "validation_loss"]
