"""``fdreamer export-image-model``: a checkpoint's spatial UNet as an SD-layout ``unet/`` + ``scheduler/``
(what a text-to-image stage hands to the next stage's ``pretrained_unet`` and to the T2I step)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers.checkpoints import tiny_checkpoint, tiny_schedule
from safetensors.torch import load_file, save_file


def test_export_is_the_image_unet_with_ema_weights_and_the_training_schedule(tiny_dir: Path, tmp_path: Path) -> None:
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from fdreamer.checkpoint import load_model
    from fdreamer.cli.main import main as cli_main
    from fdreamer.models import FactorizedDreamerUNet, ModelConfig
    from fdreamer.schedule import NoiseSchedule

    ckpt = tiny_checkpoint(tmp_path / "ckpt", tiny_dir, schedule=tiny_schedule(prediction_type="v_prediction"))
    live = load_file(str(ckpt / "model.safetensors"))
    ema = {k: v + 0.01 for k, v in live.items() if k.startswith("unet.")}  # EMA differs from the live weights
    save_file(ema, str(ckpt / "ema.safetensors"))
    assert cli_main(["export-image-model", "--checkpoint", str(ckpt), "--out", str(tmp_path / "t2i")]) == 0

    unet = UNet2DConditionModel.from_pretrained(tmp_path / "t2i" / "unet", local_files_only=True).eval()
    reference = load_model(ckpt, use_ema=True).model.image_unet()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    text = torch.randn(2, 5, unet.config.cross_attention_dim)
    with torch.no_grad():
        assert torch.equal(unet(x, t, text).sample, reference(x, t, text).sample)
    got = unet.state_dict()
    assert all(torch.equal(got[k.removeprefix("unet.")], v) for k, v in ema.items() if ".processor." not in k)

    # the next stage's pretrained_unet reads the export as it reads SD's (root folder holding unet/)
    video = FactorizedDreamerUNet.from_pretrained_unet(tmp_path / "t2i", ModelConfig.tiny())
    assert torch.equal(video.unet.conv_in.weight, got["conv_in.weight"])

    sched = DDIMScheduler.from_pretrained(tmp_path / "t2i" / "scheduler", local_files_only=True)
    ours = NoiseSchedule(tiny_schedule(prediction_type="v_prediction"))
    assert sched.config.prediction_type == "v_prediction" and sched.config.timestep_spacing == "trailing"
    assert torch.allclose(sched.alphas_cumprod.double(), ours.alphas_cumprod.double(), atol=1e-6)


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path: Path, capsys) -> None:
    from fdreamer.cli.main import main as cli_main

    assert cli_main(["export-image-model", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fdreamer export-image-model:"), err
    assert not (tmp_path / "o").exists()


def test_make_tiny_models_installs_a_trained_t2i_asset(tiny_dir: Path, no_asset: Path, tmp_path: Path) -> None:
    """A committed T2I asset (an export's ``unet/`` + ``scheduler/``) becomes the tiny models' ``unet/`` and
    ``scheduler/`` byte for byte; a folder made before the asset existed is rebuilt once it does."""
    from conftest import make_untrained_tiny_models

    from fdreamer.checkpoint import export_image_model

    asset = tmp_path / "assets" / "tiny_t2i"
    out = tmp_path / "models"
    before = make_untrained_tiny_models(out, vae_asset_dir=no_asset, t2i_asset_dir=asset)  # no asset yet
    assert before["unet_trained"] is False and not (out / "scheduler").exists()
    assert not (out / "model_index.json").exists()  # a random UNet is no T2I model
    ckpt = tiny_checkpoint(tmp_path / "ckpt", tiny_dir, seed=7)
    export_image_model(ckpt, asset)
    after = make_untrained_tiny_models(out, vae_asset_dir=no_asset, t2i_asset_dir=asset)
    assert after["unet_trained"] is True and "trained text-to-image" in after["components"]["unet"]
    for f in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        assert (out / f).read_bytes() == (asset / f).read_bytes(), f
    assert (out / "vae" / "config.json").is_file()  # the other components are written as before
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)  # DIR is an SD folder now
    assert pipe.safety_checker is None and type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.prediction_type == json.loads((asset / "scheduler" / "scheduler_config.json")
                                                               .read_text())["prediction_type"]
