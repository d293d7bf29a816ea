"""``training/rows.py``: which rows a stage reads, without torch (it runs in Ray Data read tasks)."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa

from training.config import DataConfig
from training.rows import FILTER_COLUMNS, IMAGE, VIDEO, columns_for, filter_rows, row_filter, row_mask


def _table() -> pa.Table:
    return pa.table({
        "clip_id": ["a", "b", "c", "d", "e", "f"],
        "split": ["train", "train", "heldout", "train", None, "train"],
        "motion_score": [0.01, 0.5, 0.5, None, 0.5, None],
        "num_frames": [8, 8, 8, 16, 8, 1],
        "schema_version": [3] * 6,
    })


def test_row_mask_selects_split_motion_range_frames_and_kind() -> None:
    t = _table()
    cfg = DataConfig(min_motion_score=0.05, max_motion_score=None, num_frames=8)
    assert row_mask(t, cfg, "train").to_pylist() == [False, True, False, False, False, False]
    assert row_mask(t, cfg, None).to_pylist() == [False, True, True, False, True, False]  # no split filter
    wide = DataConfig(min_motion_score=None, max_motion_score=None, num_frames=None)
    assert row_mask(t, wide, "train").to_pylist() == [True, True, False, True, False, False]  # clips only
    assert row_mask(t, wide, "train", IMAGE).to_pylist() == [False] * 5 + [True]  # the 1-frame row
    capped = DataConfig(min_motion_score=None, max_motion_score=0.1, num_frames=None)
    assert row_mask(t, capped, "train").to_pylist() == [True, False, False, False, False, False]  # null score out


def test_row_filter_expression_selects_what_the_mask_selects() -> None:
    """The held-out scan's pushed-down expression and the Ray Data mask are one selection (nulls included)."""
    import pyarrow.dataset as pads

    t = _table()
    configs = [DataConfig(min_motion_score=0.05, max_motion_score=None, num_frames=8),
               DataConfig(min_motion_score=None, max_motion_score=0.1, num_frames=None),
               DataConfig(min_motion_score=None, max_motion_score=None, num_frames=None)]
    for cfg in configs:
        for split in ("train", "heldout", None):
            for kind in (VIDEO, IMAGE):
                want = t.filter(row_mask(t, cfg, split, kind)).column("clip_id").to_pylist()
                got = pads.dataset(t).to_table(filter=row_filter(cfg, split, kind)).column("clip_id").to_pylist()
                assert got == want, (cfg, split, kind)


def test_filter_rows_is_the_mask_and_drops_filter_columns() -> None:
    cfg = DataConfig(min_motion_score=0.05, max_motion_score=None, num_frames=None)
    out = filter_rows(_table(), cfg, "train")
    assert out["clip_id"].to_pylist() == ["b"]
    assert out.column_names == ["clip_id"]
    assert row_mask(_table(), cfg, "train").to_pylist().count(True) == 1
    assert set(FILTER_COLUMNS) <= set(columns_for(False, VIDEO)) and "flow" in columns_for(True, VIDEO)
    assert "flow" not in columns_for(True, IMAGE) and "first_latent" not in columns_for(False, IMAGE)


def test_row_selection_imports_no_torch() -> None:
    code = "import sys, training.rows; print(sorted(m for m in ('torch', 'diffusers', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
