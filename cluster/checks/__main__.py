"""``python -m cluster.checks``: every offline check of the real-cluster configs (exit 1 on any problem)."""

import sys

from cluster.checks.report import main

sys.exit(main())
