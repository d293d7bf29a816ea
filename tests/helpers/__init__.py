"""Reusable test helpers (real local services): a Ray head, an MLflow server, preprocessed sample data."""
