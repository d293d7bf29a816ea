"""Offline checks of the real-cluster configs, done the way the tools that consume them do.

    python -m cluster.checks          # every check on the committed files; exit 1 on any problem

Each check takes parsed documents (so a test can hand it an older version of a file) and returns a list of
problems (empty: accepted):

- :mod:`cluster.checks.kube_schema` -- a RayCluster / RayJob manifest against the vendored ``openAPIV3Schema``
  of KubeRay's CRDs, with the Kubernetes API server's structural-schema semantics (defaults, unknown fields,
  int-or-string, list types, int32/int64, the CRDs' CEL rules re-encoded, ObjectMeta);
  :mod:`cluster.checks.k8s_names` -- the Kubernetes name and label syntax it and the operator rules use;
- :mod:`cluster.checks.kuberay_rules` -- the KubeRay operator's own validation (``validation.go``), re-encoded;
- :mod:`cluster.checks.launcher` -- a cluster-launcher YAML through the installed Ray's ``prepare_config``,
  ``validate_config`` and the offline part of its AWS bootstrap, as ``ray up`` does;
- the project's own: :mod:`cluster.checks.nodes` (one security group and subnet, EFA, GPU pools from zero,
  the models' mounts) and :mod:`cluster.checks.image` (the Dockerfile's pins, the image names, the paths
  the setup commands write);
- :mod:`cluster.checks.report` -- all of them on the committed files, one line per check.
"""
