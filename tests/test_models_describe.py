"""``fdreamer describe-model``: per-component parameter table (meta device) for the tiny and sd15 presets."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from fdreamer.cli import main as cli
from fdreamer.cli.describe import COMPONENTS
from fdreamer.models import (
    SD15_UNET_CONFIG,
    SD15_UNET_PARAMETERS,
    FactorizedDreamerUNet,
    ModelConfig,
    count_parameters,
)
from fdreamer.toy.tiny_models import TINY_UNET_CONFIG


def _describe_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert cli.main(["describe-model", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("preset,unet_config", [("tiny", TINY_UNET_CONFIG), ("sd15", SD15_UNET_CONFIG)])
def test_describe_model_counts_add_up(capsys: pytest.CaptureFixture[str], preset: str, unet_config: dict) -> None:
    info = _describe_json(capsys, "--preset", preset)
    counts = info["parameters"]
    assert set(counts) == {*COMPONENTS, "total"}
    assert counts["total"] == sum(counts[c] for c in COMPONENTS)
    assert all(counts[c] > 0 for c in COMPONENTS)  # full model of Table 4 (e), PredictNet included
    with torch.device("meta"):
        unet2d = UNet2DConditionModel(**unet_config)
    assert counts["spatial"] == sum(p.numel() for p in unet2d.parameters())
    if preset == "sd15":
        assert counts["spatial"] == SD15_UNET_PARAMETERS == 859_520_964
    cfg = ModelConfig.sd15 if preset == "sd15" else ModelConfig.tiny
    model = FactorizedDreamerUNet.from_preset(preset, cfg(predictnet=True), device="meta")
    assert count_parameters(model) == counts


def test_describe_model_table_and_switches(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["describe-model", "--preset", "sd15"]) == 0
    table = capsys.readouterr().out
    assert "859,520,964" in table and "PredictNet (Eq. 4)" in table and "total" in table
    full = _describe_json(capsys, "--preset", "sd15")["parameters"]
    infer = _describe_json(capsys, "--preset", "sd15", "--no-predictnet")["parameters"]
    assert infer["predictnet"] == 0 and infer["total"] == full["total"] - full["predictnet"]
    direct = _describe_json(capsys, "--preset", "sd15", "--no-predictnet", "--direct")["parameters"]
    assert direct["total"] == infer["total"] - infer["adapter"] - infer["paca"]
    clip = _describe_json(capsys, "--preset", "sd15", "--temporal-text-encoder", "clip")
    assert clip["config"]["temporal_text_encoder"] == "clip"
    assert clip["parameters"]["spatial"] == full["spatial"] and clip["parameters"]["temporal"] < full["temporal"]
