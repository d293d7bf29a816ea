"""The Ray Train job (thin wrapper around fdreamer): config, data, worker loop, checkpoints, MLflow."""
