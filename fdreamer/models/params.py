"""Parameter groups of the video UNet: which parameters are spatial, temporal, adapter, PACA, PredictNet.

Groups are decided by parameter name (the model's module layout is fixed):

- ``unet.*``: the SD spatial UNet -> ``spatial``, except the adapter's ``....processor.to_k_adp`` /
  ``to_v_adp`` which live in the spatial cross-attention layers -> ``adapter``;
- ``image_proj.*`` -> ``adapter``; ``temporal.*`` and ``fps_embedding.*`` (the optional fps
  conditioning, video-only like the temporal layers) -> ``temporal``; ``paca.*`` -> ``paca``;
- ``predictnet.*`` (its copied up path included) -> ``predictnet``.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from fdreamer.models.config import GROUPS

_TOP_LEVEL = {"temporal": "temporal", "fps_embedding": "temporal", "image_proj": "adapter", "paca": "paca",
              "predictnet": "predictnet"}


def group_of(name: str) -> str:
    """The group of parameter ``name`` (a ``named_parameters()`` name of the video UNet)."""
    top = name.split(".", 1)[0]
    if top == "unet":
        return "adapter" if ".processor." in name else "spatial"
    if top in _TOP_LEVEL:
        return _TOP_LEVEL[top]
    raise ValueError(f"parameter {name!r} belongs to no group (unknown top-level module {top!r})")


def parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Partition all parameters of ``model`` into :data:`GROUPS` (every group key present, maybe empty)."""
    out: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        out[group_of(name)].append((name, p))
    return out


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters per group plus ``total`` (works on the meta device)."""
    counts = {g: sum(p.numel() for _, p in ps) for g, ps in parameter_groups(model).items()}
    counts["total"] = sum(counts[g] for g in GROUPS)
    return counts


def apply_freeze(model: nn.Module, frozen: Iterable[str]) -> None:
    """``requires_grad = False`` for the groups in ``frozen``, True for all others."""
    frozen = set(frozen)
    unknown = frozen - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown parameter group(s) {sorted(unknown)}; groups are {list(GROUPS)}")
    for group, params in parameter_groups(model).items():
        for _, p in params:
            p.requires_grad_(group not in frozen)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should get."""
    return [p for p in model.parameters() if p.requires_grad]
