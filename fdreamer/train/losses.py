"""Training losses of Factorized-Dreamer (paper §3.2 Eq. 4, §3.4 Eq. 7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FLOW_LOSS_WEIGHT = 1.0  # γ of §3.4


def _mse(pred: torch.Tensor, target: torch.Tensor, what: str) -> torch.Tensor:
    if pred.shape != target.shape:
        raise ValueError(f"{what}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return F.mse_loss(pred.float(), target.float())


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``L_DF`` of Eq. 7: mean squared error between the network output and its target (ε or v)."""
    return _mse(pred, target, "diffusion_loss")


def flow_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``L_flow`` of Eq. 4: mean squared error between predicted and true flow, ``[B, 2, T-1, h, w]``."""
    if pred.ndim != 5:
        raise ValueError(f"flow_loss: expected [B, 2, T-1, h, w], got {tuple(pred.shape)}")
    return _mse(pred, target, "flow_loss")


def total_loss(
    l_df: torch.Tensor, l_flow: torch.Tensor | None = None, gamma: float = FLOW_LOSS_WEIGHT
) -> torch.Tensor:
    """``L = L_DF + γ·L_flow`` (§3.4, γ = 1); ``l_flow`` None (no PredictNet) gives ``L_DF``."""
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    return l_df if l_flow is None else l_df + gamma * l_flow
