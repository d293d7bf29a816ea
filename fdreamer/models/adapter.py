"""The T2I adapter (paper §3.2, Eq. 2) and the spatial attention processors of the video model.

Eq. 2 replaces SD's cross-attention (Eq. 1) ``Z = CA(to_q(x), to_kv(emb_txt))`` by

    Z = CA(to_q(x), to_kv(emb_txt)) + λ · CA(to_q(x), to_kv_adp(emb_img))

with the same query. As in IP-Adapter, ``emb_img`` is a few tokens made from the CLIP image embedding
by :class:`ImageProjection` (linear + LayerNorm), appended after the text tokens of the spatial
context; :class:`AdapterAttnProcessor` splits them off again, and owns the new bias-free
``to_k_adp``/``to_v_adp``. The sum goes through the layer's shared output projection.

Every spatial ``Attention`` of the wrapped diffusers UNet gets one of these processors (the plain
:class:`SpatialAttnProcessor` where there is no adapter) so all attention runs through
:func:`fdreamer.models.attention.attention` (SDPA / xformers).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention
from einops import rearrange
from torch import nn

from fdreamer.models.attention import attention, check_backend, layer_norm_fp32
from fdreamer.models.config import AdapterConfig


class ImageProjection(nn.Module):
    """CLIP image embedding ``[B, P]`` -> ``num_tokens`` image tokens ``[B, N, D]`` (IP-Adapter's projection).

    With ``token_init='zero'`` the LayerNorm affine starts at 0, so the tokens are exactly 0 at init and
    the image branch of Eq. 2 outputs 0 whatever ``kv_init`` is.
    """

    def __init__(self, embed_dim: int, token_dim: int, num_tokens: int, token_init: str = "zero") -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.embed_dim = embed_dim
        self.proj = nn.Linear(embed_dim, num_tokens * token_dim)
        self.norm = nn.LayerNorm(token_dim)
        if token_init == "zero":
            nn.init.zeros_(self.norm.weight)
            nn.init.zeros_(self.norm.bias)

    def forward(self, image_embed: torch.Tensor) -> torch.Tensor:
        if image_embed.ndim != 2 or image_embed.shape[1] != self.embed_dim:
            raise ValueError(f"image_embed must be [B, {self.embed_dim}], got {tuple(image_embed.shape)}")
        tokens = rearrange(self.proj(image_embed), "b (n d) -> b n d", n=self.num_tokens)
        return layer_norm_fp32(tokens, self.norm)


def _check_sd_attention(attn: Attention, name: str) -> None:
    """The processors implement SD1.x attention only; fail loudly on other variants."""
    unsupported = {
        "spatial_norm": attn.spatial_norm is not None,
        "group_norm": attn.group_norm is not None,
        "norm_cross": bool(attn.norm_cross),
        "residual_connection": attn.residual_connection,
        "rescale_output_factor != 1": attn.rescale_output_factor != 1.0,
        "qk_norm": getattr(attn, "norm_q", None) is not None,
        "added_kv_proj": getattr(attn, "add_k_proj", None) is not None,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{name}: attention features {bad} are not supported (expected an SD1.x UNet)")


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return rearrange(x, "n l (h d) -> n h l d", h=heads)


def _reject_mask(attention_mask: torch.Tensor | None) -> None:
    if attention_mask is not None:
        raise ValueError("spatial attention masks are not supported by the video UNet")


def _attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """``q`` [n, h, l, d] against projected keys/values [n, L, (h d)] -> [n, h, l, d]."""
    return attention(q, _heads(k, attn.heads), _heads(v, attn.heads), None, backend)


def _project_out(attn: Attention, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[n, h, l, d] -> the layer's output projection (+ dropout) on 'n l (h d)', in the query's dtype."""
    out = rearrange(out, "n h l d -> n l (h d)").to(dtype)
    return attn.to_out[1](attn.to_out[0](out))


class SpatialAttnProcessor:
    """SD attention (Eq. 1 for cross-attention) through :func:`attention`; no parameters."""

    def __init__(self, backend: str = "auto") -> None:
        check_backend(backend)
        self.attention_backend = backend

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _reject_mask(attention_mask)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = _heads(attn.to_q(hidden_states), attn.heads)
        return _project_out(attn, _attend(attn, q, attn.to_k(ctx), attn.to_v(ctx), self.attention_backend), q.dtype)


class AdapterAttnProcessor(nn.Module):
    """Decoupled cross-attention of Eq. 2 for one spatial ``attn2``.

    The context is ``[N, L_txt + num_tokens, D]``: text tokens then image tokens. ``scale`` is λ.
    """

    def __init__(self, attn: Attention, cfg: AdapterConfig, backend: str = "auto") -> None:
        super().__init__()
        check_backend(backend)
        self.num_tokens = cfg.num_tokens
        self.scale = cfg.scale
        self.attention_backend = backend
        in_dim, inner = attn.to_k.in_features, attn.to_k.out_features
        self.to_k_adp = nn.Linear(in_dim, inner, bias=False)
        self.to_v_adp = nn.Linear(in_dim, inner, bias=False)
        with torch.no_grad():
            if cfg.kv_init == "copy":
                self.to_k_adp.weight.copy_(attn.to_k.weight)
                self.to_v_adp.weight.copy_(attn.to_v.weight)
            else:
                nn.init.zeros_(self.to_k_adp.weight)
                nn.init.zeros_(self.to_v_adp.weight)

    def __call__(  # type: ignore[override]  # diffusers calls processors, not forward
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _reject_mask(attention_mask)
        n = self.num_tokens
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] <= n:
            got = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)
            raise ValueError(f"adapter cross-attention needs text tokens followed by {n} image tokens, got {got}")
        text, image = encoder_hidden_states[:, :-n], encoder_hidden_states[:, -n:]
        q = _heads(attn.to_q(hidden_states), attn.heads)
        z_txt = _attend(attn, q, attn.to_k(text), attn.to_v(text), self.attention_backend)
        z_img = _attend(attn, q, self.to_k_adp(image), self.to_v_adp(image), self.attention_backend)
        return _project_out(attn, z_txt + self.scale * z_img, q.dtype)  # Eq. 2, through the shared to_out


def install_processors(module: nn.Module, adapter: AdapterConfig | None, backend: str) -> int:
    """Give every ``Attention`` under ``module`` a video-model processor; returns how many adapters.

    ``attn2`` (the cross-attention of each ``BasicTransformerBlock``) gets an
    :class:`AdapterAttnProcessor` when ``adapter`` is given; everything else a
    :class:`SpatialAttnProcessor`. Processor parameters register under ``....attn2.processor``.
    """
    count = 0
    for name, m in list(module.named_modules()):
        if not isinstance(m, Attention):
            continue
        _check_sd_attention(m, name)
        if adapter is not None and name.rsplit(".", 1)[-1] == "attn2" and m.is_cross_attention:
            m.set_processor(AdapterAttnProcessor(m, adapter, backend))
            count += 1
        else:
            m.set_processor(SpatialAttnProcessor(backend))
    return count


def set_adapter_scale(module: nn.Module, scale: float) -> None:
    """Set λ of Eq. 2 in every adapter processor under ``module``."""
    for m in module.modules():
        if isinstance(m, AdapterAttnProcessor):
            m.scale = float(scale)
