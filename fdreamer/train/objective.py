"""The training objective (paper §3.4): Eq. 7 under the §3.3 schedule, plus γ·L_flow (Eq. 4).

One function, :func:`diffusion_objective`, so the training job and validation compute the same thing:

    t ~ U{0..N-1} or logit-normal (or given),  ε ~ N(0, I)
    x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε                      (NoiseSchedule.add_noise)
    L_DF = ||target - f_θ(x_t, t, c)||²,  target = ε (Eq. 7) or v = sqrt(ᾱ_t)·ε - sqrt(1-ᾱ_t)·x0
    L = L_DF + γ·||flow - p(x_t, t, c)||²                   (γ = 1; only when the PredictNet exists)

Classifier-free-guidance dropout is applied to the conditions before the forward when null conditions
are given (text only / image only / both, :func:`fdreamer.models.sample_drop_masks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from fdreamer.device import to_device
from fdreamer.models.conditions import Conditions, drop_conditions, sample_drop_masks
from fdreamer.train.losses import FLOW_LOSS_WEIGHT, diffusion_loss, flow_loss, total_loss
from fdreamer.schedule import NoiseSchedule


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # L = L_DF + γ·L_flow (or L_DF)
    l_df: torch.Tensor
    l_flow: torch.Tensor | None
    timesteps: torch.Tensor  # [B] int64, indices 0..N-1 (paper t = index + 1)


TimestepSampling = Literal["uniform", "logit_normal"]
TIMESTEP_SAMPLINGS: tuple[str, ...] = get_args(TimestepSampling)


def sample_timesteps(
    batch: int, num_train_timesteps: int, generator: torch.Generator | None = None,
    sampling: TimestepSampling = "uniform",
) -> torch.Tensor:
    """Timestep indices ``[B]`` in ``0..N-1`` (the paper's t = 1..N), drawn from ``generator``.

    - ``uniform``: ``t ~ U{0..N-1}`` (paper, DDPM);
    - ``logit_normal``: ``t = floor(N · sigmoid(u))``, ``u ~ N(0, 1)`` (SD3's logit-normal(0, 1) over
      the fraction t/N of the diffusion): P(t < k) = Φ(logit(k / N)), so the middle timesteps are drawn
      more often than either end (72.8 % land in [N/4, 3N/4) against 50 % for uniform).
    """
    if sampling == "uniform":
        return torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    if sampling == "logit_normal":
        u = torch.randn(batch, generator=generator, dtype=torch.float64)
        return (torch.sigmoid(u) * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)
    raise ValueError(f"timestep sampling must be one of {list(TIMESTEP_SAMPLINGS)}, got {sampling!r}")


def diffusion_objective(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    latents: torch.Tensor,
    cond: Conditions,
    *,
    flow: torch.Tensor | None = None,
    gamma: float = FLOW_LOSS_WEIGHT,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    null: Conditions | None = None,
    drop_probs: tuple[float, float, float] = (0.05, 0.05, 0.05),
    generator: torch.Generator | None = None,
    timestep_sampling: TimestepSampling = "uniform",
) -> ObjectiveOutput:
    """The §3.4 loss of one batch of clean latents ``[B, C, T, h, w]``.

    ``flow`` ``[B, 2, T-1, h, w]`` (latent resolution) enables the γ·L_flow term; the model must then
    have its PredictNet. ``null`` (from :func:`fdreamer.models.null_conditions`) enables CFG dropout
    with ``drop_probs = (text only, image only, both)``. Timesteps not given are drawn from
    ``generator`` by :func:`sample_timesteps` with ``timestep_sampling``.
    """
    if latents.ndim != 5:
        raise ValueError(f"latents must be [B, C, T, h, w], got {tuple(latents.shape)}")
    b = latents.shape[0]
    if cond.batch_size != b:
        raise ValueError(f"conditions have batch {cond.batch_size}, latents {b}")
    if timesteps is None:
        timesteps = sample_timesteps(b, schedule.num_train_timesteps, generator, timestep_sampling)
    if timesteps.device.type == "cpu":
        schedule.check_timesteps(timesteps)  # on the CPU, where they are drawn: no host sync
    # CPU-drawn numbers go to the device without a stream sync (fdreamer.device.to_device: pinned, non-blocking)
    timesteps = to_device(timesteps.long(), latents.device)
    if noise is None:
        noise = to_device(torch.randn(latents.shape, generator=generator, dtype=latents.dtype), latents.device)
    if null is not None:
        drop_text, drop_image = sample_drop_masks(b, *drop_probs, generator=generator)
        drop_text, drop_image = to_device((drop_text, drop_image), latents.device)
        cond = drop_conditions(cond, null, drop_text, drop_image)
    x_t = schedule.add_noise(latents, noise, timesteps)
    target = schedule.training_target(latents, noise, timesteps)
    out = model(x_t, timesteps, **cond.as_kwargs(), return_flow=flow is not None)
    l_df = diffusion_loss(out.sample, target)
    l_flow = None
    if flow is not None:
        if out.flow is None:
            raise ValueError("flow targets were given but the model has no PredictNet (ModelConfig.predictnet)")
        l_flow = flow_loss(out.flow, flow.to(out.flow))
    return ObjectiveOutput(total_loss(l_df, l_flow, gamma), l_df, l_flow, timesteps)
