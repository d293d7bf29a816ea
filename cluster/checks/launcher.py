"""A Ray cluster-launcher YAML through the installed Ray's own code, as ``ray up`` runs it before touching AWS.

:func:`ray_launcher_errors`: ``prepare_config`` (defaults, docker checks), then ``validate_config``
(``ray/autoscaler/ray-schema.json`` and its extra rules), then the offline part of AWS bootstrapping
(``_configure_from_network_interfaces``). :func:`bootstrapped` and :func:`docker_options` give the config
as the launcher ends up using it, for the project's checks of the nodes.
"""

from __future__ import annotations

import copy
from typing import Any



def ray_launcher_errors(config: dict[str, Any]) -> list[str]:
    """The launcher config through Ray's own code, as ``ray up`` runs it before touching AWS:
    ``prepare_config`` then ``validate_config`` (ray-schema.json + its rules), then the AWS bootstrap step
    that needs no AWS call (``_configure_from_network_interfaces``)."""
    import jsonschema
    from ray.autoscaler._private.aws.config import _configure_from_network_interfaces
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
        if prepared["provider"]["type"] == "aws":
            _configure_from_network_interfaces(prepared)
    except jsonschema.ValidationError as exc:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in exc.absolute_path) or "."
        return [f"ray-schema.json {where}: {exc.message}"]
    except (ValueError, AssertionError, KeyError, RuntimeError) as exc:
        return [f"ray launcher: {type(exc).__name__}: {exc}"]
    return []


def bootstrapped(config: dict[str, Any]) -> dict[str, Any]:
    """The config after ``prepare_config`` and the offline AWS bootstrap step (node configs as launched)."""
    from ray.autoscaler._private.aws.config import _configure_from_network_interfaces
    from ray.autoscaler._private.util import prepare_config

    return _configure_from_network_interfaces(prepare_config(copy.deepcopy(config)))


def docker_options(config: dict[str, Any], node_type: str) -> list[str]:
    """The ``docker run`` options a worker of ``node_type`` gets (global run_options + its worker_run_options,
    as ``StandardAutoscaler._get_node_specific_docker_config`` merges them; head: head_run_options)."""
    docker = dict(config.get("docker") or {})
    docker.update(config["available_node_types"][node_type].get("docker") or {})
    own = "head_run_options" if node_type == config.get("head_node_type") else "worker_run_options"
    return [*docker.get("run_options", []), *docker.get(own, [])]
