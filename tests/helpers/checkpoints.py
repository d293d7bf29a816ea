"""The one tiny-checkpoint builder of the tests and benchmarks: a fresh tiny video UNet saved in the
checkpoint layout (:func:`fdreamer.checkpoint.save_model`) beside tiny encoders, 8×64×64 at 6 fps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_META = {"num_frames": 8, "size": 64, "fps": 6, "preset": "tiny"}


def tiny_schedule(**overrides: Any):
    """The tiny clip's schedule (Eq. 5 gives s > 1 for 8×64×64; the presets use ``shift_scale`` 0.5)."""
    from fdreamer.schedule import ScheduleConfig

    return ScheduleConfig(**{"num_frames": 8, "height": 64, "width": 64, "shift_scale": 0.5, **overrides})


def tiny_checkpoint(out: Path, models_dir: Path, *, model: Any = None, model_cfg: Any = None, schedule: Any = None,
                    conditioned: bool = False, seed: int = 0, meta: dict[str, Any] | None = None) -> Path:
    """Save a tiny checkpoint to ``out``. ``conditioned``: non-zero adapter tokens and PACA (the presets
    start them at 0) so the image conditions change the output; ``model_cfg`` overrides it, ``model``
    (an already built video UNet) overrides both."""
    from fdreamer.checkpoint import save_model
    from fdreamer.encoders import EncoderConfig
    from fdreamer.models import AdapterConfig, FactorizedDreamerUNet, ModelConfig, PacaConfig

    if model_cfg is None and conditioned:
        model_cfg = ModelConfig.tiny(adapter=AdapterConfig(token_init="default"), paca=PacaConfig(init="default"))
    if model is None:
        model = FactorizedDreamerUNet.from_preset("tiny", model_cfg, seed=seed)
    return save_model(out, model, schedule or tiny_schedule(), EncoderConfig.tiny(models_dir),
                      meta={**TINY_META, **(meta or {})})
