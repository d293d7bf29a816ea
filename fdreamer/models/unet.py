"""The Factorized-Dreamer video UNet (paper §3.2, Fig. 2): an SD1.x UNet made into a TI2V model.

:class:`FactorizedDreamerUNet` owns a diffusers ``UNet2DConditionModel`` (the spatial backbone, its
weights unchanged) and walks its blocks itself (:mod:`fdreamer.models.runner`), folding frames into the
batch for every spatial layer (``'b c f h w -> (b f) c h w'``) and inserting after them:

- temporal layers (:mod:`~fdreamer.models.temporal`), cross-attending to T5 (or CLIP) motion tokens;
- the T2I adapter, Eq. 2 (:mod:`~fdreamer.models.adapter`), in every spatial cross-attention;
- PACA, Eq. 3 (:mod:`~fdreamer.models.paca`), after every up-block ResNet;
- optionally the PredictNet, Eq. 4 (:mod:`~fdreamer.models.predictnet`), on the same skip features;
- optionally an fps embedding added to the timestep embedding (:mod:`~fdreamer.models.fps`,
  ``fps_conditioning``; VideoCrafter).

All new output projections start at zero (with the preset init choices), so a freshly built model
reproduces the image UNet frame by frame.

``forward(..., temporal=False)`` is the image path of joint image-video training (VideoCrafter2):
every temporal layer and the fps embedding are skipped (not run on T=1: not called at all), each
frame goes through the spatial layers alone, and the image conditions become optional — without them
the adapter branch gets zero image tokens (bias-free keys/values of zeros: it adds exactly 0, Eq. 1)
and PACA is skipped, i.e. the spatial UNet as the T2I step of the pipeline computes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from einops import rearrange, repeat
from torch import nn

from fdreamer.device import to_device
from fdreamer.models.adapter import (
    ImageProjection,
    install_processors,
    set_adapter_scale,
)
from fdreamer.models.attention import check_backend
from fdreamer.models.config import ModelConfig, preset_model_config, preset_unet_config
from fdreamer.models.fps import FpsEmbedding, fps_tensor
from fdreamer.models.paca import Paca
from fdreamer.models.params import apply_freeze
from fdreamer.models.predictnet import PredictNet
from fdreamer.models.runner import StepContext, run_down, run_mid, run_up
from fdreamer.models.temporal import build_temporal_layers

_DOWN_TYPES = {"CrossAttnDownBlock2D", "DownBlock2D"}
_UP_TYPES = {"CrossAttnUpBlock2D", "UpBlock2D"}


@dataclass
class FactorizedDreamerOutput:
    """``sample`` [B, C, T, h, w]; ``flow`` [B, 2, T-1, h, w] when the PredictNet ran, else None."""

    sample: torch.Tensor
    flow: torch.Tensor | None = None


def check_sd_unet(unet: UNet2DConditionModel) -> None:
    """Raise ``ValueError`` unless ``unet`` has the SD1.x layout the video model walks."""
    c = unet.config
    problems = []
    if set(c.down_block_types) - _DOWN_TYPES or set(c.up_block_types) - _UP_TYPES:
        problems.append(f"block types {c.down_block_types}/{c.up_block_types} (need {_DOWN_TYPES}/{_UP_TYPES})")
    if c.mid_block_type != "UNetMidBlock2DCrossAttn":
        problems.append(f"mid_block_type {c.mid_block_type!r} (need UNetMidBlock2DCrossAttn)")
    for key in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim",
                "time_embedding_act_fn"):
        if getattr(c, key, None) is not None:
            problems.append(f"{key}={getattr(c, key)!r} (need None)")
    if c.center_input_sample or c.time_embedding_type != "positional" or c.dual_cross_attention:
        problems.append("center_input_sample/time_embedding_type/dual_cross_attention differ from SD1.x")
    if not isinstance(c.cross_attention_dim, int):
        problems.append(f"per-block cross_attention_dim {c.cross_attention_dim} (need one int)")
    if problems:
        raise ValueError("not an SD1.x-layout UNet2DConditionModel: " + "; ".join(problems))


class FactorizedDreamerUNet(nn.Module):
    """Video UNet: ``[B, C, T, h, w]`` noisy latents -> ``[B, C, T, h, w]`` prediction (+ flow).

    Takes ownership of ``unet`` (its attention processors are replaced by the video model's; its
    weights are kept). Build with :meth:`from_unet2d`, :meth:`from_pretrained_unet` or
    :meth:`from_preset`.
    """

    def __init__(self, unet: UNet2DConditionModel, cfg: ModelConfig) -> None:
        super().__init__()
        check_sd_unet(unet)
        check_backend(cfg.attention_backend)
        self.cfg = cfg
        self.unet = unet
        ref = next(unet.parameters())
        self.cross_attention_dim: int = unet.config.cross_attention_dim
        self.temporal_context_dim = cfg.t5_dim if cfg.temporal_text_encoder == "t5" else self.cross_attention_dim
        with torch.device(ref.device):  # build new layers where the UNet lives (meta: no memory)
            install_processors(unet, cfg.adapter if cfg.factorized else None, cfg.attention_backend)
            self.temporal = build_temporal_layers(unet, cfg.temporal, self.temporal_context_dim, cfg.attention_backend)
            self.image_proj: ImageProjection | None = None
            self.paca: Paca | None = None
            if cfg.factorized:
                self.image_proj = ImageProjection(
                    cfg.image_embed_dim, self.cross_attention_dim, cfg.adapter.num_tokens, cfg.adapter.token_init
                )
                self.paca = Paca(unet, cfg.paca.init, cfg.attention_backend, cfg.first_frame)
            self.predictnet: PredictNet | None = None
            self.fps_embedding: FpsEmbedding | None = None
            if cfg.fps_conditioning:  # sinusoid width = time_proj's, output = the time embedding's width
                self.fps_embedding = FpsEmbedding(unet.config.block_out_channels[0],
                                                  unet.time_embedding.linear_2.out_features)
        self.to(ref.dtype)
        if cfg.predictnet:
            self.attach_predictnet()
        self.gradient_checkpointing = cfg.gradient_checkpointing
        apply_freeze(self, cfg.freeze)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_unet2d(cls, unet2d: UNet2DConditionModel, cfg: ModelConfig) -> FactorizedDreamerUNet:
        """Video model whose spatial weights are ``unet2d``'s (taken over, not copied)."""
        return cls(unet2d, cfg)

    @classmethod
    def from_pretrained_unet(
        cls, path: str | Path, cfg: ModelConfig, torch_dtype: torch.dtype | None = None
    ) -> FactorizedDreamerUNet:
        """Load an SD-format ``unet/`` folder (or an SD root holding one); never downloads."""
        folder = Path(path)
        if (folder / "unet" / "config.json").is_file():
            folder = folder / "unet"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no UNet2DConditionModel config.json (nor unet/config.json)")
        kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        unet = UNet2DConditionModel.from_pretrained(folder, local_files_only=True, **kwargs)
        return cls(unet, cfg)

    @classmethod
    def from_preset(
        cls, name: str, cfg: ModelConfig | None = None, *, device: str | torch.device | None = None,
        seed: int | None = None,
    ) -> FactorizedDreamerUNet:
        """Randomly initialised preset ('tiny' or 'sd15'); ``device='meta'`` allocates nothing."""
        cfg = cfg if cfg is not None else preset_model_config(name)
        unet_kwargs = preset_unet_config(name)
        with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
            if seed is not None:
                torch.manual_seed(seed)
            return cls(UNet2DConditionModel(**unet_kwargs), cfg)

    def image_unet(self) -> UNet2DConditionModel:
        """The spatial UNet as a plain diffusers image model: a ``UNet2DConditionModel`` that *shares* this
        model's spatial parameters (no copy) with diffusers' default attention processors, so the adapter
        branch of Eq. 2 is absent and it computes exactly Eq. 1, as the pretrained T2I model does."""
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(self.unet.config)
        state = {k: v for k, v in self.unet.state_dict(keep_vars=True).items() if ".processor." not in k}
        unet.load_state_dict(state, strict=True, assign=True)
        return unet.eval()

    def attach_predictnet(self) -> None:
        """(Re)build the PredictNet from the current up-path weights (the paper's final stage)."""
        ref = next(self.unet.parameters())
        with torch.device(ref.device):
            pn = PredictNet(self.unet, self.temporal.up, self.paca.up if self.paca is not None else None,
                            self.cfg.flow_channels)
        self.predictnet = pn.to(ref.dtype)
        if not self.cfg.predictnet:
            self.cfg = self.cfg.with_(predictnet=True)
        apply_freeze(self, self.cfg.freeze)  # the deep copy inherited the up path's requires_grad flags

    # ------------------------------------------------------------------ switches

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute every spatial+temporal unit in backward (``torch.utils.checkpoint``)."""
        self.gradient_checkpointing = enabled

    def set_adapter_scale(self, scale: float) -> None:
        """λ of Eq. 2 in every adapter cross-attention."""
        if not self.cfg.factorized:
            raise ValueError("set_adapter_scale: this model has no adapter (factorized=False)")
        set_adapter_scale(self, scale)

    def set_attention_backend(self, backend: str) -> None:
        """Switch every attention the video model runs between 'auto', 'sdpa' and 'xformers'."""
        check_backend(backend)
        for m in self.modules():
            for proc in (m, getattr(m, "processor", None)):
                if proc is not None and hasattr(proc, "attention_backend"):
                    proc.attention_backend = backend

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ forward

    def _timesteps(self, timestep: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
        if isinstance(timestep, bool) or not isinstance(timestep, (int, float, torch.Tensor)):
            raise TypeError(f"timestep must be an int/float or a tensor, got {type(timestep).__name__}")
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(timestep, dtype=torch.int64 if isinstance(timestep, int) else torch.float32)
        if timestep.dtype == torch.float64:
            timestep = timestep.float()  # no float64 anywhere (bf16/MPS safe)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        if timestep.shape != (batch,):
            raise ValueError(f"timestep must be a scalar or shape [{batch}], got {tuple(timestep.shape)}")
        return to_device(timestep, device)  # a CPU scalar per sampling step: no stream sync

    def _value_checks_due(self, device: torch.device) -> bool:
        """Whether this forward checks tensor VALUES (a T5 mask with a real token per sample, fps > 0), not
        only shapes: always on the CPU (free); on an accelerator, where reading a value is a host sync
        that stalls the step, only in the model's first forward there (the data's layout does not change
        from one step to the next)."""
        if device.type == "cpu":
            return True
        checked = self.__dict__.setdefault("_values_checked_on", set())
        if device in checked:
            return False
        checked.add(device)
        return True

    def _check_inputs(
        self, sample: torch.Tensor, text_tokens: torch.Tensor, image_embed: torch.Tensor | None,
        first_frame: torch.Tensor | None, t5_tokens: torch.Tensor | None, t5_mask: torch.Tensor | None,
        temporal: bool = True, *, check_values: bool = True,
    ) -> None:
        c_in = self.unet.config.in_channels
        if sample.ndim != 5 or sample.shape[1] != c_in or not sample.is_floating_point():
            raise ValueError(f"sample must be float [B, {c_in}, T, h, w], got {sample.dtype} {tuple(sample.shape)}")
        b, _, _, h, w = sample.shape
        d = self.cross_attention_dim
        if text_tokens.ndim != 3 or text_tokens.shape[0] != b or text_tokens.shape[2] != d:
            raise ValueError(f"text_tokens must be [{b}, L, {d}] (CLIP text hidden states), got {tuple(text_tokens.shape)}")
        if self.cfg.factorized:
            if image_embed is None or first_frame is None:
                if temporal or image_embed is not None or first_frame is not None:
                    raise ValueError("factorized model needs image_embed and first_frame (null_conditions() gives "
                                     "nulls); only the image path (temporal=False) may leave out both")
                return self._check_t5(b, t5_tokens, t5_mask, temporal, check_values)
            if image_embed.shape != (b, self.cfg.image_embed_dim):
                raise ValueError(f"image_embed must be [{b}, {self.cfg.image_embed_dim}], got {tuple(image_embed.shape)}")
            if first_frame.shape != (b, self.unet.config.out_channels, h, w):
                raise ValueError(
                    f"first_frame must be [{b}, {self.unet.config.out_channels}, {h}, {w}], got {tuple(first_frame.shape)}"
                )
        elif image_embed is not None or first_frame is not None:
            raise ValueError("factorized=False (direct T2V): the model has no adapter/PACA; pass no image_embed/first_frame")
        self._check_t5(b, t5_tokens, t5_mask, temporal, check_values)

    def _check_t5(self, b: int, t5_tokens: torch.Tensor | None, t5_mask: torch.Tensor | None, temporal: bool,
                  check_values: bool = True) -> None:
        if not temporal and t5_tokens is None:
            if t5_mask is not None:
                raise ValueError("t5_mask given without t5_tokens")
            return  # the image path runs no temporal cross-attention
        if self.cfg.temporal_text_encoder == "clip":
            if t5_tokens is not None or t5_mask is not None:
                raise ValueError("temporal_text_encoder='clip': the temporal layers read text_tokens; pass no t5_tokens")
            return
        if t5_tokens is None:
            raise ValueError("temporal_text_encoder='t5': t5_tokens [B, L, t5_dim] are required")
        if t5_tokens.ndim != 3 or t5_tokens.shape[0] != b or t5_tokens.shape[2] != self.cfg.t5_dim:
            raise ValueError(f"t5_tokens must be [{b}, L, {self.cfg.t5_dim}], got {tuple(t5_tokens.shape)}")
        if t5_mask is not None:
            if t5_mask.dtype != torch.bool or t5_mask.shape != t5_tokens.shape[:2]:
                raise ValueError(f"t5_mask must be bool {tuple(t5_tokens.shape[:2])}, got {t5_mask.dtype} {tuple(t5_mask.shape)}")
            if check_values and not bool(t5_mask.any(dim=1).all()):
                raise ValueError("t5_mask: every sample needs at least one real token (T5 always emits </s>)")

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        text_tokens: torch.Tensor,
        image_embed: torch.Tensor | None = None,
        first_frame: torch.Tensor | None = None,
        t5_tokens: torch.Tensor | None = None,
        t5_mask: torch.Tensor | None = None,
        *,
        return_flow: bool | None = None,
        temporal: bool = True,
        fps: torch.Tensor | float | None = None,
    ) -> FactorizedDreamerOutput:
        """Predict ε (or v) for noisy video latents; optionally the PredictNet's flow (Eq. 4).

        Args:
            sample: noisy latents ``[B, C, T, h, w]``.
            timestep: int/float scalar or tensor ``[B]``.
            text_tokens: CLIP text hidden states ``[B, 77, D_text]`` (spatial cross-attention, Eq. 1/2).
            image_embed: CLIP image embedding ``[B, P]`` (adapter, Eq. 2); factorized models only.
            first_frame: VAE latent of the conditioning frame ``[B, C, h, w]`` (PACA, Eq. 3).
            t5_tokens, t5_mask: motion caption ``[B, L, D_t5]`` + bool ``[B, L]`` (True = real token;
                None = all real) for the temporal cross-attention; ``temporal_text_encoder='t5'`` only.
            return_flow: None = flow when the PredictNet exists, the model is training and ``temporal``.
            temporal: False = the image path: every frame through the spatial layers only (temporal layers
                and fps embedding not called; image conditions and T5 tokens optional, see the module doc).
            fps: frames per second, a number or float ``[B]`` (``fps_conditioning`` models; None ->
                ``cfg.fps_default``); ignored by models without fps conditioning and on the image path.
        """
        check_values = self._value_checks_due(sample.device)
        self._check_inputs(sample, text_tokens, image_embed, first_frame, t5_tokens, t5_mask, temporal,
                           check_values=check_values)
        b, _, frames, h, w = sample.shape
        if return_flow is None:
            want_flow = self.predictnet is not None and self.training and temporal
        else:
            want_flow = return_flow
        if want_flow and not temporal:
            raise ValueError("return_flow=True needs the temporal layers (temporal=True): images have no flow")
        if want_flow and self.predictnet is None:
            raise ValueError("return_flow=True but the model has no PredictNet (predictnet=False)")
        if want_flow and frames < 2:
            raise ValueError(f"flow needs at least 2 frames, got T={frames}")
        dtype = sample.dtype
        unet = self.unet

        ts = self._timesteps(timestep, b, sample.device)
        ts = repeat(ts, "b -> (b f)", f=frames)
        emb = unet.time_embedding(unet.time_proj(ts).to(dtype))  # [(b f), E]
        if self.fps_embedding is not None and temporal:  # VideoCrafter: emb += MLP(sinusoid(fps))
            fps_t = fps_tensor(fps, b, self.cfg.fps_default, sample.device, check_values=check_values)  # [b]
            fps_emb = self.fps_embedding(unet.time_proj(fps_t).to(dtype))  # [b, E]
            emb = emb + repeat(fps_emb, "b e -> (b f) e", f=frames)

        spatial_ctx = text_tokens.to(dtype)
        paca_feats = frame_in = None
        if self.image_proj is not None and self.paca is not None:
            if image_embed is not None:
                image_tokens = self.image_proj(image_embed.to(dtype))  # [b, N, D]
                paca_feats = self.paca.features(first_frame.to(dtype))
                if self.paca.frame_in is not None:  # first_frame='concat': the latent at every frame
                    frame_in = repeat(self.paca.frame_in(first_frame.to(dtype)), "b c h w -> (b f) c h w", f=frames)
            else:  # image path without image condition: zero tokens -> the adapter branch adds exactly 0
                image_tokens = spatial_ctx.new_zeros(b, self.cfg.adapter.num_tokens, spatial_ctx.shape[2])
            spatial_ctx = torch.cat([spatial_ctx, image_tokens], dim=1)  # text then image tokens (Eq. 2)
        temporal_ctx = temporal_mask = None  # the image path (temporal=False) runs no layer that reads them
        if temporal and self.cfg.temporal_text_encoder == "t5":
            temporal_ctx, temporal_mask = t5_tokens.to(dtype), t5_mask
        elif temporal:
            temporal_ctx = text_tokens.to(dtype)
        ctx = StepContext(
            frames=frames,
            emb=emb,
            spatial_context=repeat(spatial_ctx, "b l d -> (b f) l d", f=frames),
            temporal_context=temporal_ctx,
            temporal_mask=temporal_mask,
            paca_features=paca_feats,
            forward_upsample_size=any(s % 2**unet.num_upsamplers for s in (h, w)),
            checkpoint=self.gradient_checkpointing,
            temporal=temporal,
        )

        x = unet.conv_in(rearrange(sample, "b c f h w -> (b f) c h w"))
        if frame_in is not None:
            x = x + frame_in
        x, skips = run_down(unet.down_blocks, self.temporal.down, x, ctx)
        mid = run_mid(unet.mid_block, self.temporal.mid, x, ctx)
        x = run_up(unet.up_blocks, self.temporal.up, self.paca.up if self.paca is not None else None, mid, skips, ctx)
        if unet.conv_norm_out is not None:
            x = unet.conv_act(unet.conv_norm_out(x))
        x = unet.conv_out(x)
        out = rearrange(x, "(b f) c h w -> b c f h w", f=frames)
        flow = self.predictnet(mid, skips, ctx) if want_flow else None
        return FactorizedDreamerOutput(out, flow)
