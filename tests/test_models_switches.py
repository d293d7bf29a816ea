"""Table 4 switches change which modules exist (with the expected parameter deltas); parameter groups
partition the model; freezing and gradient flow."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fdreamer.models import (
    GROUPS,
    FactorizedDreamerUNet,
    ModelConfig,
    count_parameters,
    parameter_groups,
    trainable_parameters,
)
from fdreamer.models.adapter import AdapterAttnProcessor
from fdreamer.models.paca import PacaLayer
from fdreamer.models.temporal import TemporalTransformer

B, T, HW = 2, 3, 16


def _n(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _build(**changes: object) -> FactorizedDreamerUNet:
    return FactorizedDreamerUNet.from_preset("tiny", ModelConfig.tiny(**changes), seed=0)


def _of_type(module: nn.Module | None, cls: type) -> list[nn.Module]:
    return [] if module is None else [m for m in module.modules() if isinstance(m, cls)]


def _inputs(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    d = {"sample": torch.randn(B, 4, T, HW, HW, generator=g), "timestep": torch.tensor([10, 900]),
         "text_tokens": torch.randn(B, 77, 32, generator=g)}
    if cfg.factorized:
        d |= {"image_embed": torch.randn(B, 32, generator=g), "first_frame": torch.randn(B, 4, HW, HW, generator=g)}
    if cfg.temporal_text_encoder == "t5":
        d |= {"t5_tokens": torch.randn(B, 5, 64, generator=g), "t5_mask": torch.ones(B, 5, dtype=torch.bool)}
    return d


@pytest.mark.parametrize("predictnet", [False, True])
def test_factorized_switch_removes_exactly_adapter_and_paca(predictnet: bool) -> None:
    full, direct = _build(predictnet=predictnet), _build(predictnet=predictnet, factorized=False)
    assert full.image_proj is not None and full.paca is not None
    assert direct.image_proj is None and direct.paca is None
    assert _of_type(direct, AdapterAttnProcessor) == [] and _of_type(direct, PacaLayer) == []
    adapter = _n(full.image_proj) + sum(_n(p) for p in _of_type(full.unet, AdapterAttnProcessor))
    paca = _n(full.paca)
    # the PredictNet copies the up path, including its adapter processors and PACA layers
    in_predictnet = sum(_n(p) for p in _of_type(full.predictnet, AdapterAttnProcessor)) + _n(
        full.predictnet.paca_up if full.predictnet is not None else None
    )
    assert (in_predictnet > 0) is predictnet
    assert _n(full) - _n(direct) == adapter + paca + in_predictnet
    cf, cd = count_parameters(full), count_parameters(direct)
    assert (cf["adapter"], cf["paca"]) == (adapter, paca) and cd["adapter"] == cd["paca"] == 0
    assert cf["spatial"] == cd["spatial"] and cf["temporal"] == cd["temporal"]


def test_temporal_text_encoder_changes_only_cross_attention_kv_width() -> None:
    t5, clip = _build(predictnet=True), _build(predictnet=True, temporal_text_encoder="clip")
    p5, pc = dict(t5.named_parameters()), dict(clip.named_parameters())
    assert p5.keys() == pc.keys()
    differ = {n for n in p5 if p5[n].shape != pc[n].shape}
    assert differ and all(n.endswith(("cross_attn.to_k.weight", "cross_attn.to_v.weight")) for n in differ)
    tts = _of_type(t5, TemporalTransformer)
    assert {m.context_dim for m in tts} == {64} and {m.context_dim for m in _of_type(clip, TemporalTransformer)} == {32}
    inner = sum(m.cross_attn.to_k.out_features for m in tts)
    assert _n(t5) - _n(clip) == 2 * inner * (64 - 32)
    assert len(differ) == 2 * len(tts)


def test_predictnet_switch_adds_a_copy_of_the_up_path() -> None:
    base, with_pn = _build(), _build(predictnet=True)
    assert base.predictnet is None and with_pn.predictnet is not None
    pn = with_pn.predictnet
    expected = (_n(base.unet.up_blocks) + _n(base.temporal.up) + _n(base.paca.up if base.paca else None)
                + _n(base.unet.conv_norm_out) + _n(pn.head))
    assert _n(with_pn) - _n(base) == expected == count_parameters(with_pn)["predictnet"]
    # initialised from the UNet's up path (ControlNet-style)
    src = dict(with_pn.unet.up_blocks.named_parameters())
    assert all(torch.equal(p, src[n]) for n, p in pn.up_blocks.named_parameters())
    assert all(torch.equal(p, q) for p, q in zip(pn.temporal_up.parameters(), with_pn.temporal.up.parameters()))
    # attach_predictnet() adds it later (final training stage) from the then-current weights
    base.attach_predictnet()
    assert base.cfg.predictnet and _n(base) == _n(with_pn)
    # copied from frozen spatial weights, the PredictNet is still trainable (its own group)
    motion_only = _build(freeze=["spatial"])
    motion_only.attach_predictnet()
    groups = parameter_groups(motion_only)
    assert all(p.requires_grad for _, p in groups["predictnet"])
    assert not any(p.requires_grad for _, p in groups["spatial"])


@pytest.mark.parametrize("changes", [{}, {"factorized": False, "predictnet": True}, {"predictnet": True}])
def test_parameter_groups_partition_every_parameter(changes: dict) -> None:
    model = _build(**changes)
    groups = parameter_groups(model)
    assert tuple(groups) == GROUPS
    ids = [id(p) for ps in groups.values() for _, p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    names = {n for ps in groups.values() for n, _ in ps}
    assert names == {n for n, _ in model.named_parameters()}
    present = set(model.cfg.present_groups())
    assert {g for g, ps in groups.items() if ps} == present
    counts = count_parameters(model)
    assert counts["total"] == sum(counts[g] for g in GROUPS) == _n(model)
    assert all(".processor." in n for n, _ in groups["adapter"] if n.startswith("unet."))


def _loss(model: FactorizedDreamerUNet, d: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**d)
    loss = out.sample.square().mean()
    return loss + out.flow.square().mean() if out.flow is not None else loss


@pytest.mark.parametrize("freeze", [[], ["spatial"], ["temporal", "predictnet"], ["adapter", "paca"]])
def test_gradients_reach_exactly_the_trainable_parameters(freeze: list[str]) -> None:
    model = _build(predictnet=True, freeze=freeze).train()
    groups = parameter_groups(model)
    for g in GROUPS:
        assert all(p.requires_grad is (g not in freeze) for _, p in groups[g])
    d = _inputs(model.cfg)
    _loss(model, d).backward()
    for g in GROUPS:
        for name, p in groups[g]:
            assert (p.grad is None) is (g in freeze), name
    if freeze:
        return
    # zero-init output projections leave some upstream grads all-zero on the first step; one
    # optimizer step makes those outputs non-zero and the grads flow
    first_zero = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() == 0]
    assert any(n.startswith("temporal.") for n in first_zero)
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-3)
    opt.step()
    opt.zero_grad()
    _loss(model, d).backward()
    params = dict(model.named_parameters())
    still_zero = [n for n in first_zero if params[n].grad is None or params[n].grad.abs().max() == 0]
    assert still_zero == []


def test_sd15_switches_on_meta_device() -> None:
    meta = torch.device("meta")
    full = FactorizedDreamerUNet.from_preset("sd15", ModelConfig.sd15(), device=meta)
    clip = FactorizedDreamerUNet.from_preset("sd15", ModelConfig.sd15(temporal_text_encoder="clip"), device=meta)
    assert full.device == meta
    tts = _of_type(full, TemporalTransformer)
    inner = sum(m.cross_attn.to_k.out_features for m in tts)
    assert _n(full) - _n(clip) == 2 * inner * (4096 - 768)
