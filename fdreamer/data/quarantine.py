"""Why a clip was not written: reason codes and :func:`classify`.

Every failure of the decode stage becomes a quarantine row ``(uri, clip_id, reason, detail)`` rather
than an exception, so one bad file never fails a job over millions. Reasons:

====================== =============================================================
missing                the file/object does not exist
zero_byte              the file is empty
not_a_video            no container/video stream could be opened (text, html, image)
corrupt                the container opens but frames fail to decode
too_short              fewer source frames than the sampling profile needs
too_small              the source is smaller than the minimum side
decode_timeout         decoding took longer than the per-clip limit
http_404               an http(s) URL answered 404 (possibly after redirects)
http_4xx               another 4xx (403, 410, 416; a 429 that persists; too many redirects)
http_5xx_after_retries 5xx on every attempt
timeout                connect/read timeout on every attempt, or the total deadline
too_large              the body exceeds the fetch size limit
truncated              the body ended before its Content-Length on every attempt
connection_failed      refused/reset/DNS failure on every attempt
tls                    certificate verification failed (not retried)
unsupported_uri        the record's uri has a scheme no reader knows (:mod:`fdreamer.data.sources`)
====================== =============================================================

The http(s) reasons come from :class:`fdreamer.data.fetch.FetchError` (see :mod:`fdreamer.data.fetch`
for what is retried and why); ``timeout`` is a download, ``decode_timeout`` a decode.

Image records (:mod:`fdreamer.data.images`) use the same codes: ``not_a_video`` then means the bytes
are no known image format either; ``corrupt`` a known image format that fails to decode.
"""

from __future__ import annotations

from fdreamer.data.video import VideoDecodeError, VideoInfo

REASONS: tuple[str, ...] = ("missing", "zero_byte", "not_a_video", "corrupt", "too_short", "too_small", "decode_timeout",
                            "http_404", "http_4xx", "http_5xx_after_retries", "timeout", "too_large", "truncated",
                            "connection_failed", "tls", "unsupported_uri")


class TooSmallError(VideoDecodeError):
    """The source video is smaller than the minimum side length."""


class DecodeTimeoutError(VideoDecodeError, TimeoutError):
    """Decoding one clip exceeded the time limit."""


def check_size(info: VideoInfo, min_side: int) -> None:
    """Raise TooSmallError when ``min(width, height) < min_side``."""
    if min(info.width, info.height) < min_side:
        raise TooSmallError(f"source is {info.width}x{info.height}, smaller than the minimum side {min_side}")


def classify(error: BaseException | VideoInfo, min_side: int = 0) -> str | None:
    """The reason code of an exception, or of a probe result (``too_small`` or None when fine)."""
    if isinstance(error, VideoInfo):
        return "too_small" if min(error.width, error.height) < min_side else None
    if getattr(error, "reason", None) in REASONS:  # errors that know their reason (image records, FetchError)
        return str(error.reason)
    if isinstance(error, TooSmallError):
        return "too_small"
    if isinstance(error, TimeoutError):
        return "decode_timeout"
    if isinstance(error, FileNotFoundError):
        return "missing"
    msg = str(error).lower()
    if "no such" in msg or "not found" in msg:
        return "missing"
    if "empty" in msg and ("file is empty" in msg or "empty input" in msg):
        return "zero_byte"
    if "too short" in msg or "zero frames" in msg:
        return "too_short"
    if "cannot read video" in msg or "no video stream" in msg or "no usable frame rate" in msg:
        return "not_a_video"
    return "corrupt"
