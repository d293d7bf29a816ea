"""A flat ``multipart/form-data`` parser (RFC 7578) for the upload form: the body is split at the
boundary once, each part's headers are read, its bytes are handed back as sent.

Form data is flat, so nothing here recurses: a nested ``multipart/*`` part, a part sent with a
``Content-Transfer-Encoding`` (deprecated for form data), a part without ``Content-Disposition:
form-data; name=...`` or a body that does not follow the boundary grammar is an :class:`ApiError`
(400, or 422 naming the field), never a part silently dropped. (The stdlib ``email`` parser, used
before, parses nested parts recursively: a body nested a few thousand levels deep raised RecursionError
in the ingress; and it skipped parts it could not decode.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from serving.errors import ApiError, field_name

MAX_PARTS = 64  # the form has 14 fields
MAX_PART_HEADER_BYTES = 8192

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# one `name=value` parameter (value a token or a quoted string), then `;` or the end
_PARAM = re.compile(rf'({_TOKEN})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|({_TOKEN}))\s*(?:;\s*|$)', re.S)
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")  # RFC 2046 bchars


@dataclass(frozen=True)
class FormPart:
    name: str
    filename: str | None  # None: a text field; a string (possibly empty): a file part
    content_type: str | None
    data: bytes


def _bad(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def header_params(value: str) -> tuple[str, dict[str, str]]:
    """``'form-data; name="a"; filename="b.png"'`` -> ``("form-data", {"name": "a", "filename": "b.png"})``
    (the value and the parameter names lower-cased; quoted values as sent, without the quotes)."""
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    rest, pos = rest.strip(), 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if m is None:
            raise _bad(f"malformed header parameters: {field_name(rest[pos:])!r}")
        key = m[1].lower()
        if key in params:
            raise _bad(f"header parameter {field_name(key)!r} given twice")
        params[key] = m[2] if m[2] is not None else m[3]
        pos = m.end()
    return main.strip().lower(), params


def boundary_of(content_type: str) -> bytes:
    """The ``boundary`` of a ``multipart/form-data`` Content-Type (1-70 characters, RFC 2046)."""
    media, params = header_params(content_type)
    boundary = params.get("boundary", "")
    if media != "multipart/form-data" or not _BOUNDARY.fullmatch(boundary):
        raise _bad("multipart/form-data needs a boundary parameter of 1-70 characters in its Content-Type")
    return boundary.encode("ascii")


def parse_form_data(content_type: str, body: bytes, *, max_parts: int = MAX_PARTS) -> list[FormPart]:
    """The parts of a ``multipart/form-data`` body, in order."""
    delim = b"--" + boundary_of(content_type)
    if body.startswith(delim):
        pos = len(delim)
    else:  # a preamble before the first boundary line
        first = body.find(b"\r\n" + delim)
        if first < 0:
            raise _bad("malformed multipart body: the boundary of the Content-Type never appears")
        pos = first + 2 + len(delim)
    parts: list[FormPart] = []
    while not body.startswith(b"--", pos):  # `--boundary--` closes the body; an epilogue may follow
        eol = body.find(b"\r\n", pos)
        if eol < 0 or body[pos:eol].strip(b" \t"):
            raise _bad("malformed multipart body: a boundary line is not followed by CRLF")
        end = body.find(b"\r\n" + delim, eol + 2)
        if end < 0:
            raise _bad("malformed multipart body: the closing boundary is missing")
        if len(parts) == max_parts:
            raise _bad(f"multipart body: more than {max_parts} parts")
        parts.append(_part(body[eol + 2:end]))
        pos = end + 2 + len(delim)
    return parts


def _part(raw: bytes) -> FormPart:
    if raw.startswith(b"\r\n"):
        head, data = b"", raw[2:]
    else:
        split = raw.find(b"\r\n\r\n", 0, MAX_PART_HEADER_BYTES + 4)
        if split < 0:
            raise _bad(f"malformed multipart part: no blank line after at most {MAX_PART_HEADER_BYTES} bytes "
                       "of headers")
        head, data = raw[:split], raw[split + 4:]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("malformed multipart part: its headers are not UTF-8") from None
    headers: dict[str, str] = {}
    for line in text.split("\r\n") if text else ():
        key, colon, value = line.partition(":")
        if not colon or not re.fullmatch(_TOKEN, key):
            raise _bad(f"malformed multipart part header: {field_name(line)!r}")
        headers[key.lower()] = value.strip()
    disposition, params = header_params(headers.get("content-disposition", ""))
    name = params.get("name")
    if disposition != "form-data" or not name:
        raise _bad('every multipart part needs "Content-Disposition: form-data; name=..."')
    encoding = headers.get("content-transfer-encoding", "binary").lower()
    if encoding not in ("binary", "7bit", "8bit"):
        raise ApiError(422, "validation_error", f"{field_name(name)}: Content-Transfer-Encoding "
                                                f"{field_name(encoding)!r} is not accepted; send the raw bytes")
    ctype = headers.get("content-type")
    if ctype is not None and ctype.lower().startswith("multipart/"):
        raise ApiError(422, "validation_error", f"{field_name(name)}: a nested multipart part is not accepted")
    return FormPart(name, params.get("filename"), ctype, data)


__all__ = ["MAX_PARTS", "FormPart", "boundary_of", "header_params", "parse_form_data"]
