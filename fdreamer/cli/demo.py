"""``fdreamer demo``: the main job end to end on the embedded default (the README's first command).

Today it runs what exists: sample clips -> tiny models -> tiny-VAE PSNR -> Fig. 5 -> a clip encoded to
latents and decoded back to an mp4. Each later capability (preprocess, train, serve) extends this.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _step(name: str):
    print(f"==> {name}", flush=True)
    return time.time()


def run_demo(data_dir: Path, models_dir: Path, out_dir: Path, num_clips: int = 320) -> dict:
    import numpy as np

    from fdreamer.encoders import EncoderConfig, FrozenEncoders
    from fdreamer.toy.sample_data import write_sample_data
    from fdreamer.schedule import ScheduleConfig, plot_figure5, summary
    from fdreamer.toy.tiny_models import make_tiny_models
    from fdreamer.toy.vae_train import vae_psnr
    from fdreamer.data.video import read_video, write_video

    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {}

    t = _step(f"sample clips -> {data_dir}")
    report["sample_data"] = write_sample_data(data_dir, num_clips=num_clips)
    print(f"    {time.time() - t:.1f}s")

    t = _step(f"tiny models -> {models_dir}")
    make_tiny_models(models_dir)
    print(f"    {time.time() - t:.1f}s")

    t = _step("tiny VAE reconstruction PSNR on held-out frames")
    report["vae_psnr"] = vae_psnr(models_dir / "vae", data_dir)
    print(f"    {json.dumps(report['vae_psnr'])}")

    t = _step("noise schedule (paper §3.3, Fig. 5)")
    report["fig5"] = str(plot_figure5(out_dir / "fig5_log_snr.png", s=0.125))
    report["schedule_stage1"] = summary(ScheduleConfig(num_frames=32, height=256, width=256))
    report["schedule_stage2"] = summary(ScheduleConfig(num_frames=16, height=512, width=512))
    print(f"    wrote {report['fig5']}")

    t = _step("a held-out clip: decode 8 frames at 64x64 -> VAE latents -> decode -> mp4")
    rows = [json.loads(x) for x in (data_dir / "manifest.jsonl").read_text().splitlines() if x.strip()]
    row = next(r for r in rows if r["split"] == "heldout")
    clip_path = Path(row["path"]) if Path(row["path"]).is_absolute() else data_dir / row["path"]
    clip = read_video(clip_path, 8, stride=2, size=64)
    encoders = FrozenEncoders.load(EncoderConfig.tiny(models_dir), components=("vae",))
    latents = encoders.encode_video(clip.frames[None])  # [1, 4, 8, 16, 16]
    recon = encoders.decode_latents(latents)[0]  # [8, 64, 64, 3] uint8
    recon = recon.numpy() if hasattr(recon, "numpy") else np.asarray(recon)
    side_by_side = np.concatenate([clip.frames, recon], axis=2)  # 't h w c', original | reconstruction
    report["reconstruction_mp4"] = str(write_video(out_dir / "reconstruction.mp4", side_by_side, fps=clip.fps))
    report["clip"] = {"path": str(clip_path), "caption": row["caption"], "motion_caption": row["motion_caption"],
                      "latents_shape": list(latents.shape)}
    print(f"    {row['motion_caption']!r}: latents {list(latents.shape)} -> {report['reconstruction_mp4']}")

    (out_dir / "demo.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def _cmd(args: argparse.Namespace) -> int:
    t0 = time.time()
    report = run_demo(Path(args.data), Path(args.models), Path(args.out), args.num_clips)
    print("\nDone in %.0fs. Results:" % (time.time() - t0))
    print(f"  sample clips + manifests : {args.data}/ (webvid.csv, pexels.csv, manifest.jsonl)")
    print(f"  tiny models              : {args.models}/")
    print(f"  tiny VAE held-out PSNR   : {report['vae_psnr']['psnr_db']} dB (target {report['vae_psnr']['target_db']})")
    print(f"  Fig. 5                   : {report['fig5']}")
    print(f"  VAE round-trip video     : {report['reconstruction_mp4']}")
    print(f"  report                   : {args.out}/demo.json")
    return 0 if report["vae_psnr"]["ok"] else 1


def register_cli(sub) -> None:
    p = sub.add_parser("demo", help="run the main job end to end on the embedded default data")
    p.add_argument("--data", default="data/sample", help="where the sample clips go")
    p.add_argument("--models", default="models/tiny", help="where the tiny models go")
    p.add_argument("--out", default="runs/demo", help="where results go")
    p.add_argument("--num-clips", type=int, default=320)
    p.set_defaults(func=_cmd)
