"""Shared fixtures: tiny models written once per session, and real local services (``helpers/``).

Session fixtures: ``tiny_dir`` / ``memory`` (tiny models, random VAE), ``ray_head`` (a 2-CPU
``ray start --head`` cluster), ``mlflow_server`` (a real ``mlflow server``), ``s3_endpoint`` (a moto S3 server), ``preprocessed_sample``
(32 sample clips through the preprocessing job on ``ray_head``, trained tiny VAE).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

# The job packages (pipelines/, training/, serving/) live at the repo root, outside the installed
# `fdreamer` package: make them importable by tests as `pipelines.*` etc.
_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:
    sys.path.insert(1, _REPO)

# tests/ is on sys.path (pytest's rootdir conftest), so the helpers import as `helpers.*`.
from helpers.datasets import preprocess_sample
from helpers.mlflow_server import running_mlflow_server
from helpers.ray_cluster import running_ray_head

from fdreamer.toy import tiny_models as tm


def make_untrained_tiny_models(out: Path, **kwargs: object) -> dict:
    """``make_tiny_models`` with a random VAE, silencing its "untrained VAE" warning; with a (missing)
    ``vae_asset_dir`` and no ``t2i_asset_dir``, the T2I asset beside it is missing too (a random UNet)."""
    if "vae_asset_dir" in kwargs and "t2i_asset_dir" not in kwargs:
        kwargs["t2i_asset_dir"] = Path(str(kwargs["vae_asset_dir"])).parent / "tiny_t2i"
    if "vae_asset_dir" in kwargs and "i2v_asset_dir" not in kwargs:
        kwargs["i2v_asset_dir"] = Path(str(kwargs["vae_asset_dir"])).parent / "tiny_i2v"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return tm.make_tiny_models(out, allow_untrained_vae=True, **kwargs)


@pytest.fixture(scope="session")
def no_asset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VAE asset folder that does not exist (its sibling ``tiny_t2i`` neither): tests behave the same
    before and after the tiny VAE / T2I are trained."""
    return tmp_path_factory.mktemp("assets") / "tiny_vae"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, no_asset: Path) -> Path:
    """Tiny models (random VAE, seed 0) written once per session."""
    out = tmp_path_factory.mktemp("tiny") / "models"
    make_untrained_tiny_models(out, seed=0, vae_asset_dir=no_asset, t2i_asset_dir=no_asset.parent / "tiny_t2i")
    return out


@pytest.fixture(scope="session")
def memory(no_asset: Path) -> tm.TinyModels:
    """The same models, in memory, before saving."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return tm.build_tiny_models(seed=0, allow_untrained_vae=True, vae_asset_dir=no_asset,
                                    t2i_asset_dir=no_asset.parent / "tiny_t2i")


# ------------------------------------------------------------------ real local services (helpers/)


@pytest.fixture(scope="session")
def sample_clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 sample clips (``fdreamer.toy.sample_data``, seed 0) with their ``manifest.jsonl``."""
    from fdreamer.toy.sample_data import write_sample_data

    out = tmp_path_factory.mktemp("sample")
    write_sample_data(out, 8, workers=1)
    return out


@pytest.fixture(scope="session")
def rows(sample_clips: Path) -> list[dict]:
    """The manifest records of ``sample_clips``."""
    import json

    return [json.loads(line) for line in (sample_clips / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A 2-CPU Ray head (``ray start --head``, dashboard for ``ray job submit``) for the whole session.

    Yields ``{"address": "127.0.0.1:<port>", "dashboard": "http://127.0.0.1:<port>"}``; see
    ``tests/helpers/ray_cluster.py``. Drivers connect with ``ray.init(address=...)`` or
    ``--ray_address``; start them with ``helpers.ray_cluster.subprocess_env()``.
    """
    with running_ray_head(tmp_path_factory.mktemp("ray-head"), num_cpus=2) as head:
        yield head


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` (sqlite backend, proxied artifacts) for the session; yields its http URI."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="session")
def preprocessed_sample(tmp_path_factory: pytest.TempPathFactory, ray_head: dict[str, str]) -> dict:
    """32 sample clips preprocessed on ``ray_head`` with the tiny models (trained VAE).

    ``{"output": Path, "models": Path, "sample": Path, "summary": dict}``: shards in
    ``output/shards/part-*.parquet`` (schema ``fdreamer.data.schema``, ``split`` = train | heldout),
    ``fdreamer.data.schema.read_null_conditions(output)`` for the CFG null condition.
    """
    return preprocess_sample(tmp_path_factory.mktemp("preprocessed"), ray_head["address"], num_clips=32)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server (its server mode, on a free loopback port) for the session; yields its endpoint URL.

    The tests' processes and Ray heads get dummy AWS credentials (``helpers.ray_cluster.subprocess_env``);
    this process too while the server runs. Each test module uses its own bucket.
    """
    from helpers.ray_cluster import free_port, subprocess_env
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for k, v in subprocess_env().items():
            if k.startswith("AWS_"):
                mp.setenv(k, v)
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        server.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()


# ------------------------------------------------------------------ markers


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu``-marked tests are skipped where torch sees no CUDA device (CI, this machine)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker): torch.cuda.is_available() is false")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
