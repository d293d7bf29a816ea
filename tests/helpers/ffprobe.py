"""ffprobe (Debian's ffmpeg) as an extra check, in tests only, that an mp4 plays outside PyAV.

The product never needs it: it probes and decodes with PyAV (``fdreamer.data.video``).

    stream = ffprobe_stream(mp4)   # None when ffprobe is not installed (a failure when CI is set)
    if stream is not None:
        assert stream == {"codec_name": "h264", "width": 64, "height": 64, "nb_read_frames": 8}
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest


def ffprobe_stream(path: str | Path) -> dict | None:
    """The first video stream of ``path`` as ffprobe sees it, every frame decoded (``-count_frames``).

    Returns ``{"codec_name", "width", "height", "nb_read_frames"}``, or None when ffprobe is not on PATH;
    under CI (``CI`` set, as ``.ci/run`` does) a missing ffprobe fails the calling test instead.
    """
    exe = shutil.which("ffprobe")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("ffprobe is not on PATH but CI is set: install ffmpeg (.ci/run does, as root)")
        return None
    out = subprocess.run([exe, "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                          "stream=codec_name,width,height,nb_read_frames", "-of", "json", str(path)],
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0, f"ffprobe rejects {path}: {out.stderr.strip()}"
    streams = json.loads(out.stdout).get("streams") or []
    assert streams, f"ffprobe finds no video stream in {path}"
    s = streams[0]
    return {"codec_name": s["codec_name"], "width": int(s["width"]), "height": int(s["height"]),
            "nb_read_frames": int(s["nb_read_frames"])}


def mp4_info(path: str | Path) -> dict:
    """Codec, frame count and size of an mp4 as PyAV decodes it (every frame); ffprobe, where installed,
    has to agree (:func:`ffprobe_stream`)."""
    import av

    with av.open(str(path)) as c:
        codec = c.streams.video[0].codec_context.name
        shapes = [f.to_ndarray(format="rgb24").shape for f in c.decode(video=0)]  # (H, W, 3) each
    info = {"codec": codec, "frames": len(shapes), "width": shapes[0][1], "height": shapes[0][0]}
    stream = ffprobe_stream(path)
    if stream is not None:
        assert stream == {"codec_name": codec, "width": info["width"], "height": info["height"],
                          "nb_read_frames": info["frames"]}, stream
    return info
