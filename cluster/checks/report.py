"""Every check on the committed files, one line per check (``python -m cluster.checks``; exit 1 on any problem)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml

from cluster.checks.image import dockerfile_pin_errors, image_errors, setup_path_errors
from cluster.checks.kube_schema import KUBERAY_VERSION, k8s_schema_errors
from cluster.checks.kuberay_rules import kuberay_rule_errors
from cluster.checks.launcher import ray_launcher_errors
from cluster.checks.nodes import (
    aws_network_errors,
    efa_errors_aws,
    efa_errors_kuberay,
    models_path_errors,
    scale_from_zero_errors,
)

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
AWS_CONFIG = CLUSTER / "aws" / "cluster.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOBS = (CLUSTER / "kuberay" / "rayjob-preprocess.yaml", CLUSTER / "kuberay" / "rayjob-train.yaml")
DOCKERFILE = CLUSTER / "docker" / "Dockerfile"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def all_problems() -> dict[str, list[str]]:
    aws = load_yaml(AWS_CONFIG)
    rc = load_yaml(RAYCLUSTER)
    jobs = [load_yaml(p) for p in RAYJOBS]
    dockerfile = DOCKERFILE.read_text() if DOCKERFILE.is_file() else ""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    makefile = (REPO / "Makefile").read_text()
    report = {f"k8s schema: {p.name}": k8s_schema_errors(load_yaml(p)) for p in (RAYCLUSTER, *RAYJOBS)}
    report |= {f"kuberay rules: {p.name}": kuberay_rule_errors(load_yaml(p)) for p in (RAYCLUSTER, *RAYJOBS)}
    report["ray launcher: aws/cluster.yaml"] = ray_launcher_errors(aws)
    report["aws security groups"] = aws_network_errors(aws)
    report["efa (aws)"] = efa_errors_aws(aws)
    report["efa (kuberay)"] = efa_errors_kuberay(rc)
    report["gpu scale from zero"] = scale_from_zero_errors(aws, rc)
    report["setup paths (aws)"] = setup_path_errors(aws, dockerfile)
    report["models path"] = models_path_errors(aws, rc, jobs)
    report["dockerfile pins"] = dockerfile_pin_errors(dockerfile, pyproject, makefile)
    report["image names"] = image_errors(aws, [rc, *jobs], dockerfile, pyproject)
    return report


def main() -> int:
    report = all_problems()
    bad = 0
    for check, problems in report.items():
        print(f"{'ok ' if not problems else 'BAD'} {check}")
        for p in problems:
            print(f"      {p}")
        bad += bool(problems)
    print(f"{len(report) - bad}/{len(report)} checks passed (KubeRay {KUBERAY_VERSION}, Ray launcher of the installed ray)")
    return 1 if bad else 0


