"""``fdreamer describe-model``: parameter counts of the video UNet per component, built on the meta device.

Building on ``torch.device("meta")`` allocates no weights, so the SD1.5-sized model (about 2.2 B
parameters with the PredictNet) is counted in seconds on any machine. By default the full model of
Table 4 (e) is described — factorized, T5 temporal text, PredictNet present (it exists only in the
final training stage and never at inference; ``--no-predictnet`` leaves it out).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

COMPONENTS = ("spatial", "temporal", "adapter", "paca", "predictnet")
LABELS = {
    "spatial": "spatial (SD UNet)",
    "temporal": "temporal layers",
    "adapter": "T2I adapter (Eq. 2)",
    "paca": "PACA (Eq. 3)",
    "predictnet": "PredictNet (Eq. 4)",
    "total": "total",
}


def describe(
    preset: str, *, predictnet: bool = True, factorized: bool = True, temporal_text_encoder: str = "t5"
) -> dict[str, Any]:
    """Parameter counts per component of ``preset`` (meta device) and the config used."""
    import torch

    from fdreamer.config import to_dict
    from fdreamer.models import (
        FactorizedDreamerUNet,
        count_parameters,
        preset_model_config,
    )

    cfg = preset_model_config(
        preset, predictnet=predictnet, factorized=factorized, temporal_text_encoder=temporal_text_encoder
    )
    model = FactorizedDreamerUNet.from_preset(preset, cfg, device=torch.device("meta"))
    return {"preset": preset, "parameters": count_parameters(model), "config": to_dict(cfg)}


def format_table(info: dict[str, Any]) -> str:
    """A fixed-width table: component, parameters, millions, share of the total."""
    counts = info["parameters"]
    total = counts["total"]
    lines = [f"Factorized-Dreamer video UNet, preset {info['preset']!r} (built on the meta device)",
             f"{'component':<22} {'parameters':>15} {'millions':>10} {'share':>7}"]
    lines.append("-" * len(lines[-1]))
    for key in (*COMPONENTS, "total"):
        if key == "total":
            lines.append("-" * len(lines[1]))
        n = counts[key]
        share = 100.0 * n / total if total else 0.0
        lines.append(f"{LABELS[key]:<22} {n:>15,} {n / 1e6:>9.2f}M {share:>6.1f}%")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    info = describe(
        args.preset,
        predictnet=not args.no_predictnet,
        factorized=not args.direct,
        temporal_text_encoder=args.temporal_text_encoder,
    )
    print(json.dumps(info, sort_keys=True) if args.json else format_table(info))
    return 0


def register_cli(sub: Any) -> None:
    """Add ``describe-model [--preset tiny|sd15] [--json] [--no-predictnet] [--direct] [--temporal-text-encoder]``."""
    p = sub.add_parser(
        "describe-model",
        help="parameter counts per component of the video UNet (meta device, no weights)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--preset", choices=("tiny", "sd15"), default="sd15", help="model preset (default sd15)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--no-predictnet", action="store_true", help="leave out the PredictNet (inference graph)")
    p.add_argument("--direct", action="store_true", help="direct T2V variant: no adapter, no PACA (Table 4 b)")
    p.add_argument(
        "--temporal-text-encoder", choices=("t5", "clip"), default="t5",
        help="tokens of the temporal cross-attention (Table 4 c: clip)",
    )
    p.set_defaults(func=_run)
