"""The Factorized-Dreamer network (arXiv 2408.10119 §3.2): a video UNet on an SD1.x spatial backbone.

Public API::

    from fdreamer.models import ModelConfig, FactorizedDreamerUNet, parameter_groups
    model = FactorizedDreamerUNet.from_pretrained_unet("models/tiny/unet", ModelConfig.tiny())
    out = model(latents, t, clip_text, image_embed=img, first_frame=y, t5_tokens=t5, t5_mask=mask)

Never imports Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names resolve on first use (PEP 562): importing ``fdreamer.models.config`` or ``.conditions`` (configs,
# data loaders, the training driver, Ray Data tasks) must not import diffusers (~10 s of CPU per process).
_SOURCES = {
    "conditions": ("Conditions", "drop_conditions", "null_conditions", "sample_drop_masks"),
    "config": ("GROUPS", "PRESETS", "SD15_UNET_CONFIG", "SD15_UNET_PARAMETERS", "AdapterConfig", "ModelConfig",
               "PacaConfig", "TemporalConfig", "preset_model_config", "preset_unet_config"),
    "params": ("apply_freeze", "count_parameters", "group_of", "parameter_groups", "trainable_parameters"),
    "unet": ("FactorizedDreamerOutput", "FactorizedDreamerUNet"),
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}

if TYPE_CHECKING:
    from fdreamer.models.conditions import Conditions, drop_conditions, null_conditions, sample_drop_masks
    from fdreamer.models.config import (
        GROUPS,
        PRESETS,
        SD15_UNET_CONFIG,
        SD15_UNET_PARAMETERS,
        AdapterConfig,
        ModelConfig,
        PacaConfig,
        TemporalConfig,
        preset_model_config,
        preset_unet_config,
    )
    from fdreamer.models.params import (
        apply_freeze,
        count_parameters,
        group_of,
        parameter_groups,
        trainable_parameters,
    )
    from fdreamer.models.unet import FactorizedDreamerOutput, FactorizedDreamerUNet


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'fdreamer.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fdreamer.models.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "GROUPS",
    "PRESETS",
    "SD15_UNET_CONFIG",
    "SD15_UNET_PARAMETERS",
    "AdapterConfig",
    "Conditions",
    "FactorizedDreamerOutput",
    "FactorizedDreamerUNet",
    "ModelConfig",
    "PacaConfig",
    "TemporalConfig",
    "apply_freeze",
    "count_parameters",
    "drop_conditions",
    "group_of",
    "null_conditions",
    "parameter_groups",
    "preset_model_config",
    "preset_unet_config",
    "sample_drop_masks",
    "trainable_parameters",
]
