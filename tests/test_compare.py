"""``training/compare.py``: the three systems' run configurations and the table read back from MLflow.

The trainings themselves are the same ``training.launch.fit`` that tests/test_training.py and
tests/test_vc2.py run; here: that each system's arguments resolve to the configuration the recipe names.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from helpers.ray_cluster import REPO

from fdreamer.config import parse_cli
from training.compare import SYSTEMS, system_args, table
from training.config import TrainConfig

BASE = ["--config", str(REPO / "training" / "configs" / "tiny_learn.yaml"), "--steps=40"]


def _cfgs(system: str, tmp_path: Path, **kw) -> list[TrainConfig]:
    opts = {"image_path": str(tmp_path / "images"), "steps": 40, "stage_b_steps": 10, "run_root": tmp_path}
    opts.update(kw)
    return [parse_cli(TrainConfig, a)[0] for a in system_args(system, BASE, "exp-compare", **opts)]


def test_fd_and_swap_differ_only_in_the_temporal_block(tmp_path: Path) -> None:
    (fd,), (swap,) = _cfgs("fd", tmp_path), _cfgs("swap", tmp_path)
    assert fd.model.temporal.block == "factorized" and swap.model.temporal.block == "swap"
    assert (fd.steps, fd.micro_batch, fd.seed, fd.optim.lr) == (swap.steps, swap.micro_batch, swap.seed, swap.optim.lr)
    assert fd.name != swap.name and fd.tracking.experiment == swap.tracking.experiment == "exp-compare"
    assert fd.tracking.tags["system"] == "fd" and swap.tracking.tags["system"] == "swap"


def test_vc2_is_joint_stage_a_then_spatial_only_stage_b_within_the_same_budget(tmp_path: Path) -> None:
    a, b = _cfgs("vc2", tmp_path)
    assert a.steps + b.steps == 40 and b.steps == 10
    assert a.data.image_ratio == 0.5 and a.data.image_path == str(tmp_path / "images") and not a.model.freeze
    assert a.image_micro_batch > 0 and a.video_micro_batch > 0
    assert b.data.image_ratio == 1.0 and set(b.model.freeze) == {"temporal", "adapter", "paca"}
    assert b.init_from == str(tmp_path / a.name) and b.micro_batch == a.micro_batch


def test_bad_systems_and_budgets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown system"):
        system_args("vc3", BASE, "e", image_path="x", steps=40, stage_b_steps=10, run_root=None)
    with pytest.raises(ValueError, match="needs --image_path"):
        system_args("vc2", BASE, "e", image_path=None, steps=40, stage_b_steps=10, run_root=None)
    with pytest.raises(ValueError, match="vc2_stage_b_steps"):
        system_args("vc2", BASE, "e", image_path="x", steps=40, stage_b_steps=40, run_root=None)


def test_table_reads_each_systems_metrics_back(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.create_experiment("t", artifact_location=str(tmp_path / "art"))
    runs = {}
    for i, system in enumerate(SYSTEMS):
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "eval_i2v_direction_accuracy", 0.125 * (i + 1))
        client.log_metric(run.info.run_id, "eval_t2v_pc", 0.3 + i)
        runs[system] = run.info.run_id
    lines = table(runs, uri).splitlines()
    assert len(lines) == 2 + len(SYSTEMS) and lines[0].startswith("| system | I2V dir. acc.")
    assert lines[2].startswith(f"| {SYSTEMS['fd']} | 0.1250 |") and "| 2.3000 |" in lines[4]
    assert lines[3].count("–") == len(lines[3].split("|")) - 5  # metrics a run lacks show as –


def test_study_options_are_split_from_the_training_keys() -> None:
    """``--systems``/``--eval.*`` configure the study; everything else goes to every run's TrainConfig."""
    from fdreamer.config import ConfigError
    from training.ablate import AblateConfig
    from training.compare import CompareConfig
    from training.study import parse_study

    study, rest = parse_study(CompareConfig, ["--config", "c.yaml", "--systems", "[fd,swap]", "--eval.data", "d",
                                              "--eval.steps", "3", "--optim.lr", "1e-4", "--steps=8"], "compare")
    assert study.systems == ["fd", "swap"] and study.eval.data == "d" and study.eval.steps == 3
    assert rest == ["--config", "c.yaml", "--optim.lr=1e-4", "--steps=8"]
    ablate, rest = parse_study(AblateConfig, ["--rows=[a*,e]", "--steps=2"], "ablate")
    assert ablate.rows == ["a*", "e"] and ablate.eval.data is None and rest == ["--steps=2"]
    with pytest.raises(ConfigError, match="rows are"):
        parse_study(AblateConfig, ["--rows=[z]"], "ablate")
    with pytest.raises(ConfigError, match="systems are"):
        parse_study(CompareConfig, ["--systems=[vc3]"], "compare")


def test_table4_rows_resolve_to_their_switches() -> None:
    """Each Table 4 row of ``training/ablate.py`` is the shared configuration plus only its own switches
    (the Ray Train runs of two rows are in tests/test_training.py)."""
    from training.ablate import VARIANTS, variant_args

    base = ["--config", str(REPO / "training" / "configs" / "tiny_stage1.yaml"), "--steps=2"]
    cfgs = {r: parse_cli(TrainConfig, variant_args(r, base, "exp-table4"))[0] for r in VARIANTS}
    got = {r: (c.schedule.shift, c.schedule.rescale, c.model.factorized, c.model.temporal_text_encoder,
               c.model.predictnet) for r, c in cfgs.items()}
    assert got == {"a": (False, False, True, "t5", True), "a*": (True, False, True, "t5", True),
                   "b": (True, True, False, "t5", True), "c": (True, True, True, "clip", True),
                   "d": (True, True, True, "t5", False), "e": (True, True, True, "t5", True)}
    assert len({c.name for c in cfgs.values()}) == 6 and {c.tracking.experiment for c in cfgs.values()} == {"exp-table4"}
    assert all(c.steps == 2 and c.tracking.tags["table4_row"] == r for r, c in cfgs.items())
    # on a base with the pixel-aligned first frame (tiny_i2v.yaml), every row but the direct T2V keeps it
    i2v = ["--config", str(REPO / "training" / "configs" / "tiny_i2v.yaml"), "--steps=2"]
    frames = {r: parse_cli(TrainConfig, variant_args(r, i2v, "exp"))[0].model.first_frame for r in VARIANTS}
    assert frames == {"a": "concat", "a*": "concat", "b": "paca", "c": "concat", "d": "concat", "e": "concat"}
