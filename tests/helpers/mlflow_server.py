"""A real MLflow tracking server for tests: the one the main job starts (``cluster/mlflow_server.py``).

    with running_mlflow_server(tmp_path) as uri:   # "http://127.0.0.1:<port>"
        mlflow.set_tracking_uri(uri)
"""

from cluster.mlflow_server import running_mlflow_server

__all__ = ["running_mlflow_server"]
