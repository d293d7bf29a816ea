"""What the study scripts (``training/ablate.py``, ``training/compare.py``) share: their own options as a
typed config beside the training job's, the final evaluation of each run, and the table read back from MLflow.

A study's command line mixes two configs: its own options (e.g. ``--rows a,e --eval.data DIR``, fields of a
study dataclass) and the training job's (``--config FILE --optim.lr=1e-4``, :class:`training.config.TrainConfig`),
which every run of the study starts from. :func:`split_args` separates them by the top-level key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fdreamer.cli.config_command import normalize_args, parse_command
from fdreamer.config import opt


@dataclass
class EvalOptions:
    """The final evaluation of every run of a study (``fdreamer.eval.evaluate`` on held-out clips)."""

    data: str | None = opt(None, "a `fdreamer sample-data` folder; none = no evaluation (training metrics only)")
    steps: int = opt(20, "denoising steps per evaluated video")
    num: int | None = opt(None, "held-out clips evaluated (default: all)")


def split_args(cls: type, argv: list[str]) -> tuple[list[str], list[str]]:
    """(``cls``'s options, the rest) of a command line; keys are ``--key value`` or ``--key=value``."""
    fields = set(cls.__dataclass_fields__)
    own: list[str] = []
    rest: list[str] = []
    it = iter(argv)
    for arg in it:
        key = arg[2:].partition("=")[0].replace("-", "_").split(".")[0] if arg.startswith("--") else ""
        target = own if key in fields else rest
        target.append(arg)
        if arg.startswith("--") and "=" not in arg and arg not in ("--help", "-h"):
            value = next(it, None)
            if value is not None:
                target.append(value)
    return own, rest


def parse_study(cls: type, argv: list[str], prog: str) -> tuple[Any, list[str]]:
    """The study's options (ConfigError when wrong) and the training arguments, ``--key=value`` each."""
    own, rest = split_args(cls, argv)
    from training.config import TrainConfig

    return parse_command(cls, own, prog), normalize_args(TrainConfig, rest)


def evaluate_final(cfg: Any, options: EvalOptions, *, modes: tuple[str, ...] = ("i2v",)) -> tuple[str, dict | None]:
    """The MLflow run id of ``cfg``'s run (from its latest checkpoint) and, when ``options.data`` is set,
    the :func:`fdreamer.eval.evaluate.evaluate` summary of that checkpoint, logged to the same run."""
    from training.checkpointing import latest_checkpoint, read_trainer_state
    from training.launch import run_dir
    from training.tracking import default_tracking_uri

    ckpt = latest_checkpoint(Path(run_dir(cfg)))
    run_id = read_trainer_state(ckpt).mlflow_run_id
    if not options.data:
        return run_id, None
    from fdreamer.eval.evaluate import EvalSettings, evaluate

    res = evaluate(ckpt, options.data, modes=modes, num=options.num, settings=EvalSettings(steps=options.steps),
                   tracking_uri=default_tracking_uri(cfg), run_id=run_id, out=Path(run_dir(cfg)) / "eval")
    return run_id, res.summary


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


__all__ = ["EvalOptions", "evaluate_final", "metrics_table", "parse_study", "split_args"]
