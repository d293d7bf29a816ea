"""Deterministic "moving shapes" sample dataset, written as WebVid/Pexels-style CSVs plus mp4 clips.

The scenes (what each clip shows, and how it is rendered) are :mod:`fdreamer.toy.scenes`; this module writes
them: mp4 clips, WebVid/Pexels-style CSVs and ``manifest.jsonl``, idempotently and in parallel.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import cv2

from fdreamer.data.video import write_video
from fdreamer.toy.scenes import (
    FORMAT_VERSION,
    MOTIONS,
    PEXELS_COLUMNS,
    SPLITS,
    WEBVID_COLUMNS,
    ClipSpec,
    make_specs,
    render_clip,
)

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------- writing


def _render_and_write(job: tuple[ClipSpec, str, int]) -> str:
    """Worker: render one clip and write its mp4; returns the clip id."""
    spec, path, crf = job
    cv2.setNumThreads(1)
    write_video(path, render_clip(spec), spec.fps, crf=crf)
    return spec.clip_id


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    """Atomically write a CSV with ``header`` then ``rows``."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    _atomic_write_text(path, buf.getvalue())


def _iso_duration(seconds: float) -> str:
    """WebVid-style ISO-8601 duration, e.g. 2 s -> "PT00H00M02S"."""
    total = int(round(seconds))
    return f"PT{total // 3600:02d}H{total % 3600 // 60:02d}M{total % 60:02d}S"


def manifest_row(spec: ClipSpec, path: Path) -> dict[str, Any]:
    """The ground-truth manifest entry of one clip."""
    subject = spec.shapes[0]
    return {
        "path": str(path), "caption": spec.caption, "motion_caption": spec.motion_caption,
        "clip_id": spec.clip_id, "source": spec.source, "motion": spec.motion,
        "subject_shape": subject.kind, "subject_color": subject.color, "split": spec.split,
        "width": spec.width, "height": spec.height, "num_frames": spec.num_frames,
        "fps": spec.fps,
    }


def write_sample_data(
    out_dir: str | os.PathLike, num_clips: int = 320, seed: int = 0, *, workers: int = 2,
    width: int = 128, height: int = 96, num_frames: int = 24, fps: float = 12, crf: int = 18,
    force: bool = False, split: str | None = None,
) -> dict[str, Any]:
    """Write clips/<clip_id>.mp4, webvid.csv, pexels.csv, manifest.jsonl and finally _DONE.json.

    ``split`` ("train" or "heldout") writes only that split's clips of the ``num_clips`` (same ids, same
    content: an evaluation set of the held-out clips without rendering the rest). Paths in the CSVs and
    manifest are absolute. If _DONE.json already records the same parameters
    (and ``force`` is false) nothing is rewritten and its summary is returned with ``skipped=True``.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if split not in (None, *SPLITS):
        raise ValueError(f"split must be one of {SPLITS} (or None: all clips), got {split!r}")
    out = Path(out_dir).resolve()
    params = dict(num_clips=num_clips, seed=seed, width=width, height=height,
                  num_frames=num_frames, fps=float(fps), crf=crf, out_dir=str(out),
                  format_version=FORMAT_VERSION, **({"split": split} if split else {}))
    done_path = out / "_DONE.json"
    if done_path.is_file() and not force:
        done = json.loads(done_path.read_text(encoding="utf-8"))
        if done.get("params") == params and (out / "manifest.jsonl").is_file():
            return {**done, "skipped": True}
        logger.info("parameters changed since %s; rebuilding", done_path)

    started = time.perf_counter()
    # (index among the num_clips, spec): the index is the CSV id, also when one split is written
    indexed = [(i, s) for i, s in enumerate(make_specs(num_clips, seed, width, height, num_frames, fps))
               if split in (None, s.split)]
    specs = [s for _, s in indexed]
    clips_dir = out / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)
    done_path.unlink(missing_ok=True)  # an interrupted rebuild must not look finished
    paths = {s.clip_id: clips_dir / f"{s.clip_id}.mp4" for s in specs}
    for stale in clips_dir.glob("clip_*.mp4"):
        if stale.stem not in paths:
            stale.unlink()

    jobs = [(s, str(paths[s.clip_id]), crf) for s in specs]
    if workers == 1:
        for job in jobs:
            _render_and_write(job)
    else:
        # spawn, not fork: the parent may hold decoder/cv2 threads that fork would not copy safely.
        # An executor (not Pool) so workers that cannot start raise instead of hanging.
        ctx = multiprocessing.get_context("spawn")
        chunk = max(1, len(jobs) // (4 * workers))
        try:
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
                list(pool.map(_render_and_write, jobs, chunksize=chunk))
        except BrokenProcessPool as exc:
            raise RuntimeError(
                "sample-data worker processes died; when calling from a script, guard it with "
                "`if __name__ == '__main__':`, or pass workers=1"
            ) from exc

    # videoid/id is the clip index; page_dir mimics WebVid's "000000_000049" buckets.
    webvid = [[i, str(paths[s.clip_id]), _iso_duration(s.num_frames / s.fps),
               f"{i // 50 * 50:06d}_{i // 50 * 50 + 49:06d}", s.caption]
              for i, s in indexed if s.source == "webvid"]
    pexels = [[i, str(paths[s.clip_id]), s.caption, max(1, round(s.num_frames / s.fps)), s.width,
               s.height] for i, s in indexed if s.source == "pexels"]
    _write_csv(out / "webvid.csv", list(WEBVID_COLUMNS), webvid)
    _write_csv(out / "pexels.csv", list(PEXELS_COLUMNS), pexels)
    _atomic_write_text(out / "manifest.jsonl", "".join(
        json.dumps(manifest_row(s, paths[s.clip_id])) + "\n" for s in specs))

    counts: dict[str, int] = {"clips": len(specs), "webvid": len(webvid), "pexels": len(pexels)}
    counts |= {key: sum(s.split == key for s in specs) for key in SPLITS}
    counts |= {f"motion_{m}": sum(s.motion == m for s in specs) for m in MOTIONS}
    summary = {"params": params, "counts": counts,
               "seconds": round(time.perf_counter() - started, 3)}
    _atomic_write_text(done_path, json.dumps(summary, indent=2) + "\n")
    return {**summary, "skipped": False}


# -------------------------------------------------------------------------------------------- CLI


def _cli_sample_data(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.images and args.split:
        print("fdreamer sample-data: error: --images writes every clip's first frame; drop --split", file=sys.stderr)
        return 2
    try:
        summary = write_sample_data(args.dir, args.num_clips, args.seed, workers=args.workers,
                                    force=args.force, split=args.split)
    except (ValueError, FileExistsError) as exc:
        print(f"fdreamer sample-data: error: {exc}", file=sys.stderr)
        return 2
    verb = "already present" if summary["skipped"] else "wrote"
    count, where = summary["counts"]["clips"], summary["params"]["out_dir"]
    print(f"sample-data: {verb} {count} clips in {where} ({time.perf_counter() - started:.1f} s)")
    if args.images:  # the clips' clean first frames as a PNG image manifest (VideoCrafter2 recipe)
        from fdreamer.toy.sample_images import write_sample_images

        images = write_sample_images(args.dir, args.num_clips, args.seed, force=args.force)
        verb = "already present" if images["skipped"] else "wrote"
        print(f"sample-data: {verb} {images['counts']['images']} images, manifest {where}/images.jsonl")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``fdreamer sample-data DIR [--num-clips N] [--seed S] [--workers W] [--force] [--images]``."""
    p = sub.add_parser("sample-data", help="write the deterministic moving-shapes sample dataset")
    p.add_argument("dir", help="output directory")
    p.add_argument("--num-clips", type=int, default=320, help="number of clips (default 320)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--force", action="store_true", help="rebuild even if already complete")
    p.add_argument("--split", choices=SPLITS, default=None,
                   help="write only this split's clips of the --num-clips (e.g. heldout: an evaluation set)")
    p.add_argument("--images", action="store_true",
                   help="also write the clips' clean first frames as PNGs + images.jsonl (an image manifest)")
    p.set_defaults(func=_cli_sample_data)
