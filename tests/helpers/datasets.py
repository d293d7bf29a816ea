"""Preprocessed sample data for tests that consume the Parquet output (training, data loaders).

    data = preprocess_sample(workdir, ray_address)   # {"output", "models", "sample", "summary"}

Writes ``num_clips`` sample clips (:func:`fdreamer.toy.sample_data.write_sample_data`), the tiny models
with the committed trained VAE (:func:`fdreamer.toy.tiny_models.make_tiny_models`, seed 0) and runs
``pipelines/preprocess.py`` with ``pipelines/configs/tiny.yaml`` on the sample's ``manifest.jsonl``
(so the ``split`` and ``motion`` columns are filled: both ``train`` and ``heldout`` rows exist) as a
subprocess against the given Ray cluster. Output layout: ``<output>/shards/part-*.parquet``,
``null_conditions.safetensors``, ``summary.json``, ``_SUCCESS``, ``duplicates.parquet``,
``quarantine.parquet``.

``planted_dataset(root, num_clips, bad_reasons)``: raw inputs with planted copies and bad files (no job run),
what ``tests/test_preprocess.py`` checks the job's dedup and quarantine against.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .ray_cluster import REPO, subprocess_env

TINY_PROFILE = REPO / "pipelines" / "configs" / "tiny.yaml"


def preprocess_cmd(address: str, inputs: list[str], models: Path, out: Path | str, *extra: str) -> list[str]:
    """The command line of one preprocessing job with the tiny profile."""
    cmd = [sys.executable, str(REPO / "pipelines" / "preprocess.py"), "--config", str(TINY_PROFILE),
           f"--inputs={json.dumps([str(i) for i in inputs])}", f"--output={out}", f"--models_dir={models}"]
    return cmd + ([f"--ray_address={address}"] if address else []) + list(extra)


def preprocess_sample(workdir: Path, ray_address: str, num_clips: int = 32, timeout_s: float = 600) -> dict[str, Any]:
    """Sample clips + tiny models (trained VAE) + one preprocessing run; see the module docstring."""
    import warnings

    from fdreamer.toy.sample_data import write_sample_data
    from fdreamer.toy.tiny_models import make_tiny_models

    workdir = Path(workdir)
    sample, models, output = workdir / "sample", workdir / "models", workdir / "preprocessed"
    write_sample_data(sample, num_clips, workers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        make_tiny_models(models, seed=0)
    proc = subprocess.run(preprocess_cmd(ray_address, [str(sample / "manifest.jsonl")], models, output),
                          check=False, env=subprocess_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"preprocessing the sample failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    summary = json.loads((output / "_SUCCESS").read_text())
    return {"output": output, "models": models, "sample": sample, "summary": summary}


def _remux(src: str, dst: Path) -> None:
    import av

    with av.open(src) as inp, av.open(str(dst), "w", format="matroska") as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)


def planted_dataset(root: Path, num_clips: int, bad_reasons: tuple[str, ...]) -> dict[str, Any]:
    """``num_clips`` sample clips + planted copies of 3 of them (a remux to .mkv, a CRF-35 re-encode, a
    downscaled copy) + one bad file per quarantine reason in ``bad_reasons``, listed in a generic manifest;
    ``inputs`` = the sample's WebVid and Pexels CSVs and that manifest."""
    import cv2
    import numpy as np

    from fdreamer.data.video import read_video, write_video
    from fdreamer.toy.sample_data import write_sample_data

    write_sample_data(root / "sample", num_clips, workers=1)
    rows = [json.loads(line) for line in (root / "sample" / "manifest.jsonl").read_text().splitlines()]
    extra = root / "extra"
    extra.mkdir()
    full = [read_video(rows[i]["path"], 24).frames for i in range(3)]
    _remux(rows[0]["path"], extra / "remux.mkv")
    write_video(extra / "crf35.mp4", full[1], 12, crf=35)
    write_video(extra / "small.mp4", np.stack([cv2.resize(f, (96, 72), interpolation=cv2.INTER_AREA)
                                               for f in full[2]]), 12)
    good = Path(rows[3]["path"]).read_bytes()
    bad = {r: extra / f"{r}.mp4" for r in bad_reasons}
    bad["zero_byte"].write_bytes(b"")
    bad["not_a_video"].write_bytes(b"<html>not a video</html>" * 20)
    bad["corrupt"].write_bytes(good[:3000] + bytes(len(good) - 3000))
    write_video(bad["too_short"], full[0][:4], 12)
    write_video(bad["too_small"], np.stack([cv2.resize(f, (32, 24)) for f in full[0]]), 12)
    planted = {"remux": (extra / "remux.mkv", rows[0]["path"]), "crf35": (extra / "crf35.mp4", rows[1]["path"]),
               "small": (extra / "small.mp4", rows[2]["path"])}
    lines = [{"path": str(p), "caption": f"copy of {orig}", "source": "generic"} for p, orig in planted.values()]
    lines += [{"path": str(p), "caption": f"bad {r}"} for r, p in bad.items()]
    (extra / "extra.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    inputs = [root / "sample" / "webvid.csv", root / "sample" / "pexels.csv", extra / "extra.jsonl"]
    return {"root": root, "inputs": [str(p) for p in inputs], "planted": planted, "bad": bad,
            "n_in": num_clips + len(planted) + len(bad)}
