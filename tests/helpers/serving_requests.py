"""Request bodies for the serving tests (tests/test_serving_requests.py without Ray, tests/test_serving.py
against the app): raw multipart and JSON builders, small PNGs, and the tables of malformed requests
with the status and ``error_type`` each has to get.

    ctype, body = multipart((field("prompt"), b"a"), (field("image", '; filename="a.png"'), png_bytes()))
    for name, kwargs, status, error_type in MALFORMED: requests.post(url, **{"headers": AUTH, **kwargs})
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
SMALL = {"num_frames": 4, "height": 32, "width": 32, "num_inference_steps": 2}
LIMITS = {"max_body_bytes": 4 * 2**20, "max_image_bytes": 2 * 2**20, "max_image_side": 4096}
B = "fdreamer-test-boundary"


def multipart(*parts: tuple[str, bytes]) -> tuple[str, bytes]:
    """A raw multipart/form-data body of ``(part headers, data)`` parts: Content-Type and body."""
    body = b"".join(f"--{B}\r\n{head}\r\n\r\n".encode() + data + b"\r\n" for head, data in parts)
    return f"multipart/form-data; boundary={B}", body + f"--{B}--\r\n".encode()


def field(name: str, extra: str = "") -> str:
    return f'Content-Disposition: form-data; name="{name}"{extra}'


def nested_multipart(levels: int) -> tuple[str, bytes]:
    """An ``image`` part holding multipart/mixed parts nested ``levels`` deep."""
    inner = b"x"
    for i in range(levels):
        sub = b"Content-Type: multipart/mixed; boundary=b%d" % (i - 1) if i else b"Content-Type: text/plain"
        inner = b"--b%d\r\n%s\r\n\r\n%s\r\n--b%d--" % (i, sub, inner, i)
    head = field("image", '; filename="a.png"') + f"\r\nContent-Type: multipart/mixed; boundary=b{levels - 1}"
    return multipart((field("prompt"), b"a"), (head, inner))


def deep_json(levels: int, key: str = "x") -> bytes:
    return ('{"prompt": "a", "%s": ' % key + "[" * levels + "]" * levels + "}").encode()


def png_bytes(h: int = 50, w: int = 70, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[h // 5: h // 2, w // 4: w // 2] = (220, 40, 30)
    img = np.clip(img.astype(int) + rng.integers(0, 30, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _png_wide() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (5000, 1)).save(buf, format="PNG")  # tiny file, a side above max_image_side
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


_JSON = {**AUTH, "Content-Type": "application/json"}
GOOD = {"prompt": "a ball", **SMALL}
MALFORMED = [
    # (name, request kwargs, expected status, expected error_type); "nested" stands for nested_multipart(3000)
    ("no token", {"json": GOOD, "headers": {}}, 401, "unauthorized"),
    ("wrong token", {"json": GOOD, "headers": {"Authorization": "Bearer nope"}}, 401, "unauthorized"),
    ("text/plain", {"data": "prompt=a", "headers": {**AUTH, "Content-Type": "text/plain"}}, 415, None),
    ("not JSON", {"data": b"{prompt:", "headers": _JSON}, 400, "invalid_json"),
    ("JSON array", {"json": [GOOD]}, 422, "validation_error"),
    ("missing prompt", {"json": {"num_frames": 4}}, 422, "validation_error"),
    ("empty prompt", {"json": {**GOOD, "prompt": ""}}, 422, "invalid_value"),
    ("blank prompt", {"json": {**GOOD, "prompt": "   "}}, 422, "invalid_value"),
    ("null prompt", {"json": {**GOOD, "prompt": None}}, 422, "validation_error"),
    ("prompt a number", {"json": {**GOOD, "prompt": 5}}, 422, "validation_error"),
    ("prompt too long", {"json": {**GOOD, "prompt": "x" * 2001}}, 422, "limit_exceeded"),
    ("unknown field", {"json": {**GOOD, "num_frame": 4}}, 422, "validation_error"),
    ("frames a string", {"json": {**GOOD, "num_frames": "4"}}, 422, "validation_error"),
    ("frames a bool", {"json": {**GOOD, "num_frames": True}}, 422, "validation_error"),
    ("frames 0", {"json": {**GOOD, "num_frames": 0}}, 422, "invalid_value"),
    ("frames huge", {"json": {**GOOD, "num_frames": 100000}}, 422, "limit_exceeded"),
    ("height huge", {"json": {**GOOD, "height": 1 << 20}}, 422, "limit_exceeded"),
    ("height not /8 (T2V)", {"json": {**GOOD, "height": 36}}, 422, "invalid_value"),
    ("steps huge", {"json": {**GOOD, "num_inference_steps": 10**6}}, 422, "limit_exceeded"),
    ("steps float", {"json": {**GOOD, "num_inference_steps": 2.5}}, 422, "validation_error"),
    ("guidance negative", {"json": {**GOOD, "guidance_scale": -1.0}}, 422, "invalid_value"),
    ("guidance huge", {"json": {**GOOD, "guidance_scale": 1e9}}, 422, "invalid_value"),
    ("rescale > 1", {"json": {**GOOD, "guidance_rescale": 2.0}}, 422, "invalid_value"),
    ("bad sampler", {"json": {**GOOD, "sampler": "plms"}}, 422, "validation_error"),
    ("negative seed", {"json": {**GOOD, "seed": -1}}, 422, "invalid_value"),
    ("fps 0", {"json": {**GOOD, "fps": 0}}, 422, "invalid_value"),
    ("negative_prompt a list", {"json": {**GOOD, "negative_prompt": ["x"]}}, 422, "validation_error"),
    ("image not base64", {"json": {**GOOD, "image": "!!not base64!!"}}, 422, "invalid_image"),
    ("image garbage bytes", {"json": {**GOOD, "image": b64(b"\x89PNG\r\n\x1a\n garbage")}}, 422, "invalid_image"),
    ("image truncated", {"json": {**GOOD, "image": b64(png_bytes()[:60])}}, 422, "invalid_image"),
    ("image huge dimensions", {"json": {**GOOD, "image": b64(_png_wide())}}, 422, "image_too_large"),
    ("image too many bytes", {"json": {**GOOD, "image": b64(b"\0" * (LIMITS["max_image_bytes"] + 10))}},
     413, "image_too_large"),
    ("body too large", {"json": {**GOOD, "negative_prompt": "x" * LIMITS["max_body_bytes"]}}, 413, "body_too_large"),
    ("multipart frames not int", {"data": {"prompt": "a", "num_frames": "abc"}, "files": {"x": ("", b"")}},
     422, "validation_error"),
    ("multipart undecodable image", {"data": {"prompt": "a"}, "files": {"image": ("a.png", b"nope", "image/png")}},
     422, "invalid_image"),
    ("multipart unknown field", {"data": {"prompt": "a", "colour": "red"}, "files": {"image": ("a.png", png_bytes())}},
     422, "validation_error"),
    ("wait not a bool", {"json": GOOD, "params": {"wait": "maybe"}}, 422, "validation_error"),
    ("JSON nested 5000 deep", {"data": deep_json(5000), "headers": _JSON}, 400, "invalid_json"),
    ("JSON array nested 10**6 deep", {"data": b"[" * 10**6, "headers": _JSON}, 400, "invalid_json"),
    ("JSON NaN", {"data": b'{"prompt": "a", "fps": NaN}', "headers": _JSON}, 400, "invalid_json"),
    ("multipart empty image", {"data": {"prompt": "a"}, "files": {"image": ("a.png", b"", "image/png")}},
     422, "invalid_image"),
    ("multipart image not a file", {"data": {"prompt": "a", "image": "abc"}, "files": {"x": ("", b"")}},
     422, "invalid_image"),
    ("multipart image not an image", {"data": {"prompt": "a"}, "files": {"image": ("a.txt", b"hello", "text/plain")}},
     422, "invalid_image"),
    ("multipart nested 3000 deep", "nested", 422, "validation_error"),
    ("multipart duplicate field", {"data": [("prompt", "a"), ("prompt", "b")], "files": {"x": ("", b"")}},
     422, "validation_error"),
    ("multipart fps inf", {"data": {"prompt": "a", "fps": "inf"}, "files": {"x": ("", b"")}}, 422, "validation_error"),
    ("multipart no boundary", {"data": b"--x\r\n", "headers": {**AUTH, "Content-Type": "multipart/form-data"}},
     400, "bad_request"),
]
# the malformed requests whose error message has to start with the offending field's name
NAMED = {"JSON nested 5000 deep": "x: ", "multipart empty image": "image: ", "multipart image not a file": "image: ",
         "multipart nested 3000 deep": "image: ", "multipart duplicate field": "prompt: "}
OTHER = [  # (name, method, path, expected status)
    ("unknown job", "GET", "/v1/videos/" + "0" * 32, 404),
    ("bad job id", "GET", "/v1/videos/..%2F..%2Fetc", 404),
    ("content of unknown job", "GET", "/v1/videos/" + "f" * 32 + "/content", 404),
    ("cancel unknown job", "DELETE", "/v1/videos/" + "a" * 32, 404),
    ("list limit 0", "GET", "/v1/videos?limit=0", 422),
    ("unknown route", "GET", "/v2/whatever", 404),
    ("wrong method", "PUT", "/v1/videos", 405),
]
