"""fdreamer.eval.metrics: hand-computed values for FC/PC, Fréchet distance, flow metrics and direction accuracy."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from fdreamer.encoders import EncoderConfig, FrozenEncoders
from fdreamer.eval.metrics import (
    UNKNOWN,
    ClipCallables,
    I3DFeatureExtractor,
    PixelFlowFeatures,
    classify_motion,
    clip_scores,
    direction_accuracy,
    subject_colour,
    dis_flow,
    feature_stats,
    frame_consistency,
    frechet_distance,
    frechet_distance_from_stats,
    mean_flow_magnitude,
    motion_metrics,
    prompt_consistency,
    video_frechet_distance,
    warping_error,
)
from fdreamer.toy.scenes import COLORS, MOTIONS, make_specs, render_clip

# ------------------------------------------------------------------------------------ helpers


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random RGB texture, uint8 [h, w, 3] (blurred noise: trackable by optical flow)."""
    rng = np.random.default_rng(seed)
    noise = rng.uniform(0, 255, size=(h, w, 3)).astype(np.float32)
    img = cv2.GaussianBlur(noise, (0, 0), 1.5)
    img = (img - img.min()) / (img.max() - img.min()) * 255
    return img.astype(np.uint8)


def _shifted_video(shift: int, frames: int = 4, size: int = 64) -> np.ndarray:
    """Crops of one texture whose content moves ``shift`` px to the right per frame."""
    big = _texture(size, size + shift * frames + 8)
    start = shift * frames + 4
    return np.stack([big[:, start - shift * t: start - shift * t + size] for t in range(frames)])


def _shape_video(kind: str, motion: str, t: int = 12, h: int = 64, w: int = 80) -> np.ndarray:
    """A red square/circle on plain grey doing ``motion`` (hand-made, no sample-data code)."""
    frames = []
    for i in range(t):
        img = np.full((h, w, 3), 128, np.uint8)
        x, y, r = 40.0, 32.0, 8.0
        if motion == "left":
            x -= 2 * i
        elif motion == "right":
            x += 2 * i
        elif motion == "up":
            y -= 1.5 * i
        elif motion == "down":
            y += 1.5 * i
        elif motion == "grow":
            r *= 1.08**i
        elif motion == "shrink":
            r *= 1.08 ** (t - 1 - i)
        angle = 8.0 * i if motion == "rotate" else 0.0
        if kind == "circle":
            cv2.circle(img, (round(x * 16), round(y * 16)), round(r * 16), COLORS["red"],
                       -1, cv2.LINE_AA, shift=4)
        else:
            box = cv2.boxPoints(((x, y), (r * math.sqrt(2), r * math.sqrt(2)), angle))
            cv2.fillPoly(img, [np.round(box * 16).astype(np.int32)], COLORS["red"], cv2.LINE_AA, shift=4)
        frames.append(img)
    return np.stack(frames)


# ------------------------------------------------------------------------------------ FC / PC


@pytest.fixture(scope="module")
def tiny_clip(tiny_dir) -> FrozenEncoders:
    return FrozenEncoders.load(EncoderConfig(clip=str(tiny_dir / "clip")), ["clip"])


def test_fc_identical_frames_is_one_with_tiny_clip(tiny_clip: FrozenEncoders) -> None:
    frame = _texture(40, 48)
    video = np.stack([frame] * 5)
    assert frame_consistency(video, tiny_clip) == pytest.approx(1.0, abs=1e-6)
    assert frame_consistency(video, tiny_clip, pair_mode="all", batch_size=2) == pytest.approx(1.0, abs=1e-6)
    # PC of identical frames is the cosine of that one frame with the prompt, computed by hand.
    img = tiny_clip.encode_clip_image(frame[None]).double()[0]
    txt = tiny_clip.encode_clip_text_embeds(["a red square moves left"]).double()[0]
    expected = float(img @ txt / (img.norm() * txt.norm()))
    assert prompt_consistency(video, "a red square moves left", tiny_clip) == pytest.approx(expected, abs=1e-6)
    scores = clip_scores(video, "a red square moves left", tiny_clip)
    assert scores["fc"] == pytest.approx(1.0, abs=1e-6) and scores["pc"] == pytest.approx(expected, abs=1e-6)
    # Different frames: FC < 1 and a valid cosine.
    varied = np.stack([_texture(40, 48, seed=s) for s in range(4)])
    assert -1.0 <= frame_consistency(varied, tiny_clip) < 1.0 - 1e-6


def _toy_encoder() -> ClipCallables:
    """Frame filled with value k -> embedding E[k]; text -> [1, 0]; 3 frames: [1,0], [0,1], [1,1]."""
    table = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    calls: list[int] = []

    def image_fn(images: np.ndarray) -> torch.Tensor:
        calls.append(len(images))
        return torch.tensor(table[images[:, 0, 0, 0].astype(int)])

    enc = ClipCallables(image_fn, lambda texts: np.array([[5.0, 0.0]] * len(texts)))
    enc.calls = calls  # type: ignore[attr-defined]
    return enc


def test_fc_pc_hand_computed_with_toy_encoder() -> None:
    video = np.stack([np.full((4, 4, 3), k, np.uint8) for k in range(3)])
    enc = _toy_encoder()
    s = 1 / math.sqrt(2)
    assert frame_consistency(video, enc, batch_size=2) == pytest.approx((0 + s) / 2, abs=1e-12)
    assert enc.calls == [2, 1]  # batched over frames
    assert frame_consistency(video, enc, pair_mode="all") == pytest.approx((0 + s + s) / 3, abs=1e-12)
    assert prompt_consistency(video, "x", enc) == pytest.approx((1 + 0 + s) / 3, abs=1e-12)


def test_clip_metrics_validate_inputs() -> None:
    enc = _toy_encoder()
    good = np.zeros((3, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="pair_mode must be one of"):
        frame_consistency(good, enc, pair_mode="pairs")
    with pytest.raises(ValueError, match="at least 2 frame"):
        frame_consistency(good[:1], enc)
    with pytest.raises(ValueError, match="must be uint8"):
        frame_consistency(good.astype(np.float32), enc)
    with pytest.raises(ValueError, match=r"shape \[T, H, W, 3\]"):
        frame_consistency(good[..., :2], enc)
    with pytest.raises(ValueError, match="prompt is empty"):
        prompt_consistency(good, "  ", enc)
    with pytest.raises(ValueError, match="no text_fn"):
        prompt_consistency(good, "x", ClipCallables(enc.image_fn))
    with pytest.raises(TypeError, match="lacks encode_clip_image"):
        frame_consistency(good, object())  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ Fréchet


@pytest.mark.parametrize("method", ["eigh", "scipy"])
def test_frechet_exact_formula(method: str) -> None:
    if method == "scipy":
        pytest.importorskip("scipy")
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    # ||mu1-mu2||^2 = 5; sum(s1 + s2 - 2 sqrt(s1 s2)) = (1+4-4) + (4+1-4) + (9+1-6) = 6.
    assert frechet_distance_from_stats(mu1, np.diag(s1), mu2, np.diag(s2), method=method) == pytest.approx(11.0)
    # Same Gaussian -> 0; rotating both covariances by the same orthogonal Q leaves the distance.
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    c1, c2 = q @ np.diag(s1) @ q.T, q @ np.diag(s2) @ q.T
    assert frechet_distance_from_stats(q @ mu1, c1, q @ mu2, c2, method=method) == pytest.approx(11.0, rel=1e-6)
    assert frechet_distance_from_stats(mu1, c1, mu1, c1, method=method) == pytest.approx(0.0, abs=1e-6)
    # Non-commuting full covariances: both methods agree.
    a = np.random.default_rng(1).normal(size=(5, 5))
    b = np.random.default_rng(2).normal(size=(5, 5))
    ref = frechet_distance_from_stats(np.zeros(5), a @ a.T, np.ones(5), b @ b.T, method="eigh")
    assert frechet_distance_from_stats(np.zeros(5), a @ a.T, np.ones(5), b @ b.T, method=method) == pytest.approx(ref, rel=1e-6)


def test_frechet_from_large_gaussian_samples() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = np.array([0.0, 0.0, 1.0, -1.0]), np.array([1.0, 0.5, 1.0, 0.0])
    v1, v2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([2.0, 2.0, 1.0, 0.25])
    x1 = rng.normal(mu1, np.sqrt(v1), size=(40000, 4))
    x2 = rng.normal(mu2, np.sqrt(v2), size=(40000, 4))
    analytic = float(np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2)))  # 2.25 + 0.479...
    assert frechet_distance(x1, x2) == pytest.approx(analytic, abs=0.05)
    assert frechet_distance(x1[:20000], x1[20000:]) < 0.01
    mu, cov = feature_stats(x1)
    assert np.allclose(mu, mu1, atol=0.03) and np.allclose(np.diag(cov), v1, rtol=0.05)


def test_frechet_validates() -> None:
    with pytest.raises(ValueError, match="at least 2 rows"):
        frechet_distance(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="feature dims differ"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance_from_stats(np.zeros(2), np.array([[1.0, 1.0], [0.0, 1.0]]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="method must be one of"):
        frechet_distance_from_stats(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")


class _FakeI3D(torch.nn.Module):
    """Records the I3D calling convention; features = per-channel mean and min/max of the input."""

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True,
                return_features: bool = False) -> torch.Tensor:
        assert not rescale and not resize and return_features
        return torch.cat([x.mean(dim=(2, 3, 4)), x.amin(dim=(1, 2, 3, 4))[:, None],
                          x.amax(dim=(1, 2, 3, 4))[:, None], torch.full_like(x[:, :1, 0, 0, 0], x.shape[3])], 1)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_i3d_loader_convention(tmp_path) -> None:
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(_FakeI3D()).save(str(path))
    ext = I3DFeatureExtractor(path, batch_size=2)
    videos = [np.zeros((4, 30, 40, 3), np.uint8), np.full((4, 30, 40, 3), 255, np.uint8), np.full((4, 30, 40, 3), 51, np.uint8)]
    x = ext.preprocess(videos)
    assert list(x.shape) == [3, 3, 4, 224, 224]
    feats = ext(videos)
    assert feats.shape == (3, 6)
    assert np.allclose(feats[0, :5], -1) and np.allclose(feats[1, :5], 1) and np.allclose(feats[2, :3], 51 / 127.5 - 1)
    assert np.allclose(feats[:, 5], 224)
    with pytest.raises(FileNotFoundError, match="no download"):
        I3DFeatureExtractor(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="same number of frames"):
        ext.preprocess([videos[0], videos[1][:3]])


def test_pixel_flow_features_separate_static_from_moving() -> None:
    ext = PixelFlowFeatures()
    static = [np.stack([_texture(32, 32, seed=s)] * 3) for s in range(5)]
    moving = [_shifted_video(2, frames=3, size=32) for _ in range(5)]
    f = ext(static)
    assert f.shape == (5, ext.dim) == (5, 74)
    assert np.allclose(f[:, 64:66], 0, atol=0.05)  # no flow in static clips
    assert video_frechet_distance(static, moving, ext, method="eigh") > video_frechet_distance(
        static[:3], static[2:], ext, method="eigh")
    with pytest.raises(ValueError, match="videos is empty"):
        ext([])


# ------------------------------------------------------------------------------------ motion


def test_identical_frames_have_no_motion() -> None:
    video = np.stack([_texture(48, 64)] * 4)
    assert mean_flow_magnitude(video) == pytest.approx(0.0, abs=1e-3)
    assert warping_error(video) == pytest.approx(0.0, abs=1e-4)


def test_known_shift_gives_known_flow() -> None:
    video = _shifted_video(3)
    flow = dis_flow(video)  # [T-1, H, W, 2]
    inner = flow[:, 8:-8, 8:-8]
    assert np.median(inner[..., 0]) == pytest.approx(3.0, abs=0.1)
    assert np.median(inner[..., 1]) == pytest.approx(0.0, abs=0.1)
    m = motion_metrics(video)
    assert m["flow_magnitude"] == pytest.approx(3.0, abs=0.3)
    assert m["warping_error"] < 0.02  # the flow explains the frames


def test_noise_frames_have_large_warping_error() -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(4, 48, 64, 3), dtype=np.uint8)
    err = warping_error(noise)
    assert err > 0.15  # independent uniform frames: E|U - V| = 1/3 before the flow's best effort
    assert warping_error(noise, mask_out_of_frame=False) > 0.15
    assert warping_error(_shifted_video(3)) < err / 5
    with pytest.raises(ValueError, match="at least 2 frame"):
        warping_error(noise[:1])


# ------------------------------------------------------------------------------------ direction


@pytest.mark.parametrize("motion", ["left", "right", "up", "down", "grow", "shrink", "rotate", "still"])
def test_hand_made_square(motion: str) -> None:
    video = _shape_video("square", motion)
    label, details = classify_motion(video, "red")
    assert label == motion, details
    if motion == "left":  # 11 frames x 2 px = 22 px of an 80 px frame
        assert details["dx_frac"] == pytest.approx(-22 / 80, abs=0.01)
        assert abs(details["dy_frac"]) < 0.01
    if motion == "grow":  # exact drawn coverage by unmixing the green channel (grey 128 -> red's 30)
        cover = (128.0 - video[..., 1]) / (128 - 30)
        assert np.allclose(details["area"], cover.sum(axis=(1, 2)), rtol=0.05)
        fit = np.polyfit(np.arange(12), np.log(cover.sum(axis=(1, 2))), 1)[0] * 11
        assert details["log_area_ratio"] == pytest.approx(fit, abs=0.05)


def test_classifier_details_and_fallback() -> None:
    video = _shape_video("circle", "left")
    label, details = classify_motion(video, (230, 30, 30))  # RGB triple works too
    assert label == "left" and not details["fallback"] and details["found_frames"] == 12
    assert classify_motion(video, "blue")[0] == "left"  # colour absent -> frame-0 fallback finds the shape
    assert classify_motion(video, "blue")[1]["fallback"]
    blank = np.full((6, 32, 32, 3), 128, np.uint8)
    assert classify_motion(blank, "red")[0] == UNKNOWN
    with pytest.raises(ValueError, match="unknown subject_color"):
        classify_motion(video, "turquoise")
    with pytest.raises(ValueError, match="must match"):
        direction_accuracy([video], ["red", "red"], ["left"])
    with pytest.raises(ValueError, match="unknown motion label"):
        direction_accuracy([video], ["red"], ["sideways"])


@pytest.fixture(scope="module")
def sample_clips() -> list[tuple[np.ndarray, str, str]]:
    specs = make_specs(24, seed=0)  # 3 clips per motion, some with a distractor, some "pexels"-sized
    assert {s.motion for s in specs} == set(MOTIONS)
    return [(render_clip(s), s.shapes[0].color, s.motion) for s in specs]


@pytest.mark.parametrize("size", [None, 64, 32])
def test_direction_accuracy_on_sample_clips(sample_clips, size: int | None) -> None:
    videos = [v if size is None else np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in v])
              for v, _, _ in sample_clips]
    acc = direction_accuracy(videos, [c for _, c, _ in sample_clips], [m for _, _, m in sample_clips])
    assert acc >= 0.95


def test_subject_colour_names_the_subject_and_nothing_in_noise() -> None:
    """The T2V colour check: frame 0 of rendered sample scenes (subject, maybe a smaller distractor of
    another colour, textured background) is named by its subject's colour; noise and flat frames by none."""
    from dataclasses import replace

    specs = make_specs(48, seed=3)
    named = [subject_colour(render_clip(replace(s, num_frames=1))[0]) for s in specs]
    hits = sum(n == s.shapes[0].color for n, s in zip(named, specs, strict=True))
    assert hits >= 46, [(n, s.shapes[0].color) for n, s in zip(named, specs, strict=True) if n != s.shapes[0].color]
    rng = np.random.default_rng(0)
    assert [subject_colour(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(4)] == [None] * 4
    assert subject_colour(np.full((64, 64, 3), 128, np.uint8)) is None
    frame = np.full((64, 64, 3), (128, 128, 128), np.uint8)
    cv2.circle(frame, (30, 30), 10, COLORS["cyan"], -1)
    assert subject_colour(frame) == "cyan"
    cv2.circle(frame, (30, 30), 10, (250, 250, 250), -1)  # a white disc: no named colour within reach
    assert subject_colour(frame) is None
