"""Learning benchmark: sample data -> preprocess -> train -> evaluate, one JSON line.

    python tests/bench/bench_learning.py [--quick] [--work DIR] [--num-clips 320] [--steps N]
        [--config training/configs/tiny_learn.yaml] [--eval-steps 20] [--ray-address ADDR] [--key=value ...]

1. ``fdreamer sample-data`` (``--num-clips`` moving-shapes clips, 10% held out) and ``fdreamer
   make-tiny-models`` (the committed trained tiny VAE);
2. ``pipelines/preprocess.py`` with ``pipelines/configs/tiny.yaml`` (8 x 64 x 64) and ``t5_caption:
   motion_caption`` (T5 reads the motion phrase alone; with the full caption the model does not start to
   read the motion within the budget: docs/results.md, "The ablation ladder");
3. ``training/run.py --config training/configs/tiny_learn.yaml`` (any extra ``--key=value`` is passed on);
4. ``fdreamer.eval.evaluate`` image-to-video on the held-out clips: their first frame + motion caption, which
   the model never saw together; motion-direction accuracy (target >= 0.9, chance 1/8), FC, PC,
   frame-0 PSNR vs the conditioning image, warping error, and the same on the real clips (ceiling).

``--checkpoint CKPT`` skips steps 2-3 and evaluates that checkpoint (e.g. the committed tiny I2V,
``models/tiny/i2v``) on the held-out clips of step 1.
``--quick`` = 96 clips, 150 steps, 8-step sampling: the plumbing in a few minutes (accuracy not
meaningful). Every job gets its own local Ray (``--ray-address local``) unless ``--ray-address`` is
given. Prints ONE JSON line (stdout); the jobs' logs go to ``<work>/*.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _env() -> dict[str, str]:
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (rc {rc}); see {log}\n{tail}")
    return time.perf_counter() - t0


def run_benchmark(work: Path, *, num_clips: int, config: str, steps: int | None, eval_steps: int,
                  ray_address: str, extra: list[str], num_eval: int | None = None, seed: int = 0,
                  image_guidance_scale: float = 1.5, guidance_scale: float = 7.5,
                  prepared: dict | None = None, trained: Path | None = None) -> dict:
    """``prepared``: ``{"sample", "models", "output"}`` of an earlier sample-data + preprocessing (those
    steps are skipped, ``num_clips`` is then only reported). ``trained``: a checkpoint (or run folder) to
    evaluate instead of training one (only the sample data is made)."""
    from fdreamer.eval.evaluate import EvalSettings, evaluate

    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    t: dict[str, float] = {}
    sample, models, pre, storage = work / "sample", work / "models", work / "pre", work / "train"
    if prepared is not None:
        sample, models, pre = Path(prepared["sample"]), Path(prepared["models"]), Path(prepared["output"])
    elif trained is not None:
        t["sample_data_s"] = _run([py, "-m", "fdreamer.cli.main", "sample-data", str(sample), "--num-clips",
                                   str(num_clips)], work / "sample.log")
    else:
        t["sample_data_s"] = _run([py, "-m", "fdreamer.cli.main", "sample-data", str(sample), "--num-clips",
                                   str(num_clips)], work / "sample.log")
        t["tiny_models_s"] = _run([py, "-m", "fdreamer.cli.main", "make-tiny-models", str(models)], work / "models.log")
        t["preprocess_s"] = _run([py, "pipelines/preprocess.py", "--config", "pipelines/configs/tiny.yaml",
                                  f"--inputs=[{sample / 'manifest.jsonl'}]", f"--output={pre}", f"--models_dir={models}",
                                  f"--ray_address={ray_address}", "--t5_caption=motion_caption"], work / "preprocess.log")
    name = "learn"
    train_cmd = [py, "training/run.py", "--config", config, f"--data.path={pre}", f"--models_dir={models}",
                 f"--storage_path={storage}", f"--name={name}", f"--ray_address={ray_address}", f"--seed={seed}"]
    if steps is not None:
        train_cmd.append(f"--steps={steps}")
    if trained is None:
        t["train_s"] = _run(train_cmd + extra, work / "train.log")
    settings = EvalSettings(steps=eval_steps, image_guidance_scale=image_guidance_scale, guidance_scale=guidance_scale)
    t0 = time.perf_counter()
    res = evaluate(trained or storage / name, sample, modes=("i2v",), num=num_eval, seed=seed, settings=settings,
                   out=work / "eval")
    t["evaluate_s"] = time.perf_counter() - t0
    t["total_s"] = sum(t.values())
    s, real = res.summary["i2v"], res.summary["real"]
    return {"bench": "learning", "direction_accuracy": s["direction_accuracy"], "target": 0.9, "chance": 1 / 8,
            "fc": s["fc"], "pc": s["pc"], "psnr0": s["psnr0"], "warping_error": s["warping_error"],
            "flow_magnitude": s["flow_magnitude"], "fd_pixelflow": s.get("fd_pixelflow"),
            "n_eval": int(s["n"]), "real_direction_accuracy": real["direction_accuracy"],
            "real_warping_error": real["warping_error"], "real_flow_magnitude": real["flow_magnitude"],
            "num_clips": num_clips, "config": config, "steps": steps, "eval_steps": eval_steps,
            "image_guidance_scale": image_guidance_scale, "guidance_scale": guidance_scale,
            "run_id": res.run_id, "checkpoint": res.checkpoint, "timings": {k: round(v, 1) for k, v in t.items()},
            "per_video_eval_s": round(res.timings["per_video_s"], 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="96 clips, 150 steps, 8 sampling steps (plumbing only)")
    p.add_argument("--work", default=str(REPO / "runs" / "bench_learning"), help="working folder (default runs/bench_learning)")
    p.add_argument("--num-clips", type=int, help="sample clips (default 320; --quick 96)")
    p.add_argument("--steps", type=int, help="training steps (default: the config's; --quick 150)")
    p.add_argument("--config", default="training/configs/tiny_learn.yaml")
    p.add_argument("--eval-steps", type=int, help="denoising steps at evaluation (default 20; --quick 8)")
    p.add_argument("--image-guidance-scale", type=float, default=1.5)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--num-eval", type=int, help="held-out clips evaluated (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="evaluate this checkpoint instead of training one")
    p.add_argument("--ray-address", default="local", help="Ray address for preprocess/train (default: a private local one)")
    args, extra = p.parse_known_args(argv)
    num_clips = args.num_clips or (96 if args.quick else 320)
    steps = args.steps or (150 if args.quick else None)
    eval_steps = args.eval_steps or (8 if args.quick else 20)
    work = Path(args.work)
    if work.exists() and (work / "train").exists() and not args.checkpoint:
        import shutil

        shutil.rmtree(work / "train")  # a fresh training run; sample data and preprocessing are idempotent
    out = run_benchmark(work, num_clips=num_clips, config=args.config, steps=steps, eval_steps=eval_steps,
                        ray_address=args.ray_address, extra=extra, num_eval=args.num_eval, seed=args.seed,
                        image_guidance_scale=args.image_guidance_scale, guidance_scale=args.guidance_scale,
                        trained=Path(args.checkpoint) if args.checkpoint else None)
    out["quick"] = args.quick
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
