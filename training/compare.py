"""Three systems, one data set, one budget: ``python training/compare.py --config training/configs/tiny_learn.yaml
--image_path DIR --eval.data DIR [--systems [fd,swap,vc2]] [--vc2_stage_b_steps N] [--eval.steps 20] [--eval.num N]
[--key=value ...]``.

The options of :class:`CompareConfig` belong to the study; every other key is the training job's
(:class:`training.config.TrainConfig`), shared by all systems.

Trains, on the same preprocessed clips with the same seed, optimizer steps and micro-batch size:

    fd     Factorized-Dreamer (the base config as given)
    swap   VideoFactory's swapped spatiotemporal attention     model.temporal.block=swap
    vc2    VideoCrafter2's recipe: stage A = spatial + temporal on joint image-video micro-batches
           (data.image_ratio=0.5: half of every micro-batch are 1-frame images, temporal layers bypassed),
           then stage B = spatial-only fine-tune on the high-quality images (temporal, adapter, PACA frozen,
           data.image_ratio=1) for ``--vc2_stage_b_steps`` of the same total step budget

then evaluates each final checkpoint with :func:`fdreamer.eval.evaluate.evaluate` (image-to-video on the held-out
first frames + motion captions, text-to-video on the held-out captions), logs the metrics to each system's
MLflow run (one experiment ``<tracking.experiment>-compare``, runs tagged ``system``) and prints a markdown
table read back from MLflow: FC, PC, warping error, direction accuracy, frame-0 PSNR.

``--image_path`` is the preprocessed image manifest (``fdreamer sample-data DIR --images`` then
``pipelines/preprocess.py`` on ``DIR/images.jsonl``); ``--eval.data`` the ``fdreamer sample-data`` folder.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from fdreamer.config import nested, opt
from training.study import EvalOptions, evaluate_final, metrics_table, parse_study

SYSTEMS: dict[str, str] = {
    "fd": "Factorized-Dreamer",
    "swap": "VideoFactory swap attention",
    "vc2": "VideoCrafter2 recipe (A: joint image-video, B: spatial-only on images)",
}


@dataclass
class CompareConfig:
    """The study's own options (the training keys go to every system)."""

    systems: list[str] = opt(["fd", "swap", "vc2"], "systems to train, in order")
    image_path: str | None = opt(None, "preprocessed image manifest (the vc2 system needs it)")
    vc2_stage_b_steps: int | None = opt(None, "vc2's spatial-only stage B steps (default: a quarter of --steps)")
    eval: EvalOptions = nested(EvalOptions, "the final evaluation of every system")

    def __post_init__(self) -> None:
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown or not self.systems:
            raise ValueError(f"systems: unknown or no system(s) {unknown}; systems are {list(SYSTEMS)}")


#: (column header, MLflow metric) of the printed table.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("I2V dir. acc.", "eval_i2v_direction_accuracy"), ("I2V FC", "eval_i2v_fc"),
    ("I2V warp err.", "eval_i2v_warping_error"), ("I2V PSNR f0", "eval_i2v_psnr0"),
    ("T2V dir. acc.", "eval_t2v_direction_accuracy"), ("T2V FC", "eval_t2v_fc"), ("T2V PC", "eval_t2v_pc"),
    ("T2V warp err.", "eval_t2v_warping_error"), ("val_loss", "val_loss"),
)


def system_args(system: str, base: list[str], experiment: str, *, image_path: str | None, steps: int,
                stage_b_steps: int, run_root: Path | None) -> list[list[str]]:
    """The ``training/run.py`` argument lists of one system (two stages for vc2), after the user's overrides."""
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}; systems are {list(SYSTEMS)}")
    tags = f"--tracking.tags={{system: '{system}', system_label: '{SYSTEMS[system]}'}}"
    common = [*base, f"--tracking.experiment={experiment}", tags]
    if system == "fd":
        return [[*common, "--name=compare_fd", "--tracking.run_name=compare-fd"]]
    if system == "swap":
        return [[*common, "--model.temporal.block=swap", "--name=compare_swap", "--tracking.run_name=compare-swap"]]
    if not image_path:
        raise ValueError("the vc2 system needs --image_path (preprocessed image manifest)")
    if not 0 < stage_b_steps < steps:
        raise ValueError(f"--vc2_stage_b_steps must be in (0, {steps}), got {stage_b_steps}")
    a = [*common, f"--data.image_path={image_path}", "--data.image_ratio=0.5", "--stage=vc2_stageA",
         f"--steps={steps - stage_b_steps}", "--name=compare_vc2_A", "--tracking.run_name=compare-vc2-A"]
    b = [*common, f"--data.image_path={image_path}", "--data.image_ratio=1.0", "--stage=vc2_stageB",
         "--model.freeze=[temporal,adapter,paca]", f"--steps={stage_b_steps}",
         f"--init_from={run_root / 'compare_vc2_A' if run_root else 'compare_vc2_A'}", "--name=compare_vc2_B",
         "--tracking.run_name=compare-vc2-B"]
    return [a, b]


def table(runs: dict[str, str], tracking_uri: str) -> str:
    """Markdown table of each system's MLflow metrics."""
    return metrics_table({s: SYSTEMS[s] for s in runs}, runs, tracking_uri, COLUMNS, first="system")


def main(argv: list[str] | None = None) -> int:
    import ray

    from cluster.connect import init_ray
    from fdreamer.config import ConfigError, parse_cli
    from training.config import TrainConfig
    from training.launch import fit, prepare
    from training.tracking import default_tracking_uri

    try:
        study, args = parse_study(CompareConfig, list(sys.argv[1:] if argv is None else argv), "training/compare.py")
    except ConfigError as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    systems, image_path, stage_b = study.systems, study.image_path, study.vc2_stage_b_steps
    try:
        base_cfg, _ = parse_cli(TrainConfig, args, prog="training/compare.py")
        if image_path:
            image_path = str(Path(image_path).resolve()) if "://" not in image_path else image_path
        stage_b_steps = int(stage_b) if stage_b else max(1, base_cfg.steps // 4)
        experiment = f"{base_cfg.tracking.experiment}-compare"
        root = Path(base_cfg.storage_path).resolve() if "://" not in base_cfg.storage_path else None
        plans = {s: system_args(s, args, experiment, image_path=image_path, steps=base_cfg.steps,
                                stage_b_steps=stage_b_steps, run_root=root) for s in systems}
        cfgs = {s: [parse_cli(TrainConfig, a)[0] for a in plan] for s, plan in plans.items()}
        prepared = {s: prepare(stages[0]) for s, stages in cfgs.items()}  # later stages: once their previous exists
    except (ConfigError, ValueError, FileExistsError) as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    init_ray(base_cfg.ray_address)
    runs: dict[str, str] = {}
    try:
        for s in systems:
            for i, cfg in enumerate(cfgs[s]):
                print(f"== {SYSTEMS[s]}: {cfg.name} ({cfg.steps} steps)", flush=True)
                fit(cfg, prepared[s] if i == 0 else prepare(cfg))
            runs[s], summary = evaluate_final(cfgs[s][-1], study.eval, modes=("i2v", "t2v"))
            if summary is not None:
                print(f"== {SYSTEMS[s]} evaluation: {summary}", flush=True)
    finally:
        ray.shutdown()
    print(table(runs, default_tracking_uri(base_cfg)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
