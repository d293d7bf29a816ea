"""Benchmark: the measured inputs of the scale plan (cluster/README.md). Prints ONE JSON line.

    python tests/bench/bench_costs.py [--clips 32] [--summary OUT/summary.json] [--quick]

1. **Data** — runs the preprocessing job (``pipelines/configs/tiny.yaml``, tiny models with the trained
   VAE) on ``--clips`` sample clips against a fresh 2-CPU ``ray start`` head
   (``tests/helpers/datasets.py``), or reads an existing output (``--summary``). From its shards'
   Parquet metadata: compressed and uncompressed bytes per clip of each column (-> the zstd ratio of
   each tensor column), the average unpadded T5 caption length, and from ``summary.json`` the
   worker-seconds per clip of each stage (hash, decode, encode, flow, write).
2. **FLOPs** — ``torch.utils.flop_counter.FlopCounterMode`` over one forward pass of models built on
   the meta device (no weights, no memory): the SD1.5 VAE encoder (diffusers ``AutoencoderKL``, SD
   config) per frame at 256² and 512², the T5-XXL encoder (t5-v1_1-xxl config) per caption of the
   measured length, CLIP ViT-L/14 vision tower per image (224²), SD's CLIP text encoder per caption
   (77 tokens), and the ``sd15`` Factorized-Dreamer UNet per video at the stage 1/2/3 shapes.
   Parameter counts of the same modules.
3. **Projections** — bytes at the sd15 shapes, storage for 19M clips, encoder GPU-hours, training
   days on 40 A100 at ``--mfu`` (see cluster/README.md for how each is derived).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
for p in (str(REPO), str(REPO / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

CLIPS_19M = 19_000_000
A100_BF16_TFLOPS = 312.0  # dense bf16/fp16 tensor-core peak, A100 SXM
PROFILES = {"stage1": {"frames": 32, "size": 256}, "stage2": {"frames": 16, "size": 512}}
TRAIN = {"stage1": {"frames": 32, "latent": 32, "steps": 400_000, "predictnet": False},
         "stage2": {"frames": 16, "latent": 64, "steps": 300_000, "predictnet": False},
         "stage3": {"frames": 16, "latent": 64, "steps": 100_000, "predictnet": True}}
GLOBAL_BATCH = 40
GPUS = 40
# Assumed source video (WebVid-10M previews: ~596x336 at ~30 fps); the measured sample clips are read
# from the shards (source_width/height, their frame rate from the first sample file).
SOURCE = {"width": 596, "height": 336, "fps": 30.0}
PROFILE_FPS = 8.0
CPUS = {"gpu_nodes_free": 5 * 90 - 40 * 4, "cpu_pool_max": 40 * 30}  # KubeRay pods; 4 CPUs per encode actor


# ----------------------------------------------------------------------------- 1. data


def run_preprocess(clips: int, workdir: Path) -> Path:
    from helpers.datasets import preprocess_sample
    from helpers.ray_cluster import running_ray_head

    with running_ray_head(workdir / "head", num_cpus=2) as head:
        data = preprocess_sample(workdir / "data", head["address"], num_clips=clips)
    return Path(data["output"])


def measure_data(output: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    summary = json.loads((output / "summary.json").read_text())
    comp: dict[str, float] = {}
    raw: dict[str, float] = {}
    rows = 0
    t5_lens: list[int] = []
    shapes: dict[str, list[int]] = {}
    for f in sorted((output / "shards").glob("part-*.parquet")):
        meta = pq.ParquetFile(f).metadata
        rows += meta.num_rows
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                name = col.path_in_schema.split(".")[0]
                comp[name] = comp.get(name, 0) + col.total_compressed_size
                raw[name] = raw.get(name, 0) + col.total_uncompressed_size
        table = pq.read_table(f, columns=[c for c in pq.read_schema(f).names if c.endswith("_shape")])
        for col in table.column_names:
            values = table.column(col).to_pylist()
            shapes.setdefault(col.removesuffix("_shape"), list(values[0]))
            if col == "t5_shape":
                t5_lens += [int(v[0]) for v in values]
    per_clip = {k: round(v / rows, 1) for k, v in sorted(comp.items())}
    first = pq.read_table(min((output / "shards").glob("part-*.parquet")),
                          columns=["source_width", "source_height", "fps", "num_frames"]).to_pylist()[0]
    flow_shape = shapes["flow"]  # [2, T-1, h, w]
    ratio = {k: round(raw[k] / comp[k], 3) for k in sorted(comp) if comp[k] > 0}
    stage_s = {k: round(v["worker_s"] / max(v["clips"], 1), 4) for k, v in summary["stages"].items()}
    return {"rows": rows, "bytes_per_clip_by_column": per_clip, "summary_bytes_per_clip_by_column":
            summary["bytes_per_clip_by_column"], "compression_ratio_by_column": ratio,
            "tiny_shapes": shapes, "tiny_flow_pairs_pixels": flow_shape[1] * flow_shape[2] * flow_shape[3],
            "sample_source": _sample_source(output, first), "t5_tokens_mean": round(statistics.mean(t5_lens), 2) if t5_lens else None,
            "worker_s_per_clip": stage_s, "pass2_s": summary.get("pass2_s"), "clips_per_s": summary.get("clips_per_s")}


def _sample_source(output: Path, row: dict[str, Any]) -> dict[str, Any]:
    """Source size of the sample clips and the frames decoded per clip (the whole short sample video)."""
    import av

    clips = sorted((output.parent.parent / "data" / "sample").glob("**/*.mp4")) or sorted(
        (output.parent / "sample").glob("**/*.mp4"))
    frames = None
    if clips:
        with av.open(str(clips[0])) as c:
            frames = c.streams.video[0].frames or None
    return {"width": row["source_width"], "height": row["source_height"],
            "frames_decoded": frames or row["num_frames"] * 2}


# ----------------------------------------------------------------------------- 2. FLOPs (meta device)


def _count(module: Any, *args: Any, **kwargs: Any) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        module(*args, **kwargs)
    return float(fc.get_total_flops())


def _params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def encoder_flops(t5_tokens: int) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    out: dict[str, Any] = {}
    with torch.device("meta"):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                            block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        t5 = T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                                     feed_forward_proj="gated-gelu", vocab_size=32128))
        clip_v = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                                               num_hidden_layers=24, num_attention_heads=16,
                                                               image_size=224, patch_size=14, projection_dim=768))
        clip_t = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, max_position_embeddings=77, vocab_size=49408))
    enc = torch.nn.Sequential(vae.encoder, vae.quant_conv)
    out["vae_encoder_params"] = _params(enc)
    for size in (256, 512):
        out[f"vae_encode_gflops_per_frame_{size}"] = round(_count(enc, torch.empty(1, 3, size, size, device="meta")) / 1e9, 2)
    out["t5_xxl_encoder_params"] = _params(t5)
    tok = max(1, round(float(t5_tokens)))
    out["t5_tokens"] = tok
    out["t5_xxl_gflops_per_caption"] = round(_count(t5, input_ids=torch.zeros(1, tok, dtype=torch.long, device="meta")) / 1e9, 2)
    out["clip_vit_l14_vision_params"] = _params(clip_v)
    out["clip_vit_l14_gflops_per_image"] = round(_count(clip_v, pixel_values=torch.empty(1, 3, 224, 224, device="meta")) / 1e9, 2)
    out["sd_clip_text_params"] = _params(clip_t)
    out["sd_clip_text_gflops_per_caption"] = round(_count(clip_t, input_ids=torch.zeros(1, 77, dtype=torch.long, device="meta")) / 1e9, 2)
    return out


def unet_flops() -> dict[str, Any]:
    import torch

    from fdreamer.models import FactorizedDreamerUNet, preset_model_config

    out: dict[str, Any] = {}
    for stage, s in TRAIN.items():
        cfg = preset_model_config("sd15", predictnet=s["predictnet"])
        model = FactorizedDreamerUNet.from_preset("sd15", cfg, device="meta").train()
        model._check_inputs = lambda *a, **k: None  # its value checks call .item(), impossible on meta
        f, h = s["frames"], s["latent"]
        meta = {"device": "meta"}
        flops = _count(model, torch.empty(1, 4, f, h, h, **meta), torch.tensor([500], **meta),
                       torch.empty(1, 77, model.cross_attention_dim, **meta),
                       image_embed=torch.empty(1, cfg.image_embed_dim, **meta),
                       first_frame=torch.empty(1, 4, h, h, **meta),
                       t5_tokens=torch.empty(1, 24, cfg.t5_dim, **meta),
                       t5_mask=torch.ones(1, 24, dtype=torch.bool, **meta), return_flow=s["predictnet"])
        out[stage] = {"params": _params(model), "forward_tflops_per_video": round(flops / 1e12, 3)}
    return out


# ----------------------------------------------------------------------------- 3. projections


def project(data: dict[str, Any], enc: dict[str, Any], unet: dict[str, Any], mfu: float) -> dict[str, Any]:
    fp16 = 2
    t5_tok = enc["t5_tokens"]
    ratio = data["compression_ratio_by_column"]
    storage: dict[str, Any] = {}
    for stage, p in PROFILES.items():
        t, s = p["frames"], p["size"]
        raw = {"latents": 4 * t * (s // 8) ** 2 * fp16, "first_latent": 4 * (s // 8) ** 2 * fp16, "flow": 2 * (t - 1) * (s // 8) ** 2 * fp16,
               "clip_text_tokens": 77 * 768 * fp16, "t5": t5_tok * 4096 * fp16, "clip_image_embed": 768 * fp16,
               "clip_text_embed": 768 * fp16}
        # stored = raw / the zstd ratio measured on the same column of the tiny data (1.0 if not measured)
        stored = {k: round(v / max(ratio.get(k, 1.0), 1.0)) for k, v in raw.items()}
        other = sum(v for k, v in data["bytes_per_clip_by_column"].items() if k not in raw and not k.endswith(("_shape", "_dtype")))
        per_clip = sum(stored.values()) + other
        storage[stage] = {"raw_bytes_per_clip": raw, "stored_bytes_per_clip": stored,
                          "metadata_bytes_per_clip": round(other), "bytes_per_clip": round(per_clip),
                          "total_tb_19m": round(per_clip * CLIPS_19M / 1e12, 2)}
    gpu: dict[str, Any] = {}
    for stage, p in PROFILES.items():
        t, s = p["frames"], p["size"]
        fl = {"vae": t * enc[f"vae_encode_gflops_per_frame_{s}"] * 1e9, "t5_xxl": enc["t5_xxl_gflops_per_caption"] * 1e9,
              "clip_image": enc["clip_vit_l14_gflops_per_image"] * 1e9, "sd_clip_text": enc["sd_clip_text_gflops_per_caption"] * 1e9}
        tot = sum(fl.values())
        # inference in fp16 at the stated fraction of peak (encoders: big convs / GEMMs)
        hours = tot * CLIPS_19M / (A100_BF16_TFLOPS * 1e12 * mfu) / 3600
        gpu[stage] = {"tflops_per_clip": {k: round(v / 1e12, 4) for k, v in fl.items()},
                      "tflops_per_clip_total": round(tot / 1e12, 3), "a100_hours_19m": round(hours),
                      "hours_on_40_a100": round(hours / GPUS, 1)}
    # CPU: measured worker-seconds per clip scaled linearly by decoded source pixels (decode, hash: every
    # source frame of the clip's span is decoded) or by flow pixels x frame pairs (DIS is linear in pixels).
    w = data["worker_s_per_clip"]
    src = data["sample_source"]
    tiny_decoded = src["frames_decoded"] * src["width"] * src["height"]
    tiny_flow = data["tiny_flow_pairs_pixels"]
    cpu: dict[str, Any] = {}
    for stage, p in PROFILES.items():
        t, s = p["frames"], p["size"]
        span = t / PROFILE_FPS * SOURCE["fps"]
        dec_scale = span * SOURCE["width"] * SOURCE["height"] / tiny_decoded
        flow_scale = (t - 1) * (s // 8) ** 2 / tiny_flow
        per = {"hash": w["hash"] * dec_scale, "decode": w["decode"] * dec_scale, "flow": w["flow"] * flow_scale}
        gpu_rate = A100_BF16_TFLOPS * mfu / gpu[stage]["tflops_per_clip_total"] * GPUS  # clips/s on 40 GPUs
        pass2_cores = (per["decode"] + per["flow"]) * gpu_rate
        cores = CPUS["gpu_nodes_free"] + CPUS["cpu_pool_max"]
        cpu[stage] = {"core_s_per_clip": {k: round(v, 3) for k, v in per.items()},
                      "decode_scale": round(dec_scale, 1), "flow_scale": round(flow_scale, 1),
                      "gpu_clips_per_s_40": round(gpu_rate, 1),
                      "pass2_cores_to_keep_gpus_busy": round(pass2_cores),
                      "pass2_decode_cores": round(per["decode"] * gpu_rate), "pass2_flow_cores": round(per["flow"] * gpu_rate),
                      "pass1_hours_on_cores": round(per["hash"] * CLIPS_19M / cores / 3600, 1),
                      "pass2_hours": round(max(gpu[stage]["hours_on_40_a100"],
                                               (per["decode"] + per["flow"]) * CLIPS_19M / cores / 3600), 1),
                      "cores": cores}
    # Writing: one write_shard task (pipelines/job.py); measured s/clip scaled by stored bytes per clip.
    tiny_bytes = sum(v for k, v in data["bytes_per_clip_by_column"].items())
    for stage in PROFILES:
        cpu[stage]["write_s_per_clip_one_task"] = round(w["write"] * storage[stage]["bytes_per_clip"] / tiny_bytes, 4)
        cpu[stage]["write_clips_per_s_one_task"] = round(1 / max(cpu[stage]["write_s_per_clip_one_task"], 1e-9), 1)
    train: dict[str, Any] = {}
    total_days = 0.0
    for stage, s in TRAIN.items():
        fwd = unet[stage]["forward_tflops_per_video"] * 1e12
        model_flops = 3 * fwd * GLOBAL_BATCH  # forward + backward (2x) per video; MFU counts these
        step_s = model_flops / (GPUS * A100_BF16_TFLOPS * 1e12 * mfu)
        days = step_s * s["steps"] / 86400
        total_days += days
        train[stage] = {"model_tflops_per_step": round(model_flops / 1e12, 1),
                        "hardware_tflops_per_step_with_ckpt": round(4 * fwd * GLOBAL_BATCH / 1e12, 1),
                        "step_s": round(step_s, 3), "days": round(days, 2)}
    train["total_days"] = round(total_days, 2)
    train["mfu"] = mfu
    train["implied_mfu_for_12_days"] = round(mfu * total_days / 12, 3)
    return {"storage": storage, "encoders": gpu, "cpu": cpu, "training": train}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=32, help="sample clips through the preprocessing job")
    p.add_argument("--summary", default=None, help="reuse an existing preprocessing output (its summary.json)")
    p.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation assumed for the projections")
    p.add_argument("--quick", action="store_true", help="16 clips")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.summary:
        output = Path(args.summary).resolve().parent
    else:
        work = Path(tempfile.mkdtemp(prefix="fdcost-"))
        output = run_preprocess(16 if args.quick else args.clips, work)
    data = measure_data(output)
    enc = encoder_flops(data["t5_tokens_mean"] or 20)
    unet = unet_flops()
    result = {"bench": "costs", "clips": data["rows"], "output": str(output), "data": data, "flops": {**enc, "unet": unet},
              **project(data, enc, unet, args.mfu), "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
