"""Configuration of the Factorized-Dreamer video UNet (paper §3.2, the switches of Table 4).

The spatial architecture is not described here: it is whatever SD1.x ``UNet2DConditionModel`` the
video model is built from (a checkpoint folder, or one of the preset UNet configs below). This config
holds what the paper adds on top: the temporal layers, the T2I adapter (Eq. 2), PACA (Eq. 3), the
PredictNet (Eq. 4), and training switches (frozen groups, gradient checkpointing, attention backend).

Every switch changes which modules exist, not a flag read at run time:

- ``factorized=False`` (Table 4 row b, "direct T2V"): no adapter, no PACA.
- ``temporal_text_encoder="clip"`` (row c): the temporal cross-attention keys/values read CLIP text
  tokens (width = the UNet's ``cross_attention_dim``) instead of T5 tokens (width ``t5_dim``).
- ``predictnet=False`` (row d, and every stage before the last one, and inference): no PredictNet.

The noise-schedule switches of rows a/a* live in :mod:`fdreamer.schedule`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from fdreamer.config import nested, opt

# Parameter groups; every parameter of the model belongs to exactly one (see params.parameter_groups).
GROUPS: tuple[str, ...] = ("spatial", "temporal", "adapter", "paca", "predictnet")
AttentionBackend = Literal["auto", "sdpa", "xformers"]

# SD1.x UNet (runwayml/stable-diffusion-v1-5 unet/config.json): 859,520,964 parameters.
SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, norm_num_groups=32,
    cross_attention_dim=768, attention_head_dim=8,
)
SD15_UNET_PARAMETERS = 859_520_964


@dataclass
class AdapterConfig:
    """The T2I adapter (IP-Adapter style decoupled cross-attention), Eq. 2."""

    num_tokens: int = opt(4, "image tokens made from the CLIP image embedding (IP-Adapter base: 4)")
    scale: float = opt(1.0, "lambda of Eq. 2, weight of the image cross-attention (paper: 1)")
    kv_init: Literal["copy", "zero"] = opt(
        "copy",
        "init of the new key/value projections to_kv_adp: 'copy' the text to_k/to_v weights (IP-Adapter; "
        "presets use it: image keys start in the space the queries already attend to) or 'zero'",
    )
    token_init: Literal["zero", "default"] = opt(
        "zero",
        "init of the image-token LayerNorm affine: 'zero' makes the image tokens exactly 0 at init, so the "
        "image branch outputs 0 for ANY image and a fresh video model equals the image model even with "
        "kv_init='copy' (presets use it); 'default' = weight 1, bias 0 (IP-Adapter, perturbs from step 1)",
    )

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"adapter.num_tokens must be >= 1, got {self.num_tokens}")
        if self.kv_init not in ("copy", "zero"):
            raise ValueError(f"adapter.kv_init must be 'copy' or 'zero', got {self.kv_init!r}")
        if self.token_init not in ("zero", "default"):
            raise ValueError(f"adapter.token_init must be 'zero' or 'default', got {self.token_init!r}")


@dataclass
class PacaConfig:
    """Pixel-aware cross-attention (PASD), Eq. 3, in every up-sampling block."""

    init: Literal["zero", "default"] = opt(
        "zero",
        "init of each PACA output projection: 'zero' keeps a fresh model equal to the image model (presets "
        "use it: the pretrained spatial weights are not disturbed before the temporal layers learn "
        "anything); 'default' = PASD's non-zero init, which perturbs the UNet from step one",
    )

    def __post_init__(self) -> None:
        if self.init not in ("zero", "default"):
            raise ValueError(f"paca.init must be 'zero' or 'default', got {self.init!r}")


@dataclass
class TemporalConfig:
    """Temporal layers (VideoLDM / AnimateDiff style) inserted after the spatial layers."""

    ff_mult: int = opt(4, "hidden width of the temporal feed-forward, as a multiple of the channels")
    conv_kernel: int = opt(3, "frames covered by each temporal convolution (odd)")
    block: Literal["factorized", "swap"] = opt(
        "factorized",
        "layer after each spatial transformer: 'factorized' = frame self-attention + motion-caption "
        "cross-attention (paper); 'swap' = VideoFactory's swapped spatial/temporal cross-attention in 3-D "
        "windows, query alternating by block (fdreamer.models.swap)",
    )
    window: int = opt(4, "block='swap' only: spatial side of the 3-D windows (all frames x window x window)")

    def __post_init__(self) -> None:
        if self.ff_mult < 1:
            raise ValueError(f"temporal.ff_mult must be >= 1, got {self.ff_mult}")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"temporal.conv_kernel must be a positive odd number, got {self.conv_kernel}")
        if self.block not in ("factorized", "swap"):
            raise ValueError(f"temporal.block must be 'factorized' or 'swap', got {self.block!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"temporal.window must be an integer >= 1, got {self.window!r}")


@dataclass
class ModelConfig:
    """The Factorized-Dreamer video UNet on top of an SD1.x spatial UNet (paper §3.2, Table 4)."""

    factorized: bool = opt(
        True, "adapter (Eq. 2) + PACA (Eq. 3) present; false = the direct T2V variant of Table 4 (b)"
    )
    temporal_text_encoder: Literal["t5", "clip"] = opt(
        "t5",
        "tokens read by the temporal cross-attention: 't5' (paper) or 'clip' = the spatial CLIP text "
        "tokens (Table 4 (c)); changes only the key/value input width",
    )
    predictnet: bool = opt(
        False,
        "build the PredictNet flow head (Eq. 4); the paper adds it in the final stage (Table 4 (d) drops "
        "it); it never runs at inference",
    )
    t5_dim: int = opt(4096, "width of the T5 tokens (T5-XXL d_model 4096; tiny T5: 64)")
    image_embed_dim: int = opt(768, "width of the CLIP image embedding (ViT-L/14 projection 768; tiny: 32)")
    adapter: AdapterConfig = nested(AdapterConfig, "T2I adapter (Eq. 2)")
    paca: PacaConfig = nested(PacaConfig, "pixel-aware cross-attention (Eq. 3)")
    first_frame: Literal["paca", "paca_pos", "concat"] = opt(
        "paca",
        "how the conditioning frame's latent reaches the UNet (factorized models): 'paca' = PACA alone (the "
        "paper: cross-attention with no position information); 'paca_pos' = PACA with 2-D position encodings "
        "on its queries and keys, so a pixel can find its own location in the first frame; 'concat' = PACA + "
        "the latent repeated over frames and added through a zero-initialised conv beside conv_in (the same "
        "as zero-initialised extra conv_in input channels, as SVD / DynamiCrafter concatenate it; SD weights "
        "load unchanged and a fresh model still equals the image model)",
    )
    temporal: TemporalConfig = nested(TemporalConfig, "temporal layers")
    flow_channels: int = opt(2, "channels of the PredictNet output per consecutive frame pair (dx, dy)")
    fps_conditioning: bool = opt(
        False,
        "VideoCrafter-style fps conditioning: a sinusoidal embedding of the clip's frames per second through "
        "a small MLP (last layer zero-initialised) added to the timestep embedding; parameters fps_embedding.* "
        "(group temporal); not applied when the temporal layers are bypassed (images). false = no such module",
    )
    fps_default: float | None = opt(
        None,
        "fps_conditioning only: the fps a forward call that passes none is conditioned on (e.g. inference code "
        "that does not pass fps yet); null = such a call raises. Training always passes each clip's fps",
    )
    freeze: list[str] = opt(
        [],
        "parameter groups to freeze, among spatial, temporal, adapter, paca, predictnet (e.g. [spatial] "
        "trains motion only; VideoCrafter2-style spatial-only stage: [temporal])",
    )
    gradient_checkpointing: bool = opt(False, "recompute each spatial+temporal layer in backward")
    attention_backend: AttentionBackend = opt(
        "auto",
        "'auto' = xformers memory-efficient attention when installed and on CUDA, else torch SDPA; "
        "'sdpa' always torch SDPA; 'xformers' requires xformers (falls back to SDPA on CPU)",
    )

    def __post_init__(self) -> None:
        if self.temporal_text_encoder not in ("t5", "clip"):
            raise ValueError(f"temporal_text_encoder must be 't5' or 'clip', got {self.temporal_text_encoder!r}")
        if self.first_frame not in ("paca", "paca_pos", "concat"):
            raise ValueError(f"first_frame must be paca, paca_pos or concat, got {self.first_frame!r}")
        if self.first_frame != "paca" and not self.factorized:
            raise ValueError(f"first_frame={self.first_frame!r} needs factorized=true (the direct T2V model has no "
                             "first-frame condition)")
        if self.attention_backend not in ("auto", "sdpa", "xformers"):
            raise ValueError(f"attention_backend must be auto, sdpa or xformers, got {self.attention_backend!r}")
        for name in ("t5_dim", "image_embed_dim", "flow_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.fps_default is not None and not self.fps_default > 0:
            raise ValueError(f"fps_default must be > 0 (or null), got {self.fps_default}")
        unknown = [g for g in self.freeze if g not in GROUPS]
        if unknown:
            raise ValueError(f"freeze: unknown group(s) {unknown}; groups are {list(GROUPS)}")
        if len(set(self.freeze)) != len(self.freeze):
            raise ValueError(f"freeze lists a group twice: {self.freeze}")
        absent = [g for g in self.freeze if g not in self.present_groups()]
        if absent:
            raise ValueError(
                f"freeze names group(s) {absent} that this model does not have "
                f"(factorized={self.factorized}, predictnet={self.predictnet})"
            )

    def present_groups(self) -> tuple[str, ...]:
        """The parameter groups this configuration builds."""
        out = ["spatial", "temporal"]
        if self.factorized:
            out += ["adapter", "paca"]
        if self.predictnet:
            out.append("predictnet")
        return tuple(out)

    @classmethod
    def tiny(cls, **overrides: Any) -> ModelConfig:
        """Preset for ``fdreamer.toy.tiny_models``: T5 d_model 64, CLIP image projection 32."""
        return cls(**{"t5_dim": 64, "image_embed_dim": 32, **overrides})

    @classmethod
    def sd15(cls, **overrides: Any) -> ModelConfig:
        """Preset for SD1.5 + T5-XXL (4096) + CLIP ViT-L/14 image embeddings (768)."""
        return cls(**{"t5_dim": 4096, "image_embed_dim": 768, **overrides})

    def with_(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


def preset_unet_config(name: str) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` kwargs of preset ``name`` ('tiny' or 'sd15')."""
    if name == "tiny":
        from fdreamer.toy.tiny_models import TINY_UNET_CONFIG

        return dict(TINY_UNET_CONFIG)
    if name == "sd15":
        return dict(SD15_UNET_CONFIG)
    raise ValueError(f"unknown preset {name!r}; presets are {list(PRESETS)}")


def preset_model_config(name: str, **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of preset ``name`` with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets are {list(PRESETS)}")
    return getattr(ModelConfig, name)(**overrides)


PRESETS: tuple[str, ...] = ("tiny", "sd15")
