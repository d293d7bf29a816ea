"""The assembled video UNet: loading an SD-format folder, zero-init equivalence with the image UNet,
forward shapes/dtypes (fp32 + bf16), flow output, input validation, gradient checkpointing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from einops import rearrange, repeat

from fdreamer.toy import tiny_models as tm  # tiny_dir: session fixture in conftest.py (make_tiny_models)
from fdreamer.models import (
    AdapterConfig,
    FactorizedDreamerUNet,
    ModelConfig,
    PacaConfig,
)

B, T, HW, L5 = 2, 4, 16, 6


def _inputs(cfg: ModelConfig, seed: int = 0, frames: int = T, hw: int = HW) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = {
        "sample": torch.randn(B, 4, frames, hw, hw, generator=g),
        "timestep": torch.tensor([3, 700]),
        "text_tokens": torch.randn(B, 77, 32, generator=g),
    }
    if cfg.factorized:
        d["image_embed"] = torch.randn(B, cfg.image_embed_dim, generator=g)
        d["first_frame"] = torch.randn(B, 4, hw, hw, generator=g)
    if cfg.temporal_text_encoder == "t5":
        d["t5_tokens"] = torch.randn(B, L5, cfg.t5_dim, generator=g)
        mask = torch.ones(B, L5, dtype=torch.bool)
        mask[0, 3:] = False
        d["t5_mask"] = mask
    return d


def _frame_by_frame(unet: UNet2DConditionModel, d: dict[str, torch.Tensor]) -> torch.Tensor:
    frames = d["sample"].shape[2]
    out = unet(
        rearrange(d["sample"], "b c f h w -> (b f) c h w"),
        repeat(d["timestep"], "b -> (b f)", f=frames),
        repeat(d["text_tokens"], "b l d -> (b f) l d", f=frames),
    ).sample
    return rearrange(out, "(b f) c h w -> b c f h w", f=frames)


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig.tiny(),  # the preset's init choices: kv_init=copy, token_init=zero, paca.init=zero
        ModelConfig.tiny(predictnet=True, temporal_text_encoder="clip"),
        ModelConfig.tiny(factorized=False),
    ],
    ids=["preset", "predictnet-clip", "direct"],
)
def test_fresh_video_model_equals_image_model_frame_by_frame(tiny_dir: Path, cfg: ModelConfig) -> None:
    image_unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet", local_files_only=True).eval()
    video = FactorizedDreamerUNet.from_pretrained_unet(tiny_dir / "unet", cfg).eval()
    spatial = {k.removeprefix("unet."): v for k, v in video.state_dict().items()
               if k.startswith("unet.") and ".processor." not in k}
    assert spatial.keys() == image_unet.state_dict().keys()
    assert all(torch.equal(spatial[k], v) for k, v in image_unet.state_dict().items())
    d = _inputs(cfg)  # image tokens present and random: the zero-token init still gives equality
    with torch.no_grad():
        out = video(**d).sample
        ref = _frame_by_frame(image_unet, d)
    assert out.shape == (B, 4, T, HW, HW)
    assert (out - ref).abs().max().item() < 1e-5


def test_adapter_init_choices_and_equivalence(tiny_dir: Path) -> None:
    """kv_init=copy with IP-Adapter's LayerNorm init is NOT the image model; kv_init=zero is."""
    image_unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet", local_files_only=True).eval()
    d = _inputs(ModelConfig.tiny())
    with torch.no_grad():
        ref = _frame_by_frame(image_unet, d)
        for kv_init, equal in (("copy", False), ("zero", True)):
            cfg = ModelConfig.tiny(adapter=AdapterConfig(kv_init=kv_init, token_init="default"))
            out = FactorizedDreamerUNet.from_pretrained_unet(tiny_dir, cfg).eval()(**d).sample
            assert ((out - ref).abs().max().item() < 1e-5) is equal, kv_init
        cfg = ModelConfig.tiny(paca=PacaConfig(init="default"))  # PASD's init perturbs from step one
        out = FactorizedDreamerUNet.from_pretrained_unet(tiny_dir, cfg).eval()(**d).sample
        assert (out - ref).abs().max().item() > 1e-4


def test_from_pretrained_unet_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        FactorizedDreamerUNet.from_pretrained_unet(tmp_path, ModelConfig.tiny())
    unet = UNet2DConditionModel(**{**tm.TINY_UNET_CONFIG, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="class_embed_type"):
        FactorizedDreamerUNet.from_unet2d(unet, ModelConfig.tiny())


def test_forward_flow_only_when_asked_or_training() -> None:
    cfg = ModelConfig.tiny(predictnet=True)
    model = FactorizedDreamerUNet.from_preset("tiny", cfg, seed=0)
    d = _inputs(cfg)
    model.train()
    out = model(**d)
    assert out.sample.shape == (B, 4, T, HW, HW) and out.flow is not None
    assert out.flow.shape == (B, 2, T - 1, HW, HW)
    assert model(**d, return_flow=False).flow is None
    model.eval()
    with torch.no_grad():
        assert model(**d).flow is None  # inference graph has no PredictNet
        assert model(**d, return_flow=True).flow.shape == (B, 2, T - 1, HW, HW)  # type: ignore[union-attr]
        with pytest.raises(ValueError, match="at least 2 frames"):
            model(**_inputs(cfg, frames=1), return_flow=True)
    plain = FactorizedDreamerUNet.from_preset("tiny", seed=0)
    with pytest.raises(ValueError, match="no PredictNet"):
        plain(**d, return_flow=True)


def test_bf16_forward_of_tiny_model() -> None:
    cfg = ModelConfig.tiny(predictnet=True)
    model = FactorizedDreamerUNet.from_preset("tiny", cfg, seed=0).to(torch.bfloat16).eval()
    d = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in _inputs(cfg).items()}
    with torch.no_grad():
        out = model(**d, return_flow=True)
    assert out.sample.dtype == torch.bfloat16 and out.flow is not None and out.flow.dtype == torch.bfloat16
    assert torch.isfinite(out.sample).all() and torch.isfinite(out.flow).all()
    ref = FactorizedDreamerUNet.from_preset("tiny", cfg, seed=0).eval()
    with torch.no_grad():
        ref_out = ref(**_inputs(cfg)).sample
    assert (out.sample.float() - ref_out).abs().max() < 0.1 * ref_out.abs().max()


def test_timestep_forms_and_odd_latent_size() -> None:
    cfg = ModelConfig.tiny()
    model = FactorizedDreamerUNet.from_preset("tiny", cfg, seed=0).eval()
    d = _inputs(cfg, hw=10)  # not a multiple of 2**num_upsamplers: upsample sizes are forwarded
    d["timestep"] = torch.tensor([500, 500])
    with torch.no_grad():
        a = model(**d).sample
        b = model(**{**d, "timestep": 500}).sample
        c = model(**{**d, "timestep": torch.tensor(500.0, dtype=torch.float64)}).sample
    assert a.shape == (B, 4, T, 10, 10)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_input_validation_errors() -> None:
    cfg = ModelConfig.tiny()
    model = FactorizedDreamerUNet.from_preset("tiny", cfg, seed=0)
    d = _inputs(cfg)
    cases = [
        ({"sample": d["sample"][:, :3]}, "sample must be"),
        ({"text_tokens": d["text_tokens"][..., :16]}, "text_tokens must be"),
        ({"image_embed": None}, "needs image_embed"),
        ({"image_embed": d["image_embed"][:, :5]}, "image_embed must be"),
        ({"first_frame": d["first_frame"][..., :8]}, "first_frame must be"),
        ({"t5_tokens": None}, "t5_tokens .* required"),
        ({"t5_tokens": d["t5_tokens"][..., :8]}, "t5_tokens must be"),
        ({"t5_mask": d["t5_mask"].long()}, "t5_mask must be bool"),
        ({"t5_mask": torch.zeros(B, L5, dtype=torch.bool)}, "at least one real token"),
        ({"timestep": torch.tensor([1, 2, 3])}, "timestep must be"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            model(**{**d, **change})
    direct = FactorizedDreamerUNet.from_preset("tiny", ModelConfig.tiny(factorized=False), seed=0)
    with pytest.raises(ValueError, match="direct T2V"):
        direct(**d)
    clip = FactorizedDreamerUNet.from_preset("tiny", ModelConfig.tiny(temporal_text_encoder="clip"), seed=0)
    with pytest.raises(ValueError, match="pass no t5_tokens"):
        clip(**d)


def test_gradient_checkpointing_same_output_and_grads() -> None:
    cfg = ModelConfig.tiny(predictnet=True)
    model = FactorizedDreamerUNet.from_preset("tiny", cfg, seed=0).train()
    with torch.no_grad():  # non-zero temporal/PACA outputs so every layer matters
        for name, p in model.named_parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    d = _inputs(cfg)
    results = []
    for ckpt in (False, True):
        model.enable_gradient_checkpointing(ckpt)
        model.zero_grad()
        out = model(**d)
        (out.sample.square().mean() + out.flow.square().mean()).backward()  # type: ignore[union-attr]
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
        results.append((out.sample.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for n, g in results[0][1].items():
        torch.testing.assert_close(g, results[1][1][n], atol=1e-5, rtol=1e-4, msg=n)
