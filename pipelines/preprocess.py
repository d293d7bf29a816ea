"""Entry point: ``python pipelines/preprocess.py --config pipelines/configs/tiny.yaml --output=DIR ...``.

Connects to a running Ray cluster (``ray_address``, ``RAY_ADDRESS``, or the last ``ray start`` on
this machine when it is still reachable) and starts a local one when none runs; the work itself is
:func:`pipelines.job.run`. Exits 0 on success, 2 on a configuration or manifest error (printed as one
line; a bad header before Ray is touched, a bad record once the manifests are read, before any video
is decoded) and on an output folder whose shards were written with another
``t5_caption`` (one line, before the output is touched).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    import ray

    from cluster.connect import init_ray
    from fdreamer.config import ConfigError, parse_cli
    from fdreamer.data import storage
    from fdreamer.data.inputs import check_input
    from fdreamer.data.manifests import ManifestError
    from pipelines.config import PreprocessConfig
    from pipelines.job import OutputMismatchError, run

    try:
        cfg, _ = parse_cli(PreprocessConfig, sys.argv[1:] if argv is None else argv, prog="preprocess.py")
        cfg.check_ready()
        storage.resolve(cfg.output, cfg.s3_endpoint)  # unknown output scheme: fail fast
        if not cfg.inputs:
            raise ManifestError("no input manifests given")
        for uri in cfg.inputs:  # headers only, before any Ray work: fail fast
            check_input(uri, cfg.s3_endpoint)
    except (ConfigError, ManifestError, ValueError) as exc:
        print(f"preprocess: {exc}", file=sys.stderr)
        return 2
    init_ray(cfg.ray_address, log_to_driver=False)  # workers get the repo on their PYTHONPATH
    try:
        run(cfg)  # the records are read (and checked) by Ray tasks, one per manifest
    except (OutputMismatchError, ManifestError) as exc:
        print(f"preprocess: {exc}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
