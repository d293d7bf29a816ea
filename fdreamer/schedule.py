"""The noise schedule of Factorized-Dreamer (paper §3.3) — the single source for training, validation
and sampling.

Index convention: the paper counts timesteps ``t = 1..N``; tensors here (and diffusers) are indexed
``i = t - 1 = 0..N-1``, so ``alphas_cumprod[0]`` is ᾱ_1 and ``alphas_cumprod[-1]`` is ᾱ_N.

Built in this order (Fig. 5 draws the three stages):

1. SD1.x "scaled linear" betas: ``β = linspace(sqrt(0.00085), sqrt(0.012), N)²``, ``ᾱ_t = Π(1 - β)``.
2. Resolution shift, **Eq. 5**: ``SNR'(t) = s²·SNR(t)`` with ``SNR = ᾱ/(1-ᾱ)`` and
   ``s = sqrt(D·D / (T·H·W))``, ``D = 256``, T×H×W the pixel-space clip size; so
   ``ᾱ' = s²ᾱ / (1 - ᾱ + s²ᾱ)`` and log-SNR moves down by exactly ``2·ln s``.
   s = 0.125 for 16×512×512 and sqrt(1/32) for 32×256×256 (the paper's two stages).
3. Zero-terminal-SNR rescale, **Eq. 6**, as Lin et al. (2023) Algorithm 1 define it: on ``sqrt(ᾱ)``,
   subtract the last value and scale so the first value is unchanged:
   ``sqrt(ᾱ'_t) = sqrt(ᾱ_1) · (sqrt(ᾱ_t) - sqrt(ᾱ_N)) / (sqrt(ᾱ_1) - sqrt(ᾱ_N))``.
   The paper prints ``sqrt(ᾱ'_t) = sqrt(ᾱ_t - ᾱ_N) / sqrt(ᾱ_1 - ᾱ_N)``, which would make ᾱ'_1 = 1 —
   no noise at all at the first step (β_1 = 0) — and works on ᾱ rather than sqrt(ᾱ); it is taken to be
   a typesetting slip for [33]'s algorithm, which the text cites, and is not offered.

Shift and rescale switch independently (Table 4: row a = neither, a* = shift only, e = both).

``prediction_type`` is "epsilon" (Eq. 7) or "v_prediction". With ᾱ_N = 0 the input at t = N is pure
noise, so an ε-prediction says nothing about x0 there and ``x0 = (x_t - sqrt(1-ᾱ)ε)/sqrt(ᾱ)`` divides by
zero. Training is unaffected (the ε target is defined). For sampling, :meth:`NoiseSchedule.sampling_betas`
clamps the terminal ᾱ_N to ``2**-24`` (fp16's smallest subnormal, as diffusers' Euler scheduler does)
for ε-prediction with DDIM and for every Euler sampler (whose σ_max = sqrt((1-ᾱ)/ᾱ) must be finite);
DDIM with v-prediction keeps ᾱ_N = 0 exactly, where ``x0 = sqrt(ᾱ)x_t - sqrt(1-ᾱ)v = -v`` is finite.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from fdreamer.config import opt

REFERENCE_SIZE = 256  # D in Eq. 5
TERMINAL_ALPHA_CUMPROD_FOR_SAMPLING = 2.0**-24


@dataclass
class ScheduleConfig:
    num_train_timesteps: int = opt(1000, "N, the number of diffusion steps (SD1.x: 1000)")
    beta_start: float = opt(0.00085, "first beta of the SD1.x scaled-linear schedule")
    beta_end: float = opt(0.012, "last beta of the SD1.x scaled-linear schedule")
    shift: bool = opt(True, "apply the resolution shift of Eq. 5 (SNR' = s^2 SNR)")
    shift_scale: float | None = opt(
        None, "s of Eq. 5; null computes s = sqrt(D*D/(T*H*W)) from num_frames/height/width"
    )
    reference_size: int = opt(REFERENCE_SIZE, "D of Eq. 5, the reference resolution")
    num_frames: int = opt(16, "T of Eq. 5: frames of the training clip (pixel space)")
    height: int = opt(512, "H of Eq. 5: clip height in pixels")
    width: int = opt(512, "W of Eq. 5: clip width in pixels")
    rescale: bool = opt(True, "zero-terminal-SNR rescale of Eq. 6 (Lin et al. 2023, Algorithm 1)")
    prediction_type: Literal["epsilon", "v_prediction"] = opt(
        "epsilon", "what the network predicts: epsilon (Eq. 7) or v_prediction"
    )

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.shift_scale is not None and self.shift_scale <= 0:
            raise ValueError(f"shift_scale must be > 0, got {self.shift_scale}")
        for name in ("num_frames", "height", "width", "reference_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def s(self) -> float:
        """The shift factor actually used (1.0 when shift is off)."""
        if not self.shift:
            return 1.0
        if self.shift_scale is not None:
            return self.shift_scale
        return shift_factor(self.num_frames, self.height, self.width, self.reference_size)


def shift_factor(num_frames: int, height: int, width: int, reference_size: int = REFERENCE_SIZE) -> float:
    """Eq. 5: ``s = sqrt(D·D / (T·H·W))``."""
    return math.sqrt(reference_size * reference_size / (num_frames * height * width))


def sd_scaled_linear_betas(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """SD1.x betas, float64: ``linspace(sqrt(β_start), sqrt(β_end), n)²``."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2


def shift_alphas_cumprod(alphas_cumprod: torch.Tensor, s: float) -> torch.Tensor:
    """Eq. 5 on ᾱ: ``SNR' = s²·SNR`` ⇔ ``ᾱ' = s²ᾱ / (1 - ᾱ + s²ᾱ)``."""
    s2 = s * s
    return s2 * alphas_cumprod / (1.0 - alphas_cumprod + s2 * alphas_cumprod)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Eq. 6 as Lin et al. (2023) Algorithm 1: shift sqrt(ᾱ) so its last value is 0, then scale it
    so its first value is unchanged. Returns ᾱ' with ᾱ'_N = 0 and ᾱ'_1 = ᾱ_1."""
    sqrt_ab = alphas_cumprod.sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    return sqrt_ab**2


def betas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Invert ``ᾱ_t = Π_{k<=t}(1 - β_k)``."""
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


class NoiseSchedule:
    """ᾱ, betas, log-SNR and the forward process for one :class:`ScheduleConfig` (float64 tables)."""

    def __init__(self, cfg: ScheduleConfig | None = None) -> None:
        self.cfg = cfg or ScheduleConfig()
        c = self.cfg
        base = torch.cumprod(1.0 - sd_scaled_linear_betas(c.num_train_timesteps, c.beta_start, c.beta_end), 0)
        ab = shift_alphas_cumprod(base, c.s) if c.shift else base
        if c.rescale:
            ab = rescale_zero_terminal_snr(ab)
        self.alphas_cumprod: torch.Tensor = ab  # [N] float64
        self.betas: torch.Tensor = betas_from_alphas_cumprod(ab)  # [N] float64

    @property
    def num_train_timesteps(self) -> int:
        return self.cfg.num_train_timesteps

    @property
    def prediction_type(self) -> str:
        return self.cfg.prediction_type

    @property
    def snr(self) -> torch.Tensor:
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    @property
    def log_snr(self) -> torch.Tensor:
        """``log(ᾱ/(1-ᾱ))``; ``-inf`` at a zero-terminal step."""
        return torch.log(self.alphas_cumprod) - torch.log1p(-self.alphas_cumprod)

    # ---------------------------------------------------------------- forward process (training)

    def check_timesteps(self, t: torch.Tensor) -> None:
        """TypeError / ValueError unless ``t`` holds integer indices in ``0..N-1``. Reading the values of a
        CUDA tensor is a host sync: check timesteps on the CPU, where they are drawn, before moving them
        (:func:`fdreamer.train.objective.diffusion_objective` does)."""
        if t.dtype.is_floating_point:
            raise TypeError("timesteps must be integer indices 0..N-1")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps):
            raise ValueError(f"timesteps must be in [0, {self.num_train_timesteps - 1}], got {t.tolist()}")

    def _alphas_on(self, device: torch.device) -> torch.Tensor:
        """``alphas_cumprod`` on ``device``, copied there once (not a host-to-device copy per call)."""
        cache = self.__dict__.setdefault("_alphas_by_device", {})
        if device not in cache:
            cache[device] = self.alphas_cumprod.to(device)
        return cache[device]

    def _coefs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if t.dtype.is_floating_point:
            raise TypeError("timesteps must be integer indices 0..N-1")
        if t.device.type == "cpu":  # free here; on an accelerator a value check would sync every call
            self.check_timesteps(t)
        ab = self._alphas_on(like.device)[t.to(like.device)]  # [B]
        shape = (-1,) + (1,) * (like.ndim - 1)  # broadcast over 'b ...'
        a = ab.sqrt().to(like.dtype).reshape(shape)
        sigma = (1.0 - ab).sqrt().to(like.dtype).reshape(shape)
        return a, sigma

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε``."""
        a, sigma = self._coefs(t, x0)
        return a * x0 + sigma * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``v = sqrt(ᾱ_t)·ε - sqrt(1-ᾱ_t)·x0``."""
        a, sigma = self._coefs(t, x0)
        return a * noise - sigma * x0

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network regresses: ε in Eq. 7, or v for v-prediction."""
        if self.prediction_type == "epsilon":
            return noise
        return self.velocity(x0, noise, t)

    def predict_x0(self, x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 from the network output (infinite for ε at ᾱ = 0; see the module docstring)."""
        a, sigma = self._coefs(t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - sigma * model_output) / a
        return a * x_t - sigma * model_output

    # ---------------------------------------------------------------- sampling (diffusers schedulers)

    def sampling_betas(self, sampler: Literal["ddim", "euler"] = "ddim") -> torch.Tensor:
        """Betas to hand a diffusers scheduler (``trained_betas``); the terminal ᾱ is clamped to
        ``2**-24`` where the sampler needs it finite (see the module docstring)."""
        ab = self.alphas_cumprod.clone()
        needs_clamp = sampler == "euler" or self.prediction_type == "epsilon"
        if needs_clamp and ab[-1] < TERMINAL_ALPHA_CUMPROD_FOR_SAMPLING:
            ab[-1] = TERMINAL_ALPHA_CUMPROD_FOR_SAMPLING
        return betas_from_alphas_cumprod(ab)

    def make_scheduler(self, sampler: Literal["ddim", "euler"] = "ddim", **kwargs):
        """A maintained diffusers scheduler on this schedule, with trailing timestep spacing (so the
        first sampling step is t = N, where the training schedule has ᾱ = 0)."""
        from diffusers import DDIMScheduler, EulerDiscreteScheduler

        common = dict(
            num_train_timesteps=self.num_train_timesteps,
            trained_betas=self.sampling_betas(sampler).tolist(),
            prediction_type=self.prediction_type,
            timestep_spacing="trailing",
        )
        common.update(kwargs)
        if sampler == "ddim":
            common.setdefault("clip_sample", False)
            common.setdefault("set_alpha_to_one", True)
            return DDIMScheduler(**common)
        if sampler == "euler":
            return EulerDiscreteScheduler(**common)
        raise ValueError(f"unknown sampler {sampler!r}; expected 'ddim' or 'euler'")


# ----------------------------------------------------------------------------- Fig. 5 and the CLI


def figure5_curves(s: float = 0.125, n: int = 1000) -> dict[str, torch.Tensor]:
    """log-SNR(t) of the three schedules Fig. 5 draws (original, shifted, shifted + rescaled)."""
    variants = {
        "original SD": ScheduleConfig(num_train_timesteps=n, shift=False, rescale=False),
        f"shifted (s={s:g})": ScheduleConfig(num_train_timesteps=n, shift_scale=s, rescale=False),
        f"shifted + rescaled (s={s:g})": ScheduleConfig(num_train_timesteps=n, shift_scale=s, rescale=True),
    }
    return {name: NoiseSchedule(c).log_snr for name, c in variants.items()}


def plot_figure5(out: str | Path, s: float = 0.125) -> Path:
    """Draw Fig. 5 (log SNR vs timestep) to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = figure5_curves(s)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, log_snr in curves.items():
        t = torch.arange(1, len(log_snr) + 1)
        finite = torch.isfinite(log_snr)
        ax.plot(t[finite].numpy(), log_snr[finite].numpy(), label=name)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("log SNR")
    ax.set_title(f"Fig. 5: log SNR vs timestep (s = {s:g})")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def summary(cfg: ScheduleConfig) -> dict:
    sched = NoiseSchedule(cfg)
    ls = sched.log_snr
    return {
        "s": cfg.s,
        "alpha_cumprod_first": float(sched.alphas_cumprod[0]),
        "alpha_cumprod_last": float(sched.alphas_cumprod[-1]),
        "log_snr_first": float(ls[0]),
        "log_snr_second_to_last": float(ls[-2]),
        "log_snr_last": float(ls[-1]),
    }


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plot", metavar="OUT.png", help="draw the three curves of Fig. 5 to this file")
    p.add_argument("--s", type=float, default=0.125, help="shift factor for the plot (paper: 0.125)")
    p.add_argument("--frames", type=int, default=16, help="T for the printed summary")
    p.add_argument("--height", type=int, default=512, help="H for the printed summary")
    p.add_argument("--width", type=int, default=512, help="W for the printed summary")


def _run(args: argparse.Namespace) -> int:
    import json

    cfg = ScheduleConfig(num_frames=args.frames, height=args.height, width=args.width)
    print(json.dumps({"clip": f"{args.frames}x{args.height}x{args.width}", **summary(cfg)}))
    if args.plot:
        print(f"wrote {plot_figure5(args.plot, args.s)}")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("schedule", help="print the noise schedule for a clip size; --plot draws Fig. 5")
    _add_arguments(p)
    p.set_defaults(func=_run)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m fdreamer.schedule", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    raise SystemExit(_run(parser.parse_args()))
