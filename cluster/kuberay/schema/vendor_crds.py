"""Vendor the OpenAPI v3 schemas of KubeRay's RayCluster and RayJob CRDs into ``kuberay-crds.json``.

    python cluster/kuberay/schema/vendor_crds.py --git-dir /path/to/kuberay/.git --ref v1.7.0
    python cluster/kuberay/schema/vendor_crds.py --crd-dir /path/to/kuberay/helm-chart/kuberay-operator/crds \
        --ref v1.7.0 --commit <sha>

Reads ``helm-chart/kuberay-operator/crds/ray.io_{rayclusters,rayjobs}.yaml`` (the Helm chart's CRDs are
generated without descriptions, so nothing needs stripping; any ``description`` left is dropped all the
same), takes ``spec.versions[name=v1].schema.openAPIV3Schema`` of each and writes one JSON file in which
every sub-schema of >= 2 kB that occurs more than once (the pod template, the RayCluster spec that
RayJob embeds, ...) is stored once under ``$defs`` and replaced by ``{"$ref": "#/$defs/<name>"}``. The
loader (:func:`cluster.checks.kube_schema.kuberay_schemas`) inlines the references again and checks the
sha256 of each schema against the one recorded here, i.e. against the upstream file's schema.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
CRD_DIR = "helm-chart/kuberay-operator/crds"
OUT = Path(__file__).with_name("kuberay-crds.json")
MIN_SHARED_BYTES = 2000


def canonical(node: Any) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def sha256(node: Any) -> str:
    return hashlib.sha256(canonical(node).encode()).hexdigest()


def strip_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def _walk(node: Any, path: tuple[str, ...], found: dict[str, list[tuple[str, ...]]]) -> None:
    if isinstance(node, dict):
        if "$ref" not in node:
            text = canonical(node)
            if len(text) >= MIN_SHARED_BYTES:
                found.setdefault(text, []).append(path)
        for k, v in node.items():
            _walk(v, (*path, k), found)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _walk(v, (*path, str(i)), found)


def _replace(node: Any, text: str, ref: dict[str, str]) -> Any:
    if isinstance(node, dict):
        if canonical(node) == text:
            return dict(ref)
        return {k: _replace(v, text, ref) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace(v, text, ref) for v in node]
    return node


def _def_name(path: tuple[str, ...], taken: set[str]) -> str:
    parts = [p for p in path if p not in ("properties", "items", "additionalProperties", "schemas", "$defs")]
    base = ".".join(parts[-2:]) or "root"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}.{n}", n + 1
    return name


def deduplicate(schemas: dict[str, Any]) -> dict[str, Any]:
    """``{"$defs": ..., "schemas": ...}`` with each repeated large sub-schema stored once (largest first)."""
    doc: dict[str, Any] = {"$defs": {}, "schemas": schemas}
    while True:
        found: dict[str, list[tuple[str, ...]]] = {}
        _walk(doc, (), found)
        repeated = [(len(t), t, paths) for t, paths in found.items() if len(paths) > 1]
        if not repeated:
            return doc
        _, text, paths = max(repeated)
        name = _def_name(paths[0], set(doc["$defs"]))
        doc = _replace(doc, text, {"$ref": f"#/$defs/{name}"})
        doc["$defs"][name] = json.loads(text)


def read_crd(args: argparse.Namespace, filename: str) -> tuple[dict[str, Any], str]:
    """The CRD document and the git blob id of its file."""
    if args.git_dir:
        spec = f"{args.ref}:{CRD_DIR}/{filename}"
        text = subprocess.run(["git", f"--git-dir={args.git_dir}", "show", spec], check=True,
                              capture_output=True, text=True).stdout
        blob = subprocess.run(["git", f"--git-dir={args.git_dir}", "rev-parse", spec], check=True,
                              capture_output=True, text=True).stdout.strip()
    else:
        raw = (Path(args.crd_dir) / filename).read_bytes()
        text = raw.decode()
        blob = hashlib.sha1(b"blob %d\0" % len(raw) + raw).hexdigest()
    return yaml.safe_load(text), blob


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--git-dir", help="a clone (or mirror) of ray-project/kuberay")
    src.add_argument("--crd-dir", help=f"a checkout's {CRD_DIR}")
    p.add_argument("--ref", required=True, help="the KubeRay release tag, e.g. v1.7.0")
    p.add_argument("--commit", help="the tag's commit (read from --git-dir when not given)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    commit = args.commit
    if commit is None and args.git_dir:
        commit = subprocess.run(["git", f"--git-dir={args.git_dir}", "rev-parse", f"{args.ref}^{{commit}}"],
                                check=True, capture_output=True, text=True).stdout.strip()
    schemas, files, digests, served = {}, {}, {}, {}
    for kind, filename in CRDS.items():
        crd, blob = read_crd(args, filename)
        assert crd["spec"]["names"]["kind"] == kind, (filename, crd["spec"]["names"])
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
        schemas[kind] = schema
        files[kind] = {"path": f"{CRD_DIR}/{filename}", "git_blob": blob}
        digests[kind] = sha256(schema)
        served[kind] = f"{crd['spec']['group']}/{version['name']}"
    doc = {
        "comment": "Generated by cluster/kuberay/schema/vendor_crds.py; do not edit. openAPIV3Schema of the v1 "
                   "version of each CRD, descriptions stripped, repeated sub-schemas under $defs.",
        "kuberay": {"repository": "https://github.com/ray-project/kuberay", "ref": args.ref, "commit": commit,
                    "files": files},
        "apiVersion": served,
        "sha256": digests,
        **deduplicate(schemas),
    }
    Path(args.out).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {size:,} bytes, {len(doc['$defs'])} shared sub-schemas")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
