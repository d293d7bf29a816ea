"""Table 4 ablations: ``python training/ablate.py --config training/configs/tiny_stage1.yaml [--rows a,e] [--key=value ...]``.

With ``--eval-data DIR`` (a ``fdreamer sample-data`` folder; ``--eval-steps S``, ``--eval-num N``) each
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


VARIANTS: dict[str, tuple[str, list[str]]] = {
    "a": ("original SD schedule", ["--schedule.shift=false", "--schedule.rescale=false", "--model.predictnet=true"]),
    "a*": ("shift only", ["--schedule.shift=true", "--schedule.rescale=false", "--model.predictnet=true"]),
    "b": ("direct T2V (no adapter / PACA)", ["--model.factorized=false", "--model.predictnet=true"]),
    "c": ("CLIP text for temporal layers", ["--model.temporal_text_encoder=clip", "--model.predictnet=true"]),
    "d": ("no PredictNet", ["--model.predictnet=false"]),
    "e": ("full (ours)", ["--model.predictnet=true"]),
}
METRICS = ("val_loss", "l_df", "l_flow", "samples_per_s")
EVAL_METRICS = ("eval_i2v_fc", "eval_i2v_warping_error", "eval_i2v_direction_accuracy", "eval_i2v_psnr0")


def variant_args(row: str, base: list[str], experiment: str) -> list[str]:
    """Overrides of one variant: its switches, its run name, its tag (after the user's overrides)."""
    label, switches = VARIANTS[row]
    safe = row.replace("*", "_star")
    return [*base, *switches, f"--name=ablate_{safe}", f"--tracking.run_name=table4-{row}",
            f"--tracking.tags={{table4_row: '{row}', table4_label: '{label}'}}",
            f"--tracking.experiment={experiment}"]


def _pop_option(args: list[str], name: str) -> str | None:
    """Remove ``name VALUE`` or ``name=VALUE`` from ``args``; return VALUE (None when absent)."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
            del args[i:i + 2]
            return value
        if a.startswith(name + "="):
            del args[i]
            return a.split("=", 1)[1]
    return None


def metrics_table(labels: dict[str, str], runs: dict[str, str], tracking_uri: str,
                  columns: tuple[tuple[str, str], ...], first: str = "row") -> str:
    """Markdown table, one line per ``labels`` entry (``key -> label``): the final value of each column's
    MLflow metric (``(header, metric)``) in run ``runs[key]``, ``–`` where the run has none."""
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri)
    lead = "|---" * (first.count("|") + 1) + "|"  # `first` may hold several label columns ("row | variant")
    lines = [f"| {first} | " + " | ".join(h for h, _ in columns) + " |", lead + "---|" * len(columns)]
    for key, label in labels.items():
        m = client.get_run(runs[key]).data.metrics
        cells = [f"{m[k]:.4f}" if k in m else "–" for _, k in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(rows: list[str], runs: dict[str, str], tracking_uri: str, metrics: tuple[str, ...] = METRICS) -> str:
    """Markdown table of the final metrics of each variant's MLflow run."""
    labels = {r: f"({r}) | {VARIANTS[r][0]}" for r in rows}
    return metrics_table(labels, runs, tracking_uri, tuple((m, m) for m in metrics), first="row | variant")


def evaluate_final(cfg, eval_data: str | None, *, modes: tuple[str, ...] = ("i2v",), eval_steps: int = 20,
                   eval_num: int | None = None) -> tuple[str, dict | None]:
    """The MLflow run id of ``cfg``'s run (from its latest checkpoint) and, when ``eval_data`` is given,
    the :func:`fdreamer.eval.evaluate.evaluate` summary of that checkpoint, logged to the same run."""
    from training.checkpointing import latest_checkpoint, read_trainer_state
    from training.launch import run_dir
    from training.tracking import default_tracking_uri

    ckpt = latest_checkpoint(run_dir(cfg))
    run_id = read_trainer_state(ckpt).mlflow_run_id
    if not eval_data:
        return run_id, None
    from fdreamer.eval.evaluate import EvalSettings, evaluate

    res = evaluate(ckpt, eval_data, modes=modes, num=eval_num, settings=EvalSettings(steps=eval_steps),
                   tracking_uri=default_tracking_uri(cfg), run_id=run_id, out=run_dir(cfg) / "eval")
    return run_id, res.summary


def main(argv: list[str] | None = None) -> int:
    import ray

    from cluster.connect import init_ray
    from fdreamer.config import ConfigError, parse_cli
    from training.config import TrainConfig
    from training.launch import fit, prepare
    from training.tracking import default_tracking_uri

    args = list(sys.argv[1:] if argv is None else argv)
    eval_data = _pop_option(args, "--eval-data")
    eval_steps = int(_pop_option(args, "--eval-steps") or 20)
    eval_num = _pop_option(args, "--eval-num")
    rows = list(VARIANTS)
    if "--rows" in args:
        i = args.index("--rows")
        rows = [r.strip() for r in args[i + 1].split(",")]
        del args[i:i + 2]
    unknown = [r for r in rows if r not in VARIANTS]
    if unknown:
        print(f"ablate: unknown row(s) {unknown}; rows are {list(VARIANTS)}", file=sys.stderr)
        return 2
    try:
        base_cfg, _ = parse_cli(TrainConfig, args, prog="training/ablate.py")
        experiment = f"{base_cfg.tracking.experiment}-table4"
        cfgs = {r: parse_cli(TrainConfig, variant_args(r, args, experiment))[0] for r in rows}
        for c in cfgs.values():
            prepare(c)
    except (ConfigError, ValueError, FileExistsError) as exc:
        print(f"ablate: {exc}", file=sys.stderr)
        return 2
    init_ray(base_cfg.ray_address)
    runs: dict[str, str] = {}
    try:
        for r in rows:
            print(f"== Table 4 ({r}): {VARIANTS[r][0]}", flush=True)
            fit(cfgs[r])
            runs[r], summary = evaluate_final(cfgs[r], eval_data, eval_steps=eval_steps,
                                              eval_num=int(eval_num) if eval_num else None)
            if summary is not None:
                print(f"== Table 4 ({r}) evaluation: {summary['i2v']}", flush=True)
    finally:
        ray.shutdown()
    metrics = METRICS + (EVAL_METRICS if eval_data else ())
    print(table(rows, runs, default_tracking_uri(base_cfg), metrics), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
