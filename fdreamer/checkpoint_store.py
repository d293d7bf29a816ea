"""Checkpoints in object storage: the latest one under an ``s3://`` prefix, fetched into a local cache.

Training with an ``s3://`` ``storage_path`` has Ray Train upload each checkpoint folder to
``s3://bucket/prefix/<name>/checkpoint_*``. Every consumer (``init_from``, resume, serving, evaluation,
``fdreamer generate``) reads a local folder: :func:`fdreamer.checkpoint.resolve_checkpoint` finds the
checkpoint here (:func:`latest`) and downloads it once (:func:`fetch`). A committed checkpoint folder is
never rewritten (Ray Train uploads it whole, then reports it); a cached copy is still checked against the
listing (each object's size and modification time, recorded at fetch), so a folder written again under
the same key is fetched again. A fetch writes each file under a temporary name and renames it, and records
what it fetched last, so neither a crash nor another worker fetching the same folder at the same time
leaves a half copy that looks complete, and a folder being read is never moved away.

Cache: ``$FDREAMER_CACHE`` (default ``~/.cache/fdreamer``) ``/s3/<bucket>/<key>``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.fs as pafs

from fdreamer.data import storage

META = "fdreamer_checkpoint.json"  # = fdreamer.checkpoint.META (that module imports this one)
CACHE_ENV = "FDREAMER_CACHE"
TRAINING_ONLY = ("optimizer.pt",)
FETCHED = ".fetched.json"  # in a cached folder: each fetched object's (size, time) in the bucket  # what a model consumer never reads (resume fetches everything)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fdreamer")


def _files(fs: pafs.FileSystem, base: str) -> dict[str, tuple[int, float]]:
    """Every file under ``base`` (recursive) -> (size, modification time); a missing prefix gives ``{}``."""
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {i.path: (i.size, i.mtime.timestamp() if i.mtime else 0.0) for i in infos if i.type == pafs.FileType.File}


def latest(uri: str, s3_endpoint: str | None = None, *, requires: str | None = None) -> str | None:
    """The checkpoint folder (``s3://...``) with the highest ``step`` under ``uri`` (itself a checkpoint
    folder, or a run folder / any prefix above them), or None. Ties go to the later folder name.
    ``requires``: a file the folder must also hold (resume needs ``trainer_state.json``)."""
    fs, base = storage.resolve(uri, s3_endpoint)
    files = _files(fs, base)
    best: tuple[int, str, str] | None = None
    for path in files:
        if not path.endswith("/" + META):
            continue
        folder = path[: -len(META) - 1]
        if requires and f"{folder}/{requires}" not in files:
            continue
        try:
            step = int(json.loads(storage.read_bytes(fs, path)).get("step") or 0)
        except (ValueError, OSError):
            continue  # a foreign or unreadable file is not a candidate
        key = (step, folder.rsplit("/", 1)[-1], folder)
        if best is None or key[:2] > best[:2]:
            best = key
    return f"s3://{best[2]}" if best else None


def fetch(uri: str, s3_endpoint: str | None = None, *, model_only: bool = True) -> Path:
    """The checkpoint folder ``uri`` (``s3://``) as a local folder in the cache (downloaded once).

    ``model_only``: leave out what only resuming the training reads (:data:`TRAINING_ONLY`, and the DCP
    shards when full weights are present); a later ``model_only=False`` fetch completes the copy."""
    fs, base = storage.resolve(uri, s3_endpoint)
    files = _files(fs, base)
    if f"{base}/{META}" not in files:
        raise FileNotFoundError(f"{uri}: not a checkpoint folder (no {META})")
    full_weights = f"{base}/model.safetensors" in files

    def wanted(rel: str) -> bool:
        if not model_only:
            return True
        return rel not in TRAINING_ONLY and not (full_weights and rel.startswith("dcp/"))

    dest = cache_root() / "s3" / base
    todo = {p[len(base) + 1:]: list(v) for p, v in files.items() if wanted(p[len(base) + 1:])}

    def fetched() -> dict[str, list]:
        try:
            return json.loads((dest / FETCHED).read_text())
        except (OSError, ValueError):
            return {}

    have = fetched()
    if all(have.get(r) == v and (dest / r).is_file() for r, v in todo.items()):
        return dest  # every wanted object, of the same size and time as in the bucket
    # In place, one file at a time (a temp name, then an atomic rename), the record of what is here last:
    # other processes on this node (the other workers) may read or fetch the same folder meanwhile.
    for rel, version in todo.items():
        target = dest / rel
        if have.get(rel) == version and target.is_file():
            continue  # the same object as fetched before
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        with fs.open_input_stream(f"{base}/{rel}") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 8 << 20)
        os.replace(tmp, target)
        have[rel] = version
    record = dest / f".{FETCHED}.tmp-{os.getpid()}"
    record.write_text(json.dumps(fetched() | have))
    os.replace(record, dest / FETCHED)
    return dest


__all__ = ["CACHE_ENV", "cache_root", "fetch", "latest"]
