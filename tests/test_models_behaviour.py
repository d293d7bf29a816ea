"""What each added mechanism does inside the assembled model: PACA reads the first frame, the adapter
reads the image tokens (scaled by λ), temporal layers mix frames, the T5 mask hides padding; and the
classifier-free-guidance null/drop helpers."""

from __future__ import annotations

import pytest
import torch

from fdreamer.models import (
    Conditions,
    FactorizedDreamerUNet,
    ModelConfig,
    PacaConfig,
    drop_conditions,
    null_conditions,
    sample_drop_masks,
)

B, T, HW = 2, 4, 16


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, 6, dtype=torch.bool)
    mask[:, 4:] = False
    return {
        "sample": torch.randn(B, 4, T, HW, HW, generator=g), "timestep": torch.tensor([10, 600]),
        "text_tokens": torch.randn(B, 77, 32, generator=g), "image_embed": torch.randn(B, 32, generator=g),
        "first_frame": torch.randn(B, 4, HW, HW, generator=g), "t5_tokens": torch.randn(B, 6, 64, generator=g),
        "t5_mask": mask,
    }


def _perturb(model: torch.nn.Module, prefixes: tuple[str, ...], std: float = 0.05) -> None:
    """Random values for the all-zero (zero-initialised) parameters under ``prefixes``."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(prefixes) and p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _run(model: FactorizedDreamerUNet, d: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**d).sample


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def fresh() -> FactorizedDreamerUNet:
    return FactorizedDreamerUNet.from_preset("tiny", ModelConfig.tiny(), seed=0).eval()


def test_paca_reads_the_first_frame(fresh: FactorizedDreamerUNet) -> None:
    d = _inputs()
    d2 = {**d, "first_frame": d["first_frame"] + torch.randn_like(d["first_frame"])}
    assert _max_diff(_run(fresh, d), _run(fresh, d2)) == 0  # zero-init output projections
    model = FactorizedDreamerUNet.from_preset("tiny", ModelConfig.tiny(), seed=0).eval()
    _perturb(model, ("paca.",))
    assert _max_diff(_run(model, d), _run(model, d2)) > 1e-4
    pasd = FactorizedDreamerUNet.from_preset("tiny", ModelConfig.tiny(paca=PacaConfig(init="default")), seed=0).eval()
    assert _max_diff(_run(pasd, d), _run(pasd, d2)) > 1e-4


def test_adapter_reads_image_tokens_scaled_by_lambda(fresh: FactorizedDreamerUNet) -> None:
    d = _inputs()
    d2 = {**d, "image_embed": torch.randn_like(d["image_embed"])}
    assert _max_diff(_run(fresh, d), _run(fresh, d2)) == 0  # zero image tokens at init
    model = FactorizedDreamerUNet.from_preset("tiny", ModelConfig.tiny(), seed=0).eval()
    _perturb(model, ("image_proj.",), std=1.0)  # LayerNorm affine away from zero, as after training
    out = _run(model, d)
    assert _max_diff(out, _run(model, d2)) > 1e-4
    model.set_adapter_scale(0.5)
    half = _run(model, d)
    assert _max_diff(out, half) > 1e-4
    model.set_adapter_scale(0.0)  # λ = 0: Eq. 2 reduces to Eq. 1, the image model
    torch.testing.assert_close(_run(model, d), _run(fresh, d))
    direct = FactorizedDreamerUNet.from_preset("tiny", ModelConfig.tiny(factorized=False), seed=0)
    with pytest.raises(ValueError, match="no adapter"):
        direct.set_adapter_scale(1.0)


def test_temporal_layers_mix_frames_only_once_trained(fresh: FactorizedDreamerUNet) -> None:
    d = _inputs()
    s2 = d["sample"].clone()
    s2[:, :, 0] += torch.randn_like(s2[:, :, 0])  # change frame 0
    d2 = {**d, "sample": s2}
    a, b = _run(fresh, d), _run(fresh, d2)
    assert _max_diff(a[:, :, 1:], b[:, :, 1:]) == 0 and _max_diff(a[:, :, 0], b[:, :, 0]) > 1e-3
    model = FactorizedDreamerUNet.from_preset("tiny", ModelConfig.tiny(), seed=0).eval()
    _perturb(model, ("temporal.",))
    a, b = _run(model, d), _run(model, d2)
    assert _max_diff(a[:, :, 1:], b[:, :, 1:]) > 1e-4


def test_t5_padding_is_not_attended() -> None:
    model = FactorizedDreamerUNet.from_preset("tiny", ModelConfig.tiny(), seed=0).eval()
    _perturb(model, ("temporal.",))
    d = _inputs()
    padded = d["t5_tokens"].clone()
    padded[:, 5] = 50.0  # a padded position (mask False)
    real = d["t5_tokens"].clone()
    real[:, 1] += 1.0  # a real token
    ref = _run(model, d)
    assert _max_diff(ref, _run(model, {**d, "t5_tokens": padded})) < 1e-6
    assert _max_diff(ref, _run(model, {**d, "t5_tokens": real})) > 1e-4
    # no mask = every token real: then the same change is seen
    no_mask = {**d, "t5_mask": None}
    assert _max_diff(_run(model, no_mask), _run(model, {**no_mask, "t5_tokens": padded})) > 1e-4


def _cond() -> Conditions:
    d = _inputs()
    return Conditions(d["text_tokens"], d["image_embed"], d["first_frame"], d["t5_tokens"], d["t5_mask"])


def test_null_conditions_and_per_sample_drop() -> None:
    cond = _cond()
    empty_text, empty_t5 = torch.full((1, 77, 32), 0.5), torch.full((1, 2, 64), 0.25)
    null = null_conditions(cond, empty_text, empty_t5)  # 2 real tokens, padded to the batch's 6
    assert null.t5_tokens is not None and null.t5_tokens.shape == cond.t5_tokens.shape  # type: ignore[union-attr]
    assert null.t5_mask is not None and null.t5_mask.tolist() == [[True, True, False, False, False, False]] * B
    assert null.image_embed is not None and null.image_embed.abs().max() == 0
    assert null.first_frame is not None and null.first_frame.abs().max() == 0
    dropped = drop_conditions(cond, null, drop_text=torch.tensor([True, False]), drop_image=torch.tensor([False, True]))
    assert torch.equal(dropped.text_tokens[0], null.text_tokens[0]) and torch.equal(dropped.text_tokens[1], cond.text_tokens[1])
    assert torch.equal(dropped.t5_mask[0], null.t5_mask[0]) and torch.equal(dropped.t5_mask[1], cond.t5_mask[1])  # type: ignore[index]
    assert torch.equal(dropped.image_embed[0], cond.image_embed[0]) and dropped.image_embed[1].abs().max() == 0  # type: ignore[index]
    assert torch.equal(dropped.first_frame[0], cond.first_frame[0]) and dropped.first_frame[1].abs().max() == 0  # type: ignore[index]
    model = FactorizedDreamerUNet.from_preset("tiny", ModelConfig.tiny(), seed=0).eval()
    with torch.no_grad():
        out = model(_inputs()["sample"], 10, **dropped.as_kwargs())
    assert out.sample.shape == (B, 4, T, HW, HW)
    with pytest.raises(ValueError, match="bool tensor"):
        drop_conditions(cond, null, torch.tensor([1, 0]), torch.tensor([False, False]))
    with pytest.raises(ValueError, match="empty_t5_tokens is required"):
        null_conditions(cond, empty_text)


def test_sample_drop_masks_rates() -> None:
    text, image = sample_drop_masks(20000, 0.05, 0.05, 0.05, generator=torch.Generator().manual_seed(0))
    both = (text & image).float().mean().item()
    assert abs(both - 0.05) < 0.01
    assert abs((text & ~image).float().mean().item() - 0.05) < 0.01
    assert abs((image & ~text).float().mean().item() - 0.05) < 0.01
    with pytest.raises(ValueError, match="sum to"):
        sample_drop_masks(4, 0.5, 0.5, 0.5)
