"""Model checkpoints: one folder that training writes and inference (pipeline, server, evaluate) reads.

Layout (diffusers-like: JSON/YAML configs beside safetensors weights)::

    <dir>/fdreamer_checkpoint.json  {"format": 1, "step": N, "preset": "tiny", "stage": "stage1", ...}
    <dir>/unet_config.json          the spatial UNet2DConditionModel config (architecture of the base)
    <dir>/model.yaml                the resolved ModelConfig
    <dir>/schedule.yaml             the ScheduleConfig the model was trained under (sampling needs it)
    <dir>/encoders.yaml             the frozen encoders the training data were made with (paths)
    <dir>/model.safetensors         every parameter of the video UNet (fp32 as trained)
    <dir>/ema.safetensors           EMA of the trainable parameters (optional)

Training keeps its own state (optimizer, RNG, data position) in further files of the same folder
(``training/checkpointing.py``); nothing here needs Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from fdreamer.config import dump_yaml, load_config, to_dict
from fdreamer.encoders import EncoderConfig
from fdreamer.models.config import ModelConfig
from fdreamer.schedule import ScheduleConfig

if TYPE_CHECKING:  # the network (and diffusers) is imported only where a model is built
    from fdreamer.models.unet import FactorizedDreamerUNet

FORMAT_VERSION = 1
META = "fdreamer_checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, malformed, or does not fit the model it is loaded into."""


@dataclass
class LoadedModel:
    model: FactorizedDreamerUNet
    schedule: ScheduleConfig
    encoders: EncoderConfig
    meta: dict[str, Any] = field(default_factory=dict)


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``fdreamer_checkpoint.json`` of ``path`` (CheckpointError when absent or of another format)."""
    meta_file = Path(path) / META
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: not a checkpoint folder (no {META})")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, this code reads {FORMAT_VERSION}")
    return meta


def latest_checkpoint(run_dir: str | Path, *, requires: str | None = None) -> Path | None:
    """The checkpoint folder with the highest ``step`` (its ``fdreamer_checkpoint.json``) anywhere under
    ``run_dir``, or None. Ties go to the later folder name. ``requires``: a file the folder must also hold
    (training resume needs ``trainer_state.json``)."""
    best: tuple[int, str, Path] | None = None
    for meta_file in Path(run_dir).glob("**/" + META):
        folder = meta_file.parent
        if requires and not (folder / requires).is_file():
            continue
        try:
            step = int(read_meta(folder).get("step") or 0)
        except (CheckpointError, ValueError):
            continue  # a half-written or foreign folder is not a candidate
        key = (step, folder.name, folder)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None


def resolve_checkpoint(spec: str | Path, tracking_uri: str | None = None, *,
                       requires: str | None = None, s3_endpoint: str | None = None) -> tuple[Path, str | None]:
    """The one checkpoint resolver (training's ``init_from``, evaluation, serving, ``fdreamer generate``).

    ``spec``: a checkpoint folder; a run folder (its checkpoint with the highest step,
    :func:`latest_checkpoint`); either of them as ``s3://bucket/prefix`` (``s3_endpoint`` for MinIO/moto;
    the checkpoint is fetched into the local cache once, :mod:`fdreamer.checkpoint_store`); or
    ``runs:/<mlflow run id>`` (the run's ``fdreamer.checkpoint`` tag when it names a reachable folder, else
    its logged ``checkpoint`` artifact, downloaded).
    Returns (local checkpoint folder, MLflow run id or None); CheckpointError when nothing matches.
    """
    spec = str(spec)
    if spec.startswith("s3://"):
        from fdreamer import checkpoint_store

        found = checkpoint_store.latest(spec, s3_endpoint, requires=requires)
        if found is None:
            raise CheckpointError(f"{spec}: no checkpoint folder ({META}) under this S3 prefix")
        spec = str(checkpoint_store.fetch(found, s3_endpoint))
    if spec.startswith("runs:/"):
        import mlflow

        run_id = spec[len("runs:/"):].strip("/")
        client = mlflow.tracking.MlflowClient(tracking_uri)
        tagged = client.get_run(run_id).data.tags.get("fdreamer.checkpoint")
        if tagged and tagged.startswith("s3://"):
            return resolve_checkpoint(tagged, s3_endpoint=s3_endpoint)[0], run_id
        if tagged and is_checkpoint(tagged):
            return Path(tagged), run_id
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint", tracking_uri=tracking_uri)
        return Path(local), run_id
    path = Path(spec)
    if not is_checkpoint(path) and path.is_dir():
        path = latest_checkpoint(path, requires=requires) or path
    if not is_checkpoint(path):
        raise CheckpointError(f"{spec}: not a checkpoint folder, a run folder with checkpoints, or runs:/<run id>")
    state = path / "trainer_state.json"
    run_id = json.loads(state.read_text()).get("mlflow_run_id") if state.is_file() else None
    return path, run_id


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the parameters with ``requires_grad`` (the EMA and optimizer cover these)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_model(
    path: str | Path,
    model: FactorizedDreamerUNet,
    schedule: ScheduleConfig,
    encoders: EncoderConfig | None = None,
    *,
    ema: dict[str, torch.Tensor] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write the model part of a checkpoint into ``path`` (created); returns ``path``."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    if ema is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in ema.items()}, str(out / "ema.safetensors"))
    (out / "unet_config.json").write_text(json.dumps(dict(model.unet.config), indent=2, default=str) + "\n")
    (out / "model.yaml").write_text(dump_yaml(model.cfg))
    (out / "schedule.yaml").write_text(dump_yaml(schedule))
    (out / "encoders.yaml").write_text(dump_yaml(encoders or EncoderConfig()))
    (out / META).write_text(json.dumps({"format": FORMAT_VERSION, **(meta or {})}, indent=2, default=str) + "\n")
    return out


def build_empty(path: str | Path, model_cfg: ModelConfig | None = None, device: str | torch.device = "cpu") -> FactorizedDreamerUNet:
    """The checkpoint's architecture, randomly initialised (``model_cfg`` overrides its model.yaml)."""
    from diffusers import UNet2DConditionModel

    from fdreamer.models.unet import FactorizedDreamerUNet

    folder = Path(path)
    cfg = model_cfg if model_cfg is not None else load_config(ModelConfig, folder / "model.yaml")
    unet_cfg = json.loads((folder / "unet_config.json").read_text())
    with torch.device(device):
        return FactorizedDreamerUNet(UNet2DConditionModel.from_config(unet_cfg), cfg)


def state_mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between a model's ``own`` state dict and a loaded ``state``."""
    problems = []
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if shapes:
        problems.append(f"{len(shapes)} with other shapes (e.g. {shapes[:3]})")
    return problems


def _config_diff(a: ModelConfig, b: ModelConfig) -> list[str]:
    from fdreamer.config import flatten

    fa, fb = flatten(to_dict(a)), flatten(to_dict(b))
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def _apply_ema(model: torch.nn.Module, folder: Path) -> None:
    """Overwrite the parameters found in ``ema.safetensors`` (when present) with their EMA."""
    if not (folder / "ema.safetensors").is_file():
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in load_file(str(folder / "ema.safetensors")).items():
            if k in params:
                params[k].copy_(v)


def load_weights_into(model: FactorizedDreamerUNet, path: str | Path, *, use_ema: bool = False) -> dict[str, Any]:
    """Load a checkpoint's weights into ``model`` (same architecture), optionally with EMA on top.

    A PredictNet in ``model`` but not in the checkpoint is rebuilt from the loaded up path (the paper
    adds it in the last stage, initialised from the decoder). Anything else that does not fit raises
    CheckpointError naming the mismatching parameters and the config fields that differ.
    """
    folder = Path(path)
    meta = read_meta(folder)
    state = load_file(str(folder / "model.safetensors"))
    saved_cfg = load_config(ModelConfig, folder / "model.yaml")
    add_predictnet = model.cfg.predictnet and not any(k.startswith("predictnet.") for k in state)
    target_keys = {k for k in model.state_dict() if not (add_predictnet and k.startswith("predictnet."))}
    own = {k: v for k, v in model.state_dict().items() if k in target_keys}
    problems = state_mismatch(own, state)
    if problems:
        diff = _config_diff(saved_cfg, model.cfg)
        raise CheckpointError(
            f"{folder}: checkpoint does not fit this model config: {'; '.join(problems)}"
            + (f". Model config differs in: {', '.join(diff[:8])}" if diff else "")
        )
    model.load_state_dict(state, strict=not add_predictnet)
    if add_predictnet:
        model.attach_predictnet()
    if use_ema:
        _apply_ema(model, folder)
    return meta


def load_model(path: str | Path, *, use_ema: bool = True, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> LoadedModel:
    """Rebuild the video UNet of checkpoint ``path`` for inference (EMA weights when saved)."""
    folder = Path(path)
    meta = read_meta(folder)
    cfg = load_config(ModelConfig, folder / "model.yaml")
    model = build_empty(folder, cfg.with_(predictnet=False) if cfg.predictnet else cfg, device="meta")
    state = load_file(str(folder / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.startswith("predictnet.")}  # never runs at inference
    problems = state_mismatch(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"{folder}: weights do not match model.yaml/unet_config.json: {'; '.join(problems)}")
    model.load_state_dict(state, assign=True)
    if use_ema:
        _apply_ema(model, folder)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval().requires_grad_(False)
    return LoadedModel(model, load_config(ScheduleConfig, folder / "schedule.yaml"),
                       load_config(EncoderConfig, folder / "encoders.yaml"), meta)


def export_image_model(path: str | Path, out: str | Path, *, use_ema: bool = True) -> Path:
    """Write checkpoint ``path``'s spatial UNet as a Stable-Diffusion-layout image model under ``out``:

    - ``out/unet``: a diffusers ``UNet2DConditionModel`` folder (the Eq. 1 image model of
      :meth:`~fdreamer.models.unet.FactorizedDreamerUNet.image_unet`; EMA weights when saved);
    - ``out/scheduler``: a ``DDIMScheduler`` on the checkpoint's training schedule (its betas as
      ``trained_betas``, its prediction type, trailing spacing), so a ``StableDiffusionPipeline`` samples
      the way the model was trained.

    What a text-to-image stage hands on: ``pretrained_unet`` of the next stage and the T2I step of
    text-to-video read these folders as they read SD's. Returns ``out``."""
    from fdreamer.schedule import NoiseSchedule

    loaded = load_model(path, use_ema=use_ema)
    target = Path(out)
    loaded.model.image_unet().save_pretrained(target / "unet")
    NoiseSchedule(loaded.schedule).make_scheduler("ddim", steps_offset=1).save_pretrained(target / "scheduler")
    return target


def export_video_model(path: str | Path, out: str | Path, *, encoders: EncoderConfig | None = None,
                       use_ema: bool = True) -> Path:
    """Write checkpoint ``path`` as an inference checkpoint under ``out``: one ``model.safetensors`` with the
    EMA weights folded in (no ``ema.safetensors``, no optimizer or trainer state: about half the size), the
    same ``model.yaml`` / ``unet_config.json`` / ``schedule.yaml``, and its meta plus ``weights`` ("ema" or
    "raw") and ``exported_from``. ``encoders`` replaces the saved ``encoders.yaml`` (e.g. the encoders'
    folders where the export will be installed). What a trained video stage hands on: ``init_from`` of
    the next stage and the checkpoint serving and evaluation load. Returns ``out``."""
    folder = Path(path)
    loaded = load_model(folder, use_ema=use_ema)
    meta = {k: v for k, v in read_meta(folder).items() if k != "format"}
    meta |= {"weights": "ema" if use_ema and (folder / "ema.safetensors").is_file() else "raw",
             "exported_from": str(folder)}
    target = Path(out)
    if target.exists():
        for name in ("ema.safetensors", "trainer_state.json"):
            (target / name).unlink(missing_ok=True)
    return save_model(target, loaded.model, loaded.schedule, encoders or loaded.encoders, meta=meta)


__all__ = [
    "export_image_model",
    "export_video_model",
    "latest_checkpoint",
    "resolve_checkpoint",
    "CheckpointError", "LoadedModel", "build_empty", "is_checkpoint", "load_model", "load_weights_into",
    "read_meta", "save_model", "state_mismatch", "trainable_state",
]
