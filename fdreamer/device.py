"""Where tensors run: device choice, TF32, pinned host-to-device copies (no Ray; training, serving, evaluation).

- :func:`resolve_device`: ``"auto"`` is CUDA when this process sees a GPU, else CPU. Under Ray a worker or
  replica sees only the GPUs Ray assigned it (Ray sets ``CUDA_VISIBLE_DEVICES``), so ``auto`` follows
  ``num_gpus``; :func:`check_device_matches_gpus` refuses an explicit device that contradicts them.
- :func:`enable_tf32`: fp32 matmuls and cuDNN convolutions in TF32 on CUDA (what runs outside bf16
  autocast: fp32 norms' neighbours, fp32 inference, the VAE). A no-op on CPU.
- :func:`to_device`: a batch (dataclasses such as ``TrainBatch`` / ``JointBatch`` / ``Conditions``, tensors,
  lists, dicts) moved to a device; to CUDA from pinned memory with ``non_blocking=True`` (no stream sync:
  a plain ``.to("cuda")`` of a pageable CPU tensor waits for the GPU to finish its queue). :func:`pin`
  pins a batch ahead of time (the training reader thread does it, off the step's critical path).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import torch

T = TypeVar("T")

DEVICE_CHOICES = ("auto", "cpu", "cuda")


class DeviceConfigError(ValueError):
    """A device setting that contradicts the GPUs this process has (or was given)."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> ``cuda`` when CUDA is available, else ``cpu``; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_device(device: str, where: str) -> None:
    """:class:`DeviceConfigError` unless ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:<index>``."""
    d = str(device)
    if d not in DEVICE_CHOICES and not (d.startswith("cuda:") and d[5:].isdigit()):
        raise DeviceConfigError(f"{where}: device must be auto, cpu, cuda or cuda:<index>, got {device!r}")


def check_device_matches_gpus(device: str, num_gpus: float, where: str) -> None:
    """One-line :class:`DeviceConfigError` when ``device`` (``cpu`` / ``cuda[:i]`` / ``auto``) and the
    GPUs reserved for ``where`` disagree: a CUDA device with ``num_gpus: 0`` (no GPU is assigned: CUDA
    fails or, worse, every replica lands on GPU 0 of the node) or ``cpu`` with ``num_gpus > 0`` (the
    reserved GPU idles)."""
    check_device(device, where)
    kind = str(device).split(":")[0]
    if kind == "cuda" and not num_gpus > 0:
        raise DeviceConfigError(f"{where}: device {device!r} but num_gpus {num_gpus}: reserve a GPU (num_gpus > 0) "
                                "or use device cpu (or auto)")
    if kind == "cpu" and num_gpus > 0:
        raise DeviceConfigError(f"{where}: device 'cpu' but num_gpus {num_gpus}: the reserved GPU would idle; use "
                                "device cuda (or auto), or num_gpus 0")


def device_for_gpus(device: str, num_gpus: float, where: str) -> str:
    """The device of a process that Ray gave ``num_gpus`` GPUs (checked by :func:`check_device_matches_gpus`):
    ``auto`` -> ``cuda`` when it has a GPU, else ``cpu``. Ray leaves ``CUDA_VISIBLE_DEVICES`` alone for a
    process with no GPU, so such a process still sees every GPU of the node: ``torch.cuda.is_available()``
    is no answer there, the reservation is."""
    check_device_matches_gpus(device, num_gpus, where)
    if str(device) == "auto":
        return "cuda" if num_gpus > 0 else "cpu"
    return str(device)


def enable_tf32(device: torch.device | str | None = None) -> bool:
    """TF32 for fp32 matmuls and cuDNN convolutions when ``device`` is CUDA (None: when CUDA is available);
    returns whether it was enabled. ``set_float32_matmul_precision`` is the API torch 2.x keeps (the older
    ``backends.cuda.matmul.allow_tf32`` flag reads the same setting)."""
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if not on_cuda:
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True


def inference_dtype(device: torch.device | str, dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype a pipeline runs in: ``dtype`` when given, else bf16 on CUDA, else None (as saved: fp32)."""
    if dtype is not None:
        return dtype
    return torch.bfloat16 if torch.device(device).type == "cuda" else None


def _map(obj: Any, fn) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _map(getattr(obj, f.name), fn) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and any(isinstance(v, torch.Tensor) or dataclasses.is_dataclass(v) for v in obj):
        return type(obj)(_map(v, fn) for v in obj)
    return obj


def pin(obj: T) -> T:
    """``obj`` with every CPU tensor in page-locked memory (only when CUDA is available; else unchanged)."""
    if not torch.cuda.is_available():
        return obj
    return _map(obj, lambda t: t.pin_memory() if t.device.type == "cpu" and not t.is_pinned() else t)


def to_device(obj: T, device: torch.device | str) -> T:
    """``obj`` with every tensor on ``device``. To CUDA: from pinned memory, ``non_blocking=True`` (the copy
    is ordered on the current stream before any kernel that reads it; no host sync)."""
    device = torch.device(device)
    if device.type != "cuda":
        return _map(obj, lambda t: t.to(device))

    def move(t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    return _map(obj, move)


__all__ = ["DEVICE_CHOICES", "DeviceConfigError", "check_device", "check_device_matches_gpus", "device_for_gpus", "enable_tf32", "inference_dtype", "pin",
           "resolve_device", "to_device"]
