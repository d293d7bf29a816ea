"""Table 4 ablations: ``python training/ablate.py --config training/configs/tiny_stage1.yaml [--rows [a,e]] [--key=value ...]``.

The options of :class:`AblateConfig` (``--rows``, ``--eval.*``) belong to the study; every other key is the
training job's (:class:`training.config.TrainConfig`), shared by all variants.
With ``--eval.data DIR`` (a ``fdreamer sample-data`` folder; ``--eval.steps S``, ``--eval.num N``) each
variant's final checkpoint is also evaluated by ``fdreamer.eval.evaluate`` (image-to-video on the held-out
first frames + motion captions; direct T2V for row (b)) and the table gains FC, warping error and
motion-direction accuracy, all read back from the variant's MLflow run.

Trains every variant of the paper's Table 4 on the same data, seed and budget (one Ray Train run
each, one MLflow run each, all in one experiment, tagged ``table4_row``), then prints a markdown
table of their final metrics pulled back from MLflow:

    (a)  original SD schedule          schedule.shift=false, schedule.rescale=false
    (a*) shift only                    schedule.shift=true,  schedule.rescale=false
    (b)  direct T2V                    model.factorized=false (no adapter, no PACA)
    (c)  CLIP for the temporal layers  model.temporal_text_encoder=clip
    (d)  no PredictNet                 model.predictnet=false
    (e)  full                          shift + rescale + adapter + PACA + T5 + PredictNet (γ·L_flow)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from fdreamer.config import nested, opt
from training.study import EvalOptions, evaluate_final, metrics_table, parse_study


VARIANTS: dict[str, tuple[str, list[str]]] = {
    "a": ("original SD schedule", ["--schedule.shift=false", "--schedule.rescale=false", "--model.predictnet=true"]),
    "a*": ("shift only", ["--schedule.shift=true", "--schedule.rescale=false", "--model.predictnet=true"]),
    # the direct T2V model has no first-frame path, so a base config's first_frame=concat/paca_pos is reset
    "b": ("direct T2V (no adapter / PACA)", ["--model.factorized=false", "--model.first_frame=paca",
                                               "--model.predictnet=true"]),
    "c": ("CLIP text for temporal layers", ["--model.temporal_text_encoder=clip", "--model.predictnet=true"]),
    "d": ("no PredictNet", ["--model.predictnet=false"]),
    "e": ("full (ours)", ["--model.predictnet=true"]),
}


METRICS = ("val_loss", "l_df", "l_flow", "samples_per_s")
EVAL_METRICS = ("eval_i2v_fc", "eval_i2v_warping_error", "eval_i2v_direction_accuracy", "eval_i2v_psnr0")


@dataclass
class AblateConfig:
    """The study's own options (the training keys go to every variant)."""

    rows: list[str] = opt(["a", "a*", "b", "c", "d", "e"], "Table 4 rows to train, in order")
    eval: EvalOptions = nested(EvalOptions, "the final evaluation of every variant")

    def __post_init__(self) -> None:
        unknown = [r for r in self.rows if r not in VARIANTS]
        if unknown or not self.rows:
            raise ValueError(f"rows: unknown or no row(s) {unknown}; rows are {list(VARIANTS)}")


def variant_args(row: str, base: list[str], experiment: str) -> list[str]:
    """Overrides of one variant: its switches, its run name, its tag (after the user's overrides)."""
    label, switches = VARIANTS[row]
    safe = row.replace("*", "_star")
    return [*base, *switches, f"--name=ablate_{safe}", f"--tracking.run_name=table4-{row}",
            f"--tracking.tags={{table4_row: '{row}', table4_label: '{label}'}}",
            f"--tracking.experiment={experiment}"]


def table(rows: list[str], runs: dict[str, str], tracking_uri: str, metrics: tuple[str, ...] = METRICS) -> str:
    """Markdown table of the final metrics of each variant's MLflow run."""
    labels = {r: f"({r}) | {VARIANTS[r][0]}" for r in rows}
    return metrics_table(labels, runs, tracking_uri, tuple((m, m) for m in metrics), first="row | variant")


def main(argv: list[str] | None = None) -> int:
    import ray

    from cluster.connect import init_ray
    from fdreamer.config import ConfigError, parse_cli
    from training.config import TrainConfig
    from training.launch import fit, prepare
    from training.tracking import default_tracking_uri

    try:
        study, args = parse_study(AblateConfig, list(sys.argv[1:] if argv is None else argv), "training/ablate.py")
    except ConfigError as exc:
        print(f"ablate: {exc}", file=sys.stderr)
        return 2
    rows = study.rows
    try:
        base_cfg, _ = parse_cli(TrainConfig, args, prog="training/ablate.py")
        experiment = f"{base_cfg.tracking.experiment}-table4"
        cfgs = {r: parse_cli(TrainConfig, variant_args(r, args, experiment))[0] for r in rows}
        prepared = {r: prepare(c) for r, c in cfgs.items()}  # every variant checked before any trains
    except (ConfigError, ValueError, FileExistsError) as exc:
        print(f"ablate: {exc}", file=sys.stderr)
        return 2
    init_ray(base_cfg.ray_address)
    runs: dict[str, str] = {}
    try:
        for r in rows:
            print(f"== Table 4 ({r}): {VARIANTS[r][0]}", flush=True)
            fit(cfgs[r], prepared[r])
            runs[r], summary = evaluate_final(cfgs[r], study.eval)
            if summary is not None:
                print(f"== Table 4 ({r}) evaluation: {summary['i2v']}", flush=True)
    finally:
        ray.shutdown()
    metrics = METRICS + (EVAL_METRICS if study.eval.data else ())
    print(table(rows, runs, default_tracking_uri(base_cfg), metrics), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
