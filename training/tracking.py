"""MLflow tracking of a training stage (called on rank 0 only).

One run per stage (or ablation variant): params = the flattened resolved config, step metrics, the
config and sample videos as artifacts, the final checkpoint as the ``checkpoint`` artifact plus a
``fdreamer.checkpoint`` tag with its path. A restarted or resumed stage continues the same run (its
id is kept in the checkpoint's trainer state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fdreamer.config import dump_yaml, flatten, to_dict
from training.config import TrainConfig


def default_tracking_uri(cfg: TrainConfig) -> str:
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    root = Path(cfg.storage_path)
    if "://" in cfg.storage_path:
        root = Path("runs")
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root.resolve() / 'mlflow.db'}"


class Tracker:
    """A thin wrapper over one MLflow run (client API: no global active-run state in the worker)."""

    def __init__(self, cfg: TrainConfig, run_id: str | None = None) -> None:
        import mlflow

        self.uri = default_tracking_uri(cfg)
        self.client = mlflow.tracking.MlflowClient(self.uri)
        if run_id is None:
            exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.tracking.experiment)
            tags = {"fdreamer.stage": cfg.stage, "fdreamer.preset": cfg.preset, **cfg.tracking.tags}
            run = self.client.create_run(exp_id, run_name=cfg.tracking.run_name or cfg.name, tags=tags)
            run_id = run.info.run_id
            params = {k: str(v)[:500] for k, v in flatten(to_dict(cfg)).items()}
            items = list(params.items())
            from mlflow.entities import Param

            for i in range(0, len(items), 90):  # MLflow caps params per batch at 100
                self.client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 90]])
            self.client.log_text(run_id, dump_yaml(cfg), "config/train_config.yaml")
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if ms:  # queued and sent by MLflow's logging thread: the step does not wait for the server
            self.client.log_batch(self.run_id, metrics=ms, synchronous=False)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def set_tag(self, key: str, value: Any) -> None:
        self.client.set_tag(self.run_id, key, str(value))

    def finish(self, status: str = "FINISHED") -> None:
        import mlflow

        mlflow.flush_async_logging()  # every queued metric is on the server before the run is closed
        self.client.set_terminated(self.run_id, status)
