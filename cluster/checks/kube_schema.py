"""KubeRay manifests against the pinned KubeRay release's CRD schemas, as the Kubernetes API server sees them.

The ``openAPIV3Schema`` of KubeRay's RayCluster / RayJob CRDs is vendored in
``cluster/kuberay/schema/kuberay-crds.json`` (pinned to :data:`KUBERAY_VERSION`; written by
``cluster/kuberay/schema/vendor_crds.py``). :func:`k8s_schema_errors` validates a manifest with the API
server's structural-schema semantics that plain JSON Schema lacks: defaults applied before validation,
unknown fields rejected (``kubectl apply``'s default ``--validate=strict``) unless
``x-kubernetes-preserve-unknown-fields``, ``x-kubernetes-int-or-string``, ``nullable``,
``x-kubernetes-list-type`` (``set`` / ``map`` uniqueness), ``format: int32/int64`` ranges and the CRDs'
``x-kubernetes-validations`` (CEL) rules, each re-encoded in :data:`CEL_RULES`; the root ``metadata`` is
checked as Kubernetes' ObjectMeta (name, label syntax).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cluster.checks.k8s_names import is_dns1123_subdomain, label_errors

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "kuberay" / "schema" / "kuberay-crds.json"

# The KubeRay release every KubeRay check encodes (its CRDs are vendored from the same commit).
KUBERAY_VERSION = "v1.7.0"
KUBERAY_COMMIT = "59d663aeec13760646da3db9c1cf8cfe883e30b7"

def _inline_refs(node: Any, defs: dict[str, Any], memo: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if ref is not None and len(node) == 1:
            name = ref.removeprefix("#/$defs/")
            if name not in memo:
                memo[name] = _inline_refs(defs[name], defs, memo)
            return memo[name]
        return {k: _inline_refs(v, defs, memo) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline_refs(v, defs, memo) for v in node]
    return node


@functools.cache
def _schema_doc() -> dict[str, Any]:
    doc = json.loads(SCHEMA_FILE.read_text())
    memo: dict[str, Any] = {}
    schemas = {kind: _inline_refs(s, doc["$defs"], memo) for kind, s in doc["schemas"].items()}
    for kind, schema in schemas.items():  # the vendored file is the upstream schema, byte for byte after dedup
        digest = hashlib.sha256(json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        if digest != doc["sha256"][kind]:
            raise ValueError(f"{SCHEMA_FILE}: the {kind} schema does not match its recorded sha256; re-run "
                             "cluster/kuberay/schema/vendor_crds.py")
    if doc["kuberay"]["ref"] != KUBERAY_VERSION or doc["kuberay"]["commit"] != KUBERAY_COMMIT:
        raise ValueError(f"{SCHEMA_FILE} is KubeRay {doc['kuberay']['ref']}, the checks encode {KUBERAY_VERSION}")
    for kind, schema in schemas.items():
        for rule in cel_rules_in(schema):
            if rule not in CEL_RULES:
                raise ValueError(f"the {kind} CRD has an x-kubernetes-validations rule that CEL_RULES does not "
                                 f"encode: {rule!r}")
    return {**doc, "schemas": schemas}


def kuberay_schemas() -> dict[str, dict[str, Any]]:
    """``{"RayCluster": openAPIV3Schema, "RayJob": ...}`` of the pinned KubeRay release, references inlined."""
    return _schema_doc()["schemas"]


def cel_rules_in(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        rules = node.get("x-kubernetes-validations")
        if isinstance(rules, list):
            yield from (rule["rule"] for rule in rules)
        for v in node.values():
            yield from cel_rules_in(v)
    elif isinstance(node, list):
        for v in node:
            yield from cel_rules_in(v)


# The CRDs' CEL rules (x-kubernetes-validations), each as a Python predicate on ``self``. None: a transition
# rule (it reads ``oldSelf``), which the API server evaluates on update only, never on create.
CEL_RULES: dict[str, Callable[[Any], bool] | None] = {
    "self == oldSelf": None,
    "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']":
        lambda s: s in ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"),
    "!((has(self.onSuccess) || has(self.onFailure)) && has(self.deletionRules))":
        lambda s: not (("onSuccess" in s or "onFailure" in s) and "deletionRules" in s),
    "((has(self.onSuccess) && has(self.onFailure)) || has(self.deletionRules))":
        lambda s: ("onSuccess" in s and "onFailure" in s) or "deletionRules" in s,
    "!(has(self.jobStatus) && has(self.jobDeploymentStatus))":
        lambda s: not ("jobStatus" in s and "jobDeploymentStatus" in s),
    "has(self.jobStatus) || has(self.jobDeploymentStatus)":
        lambda s: "jobStatus" in s or "jobDeploymentStatus" in s,
}

# ObjectMeta as the API server validates it at the root of every object (the CRD schema says only
# ``type: object`` there): the usual fields, nothing else (strict field validation rejects the rest).
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {"type": "object", "properties": {
    "name": {"type": "string"}, "generateName": {"type": "string"}, "namespace": {"type": "string"},
    "labels": _STR_MAP, "annotations": _STR_MAP, "finalizers": {"type": "array", "items": {"type": "string"}},
    "ownerReferences": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    "uid": {"type": "string"}, "resourceVersion": {"type": "string"}, "generation": {"type": "integer"},
}}


def apply_defaults(schema: dict[str, Any], instance: Any) -> Any:
    """The object with the schema's ``default`` values filled in where a field is missing, as the API server
    does before validating (and inside present parents only: a default of ``a.b`` needs ``a``)."""
    if isinstance(instance, dict):
        props = schema.get("properties") or {}
        out = dict(instance)
        for key, sub in props.items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
        extra = schema.get("additionalProperties")
        for key, value in out.items():
            if key in props:
                out[key] = apply_defaults(props[key], value)
            elif isinstance(extra, dict):
                out[key] = apply_defaults(extra, value)
        return out
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], v) for v in instance]
    return instance


@functools.cache
def _k8s_validator_class() -> Any:
    from jsonschema import Draft202012Validator, ValidationError, validators

    base_type = Draft202012Validator.VALIDATORS["type"]

    def k8s_type(validator, types, instance, schema):  # noqa: ANN001, ANN202 - jsonschema keyword signature
        if instance is None and schema.get("nullable"):
            return
        yield from base_type(validator, types, instance, schema)
        if types != "object" or not validator.is_type(instance, "object"):
            return
        if schema.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in schema:
            return
        known = set(schema.get("properties") or {})
        if schema.get("x-kubernetes-embedded-resource"):
            known |= {"apiVersion", "kind", "metadata"}
        for key in instance:
            if key not in known:
                yield ValidationError(f"unknown field {key!r}", path=[key])

    def int_or_string(validator, flag, instance, schema):  # noqa: ANN001, ANN202
        ok = isinstance(instance, str) or (isinstance(instance, int) and not isinstance(instance, bool))
        if flag and not ok and not (instance is None and schema.get("nullable")):
            yield ValidationError(f"{instance!r} is not an integer or a string (x-kubernetes-int-or-string)")

    def list_type(validator, kind, instance, schema):  # noqa: ANN001, ANN202
        if not validator.is_type(instance, "array"):
            return
        seen: dict[str, int] = {}
        keys = schema.get("x-kubernetes-list-map-keys") or []
        for i, item in enumerate(instance):
            if kind == "set":
                ident = json.dumps(item, sort_keys=True)
            elif kind == "map" and isinstance(item, dict):
                ident = json.dumps([item.get(k) for k in keys])
            else:
                continue
            if ident in seen:
                what = ", ".join(f"{k}={item.get(k)!r}" for k in keys) if kind == "map" else repr(item)
                yield ValidationError(f"duplicate entry ({what}) in a list of type {kind!r}; first at index "
                                      f"{seen[ident]}", path=[i])
            seen.setdefault(ident, i)

    def cel(validator, rules, instance, schema):  # noqa: ANN001, ANN202
        for rule in rules:
            check = CEL_RULES.get(rule["rule"], False)
            if check is False:
                yield ValidationError(f"CEL rule not encoded in cluster/checks/kube_schema.py: {rule['rule']!r}")
            elif check is not None and not check(instance):
                yield ValidationError(rule.get("message") or f"failed rule: {rule['rule']}")

    return validators.extend(Draft202012Validator, {
        "type": k8s_type, "x-kubernetes-int-or-string": int_or_string,
        "x-kubernetes-list-type": list_type, "x-kubernetes-validations": cel,
    })


@functools.cache
def _format_checker() -> Any:
    from jsonschema import FormatChecker

    fc = FormatChecker(formats=())
    ranges = {"int32": 2**31, "int64": 2**63}
    for name, bound in ranges.items():
        fc.checks(name)(lambda v, b=bound: not isinstance(v, int) or isinstance(v, bool) or -b <= v < b)
    return fc


def structural_errors(schema: dict[str, Any], instance: Any, where: str = "") -> list[str]:
    """Problems of ``instance`` (defaults applied first) against a Kubernetes structural schema."""
    obj = apply_defaults(schema, instance)
    validator = _k8s_validator_class()(schema, format_checker=_format_checker())
    out = []
    for err in sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path]):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path) or "."
        out.append(f"{where}{path}: {err.message}")
    return out


def k8s_schema_errors(manifest: dict[str, Any]) -> list[str]:
    """A RayCluster / RayJob manifest as the API server (``kubectl apply``, strict field validation) sees it."""
    doc = _schema_doc()
    kind = manifest.get("kind")
    if kind not in doc["schemas"]:
        return [f"kind {kind!r}: no vendored CRD schema (have {sorted(doc['schemas'])})"]
    out = []
    if manifest.get("apiVersion") != doc["apiVersion"][kind]:
        out.append(f"{kind}: apiVersion {manifest.get('apiVersion')!r} is not served ({doc['apiVersion'][kind]})")
    root = doc["schemas"][kind]
    schema = {**root, "properties": {**root["properties"], "metadata": OBJECT_META}}
    out += structural_errors(schema, manifest, kind)
    meta = manifest.get("metadata") or {}
    # custom resources: ValidateObjectMetaAccessor with NameIsDNSSubdomain; labels: ValidateLabels
    if not meta.get("name") and not meta.get("generateName"):
        out.append(f"{kind}.metadata.name: required")
    out += [f"{kind}.metadata.name: {e}" for e in is_dns1123_subdomain(meta.get("name", "x"))]
    out += label_errors(meta.get("labels") or {}, f"{kind}.metadata.labels")
    return out

