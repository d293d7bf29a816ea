"""Subcommands whose options are a typed config dataclass, parsed by :func:`fdreamer.config.parse_cli`.

The one CLI style of the project (the jobs' ``--config FILE --key.sub=value``) for ``fdreamer generate``,
``fdreamer evaluate`` and the study scripts. On top of ``parse_cli`` this accepts what people type:
``--num-frames 8`` for ``--num_frames=8`` and a bare ``--progress`` for ``--progress=true`` (bool fields).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

from fdreamer.config import ConfigError, parse_cli

T = TypeVar("T")


def _field_type(cls: type, dotted: str) -> Any:
    """The annotation of ``a.b.c`` in ``cls`` (None when there is no such field)."""
    tp: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _is_text(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))


def normalize_args(cls: type, argv: list[str]) -> list[str]:
    """``--a-b VALUE`` -> ``--a_b=VALUE``; a bare ``--flag`` of a bool field -> ``--flag=true``; the value
    of a text field is quoted, so a prompt such as ``yes`` or ``1`` stays text (values are read as YAML)."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if not arg.startswith("--") or arg in ("--config", "--help") or arg.startswith("--config="):
            out.append(arg)
            continue
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        tp = _field_type(cls, key)
        if not eq:
            if tp is bool:
                out.append(f"--{key}=true")
                continue
            nxt = next(it, None)
            if nxt is None:
                raise ConfigError(f"--{key} needs a value (use --{key}=VALUE)")
            value = nxt
        out.append(f"--{key}={json.dumps(value) if _is_text(tp) else value}")
    return out


def parse_command(cls: type[T], argv: list[str], prog: str) -> T:
    """Parse a config-style command line into ``cls`` (ConfigError on anything wrong)."""
    cfg, _ = parse_cli(cls, normalize_args(cls, argv), prog=prog)
    return cfg


def run_command(cls: type[T], run: Callable[[T], int], argv: list[str], prog: str) -> int:
    """Parse, then ``run(cfg)``; a configuration error is one line on stderr and exit code 2."""
    try:
        cfg = parse_command(cls, argv, prog)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return int(run(cfg) or 0)


def add_config_command(sub: Any, name: str, cls: type[T], run: Callable[[T], int], help: str) -> None:
    """Register ``fdreamer NAME`` (listed in ``--help``); :func:`fdreamer.cli.main.main` hands its
    arguments to :func:`run_command` untouched (argparse would reject the dotted keys)."""
    p = sub.add_parser(name, help=help, add_help=False)
    p.set_defaults(config_command=(cls, run))


__all__ = ["add_config_command", "normalize_args", "parse_command", "run_command"]
