"""Optional fps conditioning of the video UNet (VideoCrafter1/2; ``ModelConfig.fps_conditioning``).

As VideoCrafter does: the clip's frames per second go through the same sinusoidal embedding as the
diffusion timestep (the spatial UNet's own ``time_proj``, width ``block_out_channels[0]``), then a
small MLP ``Linear -> SiLU -> Linear`` to the time-embedding width, and the result is ADDED to the
timestep embedding that every ResNet reads. The last linear layer is zero-initialised (weight and
bias), so a freshly added embedding changes nothing: a model with ``fps_conditioning=True`` computes
exactly what the same weights without it compute, until training moves that layer.

The module is video-only: :class:`~fdreamer.models.unet.FactorizedDreamerUNet` skips it when the
temporal layers are bypassed (images, ``temporal=False``), and its parameters (``fps_embedding.*``)
belong to the ``temporal`` group (frozen with the temporal layers in a spatial-only stage).
"""

from __future__ import annotations

import torch
from torch import nn

from fdreamer.device import to_device


class FpsEmbedding(nn.Module):
    """The MLP on the sinusoidal fps embedding ``[B, in_dim]`` -> ``[B, E]``; outputs zero at initialisation."""

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(embed_dim, embed_dim)
        nn.init.zeros_(self.linear_2.weight)
        nn.init.zeros_(self.linear_2.bias)

    def forward(self, sinusoid: torch.Tensor) -> torch.Tensor:
        """``sinusoid`` = the UNet's ``time_proj(fps)`` ``[B, in_dim]`` -> ``[B, E]``."""
        if sinusoid.ndim != 2 or sinusoid.shape[1] != self.linear_1.in_features:
            raise ValueError(f"fps sinusoid must be [B, {self.linear_1.in_features}], got {tuple(sinusoid.shape)}")
        return self.linear_2(self.act(self.linear_1(sinusoid)))


def fps_tensor(fps: torch.Tensor | float | int | None, batch: int, default: float | None,
               device: torch.device, *, check_values: bool = True) -> torch.Tensor:
    """``fps`` (a number, ``[B]`` or None -> ``default``) as float32 ``[batch]`` on ``device``; all > 0
    (checked when ``check_values``: reading the values of a CUDA tensor is a host sync, so the model
    checks them on the CPU, and on an accelerator once, see ``FactorizedDreamerUNet._value_checks_due``)."""
    if fps is None:
        if default is None:
            raise ValueError("this model is fps-conditioned (model.fps_conditioning=true): pass fps (a number or a "
                             "[B] tensor of frames per second), or set model.fps_default for callers that cannot")
        fps = default
    if isinstance(fps, bool) or not isinstance(fps, (int, float, torch.Tensor)):
        raise TypeError(f"fps must be a number or a tensor, got {type(fps).__name__}")
    t = torch.as_tensor(fps, dtype=torch.float32)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"fps must be a scalar or shape [{batch}], got {tuple(t.shape)}")
    if (check_values or t.device.type == "cpu") and not bool((t > 0).all()):
        raise ValueError(f"fps must be > 0 for every clip, got {t.tolist()}")
    return to_device(t, device)


__all__ = ["FpsEmbedding", "fps_tensor"]
