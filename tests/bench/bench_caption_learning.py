"""How fast does a training recipe learn to read the motion caption? One JSON line (a learning diagnostic).

    python tests/bench/bench_caption_learning.py --data PREPROCESSED [--models models/tiny] [--steps 300]
        [--every 100] [--num 16] [--config training/configs/tiny_learn.yaml] [--temporal-lr-mult 1] [key=value ...]

Trains the config's model in this process (no Ray: the same objective, optimizer step, warmup and EMA
as ``training/loop.py``, one rank, micro-batches of ``--micro``) on the ``train`` rows of a
``pipelines/preprocess.py`` output of the sample clips, and every ``--every`` steps scores the EMA
weights with the probes of :mod:`fdreamer.eval.probes` (fixed noise, t = 300/600/900):

- caption probe: each held-out clip's denoising loss under its own caption and under the same caption naming
  each of the 7 other motions (``true_rank_mean`` ~3.5 = ignored, 0 = always read);
- first-frame probe (``ff_*``): the loss with the clip's own conditioning frame vs the frames of ``--ff-swaps``
  other held-out clips (``ff_true_rank_mean`` ~ swaps/2 = the first frame is not used to place anything).

``--init-from CKPT`` starts from a checkpoint's (EMA) weights; with ``--steps 0`` the probes score that
checkpoint as it is (e.g. the committed ``models/tiny/i2v``). ``--save DIR`` writes the final EMA weights as a training checkpoint (the format ``training/run.py`` writes),
and ``--eval-data SAMPLE_DIR`` then samples image-to-video on ``--eval-num`` held-out clips with
:func:`fdreamer.eval.evaluate.evaluate` (direction accuracy, frame-0 PSNR). A quick way to compare recipes
(the ablation ladder in docs/results.md) before paying for a Ray Train run; extra ``key=value`` arguments
override the config.
Progress goes to stderr; the last line on stdout is the JSON result with the whole curve.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "bench"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a pipelines/preprocess.py output folder (sample clips)")
    p.add_argument("--models", default=str(REPO / "models" / "tiny"), help="tiny models folder (text encoders)")
    p.add_argument("--config", default=str(REPO / "training" / "configs" / "tiny_learn.yaml"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--batch", type=int, default=8, help="clips per optimizer step")
    p.add_argument("--micro", type=int, default=2, help="clips per micro-batch")
    p.add_argument("--num", type=int, default=16, help="held-out clips scored")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--temporal-lr-mult", type=float, default=1.0, help="lr multiplier of the temporal layers")
    p.add_argument("--ff-swaps", type=int, default=3, help="other clips' first frames in the first-frame probe")
    p.add_argument("--init-from", default=None, help="start from this checkpoint's EMA weights (--steps 0: probe it)")
    p.add_argument("--save", default=None, help="write the final EMA weights as a checkpoint folder here")
    p.add_argument("--eval-data", default=None, help="sample-data folder: sample I2V on its held-out clips (needs --save)")
    p.add_argument("--eval-num", type=int, default=32)
    p.add_argument("--eval-steps", type=int, default=20)
    args, overrides = p.parse_known_args(argv)
    if args.steps < 0 or (args.steps == 0 and not args.init_from):
        p.error("--steps must be >= 1 (0 only with --init-from: probe a checkpoint)")
    if args.batch % args.micro:
        p.error("--batch must be a multiple of --micro")
    if args.eval_data and not args.save:
        p.error("--eval-data needs --save")
    if not 0 < args.ff_swaps < args.num:
        p.error(f"--ff-swaps must be in [1, {args.num - 1}]")

    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from fdreamer.eval.probes import condition_losses, rank_stats, swapped_first_frames

    from fdreamer.checkpoint import save_model
    from fdreamer.data.batching import null_from_tensors, pad_tokens, to_train_batch
    from fdreamer.data.schema import shard_t5_caption
    from fdreamer.config import load_config
    from fdreamer.encoders import EncoderConfig, FrozenEncoders
    from fdreamer.models.conditions import Conditions
    from fdreamer.models.unet import FactorizedDreamerUNet
    from fdreamer.toy.scenes import MOTION_PHRASES, MOTIONS
    from fdreamer.schedule import NoiseSchedule
    from fdreamer.train.step import EMA, lr_at, optimizer_step
    from training import data as train_data
    from training import rows
    from training.config import TrainConfig

    torch.set_num_threads(args.threads)
    cfg = load_config(TrainConfig, args.config, [o.lstrip("-") for o in overrides])
    torch.manual_seed(cfg.seed)
    fs, files = rows.shard_files(args.data)
    rows = pq.read_table(files, filesystem=fs).to_pylist()
    t5_field = shard_t5_caption(pq.read_schema(files[0], filesystem=fs).metadata)  # the text the t5 column encodes
    train = [r for r in rows if r["split"] != "heldout"]
    held = [r for r in rows if r["split"] == "heldout"][: args.num]
    if not train or not held:
        raise SystemExit(f"need train and heldout rows in {args.data} (got {len(train)} / {len(held)})")

    model = FactorizedDreamerUNet.from_preset(cfg.preset, cfg.model, seed=cfg.seed)
    if args.init_from:
        from fdreamer.checkpoint import load_weights_into

        load_weights_into(model, args.init_from, use_ema=True)
    schedule = NoiseSchedule(cfg.schedule)
    o = cfg.optim
    groups = [[q for n, q in model.named_parameters() if q.requires_grad and n.startswith("temporal.") == t]
              for t in (False, True)]
    optimizer = torch.optim.AdamW([{"params": groups[0], "lr": o.lr}, {"params": groups[1], "lr": o.lr * args.temporal_lr_mult}],
                                  weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    ema = EMA(model, o.ema_decay, o.ema_start)
    null = null_from_tensors(train_data.load_null(args.data))
    drop = (cfg.objective.drop_text, cfg.objective.drop_image, cfg.objective.drop_both)

    def batch_of(rs: list[dict]):
        return to_train_batch({k: [r[k] for r in rs] for k in rs[0]}, with_flow=cfg.model.predictnet)

    # The held-out clips under all 8 motion phrases (CLIP tokens + T5 re-encoded from the text each was
    # trained on, image conditions kept).
    enc = FrozenEncoders.load(EncoderConfig.tiny(args.models), ["clip_text", "t5"])
    hb = batch_of(held)
    conds = []
    for m in MOTIONS:
        caps = [r["caption"].replace(MOTION_PHRASES[r["motion"]], MOTION_PHRASES[m]) for r in held]
        t5_caps = [r[t5_field].replace(MOTION_PHRASES[r["motion"]], MOTION_PHRASES[m]) for r in held]
        t5, mask = pad_tokens([x.float().numpy() for x in enc.encode_t5_unpadded(t5_caps)])
        conds.append(Conditions(text_tokens=enc.encode_clip_text_tokens(caps).float(), image_embed=hb.cond.image_embed,
                                first_frame=hb.cond.first_frame, t5_tokens=t5, t5_mask=mask))
    ff_conds = swapped_first_frames(hb.cond, args.ff_swaps)  # true frame first, then other clips' frames
    truth = [MOTIONS.index(r["motion"]) for r in held]
    noise = torch.randn(hb.latents.shape, generator=torch.Generator().manual_seed(0))

    def probe() -> dict[str, float]:
        live = {n: q.detach().clone() for n, q in model.named_parameters() if n in ema.shadow}
        named = dict(model.named_parameters())
        with torch.no_grad():
            for n, v in ema.shadow.items():
                named[n].copy_(v)
        model.eval()
        out = rank_stats(condition_losses(model, schedule, hb.latents, noise, conds, (300, 600, 900)), truth)
        ff = rank_stats(condition_losses(model, schedule, hb.latents, noise, ff_conds, (300, 600, 900)), [0] * len(held))
        out.update({f"ff_{k}": v for k, v in ff.items()})
        model.train()
        with torch.no_grad():
            for n, v in live.items():
                named[n].copy_(v)
        return out

    rng = np.random.default_rng(cfg.seed)
    order: list[int] = []
    curve, t0, train_s = [], time.perf_counter(), 0.0
    model.train()
    for step in range(args.steps):
        if len(order) < args.batch:
            order += [int(i) for i in rng.permutation(len(train))]
        idx, order = order[: args.batch], order[args.batch:]
        mbs = [batch_of([train[i] for i in idx[k:k + args.micro]]) for k in range(0, args.batch, args.micro)]
        scale = lr_at(step, 1.0, o.warmup_steps)
        for g, lr in zip(optimizer.param_groups, base_lrs, strict=True):
            g["lr"] = lr * scale
        ts = time.perf_counter()
        res = optimizer_step(model, optimizer, schedule, mbs, null=null, drop_probs=drop, gamma=cfg.objective.gamma,
                             grad_clip=o.grad_clip, seed=cfg.seed, rank=0, step=step,
                             timestep_sampling=cfg.objective.timestep_sampling)
        ema.update(model, step + 1)
        train_s += time.perf_counter() - ts
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            point = {"step": step + 1, "loss": round(res.loss, 4), **probe()}
            curve.append(point)
            print(json.dumps(point), file=sys.stderr, flush=True)
    if not curve:  # --steps 0: the checkpoint as it is
        curve.append({"step": 0, **probe()})
    result = {"bench": "caption_learning", "init_from": args.init_from, "config": args.config, "overrides": overrides,
              "temporal_lr_mult": args.temporal_lr_mult, "steps": args.steps, "batch": args.batch,
              "clips_scored": len(held), "final": curve[-1], "curve": curve,
              "train_s_per_step": round(train_s / max(args.steps, 1), 3)}
    if args.save:
        from training.launch import clip_profile_meta

        encoders = EncoderConfig.tiny(args.models)
        ckpt = save_model(Path(args.save), model, cfg.schedule, encoders, ema=ema.shadow,
                          meta={"step": args.steps, "stage": cfg.stage, "preset": cfg.preset,
                                **clip_profile_meta(fs, files[0], encoders)})
        result["checkpoint"] = str(ckpt)
        if args.eval_data:
            from fdreamer.eval.evaluate import EvalSettings, evaluate

            ev = evaluate(ckpt, args.eval_data, num=args.eval_num, settings=EvalSettings(steps=args.eval_steps),
                          log=False, out=Path(args.save) / "eval")
            result["eval"] = {k: round(v, 4) for k, v in ev.summary["i2v"].items()}
    result["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
