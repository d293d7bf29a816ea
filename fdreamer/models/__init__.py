"""The Factorized-Dreamer network (arXiv 2408.10119 §3.2): a video UNet on an SD1.x spatial backbone.

Public API::

    from fdreamer.models import ModelConfig, FactorizedDreamerUNet, parameter_groups
    model = FactorizedDreamerUNet.from_pretrained_unet("models/tiny/unet", ModelConfig.tiny())
    out = model(latents, t, clip_text, image_embed=img, first_frame=y, t5_tokens=t5, t5_mask=mask)

Never imports Ray.
"""

from fdreamer.models.conditions import (
    Conditions,
    drop_conditions,
    null_conditions,
    sample_drop_masks,
)
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
