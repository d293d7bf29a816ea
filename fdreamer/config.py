"""Typed configuration: dataclasses loaded from YAML with dotted command-line overrides.

Every job (preprocess, train, serve) describes its settings as a tree of dataclasses whose fields carry
their help text (``opt(default, "help")``). ``load_config`` builds that tree from

1. the dataclass defaults,
2. a YAML file, which may derive from another with ``extends: base.yaml`` (path relative to the file,
   applied first, recursively),
3. dotted overrides such as ``--optim.lr=1e-4`` (values parsed as YAML scalars/lists),

and fails early with a :class:`ConfigError` naming the key and where its value came from for unknown
keys, wrong types and missing required values, and naming the file (or override) for unreadable or
unparsable YAML, including values nested more than :data:`MAX_DEPTH` levels deep.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")

EXTENDS_KEY = "extends"
MAX_DEPTH = 32  # levels of lists/mappings in a config file or override value, the top level counted


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or missing."""


def opt(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with a help text; mutable defaults (list/dict) are copied per instance."""
    metadata = {"help": help}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


def nested(cls: type, help: str = "") -> Any:
    """A field holding a nested config dataclass, default-constructed."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


# ----------------------------------------------------------------------------- reading sources


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> tuple[dict, dict[str, str]]:
    """Read a YAML config, resolving ``extends``; returns (data, provenance of each dotted key)."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"config files extend each other in a cycle: {chain}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    data = _safe_load(text, f"YAML in {path}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    merged: dict = {}
    provenance: dict[str, str] = {}
    base = data.pop(EXTENDS_KEY, None)
    if base is not None:
        bases = base if isinstance(base, list) else [base]
        for b in bases:
            if not isinstance(b, str):
                raise ConfigError(f"{path}: '{EXTENDS_KEY}' must be a file path or a list of paths")
            base_data, base_prov = read_yaml(path.parent / b, (*_seen, path))
            _deep_merge(merged, base_data, provenance, base_prov)
    _deep_merge(merged, data, provenance, _provenance_of(data, str(path)))
    return merged, provenance


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> tuple[dict, dict[str, str]]:
    """Turn ``["--optim.lr=1e-4", "data.frames=8"]`` into a nested dict (values parsed as YAML)."""
    data: dict = {}
    provenance: dict[str, str] = {}
    for raw in overrides:
        item = raw[2:] if raw.startswith("--") else raw
        if "=" not in item:
            raise ConfigError(f"override {raw!r} must look like --key.sub=value")
        key, value_text = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {raw!r} has an empty key part")
        shown = raw if len(raw) <= 80 else raw[:77] + "..."
        value = _safe_load(value_text, f"the value of override {shown!r}") if value_text != "" else ""
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {raw!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
        provenance[key] = f"command-line override {raw!r}"
        if isinstance(value, dict):
            provenance.update(_provenance_of(value, f"command-line override {raw!r}", prefix=key + "."))
    return data, provenance


def _safe_load(text: str, what: str) -> Any:
    """``yaml.safe_load(text)``, with every failure a ConfigError naming ``what`` (the file or override).

    Values nested deeper than :data:`MAX_DEPTH` lists/mappings are refused: a config is a few levels
    deep, and PyYAML's parser recurses once per level, so a deep enough document would otherwise end
    in a RecursionError.
    """
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"cannot parse {what}: lists/mappings nested more than {MAX_DEPTH} levels deep") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: e.g. a date such as 2024-13-45
        raise ConfigError(f"cannot parse {what}: {exc}") from exc
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:  # iterative: the check itself must not recurse
        node, key, depth = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        if depth >= MAX_DEPTH:
            where = f"at '{key}'" if key else "at the top level"
            raise ConfigError(f"cannot parse {what}: lists/mappings nested more than {MAX_DEPTH} levels deep {where}")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            sub = f"{key}.{k}" if isinstance(node, dict) else f"{key}[{k}]"
            stack.append((v, sub.lstrip("."), depth + 1))
    return data


def _provenance_of(data: dict, source: str, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in data.items():
        out[prefix + str(k)] = source
        if isinstance(v, dict):
            out.update(_provenance_of(v, source, prefix + f"{k}."))
    return out


def _deep_merge(dst: dict, src: dict, dst_prov: dict[str, str], src_prov: dict[str, str]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v, {}, {})
        else:
            dst[k] = v
    dst_prov.update(src_prov)


# ----------------------------------------------------------------------------- building dataclasses


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    data: dict | None = None,
) -> T:
    """Build ``cls`` from defaults <- YAML file (with ``extends``) <- ``data`` <- dotted overrides."""
    merged: dict = {}
    provenance: dict[str, str] = {}
    if path is not None:
        file_data, file_prov = read_yaml(path)
        _deep_merge(merged, file_data, provenance, file_prov)
    if data:
        _deep_merge(merged, data, provenance, _provenance_of(data, "the given data"))
    if overrides:
        ov_data, ov_prov = parse_overrides(overrides)
        _deep_merge(merged, ov_data, provenance, ov_prov)
    default_source = f"config file {Path(path).resolve()}" if path is not None else "the defaults"
    return _build(cls, merged, "", provenance, default_source)


def _build(cls: type, data: Any, prefix: str, prov: dict[str, str], default_source: str) -> Any:
    where = _where(prefix.rstrip("."), prov, default_source)
    if not isinstance(data, dict):
        raise ConfigError(
            f"'{prefix.rstrip('.') or '<root>'}' must be a mapping for {cls.__name__}, "
            f"got {type(data).__name__} ({where})"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            full = prefix + str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown key '{full}' ({_where(full, prov, default_source)}); "
                f"{cls.__name__} accepts: {', '.join(fields)}{hint}"
            )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        full = prefix + name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], full, prov, default_source)
        elif dataclasses.is_dataclass(hints[name]):  # absent section: defaults, required keys reported
            kwargs[name] = _build(hints[name], {}, full + ".", prov, default_source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(
                f"missing required value '{full}' ({default_source}): {f.metadata.get('help', '')}".rstrip(": ")
            )
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"invalid {cls.__name__} at '{prefix.rstrip('.') or '<root>'}' ({where}): {exc}") from exc


def _where(key: str, prov: dict[str, str], default_source: str) -> str:
    return prov.get(key, default_source)


def _convert(tp: Any, value: Any, key: str, prov: dict[str, str], default_source: str) -> Any:
    origin = get_origin(tp)
    args = get_args(tp)

    def fail(expected: str) -> ConfigError:
        return ConfigError(
            f"wrong type for '{key}' ({_where(key, prov, default_source)}): expected {expected}, "
            f"got {type(value).__name__} {value!r}"
        )

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", prov, default_source)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key, prov, default_source)
            except ConfigError:
                continue  # try the next member of the union; the combined error follows
        raise fail(" or ".join(_type_name(a) for a in args))
    if origin is Literal:
        if value in args:
            return value
        raise fail("one of " + ", ".join(repr(a) for a in args))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise fail("one of " + ", ".join(repr(m.value) for m in tp)) from None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail(_type_name(tp))
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise fail(f"{_type_name(tp)} with {len(args)} items")
            return tuple(_convert(a, v, f"{key}[{i}]", prov, default_source) for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_convert(item, v, f"{key}[{i}]", prov, default_source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise fail(_type_name(tp))
        vt = args[1] if args else Any
        return {str(k): _convert(vt, v, f"{key}.{k}", prov, default_source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail("bool (true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail("int")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise fail("float")
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail("str")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise fail("path")
    raise ConfigError(f"'{key}': unsupported field type {tp!r} in the config dataclass")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# ----------------------------------------------------------------------------- output and CLI help


def to_dict(cfg: Any) -> dict:
    """The config as plain YAML-able data (paths as strings, tuples as lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, enum.Enum):
            return v.value
        return v

    return plain(cfg)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-4}}`` -> ``{"optim.lr": 1e-4}`` (e.g. for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def help_text(cls: type, prefix: str = "") -> str:
    """One line per field: ``--optim.lr (float, default 5e-05): learning rate``."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(help_text(tp, f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f"default {f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"default {f.default_factory()!r}"
        else:
            default = "required"
        lines.append(f"  --{prefix}{f.name} ({_type_name(tp)}, {default}): {f.metadata.get('help', '')}")
    return "\n".join(lines)


def parse_cli(cls: type[T], argv: list[str], prog: str = "") -> tuple[T, str | None]:
    """Parse ``[--config FILE] [--key=value ...]`` for a job entry point; ``--help`` lists the fields."""
    path: str | None = None
    overrides: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in ("-h", "--help"):
            print(f"usage: {prog or 'job'} [--config FILE.yaml] [--key.sub=value ...]\n\nfields:\n{help_text(cls)}")
            raise SystemExit(0)
        if arg == "--config":
            path = next(it, None)
            if path is None:
                raise ConfigError("--config needs a file path")
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("--") and "=" not in arg:
            value = next(it, None)
            if value is None:
                raise ConfigError(f"{arg} needs a value (use {arg}=VALUE)")
            overrides.append(f"{arg}={value}")
        else:
            overrides.append(arg)
    return load_config(cls, path, overrides), path
