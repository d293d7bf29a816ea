"""The app's own settings: the ``args:`` of the application in ``serving/config.yaml``.

Deployment knobs (replicas, autoscaling, ``num_gpus``, ``max_ongoing_requests`` ...) are Serve's own
``deployments:`` entries of the same file; these are what the code needs. Environment variables fill
what the config leaves out: ``FDREAMER_CHECKPOINT``, ``MLFLOW_TRACKING_URI``, ``FDREAMER_STORE``,
``FDREAMER_S3_ENDPOINT``. Unknown keys, values of the wrong type (a list or mapping where a number or
a string belongs, however deeply nested: only its type is looked at) and limits that are not positive
fail at build time with a ValueError naming the key.

``device`` (``auto`` by default) and each model deployment's ``num_gpus`` must agree: a ``cuda`` replica
with ``num_gpus: 0`` (no GPU reserved: every such replica would pile onto GPU 0 of its node) or a ``cpu``
one with ``num_gpus > 0`` (the reserved GPU idles) is refused in one line — at config load by
:func:`check_serve_config` (``python -m serving.settings serving/config.yaml``; the tests run it on the
shipped file), and again by every replica at start-up against the GPUs Ray actually assigned it
(``serving.deployments``), whatever overrode the file. ``auto`` is CUDA exactly when the replica has a GPU.
"""

from __future__ import annotations

import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from fdreamer.device import check_device, check_device_matches_gpus

DEFAULT_STORE = "runs/serving/jobs"


@dataclass
class Limits:
    """Request limits; model limits (:attr:`fdreamer.inference.pipeline.VideoPipeline.limits`) apply on top
    (the smaller wins)."""

    max_num_frames: int = 64
    max_height: int = 1024
    max_width: int = 1024
    max_num_inference_steps: int = 200
    max_guidance_scale: float = 30.0
    max_body_bytes: int = 16 * 2**20  # JSON with a base64 image, or the multipart upload
    max_image_bytes: int = 10 * 2**20  # the encoded image
    max_image_side: int = 4096  # pixels, read from the image header before decoding
    max_prompt_chars: int = 2000


@dataclass
class Batching:
    """``@serve.batch`` on the model deployments; ``enabled: false`` runs each request on its own thread."""

    enabled: bool = True
    max_batch_size: int = 4
    batch_wait_timeout_s: float = 0.05


@dataclass
class Settings:
    checkpoint: str | None = None  # checkpoint folder, run folder (either local or s3://) or runs:/<mlflow run id>
    tracking_uri: str | None = None  # MLflow, for runs:/
    t2i_checkpoint: str | None = None  # the T2I deployment's checkpoint (default: `checkpoint`)
    t2i_path: str | None = None  # a local diffusers Stable Diffusion folder for the T2I step
    device: str = "auto"  # auto (cuda when the replica has num_gpus > 0, else cpu) | cpu | cuda[:i]
    dtype: str | None = None  # float32 | float16 | bfloat16 (default: bfloat16 on CUDA, else as saved)
    torch_threads: int = 1  # intra-op threads per model replica (CPU)
    store: str | None = None  # local dir or s3://bucket/prefix (default FDREAMER_STORE, else runs/serving/jobs)
    s3_endpoint: str | None = None  # for an s3:// store or checkpoint on MinIO/moto (null: AWS)
    api_key_env: str = "FDREAMER_API_KEY"  # the name of the variable holding the bearer token
    max_jobs_in_flight: int = 32  # queued + running jobs per ingress replica before 429
    retry_after_s: int = 5
    backpressure_probe_s: float = 0.05  # how long POST waits for Serve's BackPressureError before 202
    progress_interval_s: float = 0.25  # how often a replica writes progress to the store
    recent_jobs: int = 20
    limits: Limits = field(default_factory=Limits)
    batching: Batching = field(default_factory=Batching)

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> Settings:
        if args is not None and not isinstance(args, dict):
            raise ValueError(  # noqa: TRY004 - config errors are ValueErrors throughout
                f"serving args: have to be a mapping, got {type(args).__name__}")
        args = dict(args or {})
        nested = {"limits": Limits, "batching": Batching}
        _check_keys("", cls, args, nested)
        for name, klass in nested.items():
            given = args.get(name) or {}
            if not isinstance(given, dict):
                raise ValueError(  # noqa: TRY004
                    f"serving args: `{name}` must be a mapping, got {type(given).__name__}")
            _check_keys(f"{name}.", klass, given, {})
            args[name] = klass(**given)
        for key, value in asdict(args["limits"]).items():
            if value <= 0:
                raise ValueError(f"serving args: `limits.{key}` must be positive but is {value}")
        s = cls(**args)
        s.checkpoint = s.checkpoint or os.environ.get("FDREAMER_CHECKPOINT")
        s.tracking_uri = s.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        s.store = s.store or os.environ.get("FDREAMER_STORE") or DEFAULT_STORE
        s.s3_endpoint = s.s3_endpoint or os.environ.get("FDREAMER_S3_ENDPOINT")
        if not s.checkpoint:
            raise ValueError("serving args: `checkpoint` is required (a checkpoint folder, a run folder or "
                             "runs:/<mlflow run id>), or set FDREAMER_CHECKPOINT")
        check_device(s.device, "serving args: `device`")
        if s.dtype is not None and s.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"serving args: `dtype` must be float32, float16 or bfloat16 (or null), got {s.dtype!r}")
        if s.max_jobs_in_flight < 1 or s.batching.max_batch_size < 1:
            raise ValueError("serving args: max_jobs_in_flight and batching.max_batch_size must be >= 1")
        for name in ("checkpoint", "t2i_checkpoint", "t2i_path"):
            value = getattr(s, name)
            if value and "://" not in value and not value.startswith("runs:/"):
                setattr(s, name, os.path.abspath(os.path.expanduser(value)))
        if not s.store.startswith("s3://"):
            s.store = os.path.abspath(os.path.expanduser(s.store))  # the driver's cwd, not the replica's
        return s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Settings:
        d = dict(d)
        d["limits"] = Limits(**d.get("limits", {}))
        d["batching"] = Batching(**d.get("batching", {}))
        return cls(**d)


#: The deployments that load a model (their ``num_gpus`` must fit ``device``) and the ``num_gpus`` they get when
#: the config file names none (``serving.deployments.MODEL_DEPLOYMENT_DEFAULTS``).
MODEL_DEPLOYMENTS = ("VideoModel", "TextToImage")
DEFAULT_NUM_GPUS = 0
APP_IMPORT_PATH = "serving.app:build_app"


def check_serve_config(config: dict[str, Any], where: str = "serve config") -> None:
    """A Serve config file (``serving/config.yaml``'s layout) whose model deployments' ``num_gpus`` disagree with
    the application's ``device`` raises a one-line :class:`~fdreamer.device.DeviceConfigError` (a ValueError)
    naming the application and the deployment; so do the app's ``args`` themselves (:meth:`Settings.from_args`
    checks, without the checkpoint requirement)."""
    for app in (config or {}).get("applications") or []:
        if app.get("import_path") != APP_IMPORT_PATH:
            continue
        args = dict(app.get("args") or {})
        args.setdefault("checkpoint", "<checked at deploy>")
        device = Settings.from_args(args).device
        deployments = {d.get("name"): d for d in app.get("deployments") or []}
        for name in MODEL_DEPLOYMENTS:
            options = (deployments.get(name) or {}).get("ray_actor_options") or {}
            num_gpus = options.get("num_gpus", DEFAULT_NUM_GPUS)
            check_device_matches_gpus(device, float(num_gpus or 0),
                                      f"{where}: application {app.get('name')!r}, deployment {name}")


def load_serve_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a Serve config file (:func:`check_serve_config`)."""
    import yaml

    config = yaml.safe_load(open(path).read())
    check_serve_config(config, str(path))
    return config


def _check_keys(prefix: str, klass: type, given: dict[str, Any], nested: dict[str, type]) -> None:
    """Unknown keys and values of the wrong type, named (``prefix`` + key). Only a value's type is looked
    at, never its contents: a deeply nested list where a string belongs is refused like any list."""
    hints = typing.get_type_hints(klass)
    known = {f.name for f in fields(klass)}
    bad = sorted(str(k)[:64] for k in set(given) - known)
    if bad:
        accepts = f"{prefix.rstrip('.')} accepts" if prefix else "accepted"
        raise ValueError(f"serving args: unknown key(s) {[prefix + b for b in bad]}; {accepts}: {sorted(known)}")
    for key, value in given.items():
        if key in nested:
            continue
        allowed = typing.get_args(hints[key]) if isinstance(hints[key], types.UnionType) else (hints[key],)
        if not any(_is_a(value, t) for t in allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ValueError(f"serving args: `{prefix}{key}` must be {names}, got {type(value).__name__}")


def _is_a(value: Any, kind: type) -> bool:
    if kind is type(None):
        return value is None
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def main(argv: list[str] | None = None) -> int:
    """``python -m serving.settings CONFIG.yaml``: check a Serve config file; one line, exit 0 or 2."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m serving.settings SERVE_CONFIG.yaml", file=sys.stderr)
        return 2
    try:
        load_serve_config(args[0])
    except (ValueError, OSError) as exc:  # config errors are ValueErrors here (DeviceConfigError is one)
        print(f"serving: {exc}", file=sys.stderr)
        return 2
    print(f"serving: {args[0]}: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
