"""Single-process training pieces (no Ray): optimizer, EMA, one optimizer step with accumulation, validation.

The Ray Train loop (``training/loop.py``) and the overhead benchmark's bare PyTorch loop
(``tests/bench/bench_train.py``) call exactly these, so the two differ only in distribution and data
loading. Randomness (timesteps, noise, CFG dropout) is drawn from generators seeded by
``(seed, rank, step, micro-batch)``: a resumed run draws the same numbers without storing RNG state.
Timesteps are uniform or logit-normal (``timestep_sampling``, :func:`fdreamer.train.objective.sample_timesteps`).

Joint image-video micro-batches (:class:`~fdreamer.data.batching.JointBatch`, VideoCrafter2): the video
clips go through the model as usual; the 1-frame images through ``model(..., temporal=False)`` with
their text condition only (CFG text dropout as for videos), with noise/timesteps from a second
generator. The two losses are combined as a weighted mean over samples,

    L = (n_v · L_video + w · n_i · L_image) / (n_v + w · n_i),      w = ``image_weight`` (default 1),

where L_video (L_DF + γ·L_flow) and L_image (L_DF) are each a mean over their own elements, so with
w = 1 every clip and every image counts the same whatever its frame count. A micro-batch of only
videos (``TrainBatch`` or a JointBatch without images) computes exactly what it computed before.
"""

from __future__ import annotations

import contextlib
from functools import partial
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fdreamer.data.batching import JointBatch, TrainBatch
from fdreamer.models.conditions import Conditions, null_conditions
from fdreamer.train.objective import ObjectiveOutput, TimestepSampling, diffusion_objective
from fdreamer.schedule import NoiseSchedule


def step_generator(seed: int, rank: int, step: int, micro: int, stream: int = 0) -> torch.Generator:
    """A CPU generator unique to (seed, rank, step, micro-batch, stream): reproducible after a resume.

    ``stream`` 0 = the video clips (the keys of every earlier version), 1 = the images of a joint batch.
    """
    key = ((seed * 1_000_003 + rank) * 1_000_003 + step) * 1_000 + micro
    if stream:
        key = key * 7 + stream
    return torch.Generator().manual_seed(key % (2**63 - 1))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: Sequence[float], eps: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (frozen groups are left out), built over the parameters where
    they will train (after the model is placed on its device and wrapped / sharded): ``fused=True`` when
    every one is on CUDA (one kernel for the whole update), else ``foreach=True`` (a few multi-tensor ops
    instead of a Python loop over ~1,500 tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (every group is frozen)")
    on_cuda = all(p.device.type == "cuda" for p in params)
    impl = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, **impl)


def lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """Constant learning rate after a linear warmup (paper §4.1 uses a constant 5e-5)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr


class EMA:
    """Exponential moving average of the trainable parameters (kept in fp32 on the parameters' device:
    build it from the model once the model is placed)."""

    def __init__(self, model: nn.Module, decay: float, start: int = 0) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.start = decay, start
        self.shadow = {n: p.detach().float().clone() for n, p in _named_trainable(model)}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """shadow <- d * shadow + (1 - d) * param (a copy while ``step < start``): two multi-tensor ops over
        every tensor (``_foreach_mul_`` / ``_foreach_add_``, the same arithmetic as one ``mul_().add_()``
        per tensor, so the result is bitwise the per-tensor loop's)."""
        d = self.decay if step >= self.start else 0.0
        named = list(_named_trainable(model))
        shadow = [self.shadow[n] for n, _ in named]
        params = [p.detach().float() for _, p in named]  # fp32 parameters: no copy
        torch._foreach_mul_(shadow, d)
        torch._foreach_add_(shadow, params, alpha=1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` into the shadow tensors (they stay on the parameters' device, whatever the device
        of ``state``)."""
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state misses {len(missing)} parameters (e.g. {sorted(missing)[:3]})")
        with torch.no_grad():
            for n in self.shadow:
                self.shadow[n].copy_(state[n])


def state_device_problems(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                          ema: EMA | None = None) -> list[str]:
    """Optimizer state and EMA tensors that are NOT on their parameter's device (empty: all placed).

    AdamW's ``step`` counter is a CPU scalar by design unless the optimizer is fused or capturable; it
    is not reported. What a resume that loaded the state before moving the model produced: moments on
    the CPU beside CUDA parameters, and ``optimizer.step()`` raising a device mismatch. Also reported: an
    optimizer whose parameters are not the model's (a move that makes new Parameter objects, e.g. to
    ``meta``, or sharding, leaves an optimizer built earlier updating tensors the model no longer uses)."""
    problems: list[str] = []
    names = {id(p): n for n, p in _named_trainable(model)}
    if optimizer is not None:
        held = [p for group in optimizer.param_groups for p in group["params"]]
        stale = sum(id(p) not in names for p in held)
        if stale or len(held) != len(names):
            problems.append(f"the optimizer holds {len(held)} tensors, {stale} of them not the model's {len(names)} "
                            "trainable parameters (built before the model was moved, wrapped or sharded?)")
        for group in optimizer.param_groups:
            on_device_step = bool(group.get("fused") or group.get("capturable"))
            for p in group["params"]:
                for key, value in optimizer.state.get(p, {}).items():
                    if not isinstance(value, torch.Tensor) or (key == "step" and not on_device_step):
                        continue
                    if value.device != p.device:
                        problems.append(f"optimizer {names.get(id(p), '?')}.{key} on {value.device}, parameter on {p.device}")
    if ema is not None:
        params = dict(_named_trainable(model))
        for n, v in ema.shadow.items():
            if n in params and v.device != params[n].device:
                problems.append(f"EMA {n} on {v.device}, parameter on {params[n].device}")
    return problems


def _named_trainable(model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
    inner = getattr(model, "module", model)  # DDP wraps the model
    return ((n, p) for n, p in inner.named_parameters() if p.requires_grad)


@dataclass
class StepResult:
    loss: float  # the weighted mean of the module docstring, averaged over micro-batches
    l_df: float  # the same weighted mean of the L_DF parts (no flow term)
    l_flow: float | None
    grad_norm: float
    l_df_video: float | None = None  # L_DF of the video clips alone (None: no video in this step)
    l_df_image: float | None = None  # L_DF of the images alone (None: no image in this step)


@dataclass
class JointLoss:
    """The combined loss of one micro-batch and its parts (tensors: ``loss`` is differentiated)."""

    loss: torch.Tensor
    l_df: torch.Tensor
    l_flow: torch.Tensor | None
    l_df_video: torch.Tensor | None
    l_df_image: torch.Tensor | None


def part_objective(
    model: nn.Module, schedule: NoiseSchedule, part: TrainBatch, *, null: Conditions | None = None,
    drop_probs: tuple[float, float, float] = (0.0, 0.0, 0.0), gamma: float = 1.0,
    generator: torch.Generator | None = None, timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None,
    with_flow: bool = True, timestep_sampling: TimestepSampling = "uniform",
) -> ObjectiveOutput:
    """:func:`~fdreamer.train.objective.diffusion_objective` of one part: videos with their fps, images with
    ``temporal=False`` (switches bound to the model call; the objective itself is unchanged).
    ``with_flow=False`` ignores the part's flow targets (validation: L_DF only); ``timestep_sampling`` is how
    timesteps not given are drawn."""
    call = model
    if part.is_image:
        call = partial(model, temporal=False)
    elif part.fps is not None:
        call = partial(model, fps=part.fps)
    nulls = None
    if null is not None:
        nulls = null_conditions(part.cond, null.text_tokens, null.t5_tokens, null.t5_mask)
    return diffusion_objective(call, schedule, part.latents, part.cond, flow=part.flow if with_flow else None,
                               gamma=gamma, timesteps=timesteps, noise=noise, null=nulls, drop_probs=drop_probs,
                               generator=generator, timestep_sampling=timestep_sampling)


def joint_objective(
    model: nn.Module, schedule: NoiseSchedule, mb: TrainBatch | JointBatch, *, null: Conditions | None,
    drop_probs: tuple[float, float, float], gamma: float, generators: tuple[torch.Generator, torch.Generator],
    image_weight: float = 1.0, timestep_sampling: TimestepSampling = "uniform",
) -> JointLoss:
    """The loss of one micro-batch: the weighted mean of its video and image parts (module docstring)."""
    if isinstance(mb, TrainBatch):
        mb = JointBatch(None, mb) if mb.is_image else JointBatch(mb, None)
    if image_weight <= 0:
        raise ValueError(f"image_weight must be > 0, got {image_weight}")
    video = image = None
    if mb.video is not None:
        video = part_objective(model, schedule, mb.video, null=null, drop_probs=drop_probs, gamma=gamma,
                               generator=generators[0], timestep_sampling=timestep_sampling)
    if mb.image is not None:
        image = part_objective(model, schedule, mb.image, null=null, drop_probs=drop_probs, gamma=gamma,
                               generator=generators[1], timestep_sampling=timestep_sampling)
    if image is None:  # videos only: exactly the single-part objective
        return JointLoss(video.loss, video.l_df, video.l_flow, video.l_df, None)
    if video is None:
        return JointLoss(image.loss, image.l_df, None, None, image.l_df)
    n_v, n_i = mb.video.latents.shape[0], image_weight * mb.image.latents.shape[0]
    total = n_v + n_i
    return JointLoss((n_v * video.loss + n_i * image.loss) / total, (n_v * video.l_df + n_i * image.l_df) / total,
                     video.l_flow, video.l_df, image.l_df)


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: NoiseSchedule,
    micro_batches: Sequence[TrainBatch | JointBatch],
    *,
    null: Conditions | None,
    drop_probs: tuple[float, float, float],
    gamma: float,
    grad_clip: float,
    seed: int,
    rank: int,
    step: int,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
    image_weight: float = 1.0,
    timestep_sampling: TimestepSampling = "uniform",
) -> StepResult:
    """One optimizer step over ``micro_batches`` (gradient accumulation; mean of their losses).

    A micro-batch is a :class:`TrainBatch` (videos, or images when ``is_image``) or a
    :class:`JointBatch`; see the module docstring for how its parts are weighted (``image_weight``).
    ``no_sync`` (DDP's ``model.no_sync``) skips the gradient all-reduce on all but the last micro-batch;
    ``timestep_sampling`` (``objective.timestep_sampling``) is how the training timesteps are drawn.
    """
    optimizer.zero_grad(set_to_none=True)
    n = len(micro_batches)
    # The losses stay tensors until the whole step is queued: one host sync per step (the .tolist() below)
    # instead of one per micro-batch and value; the sums are then the same Python float sums as before.
    losses: list[torch.Tensor] = []
    kinds: list[tuple[str, int]] = []  # (what, micro-batch) of each entry of `losses`
    for i, mb in enumerate(micro_batches):
        gens = (step_generator(seed, rank, step, i), step_generator(seed, rank, step, i, stream=1))
        sync = contextlib.nullcontext() if (no_sync is None or i == n - 1) else no_sync()
        with sync, (autocast or contextlib.nullcontext()):
            out = joint_objective(model, schedule, mb, null=null, drop_probs=drop_probs, gamma=gamma,
                                  generators=gens, image_weight=image_weight, timestep_sampling=timestep_sampling)
            (out.loss / n).backward()
        for key in ("loss", "l_df", "l_flow", "l_df_video", "l_df_image"):
            value = getattr(out, key)
            if value is not None:
                losses.append(value.detach().float().reshape(()))
                kinds.append((key, i))
    params = [p for p in model.parameters() if p.requires_grad]
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    optimizer.step()
    if hasattr(norm, "full_tensor"):  # FSDP2: a replicated DTensor
        norm = norm.full_tensor()
    values = torch.stack([*losses, norm.detach().float().to(losses[0].device)]).tolist()
    norm_value = values.pop()
    totals: dict[str, float] = {"loss": 0.0, "l_df": 0.0, "l_flow": 0.0}
    parts: dict[str, list[float]] = {"l_df_video": [], "l_df_image": []}
    has_flow = False
    for (key, _), value in zip(kinds, values):
        if key in totals:
            totals[key] += value / n
            has_flow = has_flow or key == "l_flow"
        else:
            parts[key].append(value)
    means = {k: (sum(v) / len(v) if v else None) for k, v in parts.items()}
    return StepResult(totals["loss"], totals["l_df"], totals["l_flow"] if has_flow else None, norm_value, **means)


def slice_batch(batch: TrainBatch, start: int, stop: int) -> TrainBatch:
    """Rows ``[start, stop)`` of ``batch`` (every tensor of a batch is batch-first)."""
    cond = batch.cond
    cond = type(cond)(**{k: None if v is None else v[start:stop] for k, v in cond.as_kwargs().items()})
    return TrainBatch(batch.latents[start:stop], cond, None if batch.flow is None else batch.flow[start:stop],
                      batch.clip_ids[start:stop], None if batch.fps is None else batch.fps[start:stop], batch.is_image)


@torch.no_grad()
def validation_loss(
    model: nn.Module, schedule: NoiseSchedule, batch: TrainBatch, timesteps: Sequence[int], seed: int = 1234, *,
    micro_batch: int | None = None, autocast: contextlib.AbstractContextManager | None = None,
) -> dict[str, float]:
    """L_DF of ``batch`` at each fixed timestep with fixed noise (no dropout): ``{"val_loss": mean, "val_loss_t<k>": ...}``.

    The noise depends only on ``seed`` and the batch shape, so evaluations at different steps of a
    run (or of different runs) compare the same problems. Image batches (``is_image``) run the image
    path; their keys are ``val_image_loss`` / ``val_image_loss_t<k>``.

    ``micro_batch``: at most this many clips per forward (the training run's micro-batch: validation then
    needs no more activation memory than a training forward; None = the whole batch in one forward); the
    loss is the sample-weighted mean of the micro-batches' means, i.e. the mean over the whole batch (every
    sample has the same number of elements), with the same noise per clip. ``autocast``: the training
    step's autocast context (bf16 on CUDA), entered around each forward.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch.latents.shape, generator=gen).to(batch.latents)
    n = batch.latents.shape[0]
    size = n if micro_batch is None else max(1, min(int(micro_batch), n))
    name = "val_image_loss" if batch.is_image else "val_loss"
    per_t: list[torch.Tensor] = []
    for t in timesteps:
        parts = []
        for start in range(0, n, size):
            stop = min(start + size, n)
            part = batch if size == n else slice_batch(batch, start, stop)
            ts = torch.full((stop - start,), int(t), dtype=torch.long)
            with autocast or contextlib.nullcontext():
                res = part_objective(model, schedule, part, timesteps=ts, noise=noise[start:stop], with_flow=False)
            parts.append(res.l_df.detach().float())
        if len(parts) == 1:
            per_t.append(parts[0])
        else:  # sample-weighted mean of the micro-batch means (Python weights: no host-to-device copy)
            per_t.append(torch.stack([m * min(size, n - s) for m, s in zip(parts, range(0, n, size))]).sum() / n)
    values = torch.stack(per_t).tolist()  # one host sync for the whole validation
    out = {f"{name}_t{int(t)}": v for t, v in zip(timesteps, values)}
    out[name] = sum(out.values()) / len(timesteps)
    model.train(was_training)
    return out


__all__ = ["EMA", "JointLoss", "StepResult", "joint_objective", "lr_at", "make_optimizer", "optimizer_step",
           "part_objective", "slice_batch", "state_device_problems", "step_generator", "validation_loss"]
