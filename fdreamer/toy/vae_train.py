"""Train the tiny VAE on the sample clips' frames, and measure its reconstruction PSNR.

The tiny preset needs a VAE whose decode(encode(x)) is a picture, not noise, or no demo video could be
judged. This trains a ~0.95M-parameter diffusers ``AutoencoderKL`` (downsampling factor 4, 4 latent
channels like SD) on frames of the sample clips' *train* split and reports PSNR on the *heldout* split.

    fdreamer train-tiny-vae --data data/sample --out fdreamer/toy/assets/tiny_vae   # ~10 min on 2 cores
    fdreamer vae-psnr --vae fdreamer/toy/assets/tiny_vae --data data/sample

After training, ``scaling_factor`` in the saved config is set to 1/std of the training latents (as SD's
0.18215 was chosen), so the diffusion model sees unit-variance latents.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

# The tiny VAE: a ~0.95M-parameter diffusers AutoencoderKL, downsampling factor 4
# (3 blocks -> 2 downsamplers), 4 latent channels like SD, so 64x64 frames give 16x16 latents.
TINY_VAE_CONFIG: dict = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=64,
    scaling_factor=0.18215,
)
FRAME_SIZE = 64  # the tiny profile's pixel size (latents 16x16)
PSNR_TARGET_DB = 24.0


def load_frames(data_dir: str | Path, split: str, *, frames_per_clip: int = 4, size: int = FRAME_SIZE) -> np.ndarray:
    """uint8 frames [N, size, size, 3] from the clips of one split of a sample-data folder."""
    from fdreamer.data.video import read_video

    manifest = Path(data_dir) / "manifest.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: run `fdreamer sample-data {data_dir}` first")
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] == split]
    if not rows:
        raise ValueError(f"no clips with split={split!r} in {manifest}")
    out = []
    for r in rows:
        path = Path(r["path"])
        path = path if path.is_absolute() else Path(data_dir) / path
        n = r["num_frames"]
        clip = read_video(path, frames_per_clip, stride=max(1, n // frames_per_clip), size=size)
        out.append(clip.frames)
    return np.concatenate(out)  # [(clips * frames_per_clip), H, W, 3]


def _to_tensor(frames: np.ndarray):
    import torch
    from einops import rearrange

    x = torch.from_numpy(frames).float() / 127.5 - 1.0
    return rearrange(x, "n h w c -> n c h w")


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 arrays of the same shape (peak 255)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def reconstruct(vae, frames: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """decode(encode(x)) with the posterior mean, as uint8."""
    import torch
    from einops import rearrange

    outs = []
    with torch.no_grad():
        for i in range(0, len(frames), batch_size):
            x = _to_tensor(frames[i : i + batch_size])
            y = vae.decode(vae.encode(x).latent_dist.mean).sample
            y = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            outs.append(rearrange(y, "n c h w -> n h w c").numpy())
    return np.concatenate(outs)


def train_tiny_vae(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    steps: int = 1500,
    batch_size: int = 16,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    log_every: int = 100,
) -> dict:
    """Train the tiny VAE and save it in diffusers layout to ``out_dir``; returns a report."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    train = load_frames(data_dir, "train")
    held = load_frames(data_dir, "heldout")
    print(f"[vae] {len(train)} train frames, {len(held)} heldout frames ({time.time() - t0:.1f}s to decode)")
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    vae.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = rng.integers(0, len(train), batch_size)
        batch = train[idx]
        if rng.random() < 0.5:  # horizontal flip augmentation
            batch = batch[:, :, ::-1]
        x = _to_tensor(np.ascontiguousarray(batch))
        post = vae.encode(x).latent_dist
        y = vae.decode(post.sample()).sample
        rec = (y - x).abs().mean() + ((y - x) ** 2).mean()
        kl = post.kl().mean() / x[0].numel()
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            print(f"[vae] step {step}/{steps} loss {loss.item():.4f} ({(time.time() - t0) / step:.2f}s/step)", flush=True)
    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(_to_tensor(train[i : i + 64])).latent_dist.mean for i in range(0, min(len(train), 1024), 64)])
    scaling = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scaling)
    out_dir = Path(out_dir)
    vae.save_pretrained(out_dir, safe_serialization=True)
    held_psnr = psnr_uint8(held, reconstruct(vae, held))
    report = {
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "train_seconds": round(time.time() - t0, 1),
        "params": sum(p.numel() for p in vae.parameters()),
        "scaling_factor": scaling,
        "heldout_psnr_db": round(held_psnr, 2),
        "heldout_frames": len(held),
    }
    (out_dir / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def vae_psnr(vae_dir: str | Path, data_dir: str | Path, split: str = "heldout") -> dict:
    """Reconstruction PSNR of a saved VAE on one split of the sample data, loaded like any other VAE."""
    from fdreamer.encoders import load_vae

    vae = load_vae(vae_dir)
    frames = load_frames(data_dir, split)
    value = psnr_uint8(frames, reconstruct(vae, frames))
    return {"vae": str(vae_dir), "split": split, "frames": len(frames), "psnr_db": round(value, 2),
            "target_db": PSNR_TARGET_DB, "ok": value >= PSNR_TARGET_DB}


def _train_cmd(args: argparse.Namespace) -> int:
    report = train_tiny_vae(args.data, args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    print(json.dumps(report))
    return 0 if report["heldout_psnr_db"] >= PSNR_TARGET_DB else 1


def _psnr_cmd(args: argparse.Namespace) -> int:
    report = vae_psnr(args.vae, args.data, args.split)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


def register_cli(sub) -> None:
    p = sub.add_parser("train-tiny-vae", help="train the tiny VAE on sample-data frames (diffusers layout)")
    p.add_argument("--data", required=True, help="a folder written by `fdreamer sample-data`")
    p.add_argument("--out", required=True, help="output folder (diffusers AutoencoderKL layout)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_train_cmd)
    q = sub.add_parser("vae-psnr", help="decode(encode(x)) PSNR of a VAE folder on sample-data frames")
    q.add_argument("--vae", required=True, help="a diffusers AutoencoderKL folder (e.g. models/tiny/vae)")
    q.add_argument("--data", required=True, help="a folder written by `fdreamer sample-data`")
    q.add_argument("--split", default="heldout", choices=["train", "heldout"])
    q.set_defaults(func=_psnr_cmd)
