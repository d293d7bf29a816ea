"""The ``fdreamer`` command: one subcommand per job of the library.

Each module registers its own subcommands through ``register_cli(subparsers)`` so this file stays a
list; heavy imports (torch, diffusers) happen inside the command functions, keeping ``--help`` fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands, in the order they appear in --help.
_COMMAND_MODULES = (
    "fdreamer.cli.demo",
    "fdreamer.toy.sample_data",
    "fdreamer.toy.web_data",
    "fdreamer.toy.tiny_models",
    "fdreamer.toy.vae_train",
    "fdreamer.schedule",
    "fdreamer.cli.describe",
    "fdreamer.cli.generate",
    "fdreamer.cli.evaluate",
    "fdreamer.cli.export",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fdreamer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and not argv[0].startswith("-"):
        subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        chosen = subcommands.get(argv[0])
        command = chosen.get_default("config_command") if chosen is not None else None
        if command is not None:  # config-style: fdreamer.config.parse_cli reads the rest
            from fdreamer.cli.config_command import run_command

            cls, run = command
            return run_command(cls, run, argv[1:], prog=f"fdreamer {argv[0]}")
    args = parser.parse_args(argv)
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
