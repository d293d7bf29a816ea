"""Fréchet distance between two sets of video features (FVD-style), with pluggable extractors.

For Gaussians N(mu1, S1) and N(mu2, S2) the Fréchet (2-Wasserstein) distance squared is

    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).

``tr((S1 S2)^{1/2})`` is computed either with ``scipy.linalg.sqrtm`` (``method="scipy"``, as the
common FID/FVD code does, with its eps-offset retry) or, numerically stably and without scipy, as
``sum_i sqrt(lambda_i)`` over the eigenvalues of the symmetric PSD matrix ``S1^{1/2} S2 S1^{1/2}``
(``method="eigh"``; same spectrum as ``S1 S2``). ``method="auto"`` uses scipy when importable.

Feature extractors follow :class:`VideoFeatureExtractor` (videos -> ``[N, D]``):
:class:`I3DFeatureExtractor` (a local I3D TorchScript file, the FVD network) and
:class:`PixelFlowFeatures` (weight-free, for CI).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np
import torch

from fdreamer.eval.metrics._validate import check_videos
from fdreamer.eval.metrics.motion import dis_flow

METHODS = ("auto", "scipy", "eigh")


@runtime_checkable
class VideoFeatureExtractor(Protocol):
    """Callable mapping a batch of uint8 ``[T, H, W, 3]`` videos to float features ``[N, D]``."""

    def __call__(self, videos: Sequence[np.ndarray]) -> np.ndarray: ...


def _check_stats(mu: np.ndarray, sigma: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1:
        raise ValueError(f"mu{what} must be a vector [D], got shape {list(mu.shape)}")
    if sigma.shape != (mu.size, mu.size):
        raise ValueError(f"sigma{what} must be [D, D] = {[mu.size, mu.size]}, got {list(sigma.shape)}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"mu{what}/sigma{what} contain non-finite values")
    if not np.allclose(sigma, sigma.T, rtol=1e-5, atol=1e-8 * max(1.0, float(np.abs(sigma).max()))):
        raise ValueError(f"sigma{what} is not symmetric")
    return mu, (sigma + sigma.T) / 2.0


def _sym_sqrt(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix by eigen-decomposition (negative round-off clipped to 0)."""
    vals, vecs = np.linalg.eigh(a)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def _trace_sqrt_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    r = _sym_sqrt(s1)
    m = r @ s2 @ r
    vals = np.linalg.eigvalsh((m + m.T) / 2.0)
    return float(np.sqrt(np.clip(vals, 0.0, None)).sum())


def _trace_sqrt_scipy(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product: offset the diagonals (pytorch-fid recipe)
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(covmean.imag).max()
        if imag > 1e-3 * max(1.0, float(np.abs(covmean.real).max())):
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has a large imaginary part ({imag:.3g}); use method='eigh'")
        covmean = covmean.real
    return float(np.trace(covmean))


def _scipy_available() -> bool:
    try:
        import scipy.linalg  # noqa: F401
    except ImportError:
        return False
    return True


def frechet_distance_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *, method: str = "auto",
    eps: float = 1e-6,
) -> float:
    """Fréchet distance (squared, as FID/FVD report it) between N(mu1, sigma1) and N(mu2, sigma2):
    ``||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})``; clipped at 0.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    mu1, s1 = _check_stats(mu1, sigma1, "1")
    mu2, s2 = _check_stats(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dims differ: mu1 has {mu1.size}, mu2 has {mu2.size}")
    if method == "auto":
        method = "scipy" if _scipy_available() else "eigh"
    tr_covmean = _trace_sqrt_scipy(s1, s2, eps) if method == "scipy" else _trace_sqrt_eigh(s1, s2)
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of features ``[N >= 2, D]``."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {list(f.shape)}")
    if f.shape[0] < 2:
        raise ValueError(f"features need at least 2 rows for a covariance, got {f.shape[0]}")
    if not np.isfinite(f).all():
        raise ValueError("features contain non-finite values")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(features1: np.ndarray, features2: np.ndarray, *, method: str = "auto") -> float:
    """Fréchet distance between the Gaussian fits (:func:`feature_stats`) of two feature sets ``[N_i, D]``."""
    mu1, s1 = feature_stats(features1)
    mu2, s2 = feature_stats(features2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dims differ: {mu1.size} vs {mu2.size}")
    return frechet_distance_from_stats(mu1, s1, mu2, s2, method=method)


def video_frechet_distance(
    videos1: Sequence[np.ndarray], videos2: Sequence[np.ndarray], extractor: VideoFeatureExtractor, *,
    method: str = "auto",
) -> float:
    """Fréchet distance between two video sets in ``extractor``'s feature space (FVD with I3D)."""
    f1, f2 = np.asarray(extractor(videos1)), np.asarray(extractor(videos2))
    return frechet_distance(f1, f2, method=method)


class I3DFeatureExtractor:
    """FVD features from a local I3D TorchScript file (e.g. ``i3d_torchscript.pt`` of StyleGAN-V /
    fvd-comparison), loaded with ``torch.jit.load``; nothing is downloaded.

    Input convention of the common FVD code: each video is resized to 224x224 (bilinear, per
    frame; no crop), scaled to [-1, 1] (``x / 127.5 - 1``) and laid out ``[N, 3, T, 224, 224]``;
    the network is called as ``model(x, rescale=False, resize=False, return_features=True)`` and
    returns the 400-d pre-logit features ``[N, 400]``. All videos in one call need the same T
    (the usual protocol uses 16 frames).
    """

    def __init__(self, path: str | Path, *, device: str = "cpu", batch_size: int = 8, size: int = 224) -> None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"I3D TorchScript file {p} does not exist (no download is attempted)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = torch.jit.load(str(p), map_location=self.device).eval()
        self.batch_size, self.size = batch_size, size

    def preprocess(self, videos: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 videos -> float32 ``[N, 3, T, size, size]`` in [-1, 1]."""
        items = check_videos(videos)
        lengths = {v.shape[0] for v in items}
        if len(lengths) != 1:
            raise ValueError(f"all videos must have the same number of frames for I3D, got {sorted(lengths)}")
        out = [np.stack([cv2.resize(f, (self.size, self.size), interpolation=cv2.INTER_LINEAR) for f in v])
               for v in items]
        x = torch.from_numpy(np.stack(out)).float() / 127.5 - 1.0  # [N, T, S, S, 3]
        return x.permute(0, 4, 1, 2, 3).contiguous()

    @torch.no_grad()
    def __call__(self, videos: Sequence[np.ndarray]) -> np.ndarray:
        x = self.preprocess(videos)
        feats = [self.model(chunk.to(self.device), rescale=False, resize=False, return_features=True)
                 for chunk in x.split(self.batch_size)]
        return torch.cat(feats).float().cpu().numpy()


class PixelFlowFeatures:
    """Cheap weight-free video features for CI (74-d, independent of T, H, W):

    - per-frame RGB downsampled to ``grid x grid`` (area), averaged over time (``3 grid^2`` = 48);
    - mean absolute temporal difference of the downsampled grayscale (``grid^2`` = 16);
    - DIS flow: mean magnitude, magnitude std (pixels/frame divided by the short side x 100), and
      an 8-bin magnitude-weighted histogram of flow directions (normalised to sum 1) = 10.

    Intensities are in [0, 1]. Not a perceptual feature: use it to compare sets from the same data
    and resolution, never as a substitute for FVD numbers.
    """

    def __init__(self, grid: int = 4) -> None:
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        self.grid = grid

    @property
    def dim(self) -> int:
        return 4 * self.grid * self.grid + 10

    def features(self, video: np.ndarray) -> np.ndarray:
        g = self.grid
        small = np.stack([cv2.resize(f, (g, g), interpolation=cv2.INTER_AREA) for f in video]).astype(np.float64) / 255.0
        mean_rgb = small.mean(axis=0).ravel()  # [3 g^2]
        gray = small.mean(axis=-1)  # [T, g, g]
        tdiff = np.abs(np.diff(gray, axis=0)).mean(axis=0).ravel() if len(video) > 1 else np.zeros(g * g)
        if len(video) > 1 and min(video.shape[1:3]) >= 8:
            flow = dis_flow(video).reshape(-1, 2).astype(np.float64)
            mag = np.hypot(flow[:, 0], flow[:, 1])
            scale = 100.0 / min(video.shape[1:3])
            ang = np.arctan2(flow[:, 1], flow[:, 0])
            hist = np.bincount(((ang + np.pi) / (2 * np.pi) * 8).astype(int) % 8, weights=mag, minlength=8)
            hist = hist / hist.sum() if hist.sum() > 0 else np.full(8, 1 / 8)
            flow_f = np.concatenate([[mag.mean() * scale, mag.std() * scale], hist])
        else:
            flow_f = np.concatenate([[0.0, 0.0], np.full(8, 1 / 8)])
        return np.concatenate([mean_rgb, tdiff, flow_f])

    def __call__(self, videos: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack([self.features(v) for v in check_videos(videos)])
