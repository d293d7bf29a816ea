"""Shot cuts (fdreamer/data/shots.py): cuts found in real H.264 files at pass 1's hash size, none on smooth
motion, and clip placement that never straddles a cut while keeping single-shot videos' clip positions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fdreamer.data.shots import ShotConfig, ShotStats, clip_starts, detect_cuts, shot_spans, video_cuts
from fdreamer.data.video import decode_frames, probe_video, resize_center_crop, write_video
from fdreamer.toy.scenes import MOTIONS, ClipSpec, make_specs, render_clip

FPS = 12.0


def _specs(n: int, num_frames: int) -> list[ClipSpec]:
    """The first ``n`` sample specs at 128x96 ("pexels" ones are 1.25x that, so skipped: frames must stack)."""
    specs = [s for s in make_specs(4 * n, seed=0, num_frames=num_frames) if s.width == 128]
    return specs[:n]


def _shots(specs: list[ClipSpec], lengths: list[int], size: tuple[int, int] | None = None) -> np.ndarray:
    """The specs' clips cut to ``lengths`` frames and put back to back: uint8 ``[sum(lengths), H, W, 3]``."""
    parts = [render_clip(s)[:n] for s, n in zip(specs, lengths)]  # each [n, H, W, 3]
    if size is not None:
        parts = [resize_center_crop(p, size) for p in parts]  # each [n, size[0], size[1], 3]
    return np.concatenate(parts)


def test_two_shots_back_to_back_give_one_cut_at_the_boundary(tmp_path: Path) -> None:
    a, b = _specs(2, 30)
    assert (a.background, a.shapes[0].kind) != (b.background, b.shapes[0].kind)  # two different shots
    path = write_video(tmp_path / "two.mp4", _shots([a, b], [30, 30]), FPS)
    info = probe_video(path)
    assert info.num_frames == 60
    cuts = video_cuts(path, info)
    assert len(cuts) == 1 and abs(cuts[0] - 30) <= 1, cuts
    assert video_cuts(path.read_bytes(), info) == cuts  # bytes (an s3 object) decode the same
    frames = decode_frames(path, list(range(60)), decode_side=64, info=info)  # [60, 64, 86, 3]
    assert frames.shape == (60, 64, 86, 3)
    assert detect_cuts(frames, FPS) == cuts and detect_cuts(frames[:30], FPS) == []
    # A cut closer than min_shot_frames to the start is no shot: merged away.
    assert detect_cuts(frames[20:], FPS, ShotConfig(min_shot_frames=15)) == []
    assert detect_cuts(frames[20:], FPS, ShotConfig(min_shot_frames=5)) == [cuts[0] - 20]


def test_smooth_motion_of_every_kind_gives_no_cut(tmp_path: Path) -> None:
    specs = make_specs(2 * len(MOTIONS), seed=1)  # 16 clips, 24 frames: every motion twice, both sizes
    assert sorted(s.motion for s in specs) == sorted(MOTIONS * 2)
    every_frame = ShotConfig(min_shot_frames=0)  # no flash filter: every pair of frames is judged
    for spec in specs:
        path = write_video(tmp_path / f"{spec.clip_id}.mp4", render_clip(spec), spec.fps)
        info = probe_video(path)
        frames = decode_frames(path, list(range(info.num_frames)), decode_side=64, info=info)  # [24, 64, w, 3]
        assert detect_cuts(frames, info.fps) == [], spec.motion
        assert detect_cuts(frames, info.fps, every_frame) == [], spec.motion


def test_a_16_9_video_with_three_shots_gives_both_cuts(tmp_path: Path) -> None:
    specs = _specs(3, 30)
    frames = _shots(specs, [20, 28, 24], size=(108, 192))  # [72, 108, 192, 3]
    path = write_video(tmp_path / "three.mp4", frames, FPS)
    info = probe_video(path)
    assert (info.width, info.height, info.num_frames) == (192, 108, 72)
    cuts = video_cuts(path, info)
    assert len(cuts) == 2 and abs(cuts[0] - 20) <= 1 and abs(cuts[1] - 48) <= 1, cuts
    assert shot_spans(72, cuts) == [(0, cuts[0]), (cuts[0], cuts[1]), (cuts[1], 72)]


def _fixed(num_frames: int, span: int, clips_per_video: int) -> list[int]:
    """Pass 1's clip positions before shot cuts (pipelines.stages._video_rows)."""
    return [k * span for k in range(clips_per_video) if (k + 1) * span <= num_frames]


def test_without_cuts_clips_sit_where_they_always_did() -> None:
    for num_frames in (0, 1, 31, 32, 33, 64, 100, 240, 1800):
        for span in (1, 8, 32, 97):
            for cpv in (0, 1, 2, 5):
                starts, stats = clip_starts(num_frames, [], span, cpv)
                assert starts == _fixed(num_frames, span, cpv), (num_frames, span, cpv)
                assert stats.cuts == 0 and stats.shots == (1 if num_frames else 0)


def test_no_clip_contains_a_cut_and_clips_spread_over_shots() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        num_frames = int(rng.integers(1, 600))
        cuts = sorted({int(c) for c in rng.integers(1, max(num_frames, 2), int(rng.integers(0, 8)))} - {0})
        cuts = [c for c in cuts if c < num_frames]
        span, cpv = int(rng.integers(1, 80)), int(rng.integers(0, 6))
        starts, stats = clip_starts(num_frames, cuts, span, cpv)
        assert starts == sorted(starts) and len(starts) <= cpv
        assert all(b - a >= span for a, b in zip(starts, starts[1:]))  # non-overlapping
        assert all(0 <= s and s + span <= num_frames for s in starts)
        assert not any(s < c < s + span for s in starts for c in cuts)  # a clip may start at a cut, not span one
        spans = shot_spans(num_frames, cuts)
        usable = sum((b - a) // span for a, b in spans)
        assert len(starts) == min(cpv, usable)  # as many as fit, up to the cap
        short = [(a, b) for a, b in spans if b - a < span]
        assert stats == ShotStats(len(cuts), len(spans), len(short), sum(b - a for a, b in short))
    # Round-robin: one clip per shot before a second one from any shot, each packed from its shot's start.
    assert clip_starts(300, [100, 200], 32, 3)[0] == [0, 100, 200]
    assert clip_starts(300, [100, 200], 32, 4)[0] == [0, 32, 100, 200]
    assert clip_starts(300, [100, 200], 32, 2)[0] == [0, 100]


def test_a_shot_shorter_than_a_clip_is_skipped_and_counted() -> None:
    starts, stats = clip_starts(100, [40, 50], 32, 3)  # shots [0, 40), [40, 50) (10 frames), [50, 100)
    assert starts == [0, 50]
    assert stats == ShotStats(cuts=2, shots=3, short_shots=1, dropped_frames=10)
    starts, stats = clip_starts(60, [30], 32, 2)  # two 30-frame shots: nothing fits
    assert starts == [] and stats == ShotStats(cuts=1, shots=2, short_shots=2, dropped_frames=60)


def test_shot_spans_and_validation() -> None:
    assert shot_spans(10, []) == [(0, 10)] and shot_spans(0, []) == []
    assert shot_spans(10, [7, 3, 3]) == [(0, 3), (3, 7), (7, 10)]  # sorted, duplicates dropped
    for bad in ([0], [10], [-1]):
        with pytest.raises(ValueError):
            shot_spans(10, bad)
    with pytest.raises(ValueError):
        clip_starts(10, [], 0, 1)
    for kwargs in ({"threshold": 0.0}, {"threshold": 300.0}, {"min_shot_frames": -1},
                   {"min_shot_frames": 1.5}, {"filter_mode": "drop"}):
        with pytest.raises(ValueError):
            ShotConfig(**kwargs)
    with pytest.raises(ValueError):
        detect_cuts(np.zeros((4, 8, 8), np.uint8), FPS)
    assert detect_cuts(np.zeros((1, 8, 8, 3), np.uint8), FPS) == []
