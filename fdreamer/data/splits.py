"""Held-out assignment for manifests that give no ``split`` (WebVid, Pexels, video2dataset shards).

Generic manifests may carry a ``split`` column; WebVid and Pexels CSVs carry none, and a data set with no
held-out rows has no validation loss. :func:`assign_split` gives such a record ``heldout`` or ``train`` from
a hash of its video (``source`` and ``video_id``), so

- every clip of one video lands on the same side (no clip of a training video is ever validated on),
- reruns, other machines and other worker counts agree (sha1, not Python's salted ``hash``),
- a larger fraction only moves videos from ``train`` to ``heldout`` (the threshold grows, the hash stays).

A manifest's own non-empty split is kept as it is.
"""

from __future__ import annotations

import hashlib

HELDOUT, TRAIN = "heldout", "train"
DEFAULT_FRACTION = 0.01  # of the videos; the stage profiles set their own (pipelines/configs)


def heldout_score(source: str, video_id: str) -> float:
    """A uniform number in [0, 1) from the video's identity (the first 8 bytes of a sha1)."""
    digest = hashlib.sha1(f"{source}\x1f{video_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(split: str, source: str, video_id: str, fraction: float) -> str:
    """``split`` when the manifest gave one, else ``heldout`` for about ``fraction`` of the videos and
    ``train`` for the rest."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {fraction}")
    if split:
        return split
    return HELDOUT if heldout_score(source, video_id) < fraction else TRAIN
