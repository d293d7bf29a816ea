"""Shape/dtype tests of every building block of the video UNet (fdreamer.models.*), fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention

from fdreamer.models import (
    AdapterConfig,
    ModelConfig,
    PacaConfig,
    TemporalConfig,
)
from fdreamer.train.losses import diffusion_loss, flow_loss, total_loss
from fdreamer.models.adapter import (
    AdapterAttnProcessor,
    ImageProjection,
    SpatialAttnProcessor,
)
from fdreamer.models.attention import (
    MultiHeadAttention,
    attention,
    check_backend,
    frame_position_encoding,
)
from fdreamer.models.paca import PacaEncoder, PacaLayer
from fdreamer.models.predictnet import FlowHead
from fdreamer.models.temporal import TemporalConv, TemporalTransformer

DTYPES = [torch.float32, torch.bfloat16]
B, F, C, H, W = 2, 5, 16, 4, 6


def _x(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B * F, C, H, W, generator=g).to(dtype)  # '(b f) c h w'


def _perturb_zero_outputs(module: torch.nn.Module, std: float = 0.2) -> None:
    """Give the zero-initialised output layers random weights (as after some training)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("dtype", DTYPES)
def test_temporal_conv_shape_dtype_and_zero_init(dtype: torch.dtype) -> None:
    layer = TemporalConv(C, groups=4).to(dtype)
    x = _x(dtype)
    y = layer(x, F)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(y, x)  # zero-init last conv: identity
    _perturb_zero_outputs(layer)
    assert not torch.equal(layer(x, F), x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_temporal_transformer_shape_dtype_and_zero_init(dtype: torch.dtype) -> None:
    layer = TemporalTransformer(C, heads=4, context_dim=12, groups=4).to(dtype)
    x, ctx = _x(dtype), torch.randn(B, 7, 12).to(dtype)
    mask = torch.ones(B, 7, dtype=torch.bool)
    mask[0, 3:] = False
    y = layer(x, F, ctx, mask)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(y, x)
    with pytest.raises(ValueError, match="temporal context"):
        layer(x, F, torch.randn(B, 7, 13).to(dtype))
    with pytest.raises(ValueError, match=r"\(b f\)"):
        layer(x[:-1], F, ctx)


def test_temporal_transformer_mixes_frames_only_when_trained() -> None:
    layer = TemporalTransformer(C, heads=4, context_dim=12, groups=4)
    x, ctx = _x(), torch.randn(B, 7, 12)
    x2 = x.clone()
    x2[0] += torch.randn(C, H, W)  # frame 0 of sample 0
    y, y2 = layer(x, F, ctx), layer(x2, F, ctx)
    assert torch.equal(y[1:F], y2[1:F])  # zero init: frames independent
    _perturb_zero_outputs(layer)
    y, y2 = layer(x, F, ctx), layer(x2, F, ctx)
    assert (y[1:F] - y2[1:F]).abs().max() > 1e-4  # other frames of sample 0 change
    assert torch.allclose(y[F:], y2[F:])  # sample 1 untouched


def test_temporal_cross_attention_respects_mask() -> None:
    layer = TemporalTransformer(C, heads=4, context_dim=12, groups=4)
    _perturb_zero_outputs(layer)
    x, ctx = _x(), torch.randn(B, 7, 12)
    mask = torch.ones(B, 7, dtype=torch.bool)
    mask[:, 4:] = False
    ctx2 = ctx.clone()
    ctx2[:, 5] = 100.0  # a padded token
    assert torch.allclose(layer(x, F, ctx, mask), layer(x, F, ctx2, mask), atol=1e-6)
    ctx3 = ctx.clone()
    ctx3[:, 1] += 1.0  # a real token
    assert (layer(x, F, ctx, mask) - layer(x, F, ctx3, mask)).abs().max() > 1e-4


def test_multihead_attention_and_validation() -> None:
    attn = MultiHeadAttention(16, heads=4, context_dim=8, zero_out=True)
    out = attn(torch.randn(3, 5, 16), torch.randn(3, 2, 8), torch.tensor([[True, False]] * 3))
    assert out.shape == (3, 5, 16) and out.abs().max() == 0
    with pytest.raises(ValueError, match="mask must be bool"):
        attn(torch.randn(3, 5, 16), torch.randn(3, 2, 8), torch.ones(3, 2))
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(10, heads=4)
    q = torch.randn(1, 2, 3, 4)
    assert torch.allclose(attention(q, q, q, backend="sdpa"), torch.nn.functional.scaled_dot_product_attention(q, q, q))
    with pytest.raises(ValueError, match="backend"):
        check_backend("flash")


def test_frame_position_encoding() -> None:
    pe = frame_position_encoding(7, 10, torch.device("cpu"), torch.bfloat16)
    assert pe.shape == (7, 10) and pe.dtype == torch.bfloat16
    assert torch.equal(pe[0, 0::2].float(), torch.zeros(5)) and torch.equal(pe[0, 1::2].float(), torch.ones(5))
    assert len({tuple(r.tolist()) for r in pe}) == 7  # frames are distinguishable


@pytest.mark.parametrize("dtype", DTYPES)
def test_image_projection(dtype: torch.dtype) -> None:
    proj = ImageProjection(embed_dim=24, token_dim=16, num_tokens=4, token_init="zero").to(dtype)
    tokens = proj(torch.randn(B, 24).to(dtype))
    assert tokens.shape == (B, 4, 16) and tokens.dtype == dtype and tokens.abs().max() == 0
    proj = ImageProjection(24, 16, 4, token_init="default")
    assert proj(torch.randn(B, 24)).abs().max() > 0
    with pytest.raises(ValueError, match="image_embed must be"):
        proj(torch.randn(B, 23))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_init", ["copy", "zero"])
def test_adapter_attention(dtype: torch.dtype, kv_init: str) -> None:
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=4, dim_head=4).to(dtype)
    proc = AdapterAttnProcessor(attn, AdapterConfig(num_tokens=3, kv_init=kv_init)).to(dtype)
    if kv_init == "copy":
        assert torch.equal(proc.to_k_adp.weight, attn.to_k.weight)
    else:
        assert proc.to_k_adp.weight.abs().max() == 0
    x, text, image = torch.randn(4, 10, 16).to(dtype), torch.randn(4, 6, 12).to(dtype), torch.randn(4, 3, 12).to(dtype)
    ctx = torch.cat([text, image], dim=1)
    plain = SpatialAttnProcessor()(attn, x, text)
    out = proc(attn, x, ctx)
    assert out.shape == (4, 10, 16) and out.dtype == dtype
    if kv_init == "zero":
        torch.testing.assert_close(out, plain)  # zero k/v: image branch outputs 0
    else:
        assert (out - plain).abs().max() > 1e-3
        proc.scale = 0.0  # λ = 0 recovers Eq. 1
        torch.testing.assert_close(proc(attn, x, ctx), plain)
    with pytest.raises(ValueError, match="image tokens"):
        proc(attn, x, ctx[:, :3])


@pytest.mark.parametrize("dtype", DTYPES)
def test_paca_encoder_and_layer(dtype: torch.dtype) -> None:
    enc = PacaEncoder(4, [8, 16, 16]).to(dtype)
    feats = enc(torch.randn(B, 4, 9, 12).to(dtype))
    assert [tuple(f.shape) for f in feats] == [(B, 8, 9, 12), (B, 16, 5, 6), (B, 16, 3, 3)]
    assert all(f.dtype == dtype for f in feats)
    with pytest.raises(ValueError, match="first_frame"):
        enc(torch.randn(B, 3, 9, 12))
    layer = PacaLayer(C, y_channels=16, heads=4, init="zero").to(dtype)
    x = _x(dtype)
    y = layer(x, F, feats[1])
    assert y.shape == x.shape and y.dtype == dtype and torch.equal(y, x)
    layer = PacaLayer(C, y_channels=16, heads=4, init="default").to(dtype)
    assert not torch.equal(layer(x, F, feats[1]), x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_flow_head(dtype: torch.dtype) -> None:
    head = FlowHead(8, flow_channels=2).to(dtype)
    flow = head(torch.randn(B, 8, F, H, W).to(dtype))
    assert flow.shape == (B, 2, F - 1, H, W) and flow.dtype == dtype
    with pytest.raises(ValueError, match="T>=2"):
        head(torch.randn(B, 8, 1, H, W))


def test_losses() -> None:
    pred, target = torch.zeros(B, 2, 3, 4, 4), torch.ones(B, 2, 3, 4, 4)
    assert flow_loss(pred, target).item() == pytest.approx(1.0)  # Eq. 4
    assert diffusion_loss(pred.bfloat16(), target.bfloat16()).dtype == torch.float32  # Eq. 7
    assert total_loss(torch.tensor(2.0), torch.tensor(3.0)).item() == pytest.approx(5.0)  # γ = 1
    assert total_loss(torch.tensor(2.0), torch.tensor(3.0), gamma=0.5).item() == pytest.approx(3.5)
    assert total_loss(torch.tensor(2.0)).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="differ in shape"):
        flow_loss(pred, target[:, :, :2])


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="unknown group"):
        ModelConfig(freeze=["vae"])
    with pytest.raises(ValueError, match="does not have"):
        ModelConfig(freeze=["predictnet"])
    with pytest.raises(ValueError, match="does not have"):
        ModelConfig(factorized=False, freeze=["adapter"])
    with pytest.raises(ValueError, match="twice"):
        ModelConfig(freeze=["spatial", "spatial"])
    with pytest.raises(ValueError, match="temporal_text_encoder"):
        ModelConfig(temporal_text_encoder="bert")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_tokens"):
        AdapterConfig(num_tokens=0)
    with pytest.raises(ValueError, match="paca.init"):
        PacaConfig(init="ones")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="odd"):
        TemporalConfig(conv_kernel=2)
    assert ModelConfig.tiny().present_groups() == ("spatial", "temporal", "adapter", "paca")


def test_config_loads_from_yaml_overrides() -> None:
    from fdreamer.config import help_text, load_config

    cfg = load_config(ModelConfig, overrides=["--temporal_text_encoder=clip", "--freeze=[spatial]", "--adapter.scale=0.5"])
    assert cfg.temporal_text_encoder == "clip" and cfg.freeze == ["spatial"] and cfg.adapter.scale == 0.5
    text = help_text(ModelConfig)
    assert "--adapter.kv_init" in text and "presets use it" in text and "--paca.init" in text
