"""Schema-level checks of the real-cluster configs (cluster/aws, cluster/kuberay, cluster/runtime_env.yaml).

They parse; the AWS file validates against Ray's own cluster-launcher JSON schema; the KubeRay
manifests have their required fields; every RayJob entrypoint names an existing script and config,
and that config (with the entrypoint's overrides) loads with the project's typed loader; the GPUs add
up to exactly 40 in both shapes, which the training config's 40 one-GPU workers fill.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import ray
import yaml
from helpers.ray_cluster import REPO

from fdreamer.config import load_config
from pipelines.config import PreprocessConfig
from training.config import TrainConfig

CLUSTER = REPO / "cluster"
AWS = CLUSTER / "aws" / "cluster.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOBS = {"train": CLUSTER / "kuberay" / "rayjob-train.yaml", "preprocess": CLUSTER / "kuberay" / "rayjob-preprocess.yaml"}
ENTRY = {"training/run.py": TrainConfig, "pipelines/preprocess.py": PreprocessConfig}
TOTAL_GPUS = 40


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_parses(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


# ----------------------------------------------------------------------------- AWS cluster launcher


def test_aws_validates_against_ray_schema() -> None:
    import jsonschema

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(_load(AWS), schema)


def test_aws_shape() -> None:
    cfg = _load(AWS)
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert set(gpu_types) == {"gpu_a100"}
    g = gpu_types["gpu_a100"]
    assert g["node_config"]["InstanceType"] == "p4de.24xlarge" and g["resources"]["GPU"] == 8
    assert g["min_workers"] == g["max_workers"] == 5  # a fixed training pool
    total = sum(t.get("max_workers", 0) * t["resources"].get("GPU", 0) for t in types.values())
    assert total == sum(t.get("min_workers", 0) * t["resources"].get("GPU", 0) for t in types.values()) == TOTAL_GPUS
    cpu = [t for n, t in types.items() if n != cfg["head_node_type"] and not t["resources"].get("GPU")]
    assert cpu and all(t["min_workers"] == 0 < t["max_workers"] for t in cpu)  # autoscaling CPU pool
    assert all(t["node_config"]["InstanceType"].startswith(("c6i", "m6i", "c7i")) for t in cpu)
    assert cfg["max_workers"] >= sum(t["max_workers"] for n, t in types.items() if n != cfg["head_node_type"])
    # the project is mounted and installed with pinned torch / ray
    assert "." in cfg["file_mounts"].values()
    setup = "\n".join(cfg["setup_commands"])
    assert "torch==2.13.0" in setup and "pip install" in setup and "-e " in setup
    assert ray.__version__ in cfg["docker"]["image"]
    assert any("MLFLOW_TRACKING_URI=" in o for o in cfg["docker"]["run_options"])
    # the training workers (1 GPU + cpus_per_worker each) fit on the GPU nodes
    train = load_config(TrainConfig, REPO / "training" / "configs" / "stage1.yaml")
    assert train.scaling.num_workers * train.scaling.cpus_per_worker <= g["min_workers"] * g["resources"]["CPU"]


# ----------------------------------------------------------------------------- KubeRay


def _container(group: dict) -> dict:
    containers = group["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_raycluster_shape() -> None:
    rc = _load(RAYCLUSTER)
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster" and rc["metadata"]["name"]
    spec = rc["spec"]
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and _container(head)["image"]
    assert "nvidia.com/gpu" not in _container(head)["resources"]["limits"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    total = 0
    for g in groups.values():
        limits = _container(g)["resources"]["limits"]
        gpus = int(limits.get("nvidia.com/gpu", 0))
        assert int(_container(g)["resources"]["requests"].get("nvidia.com/gpu", 0)) == gpus
        if gpus:
            assert g["rayStartParams"]["num-gpus"] == str(gpus)
            assert g["minReplicas"] == g["maxReplicas"] == g["replicas"]
            pod = g["template"]["spec"]
            assert pod["nodeSelector"]["node.kubernetes.io/instance-type"] == "p4de.24xlarge"
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        total += gpus * g["maxReplicas"]
        assert _container(g)["image"] == _container(head)["image"]
    assert total == TOTAL_GPUS
    cpu = [g for g in groups.values() if "nvidia.com/gpu" not in _container(g)["resources"]["limits"]]
    assert cpu and all(g["minReplicas"] == 0 < g["maxReplicas"] for g in cpu)
    assert spec["enableInTreeAutoscaling"] is True


def _entrypoint(job: dict) -> tuple[str, Path, list[str]]:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python", argv
    script = argv[1]
    rest = argv[2:]
    i = rest.index("--config")
    config = REPO / rest[i + 1]
    overrides = rest[:i] + rest[i + 2:]
    return script, config, overrides


@pytest.mark.parametrize("kind", sorted(RAYJOBS))
def test_rayjob_entrypoints_load(kind: str) -> None:
    job = _load(RAYJOBS[kind])
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"]
    assert "rayClusterSpec" in spec or "clusterSelector" in spec
    if "clusterSelector" in spec:
        assert spec["clusterSelector"]["ray.io/cluster"] == _load(RAYCLUSTER)["metadata"]["name"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    script, config, overrides = _entrypoint(job)
    assert (REPO / script).is_file() and config.is_file(), (script, config)
    assert all(o.startswith("--") and "=" in o for o in overrides), overrides
    cfg = load_config(ENTRY[script], config, overrides)  # typed: unknown keys / wrong types fail here
    if isinstance(cfg, TrainConfig):
        assert cfg.stage == "stage1" and cfg.scaling.use_gpu
        assert cfg.scaling.num_workers * 1 == TOTAL_GPUS  # one GPU per Ray Train worker fills the 40
        assert cfg.global_batch == TOTAL_GPUS and cfg.storage_path.startswith("s3://")
        assert cfg.tracking.tracking_uri and cfg.tracking.tracking_uri.startswith("http")
    else:
        cfg.check_ready()
        assert cfg.output.startswith("s3://") and all(i.startswith("s3://") for i in cfg.inputs)
        enc = cfg.stages.encode
        assert enc.num_gpus == 1 and enc.concurrency[1] * enc.num_gpus == TOTAL_GPUS  # the pool grows to every GPU
        assert enc.concurrency[0] == 1 and cfg.stages.decode.concurrency is None  # decode: every CPU
        assert cfg.mlflow_tracking_uri and cfg.profile.num_frames == 32 and cfg.profile.size == 256


def test_runtime_env() -> None:
    env = _load(CLUSTER / "runtime_env.yaml")
    assert env["working_dir"] == "."
    for heavy in (".venv/", "runs/", "data/", "models/", ".git/"):
        assert heavy in env["excludes"]
    assert env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert all(isinstance(v, str) for v in env["env_vars"].values())


def _head_resources() -> tuple[dict, dict]:
    """The head's custom resources in the KubeRay RayCluster and in the AWS cluster launcher config."""
    import json

    kube = _load(RAYCLUSTER)["spec"]["headGroupSpec"]["rayStartParams"]["resources"]
    aws = _load(CLUSTER / "aws" / "cluster.yaml")
    return json.loads(yaml.safe_load(kube)), aws["available_node_types"][aws["head_node_type"]]["resources"]


@pytest.mark.parametrize("kind", sorted(RAYJOBS))
def test_rayjob_driver_is_placed_on_the_head(kind: str) -> None:
    """Ray Jobs put the driver where its entrypoint resources fit: a CPU request cannot fit the 0-CPU head,
    so it would land on a GPU / decode node. The RayJobs ask for the head's custom resource instead, and
    both cluster definitions advertise the same number of driver slots."""
    import json

    spec = _load(RAYJOBS[kind])["spec"]
    kube, aws = _head_resources()
    assert spec.get("entrypointNumCpus", 0) == 0 and spec.get("entrypointNumGpus", 0) == 0
    wants = json.loads(spec["entrypointResources"])
    assert wants == {"head": 1}
    assert kube["head"] == aws["head"] >= 2  # preprocessing and training drivers can run at once
    assert aws["CPU"] == 0 and _load(RAYCLUSTER)["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
