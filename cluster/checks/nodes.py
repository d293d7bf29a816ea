"""The project's checks of the nodes both cluster definitions (AWS launcher, KubeRay) start.

One security group and one subnet for every AWS node type (:func:`aws_network_errors`), EFA on the GPU nodes
and on no other (:func:`efa_errors_aws`, :func:`efa_errors_kuberay`), GPU pools that scale from zero
(:func:`scale_from_zero_errors`) and the models mounted where the jobs read them (:func:`models_path_errors`).
"""

from __future__ import annotations

import re
import shlex
from typing import Any

from cluster.checks.kuberay_rules import containers
from cluster.checks.launcher import bootstrapped, docker_options

# Network cards of the EFA instance types the configs use (EC2 "network cards" table: one EFA per card).
EFA_NETWORK_CARDS = {"p4d.24xlarge": 4, "p4de.24xlarge": 4}
EFA_ENV = ("FI_PROVIDER", "FI_EFA_USE_DEVICE_RDMA", "NCCL_SOCKET_IFNAME")


def _ids_per_type(types: dict[str, Any], key: str) -> dict[str, tuple[str, ...]]:
    """``{node type: its sorted node_config[key] ids}``."""
    return {name: tuple(sorted(set(t["node_config"].get(key) or []))) for name, t in types.items()}


def aws_network_errors(config: dict[str, Any]) -> list[str]:
    """Every node type ends up in the same, user-given security group(s) (so Ray's ``_configure_security_group``
    creates none and traffic between node types is allowed by the group's self rule), in one subnet."""
    types = bootstrapped(config)["available_node_types"]
    groups, subnets = _ids_per_type(types, "SecurityGroupIds"), _ids_per_type(types, "SubnetIds")
    out = [f"node type {n!r} has no SecurityGroupIds: Ray would create its own group for it "
           "(ray-autoscaler-<cluster>), which the other node types' group does not allow" for n, g in groups.items()
           if not g]
    if len(set(groups.values())) > 1:
        out.append(f"node types are in different security groups {groups}: one group shared by all (inbound and "
                   "outbound all traffic to itself, as EFA requires) is needed")
    if len(set(subnets.values())) > 1:
        out.append(f"node types are in different subnets {subnets}: EFA traffic stays within one subnet")
    return out


def _option_env(options: list[str]) -> dict[str, str]:
    env = {}
    for opt in options:
        words = shlex.split(opt)
        for i, word in enumerate(words):
            if word in ("--env", "-e") and i + 1 < len(words):
                key, _, val = words[i + 1].partition("=")
                env[key] = val
            elif word.startswith("--env="):
                key, _, val = word[len("--env="):].partition("=")
                env[key] = val
    return env


def efa_errors_aws(config: dict[str, Any]) -> list[str]:
    """EFA node types: one EFA interface per network card, the devices and unlimited memlock in the container,
    a large /dev/shm and the libfabric / NCCL environment; other node types: no EFA device option."""
    out = []
    for name, node in config["available_node_types"].items():
        itype = node["node_config"].get("InstanceType")
        options = docker_options(config, name)
        text = " ".join(options)
        cards = EFA_NETWORK_CARDS.get(itype)
        if cards is None:
            if "/dev/infiniband" in text:
                out.append(f"{name} ({itype}) has no EFA but its docker options pass /dev/infiniband (docker run fails)")
            continue
        nis = node["node_config"].get("NetworkInterfaces") or []
        efa = sorted(ni.get("NetworkCardIndex", 0) for ni in nis if ni.get("InterfaceType") in ("efa", "efa-only"))
        if efa != list(range(cards)):
            out.append(f"{name} ({itype}): EFA interfaces on network cards {efa}, want one on each of {list(range(cards))}")
        if not any(ni.get("NetworkCardIndex", 0) == 0 and ni.get("DeviceIndex") == 0 for ni in nis):
            out.append(f"{name}: no primary interface (NetworkCardIndex 0, DeviceIndex 0)")
        if not (node["node_config"].get("Placement") or {}).get("GroupName"):
            out.append(f"{name}: EFA nodes belong in a cluster placement group (Placement.GroupName)")
        if not re.search(r"--device[= ]/dev/infiniband\b", text):
            out.append(f"{name}: the container does not get the EFA devices (--device=/dev/infiniband)")
        if not re.search(r"--ulimit[= ]memlock=-1", text):
            out.append(f"{name}: the container's memlock limit is not unlimited (--ulimit memlock=-1)")
        if "--shm-size" not in text and "--ipc=host" not in text:
            out.append(f"{name}: no --shm-size / --ipc=host for NCCL's and the object store's shared memory")
        env = _option_env(options)
        out += [f"{name}: {key} not set in the container" for key in EFA_ENV if not env.get(key)]
        if env.get("FI_PROVIDER") not in (None, "", "efa"):
            out.append(f"{name}: FI_PROVIDER={env['FI_PROVIDER']}, want efa")
    return out


def _efa_groups(rc: dict[str, Any]) -> list[dict[str, Any]]:
    return [g for g in rc["spec"].get("workerGroupSpecs") or []
            if "nvidia.com/gpu" in ((containers(g)[0].get("resources") or {}).get("limits") or {})]


def efa_errors_kuberay(rc: dict[str, Any]) -> list[str]:
    """GPU groups: EFA devices requested from the EFA device plugin, IPC_LOCK (memory registration), a
    memory-backed /dev/shm and the libfabric / NCCL environment."""
    out = []
    for group in _efa_groups(rc):
        name = group["groupName"]
        pod = group["template"]["spec"]
        selector = (pod.get("nodeSelector") or {}).get("node.kubernetes.io/instance-type")
        cards = EFA_NETWORK_CARDS.get(selector)
        container = containers(group)[0]
        res = container.get("resources") or {}
        for side in ("requests", "limits"):
            got = (res.get(side) or {}).get("vpc.amazonaws.com/efa")
            if cards and str(got) != str(cards):
                out.append(f"{name}: resources.{side}['vpc.amazonaws.com/efa'] = {got}, want {cards} ({selector})")
        caps = ((container.get("securityContext") or {}).get("capabilities") or {}).get("add") or []
        if "IPC_LOCK" not in caps:
            out.append(f"{name}: securityContext.capabilities.add lacks IPC_LOCK (EFA pins memory)")
        shm = [v for v in pod.get("volumes") or [] if (v.get("emptyDir") or {}).get("medium") == "Memory"]
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts") or []}
        if not any(mounts.get(v["name"]) == "/dev/shm" for v in shm):
            out.append(f"{name}: no memory-backed emptyDir mounted at /dev/shm")
        env = {e["name"]: e.get("value") for e in container.get("env") or []}
        out += [f"{name}: env {key} not set" for key in EFA_ENV if not env.get(key)]
    return out


def scale_from_zero_errors(aws: dict[str, Any], rc: dict[str, Any]) -> list[str]:
    """GPU pools start at zero nodes and grow to the 5 nodes of the plan (the autoscaler adds them when the
    encoders of pass 2 or Ray Train's placement group ask), in both cluster definitions."""
    out = []
    for name, node in aws["available_node_types"].items():
        if node["resources"].get("GPU", 0) and (node.get("min_workers", 0), node.get("max_workers")) != (0, 5):
            out.append(f"aws {name}: min_workers/max_workers = {node.get('min_workers', 0)}/{node.get('max_workers')},"
                       " want 0/5")
    if rc["spec"].get("enableInTreeAutoscaling") is not True:
        out.append("RayCluster: enableInTreeAutoscaling is not true (nothing would add the GPU pods)")
    for group in _efa_groups(rc):
        got = (group.get("replicas", 0), group.get("minReplicas", 0), group.get("maxReplicas"))
        if got != (0, 0, 5):
            out.append(f"RayCluster {group['groupName']}: replicas/minReplicas/maxReplicas = {got}, want (0, 0, 5)")
    return out


def models_path_errors(aws: dict[str, Any], rc: dict[str, Any], jobs: list[dict[str, Any]]) -> list[str]:
    """The jobs read the models where both cluster definitions put them."""
    out = []
    wanted = set()
    for job in jobs:
        for word in shlex.split(job["spec"]["entrypoint"]):
            if word.startswith("--models_dir="):
                wanted.add(word.split("=", 1)[1])
    aws_targets = set()
    for opt in (aws.get("docker") or {}).get("run_options", []):
        m = re.search(r"--volume[= ](\S+):(/\S*?)(?::ro)?$", opt)
        if m:
            aws_targets.add(m.group(2))
    for path in wanted:
        if path not in aws_targets:
            out.append(f"the RayJobs read --models_dir={path}, but the AWS containers mount no volume there "
                       f"(mounts: {sorted(aws_targets)})")
        for group in [rc["spec"]["headGroupSpec"], *_efa_groups(rc)]:
            mounts = {m["mountPath"] for m in containers(group)[0].get("volumeMounts") or []}
            if path not in mounts:
                out.append(f"RayCluster {group.get('groupName', 'head')}: nothing mounted at {path}")
    return out
