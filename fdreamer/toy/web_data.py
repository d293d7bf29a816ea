"""A web-like sample set: multi-shot 16:9 H.264 videos with WebVid / Pexels CSVs and video2dataset shards.

What :mod:`fdreamer.toy.sample_data` does not look like: WebVid and Pexels as users hold them. Each video
here is 2-3 **shots** back to back (each shot a different moving-shapes scene, :mod:`fdreamer.toy.scenes`,
so every cut is a hard cut), **16:9** (192x108 for WebVid-like, 256x144 for Pexels-like videos), and is
listed

- in ``webvid.csv`` (WebVid's columns ``videoid, contentUrl, duration, page_dir, name``) and
  ``pexels.csv`` (``id, url, title, duration, width, height``), their links under a ``base_url`` (an
  ``https://`` server in the tests) or local paths (:func:`write_web_manifests`);
- as video2dataset output (:func:`write_video2dataset`): WebDataset tar shards of ``{key}.mp4``,
  ``{key}.txt`` and ``{key}.json`` with a parquet beside each, or the ``files`` layout, with the json fields
  video2dataset writes for WebVid (``save_additional_columns=[videoid, page_dir, duration]``) and Pexels.

``truth.json`` records every video's frame count and the frame index of each cut (the ground truth of
the shot tests).
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fdreamer.data.video import write_video
from fdreamer.toy.scenes import make_specs, render_clip

WEBVID_SIZE, PEXELS_SIZE = (192, 108), (256, 144)  # (width, height), 16:9
# Consecutive shots cycle through tints far apart in hue and value: PySceneDetect's content score at its
# default threshold (27) misses a cut between two close tints of the toy backgrounds (blue -> teal scores ~21).
SHOT_TINTS = ("grey", "beige", "blue")
SHOT_FRAMES = (24, 30, 36)  # per shot, cycled: 2-3 s at 12 fps
FPS = 12.0


def _video_plan(i: int) -> dict[str, Any]:
    source = "pexels" if i % 3 == 2 else "webvid"
    shots = 2 + i % 2
    lengths = [SHOT_FRAMES[(i + k) % len(SHOT_FRAMES)] for k in range(shots)]
    return {"source": source, "id": 21_000_000 + i, "lengths": lengths,  # WebVid-like 8-digit ids
            "size": PEXELS_SIZE if source == "pexels" else WEBVID_SIZE}


def _tinted(spec: Any, tint: str) -> Any:
    """``spec`` over background ``tint`` (the caption names it)."""
    return replace(spec, background=tint, caption=spec.caption.replace(f"soft {spec.background} ", f"soft {tint} "))


def _render(plan: dict[str, Any], specs: list[Any]) -> np.ndarray:
    """The video's frames: each shot's scene rendered, resized to the video size, concatenated ``[N, H, W, 3]``."""
    w, h = plan["size"]
    shots = []
    for spec, n in zip(specs, plan["lengths"], strict=True):
        frames = render_clip(spec)[:n]  # [n, h0, w0, 3]
        shots.append(np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames]))
    return np.concatenate(shots)


def write_web_data(out_dir: str | Path, num_videos: int = 9, seed: int = 0, crf: int = 18,
                   force: bool = False) -> dict[str, Any]:
    """Write ``videos/*.mp4`` and ``truth.json`` (idempotent: an existing truth.json of the same parameters
    is returned as is)."""
    out = Path(out_dir).resolve()
    params = {"num_videos": num_videos, "seed": seed, "crf": crf, "version": 1}
    truth_path = out / "truth.json"
    if truth_path.is_file() and not force:
        truth = json.loads(truth_path.read_text())
        if truth.get("params") == params:
            return truth
    plans = [_video_plan(i) for i in range(num_videos)]
    specs = make_specs(sum(len(p["lengths"]) for p in plans), seed, width=128, height=72,
                       num_frames=max(SHOT_FRAMES), fps=FPS)
    videos, k = [], 0
    for i, plan in enumerate(plans):
        mine, k = specs[k:k + len(plan["lengths"])], k + len(plan["lengths"])
        mine = [_tinted(spec, SHOT_TINTS[(i + j) % len(SHOT_TINTS)]) for j, spec in enumerate(mine)]
        name = f"{plan['source']}-{plan['id']}.mp4"
        write_video(out / "videos" / name, _render(plan, mine), FPS, crf=crf)
        videos.append({"name": name, "source": plan["source"], "id": plan["id"], "caption": mine[0].caption,
                       "width": plan["size"][0], "height": plan["size"][1], "num_frames": sum(plan["lengths"]),
                       "cuts": np.cumsum(plan["lengths"])[:-1].tolist(), "duration_s": sum(plan["lengths"]) / FPS})
    truth = {"params": params, "fps": FPS, "videos": videos}
    truth_path.write_text(json.dumps(truth, indent=2) + "\n")
    return truth


def _csv(rows: list[list[Any]], header: list[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    return buf.getvalue()


def write_web_manifests(out_dir: str | Path, base_url: str | None = None) -> dict[str, Path]:
    """``webvid.csv`` and ``pexels.csv`` of the videos: links ``<base_url>/videos/<name>``, or local paths."""
    out = Path(out_dir).resolve()
    truth = json.loads((out / "truth.json").read_text())

    def link(v: dict[str, Any]) -> str:
        return f"{base_url.rstrip('/')}/videos/{v['name']}" if base_url else str(out / "videos" / v["name"])

    web = [[v["id"], link(v), f"PT00H00M{round(v['duration_s']):02d}S", "000000_000049", v["caption"]]
           for v in truth["videos"] if v["source"] == "webvid"]
    pex = [[v["id"], link(v), v["caption"], round(v["duration_s"]), v["width"], v["height"]]
           for v in truth["videos"] if v["source"] == "pexels"]
    paths = {"webvid": out / "webvid.csv", "pexels": out / "pexels.csv"}
    paths["webvid"].write_text(_csv(web, ["videoid", "contentUrl", "duration", "page_dir", "name"]))
    paths["pexels"].write_text(_csv(pex, ["id", "url", "title", "duration", "width", "height"]))
    return paths


def _meta(v: dict[str, Any], key: str, url: str) -> dict[str, Any]:
    """The json video2dataset writes beside a video (WebVid or Pexels additional columns)."""
    meta: dict[str, Any] = {"url": url, "caption": v["caption"], "key": key, "status": "success",
                            "error_message": None, "duration": round(v["duration_s"])}
    if v["source"] == "webvid":
        return meta | {"videoid": v["id"], "page_dir": "000000_000049"}
    return meta | {"id": v["id"], "width": v["width"], "height": v["height"]}


def write_video2dataset(out_dir: str | Path, dst: str | Path, layout: str = "webdataset",
                        samples_per_shard: int = 4) -> list[Path]:
    """The videos as video2dataset output in ``dst``: ``NNNNN.tar`` (+ ``NNNNN.parquet``), or with
    ``layout="files"`` the folders ``NNNNN/`` (+ parquet). Keys are 9 digits (shard, then sample), as
    video2dataset's defaults (``oom_shard_count=5``, 4 sample digits). Returns the shard files."""
    if layout not in ("webdataset", "files"):
        raise ValueError(f"layout must be webdataset or files, got {layout!r}")
    out, dst = Path(out_dir).resolve(), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    videos = json.loads((out / "truth.json").read_text())["videos"]
    shards = []
    for s in range(0, len(videos), samples_per_shard):
        shard = f"{s // samples_per_shard:05d}"
        metas = []
        for j, v in enumerate(videos[s:s + samples_per_shard]):
            key = f"{shard}{j:04d}"
            metas.append((key, _meta(v, key, f"https://example.invalid/videos/{v['name']}"), v))
        if layout == "webdataset":
            with tarfile.open(dst / f"{shard}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
                for key, meta, v in metas:
                    for name, data in ((f"{key}.json", json.dumps(meta, indent=4).encode()),
                                       (f"{key}.mp4", (out / "videos" / v["name"]).read_bytes()),
                                       (f"{key}.txt", v["caption"].encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            shards.append(dst / f"{shard}.tar")
        else:
            folder = dst / shard
            folder.mkdir(exist_ok=True)
            for key, meta, v in metas:
                (folder / f"{key}.mp4").write_bytes((out / "videos" / v["name"]).read_bytes())
                (folder / f"{key}.txt").write_text(v["caption"])
                (folder / f"{key}.json").write_text(json.dumps(meta, indent=4))
            shards.append(dst / f"{shard}.parquet")
        rows = [m for _, m, _ in metas]
        columns = sorted({c for m in rows for c in m})
        pq.write_table(pa.Table.from_pylist([{c: m.get(c) for c in columns} for m in rows]), dst / f"{shard}.parquet")
    return shards


def _cli(args: Any) -> int:
    truth = write_web_data(args.dir, args.num_videos, args.seed, force=args.force)
    paths = write_web_manifests(args.dir, args.base_url)
    print(f"sample-web-data: {len(truth['videos'])} videos in {Path(args.dir).resolve()}/videos, "
          f"manifests {paths['webvid']} {paths['pexels']}")
    if args.video2dataset:
        shards = write_video2dataset(args.dir, args.video2dataset, layout=args.layout)
        print(f"sample-web-data: {len(shards)} video2dataset shards ({args.layout}) in {args.video2dataset}")
    return 0


def register_cli(sub: Any) -> None:
    """``fdreamer sample-web-data DIR [--base-url URL] [--video2dataset DIR [--layout files]]``."""
    p = sub.add_parser("sample-web-data", help="multi-shot 16:9 videos with WebVid/Pexels CSVs (and video2dataset "
                                               "shards), the inputs as users hold them")
    p.add_argument("dir", help="output directory (videos/, webvid.csv, pexels.csv, truth.json)")
    p.add_argument("--base-url", default=None,
                   help="the CSV links are <base-url>/videos/<name> (serve DIR there); default: local paths")
    p.add_argument("--num-videos", type=int, default=9, help="number of videos (default 9)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--video2dataset", default=None, metavar="DIR", help="also write the videos as video2dataset "
                                                                        "output in DIR")
    p.add_argument("--layout", choices=("webdataset", "files"), default="webdataset",
                   help="video2dataset output_format (default webdataset)")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    p.set_defaults(func=_cli)
