"""The committed tiny VAE: loads through the same loader as any VAE and reconstructs held-out sample
frames at >= 24 dB PSNR (so the demo's videos are pictures, not noise)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fdreamer.encoders import load_vae
from fdreamer.toy.sample_data import write_sample_data
from fdreamer.toy.tiny_models import TINY_VAE_ASSET_DIR
from fdreamer.toy.vae_train import PSNR_TARGET_DB, TINY_VAE_CONFIG, load_frames, psnr_uint8, reconstruct, vae_psnr


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    write_sample_data(out, num_clips=48, workers=1)
    return out


def test_asset_is_the_tiny_config_and_trained():
    vae = load_vae(TINY_VAE_ASSET_DIR)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    for key in ("block_out_channels", "latent_channels", "down_block_types"):
        assert tuple(np.atleast_1d(vae.config[key])) == tuple(np.atleast_1d(TINY_VAE_CONFIG[key]))
    assert 0.95e6 < sum(p.numel() for p in vae.parameters()) < 0.96e6
    report = json.loads((Path(TINY_VAE_ASSET_DIR) / "training.json").read_text())
    assert report["heldout_psnr_db"] >= PSNR_TARGET_DB
    # the scaling factor makes training latents roughly unit-variance (SD's 0.18215 would not)
    assert vae.config.scaling_factor == pytest.approx(report["scaling_factor"])
    assert vae.config.scaling_factor != pytest.approx(0.18215, rel=0.05)


def test_heldout_psnr_at_least_24db(sample_dir):
    report = vae_psnr(TINY_VAE_ASSET_DIR, sample_dir)
    assert report["frames"] > 0 and report["split"] == "heldout"
    assert report["psnr_db"] >= PSNR_TARGET_DB, report
    assert report["ok"] is True


def test_psnr_is_not_trivially_high(sample_dir):
    """A random-init VAE of the same shape must fail the bar, or the bar measures nothing."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    random_vae = AutoencoderKL(**TINY_VAE_CONFIG).eval()
    frames = load_frames(sample_dir, "heldout")[:16]
    assert psnr_uint8(frames, reconstruct(random_vae, frames)) < 15.0
    assert psnr_uint8(frames, frames) == float("inf")


def test_vae_psnr_command_prints_json(sample_dir):
    out = subprocess.run(
        [sys.executable, "-m", "fdreamer.cli.main", "vae-psnr", "--vae", str(TINY_VAE_ASSET_DIR), "--data", str(sample_dir)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["psnr_db"] >= PSNR_TARGET_DB
