"""Inference: image-to-video, and text-to-video = text-to-image then image-to-video (paper Fig. 1 (b)).

No Ray here; the server, ``fdreamer evaluate``, training's sample videos and ``fdreamer generate`` all
call :class:`VideoPipeline`::

    pipe = VideoPipeline.from_checkpoint("runs/x/checkpoint", device="cuda", dtype=torch.float16)
    result = pipe(VideoRequest(prompt="a red ball bounces", image=None, seed=1))  # T2V
    save_video(result, "out.mp4")

- **I2V**: the conditioning image is resized and centre-cropped to ``height``×``width``; its CLIP image
  embedding feeds the adapter (Eq. 2) and its VAE latent PACA (Eq. 3). The prompt's CLIP tokens go to
  the spatial cross-attention, its T5 tokens (+ mask) to the temporal layers (CLIP tokens when
  ``temporal_text_encoder='clip'``). Guidance with separate text/image scales: :mod:`fdreamer.inference.sampling`.
- **T2V** with a factorized model: first a text-to-image step, then I2V on its output. The T2I model is
  a diffusers ``StableDiffusionPipeline`` loaded from ``t2i_path`` (a local SD folder), or — with none
  given — the checkpoint's own spatial UNet run as an image model: a ``UNet2DConditionModel`` that
  *shares* the video model's spatial parameters (no copy) but has diffusers' plain attention processors,
  so the adapter branch of Eq. 2 is absent and the spatial layers compute exactly Eq. 1, as the
  pretrained T2I model does. It runs inside a diffusers ``StableDiffusionPipeline`` with the checkpoint's
  VAE, the CLIP text tokens of :class:`~fdreamer.encoders.FrozenEncoders` (passed as prompt embeddings)
  and the checkpoint's noise schedule; its latent is decoded by the same frozen VAE.
- **Direct T2V** (``factorized=False``, Table 4 (b)): the video model samples from text alone (no T2I
  step; an image request is rejected).

Sizes: I2V needs ``height``/``width`` divisible by the VAE's downsampling factor (the video UNet
itself takes any latent size: diffusers' ``forward_upsample_size``); T2V additionally needs the SD
pipeline's multiple of 8. :attr:`VideoPipeline.limits` reports both.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fdreamer.data.batching import pad_tokens
from fdreamer.encoders import DTYPES, EncoderConfig, FrozenEncoders
from fdreamer.models.conditions import Conditions, null_conditions
from fdreamer.inference.request import (DEFAULT_GUIDANCE_SCALE, DEFAULT_IMAGE_GUIDANCE_SCALE, DEFAULT_STEPS,
                                        MAX_SEED, SAMPLERS, VideoRequest, VideoResult, save_video)
from fdreamer.inference.sampling import GenerationCancelled, StepCallback, denoise, notify
from fdreamer.schedule import NoiseSchedule, ScheduleConfig

DEFAULT_FPS = 8.0
T2I_SIZE_MULTIPLE = 8  # StableDiffusionPipeline.check_inputs
PHASES = ("t2i", "i2v")  # callback phases; "i2v" is the video phase, also for the direct T2V model
_DEFAULT_KEYS = ("num_frames", "size", "height", "width", "fps")
_LIMIT_KEYS = ("max_num_frames", "max_height", "max_width", "max_num_inference_steps")


def defaults_from_meta(meta: dict[str, Any], schedule: ScheduleConfig) -> dict[str, Any]:
    """``num_frames``/``height``/``width``/``fps`` from checkpoint meta (keys ``num_frames``, ``size`` as
    an int or ``[h, w]``, ``fps``), falling back to the schedule config's clip and :data:`DEFAULT_FPS`."""
    out: dict[str, Any] = {"num_frames": schedule.num_frames, "height": schedule.height, "width": schedule.width,
                           "fps": DEFAULT_FPS}
    return _merge_defaults(out, {k: meta[k] for k in _DEFAULT_KEYS if meta.get(k) is not None})


def _merge_defaults(base: dict[str, Any], given: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(base)
    given = dict(given or {})
    unknown = sorted(set(given) - set(_DEFAULT_KEYS))
    if unknown:
        raise ValueError(f"defaults: unknown key(s) {unknown}; accepted: {list(_DEFAULT_KEYS)}")
    if "size" in given:
        size = given.pop("size")
        h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
        out["height"], out["width"] = int(h), int(w)
    out.update(given)
    for k in ("num_frames", "height", "width"):
        out[k] = int(out[k])
        if out[k] < 1:
            raise ValueError(f"defaults: {k} must be >= 1, got {out[k]}")
    out["fps"] = float(out["fps"])
    if not (math.isfinite(out["fps"]) and out["fps"] > 0):
        raise ValueError(f"defaults: fps must be > 0, got {out['fps']}")
    return out


@dataclass
class _Plan:
    """A request with every default resolved and checked against the pipeline's limits."""

    num_frames: int
    height: int
    width: int
    fps: float
    seed: int


class VideoPipeline:
    """Image-to-video and text-to-video with a Factorized-Dreamer checkpoint (see the module docstring).

    ``model`` is a :class:`~fdreamer.models.FactorizedDreamerUNet` (eval mode), ``schedule_cfg`` the
    :class:`~fdreamer.schedule.ScheduleConfig` it was trained under, ``encoders`` the frozen encoders,
    ``defaults`` overrides ``num_frames``/``size``/``height``/``width``/``fps``, ``t2i`` an optional
    diffusers ``StableDiffusionPipeline`` for the T2I step, ``limits`` overrides :attr:`limits` entries.
    Calls do not modify the pipeline (a fresh scheduler per call), so threads may share one.
    """

    def __init__(self, model, schedule_cfg: ScheduleConfig, encoders: FrozenEncoders, *,
                 defaults: dict | None = None, t2i=None, limits: dict | None = None) -> None:
        self.model = model
        self.schedule_cfg = schedule_cfg
        self.schedule = NoiseSchedule(schedule_cfg)
        self.encoders = encoders
        self.t2i = t2i
        self._defaults = _merge_defaults(defaults_from_meta({}, schedule_cfg), defaults)
        d = self._defaults
        self._limits = {"max_num_frames": 4 * d["num_frames"], "max_height": 2 * d["height"],
                        "max_width": 2 * d["width"], "max_num_inference_steps": schedule_cfg.num_train_timesteps}
        unknown = sorted(set(limits or {}) - set(_LIMIT_KEYS))
        if unknown:
            raise ValueError(f"limits: unknown key(s) {unknown}; accepted: {list(_LIMIT_KEYS)}")
        self._limits.update({k: int(v) for k, v in (limits or {}).items()})
        self._unet2d = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        t2i_path: str | None = None, use_ema: bool = True) -> VideoPipeline:
        """Load a checkpoint folder (:mod:`fdreamer.checkpoint`); encoders run on ``device`` too, in
        ``dtype`` when given. ``t2i_path``: a local diffusers Stable Diffusion folder for the T2I step."""
        from fdreamer.checkpoint import load_model

        loaded = load_model(path, use_ema=use_ema, device=device, dtype=dtype)
        enc_cfg: EncoderConfig = replace(loaded.encoders, device=str(device))
        if dtype is not None:
            enc_cfg = replace(enc_cfg, dtype={v: k for k, v in DTYPES.items()}[dtype])
        t2i = None
        if t2i_path is not None:
            from diffusers import StableDiffusionPipeline

            kwargs = {"torch_dtype": dtype} if dtype is not None else {}
            t2i = StableDiffusionPipeline.from_pretrained(t2i_path, local_files_only=True, safety_checker=None,
                                                          requires_safety_checker=False, **kwargs).to(device)
            t2i.set_progress_bar_config(disable=True)
        return cls(loaded.model, loaded.schedule, FrozenEncoders(enc_cfg),
                   defaults=defaults_from_meta(loaded.meta, loaded.schedule), t2i=t2i)

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def supports_image(self) -> bool:
        """Whether the model takes an image (factorized); else it is a direct T2V model."""
        return bool(self.model.cfg.factorized)

    @property
    def defaults(self) -> dict[str, Any]:
        """``num_frames``, ``height``, ``width``, ``fps`` used where a request leaves them None."""
        return dict(self._defaults)

    @property
    def limits(self) -> dict[str, Any]:
        """Largest frames/size/steps accepted and the size multiples for I2V and T2V (loads the VAE)."""
        f = int(self.encoders.vae_downsample_factor)
        t2v = math.lcm(f, T2I_SIZE_MULTIPLE) if self.supports_image else f
        return {**self._limits, "min_num_frames": 1, "size_multiple_i2v": f, "size_multiple_t2v": t2v,
                "supports_image": self.supports_image, "samplers": list(SAMPLERS)}

    # ------------------------------------------------------------------ checks

    def check_request(self, request: VideoRequest) -> _Plan:
        """Resolve defaults and check ``request`` against this pipeline (ValueError naming the field)."""
        if not isinstance(request, VideoRequest):
            raise TypeError(f"request must be a VideoRequest, got {type(request).__name__}")
        request.check()
        lim = self.limits
        d = self._defaults
        num_frames = request.num_frames if request.num_frames is not None else d["num_frames"]
        height = request.height if request.height is not None else d["height"]
        width = request.width if request.width is not None else d["width"]
        if request.image is not None and not self.supports_image:
            raise ValueError("`image` is not supported: this checkpoint is a direct text-to-video model "
                             "(factorized=False) without image conditioning; pass image=None")
        if num_frames > lim["max_num_frames"]:
            raise ValueError(f"`num_frames` has to be at most {lim['max_num_frames']} but is {num_frames}.")
        if request.num_inference_steps > lim["max_num_inference_steps"]:
            raise ValueError(f"`num_inference_steps` has to be at most {lim['max_num_inference_steps']} "
                             f"but is {request.num_inference_steps}.")
        multiple = lim["size_multiple_i2v"] if request.image is not None else lim["size_multiple_t2v"]
        for name, value in (("height", height), ("width", width)):
            if value > lim[f"max_{name}"]:
                raise ValueError(f"`{name}` has to be at most {lim[f'max_{name}']} but is {value}.")
            if value % multiple:
                raise ValueError(f"`{name}` has to be divisible by {multiple} but is {value} "
                                 f"({'VAE downsampling' if request.image is not None else 'VAE and T2I UNet'}).")
        seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
        fps = request.fps if request.fps is not None else d["fps"]
        return _Plan(num_frames, height, width, float(fps), int(seed))

    # ------------------------------------------------------------------ generation

    def __call__(self, request: VideoRequest, callback: StepCallback | None = None) -> VideoResult:
        """Generate one video. ``callback(step, total, phase)`` runs after every denoising step of each
        phase ("t2i", then "i2v"); returning False (or raising GenerationCancelled) cancels."""
        plan = self.check_request(request)
        t0 = time.perf_counter()
        timings = {"t2i": 0.0, "i2v": 0.0, "decode": 0.0, "total": 0.0}
        common = {"num_inference_steps": request.num_inference_steps, "seed": plan.seed, "callback": callback}
        image = request.image
        first = None
        if image is None and self.supports_image:
            image = self.text_to_image(request.prompt, negative_prompt=request.negative_prompt, height=plan.height,
                                       width=plan.width, guidance_scale=request.guidance_scale,
                                       guidance_rescale=request.guidance_rescale, sampler=request.sampler, **common)
            timings["t2i"] = time.perf_counter() - t0
        if image is not None:
            first = self.prepare_image(image, plan.height, plan.width)
        t1 = time.perf_counter()
        latents = self.video_latents(first, request.prompt, negative_prompt=request.negative_prompt,
                                     motion_prompt=request.motion_prompt,
                                     num_frames=plan.num_frames, height=plan.height, width=plan.width,
                                     guidance_scale=request.guidance_scale,
                                     image_guidance_scale=request.image_guidance_scale,
                                     guidance_rescale=request.guidance_rescale, sampler=request.sampler, **common)
        t2 = time.perf_counter()
        frames = self.encoders.decode_latents(latents)[0].numpy()  # [T, H, W, 3] uint8
        t3 = time.perf_counter()
        timings.update(i2v=t2 - t1, decode=t3 - t2, total=t3 - t0)
        return VideoResult(frames=frames, first_frame=first if first is not None else frames[0].copy(),
                           seed=plan.seed, fps=plan.fps, timings=timings)

    @staticmethod
    def prepare_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
        """uint8 ``[H, W, 3]`` resized (shorter side covers) and centre-cropped to ``height``×``width``."""
        if image.shape[:2] == (height, width):
            return np.ascontiguousarray(image)
        from fdreamer.data.video import resize_center_crop  # PyAV + OpenCV: only when there is something to resize

        return resize_center_crop(np.ascontiguousarray(image)[None], (height, width))[0]

    def _scheduler(self, sampler: str, **kwargs: Any):
        sched = self.schedule.make_scheduler(sampler, **kwargs)
        if sched.config.prediction_type != self.schedule_cfg.prediction_type:  # make_scheduler passes it on
            raise RuntimeError(f"scheduler predicts {sched.config.prediction_type}, the model "
                               f"{self.schedule_cfg.prediction_type}")
        return sched

    def text_to_image(self, prompt: str, *, negative_prompt: str = "", height: int, width: int,
                      num_inference_steps: int, guidance_scale: float, seed: int,
                      guidance_rescale: float = 0.0, sampler: str = "ddim",
                      callback: StepCallback | None = None) -> np.ndarray:
        """The T2I step: uint8 ``[height, width, 3]`` (see the module docstring for which model)."""
        from diffusers import (
            DDIMScheduler,
            EulerDiscreteScheduler,
            StableDiffusionPipeline,
        )

        generator = torch.Generator("cpu").manual_seed(int(seed))
        if self.t2i is not None:
            cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[sampler]
            components = {**self.t2i.components, "scheduler": cls.from_config(self.t2i.scheduler.config)}
            pipe = type(self.t2i)(**components, requires_safety_checker=False)  # a copy: calls never mutate self.t2i
            prompt_kwargs: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative_prompt}
            output_type = "np"
        else:
            if self._unet2d is None:
                self._unet2d = self.model.image_unet()
            enc = self.encoders
            pipe = StableDiffusionPipeline(vae=enc.vae, text_encoder=enc.text_encoder, tokenizer=enc.tokenizer,
                                           unet=self._unet2d, safety_checker=None,
                                           # steps_offset only silences SD's config rewrite (trailing spacing ignores it)
                                           scheduler=self._scheduler(sampler, steps_offset=1),
                                           feature_extractor=None, requires_safety_checker=False)
            dtype = self.model.dtype
            tokens = enc.encode_clip_text_tokens([prompt, negative_prompt]).to(self.device, dtype)
            prompt_kwargs = {"prompt_embeds": tokens[:1], "negative_prompt_embeds": tokens[1:]}
            output_type = "latent"
        pipe.set_progress_bar_config(disable=True)

        def on_step_end(p, i, t, kwargs):
            notify(callback, i + 1, p.num_timesteps, "t2i")
            return kwargs

        out = pipe(**prompt_kwargs, height=height, width=width, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, generator=generator,
                   output_type=output_type, callback_on_step_end=on_step_end).images
        if output_type == "latent":  # [1, C, h, w] scaled latents of the checkpoint's VAE
            return self.encoders.decode_latents(out[:, :, None].float())[0, 0].numpy()
        return (np.clip(out[0], 0.0, 1.0) * 255.0).round().astype(np.uint8)

    @torch.no_grad()
    def encode_conditions(self, image: np.ndarray | None, prompt: str, negative_prompt: str = "",
                          motion_prompt: str | None = None) -> tuple[Conditions, Conditions]:
        """(conditions, null conditions) of batch 1 for the video model; ``image`` already at the
        output size (:meth:`prepare_image`) or None for the direct T2V model. T5 reads ``motion_prompt``
        when given (:class:`VideoRequest`), else ``prompt``."""
        enc, cfg = self.encoders, self.model.cfg
        dev, dtype = self.device, self.model.dtype
        clip = enc.encode_clip_text_tokens([prompt, negative_prompt]).to(dev, dtype)
        t5 = t5_mask = t5_null = t5_null_mask = None
        if cfg.temporal_text_encoder == "t5":
            a, b = enc.encode_t5_unpadded([motion_prompt or prompt, negative_prompt])
            tokens, masks = pad_tokens([a.to(dev, dtype), b.to(dev, dtype)])  # [2, L, D], [2, L]
            t5, t5_null, t5_mask, t5_null_mask = tokens[:1], tokens[1:], masks[:1], masks[1:]
        image_embed = first_latent = None
        if cfg.factorized:
            if image is None:
                raise ValueError("`image` is required: the model is factorized (text-to-video runs text_to_image first)")
            image_embed = enc.encode_clip_image(image[None]).to(dev, dtype)  # [1, P], as the training data
            first_latent = enc.encode_video(image[None, None])[:, :, 0].to(dev, dtype)  # [1, C, h, w]
        elif image is not None:
            raise ValueError("`image` is not supported by a direct text-to-video model (factorized=False)")
        cond = Conditions(clip[:1], image_embed, first_latent, t5, t5_mask)
        null = null_conditions(cond, clip[1:], t5_null, t5_null_mask)
        return cond, null

    def video_latents(self, image: np.ndarray | None, prompt: str, *, negative_prompt: str = "",
                      motion_prompt: str | None = None, num_frames: int,
                      height: int, width: int, num_inference_steps: int, guidance_scale: float,
                      image_guidance_scale: float = DEFAULT_IMAGE_GUIDANCE_SCALE, guidance_rescale: float = 0.0, sampler: str = "ddim",
                      seed: int, callback: StepCallback | None = None) -> torch.Tensor:
        """Sample the video latents ``[1, C, T, h, w]`` (float32) conditioned on ``image`` (already
        ``height``×``width``; None for the direct T2V model)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"`sampler` has to be one of {list(SAMPLERS)} but is {sampler!r}.")
        cond, null = self.encode_conditions(image, prompt, negative_prompt, motion_prompt)
        f = self.encoders.vae_downsample_factor
        shape = (1, self.model.unet.config.in_channels, num_frames, height // f, width // f)
        return denoise(self.model, self._scheduler(sampler), shape, cond, null,
                       num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                       image_guidance_scale=image_guidance_scale, guidance_rescale=guidance_rescale,
                       generator=torch.Generator("cpu").manual_seed(int(seed)), device=self.device,
                       callback=callback, phase="i2v")

    def image_to_video(self, image: np.ndarray, prompt: str, *, negative_prompt: str = "",
                       num_frames: int | None = None, height: int | None = None, width: int | None = None,
                       num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE_SCALE, image_guidance_scale: float = DEFAULT_IMAGE_GUIDANCE_SCALE,
                       guidance_rescale: float = 0.0, sampler: str = "ddim", seed: int | None = None,
                       callback: StepCallback | None = None) -> np.ndarray:
        """uint8 frames ``[T, H, W, 3]`` animating ``image`` (validated like a :class:`VideoRequest`)."""
        request = VideoRequest(prompt=prompt, image=image, negative_prompt=negative_prompt, num_frames=num_frames,
                               height=height, width=width, num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale,
                               guidance_rescale=guidance_rescale, sampler=sampler, seed=seed)
        return self(request, callback).frames


__all__ = ["MAX_SEED", "PHASES", "GenerationCancelled", "VideoPipeline", "VideoRequest", "VideoResult",
           "defaults_from_meta", "save_video"]
