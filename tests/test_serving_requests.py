"""The serving app's request parsing (serving/request_parsing.py, serving/multipart.py) and its settings
(serving/settings.py), on their own, without Ray: nesting bounds, flat multipart parts, and errors that
name the field. The same requests against the running app are in tests/test_serving.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.serving_requests import B, deep_json, field, multipart, nested_multipart, png_bytes

from fdreamer.inference.request import DEFAULT_GUIDANCE_SCALE, DEFAULT_IMAGE_GUIDANCE_SCALE, DEFAULT_STEPS
from serving.errors import ApiError

REPO = Path(__file__).resolve().parents[1]


def test_request_parsing_imports_without_ray() -> None:
    code = ("import sys, serving.request_parsing, serving.multipart, serving.errors, serving.settings; "
            "sys.exit(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_parse_json_bounds_nesting_and_names_the_field() -> None:
    from serving.request_parsing import MAX_JSON_DEPTH, VideoCreate, parse_body, parse_json

    ok = parse_body("application/json", b'{"prompt": "a", "num_frames": 4}')[0]
    assert (ok.num_frames, ok.num_inference_steps, ok.guidance_scale, ok.image_guidance_scale) == (
        4, DEFAULT_STEPS, DEFAULT_GUIDANCE_SCALE, DEFAULT_IMAGE_GUIDANCE_SCALE)
    assert VideoCreate(prompt="a").num_inference_steps == DEFAULT_STEPS
    both = parse_body("application/json", b'{"prompt": "a red circle", "motion_prompt": "slides to the left"}')[0]
    assert (both.prompt, both.motion_prompt, VideoCreate(prompt="a").motion_prompt) == (
        "a red circle", "slides to the left", None)
    for body, name in ((deep_json(5000), "x"), (deep_json(10**5, "y\u00e9"), "y\u00e9"),
                       (b"[" * 10**6, "body"), (b'{"prompt": "a",\n "z": ' + b'{"a":' * 5000, "z")):
        with pytest.raises(ApiError) as err:
            parse_json(body)
        assert (err.value.status, err.value.error_type) == (400, "invalid_json")
        assert err.value.message == f"{name}: JSON nested deeper than {MAX_JSON_DEPTH} levels"
    # the bound is exactly MAX_JSON_DEPTH: one level less parses (and is refused as a value, 422)
    with pytest.raises(ApiError, match="body: has to be a JSON object"):
        parse_json(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)
    with pytest.raises(ApiError, match="x: unknown field") as err:
        parse_body("application/json", deep_json(MAX_JSON_DEPTH - 1))
    assert err.value.status == 422
    for body in (b'{"prompt": "a", "fps": NaN}', b'{"prompt": "a", "fps": Infinity}', b"{prompt:"):
        with pytest.raises(ApiError, match="body is not valid JSON"):
            parse_json(body)


def test_multipart_parts_are_flat_and_the_image_a_non_empty_file() -> None:
    from serving.request_parsing import parse_body

    png = png_bytes()
    req, image = parse_body(*multipart((field("prompt"), b"a"), (field("num_frames"), b"4"), (field("seed"), b""),
                                       (field("image", '; filename="a.png"') + "\r\nContent-Type: image/png", png)))
    assert (req.prompt, req.num_frames, req.seed, image) == ("a", 4, None, png)
    refused = [  # (parts, status, error_type, message)
        (nested_multipart(3000), 422, "validation_error", "image: a nested multipart part is not accepted"),
        (multipart((field("prompt"), b"a"), (field("image", '; filename="a.png"'), b"")), 422, "invalid_image",
         "image: the uploaded file is empty"),
        (multipart((field("prompt"), b"a"), (field("image"), png)), 422, "invalid_image", "image: upload it as a file"),
        (multipart((field("prompt"), b"a"), (field("image", '; filename="a"') + "\r\nContent-Transfer-Encoding: base64",
                                             b"!!")), 422, "validation_error", "image: Content-Transfer-Encoding"),
        (multipart((field("prompt"), b"a"), (field("prompt"), b"b")), 422, "validation_error",
         "prompt: given more than once"),
        (multipart((field("prompt"), b"a"), (field("fps"), b"nan")), 422, "validation_error", "fps: has to be a finite number"),
        (multipart((field("prompt", '; filename="p.txt"'), b"a")), 422, "validation_error", "prompt: a file part"),
        (multipart(("Content-Disposition: attachment", b"a")), 400, "bad_request", "Content-Disposition: form-data"),
        ((f"multipart/form-data; boundary={B}", f"--{B}\r\n{field('prompt')}\r\n\r\na".encode()), 400,
         "bad_request", "closing boundary is missing"),
        (("multipart/form-data", b"--x\r\n"), 400, "bad_request", "needs a boundary"),
    ]
    for (ctype, body), status, error_type, message in refused:
        with pytest.raises(ApiError) as err:
            parse_body(ctype, body)
        assert (err.value.status, err.value.error_type) == (status, error_type), err.value.message
        assert err.value.message.startswith(message) or message in err.value.message, err.value.message


def test_settings_refuse_unknown_keys_and_wrong_types_naming_the_key(tmp_path: Path) -> None:
    from serving.settings import Settings

    app_cfg = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())["applications"][0]
    args = {**app_cfg["args"], "checkpoint": str(tmp_path / "ckpt"), "store": str(tmp_path / "store")}
    assert Settings.from_args(args).batching.max_batch_size == 4
    with pytest.raises(ValueError, match="unknown key"):
        Settings.from_args({**args, "limitz": {}})
    deep: list = []
    for _ in range(5000):  # nested 5000 deep where a string or a number belongs: refused by its type
        deep = [deep]
    for bad, message in (({"checkpoint": deep}, "`checkpoint` must be str or null, got list"),
                         ({"limits": {"max_height": deep}}, "`limits.max_height` must be int, got list"),
                         ({"max_jobs_in_flight": "3"}, "`max_jobs_in_flight` must be int, got str"),
                         ({"limits": {"max_body_bytes": 0}}, "`limits.max_body_bytes` must be positive")):
        with pytest.raises(ValueError, match=message):
            Settings.from_args({**args, **bad})
