"""The KubeRay operator's own validation (``validation.go``), re-encoded: the operator refuses a manifest the
API server accepted (an ``InvalidRayClusterSpec`` / ``InvalidRayJobSpec`` event, and nothing else happens).

Each ``validate_*`` function encodes the Go function of the same name in ray-operator/controllers/ray/utils/
validation.go at KubeRay v1.7.0 (commit 59d663ae), in the same order, returning the first problem as the Go
code does (None: accepted). The operator runs them on the object as stored, with the CRD's defaults applied,
which :func:`kuberay_rule_errors` does first. Feature gates: ray-operator/pkg/features/features.go (v1.7.0).
"""
from __future__ import annotations

import re
from typing import Any

import yaml

from cluster.checks.k8s_names import is_dns1035_label, label_errors
from cluster.checks.kube_schema import KUBERAY_VERSION, apply_defaults, kuberay_schemas

VALIDATION_GO = "ray-operator/controllers/ray/utils/validation.go"

FEATURE_GATES = {"RayJobDeletionPolicy": True, "RayClusterNetworkPolicy": False, "RayClusterMTLS": False,
                 "RayClusterHistoryServer": False, "GCSFaultToleranceEmbeddedStorage": False}
MAX_RAYCLUSTER_NAME = 53  # constant.go MaxRayClusterNameLength
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6  # constant.go MaxRayJobNameLength


def _version(text: str) -> tuple[int, ...] | None:
    """k8s.io/apimachinery/pkg/util/version.ParseGeneric, enough for Ray versions."""
    m = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
    return tuple(int(g or 0) for g in m.groups()) if m else None


def containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers of a head / worker group's pod template."""
    return ((group.get("template") or {}).get("spec") or {}).get("containers") or []


def _env(container: dict[str, Any] | None) -> dict[str, Any]:
    return {e.get("name"): e for e in (container or {}).get("env") or []}


def autoscaling_enabled(spec: dict[str, Any] | None) -> bool:
    """Encodes ``IsAutoscalingEnabled`` of ray-operator/controllers/ray/utils/util.go, KubeRay v1.7.0."""
    return bool(spec) and spec.get("enableInTreeAutoscaling") is True


def _autoscaling_v2(spec: dict[str, Any]) -> bool:
    """Encodes ``IsAutoscalingV2Enabled`` of ray-operator/controllers/ray/utils/util.go, KubeRay v1.7.0."""
    return ((spec.get("autoscalerOptions") or {}).get("version")) == "v2"


def _v2_enabled(spec: dict[str, Any]) -> bool:
    """Autoscaler v2 by the spec or by the head's ``RAY_enable_autoscaler_v2`` (the worker-group checks)."""
    head_env = _env((containers(spec["headGroupSpec"]) or [None])[0])
    return _autoscaling_v2(spec) or (head_env.get("RAY_enable_autoscaler_v2") or {}).get("value") in ("1", "true")


def _name_error(kind: str, name: str, max_len: int) -> str | None:
    """The name checks of ``ValidateRayClusterMetadata`` / ``ValidateRayJobMetadata``."""
    if len(name) > max_len:
        return f"{kind} name should be no more than {max_len} characters"
    if errs := is_dns1035_label(name):
        return f"{kind} name should be a valid DNS1035 label: {errs}"
    return None


def _ray_version_error(spec: dict[str, Any], what: str, minimum: tuple[int, ...]) -> str | None:
    """``what`` needs ``spec.rayVersion`` >= ``minimum`` (the priority and token-auth checks)."""
    if not spec.get("rayVersion"):
        return f"{what} but RayVersion was not specified"
    version = _version(spec["rayVersion"])
    if version is None:
        return f"{what} but RayVersion format is invalid: {spec['rayVersion']}"
    if version < minimum:
        return f"{what} but minimum Ray version is {'.'.join(map(str, minimum))}, got {spec['rayVersion']}"
    return None


def validate_ray_cluster_metadata(meta: dict[str, Any]) -> str | None:
    """Encodes ``ValidateRayClusterMetadata`` of ray-operator/controllers/ray/utils/validation.go, KubeRay v1.7.0."""
    return _name_error("RayCluster", meta.get("name", ""), MAX_RAYCLUSTER_NAME)


def validate_ray_group_resources(group: str, params: dict[str, Any], resources: dict[str, Any]) -> str | None:
    """Encodes ``validateRayGroupResources`` of ray-operator/controllers/ray/utils/validation.go, KubeRay v1.7.0."""
    if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and resources:
        return (f"resource fields should not be set in both rayStartParams and Resources for {group} group; "
                "please use only one")
    return None


def validate_ray_group_labels(group: str, params: dict[str, Any], labels: dict[str, Any]) -> str | None:
    """Encodes ``validateRayGroupLabels`` of ray-operator/controllers/ray/utils/validation.go, KubeRay v1.7.0."""
    if "labels" in params:
        return (f"rayStartParams['labels'] is not supported for {group} group; please use the top-level Labels "
                "field instead")
    errs = label_errors(labels, f"{group} group")
    return "; ".join(errs) or None


def validate_worker_group_idle_timeout(group: dict[str, Any], spec: dict[str, Any]) -> str | None:
    """Encodes ``validateWorkerGroupIdleTimeout`` of ray-operator/controllers/ray/utils/validation.go, KubeRay v1.7.0."""
    idle = group.get("idleTimeoutSeconds")
    if idle is None:
        return None
    if idle < 0:
        return f"worker group {group.get('groupName')}: idleTimeoutSeconds must be non-negative, got {idle}"
    if _v2_enabled(spec):
        return None
    return (f"worker group {group.get('groupName')}: idleTimeoutSeconds is set, but autoscaler v2 is not enabled. "
            "Please set .spec.autoscalerOptions.version to 'v2'")


def validate_worker_group_priority(group: dict[str, Any], spec: dict[str, Any]) -> str | None:
    """Encodes ``validateWorkerGroupPriority`` of ray-operator/controllers/ray/utils/validation.go, KubeRay v1.7.0."""
    priority = group.get("priority")
    if not priority:
        return None
    name = group.get("groupName")
    if err := _ray_version_error(spec, f"worker group {name}: priority is set,", (2, 56, 0)):
        return err
    if _v2_enabled(spec):
        return None
    return f"worker group {name}: priority is set to {priority}, but autoscaler v2 is not enabled"


def validate_ray_cluster_spec(spec: dict[str, Any], annotations: dict[str, Any]) -> str | None:
    """Encodes ``ValidateRayClusterSpec`` (with ``validateGcsFaultToleranceBackend`` and the network-policy, TLS and
    history-server feature-gate checks) of ray-operator/controllers/ray/utils/validation.go, KubeRay v1.7.0."""
    head = spec.get("headGroupSpec") or {}
    if not containers(head):
        return "headGroupSpec should have at least one container"
    head_params = head.get("rayStartParams") or {}
    if err := validate_ray_group_resources("Head", head_params, head.get("resources") or {}):
        return err
    if err := validate_ray_group_labels("Head", head_params, head.get("labels") or {}):
        return err
    autoscaling = autoscaling_enabled(spec)
    for group in spec.get("workerGroupSpecs") or []:
        name = group.get("groupName")
        if not containers(group):
            return "workerGroupSpec should have at least one container"
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (lo is None or hi is None):
            return f"worker group {name} must set both minReplicas and maxReplicas when autoscaling is disabled"
        if lo is not None and lo < 0:
            return f"worker group {name} has negative minReplicas {lo}"
        if hi is not None and hi < 0:
            return f"worker group {name} has negative maxReplicas {hi}"
        if lo is not None and hi is not None and lo > hi:
            return f"worker group {name} has minReplicas {lo} greater than maxReplicas {hi}"
        params = group.get("rayStartParams") or {}
        for err in (validate_ray_group_resources(name, params, group.get("resources") or {}),
                    validate_ray_group_labels(name, params, group.get("labels") or {}),
                    validate_worker_group_idle_timeout(group, spec), validate_worker_group_priority(group, spec)):
            if err:
                return err
    ft_options = spec.get("gcsFaultToleranceOptions")
    if annotations.get("ray.io/ft-enabled") and ft_options is not None:
        return "ray.io/ft-enabled annotation and GcsFaultToleranceOptions are both set"
    head_container = containers(head)[0]
    head_env = _env(head_container)
    ft_enabled = str(annotations.get("ray.io/ft-enabled", "")).lower() == "true" or ft_options is not None
    if not ft_enabled and "RAY_REDIS_ADDRESS" in head_env:
        return "RAY_REDIS_ADDRESS is set which implicitly enables GCS fault tolerance, but GcsFaultToleranceOptions is not set"
    if ft_options is not None:
        if head_params.get("redis-password"):
            return "cannot set `redis-password` in rayStartParams when GcsFaultToleranceOptions is enabled"
        if "REDIS_PASSWORD" in head_env:
            return "cannot set `REDIS_PASSWORD` env var in head Pod when GcsFaultToleranceOptions is enabled"
        if "RAY_REDIS_ADDRESS" in head_env:
            return "cannot set `RAY_REDIS_ADDRESS` env var in head Pod when GcsFaultToleranceOptions is enabled"
        if annotations.get("ray.io/external-storage-namespace"):
            return "cannot set `ray.io/external-storage-namespace` annotation when GcsFaultToleranceOptions is enabled"
        backend = ft_options.get("backend") or "redis"
        if backend == "rocksdb" and not FEATURE_GATES["GCSFaultToleranceEmbeddedStorage"]:
            return "the embedded RocksDB GCS fault tolerance backend requires the GCSFaultToleranceEmbeddedStorage gate"
        if backend == "redis" and ft_options.get("storage") is not None:
            return "cannot set GcsFaultToleranceOptions.Storage when backend is 'redis'"
    if head_params.get("redis-username") or "REDIS_USERNAME" in head_env:
        return "cannot set redis username in rayStartParams or environment variables"
    if not FEATURE_GATES["RayJobDeletionPolicy"]:
        for group in spec.get("workerGroupSpecs") or []:
            if group.get("suspend"):
                return f"worker group {group.get('groupName')} can be suspended only when the RayJobDeletionPolicy gate is enabled"
    v2_env = head_env.get("RAY_enable_autoscaler_v2")
    if not autoscaling and v2_env and v2_env.get("value") in ("1", "true"):
        return (f"environment variable RAY_enable_autoscaler_v2 cannot be set to '{v2_env.get('value')}' when "
                "enableInTreeAutoscaling is false. Please set enableInTreeAutoscaling: true to use autoscaler v2")
    options = spec.get("autoscalerOptions") or {}
    if autoscaling:
        for group in spec.get("workerGroupSpecs") or []:
            if group.get("suspend"):
                return f"worker group {group.get('groupName')} cannot be suspended with Autoscaler enabled"
        if options.get("version") is not None and v2_env is not None:
            return "both .spec.autoscalerOptions.version and head Pod env var RAY_enable_autoscaler_v2 are set"
        if _autoscaling_v2(spec):
            for group in [head, *(spec.get("workerGroupSpecs") or [])]:
                policy = ((group.get("template") or {}).get("spec") or {}).get("restartPolicy", "")
                if policy not in ("", "Never"):
                    return "restartPolicy should be Never or unset when using autoscaler V2"
    if options.get("idleTimeoutSeconds") is not None and options["idleTimeoutSeconds"] < 0:
        return f"autoscalerOptions.idleTimeoutSeconds must be non-negative, got {options['idleTimeoutSeconds']}"
    if any(e.get("name") == "KUBERAY_GEN_AUTOSCALER_START_CMD" for e in options.get("env") or []):
        return "autoscalerOptions.env must not contain KUBERAY_GEN_AUTOSCALER_START_CMD"
    if spec.get("historyServerOptions") is not None and not FEATURE_GATES["RayClusterHistoryServer"]:
        return "RayClusterHistoryServer feature gate is not enabled"
    auth = spec.get("authOptions") or {}
    k8s_auth = bool(auth.get("enableK8sTokenAuth"))
    if auth.get("mode") == "token":
        if err := _ray_version_error(spec, "authOptions.mode is 'token'", (2, 52, 0)):
            return err
        if k8s_auth and _version(spec["rayVersion"]) < (2, 55, 0):
            return f"authOptions.enableK8sTokenAuth is enabled but minimum Ray version is 2.55.0, got {spec['rayVersion']}"
        if k8s_auth and auth.get("secretName"):
            return "authOptions.enableK8sTokenAuth is enabled and authOptions.secretName is also set"
    elif k8s_auth:
        return "authOptions.enableK8sTokenAuth is enabled but authOptions.mode not set to 'token'"
    if spec.get("networkPolicy") is not None and not FEATURE_GATES["RayClusterNetworkPolicy"]:
        return "spec.networkPolicy requires the RayClusterNetworkPolicy feature gate to be enabled"
    if spec.get("tlsOptions") is not None and not FEATURE_GATES["RayClusterMTLS"]:
        return "spec.tlsOptions requires the RayClusterMTLS feature gate to be enabled"
    return None


def validate_ray_cluster_upgrade_options(cluster: dict[str, Any]) -> str | None:
    """Encodes ``ValidateRayClusterUpgradeOptions`` of ray-operator/controllers/ray/utils/validation.go, KubeRay v1.7.0."""
    kind = ((cluster.get("spec") or {}).get("upgradeStrategy") or {}).get("type")
    if kind is not None and kind not in ("Recreate", "None"):
        return f"Spec.UpgradeStrategy.Type value {kind} is invalid, valid options are Recreate or None"
    origin = ((cluster.get("metadata") or {}).get("labels") or {}).get("ray.io/originated-from-crd")
    if kind is not None and origin in ("RayJob", "RayService"):
        return f"upgradeStrategy cannot be set when RayCluster is created by {origin}"
    return None


def validate_ray_job_metadata(meta: dict[str, Any]) -> str | None:
    """Encodes ``ValidateRayJobMetadata`` of ray-operator/controllers/ray/utils/validation.go, KubeRay v1.7.0."""
    err = _name_error("RayJob", meta.get("name", ""), MAX_RAYJOB_NAME)
    return err and f"The RayJob metadata is invalid: {err}"


def validate_deletion_rules(job: dict[str, Any]) -> str | None:
    """Encodes ``validateDeletionRules`` (with ``validateDeletionCondition``, ``validateTTLConsistency``) of
    ray-operator/controllers/ray/utils/validation.go, KubeRay v1.7.0."""
    spec = job["spec"]
    selector_mode = bool(spec.get("clusterSelector"))
    grouped: dict[tuple[str, str], dict[str, int]] = {}
    errs = []
    for i, rule in enumerate(spec["deletionStrategy"]["deletionRules"]):
        cond, policy = rule.get("condition") or {}, rule.get("policy")
        if ("jobStatus" in cond) == ("jobDeploymentStatus" in cond):
            errs.append(f"deletionRules[{i}]: exactly one of JobStatus and JobDeploymentStatus must be set")
            continue
        if cond.get("ttlSeconds", 0) < 0:
            errs.append(f"deletionRules[{i}]: TTLSeconds must be non-negative")
            continue
        if selector_mode and policy in ("DeleteCluster", "DeleteWorkers"):
            errs.append(f"deletionRules[{i}]: DeletionPolicyType '{policy}' not supported when ClusterSelector is set")
            continue
        if autoscaling_enabled(spec.get("rayClusterSpec")) and policy == "DeleteWorkers":
            errs.append(f"deletionRules[{i}]: DeletionPolicyType 'DeleteWorkers' not supported with autoscaling enabled")
            continue
        key = ("JobStatus", cond["jobStatus"]) if "jobStatus" in cond else ("JobDeploymentStatus", cond["jobDeploymentStatus"])
        if policy in grouped.setdefault(key, {}):
            errs.append(f"deletionRules[{i}]: duplicate rule for DeletionPolicyType '{policy}' and {key[0]} '{key[1]}'")
            continue
        grouped[key][policy] = cond.get("ttlSeconds", 0)
    for (ctype, cvalue), ttls in grouped.items():
        prev = None
        for policy in ("DeleteWorkers", "DeleteCluster", "DeleteSelf"):
            if policy in ttls:
                if prev and ttls[policy] < prev[1]:
                    errs.append(f"for {ctype} '{cvalue}': {policy} TTL ({ttls[policy]}) must be >= {prev[0]} TTL ({prev[1]})")
                prev = (policy, ttls[policy])
    return "\n".join(errs) or None


def validate_legacy_deletion_policies(job: dict[str, Any]) -> str | None:
    """Encodes ``validateLegacyDeletionPolicies`` of ray-operator/controllers/ray/utils/validation.go, KubeRay v1.7.0."""
    spec, strategy = job["spec"], job["spec"]["deletionStrategy"]
    on_success, on_failure = strategy.get("onSuccess"), strategy.get("onFailure")
    if on_success is None or on_failure is None:
        return "both DeletionStrategy.OnSuccess and DeletionStrategy.OnFailure must be set when using the legacy fields"
    if on_success.get("policy") is None:
        return "the DeletionPolicyType field of DeletionStrategy.OnSuccess cannot be unset"
    if on_failure.get("policy") is None:
        return "the DeletionPolicyType field of DeletionStrategy.OnFailure cannot be unset"
    policies = (on_success["policy"], on_failure["policy"])
    if spec.get("clusterSelector"):
        for when, policy in zip(("success", "failure"), policies):
            if policy in ("DeleteCluster", "DeleteWorkers"):
                return f"the ClusterSelector mode doesn't support DeletionStrategy={policy} on {when}"
    if "DeleteWorkers" in policies and autoscaling_enabled(spec.get("rayClusterSpec")):
        return "DeletionStrategy=DeleteWorkers currently does not support RayCluster with autoscaling enabled"
    if spec.get("shutdownAfterJobFinishes") and "DeleteNone" in policies:
        return "The RayJob spec is invalid: shutdownAfterJobFinshes is set to 'true' while deletion policy is 'DeleteNone'"
    return None


def validate_deletion_configuration(job: dict[str, Any]) -> str | None:
    """Encodes ``validateDeletionConfiguration`` of ray-operator/controllers/ray/utils/validation.go, KubeRay v1.7.0."""
    spec = job["spec"]
    if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished", 0) > 0:
        return ("The RayJob spec is invalid: a RayJob with shutdownAfterJobFinishes set to false cannot have "
                "TTLSecondsAfterFinished")
    strategy = spec.get("deletionStrategy")
    if strategy is None:
        return None
    if not FEATURE_GATES["RayJobDeletionPolicy"]:
        return "RayJobDeletionPolicy feature gate must be enabled to use DeletionStrategy"
    legacy = strategy.get("onSuccess") is not None or strategy.get("onFailure") is not None
    rules = bool(strategy.get("deletionRules"))
    if rules and spec.get("shutdownAfterJobFinishes"):
        return "The RayJob spec is invalid: spec.shutdownAfterJobFinishes and spec.deletionStrategy.deletionRules are mutually exclusive"
    if rules and legacy:
        return "The RayJob spec is invalid: Cannot use both legacy onSuccess/onFailure fields and deletionRules simultaneously"
    if legacy:
        return validate_legacy_deletion_policies(job)
    if rules:
        return validate_deletion_rules(job)
    return "The RayJob spec is invalid: DeletionStrategy requires either BOTH onSuccess and onFailure, OR the deletionRules field"


def validate_ray_job_spec(job: dict[str, Any]) -> str | None:
    """Encodes ``ValidateRayJobSpec`` of ray-operator/controllers/ray/utils/validation.go, KubeRay v1.7.0."""
    spec = job.get("spec") or {}
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        return "The RayJob spec is invalid: a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended"
    if spec.get("ttlSecondsAfterFinished", 0) < 0:
        return "The RayJob spec is invalid: TTLSecondsAfterFinished must be a non-negative integer"
    if err := validate_deletion_configuration(job):
        return err
    selector_mode = bool(spec.get("clusterSelector"))
    mode = spec.get("submissionMode", "K8sJobMode")
    backoff = spec.get("backoffLimit")
    if spec.get("suspend") and selector_mode:
        return "The RayJob spec is invalid: the ClusterSelector mode doesn't support the suspend operation"
    if spec.get("rayClusterSpec") is None and not selector_mode:
        return "The RayJob spec is invalid: one of RayClusterSpec or ClusterSelector must be set"
    if selector_mode:
        if not spec["clusterSelector"].get("ray.io/cluster"):
            return "cluster name in ClusterSelector should not be empty"
        if mode == "SidecarMode":
            return "ClusterSelector is not supported in SidecarMode"
        if backoff is not None and backoff > 0:
            return "The RayJob spec is invalid: BackoffLimit is incompatible with ClusterSelector mode"
    if mode == "InteractiveMode" and backoff is not None and backoff > 0:
        return "The RayJob spec is invalid: BackoffLimit is incompatible with InteractiveMode"
    if mode == "SidecarMode":
        if spec.get("submitterPodTemplate") is not None:
            return "Currently, SidecarMode doesn't support SubmitterPodTemplate"
        if spec.get("submitterConfig") is not None:
            return "Currently, SidecarMode doesn't support SubmitterConfig"
        head_spec = ((spec["rayClusterSpec"].get("headGroupSpec") or {}).get("template") or {}).get("spec") or {}
        if head_spec.get("restartPolicy", "") not in ("", "Never"):
            return "restartPolicy for head Pod should be Never or unset when using SidecarMode"
    cluster_spec = spec.get("rayClusterSpec")
    if cluster_spec is not None:
        if (cluster_spec.get("authOptions") or {}).get("enableK8sTokenAuth"):
            return "The RayJob spec is invalid: K8s token auth mode is currently not supported for RayJob"
        if err := validate_ray_cluster_spec(cluster_spec, (job.get("metadata") or {}).get("annotations") or {}):
            return f"The RayJob spec is invalid: {err}"
    try:  # dashboardclient.UnmarshalRuntimeEnvYAML: YAML into a map
        env = yaml.safe_load(spec.get("runtimeEnvYAML") or "")
        if env is not None and not isinstance(env, dict):
            raise yaml.YAMLError(f"cannot unmarshal {type(env).__name__} into a map")
    except yaml.YAMLError as exc:
        return f"failed to unmarshal RuntimeEnvYAML: {exc}"
    if spec.get("activeDeadlineSeconds") is not None and spec["activeDeadlineSeconds"] <= 0:
        return "The RayJob spec is invalid: activeDeadlineSeconds must be a positive integer"
    if spec.get("preRunningDeadlineSeconds") is not None and spec["preRunningDeadlineSeconds"] <= 0:
        return "The RayJob spec is invalid: preRunningDeadlineSeconds must be a positive integer"
    if backoff is not None and backoff < 0:
        return "The RayJob spec is invalid: backoffLimit must be a positive integer"
    return None


def kuberay_rule_errors(manifest: dict[str, Any]) -> list[str]:
    """What the KubeRay operator's validation says of a RayCluster / RayJob (after the CRD's defaults): each
    problem tagged with the Go function it encodes. (The operator reports the first one and stops.)"""
    kind = manifest.get("kind")
    schemas = kuberay_schemas()
    if kind not in schemas:
        return [f"kind {kind!r} is not a RayCluster or RayJob"]
    obj = apply_defaults(schemas[kind], manifest)
    meta = obj.get("metadata") or {}
    if kind == "RayCluster":
        checks = [("ValidateRayClusterMetadata", lambda: validate_ray_cluster_metadata(meta)),
                  ("ValidateRayClusterSpec", lambda: validate_ray_cluster_spec(obj.get("spec") or {},
                                                                              meta.get("annotations") or {})),
                  ("ValidateRayClusterUpgradeOptions", lambda: validate_ray_cluster_upgrade_options(obj))]
    else:
        checks = [("ValidateRayJobMetadata", lambda: validate_ray_job_metadata(meta)),
                  ("ValidateRayJobSpec", lambda: validate_ray_job_spec(obj))]
    return [f"[{VALIDATION_GO} {func}, KubeRay {KUBERAY_VERSION}] {err}" for func, check in checks if (err := check())]

