"""Entry point: ``serve run serving/config.yaml`` (import path ``serving.app:build_app``).

    Api (FastAPI ingress) --handle--> VideoModel (I2V) --handle--> TextToImage (T2I, text-to-video only)

``build_app(args)`` takes the application's ``args:`` (:class:`serving.settings.Settings`); deployment
options (replicas, autoscaling, ``num_gpus``, queue limits, health checks, graceful shutdown) come from
the decorators in :mod:`serving.deployments` / :mod:`serving.api` and are overridden per deployment in
the config file's ``deployments:`` list.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serving.api import Api
from serving.deployments import TextToImage, VideoModel
from serving.settings import Settings


def build_app(args: dict[str, Any]) -> Application:
    """The application builder Serve calls with the config's ``args:`` (exactly one parameter: Serve
    rejects builders with more)."""
    return bind_app(args)


def bind_app(args: dict[str, Any] | None = None, *, actor_env: dict[str, str] | None = None) -> Application:
    """The bound application. ``actor_env``: environment variables for every replica (tests use it to
    hand the API key to the ingress; in production set them where the cluster starts)."""
    settings = Settings.from_args(args).to_dict()
    if actor_env:
        def with_env(dep):
            actor = dict(dep.ray_actor_options or {})
            actor["runtime_env"] = {**actor.get("runtime_env", {}), "env_vars": dict(actor_env)}
            return dep.options(ray_actor_options=actor)
    else:
        def with_env(dep):
            return dep
    t2i = with_env(TextToImage).bind(settings)
    video = with_env(VideoModel).bind(t2i, settings)
    return with_env(Api).bind(video, settings)


__all__ = ["bind_app", "build_app"]
