#!/usr/bin/env bash
# Two-node local Ray cluster: cluster/local.sh up|down|status [--json]  (see cluster/local.py)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$repo/.venv/bin/python"
[ -x "$py" ] || py="$(command -v python3)"
exec "$py" "$repo/cluster/local.py" "$@"
