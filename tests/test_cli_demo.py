"""The `fdreamer` command and the main job (`make demo` runs `fdreamer demo`), as a user runs them."""

import json
import subprocess
import sys

import numpy as np

from fdreamer.data.video import probe_video, read_video


def run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "fdreamer.cli.main", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_subcommand():
    out = run("--help")
    assert out.returncode == 0, out.stderr
    for cmd in ("demo", "sample-data", "make-tiny-models", "train-tiny-vae", "vae-psnr", "schedule"):
        assert cmd in out.stdout


def test_schedule_module_plots_fig5(tmp_path):
    png = tmp_path / "fig5.png"
    out = subprocess.run([sys.executable, "-m", "fdreamer.schedule", "--plot", str(png)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"
    summary = json.loads(out.stdout.splitlines()[0])
    assert summary["s"] == 0.125 and summary["alpha_cumprod_last"] == 0.0


def test_demo_end_to_end(tmp_path):
    data, models, out_dir = tmp_path / "data", tmp_path / "models", tmp_path / "runs"
    out = run("demo", "--data", str(data), "--models", str(models), "--out", str(out_dir), "--num-clips", "40")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "reconstruction.mp4" in out.stdout
    report = json.loads((out_dir / "demo.json").read_text())
    assert len((data / "manifest.jsonl").read_text().splitlines()) == 40
    assert report["vae_psnr"]["ok"] and report["vae_psnr"]["psnr_db"] >= 24.0
    assert report["clip"]["latents_shape"] == [1, 4, 8, 16, 16]
    for name in ("vae", "unet", "text_encoder", "tokenizer", "t5", "clip"):
        assert (models / name / ("tokenizer_config.json" if name == "tokenizer" else "config.json")).is_file()
    info = probe_video(out_dir / "reconstruction.mp4")
    assert (info.codec, info.pix_fmt, info.num_frames, info.width, info.height) == ("h264", "yuv420p", 8, 128, 64)
    # left half is the original, right half the VAE round trip: they must look alike
    frames = read_video(out_dir / "reconstruction.mp4", 8).frames.astype(np.float64)
    mse = np.mean((frames[:, :, :64] - frames[:, :, 64:]) ** 2)
    assert 10 * np.log10(255.0**2 / mse) > 22.0
    # a second run reuses data and models (idempotent) and succeeds again
    again = run("demo", "--data", str(data), "--models", str(models), "--out", str(out_dir), "--num-clips", "40")
    assert again.returncode == 0, again.stderr
