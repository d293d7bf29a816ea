"""Pixel-aligned first-frame options (``ModelConfig.first_frame``): ``paca`` (the paper), ``paca_pos`` (PACA
with 2-D position encodings on queries and keys) and ``concat`` (the first-frame latent beside ``conv_in``)."""

from __future__ import annotations

import math

import pytest
import torch

from fdreamer.models import FactorizedDreamerUNet, ModelConfig, PacaConfig
from fdreamer.models.paca import position_encoding_2d
from fdreamer.models.params import group_of

B, T, HW = 2, 3, 16


def _inputs(seed: int = 0, first_frame: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(B, 4, T, HW, HW, generator=g), "timestep": torch.tensor([10, 600]),
            "text_tokens": torch.randn(B, 77, 32, generator=g), "image_embed": torch.randn(B, 32, generator=g),
            "first_frame": torch.randn(B, 4, HW, HW, generator=g) if first_frame is None else first_frame,
            "t5_tokens": torch.randn(B, 6, 64, generator=g)}


def _model(first_frame: str, **cfg) -> FactorizedDreamerUNet:
    return FactorizedDreamerUNet.from_preset("tiny", ModelConfig.tiny(first_frame=first_frame, **cfg), seed=0).eval()


def test_position_encoding_hand_computed() -> None:
    """dim 8: [sin(pi r), sin(2 pi r), cos(pi r), cos(2 pi r), the same for the column c], r, c in [0, 1]."""
    pe = position_encoding_2d(3, 2, 8).reshape(3, 2, 8)  # row-major like 'c h w -> (h w) c'
    r, c = 0.5, 1.0  # row 1 of 3, column 1 of 2
    want = [math.sin(math.pi * r), math.sin(2 * math.pi * r), math.cos(math.pi * r), math.cos(2 * math.pi * r),
            math.sin(math.pi * c), math.sin(2 * math.pi * c), math.cos(math.pi * c), math.cos(2 * math.pi * c)]
    assert pe[1, 1].tolist() == pytest.approx(want, abs=1e-6)
    assert pe[0, 0].tolist() == pytest.approx([0, 0, 1, 1, 0, 0, 1, 1], abs=1e-6)
    big = position_encoding_2d(16, 16, 32)
    assert big.shape == (256, 32) and torch.cdist(big, big).add(torch.eye(256) * 9).min() > 1e-3  # every pixel distinct
    assert position_encoding_2d(4, 4, 10)[:, 8:].abs().max() == 0  # channels beyond 4*(dim//4) are zero padding
    with pytest.raises(ValueError, match="dim >= 4"):
        position_encoding_2d(2, 2, 3)


@pytest.mark.parametrize("option", ["paca_pos", "concat"])
def test_fresh_model_equals_the_paper_model_and_ignores_the_frame(option: str) -> None:
    """Zero-initialised additions: a fresh model gives the paper model's output (same weights), whatever the frame."""
    paper, other = _model("paca"), _model(option)
    missing, unexpected = other.load_state_dict(paper.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("paca.frame_in") for k in missing)
    x = _inputs()
    with torch.no_grad():
        a = paper(**x).sample
        b = other(**x).sample
        c = other(**_inputs(first_frame=torch.randn(B, 4, HW, HW))).sample
    assert torch.equal(a, b) and torch.equal(b, c)


def test_concat_path_reads_the_frame_pixel_aligned() -> None:
    """Once ``frame_in`` is trained (here: set by hand), the first frame changes the output, and a change of
    the frame at one latent pixel changes frame 0's output most near that pixel (no attention needed)."""
    m = _model("concat", paca=PacaConfig(init="zero"))
    assert group_of("paca.frame_in.weight") == "paca" and m.paca.frame_in.weight.abs().max() == 0
    with torch.no_grad():
        m.paca.frame_in.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    x = _inputs()
    y = x["first_frame"].clone()
    y[:, :, 3, 12] += 5.0  # one latent pixel
    with torch.no_grad():
        base = m(**x).sample
        moved = m(**{**x, "first_frame": y}).sample
    diff = (moved - base).abs()[:, :, 0].mean(dim=(0, 1))  # frame 0, [h, w]
    assert diff.max() > 1e-3
    near = diff[1:6, 10:15].mean()
    far = torch.cat([diff[10:, :6].flatten(), diff[10:, 10:].flatten()]).mean()
    assert near > 5 * far, (float(near), float(far))


def test_paca_pos_positions_change_the_attention() -> None:
    """With non-zero PACA outputs, adding positions changes the result (the queries/keys differ)."""
    paper = FactorizedDreamerUNet.from_preset("tiny", ModelConfig.tiny(paca=PacaConfig(init="default")), seed=0).eval()
    pos = FactorizedDreamerUNet.from_preset(
        "tiny", ModelConfig.tiny(first_frame="paca_pos", paca=PacaConfig(init="default")), seed=0).eval()
    pos.load_state_dict(paper.state_dict())
    x = _inputs()
    with torch.no_grad():
        assert not torch.allclose(paper(**x).sample, pos(**x).sample, atol=1e-5)


def test_options_validated() -> None:
    with pytest.raises(ValueError, match="first_frame must be"):
        ModelConfig.tiny(first_frame="stack")
    with pytest.raises(ValueError, match="needs factorized=true"):
        ModelConfig.tiny(first_frame="concat", factorized=False)
