"""Loss probes: does a model read a condition? Cheaper and sharper than sampling videos.

For the same clips, fixed noise and fixed timesteps, the denoising loss is computed under several
condition sets: the true one and altered ones. A model that uses the condition has a clearly lower loss
with the true one; a model that ignores it scores all alike.

- **Caption probe**: the clip's caption, and the same caption naming each of the 7 other motions
  (``true_rank_mean`` near 0 = always read, ~3.5 = chance, of 0-7).
- **First-frame probe**: the clip's own conditioning frame (latent + CLIP image embedding), and the frames
  of other clips of the batch (:func:`swapped_first_frames`). An image-to-video model that places the
  subject where the first frame shows it ranks the true frame first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fdreamer.models.conditions import Conditions


def condition_losses(model: Any, schedule: Any, x0: torch.Tensor, noise: torch.Tensor, conds: Sequence[Conditions],
                     timesteps: Sequence[int]) -> torch.Tensor:
    """``[B, M]``: the denoising loss of each clip of ``x0`` ``[B, C, T, h, w]`` (fixed ``noise``) under each
    of the M condition sets ``conds`` (each for the whole batch), averaged over ``timesteps``."""
    out = torch.zeros(x0.shape[0], len(conds))
    with torch.no_grad():
        for t in timesteps:
            tt = torch.full((x0.shape[0],), int(t))
            x_t, target = schedule.add_noise(x0, noise, tt), schedule.training_target(x0, noise, tt)
            for j, cond in enumerate(conds):
                pred = model(x_t, tt, **cond.as_kwargs()).sample
                out[:, j] += ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3, 4)) / len(timesteps)
    return out


def rank_stats(losses: torch.Tensor, truth: Sequence[int]) -> dict[str, float]:
    """Rank of the true condition's loss among the M (0 = lowest), the share of clips where it is lowest,
    chance, and the mean gap (mean of the wrong ones - true) from ``losses`` ``[B, M]``."""
    idx = torch.arange(len(truth))
    true = losses[idx, torch.as_tensor(list(truth))]
    ranks = (losses < true[:, None]).sum(1).float()
    m = losses.shape[1]
    gap = (losses.sum(1) - true) / (m - 1) - true
    return {"true_rank_mean": float(ranks.mean()), "true_best_fraction": float((ranks == 0).float().mean()),
            "chance_rank": (m - 1) / 2, "gap_mean": float(gap.mean())}


def swapped_first_frames(cond: Conditions, k: int) -> list[Conditions]:
    """``[cond, cond with clip i's image conditions taken from clip i+1, ..., from clip i+k]`` (batch rolled;
    text conditions kept). The true set is index 0. Needs ``k < batch size``."""
    b = cond.batch_size
    if cond.first_frame is None or cond.image_embed is None:
        raise ValueError("swapped_first_frames: the conditions have no first frame / image embedding")
    if not 0 < k < b:
        raise ValueError(f"swapped_first_frames: k must be in [1, {b - 1}] for a batch of {b}, got {k}")
    out = [cond]
    for s in range(1, k + 1):
        out.append(Conditions(**{**cond.as_kwargs(), "first_frame": cond.first_frame.roll(-s, 0),
                                 "image_embed": cond.image_embed.roll(-s, 0)}))
    return out


__all__ = ["condition_losses", "rank_stats", "swapped_first_frames"]
