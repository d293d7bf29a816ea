"""Tests for fdreamer.toy.sample_data: determinism, balance, manifests, idempotence, motion."""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from fdreamer.data.video import encode_video, probe_video, read_video
from fdreamer.toy.sample_data import register_cli, write_sample_data
from fdreamer.toy.scenes import (
    COLORS,
    MOTION_PHRASES,
    MOTIONS,
    SHAPES,
    ClipSpec,
    make_specs,
    render_clip,
    shape_state,
)

MANIFEST_KEYS = {
    "path", "caption", "motion_caption", "clip_id", "source", "motion", "subject_shape",
    "subject_color", "split", "width", "height", "num_frames", "fps",
}
NUM_CLIPS = 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sample") / "data"
    summary = write_sample_data(out, NUM_CLIPS, seed=0, workers=2)
    return out, summary


def read_manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


# ------------------------------------------------------------------------------------------ specs


def test_specs_are_deterministic_and_prefix_stable() -> None:
    a, b = make_specs(40, seed=0), make_specs(40, seed=0)
    assert a == b
    assert make_specs(16, seed=0) == a[:16]
    other = make_specs(40, seed=1)
    assert [s.shapes for s in other] != [s.shapes for s in a]


def test_rendering_is_deterministic() -> None:
    spec = make_specs(3, seed=5)[2]
    first, second = render_clip(spec), render_clip(spec)
    assert first.shape == (spec.num_frames, spec.height, spec.width, 3)
    assert first.dtype == np.uint8
    np.testing.assert_array_equal(first, second)


def test_motions_are_balanced() -> None:
    counts = Counter(s.motion for s in make_specs(320))
    assert counts == {m: 40 for m in MOTIONS}
    small = Counter(s.motion for s in make_specs(20))
    assert set(small) == set(MOTIONS) and max(small.values()) - min(small.values()) <= 1


def test_speeds_vary_and_rotation_is_visible() -> None:
    specs = make_specs(320)
    for motion in ("left", "grow", "rotate"):
        same_size = [s for s in specs if s.motion == motion and s.width == 128]
        speeds = {round(s.shapes[0].speed, 3) for s in same_size}
        assert len(speeds) == 3, (motion, speeds)
    rotating = [s.shapes[0].kind for s in specs if s.motion == "rotate"]
    assert "circle" not in rotating and len(set(rotating)) >= 3
    assert {s.shapes[0].kind for s in specs} == set(SHAPES)
    assert {s.shapes[0].color for s in specs} == set(COLORS)


def test_split_is_about_ten_percent_and_balanced() -> None:
    specs = make_specs(320)
    held = [s for s in specs if s.split == "heldout"]
    assert len(held) == 32
    assert Counter(s.motion for s in held) == {m: 4 for m in MOTIONS}
    assert {s.split for s in specs} == {"train", "heldout"}
    assert make_specs(320) == specs  # split is deterministic too


def test_pexels_share_and_size() -> None:
    specs = make_specs(320)
    pexels = [s for s in specs if s.source == "pexels"]
    assert 0.2 <= len(pexels) / len(specs) <= 0.3
    assert {(s.width, s.height) for s in pexels} == {(160, 120)}
    assert {(s.width, s.height) for s in specs if s.source == "webvid"} == {(128, 96)}
    assert any(s.split == "heldout" for s in pexels)


def test_captions_name_colour_shape_and_motion() -> None:
    for spec in make_specs(64):
        subject = spec.shapes[0]
        phrase = MOTION_PHRASES[spec.motion]
        assert spec.motion_caption == f"a {subject.color} {subject.kind} {phrase}"
        assert spec.caption.startswith(spec.motion_caption)
        assert "textured background" in spec.caption
        if len(spec.shapes) > 1:
            other = spec.shapes[1]
            assert f"small {other.color} {other.kind}" in spec.caption
            assert other.color != subject.color and other.motion == "still"
            assert other.size < subject.size * 0.8 or spec.motion == "grow"


def test_subject_stays_inside_the_centre_square_crop() -> None:
    for spec in make_specs(160):
        side = min(spec.width, spec.height)
        x0, y0 = (spec.width - side) / 2, (spec.height - side) / 2
        for t in range(spec.num_frames):
            x, y, r, _ = shape_state(spec.shapes[0], t)
            assert x0 + r <= x <= x0 + side - r, (spec.clip_id, t)
            assert y0 + r <= y <= y0 + side - r, (spec.clip_id, t)


def test_make_specs_validates() -> None:
    with pytest.raises(ValueError, match="num_clips"):
        make_specs(0)
    with pytest.raises(ValueError, match="width and height"):
        make_specs(4, width=32)
    with pytest.raises(ValueError, match="num_frames"):
        make_specs(4, num_frames=1)


def test_frames_survive_a_factor_4_bottleneck() -> None:
    """Smooth backgrounds: a plain 4x area-down/bicubic-up round trip already exceeds 26 dB."""
    for spec in make_specs(24, seed=3)[::3]:
        frames = render_clip(spec).astype(np.float32)  # [T, H, W, 3]
        for frame in frames[:: spec.num_frames // 3]:
            h, w = frame.shape[:2]
            low = cv2.resize(frame, (w // 4, h // 4), interpolation=cv2.INTER_AREA)
            up = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
            psnr = 10 * np.log10(255.0**2 / np.mean((up - frame) ** 2))
            assert psnr > 26.0, (spec.clip_id, psnr)


# ---------------------------------------------------------------------------------------- writing


def test_written_files_and_manifests(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    assert summary["skipped"] is False
    assert summary["counts"]["clips"] == NUM_CLIPS
    rows = read_manifest(out)
    assert len(rows) == NUM_CLIPS
    assert all(set(r) == MANIFEST_KEYS for r in rows)
    names = sorted(p.name for p in (out / "clips").iterdir())
    assert names == [f"clip_{i:05d}.mp4" for i in range(NUM_CLIPS)]

    webvid_cols, webvid = read_csv(out / "webvid.csv")
    pexels_cols, pexels = read_csv(out / "pexels.csv")
    assert webvid_cols == ["videoid", "contentUrl", "duration", "page_dir", "name"]
    assert pexels_cols == ["id", "url", "title", "duration", "width", "height"]
    by_source = Counter(r["source"] for r in rows)
    assert (len(webvid), len(pexels)) == (by_source["webvid"], by_source["pexels"])
    assert len(webvid) + len(pexels) == NUM_CLIPS and len(pexels) >= 2
    assert summary["counts"]["webvid"] == len(webvid)

    by_path = {r["path"]: r for r in rows}
    for w in webvid:
        assert w["duration"] == "PT00H00M02S"
        assert by_path[w["contentUrl"]]["caption"] == w["name"]
        assert by_path[w["contentUrl"]]["source"] == "webvid"
    for p in pexels:
        row = by_path[p["url"]]
        assert p["title"] == row["caption"] and int(p["duration"]) == 2
        assert (int(p["width"]), int(p["height"])) == (row["width"], row["height"]) == (160, 120)

    for row in rows:
        info = probe_video(row["path"])
        assert Path(row["path"]).is_absolute()
        assert (info.width, info.height, info.num_frames) == (row["width"], row["height"], 24)
        assert info.fps == pytest.approx(row["fps"])
        assert (info.codec, info.pix_fmt) == ("h264", "yuv420p")

    done = json.loads((out / "_DONE.json").read_text())
    assert done["params"]["num_clips"] == NUM_CLIPS and done["counts"] == summary["counts"]


def test_second_call_is_fast_and_rewrites_nothing(dataset: tuple[Path, dict]) -> None:
    out, _ = dataset
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    started = time.perf_counter()
    again = write_sample_data(out, NUM_CLIPS, seed=0, workers=2)
    assert time.perf_counter() - started < 0.5
    assert again["skipped"] is True and again["counts"]["clips"] == NUM_CLIPS
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_output_bytes_do_not_depend_on_workers(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = dataset
    write_sample_data(tmp_path, 6, seed=0, workers=1)
    for i in range(6):
        name = f"clips/clip_{i:05d}.mp4"
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_changed_parameters_rebuild_and_drop_stale_clips(tmp_path: Path) -> None:
    first = write_sample_data(tmp_path, 10, seed=0, workers=1)
    second = write_sample_data(tmp_path, 8, seed=0, workers=1)
    assert not first["skipped"] and not second["skipped"]
    assert len(list((tmp_path / "clips").glob("*.mp4"))) == 8
    assert len(read_manifest(tmp_path)) == 8
    assert not list(tmp_path.rglob("*.tmp"))
    forced = write_sample_data(tmp_path, 8, seed=0, workers=1, force=True)
    assert forced["skipped"] is False


def test_one_split_writes_the_same_clips_and_ids(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    """``split="heldout"``: only the held-out clips of the N (an evaluation set), byte-identical to the full
    dataset's, with the same clip ids and CSV ids; a changed split rebuilds; an unknown split is an error."""
    out, _ = dataset
    held = write_sample_data(tmp_path, NUM_CLIPS, seed=0, workers=1, split="heldout")
    full_rows = {r["clip_id"]: r for r in read_manifest(out)}
    rows = read_manifest(tmp_path)
    expected = sorted(c for c, r in full_rows.items() if r["split"] == "heldout")
    assert expected and sorted(r["clip_id"] for r in rows) == expected
    assert held["counts"]["clips"] == held["counts"]["heldout"] == len(expected) and held["counts"]["train"] == 0
    for row in rows:
        assert {k: v for k, v in row.items() if k != "path"} == {k: v for k, v in full_rows[row["clip_id"]].items()
                                                                 if k != "path"}
        assert Path(row["path"]).read_bytes() == Path(full_rows[row["clip_id"]]["path"]).read_bytes()
    ids = {int(w["videoid"]) for w in read_csv(tmp_path / "webvid.csv")[1]} | {int(p["id"]) for p in read_csv(tmp_path / "pexels.csv")[1]}
    assert ids == {int(c.removeprefix("clip_")) for c in expected}
    assert write_sample_data(tmp_path, NUM_CLIPS, seed=0, workers=1, split="heldout")["skipped"] is True
    everything = write_sample_data(tmp_path, NUM_CLIPS, seed=0, workers=1)  # another split: rebuilt
    assert everything["skipped"] is False and len(read_manifest(tmp_path)) == NUM_CLIPS
    with pytest.raises(ValueError, match="split must be one of"):
        write_sample_data(tmp_path, NUM_CLIPS, split="test")


def test_cli_registers_sample_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="fdreamer")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sample-data", str(tmp_path), "--num-clips", "4", "--workers", "1"])
    assert (args.num_clips, args.seed, args.workers, args.force) == (4, 0, 1, False)
    assert args.func(args) in (0, None)
    line = capsys.readouterr().out.strip()
    assert "4 clips" in line and str(tmp_path) in line and line.endswith("s)")
    assert len(line.splitlines()) == 1
    bad = parser.parse_args(["sample-data", str(tmp_path / "none"), "--num-clips", "0"])
    assert bad.func(bad) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fdreamer sample-data: error: num_clips must be >= 1, got 0"


# ------------------------------------------------------------------------------- motion in pixels


def subject_track(
    frames: np.ndarray, rgb: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame masks [T, H, W], areas [T] and centroids [T, 2] (x, y) of pixels near ``rgb``."""
    diff = frames.astype(np.float32) - np.asarray(rgb, np.float32)  # [T, H, W, 3]
    dist = np.linalg.norm(diff, axis=-1)  # [T, H, W]
    masks = dist < 60.0
    areas = masks.sum(axis=(1, 2)).astype(np.float64)
    assert areas.min() > 30, "subject not found by colour"
    ys, xs = np.mgrid[0 : frames.shape[1], 0 : frames.shape[2]]  # each [H, W]
    cx = (masks * xs).sum(axis=(1, 2)) / areas
    cy = (masks * ys).sum(axis=(1, 2)) / areas
    return masks, areas, np.stack([cx, cy], axis=1)


def check_motion(frames: np.ndarray, spec_like: dict) -> None:
    """Assert the subject's pixels move as ``spec_like["motion"]`` says."""
    motion = spec_like["motion"]
    masks, areas, cent = subject_track(frames, COLORS[spec_like["subject_color"]])
    (dx, dy), steps = cent[-1] - cent[0], np.diff(cent, axis=0)
    area_ratio = areas[-1] / areas[0]
    moved = float(np.hypot(dx, dy))
    if motion in ("left", "right"):
        sign = -1 if motion == "left" else 1
        assert sign * dx > 15 and abs(dy) < 1.5, (dx, dy)
        assert np.all(sign * steps[:, 0] > -0.5)  # monotone, frame to frame
    elif motion in ("up", "down"):
        sign = -1 if motion == "up" else 1
        assert sign * dy > 15 and abs(dx) < 1.5, (dx, dy)
        assert np.all(sign * steps[:, 1] > -0.5)
    elif motion == "grow":
        assert area_ratio > 2.0 and moved < 2.0, (area_ratio, moved)
    elif motion == "shrink":
        assert area_ratio < 0.5 and moved < 2.0, (area_ratio, moved)
    elif motion == "still":
        assert np.abs(cent - cent[0]).max() < 0.5
        assert areas.std() / areas.mean() < 0.03
    elif motion == "rotate":
        assert np.abs(cent - cent[0]).max() < 1.5
        assert 0.8 < areas.min() / areas.max()
        iou = [(masks[0] & m).sum() / (masks[0] | m).sum() for m in masks]
        assert min(iou) < 0.8, min(iou)
    else:
        raise AssertionError(motion)


@pytest.mark.parametrize("motion", MOTIONS)
def test_motion_recoverable_from_written_mp4s(dataset: tuple[Path, dict], motion: str) -> None:
    out, _ = dataset
    rows = [r for r in read_manifest(out) if r["motion"] == motion]
    assert len(rows) == NUM_CLIPS // len(MOTIONS)
    for row in rows:
        clip = read_video(row["path"], row["num_frames"])
        check_motion(clip.frames, row)


@pytest.mark.parametrize("motion", MOTIONS)
def test_motion_recoverable_across_seeds_and_sizes(motion: str) -> None:
    specs: list[ClipSpec] = [s for s in make_specs(64, seed=11) if s.motion == motion][:4]
    assert {s.source for s in specs} == {"webvid", "pexels"}
    for spec in specs:
        frames = read_video(encode_video(render_clip(spec), spec.fps), spec.num_frames).frames
        subject = spec.shapes[0]
        _, _, cent = subject_track(frames, subject.rgb)
        assert np.abs(cent[0] - (subject.x, subject.y)).max() < 1.5  # found where the spec put it
        check_motion(frames, {"motion": motion, "subject_color": subject.color})
