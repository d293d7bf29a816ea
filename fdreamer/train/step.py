"""Single-process training pieces (no Ray): optimizer, EMA, one optimizer step with accumulation, validation.

The Ray Train loop (``training/loop.py``) and the overhead benchmark's bare PyTorch loop
(``tests/bench/bench_train.py``) call exactly these, so the two differ only in distribution and data
loading. Randomness (timesteps, noise, CFG dropout) is drawn from generators seeded by
``(seed, rank, step, micro-batch)``: a resumed run draws the same numbers without storing RNG state.
Timesteps are uniform or logit-normal (``timestep_sampling``, :func:`fdreamer.train.objective.sample_timesteps`).

Joint image-video micro-batches (:class:`~fdreamer.data.batching.JointBatch`, VideoCrafter2): the video
clips go through the model as usual; the 1-frame images through ``model(..., temporal=False)`` with
their text condition only (CFG text dropout as for videos), with noise/timesteps from a second
generator. The two losses are combined as a weighted mean over samples,

    L = (n_v · L_video + w · n_i · L_image) / (n_v + w · n_i),      w = ``image_weight`` (default 1),

where L_video (L_DF + γ·L_flow) and L_image (L_DF) are each a mean over their own elements, so with
w = 1 every clip and every image counts the same whatever its frame count. A micro-batch of only
videos (``TrainBatch`` or a JointBatch without images) computes exactly what it computed before.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fdreamer.data.batching import JointBatch, TrainBatch
from fdreamer.models.conditions import Conditions, null_conditions
from fdreamer.train.objective import ObjectiveOutput, TimestepSampling, diffusion_objective
from fdreamer.schedule import NoiseSchedule


def step_generator(seed: int, rank: int, step: int, micro: int, stream: int = 0) -> torch.Generator:
    """A CPU generator unique to (seed, rank, step, micro-batch, stream): reproducible after a resume.

    ``stream`` 0 = the video clips (the keys of every earlier version), 1 = the images of a joint batch.
    """
    key = ((seed * 1_000_003 + rank) * 1_000_003 + step) * 1_000 + micro
    if stream:
        key = key * 7 + stream
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
    loss: float  # the weighted mean of the module docstring, averaged over micro-batches
    l_df: float  # the same weighted mean of the L_DF parts (no flow term)
    l_flow: float | None
    grad_norm: float
    l_df_video: float | None = None  # L_DF of the video clips alone (None: no video in this step)
    l_df_image: float | None = None  # L_DF of the images alone (None: no image in this step)


@dataclass
class JointLoss:
    """The combined loss of one micro-batch and its parts (tensors: ``loss`` is differentiated)."""

    loss: torch.Tensor
    l_df: torch.Tensor
    l_flow: torch.Tensor | None
    l_df_video: torch.Tensor | None
    l_df_image: torch.Tensor | None


def part_objective(
    model: nn.Module, schedule: NoiseSchedule, part: TrainBatch, *, null: Conditions | None = None,
    drop_probs: tuple[float, float, float] = (0.0, 0.0, 0.0), gamma: float = 1.0,
    generator: torch.Generator | None = None, timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None,
    with_flow: bool = True, timestep_sampling: TimestepSampling = "uniform",
) -> ObjectiveOutput:
    """:func:`~fdreamer.train.objective.diffusion_objective` of one part: videos with their fps, images with
    ``temporal=False`` (switches bound to the model call; the objective itself is unchanged).
    ``with_flow=False`` ignores the part's flow targets (validation: L_DF only); ``timestep_sampling`` is how
    timesteps not given are drawn."""
    call = model
    if part.is_image:
        call = partial(model, temporal=False)
    elif part.fps is not None:
        call = partial(model, fps=part.fps)
    nulls = None
    if null is not None:
        nulls = null_conditions(part.cond, null.text_tokens, null.t5_tokens, null.t5_mask)
    return diffusion_objective(call, schedule, part.latents, part.cond, flow=part.flow if with_flow else None,
                               gamma=gamma, timesteps=timesteps, noise=noise, null=nulls, drop_probs=drop_probs,
                               generator=generator, timestep_sampling=timestep_sampling)


def joint_objective(
    model: nn.Module, schedule: NoiseSchedule, mb: TrainBatch | JointBatch, *, null: Conditions | None,
    drop_probs: tuple[float, float, float], gamma: float, generators: tuple[torch.Generator, torch.Generator],
    image_weight: float = 1.0, timestep_sampling: TimestepSampling = "uniform",
) -> JointLoss:
    """The loss of one micro-batch: the weighted mean of its video and image parts (module docstring)."""
    if isinstance(mb, TrainBatch):
        mb = JointBatch(None, mb) if mb.is_image else JointBatch(mb, None)
    if image_weight <= 0:
        raise ValueError(f"image_weight must be > 0, got {image_weight}")
    video = image = None
    if mb.video is not None:
        video = part_objective(model, schedule, mb.video, null=null, drop_probs=drop_probs, gamma=gamma,
                               generator=generators[0], timestep_sampling=timestep_sampling)
    if mb.image is not None:
        image = part_objective(model, schedule, mb.image, null=null, drop_probs=drop_probs, gamma=gamma,
                               generator=generators[1], timestep_sampling=timestep_sampling)
    if image is None:  # videos only: exactly the single-part objective
        return JointLoss(video.loss, video.l_df, video.l_flow, video.l_df, None)
    if video is None:
        return JointLoss(image.loss, image.l_df, None, None, image.l_df)
    n_v, n_i = mb.video.latents.shape[0], image_weight * mb.image.latents.shape[0]
    total = n_v + n_i
    return JointLoss((n_v * video.loss + n_i * image.loss) / total, (n_v * video.l_df + n_i * image.l_df) / total,
                     video.l_flow, video.l_df, image.l_df)


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: NoiseSchedule,
    micro_batches: Sequence[TrainBatch | JointBatch],
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
    image_weight: float = 1.0,
    timestep_sampling: TimestepSampling = "uniform",
) -> StepResult:
    """One optimizer step over ``micro_batches`` (gradient accumulation; mean of their losses).

    A micro-batch is a :class:`TrainBatch` (videos, or images when ``is_image``) or a
    :class:`JointBatch`; see the module docstring for how its parts are weighted (``image_weight``).
    ``no_sync`` (DDP's ``model.no_sync``) skips the gradient all-reduce on all but the last micro-batch;
    ``timestep_sampling`` (``objective.timestep_sampling``) is how the training timesteps are drawn.
    """
    optimizer.zero_grad(set_to_none=True)
    n = len(micro_batches)
    totals: dict[str, float] = {"loss": 0.0, "l_df": 0.0, "l_flow": 0.0}
    parts: dict[str, list[float]] = {"l_df_video": [], "l_df_image": []}
    has_flow = False
    for i, mb in enumerate(micro_batches):
        gens = (step_generator(seed, rank, step, i), step_generator(seed, rank, step, i, stream=1))
        sync = contextlib.nullcontext() if (no_sync is None or i == n - 1) else no_sync()
        with sync, (autocast or contextlib.nullcontext()):
            out = joint_objective(model, schedule, mb, null=null, drop_probs=drop_probs, gamma=gamma,
                                  generators=gens, image_weight=image_weight, timestep_sampling=timestep_sampling)
            (out.loss / n).backward()
        totals["loss"] += float(out.loss.detach()) / n
        totals["l_df"] += float(out.l_df.detach()) / n
        if out.l_flow is not None:
            has_flow = True
            totals["l_flow"] += float(out.l_flow) / n
        for key in parts:
            if getattr(out, key) is not None:
                parts[key].append(float(getattr(out, key).detach()))
    params = [p for p in model.parameters() if p.requires_grad]
    if grad_clip > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    else:
        norm = math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in params if p.grad is not None))
    optimizer.step()
    means = {k: (sum(v) / len(v) if v else None) for k, v in parts.items()}
    return StepResult(totals["loss"], totals["l_df"], totals["l_flow"] if has_flow else None, norm, **means)


@torch.no_grad()
def validation_loss(
    model: nn.Module, schedule: NoiseSchedule, batch: TrainBatch, timesteps: Sequence[int], seed: int = 1234,
) -> dict[str, float]:
    """L_DF of ``batch`` at each fixed timestep with fixed noise (no dropout): ``{"val_loss": mean, "val_loss_t<k>": ...}``.

    The noise depends only on ``seed`` and the batch shape, so evaluations at different steps of a
    run (or of different runs) compare the same problems. Image batches (``is_image``) run the image
    path; their keys are ``val_image_loss`` / ``val_image_loss_t<k>``.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch.latents.shape, generator=gen).to(batch.latents)
    out: dict[str, float] = {}
    name = "val_image_loss" if batch.is_image else "val_loss"
    for t in timesteps:
        ts = torch.full((batch.latents.shape[0],), int(t), dtype=torch.long)
        res = part_objective(model, schedule, batch, timesteps=ts, noise=noise, with_flow=False)
        out[f"{name}_t{int(t)}"] = float(res.l_df)
    out[name] = sum(out.values()) / len(timesteps)
    model.train(was_training)
    return out


__all__ = ["EMA", "JointLoss", "StepResult", "joint_objective", "lr_at", "make_optimizer", "optimizer_step",
           "part_objective", "step_generator", "validation_loss"]
