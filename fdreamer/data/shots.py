"""Shot-cut detection, so training clips never straddle a cut.

Web videos (Pexels clips run 10-60 s) are often edits of several shots. Pass 1 cuts each video into
fixed-length clips; a clip that spans a cut shows the scene jump between two frames, which teaches the
temporal layers to teleport content. So pass 1 finds the cuts first and places clips inside single shots.

Detection is PySceneDetect's :class:`~scenedetect.detectors.ContentDetector` (mean HSV difference of
adjacent frames against a threshold, with its flash filter for a minimum shot length), run at pass 1's hash
resolution (:data:`fdreamer.data.dedup.HASH_SIDE` px shorter side): pass 1 already decodes at that size, the
decoder scales (no full-size RGB frame is made), and a hard cut changes most pixels, so 64 px is plenty
(PySceneDetect itself downscales to ~256 px wide by default, for speed).

Memory: :func:`video_cuts` holds every frame of the video at once. A 60 s 30 fps 16:9 video at 64 px is
1800 x 64 x 114 x 3 B = 39.4 MB, about twice that at peak while the decoder's batch is copied out (measured:
+93 MB max RSS for the call, ~0.5 s decode + ~0.3 s detection on one core); a 9:16 video the same, 4:3 less.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from fdreamer.data.dedup import HASH_SIDE
from fdreamer.data.video import VideoInfo, VideoSource, decode_frames

_FILTER_MODES = ("merge", "suppress")


@dataclass(frozen=True)
class ShotConfig:
    """ContentDetector settings.

    ``threshold``: PySceneDetect's default 27.0 (its score is the mean of the hue, saturation and value
    differences, 0-255). ``min_shot_frames`` (PySceneDetect's ``min_scene_len``, default 15): no shot
    shorter than this is reported, so a flash or fast pan does not become two cuts. ``luma_only``: score on
    brightness only (for greyscale-ish footage). ``filter_mode``: how too-close cuts are handled -
    ``"merge"`` (PySceneDetect's default) merges them, ``"suppress"`` drops the later ones.
    """

    threshold: float = 27.0
    min_shot_frames: int = 15
    luma_only: bool = False
    filter_mode: str = "merge"

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not (isinstance(self.threshold, (int, float))
                                                     and 0.0 < float(self.threshold) <= 255.0):
            raise ValueError(f"threshold must be in (0, 255], got {self.threshold!r}")
        if isinstance(self.min_shot_frames, bool) or not isinstance(self.min_shot_frames, (int, np.integer)) \
                or self.min_shot_frames < 0:
            raise ValueError(f"min_shot_frames must be an integer >= 0, got {self.min_shot_frames!r}")
        if self.filter_mode not in _FILTER_MODES:
            raise ValueError(f"filter_mode must be one of {_FILTER_MODES}, got {self.filter_mode!r}")


@dataclass
class ShotStats:
    """What the cuts cost one video: ``cuts`` and ``shots`` found, ``short_shots`` (shorter than a clip's
    span, so unusable), ``dropped_frames`` (frames of those short shots: no clip placement can use them)."""

    cuts: int
    shots: int
    short_shots: int
    dropped_frames: int


def detect_cuts(frames: np.ndarray, fps: float, cfg: ShotConfig | None = None) -> list[int]:
    """Sorted indices of the frames where a new shot starts (never 0), by PySceneDetect's ContentDetector.

    ``frames``: uint8 RGB ``[N, H, W, 3]``, every frame of the video in order (the detector compares
    neighbours, so a subsampled video would see motion as cuts). ``fps`` only labels the timecodes: the
    minimum shot length is in frames.
    """
    from scenedetect.common import FrameTimecode
    from scenedetect.detector import FlashFilter
    from scenedetect.detectors import ContentDetector

    cfg = cfg or ShotConfig()
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 \
            or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {getattr(frames, 'dtype', type(frames))} "
                         f"{list(getattr(frames, 'shape', []))}")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    rate = float(fps)  # FrameTimecode rejects an int rate
    n = frames.shape[0]
    if n < 2:
        return []
    detector = ContentDetector(
        threshold=float(cfg.threshold), min_scene_len=int(cfg.min_shot_frames), luma_only=cfg.luma_only,
        filter_mode=FlashFilter.Mode.MERGE if cfg.filter_mode == "merge" else FlashFilter.Mode.SUPPRESS)
    found: list[int] = []
    for i in range(n):
        bgr = cv2.cvtColor(frames[i], cv2.COLOR_RGB2BGR)  # [H, W, 3]: the detector converts BGR -> HSV
        found += [tc.frame_num for tc in detector.process_frame(FrameTimecode(i, fps=rate), bgr)]
    # Cuts a detector holds back (none for ContentDetector today, but the API says to ask).
    found += [tc.frame_num for tc in detector.post_process(FrameTimecode(n - 1, fps=rate))]
    return sorted({c for c in found if 0 < c < n})


def video_cuts(src: VideoSource, info: VideoInfo, cfg: ShotConfig | None = None,
               side: int = HASH_SIDE) -> list[int]:
    """Cuts of the video ``src`` (path or bytes; ``info`` its :func:`~fdreamer.data.video.probe_video`).

    Decodes every frame, scaled in the decoder to a shorter side of ``side`` (pass 1's hash size), so no
    full-size frame is made; see the module docstring for the memory this takes. Raises
    :class:`~fdreamer.data.video.VideoDecodeError` when fewer frames decode than ``info`` promises (as pass 1's
    clip decode would for a clip reaching that far).
    """
    frames = decode_frames(src, list(range(info.num_frames)), decode_side=side, info=info)  # [N, h, w, 3]
    return detect_cuts(frames, info.fps, cfg)


def _checked_cuts(num_frames: int, cuts: list[int]) -> list[int]:
    """``cuts`` sorted and unique; each must be a frame index in ``(0, num_frames)``."""
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    out = sorted({int(c) for c in cuts})
    if out and not (0 < out[0] and out[-1] < num_frames):
        raise ValueError(f"cuts must lie in (0, {num_frames}), got {out}")
    return out


def shot_spans(num_frames: int, cuts: list[int]) -> list[tuple[int, int]]:
    """The shots as half-open ``[start, end)`` frame ranges covering ``[0, num_frames)`` in order."""
    bounds = [0, *_checked_cuts(num_frames, cuts), num_frames]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def clip_starts(num_frames: int, cuts: list[int], span: int, clips_per_video: int) -> tuple[list[int], ShotStats]:
    """Sorted start frames of up to ``clips_per_video`` non-overlapping ``span``-frame clips, each inside one shot.

    Rule: round-robin over the shots in order. Each round gives every shot that still has room one more
    clip, packed back to back from the shot's start; rounds repeat until ``clips_per_video`` clips are placed
    or no shot has room. Why: different shots are different content, while two clips of one shot are near
    copies, so under a per-video cap spreading the clips over shots gives the most varied data (taking shots
    in order would spend the whole cap on the first shot). Packing from each shot's start makes a video with
    no cuts come out exactly as the fixed grid ``[k * span for k in range(clips_per_video) if (k + 1) * span
    <= num_frames]``, so single-shot videos keep their clip ids (made from the start frame).
    """
    if span < 1:
        raise ValueError(f"span must be >= 1, got {span}")
    if clips_per_video < 0:
        raise ValueError(f"clips_per_video must be >= 0, got {clips_per_video}")
    spans = shot_spans(num_frames, cuts)
    short = [(a, b) for a, b in spans if b - a < span]
    stats = ShotStats(cuts=max(len(spans) - 1, 0), shots=len(spans), short_shots=len(short),
                      dropped_frames=sum(b - a for a, b in short))
    room = [(b - a) // span for a, b in spans]  # clips each shot can hold, back to back from its start
    starts: list[int] = []
    for k in range(max(room, default=0)):  # round k: the k-th clip of every shot that holds k + 1
        for (a, _), fits in zip(spans, room):
            if len(starts) == clips_per_video:
                return sorted(starts), stats
            if fits > k:
                starts.append(a + k * span)
    return sorted(starts), stats
