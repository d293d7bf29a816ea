"""One training worker without Ray (``TrainWorker.setup_model``), synthetic batches, save -> restore -> step.

What the resume tests (``tests/test_resume_devices.py``) and ``tests/gpu_check.py`` share. Imports no Ray and
no test service: ``tests/gpu_check.py`` runs it on a GPU machine that has neither Ray nor pytest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def train_config(preset: str = "tiny", **overrides: Any):
    """A one-worker :class:`~training.config.TrainConfig` of ``preset`` at its stage-1 shapes (tiny: 8x64x64
    clips, 16x16 latents; sd15: ``training/configs/stage1.yaml``'s 32x256x256, 32x32 latents). ``overrides``:
    top-level fields and nested sections as dicts (``optim={"lr": 1e-3}``)."""
    from fdreamer.config import load_config, to_dict
    from training.config import TrainConfig

    repo = Path(__file__).resolve().parents[2]
    base = to_dict(load_config(TrainConfig, repo / "training/configs" / ("tiny_stage1.yaml" if preset == "tiny"
                                                                           else "stage1.yaml")))
    base.update(pretrained_unet=None, steps=10, global_batch=overrides.pop("micro_batch", base["micro_batch"]))
    base["micro_batch"] = base["global_batch"]
    base["scaling"].update(num_workers=1, use_gpu=False, grad_reduce_dtype="fp32")
    for key, value in overrides.items():
        if isinstance(value, dict):
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return load_config(TrainConfig, data=base)


def latent_size(cfg: Any) -> int:
    """Latent side of the config's clips (the VAE downsamples by 8 at sd15, by 4 for the tiny preset)."""
    return cfg.schedule.height // (4 if cfg.preset == "tiny" else 8)


def synthetic_batch(cfg: Any, seed: int, *, t5_len: int = 24):
    """A random micro-batch of the config's shapes (``micro_batch`` clips), on the CPU."""
    from fdreamer.data.batching import TrainBatch
    from fdreamer.models import Conditions
    from fdreamer.models.config import preset_unet_config

    g = torch.Generator().manual_seed(seed)
    b, f, s = cfg.micro_batch, cfg.schedule.num_frames, latent_size(cfg)
    text_dim = preset_unet_config(cfg.preset)["cross_attention_dim"]
    mask = torch.ones(b, t5_len, dtype=torch.bool)
    mask[0, t5_len // 2:] = False  # padded T5 tokens, as a batch of captions of different lengths
    cond = Conditions(text_tokens=torch.randn(b, 77, text_dim, generator=g),
                      image_embed=torch.randn(b, cfg.model.image_embed_dim, generator=g),
                      first_frame=torch.randn(b, 4, s, s, generator=g),
                      t5_tokens=torch.randn(b, t5_len, cfg.model.t5_dim, generator=g), t5_mask=mask)
    return TrainBatch(torch.randn(b, 4, f, s, s, generator=g), cond, None, [f"clip{seed}-{i}" for i in range(b)])


def null_conditions(cfg: Any):
    """CFG null conditions of the shapes the preprocessing job writes (the empty caption: one T5 token)."""
    from fdreamer.models import Conditions
    from fdreamer.models.config import preset_unet_config

    g = torch.Generator().manual_seed(99)
    s = latent_size(cfg)
    text_dim = preset_unet_config(cfg.preset)["cross_attention_dim"]
    return Conditions(torch.randn(1, 77, text_dim, generator=g), torch.zeros(1, cfg.model.image_embed_dim),
                      torch.zeros(1, 4, s, s), torch.randn(1, 1, cfg.model.t5_dim, generator=g),
                      torch.ones(1, 1, dtype=torch.bool))


def new_worker(cfg: Any, device: str | torch.device, source: str | Path | None = None):
    """A :class:`~training.loop.TrainWorker` past ``setup_model`` (one worker, no Ray, no data streams):
    restored from checkpoint ``source`` when given, with the null conditions on its device."""
    from fdreamer.config import to_dict
    from fdreamer.device import to_device
    from training.loop import TrainWorker

    worker = TrainWorker.__new__(TrainWorker)
    worker.setup_model({"cfg": to_dict(cfg)}, rank=0, world=1, device=torch.device(device),
                       source=None if source is None else str(source))
    worker.null = to_device(null_conditions(cfg), worker.device)
    return worker


def step(worker: Any, batch: Any) -> Any:
    """One optimizer step of ``worker`` on ``batch`` (``TrainWorker.optimize``: the loop's step)."""
    from fdreamer.device import to_device

    return worker.optimize([to_device(batch, worker.device)])


def save(worker: Any, path: Path) -> Path:
    """The worker's checkpoint as rank 0 of a DDP run writes it (``CheckpointSaving.save_and_report``)."""
    from fdreamer.encoders import EncoderConfig
    from training import checkpointing, parallel

    return checkpointing.save_training_checkpoint(
        Path(path), parallel.unwrap(worker.model), worker.optimizer.state_dict(),
        worker.ema.state_dict() if worker.ema else None, worker.state, worker.cfg, EncoderConfig(), meta={})


def snapshot(worker: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Weights, EMA and AdamW moments of ``worker``, copied to the CPU, keyed by parameter name."""
    from training import parallel

    model = parallel.unwrap(worker.model)
    names = {id(p): n for n, p in model.named_parameters()}
    optim = {}
    for p, st in worker.optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            optim[f"{names[id(p)]}.{key}"] = _copy(st[key])
    return {"model": {k: _copy(v) for k, v in model.state_dict().items()},
            "ema": {k: _copy(v) for k, v in (worker.ema.shadow if worker.ema else {}).items()},
            "optim": optim}


def _copy(t: torch.Tensor) -> torch.Tensor:
    """An fp32 CPU copy (``.float().cpu()`` of an fp32 CPU tensor is the tensor itself, not a copy)."""
    return t.detach().to("cpu", torch.float32, copy=True)


def max_abs_diff(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """The largest absolute difference per part of two :func:`snapshot` s (same keys)."""
    out = {}
    for part in a:
        assert a[part].keys() == b[part].keys(), part
        out[part] = max((float((a[part][k] - b[part][k]).abs().max()) for k in a[part]), default=0.0)
    return out


__all__ = ["latent_size", "max_abs_diff", "new_worker", "null_conditions", "save", "snapshot", "step",
           "synthetic_batch", "train_config"]
