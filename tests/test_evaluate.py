"""``fdreamer evaluate`` (fdreamer/eval/evaluate.py) and the learning benchmark (tests/bench/bench_learning.py).

Plumbing runs on a tiny checkpoint with random weights (the numbers mean nothing there), the learning
benchmark's too; learning is asserted on the committed tiny I2V (test_tiny_i2v.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from helpers.checkpoints import tiny_checkpoint, tiny_schedule
from helpers.ray_cluster import subprocess_env

from fdreamer.checkpoint import resolve_checkpoint
from fdreamer.eval.evaluate import (
    EvalSettings,
    build_prompts,
    evaluate,
    format_table,
    psnr,
)
from fdreamer.models import (
    FactorizedDreamerUNet,
    ModelConfig,
)
from fdreamer.toy.sample_data import write_sample_data
from fdreamer.models.conditions import Conditions
from fdreamer.schedule import NoiseSchedule

REPO = Path(__file__).resolve().parents[1]
SCHEDULE = tiny_schedule()
META = {"num_frames": 8, "size": 64, "fps": 6, "preset": "tiny"}
FAST = EvalSettings(steps=2)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "s"
    write_sample_data(out, num_clips=24, workers=1)
    return out


@pytest.fixture(scope="module")
def checkpoint(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("train") / "tiny_run"
    return tiny_checkpoint(run / "checkpoint_step_00000005", tiny_dir, conditioned=True, meta={"step": 5})


def test_psnr_values() -> None:
    a = np.zeros((4, 4, 3), np.uint8)
    assert psnr(a, a) == 100.0
    b = a.copy()
    b[...] = 255  # mse = 255^2 -> 0 dB
    assert psnr(a, b) == pytest.approx(0.0)
    b[...] = 1  # mse = 1 -> 20 log10(255)
    assert psnr(a, b) == pytest.approx(48.1308, abs=1e-3)


def test_prompts_use_first_frames_and_motion_captions(sample: Path) -> None:
    items, real = build_prompts(sample, modes=("i2v", "t2v"), num_frames=8, size=(64, 64), fps=6.0, seed=3)
    rows = [json.loads(x) for x in (sample / "manifest.jsonl").read_text().splitlines()]
    held = sorted((r for r in rows if r["split"] == "heldout"), key=lambda r: r["clip_id"])
    assert len(real) == len(held) >= 1 and len(items) == 2 * len(held)
    i2v, t2v = items[: len(held)], items[len(held):]
    assert [it["prompt"] for it in i2v] == [r["motion_caption"] for r in held]
    assert [it["prompt"] for it in t2v] == [r["caption"] for r in held]
    assert [it["seed"] for it in i2v] == list(range(3, 3 + len(held)))
    assert all(it["image"] is None for it in t2v)
    for it, clip in zip(i2v, real, strict=True):
        assert it["image"].shape == (64, 64, 3) and np.array_equal(it["image"], clip[0])
        assert clip.shape == (8, 64, 64, 3)
    assert all(it["motion_prompt"] is None for it in items)  # T5 trained on the caption: it reads the prompt
    mc, _ = build_prompts(sample, modes=("t2v",), num_frames=8, size=(64, 64), t5_caption="motion_caption")
    assert [(it["prompt"], it["motion_prompt"]) for it in mc] == [(r["caption"], r["motion_caption"]) for r in held]


def test_resolve_checkpoint_from_run_folder(checkpoint: Path) -> None:
    path, run_id = resolve_checkpoint(str(checkpoint.parent))
    assert path == checkpoint and run_id is None
    with pytest.raises(ValueError, match="not a checkpoint"):
        resolve_checkpoint(str(checkpoint.parent / "missing"))


def test_evaluate_in_process_logs_to_mlflow(checkpoint: Path, sample: Path, mlflow_server: str, tmp_path: Path) -> None:
    client = mlflow.tracking.MlflowClient(mlflow_server)
    exp = client.create_experiment(f"eval-test-{tmp_path.name}")
    run_id = client.create_run(exp).info.run_id
    res = evaluate(checkpoint, sample, modes=("i2v", "t2v"), num=2, split=None, settings=FAST, out=tmp_path / "out",
                   tracking_uri=mlflow_server, run_id=run_id)
    assert set(res.summary) == {"i2v", "t2v", "real"}
    for mode in ("i2v", "t2v"):
        s = res.summary[mode]
        assert s["n"] == 2 and 0.0 <= s["direction_accuracy"] <= 1.0
        assert -1.0 <= s["fc"] <= 1.0 and -1.0 <= s["pc"] <= 1.0
        assert s["psnr0"] > 0 and s["warping_error"] >= 0 and s["flow_magnitude"] >= 0
        assert np.isfinite(s["fd_pixelflow"])
    assert res.summary["real"]["direction_accuracy"] == 1.0  # the classifier on the real clips
    logged = client.get_run(run_id).data
    for key in ("eval_i2v_direction_accuracy", "eval_i2v_fc", "eval_i2v_pc", "eval_i2v_psnr0",
                "eval_i2v_warping_error", "eval_i2v_fd_pixelflow", "eval_t2v_fc", "eval_real_direction_accuracy"):
        assert logged.metrics[key] == pytest.approx(res.summary[key.split("_")[1]]["_".join(key.split("_")[2:])])
    assert logged.params["eval_steps"] == "2"
    rows = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["mode"] for r in rows} == {"i2v", "t2v"}
    assert all(r["predicted_motion"] and isinstance(r["correct"], bool) for r in rows)
    assert len(list((tmp_path / "out").glob("*.mp4"))) == 4
    table = format_table(res)
    assert table.splitlines()[0].startswith("| mode | n | direction_accuracy") and "| i2v | 2 |" in table


def test_seeds_make_evaluation_repeatable(checkpoint: Path, sample: Path) -> None:
    a = evaluate(checkpoint, sample, num=1, settings=FAST, log=False)
    b = evaluate(checkpoint, sample, num=1, settings=FAST, log=False)
    assert a.rows[0]["fc"] == b.rows[0]["fc"] and a.rows[0]["psnr0"] == b.rows[0]["psnr0"]


def test_ray_job_prints_table_and_json_over_ray_data(checkpoint: Path, sample: Path, ray_head: dict, tmp_path: Path,
                                                    s3_endpoint: str) -> None:
    """The Ray Data evaluation job on a run folder in a bucket (the session's moto server): the driver finds its
    latest checkpoint there, each actor fetches it on its node; same videos as in-process from the local folder."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="eval-runs")
    for f in checkpoint.rglob("*"):
        if f.is_file():
            client.upload_file(str(f), "eval-runs", f"tiny_run/{f.relative_to(checkpoint.parent).as_posix()}")
    proc = subprocess.run(
        [sys.executable, "training/evaluate_job.py", "--checkpoint", "s3://eval-runs/tiny_run", "--data", str(sample),
         "--split", "all", "--num", "2", "--sampling.steps", "2", "--log=false", "--out", str(tmp_path / "o"),
         "--ray_address", ray_head["address"], "--concurrency", "2", "--s3_endpoint", s3_endpoint],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    assert out["checkpoint"] == "s3://eval-runs/tiny_run/checkpoint_step_00000005"
    assert out["i2v_n"] == 2 and "i2v_direction_accuracy" in out and "i2v_fc" in out
    assert any(line.startswith("| i2v | 2 |") for line in lines)
    local = evaluate(checkpoint, sample, num=2, split=None, settings=FAST, log=False)  # same seeds in-process: same videos
    assert out["i2v_fc"] == pytest.approx(local.summary["i2v"]["fc"], abs=1e-4)


def test_caption_probe_hand_computed_ranks_and_fixed_noise_losses() -> None:
    """The loss probes (fdreamer.eval.probes, used by the bench_caption_* scripts): ranks/gap from
    hand-made losses; losses are a function of the conditions alone (fixed noise)."""
    from fdreamer.eval.probes import condition_losses as caption_losses
    from fdreamer.eval.probes import rank_stats, swapped_first_frames

    # true caption = column 0: clip 0 has the lowest loss there (rank 0), clip 1 the highest (rank 2)
    stats = rank_stats(torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.1, 0.2]]), [0, 0])
    assert stats == pytest.approx({"true_rank_mean": 1.0, "true_best_fraction": 0.5, "chance_rank": 1.0,
                                   "gap_mean": 0.0}, abs=1e-6)  # gaps (0.25 - 0.1) and (0.15 - 0.3)
    torch.manual_seed(0)
    model = FactorizedDreamerUNet.from_preset("tiny", ModelConfig.tiny(), seed=0).eval()
    b = 2
    base = Conditions(text_tokens=torch.randn(b, 77, 32), image_embed=torch.randn(b, 32),
                      first_frame=torch.randn(b, 4, 16, 16), t5_tokens=torch.randn(b, 5, 64),
                      t5_mask=torch.ones(b, 5, dtype=torch.bool))
    other = Conditions(**{**base.as_kwargs(), "text_tokens": torch.randn(b, 77, 32)})
    x0, noise = torch.randn(b, 4, 8, 16, 16), torch.randn(b, 4, 8, 16, 16)
    losses = caption_losses(model, NoiseSchedule(SCHEDULE), x0, noise, [base, other, base], (300, 900))
    assert losses.shape == (b, 3) and bool((losses > 0).all())
    assert torch.equal(losses[:, 0], losses[:, 2])  # the same conditions, the same loss
    assert not torch.allclose(losses[:, 0], losses[:, 1])  # the spatial cross-attention reads the caption
    # first-frame probe: clip i under clip i+s's image conditions (batch rolled), text kept; true set first
    b3 = Conditions(**{k: None if v is None else torch.cat([v, v[:1] + 1]) for k, v in base.as_kwargs().items()})
    sets = swapped_first_frames(b3, 2)
    assert len(sets) == 3 and torch.equal(sets[0].first_frame, b3.first_frame)
    assert torch.equal(sets[1].first_frame[0], b3.first_frame[1]) and torch.equal(sets[2].first_frame[2], b3.first_frame[1])
    assert torch.equal(sets[2].image_embed[0], b3.image_embed[2]) and torch.equal(sets[1].text_tokens, b3.text_tokens)
    with pytest.raises(ValueError, match="k must be in"):
        swapped_first_frames(b3, 3)


def test_cli_errors_are_one_line(sample: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fdreamer.cli.main", "evaluate", "--checkpoint", str(tmp_path),
                           "--data", str(sample)],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "not a checkpoint" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_cli_in_process_config_style(checkpoint: Path, sample: Path, tmp_path: Path, capsys) -> None:
    """``fdreamer evaluate`` takes the config-style options (hyphens or underscores, bare bool flags)."""
    from fdreamer.cli.main import main as cli_main

    rc = cli_main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(sample), "--num", "1",
                   "--sampling.steps=2", "--log=false", "--save-videos", "0", "--out", str(tmp_path / "o")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["i2v_n"] == 1 and (tmp_path / "o" / "summary.json").is_file()
    assert not list((tmp_path / "o").glob("*.mp4"))  # --save-videos 0
    assert cli_main(["evaluate", "--checkpoint", str(checkpoint), "--sampling.stepz=2"]) == 2
    assert "did you mean 'sampling.steps'" in capsys.readouterr().err


def test_learning_benchmark_evaluates_a_given_checkpoint(checkpoint: Path, sample: Path, tmp_path: Path) -> None:
    """The learning benchmark's evaluate -> JSON line, on a given checkpoint (``--checkpoint``: no training;
    the training it otherwise runs is ``training/run.py``, tested in test_training.py; learning itself is
    asserted on the committed I2V in test_tiny_i2v.py). Only the plumbing and the JSON line are asserted."""
    sys.path.insert(0, str(REPO / "tests" / "bench"))
    from bench_learning import run_benchmark

    prepared = {"sample": sample, "models": tmp_path / "unused", "output": tmp_path / "unused"}
    out = run_benchmark(tmp_path / "work", num_clips=24, config="training/configs/tiny_learn.yaml", steps=None,
                        eval_steps=2, ray_address="unused", num_eval=1, prepared=prepared, extra=[], trained=checkpoint)
    assert out["n_eval"] == 1 and 0.0 <= out["direction_accuracy"] <= 1.0
    assert out["real_direction_accuracy"] == 1.0 and out["checkpoint"] == str(checkpoint)
    assert out["psnr0"] > 0 and 0.0 < out["fc"] <= 1.0
    assert set(out["timings"]) == {"evaluate_s", "total_s"}
    assert not (tmp_path / "work" / "train").exists()
