"""``fdreamer evaluate``: score a checkpoint on held-out prompts, in this process (:mod:`fdreamer.eval.evaluate`).

The same evaluation on a Ray cluster (Ray Data actors): ``python training/evaluate_job.py`` with the same options.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from fdreamer.eval.evaluate import EvalConfig, EvalResult, domain_errors, evaluate_config, format_table


def report(result: EvalResult) -> None:
    """The table, then one JSON line, on stdout."""
    print(format_table(result), flush=True)
    print(json.dumps(result.json_line()), flush=True)


def run(cfg: EvalConfig) -> int:
    try:
        result = evaluate_config(cfg)
    except domain_errors() as exc:  # by class: any other exception is a bug and keeps its traceback
        print(f"fdreamer evaluate: {exc}", file=sys.stderr)
        return 2
    report(result)
    return 0


def register_cli(sub: Any) -> None:
    from fdreamer.cli.config_command import add_config_command

    add_config_command(sub, "evaluate", EvalConfig, run, help="generate held-out prompts with a checkpoint, score them "
                       "(FC, PC, motion), log to MLflow; prints a table and a JSON line")


__all__ = ["register_cli", "report", "run"]
