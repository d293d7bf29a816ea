"""Kubernetes name and label syntax, as the API server and the KubeRay operator check it.

k8s.io/apimachinery/pkg/util/validation/validation.go (``IsDNS1035Label``, ``IsDNS1123Label``,
``IsDNS1123Subdomain``, ``IsQualifiedName``, ``IsValidLabelValue``), which KubeRay's validation.go calls.
Each function returns the list of problems (empty: valid), in the Go function's words.
"""

from __future__ import annotations

import re
from typing import Any

_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_QNAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"


def _syntax_errors(value: str, max_len: int, pattern: str, message: str, prefix: str = "") -> list[str]:
    """The length limit, then the pattern: the two checks every name rule makes."""
    errs = [f"{prefix}must be no more than {max_len} characters"] if len(value) > max_len else []
    if not re.fullmatch(pattern, value):
        errs.append(message)
    return errs


def is_dns1035_label(value: str) -> list[str]:
    return _syntax_errors(value, 63, r"[a-z]([-a-z0-9]*[a-z0-9])?",
                          "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
                          "alphabetic character, and end with an alphanumeric character")


def is_dns1123_subdomain(value: str) -> list[str]:
    return _syntax_errors(value, 253, rf"{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*",
                          "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
                          "'.', and must start and end with an alphanumeric character")


def is_qualified_name(value: str) -> list[str]:
    parts = value.split("/")
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix:
            return ["prefix part must be non-empty"]
        errs = is_dns1123_subdomain(prefix)
        if errs:
            return [f"prefix part {e}" for e in errs]
    else:
        return ["a qualified name must consist of alphanumeric characters, '-', '_' or '.', with an optional "
                "DNS subdomain prefix and '/'"]
    if not name:
        return ["name part must be non-empty"]
    return _syntax_errors(name, 63, _QNAME,
                          "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                          "with an alphanumeric character", prefix="name part ")


def is_valid_label_value(value: str) -> list[str]:
    return _syntax_errors(value, 63, rf"({_QNAME})?",
                          "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
                          "'.', and must start and end with an alphanumeric character")


def label_errors(labels: dict[str, Any], where: str) -> list[str]:
    """Every problem of a ``labels`` map (``ValidateLabels``), each prefixed with ``where``."""
    out = []
    for key, val in (labels or {}).items():
        out += [f"{where}: invalid label key {key!r}: {e}" for e in is_qualified_name(str(key))]
        if not isinstance(val, str):
            out.append(f"{where}: label {key!r} must be a string, got {val!r}")
        else:
            out += [f"{where}: invalid label value {val!r} for key {key!r}: {e}" for e in is_valid_label_value(val)]
    return out
