"""``fdreamer export-video-model`` and the committed I2V's installation: a trained video stage handed on as
an inference checkpoint (EMA folded in, no trainer state) that ``make-tiny-models`` installs as ``i2v/``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers.checkpoints import tiny_checkpoint
from safetensors.torch import load_file, save_file


def _ema_checkpoint(tmp_path: Path, models_dir: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    ckpt = tiny_checkpoint(tmp_path / "ckpt", models_dir, conditioned=True, meta={"t5_caption": "motion_caption"})
    live = load_file(str(ckpt / "model.safetensors"))
    ema = {k: v + 0.01 for k, v in live.items() if k.startswith(("unet.", "temporal"))}  # EMA != live weights
    save_file(ema, str(ckpt / "ema.safetensors"))
    return ckpt, ema


def test_export_folds_the_ema_in_and_keeps_the_meta(tiny_dir: Path, tmp_path: Path) -> None:
    from fdreamer.checkpoint import load_model, read_meta
    from fdreamer.cli.main import main as cli_main

    ckpt, ema = _ema_checkpoint(tmp_path, tiny_dir)
    out = tmp_path / "export"
    assert cli_main(["export-video-model", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert not (out / "ema.safetensors").exists()
    exported = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(exported[k], v) for k, v in ema.items())  # the EMA, not the live weights
    reference, again = load_model(ckpt, use_ema=True).model.state_dict(), load_model(out).model.state_dict()
    assert reference.keys() == again.keys() and all(torch.equal(reference[k], again[k]) for k in reference)
    meta = read_meta(out)
    assert (meta["t5_caption"], meta["weights"], meta["exported_from"]) == ("motion_caption", "ema", str(ckpt))
    assert (meta["num_frames"], meta["size"]) == (8, 64)

    other = tmp_path / "models_elsewhere"  # --models_dir: the encoders the export will be used with
    assert cli_main(["export-video-model", "--checkpoint", str(ckpt), "--out", str(out), "--models_dir", str(other)]) == 0
    assert yaml.safe_load((out / "encoders.yaml").read_text())["t5"] == str(other / "t5")
    assert cli_main(["export-video-model", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_make_tiny_models_installs_a_trained_i2v_asset(tiny_dir: Path, no_asset: Path, tmp_path: Path) -> None:
    """The committed I2V asset becomes ``i2v/`` with encoders.yaml naming the folder's own encoders, so
    it loads and generates from there; not with a random VAE (its latents are the trained VAE's)."""
    from conftest import make_untrained_tiny_models

    from fdreamer.checkpoint import export_video_model, load_model
    from fdreamer.encoders import EncoderConfig
    from fdreamer.toy.tiny_models import make_tiny_models

    ckpt, _ = _ema_checkpoint(tmp_path, tiny_dir)
    asset = tmp_path / "assets" / "tiny_i2v"
    export_video_model(ckpt, asset)
    (asset / "training.json").write_text("{}")
    random_vae = make_untrained_tiny_models(tmp_path / "random", vae_asset_dir=no_asset, i2v_asset_dir=asset)
    assert random_vae["i2v_trained"] is False and not (tmp_path / "random" / "i2v").exists()

    out = tmp_path / "models"
    before = make_tiny_models(out, t2i_asset_dir=no_asset.parent / "tiny_t2i", i2v_asset_dir=tmp_path / "none")
    assert before["i2v_trained"] is False and not (out / "i2v").exists()
    after = make_tiny_models(out, t2i_asset_dir=no_asset.parent / "tiny_t2i", i2v_asset_dir=asset)  # rebuilt
    assert after["i2v_trained"] is True and "i2v" in after["components"]
    assert (out / "i2v" / "model.safetensors").read_bytes() == (asset / "model.safetensors").read_bytes()
    assert not (out / "i2v" / "training.json").exists()
    loaded = load_model(out / "i2v")
    assert loaded.encoders == EncoderConfig.tiny(out.resolve())
    assert json.loads((out / "i2v" / "fdreamer_checkpoint.json").read_text())["weights"] == "ema"


@pytest.mark.parametrize("missing", ["model.safetensors", "model.yaml"])
def test_an_incomplete_i2v_asset_is_not_installed(tmp_path: Path, missing: str) -> None:
    from fdreamer.toy.tiny_models import trained_i2v

    asset = tmp_path / "tiny_i2v"
    asset.mkdir()
    for name in ("model.safetensors", "model.yaml", "unet_config.json", "schedule.yaml", "fdreamer_checkpoint.json"):
        (asset / name).write_text("x")
    assert trained_i2v(asset) == asset
    (asset / missing).unlink()
    assert trained_i2v(asset) is None
