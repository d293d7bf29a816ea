"""Tests for fdreamer.data.video: probe, sampling, resize/crop, decode backends and H.264 encoding."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fdreamer.data import video
from fdreamer.data.video import (
    VideoDecodeError,
    encode_video,
    probe_video,
    read_video,
    resize_center_crop,
    sample_frame_indices,
    write_video,
)


def smooth_frames(num_frames: int = 24, height: int = 96, width: int = 128) -> np.ndarray:
    """Smooth moving gradients, uint8 [T, H, W, 3]: easy for H.264, different in every frame."""
    t = np.arange(num_frames, dtype=np.float32)[:, None, None]  # [T, 1, 1]
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[None, :, None]  # [1, H, 1]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, None, :]  # [1, 1, W]
    r = 128 + 90 * np.sin(2 * np.pi * (x + 0.03 * t))
    g = 128 + 90 * np.cos(2 * np.pi * (y - 0.02 * t))
    b = 128 + 60 * np.sin(2 * np.pi * (x + y) + 0.1 * t)
    rgb = np.stack(np.broadcast_arrays(r, g, b), axis=-1)  # [T, H, W, 3]
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return smooth_frames()


@pytest.fixture(scope="module")
def mp4_24fps(tmp_path_factory: pytest.TempPathFactory, frames: np.ndarray) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", frames, 24.0)


# ------------------------------------------------------------------------------------- round trip


def test_round_trip_keeps_count_size_fps_and_pixels(mp4_24fps: Path, frames: np.ndarray) -> None:
    clip = read_video(mp4_24fps, 24)
    assert clip.frames.shape == (24, 96, 128, 3)
    assert clip.frames.dtype == np.uint8
    assert clip.fps == pytest.approx(24.0)
    assert clip.indices == list(range(24))
    err = np.abs(clip.frames.astype(np.int16) - frames.astype(np.int16))
    assert err.mean() < 3.0
    assert np.percentile(err, 99) < 12


def test_probe_reports_h264_yuv420p(mp4_24fps: Path) -> None:
    info = probe_video(mp4_24fps)
    assert (info.codec, info.pix_fmt) == ("h264", "yuv420p")
    assert (info.num_frames, info.width, info.height) == (24, 128, 96)
    assert info.fps == pytest.approx(24.0)
    assert info.duration == pytest.approx(1.0, abs=0.05)


def test_faststart_puts_moov_before_mdat(frames: np.ndarray) -> None:
    data = encode_video(frames[:6], 12.0)
    assert data[4:8] == b"ftyp"
    assert 0 < data.find(b"moov") < data.find(b"mdat")


def test_non_integer_fps_round_trips(tmp_path: Path, frames: np.ndarray) -> None:
    path = write_video(tmp_path / "ntsc.mp4", frames[:10], 30000 / 1001)
    assert probe_video(path).fps == pytest.approx(29.97, abs=0.01)


# --------------------------------------------------------------------------------------- sampling


def test_fps_sampling_24_to_8_takes_every_third_frame() -> None:
    assert sample_frame_indices(24, 24.0, 8, fps=8) == [0, 3, 6, 9, 12, 15, 18, 21]


def test_fps_sampling_rounds_fractional_steps_half_up() -> None:
    # 30 -> 12 fps is a step of 2.5: positions 0, 2.5, 5, 7.5, 10 -> 0, 3, 5, 8, 10.
    assert sample_frame_indices(30, 30.0, 5, fps=12) == [0, 3, 5, 8, 10]


def test_stride_and_start_frame() -> None:
    assert sample_frame_indices(24, 24.0, 4, stride=5, start_frame=2) == [2, 7, 12, 17]
    assert sample_frame_indices(5, 24.0, 5) == [0, 1, 2, 3, 4]  # default stride 1


def test_fps_above_source_repeats_frames() -> None:
    assert sample_frame_indices(10, 12.0, 4, fps=24) == [0, 1, 1, 2]


def test_sampling_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        sample_frame_indices(24, 24.0, 4, fps=8, stride=2)
    with pytest.raises(ValueError, match="stride"):
        sample_frame_indices(24, 24.0, 4, stride=0)
    with pytest.raises(ValueError, match="num_frames"):
        sample_frame_indices(24, 24.0, 0)


def test_sampling_too_short_raises() -> None:
    with pytest.raises(VideoDecodeError, match="has 24"):
        sample_frame_indices(24, 24.0, 9, fps=8)  # needs index 24
    with pytest.raises(VideoDecodeError):
        sample_frame_indices(24, 24.0, 2, start_frame=23)


def test_read_video_at_target_fps(mp4_24fps: Path) -> None:
    clip = read_video(mp4_24fps, 8, fps=8)
    assert clip.indices == list(range(0, 24, 3))
    assert clip.fps == pytest.approx(8.0)
    strided = read_video(mp4_24fps, 8, stride=3)
    assert strided.fps == pytest.approx(8.0)
    np.testing.assert_array_equal(clip.frames, strided.frames)


def test_read_video_start_frame(mp4_24fps: Path) -> None:
    all_frames = read_video(mp4_24fps, 24).frames
    clip = read_video(mp4_24fps, 4, stride=2, start_frame=10)
    assert clip.indices == [10, 12, 14, 16]
    np.testing.assert_array_equal(clip.frames, all_frames[[10, 12, 14, 16]])


# ----------------------------------------------------------------------------------- resize / crop


def marker_frames(height: int, width: int) -> np.ndarray:
    """Grey frames with a red centre block (a quarter of the short side) and blue borders."""
    img = np.full((2, height, width, 3), 128, dtype=np.uint8)
    img[:, :, : width // 10] = (0, 0, 255)
    img[:, :, -(width // 10) :] = (0, 0, 255)
    k = min(height, width) // 8
    cy, cx = height // 2, width // 2
    img[:, cy - k : cy + k, cx - k : cx + k] = (255, 0, 0)
    return img


@pytest.mark.parametrize(
    ("in_hw", "size", "out_hw"),
    [((96, 128), 64, (64, 64)), ((120, 160), (48, 80), (48, 80)), ((32, 48), 64, (64, 64)),
     ((64, 64), 64, (64, 64))],
)
def test_resize_center_crop_shape_and_centre(in_hw, size, out_hw) -> None:
    src = marker_frames(*in_hw)
    out = resize_center_crop(src, size)
    assert out.shape == (2, *out_hw, 3)
    assert out.dtype == np.uint8
    h, w = out_hw
    centre = out[:, h // 2 - 1 : h // 2 + 1, w // 2 - 1 : w // 2 + 1].astype(int)
    assert np.abs(centre - (255, 0, 0)).max() <= 2
    if in_hw == (96, 128):  # blue side bands (1/10 of the width each) lie outside the crop
        assert out[..., 2].max() < 200


def test_resize_center_crop_keeps_aspect() -> None:
    # A 96x128 frame to 48x48: scaled by 0.5 to 48x64, then 8 columns cropped on each side.
    src = np.zeros((1, 96, 128, 3), dtype=np.uint8)
    src[:, :, 16:112] = 200
    out = resize_center_crop(src, 48)
    assert out.min() == 200


def test_resize_center_crop_validates() -> None:
    with pytest.raises(ValueError, match="uint8"):
        resize_center_crop(np.zeros((1, 8, 8, 3), np.float32), 4)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        resize_center_crop(np.zeros((8, 8, 3), np.uint8), 4)
    with pytest.raises(ValueError, match="positive"):
        resize_center_crop(np.zeros((1, 8, 8, 3), np.uint8), 0)


# -------------------------------------------------------------------------------------- backends


def test_decord_and_pyav_agree(mp4_24fps: Path) -> None:
    a = read_video(mp4_24fps, 12, stride=2, backend="decord").frames
    b = read_video(mp4_24fps, 12, stride=2, backend="pyav").frames
    assert a.shape == b.shape == (12, 96, 128, 3)
    assert np.abs(a.astype(np.int16) - b.astype(np.int16)).max() <= 2


def test_bytes_input_matches_path(mp4_24fps: Path) -> None:
    data = mp4_24fps.read_bytes()
    from_path = read_video(mp4_24fps, 6, fps=6)
    for backend in ("auto", "decord", "pyav"):
        from_bytes = read_video(data, 6, fps=6, backend=backend)
        assert from_bytes.indices == from_path.indices == [0, 4, 8, 12, 16, 20]
        np.testing.assert_array_equal(from_bytes.frames, from_path.frames)
    assert probe_video(data) == probe_video(mp4_24fps)


def test_read_video_resizes(mp4_24fps: Path) -> None:
    clip = read_video(mp4_24fps, 3, size=(32, 48))
    assert clip.frames.shape == (3, 32, 48, 3)
    assert clip.source.width == 128


def test_auto_falls_back_to_pyav(monkeypatch, caplog, mp4_24fps: Path) -> None:
    def broken(src, indices, name, wh=(-1, -1)):
        raise VideoDecodeError(f"{name}: simulated decord failure")

    monkeypatch.setattr(video, "_decode_decord", broken)
    with caplog.at_level(logging.DEBUG, logger="fdreamer.data.video"):
        clip = read_video(mp4_24fps, 4, backend="auto")
    assert clip.frames.shape == (4, 96, 128, 3)
    assert "falling back to PyAV" in caplog.text
    with pytest.raises(VideoDecodeError, match="simulated"):
        read_video(mp4_24fps, 4, backend="decord")


def test_unknown_backend_rejected(mp4_24fps: Path) -> None:
    with pytest.raises(ValueError, match="backend"):
        read_video(mp4_24fps, 4, backend="opencv")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- errors


def test_corrupt_bytes_raise() -> None:
    with pytest.raises(VideoDecodeError, match="in-memory video, 4000 bytes"):
        read_video(b"not a video" * 363 + b"xxxxxxx", 4)


def test_corrupt_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(os.urandom(3000))
    with pytest.raises(VideoDecodeError, match="garbage.mp4"):
        read_video(bad, 4)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="empty.mp4.*empty"):
        probe_video(empty)


def test_truncated_file_raises(tmp_path: Path, mp4_24fps: Path) -> None:
    data = mp4_24fps.read_bytes()
    cut = tmp_path / "truncated.mp4"
    cut.write_bytes(data[: len(data) // 2])
    for backend in ("auto", "pyav"):
        with pytest.raises(VideoDecodeError, match="truncated.mp4"):
            read_video(cut, 24, backend=backend)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(VideoDecodeError, match="nowhere.mp4"):
        read_video(tmp_path / "nowhere.mp4", 4)


def test_too_short_clip_names_the_file(mp4_24fps: Path) -> None:
    with pytest.raises(VideoDecodeError, match=r"clip\.mp4.*too short"):
        read_video(mp4_24fps, 10, fps=8)
    with pytest.raises(VideoDecodeError, match="too short"):
        read_video(mp4_24fps.read_bytes(), 25)


# -------------------------------------------------------------------------------------- encoding


def test_encoding_is_deterministic(tmp_path: Path, frames: np.ndarray) -> None:
    a = encode_video(frames, 12.0)
    b = encode_video(frames.copy(), 12.0)
    assert a == b
    assert write_video(tmp_path / "c.mp4", frames, 12.0).read_bytes() == a
    assert encode_video(frames, 12.0, crf=30) != a


def test_crf_trades_size_for_quality(frames: np.ndarray) -> None:
    hi, lo = encode_video(frames, 12.0, crf=12), encode_video(frames, 12.0, crf=35)
    assert len(lo) < len(hi)
    err_hi = np.abs(read_video(hi, 24).frames.astype(int) - frames).mean()
    err_lo = np.abs(read_video(lo, 24).frames.astype(int) - frames).mean()
    assert err_hi < err_lo


def test_odd_sizes_are_padded_by_edge_replication(frames: np.ndarray) -> None:
    odd = np.ascontiguousarray(frames[:8, :95, :127])
    data = encode_video(odd, 12.0)
    info = probe_video(data)
    assert (info.width, info.height, info.num_frames) == (128, 96, 8)
    out = read_video(data, 8).frames.astype(np.int16)
    assert np.abs(out[:, :95, :127] - odd).mean() < 3.0
    # The padded row/column copy the last real row/column.
    assert np.abs(out[:, 95, :127] - odd[:, 94]).mean() < 4.0
    assert np.abs(out[:, :95, 127] - odd[:, :, 126]).mean() < 4.0


def test_write_video_is_atomic_and_creates_parents(tmp_path: Path, frames: np.ndarray) -> None:
    path = write_video(tmp_path / "a" / "b" / "v.mp4", frames[:4], 8.0)
    assert path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["v.mp4"]  # no temp files left


def test_encoder_validates_inputs(tmp_path: Path, frames: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_video(frames.astype(np.float32), 12.0)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        encode_video(frames[..., :2], 12.0)
    with pytest.raises(ValueError, match="fps"):
        encode_video(frames, 0)
    with pytest.raises(ValueError, match="crf"):
        encode_video(frames, 12.0, crf=60)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "x.mp4", frames.astype(np.int32), 12.0)
    assert not (tmp_path / "x.mp4").exists()
    assert list(tmp_path.iterdir()) == []


def test_ffprobe_accepts_stream(mp4_24fps: Path) -> None:
    ffprobe = shutil.which("ffprobe")
    if ffprobe is None:
        if os.environ.get("CI"):
            pytest.fail("ffprobe is not on PATH but CI is set: install ffmpeg in the CI image")
        pytest.skip("ffprobe not on PATH (set CI=1 to make this a failure)")
    result = subprocess.run(
        [ffprobe, "-v", "error", "-show_streams", "-of", "json", str(mp4_24fps)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""
    (stream,) = json.loads(result.stdout)["streams"]
    assert stream["codec_name"] == "h264"
    assert stream["pix_fmt"] == "yuv420p"
    assert (stream["width"], stream["height"]) == (128, 96)
    assert int(stream["nb_frames"]) == 24


def test_decode_side_scales_in_the_decoder_with_both_backends(mp4_24fps: Path) -> None:
    """``decode_side``: frames come out of the decoder with that shorter side (aspect kept), close to
    decoding at full size and resizing (what pass 1 hashes, at ``dedup.HASH_SIDE``)."""
    a = read_video(mp4_24fps, 4, decode_side=48, backend="decord").frames
    b = read_video(mp4_24fps, 4, decode_side=48, backend="pyav").frames
    assert a.shape == b.shape == (4, 48, 64, 3)  # 128x96 -> 64x48
    full = read_video(mp4_24fps, 4, size=(48, 64)).frames  # full-size decode, cv2 area resize
    assert np.abs(a.astype(int) - full).mean() < 6 and np.abs(b.astype(int) - full).mean() < 6
    same = read_video(mp4_24fps, 4, decode_side=200).frames  # never upscaled by the decoder
    assert same.shape == (4, 96, 128, 3)
