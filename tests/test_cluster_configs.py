"""The real-cluster configs (cluster/aws, cluster/kuberay, cluster/runtime_env.yaml, cluster/docker), checked
offline the way the tools that consume them check them (the package ``cluster/checks/``):

- KubeRay manifests against the pinned KubeRay release's CRD schemas (vendored, with the API server's
  structural-schema semantics) and against the operator's validation.go rules, re-encoded;
- the AWS launcher file through Ray's own ``prepare_config`` / ``validate_config`` (``ray-schema.json``) and
  the offline step of its AWS bootstrap; one security group for all node types; EFA on the GPU nodes; GPU
  pools that scale from zero; setup commands that write only where their user may; models where the jobs
  read them;
- the image: the Dockerfile's pins equal pyproject.toml's, the configs name the image it documents;
- what they configure: every RayJob entrypoint names a script and a config that loads (with the
  entrypoint's overrides) into the typed config; 40 GPUs, filled by 40 one-GPU training workers.

``test_new_checks_fail_on_the_files_before_the_fix`` runs the checks on the files of commit
:data:`BEFORE` (``git show``) and requires each to report its problem there.
"""

from __future__ import annotations

import copy
import json
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import ray
import yaml
from helpers.ray_cluster import REPO

from cluster.checks import kuberay_rules
from cluster.checks.image import (
    dockerfile_pin_errors,
    image_errors,
    parse_dockerfile,
    pyproject_pins,
    setup_path_errors,
)
from cluster.checks.kube_schema import (
    CEL_RULES,
    KUBERAY_COMMIT,
    KUBERAY_VERSION,
    SCHEMA_FILE,
    cel_rules_in,
    k8s_schema_errors,
    kuberay_schemas,
    structural_errors,
)
from cluster.checks.kuberay_rules import VALIDATION_GO, kuberay_rule_errors
from cluster.checks.launcher import docker_options, ray_launcher_errors
from cluster.checks.nodes import (
    aws_network_errors,
    efa_errors_aws,
    efa_errors_kuberay,
    models_path_errors,
    scale_from_zero_errors,
)
from cluster.checks.report import all_problems
from fdreamer.config import load_config
from pipelines.config import PreprocessConfig
from training.config import TrainConfig

CLUSTER = REPO / "cluster"
AWS = CLUSTER / "aws" / "cluster.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOBS = {"train": CLUSTER / "kuberay" / "rayjob-train.yaml", "preprocess": CLUSTER / "kuberay" / "rayjob-preprocess.yaml"}
MANIFESTS = [RAYCLUSTER, *RAYJOBS.values()]
DOCKERFILE = CLUSTER / "docker" / "Dockerfile"
ENTRY = {"training/run.py": TrainConfig, "pipelines/preprocess.py": PreprocessConfig}
TOTAL_GPUS = 40
# The commit before these checks existed: its configs are what the checks were written against.
BEFORE = "3132a174c0b148ebffd3802ba61990b445b02762"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_parses(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


def test_all_config_checks_pass() -> None:
    """`python -m cluster.checks` (every check below at once) accepts the committed files."""
    report = all_problems()
    assert len(report) == 15
    assert {k: v for k, v in report.items() if v} == {}


# ----------------------------------------------------------------------------- KubeRay: CRD schemas


def test_vendored_crd_schemas_are_the_pinned_release() -> None:
    doc = json.loads(SCHEMA_FILE.read_text())
    assert doc["kuberay"] == {
        "repository": "https://github.com/ray-project/kuberay", "ref": KUBERAY_VERSION, "commit": KUBERAY_COMMIT,
        "files": {"RayCluster": {"path": "helm-chart/kuberay-operator/crds/ray.io_rayclusters.yaml",
                                 "git_blob": "ff0be58ada3bd457605eff1f258c16df21e61e21"},
                  "RayJob": {"path": "helm-chart/kuberay-operator/crds/ray.io_rayjobs.yaml",
                             "git_blob": "c7d3f081af8cf08c256a8c33a0c3b6ea28b816a0"}}}
    assert SCHEMA_FILE.stat().st_size < 250_000  # small enough to commit
    schemas = kuberay_schemas()  # inlines $defs and checks each schema's sha256 against the upstream one
    assert set(schemas) == {"RayCluster", "RayJob"} and "description" not in json.dumps(schemas["RayJob"])[:10_000]
    # the RayJob embeds the RayCluster spec: the same (shared) schema
    assert schemas["RayJob"]["properties"]["spec"]["properties"]["rayClusterSpec"] is schemas["RayCluster"]["properties"]["spec"]
    # the KubeRay release is pinned where people read it
    for path in [*MANIFESTS, CLUSTER / "README.md"]:
        assert f"KubeRay {KUBERAY_VERSION}" in path.read_text(), path


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_crd_schema(path: Path) -> None:
    assert k8s_schema_errors(_load(path)) == []


def _mutated(path: Path, change) -> dict:  # noqa: ANN001
    doc = copy.deepcopy(_load(path))
    change(doc)
    return doc


def _worker(doc: dict, i: int = 0) -> dict:
    return doc["spec"]["workerGroupSpecs"][i]


def _container(group: dict) -> dict:
    containers = group["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.mark.parametrize("change, expected", [
    (lambda d: _worker(d).update(replicas="5"), "replicas: '5' is not of type 'integer'"),
    (lambda d: d["spec"].update(workerGroups=[]), "spec.workerGroups: unknown field"),
    (lambda d: d["spec"]["headGroupSpec"]["template"]["metadata"].update(label={}), "template.metadata.label: unknown field"),
    (lambda d: _container(_worker(d))["resources"]["limits"].update(cpu="90 cores"), "limits.cpu: '90 cores' does not match"),
    (lambda d: _container(_worker(d))["resources"]["limits"].update(cpu=1.5), "is not an integer or a string"),
    (lambda d: _container(_worker(d))["env"].append({"name": "FI_PROVIDER", "value": "tcp"}), "duplicate entry (name='FI_PROVIDER')"),
    # protocol defaults to TCP before the list-map keys (containerPort, protocol) are compared
    (lambda d: _container(d["spec"]["headGroupSpec"])["ports"].append({"containerPort": 6379, "name": "x"}),
     "duplicate entry (containerPort=6379, protocol='TCP')"),
    (lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "num-cpus: 0 is not of type 'string'"),
    (lambda d: _worker(d).update(maxReplicas=2**31), "is not a 'int32'"),
    (lambda d: d["spec"].update(managedBy="me"), "managedBy field value must be either"),
    (lambda d: d["metadata"].update(labels={"app/": "x"}), "invalid label key"),
    (lambda d: d["metadata"].update(name="Fdreamer"), "RFC 1123 subdomain"),
    (lambda d: d.update(apiVersion="ray.io/v1alpha2"), "is not served"),
])
def test_crd_schema_check_rejects(change, expected: str) -> None:  # noqa: ANN001
    errors = k8s_schema_errors(_mutated(RAYCLUSTER, change))
    assert any(expected in e for e in errors), errors


def test_structural_schema_extensions() -> None:
    """The Kubernetes extensions JSON Schema does not know, on a small schema."""
    schema = {"type": "object", "required": ["n"], "properties": {
        "n": {"type": "integer", "default": 3, "format": "int32"},
        "q": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
        "opaque": {"type": "object"},
        "maybe": {"type": "object", "nullable": True, "properties": {}},
        "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
        "ports": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["port", "proto"],
                  "items": {"type": "object", "required": ["port"], "properties": {
                      "port": {"type": "integer"}, "proto": {"type": "string", "default": "TCP"}}}},
        "rule": {"type": "object", "properties": {"jobStatus": {"type": "string"}, "jobDeploymentStatus": {"type": "string"}},
                 "x-kubernetes-validations": [{"rule": "has(self.jobStatus) || has(self.jobDeploymentStatus)", "message": "one"}]},
    }}
    ok = {"q": 4, "free": {"anything": {"goes": [1]}}, "closed": {"a": "x"}, "maybe": None, "tags": ["a", "b"],
          "ports": [{"port": 1}, {"port": 1, "proto": "UDP"}], "rule": {"jobStatus": "FAILED"}}
    assert structural_errors(schema, ok) == []  # "n" is required and defaulted; nullable; preserve-unknown
    assert structural_errors(schema, {**ok, "q": "4Gi"}) == []
    bad = {
        "q": True, "closed": {"a": "x", "b": 1}, "opaque": {"k": "v"}, "tags": ["a", "a"],
        "ports": [{"port": 1}, {"port": 1, "proto": "TCP"}], "rule": {}, "n": 2**31, "extra": 1,
    }
    errors = "\n".join(structural_errors(schema, {**ok, **bad}))
    for expected in (".q: True is not an integer or a string", ".closed.b: unknown field", ".opaque.k: unknown field",
                     ".tags[1]: duplicate entry", ".ports[1]: duplicate entry (port=1, proto='TCP')", ".rule: one",
                     ".n: 2147483648 is not a 'int32'", ".extra: unknown field"):
        assert expected in errors, errors
    assert "free" not in errors


def test_every_cel_rule_of_the_crds_is_encoded() -> None:
    rules = {r for s in kuberay_schemas().values() for r in cel_rules_in(s)}
    assert rules and rules <= set(CEL_RULES)


# ----------------------------------------------------------------------------- KubeRay: operator rules


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_passes_the_operator_validation(path: Path) -> None:
    assert kuberay_rule_errors(_load(path)) == []


@pytest.mark.parametrize("path, change, func, expected", [
    (RAYJOBS["train"], lambda d: d["spec"].update(ttlSecondsAfterFinished=60), "ValidateRayJobSpec",
     "shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished"),
    (RAYJOBS["train"], lambda d: d["spec"].update(ttlSecondsAfterFinished=60, shutdownAfterJobFinishes=True), None, None),
    (RAYJOBS["preprocess"], lambda d: d["spec"].update(backoffLimit=2), "ValidateRayJobSpec",
     "BackoffLimit is incompatible with ClusterSelector mode"),
    (RAYJOBS["train"], lambda d: d["spec"].update(suspend=True), "ValidateRayJobSpec", "not allowed to be suspended"),
    (RAYJOBS["train"], lambda d: d["spec"].update(runtimeEnvYAML="- a list"), "ValidateRayJobSpec", "failed to unmarshal RuntimeEnvYAML"),
    (RAYJOBS["train"], lambda d: d["metadata"].update(name="x" * 48), "ValidateRayJobMetadata", "no more than 47 characters"),
    (RAYJOBS["train"], lambda d: d["spec"].update(deletionStrategy={"onSuccess": {"policy": "DeleteCluster"},
                                                                    "onFailure": {"policy": "DeleteNone"}}),
     "ValidateRayJobSpec", "ClusterSelector mode doesn't support DeletionStrategy=DeleteCluster"),
    (RAYCLUSTER, lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update(labels="a=b"), "ValidateRayClusterSpec",
     "rayStartParams['labels'] is not supported for Head group"),
    (RAYCLUSTER, lambda d: _worker(d).update(minReplicas=6), "ValidateRayClusterSpec", "minReplicas 6 greater than maxReplicas 5"),
    (RAYCLUSTER, lambda d: _worker(d).update(resources={"CPU": "1"}), "ValidateRayClusterSpec",
     "should not be set in both rayStartParams and Resources for a100"),
    (RAYCLUSTER, lambda d: _worker(d).update(idleTimeoutSeconds=60), "ValidateRayClusterSpec", "autoscaler v2 is not enabled"),
    (RAYCLUSTER, lambda d: _worker(d).update(labels={"bad key": "x"}), "ValidateRayClusterSpec", "invalid label key 'bad key'"),
    (RAYCLUSTER, lambda d: d["spec"].update(enableInTreeAutoscaling=False) or _container(d["spec"]["headGroupSpec"])["env"]
     .append({"name": "RAY_enable_autoscaler_v2", "value": "true"}), "ValidateRayClusterSpec", "cannot be set to"),
    (RAYCLUSTER, lambda d: d["metadata"].update(name="f" * 54), "ValidateRayClusterMetadata", "no more than 53 characters"),
    (RAYCLUSTER, lambda d: d["spec"].update(upgradeStrategy={"type": "Rolling"}), "ValidateRayClusterUpgradeOptions", "is invalid"),
])
def test_operator_rules_reject(path: Path, change, func: str | None, expected: str | None) -> None:  # noqa: ANN001
    errors = kuberay_rule_errors(_mutated(path, change))
    if func is None:
        assert errors == []
        return
    assert len(errors) == 1 and expected in errors[0], errors
    assert errors[0].startswith(f"[{VALIDATION_GO} {func}, KubeRay {KUBERAY_VERSION}]"), errors


# ----------------------------------------------------------------------------- AWS cluster launcher


def test_aws_validates_with_rays_own_launcher_checks() -> None:
    import jsonschema

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(_load(AWS), schema)  # the schema alone, as before
    assert ray_launcher_errors(_load(AWS)) == []  # prepare_config + validate_config + the NI bootstrap step


@pytest.mark.parametrize("change, expected", [
    (lambda c: c["available_node_types"]["gpu_a100"]["docker"].update(run_options=[]), "ray-schema.json"),
    (lambda c: c["available_node_types"]["gpu_a100"]["node_config"].update(SecurityGroupIds=["sg-x"]),
     "subnets and security groups must ONLY be given in each NetworkInterface"),
    (lambda c: c.update(max_workers=4) or c["available_node_types"]["gpu_a100"].update(min_workers=5),
     "smaller than the sum of `min_workers`"),
])
def test_ray_launcher_check_rejects(change, expected: str) -> None:  # noqa: ANN001
    errors = ray_launcher_errors(_mutated(AWS, change))
    assert any(expected in e for e in errors), errors


def test_aws_one_security_group_and_subnet() -> None:
    cfg = _load(AWS)
    assert aws_network_errors(cfg) == []
    gpu = cfg["available_node_types"]["gpu_a100"]["node_config"]
    assert {g for ni in gpu["NetworkInterfaces"] for g in ni["Groups"]} == {"sg-fdreamer-efa"}
    other = _mutated(AWS, lambda c: c["available_node_types"]["head"]["node_config"].pop("SecurityGroupIds"))
    assert any("'head' has no SecurityGroupIds" in e for e in aws_network_errors(other))


def test_efa_on_the_gpu_nodes() -> None:
    cfg, rc = _load(AWS), _load(RAYCLUSTER)
    assert efa_errors_aws(cfg) == [] and efa_errors_kuberay(rc) == []
    nis = cfg["available_node_types"]["gpu_a100"]["node_config"]["NetworkInterfaces"]
    assert [(ni["NetworkCardIndex"], ni["InterfaceType"]) for ni in nis] == [(i, "efa") for i in range(4)]
    # the EFA device options reach the GPU containers only (docker run fails where /dev/infiniband is missing)
    assert "--device=/dev/infiniband" in docker_options(cfg, "gpu_a100")
    assert not any("infiniband" in o for n in ("head", "cpu_decode") for o in docker_options(cfg, n))
    wrong = _mutated(AWS, lambda c: c["docker"]["run_options"].append("--device=/dev/infiniband"))
    assert any("cpu_decode (c6i.8xlarge) has no EFA" in e for e in efa_errors_aws(wrong))
    no_lock = _mutated(RAYCLUSTER, lambda d: _container(_worker(d)).pop("securityContext"))
    assert any("IPC_LOCK" in e for e in efa_errors_kuberay(no_lock))


def test_gpu_groups_scale_from_zero() -> None:
    assert scale_from_zero_errors(_load(AWS), _load(RAYCLUSTER)) == []


def test_setup_commands_write_only_where_their_user_may() -> None:
    cfg, dockerfile = _load(AWS), DOCKERFILE.read_text()
    assert setup_path_errors(cfg, dockerfile) == []
    as_ray = _mutated(AWS, lambda c: c["setup_commands"].append("mkdir -p /data/cache"))
    assert any("writes /data/cache as the container user 'ray'" in e for e in setup_path_errors(as_ray, dockerfile))
    into_home = _mutated(AWS, lambda c: c["setup_commands"].append("mkdir -p /home/ray/x && mkdir -p /models/x"))
    assert setup_path_errors(into_home, dockerfile) == []  # /models belongs to ray in the image
    assert models_path_errors(cfg, _load(RAYCLUSTER), [_load(p) for p in RAYJOBS.values()]) == []


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
    assert g["min_workers"] == 0 and g["max_workers"] == 5  # from zero to the 40 GPUs
    total = sum(t.get("max_workers", 0) * t["resources"].get("GPU", 0) for t in types.values())
    assert total == TOTAL_GPUS
    cpu = [t for n, t in types.items() if n != cfg["head_node_type"] and not t["resources"].get("GPU")]
    assert cpu and all(t["min_workers"] == 0 < t["max_workers"] for t in cpu)  # autoscaling CPU pool
    assert all(t["node_config"]["InstanceType"].startswith(("c6i", "m6i", "c7i")) for t in cpu)
    assert cfg["max_workers"] >= sum(t["max_workers"] for n, t in types.items() if n != cfg["head_node_type"])
    # the project is mounted over the image's editable install
    assert cfg["file_mounts"] == {"/home/ray/fdreamer": "."}
    assert any("pip install" in c and "-e /home/ray/fdreamer" in c for c in cfg["setup_commands"])
    assert any("MLFLOW_TRACKING_URI=" in o for o in cfg["docker"]["run_options"])
    # the training workers (1 GPU + cpus_per_worker each) fit on the GPU nodes
    train = load_config(TrainConfig, REPO / "training" / "configs" / "stage1.yaml")
    assert train.scaling.num_workers * train.scaling.cpus_per_worker <= g["max_workers"] * g["resources"]["CPU"]


# ----------------------------------------------------------------------------- image


def test_dockerfile_pins_equal_pyprojects() -> None:
    dockerfile = DOCKERFILE.read_text()
    d = parse_dockerfile(dockerfile)
    pins = pyproject_pins(_pyproject())
    assert d["pins"]["torch"] == pins["torch"] and d["from"] == f"rayproject/ray:{pins['ray']}-py311-cu128"
    assert dockerfile_pin_errors(dockerfile, _pyproject(), (REPO / "Makefile").read_text()) == []
    drifted = dockerfile.replace(f"torch=={pins['torch']}", "torch==2.12.1")
    assert any("torch==2.12.1, pyproject.toml / the Makefile 2.13.0" in e
               for e in dockerfile_pin_errors(drifted, _pyproject(), (REPO / "Makefile").read_text()))
    # the EFA software for containers, and the model / cache paths owned by the image's user
    run = " ".join(d["run"])
    assert "efa_installer.sh -y --skip-kmod --skip-limit-conf --no-verify" in run
    assert d["user"] == "ray" and {("ray", "/models"), ("ray", d["env"]["FDREAMER_CACHE"])} <= set(d["owned"])
    assert "/opt/amazon/ofi-nccl" in d["env"]["LD_LIBRARY_PATH"]


def test_configs_name_the_dockerfile_image() -> None:
    dockerfile = DOCKERFILE.read_text()
    image = parse_dockerfile(dockerfile)["image"]
    assert image == f"ghcr.io/fdreamer/fdreamer:{_pyproject()['project']['version']}-cu128"
    manifests = [_load(p) for p in MANIFESTS]
    assert image_errors(_load(AWS), manifests, dockerfile, _pyproject()) == []
    assert _load(AWS)["docker"]["image"] == image == _container(_load(RAYCLUSTER)["spec"]["headGroupSpec"])["image"]


# ----------------------------------------------------------------------------- the checks, on the old files


def _before(path: Path) -> str:
    rel = path.relative_to(REPO)
    try:
        out = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE}:{rel}"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"git not usable here: {exc}")
    if out.returncode != 0:
        if "does not exist" in out.stderr or "exists on disk, but not in" in out.stderr:
            return ""  # the file did not exist then
        pytest.skip(f"commit {BEFORE[:8]} not in this clone: {out.stderr.strip()}")
    return out.stdout


def test_new_checks_fail_on_the_files_before_the_fix() -> None:
    """Each problem the issue names, reported by its check on the files as they were at :data:`BEFORE`."""
    aws = yaml.safe_load(_before(AWS))
    rc = yaml.safe_load(_before(RAYCLUSTER))
    jobs = {k: yaml.safe_load(_before(p)) for k, p in RAYJOBS.items()}
    dockerfile = _before(DOCKERFILE)
    assert dockerfile == ""  # there was no Dockerfile
    found = {
        "raycluster rules": kuberay_rule_errors(rc),
        "rayjob-train rules": kuberay_rule_errors(jobs["train"]),
        "rayjob-preprocess rules": kuberay_rule_errors(jobs["preprocess"]),
        "security groups": aws_network_errors(aws),
        "efa aws": efa_errors_aws(aws),
        "efa kuberay": efa_errors_kuberay(rc),
        "scale from zero": scale_from_zero_errors(aws, rc),
        "setup paths": setup_path_errors(aws, dockerfile),
        "models path": models_path_errors(aws, rc, list(jobs.values())),
        "dockerfile pins": dockerfile_pin_errors(dockerfile, _pyproject(), (REPO / "Makefile").read_text()),
        "image names": image_errors(aws, [rc, *jobs.values()], dockerfile, _pyproject()),
    }
    text = {k: "\n".join(v) for k, v in found.items()}
    assert "rayStartParams['labels'] is not supported for Head group" in text["raycluster rules"]
    assert "shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished" in text["rayjob-train rules"]
    assert "shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished" in text["rayjob-preprocess rules"]
    # the operator stops at its first problem; without the TTL the old preprocess job's backoffLimit: 2 is next
    no_ttl = {**jobs["preprocess"], "spec": {k: v for k, v in jobs["preprocess"]["spec"].items() if k != "ttlSecondsAfterFinished"}}
    assert "BackoffLimit is incompatible with ClusterSelector mode" in "\n".join(kuberay_rule_errors(no_ttl))
    assert "'head' has no SecurityGroupIds" in text["security groups"] and "'cpu_decode' has no" in text["security groups"]
    assert "EFA interfaces on network cards [0], want one on each of [0, 1, 2, 3]" in text["efa aws"]
    assert "--device=/dev/infiniband" in text["efa aws"] and "memlock" in text["efa aws"]
    assert "IPC_LOCK" in text["efa kuberay"] and "FI_EFA_USE_DEVICE_RDMA" in text["efa kuberay"]
    assert "min_workers/max_workers = 5/5, want 0/5" in text["scale from zero"]
    assert "replicas/minReplicas/maxReplicas = (5, 5, 5), want (0, 0, 5)" in text["scale from zero"]
    assert "writes /models as the container user 'ray'" in text["setup paths"]
    assert "--models_dir=/models, but the AWS containers mount no volume there" in text["models path"]
    assert "the Dockerfile pins no package" in text["dockerfile pins"]
    assert "aws docker.image: image 'rayproject/ray:2.60.0-py311-cu128'" in text["image names"]
    # the schema-level checks accepted the old files: their defects were in what the operator and the
    # launcher do with valid fields
    assert all(k8s_schema_errors(doc) == [] for doc in (rc, *jobs.values()))
    assert ray_launcher_errors(aws) == []


# ----------------------------------------------------------------------------- what the configs run


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
            assert g["minReplicas"] == g["replicas"] == 0 < g["maxReplicas"]  # from zero
            pod = g["template"]["spec"]
            assert pod["nodeSelector"]["node.kubernetes.io/instance-type"] == "p4de.24xlarge"
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        total += gpus * g["maxReplicas"]
        assert _container(g)["image"] == _container(head)["image"]
        assert "labels" not in g["rayStartParams"] and g["labels"]["fdreamer-role"]
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
    kube = _load(RAYCLUSTER)["spec"]["headGroupSpec"]["rayStartParams"]["resources"]
    aws = _load(AWS)
    return json.loads(yaml.safe_load(kube)), aws["available_node_types"][aws["head_node_type"]]["resources"]


@pytest.mark.parametrize("kind", sorted(RAYJOBS))
def test_rayjob_driver_is_placed_on_the_head(kind: str) -> None:
    """Ray Jobs put the driver where its entrypoint resources fit: a CPU request cannot fit the 0-CPU head,
    so it would land on a GPU / decode node. The RayJobs ask for the head's custom resource instead, and
    both cluster definitions advertise the same number of driver slots."""
    spec = _load(RAYJOBS[kind])["spec"]
    kube, aws = _head_resources()
    assert spec.get("entrypointNumCpus", 0) == 0 and spec.get("entrypointNumGpus", 0) == 0
    wants = json.loads(spec["entrypointResources"])
    assert wants == {"head": 1}
    assert kube["head"] == aws["head"] >= 2  # preprocessing and training drivers can run at once
    assert aws["CPU"] == 0 and _load(RAYCLUSTER)["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_operator_rules_cite_what_they_encode() -> None:
    rules = [f for n, f in vars(kuberay_rules).items() if n.startswith("validate_") and callable(f)]
    assert len(rules) >= 12
    for f in rules:
        assert "validation.go" in f.__doc__ and f"KubeRay {KUBERAY_VERSION}" in f.__doc__, f.__name__
