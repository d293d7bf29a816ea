"""The denoising loop of the video model: classifier-free guidance with separate text and image scales.

Guidance follows InstructPix2Pix (Brooks et al. 2023, Eq. 3), with the null conditions of
:mod:`fdreamer.models.conditions` (null text = the encoders' output for the negative prompt, null
image = zero CLIP embedding and zero first-frame latent)::

    ε = ε(∅, ∅) + s_img · (ε(img, ∅) − ε(∅, ∅)) + s_txt · (ε(img, txt) − ε(img, ∅))

(written for ε; the same combination is applied to v for v-prediction). The branches run as one
batched forward; branches whose weight is zero are skipped (``s_img = 1`` drops ε(∅, ∅); ``s_img =
s_txt = 1`` leaves the conditional prediction alone). A model without image conditions (the direct
T2V model, ``factorized=False``) uses plain text guidance ``ε(∅) + s_txt · (ε(txt) − ε(∅))``.

Guidance rescale is diffusers' ``rescale_noise_cfg`` (Lin et al. 2023, §3.4), against the fully
conditional prediction ε(img, txt).

The scheduler is a diffusers scheduler from :meth:`fdreamer.schedule.NoiseSchedule.make_scheduler`
(training schedule, trailing spacing), which also converts ε or v to the next sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    rescale_noise_cfg,
)

from fdreamer.models.conditions import Conditions

# callback(step, total, phase) -> False (or raising GenerationCancelled) cancels the generation.
StepCallback = Callable[[int, int, str], object]


class GenerationCancelled(Exception):
    """A step callback cancelled the generation (returned False or raised this)."""

    def __init__(self, message: str = "generation cancelled", *, step: int | None = None,
                 total: int | None = None, phase: str | None = None) -> None:
        super().__init__(message)
        self.step, self.total, self.phase = step, total, phase


def notify(callback: StepCallback | None, step: int, total: int, phase: str) -> None:
    """Call ``callback(step, total, phase)``; raise :class:`GenerationCancelled` when it returns False."""
    if callback is None:
        return
    if callback(step, total, phase) is False:
        raise GenerationCancelled(f"cancelled by the callback after step {step}/{total} of {phase}",
                                  step=step, total=total, phase=phase)


def combine_guidance(
    eps_uncond: torch.Tensor | None,
    eps_image: torch.Tensor | None,
    eps_full: torch.Tensor,
    *,
    guidance_scale: float,
    image_guidance_scale: float,
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """``ε(∅,∅) + s_img(ε(img,∅) − ε(∅,∅)) + s_txt(ε(img,txt) − ε(img,∅))``, then guidance rescale.

    ``eps_image`` None means the model has no image condition: plain text guidance against
    ``eps_uncond``. A branch may be None only where its weight vanishes (see the module docstring).
    """
    if eps_image is None:  # text guidance only
        out = eps_full if eps_uncond is None else eps_uncond + guidance_scale * (eps_full - eps_uncond)
    elif eps_uncond is not None:
        out = eps_uncond + image_guidance_scale * (eps_image - eps_uncond) + guidance_scale * (eps_full - eps_image)
    elif image_guidance_scale == 1.0:  # the ε(∅, ∅) terms cancel
        out = eps_image + guidance_scale * (eps_full - eps_image)
    else:
        raise ValueError("eps_uncond is needed when image_guidance_scale != 1")
    if guidance_rescale > 0.0:
        out = rescale_noise_cfg(out, eps_full, guidance_rescale=guidance_rescale)
    return out


def _concat(conds: list[Conditions]) -> Conditions:
    """Stack conditions along the batch (all must carry the same fields, same token lengths)."""
    out = {}
    for f in fields(Conditions):
        values = [getattr(c, f.name) for c in conds]
        if all(v is None for v in values):
            out[f.name] = None
        elif any(v is None for v in values):
            raise ValueError(f"conditions differ in whether {f.name} is given")
        else:
            out[f.name] = torch.cat(values)
    return Conditions(**out)


def with_image_only(cond: Conditions, null: Conditions) -> Conditions:
    """The image condition of ``cond`` with the null text of ``null`` (the ε(img, ∅) branch)."""
    return Conditions(text_tokens=null.text_tokens, image_embed=cond.image_embed, first_frame=cond.first_frame,
                      t5_tokens=null.t5_tokens, t5_mask=null.t5_mask)


def guided_prediction(
    model: torch.nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor | float,
    cond: Conditions,
    null: Conditions,
    *,
    guidance_scale: float,
    image_guidance_scale: float,
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """One guided model prediction for ``latents`` ``[1, C, T, h, w]`` (float32 result).

    ``cond`` holds the conditions of the request (batch 1), ``null`` the null text and null image
    (:func:`fdreamer.models.conditions.null_conditions`); all branches run as one batched forward.
    """
    has_image = cond.image_embed is not None
    if has_image:
        names = ["full"] if guidance_scale == 1.0 and image_guidance_scale == 1.0 else (
            ["image", "full"] if image_guidance_scale == 1.0 else ["uncond", "image", "full"])
    else:
        names = ["full"] if guidance_scale == 1.0 else ["uncond", "full"]
    branch = {"uncond": null, "image": with_image_only(cond, null) if has_image else None, "full": cond}
    batch = _concat([branch[n] for n in names])
    dtype = getattr(model, "dtype", latents.dtype)
    x = latents.to(dtype).expand(len(names), *latents.shape[1:])
    out = model(x, timestep, **batch.as_kwargs()).sample.float()
    eps = dict(zip(names, out.chunk(len(names)), strict=True))
    return combine_guidance(eps.get("uncond"), eps.get("image"), eps["full"], guidance_scale=guidance_scale,
                            image_guidance_scale=image_guidance_scale, guidance_rescale=guidance_rescale)


@torch.no_grad()
def denoise(
    model: torch.nn.Module,
    scheduler,
    shape: tuple[int, ...],
    cond: Conditions,
    null: Conditions,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    image_guidance_scale: float,
    guidance_rescale: float = 0.0,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    callback: StepCallback | None = None,
    phase: str = "i2v",
) -> torch.Tensor:
    """Sample latents of ``shape`` ``[1, C, T, h, w]`` (float32) from noise drawn with ``generator``.

    The initial noise is drawn on the generator's device (CPU: the same seed gives the same noise on
    every device) and moved to ``device``. ``callback(step, total, phase)`` runs after each step
    (``step`` counts from 1); returning False raises :class:`GenerationCancelled`.
    """
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    total = len(timesteps)
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    latents = noise.to(device) * scheduler.init_noise_sigma
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(latents, t)
        pred = guided_prediction(model, x_in, t, cond, null, guidance_scale=guidance_scale,
                                 image_guidance_scale=image_guidance_scale, guidance_rescale=guidance_rescale)
        latents = scheduler.step(pred, t, latents, generator=generator).prev_sample
        notify(callback, i + 1, total, phase)
    return latents


__all__ = ["GenerationCancelled", "StepCallback", "combine_guidance", "denoise", "guided_prediction", "notify",
           "rescale_noise_cfg", "with_image_only"]
