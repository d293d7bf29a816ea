"""The README's main job: ``python cluster/main_job.py`` on a machine without ffmpeg.

The end-to-end test runs it with ``--storage s3`` (a local moto S3 server started by the job: clips,
features, checkpoints, served videos and MLflow artifacts in its bucket) on a fresh local 2-node cluster
with a PATH that has no ``ffprobe`` / ``ffmpeg`` (every other tool of the machine is there): sample data -> MLflow server ->
``cluster/local.sh up`` -> ``ray job submit`` preprocessing -> ``ray job submit`` training (2 workers
over both nodes) -> ``serve deploy`` -> one text-to-video request over HTTP -> everything stopped. It
checks the jobs SUCCEEDED through the Ray Jobs API (the script fails otherwise), training placed
workers on both nodes (MLflow tag), and the served mp4: probed and fully decoded by the main job with
PyAV, and again by ffprobe here when it is installed. Training is 2 steps of fine-tuning the committed tiny
I2V, served with the committed tiny T2I: the served video (seed 7) shows a red subject moving right, as
the prompt says (``served_video``; the models' accuracy over many prompts is tests/test_tiny_i2v.py's).

Two fast tests: the probe step alone without ffmpeg on PATH (a real H.264 file, and a cut one), and
the up-front checks (a missing tool, a bad argument: one line, exit code 2, nothing started).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from helpers.ffprobe import ffprobe_stream
from helpers.ray_cluster import REPO, free_port, subprocess_env

from cluster.main_job import PROMPT, check_video, describe_video, training_plan
from fdreamer.data.video import VideoDecodeError, write_video

MAIN_JOB = REPO / "cluster" / "main_job.py"
FFMPEG_TOOLS = ("ffprobe", "ffmpeg", "ffplay")


def path_without(shim: Path, names: tuple[str, ...]) -> str:
    """A PATH of one folder holding a link to every executable on the current PATH except ``names``
    (the first of each name wins, as on the PATH): this machine without those tools."""
    shim.mkdir(parents=True, exist_ok=True)
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not folder or not Path(folder).is_dir():
            continue
        for exe in Path(folder).iterdir():
            link = shim / exe.name
            if exe.name in names or link.is_symlink() or not (exe.is_file() and os.access(exe, os.X_OK)):
                continue
            link.symlink_to(exe)
    assert all(not (shim / n).exists() for n in names)
    return str(shim)


def moving_square(num_frames: int = 8, size: int = 64) -> np.ndarray:
    frames = np.zeros((num_frames, size, size, 3), np.uint8)  # [T, H, W, 3]
    for t in range(num_frames):
        frames[t, 20:36, 4 + 5 * t:20 + 5 * t] = (220, 40, 40)
    return frames


def test_probe_step_needs_no_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mp4 = write_video(tmp_path / "t2v.mp4", moving_square(), fps=8.0)
    monkeypatch.setenv("PATH", path_without(tmp_path / "bin", FFMPEG_TOOLS))
    video = check_video(mp4)
    assert (video["codec"], video["num_frames"], video["decoded_frames"]) == ("h264", 8, 8)
    assert (video["width"], video["height"], video["pix_fmt"]) == (64, 64, "yuv420p")
    # a cut download (moov atom first, half the frames' data gone) is a clear error naming the file
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(mp4.read_bytes()[: mp4.stat().st_size * 2 // 3])
    with pytest.raises(VideoDecodeError, match=str(cut)):
        check_video(cut)


def test_main_job_says_what_is_missing_before_any_work(tmp_path: Path) -> None:
    work = tmp_path / "main-job"
    env = subprocess_env(PATH=path_without(tmp_path / "bin", ("bash",)))
    proc = subprocess.run([sys.executable, str(MAIN_JOB), f"--workdir={work}"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == ["main job: bash not found on PATH (cluster/local.sh needs it): install bash"]
    assert proc.stdout == "" and not work.exists()
    bad = subprocess.run([sys.executable, str(MAIN_JOB), f"--workdir={work}", "--clips=0"], env=subprocess_env(),
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and bad.stderr.splitlines()[-1].endswith("error: --clips must be >= 1, got 0")
    assert not work.exists()


def test_training_plan_fine_tunes_the_committed_i2v_when_installed(tmp_path: Path) -> None:
    """With the committed I2V installed (``i2v_trained``) the main job fine-tunes it on clips preprocessed as
    it was trained (T5 on the motion caption) and serves text-to-video through the committed T2I; without,
    stage 1 from scratch."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny_models.json").write_text(json.dumps({"i2v_trained": True, "unet_trained": True}))
    plan = training_plan(models)
    assert plan == {"config": "training/configs/tiny_finetune.yaml", "init_from": str(models / "i2v"),
                    "t5_caption": "motion_caption", "name": "main_tiny_finetune", "t2i_path": str(models)}
    assert (REPO / plan["config"]).is_file()
    (models / "tiny_models.json").write_text(json.dumps({"i2v_trained": False, "unet_trained": False}))
    plan = training_plan(models)
    assert (plan["config"], plan["init_from"], plan["t5_caption"], plan["t2i_path"]) == (
        "training/configs/tiny_stage1.yaml", None, "caption", None)


def test_the_served_video_is_described_by_colour_and_motion(sample_clips: Path, tmp_path: Path) -> None:
    """``served_video`` reads what a video shows: on real sample clips (8 frames, as served) the subject's
    colour and its motion class are the manifest's; the prompt the main job sends names a sample motion."""
    rows = [json.loads(line) for line in (sample_clips / "manifest.jsonl").read_text().splitlines()]
    from fdreamer.data.video import probe_video, read_video

    for row in [r for r in rows if r["motion"] in ("left", "right", "up", "down")]:
        clip = read_video(row["path"], 8, stride=3, backend="pyav").frames
        path = tmp_path / f"{row['clip_id']}.mp4"
        write_video(path, clip, 4.0)
        assert probe_video(path).num_frames == 8
        assert describe_video(path, row["subject_color"]) == {"colour": row["subject_color"], "motion": row["motion"]}
    assert PROMPT["motion_prompt"] in PROMPT["prompt"] and PROMPT["colour"] in PROMPT["motion_prompt"]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_main_job_end_to_end(tmp_path: Path) -> None:
    work = tmp_path / "main-job"
    no_ffmpeg = path_without(tmp_path / "bin", FFMPEG_TOOLS)
    env = subprocess_env(FDREAMER_DASHBOARD_PORT=str(free_port()), FDREAMER_CLUSTER_DIR=str(tmp_path / "c"),
                         PATH=no_ffmpeg)
    proc = subprocess.run([sys.executable, str(MAIN_JOB), f"--workdir={work}", "--clips=24", "--steps=2",
                           "--keep-mlflow", "--storage=s3"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=1400, check=False)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"main job timings (s): {result['timings_s']}")
    try:
        stream = result["mp4_stream"]  # the main job's own check: PyAV probed and decoded every frame
        assert (stream["codec"], stream["num_frames"], stream["decoded_frames"]) == ("h264", 8, 8)
        assert (stream["width"], stream["height"]) == (64, 64)
        ffprobe = ffprobe_stream(result["mp4"])  # an independent player, where installed
        if ffprobe is not None:
            assert ffprobe == {"codec_name": "h264", "width": 64, "height": 64, "nb_read_frames": 8}
        assert result["plan"]["init_from"] and result["plan"]["t2i_path"]  # the committed I2V and T2I
        shows = result["served_video"]
        assert (shows["colour"], shows["motion"]) == (shows["prompt_colour"], shows["prompt_motion"]) == ("red", "right")
        # --storage s3: every job read and wrote the bucket; the workdir holds only caches and service state
        bucket = result["bucket"]
        assert result["parquet_summary"] == "s3://fdreamer/preprocessed/summary.json"
        assert result["parquet_summary_json"]["written"] > 0
        assert sum(k.endswith(".mp4") for k in bucket["sample"]) == 24 and "sample/manifest.jsonl" in bucket["sample"]
        pre = bucket["preprocessed"]
        assert {"preprocessed/_SUCCESS", "preprocessed/null_conditions.safetensors",
                "preprocessed/duplicates.parquet", "preprocessed/quarantine.parquet"} <= set(pre)
        assert any(k.startswith("preprocessed/shards/part-") for k in pre)
        assert result["checkpoint"].startswith("s3://fdreamer/storage/main_tiny_finetune/checkpoint_step_")
        ckpt_key = result["checkpoint"].removeprefix("s3://fdreamer/")
        assert {f"{ckpt_key}/model.safetensors", f"{ckpt_key}/trainer_state.json"} <= set(bucket["storage"])
        assert any(k.endswith(".mp4") for k in bucket["serving"])  # the served video, stored by the replica
        assert any("/checkpoint/model.safetensors" in k for k in bucket["mlflow"])  # MLflow's proxied artifacts
        local = [p for name in ("preprocessed", "storage", "serving-jobs") for p in (work / name).rglob("*") if p.is_file()]
        assert not local, local[:5]  # (the local cluster makes an empty shared-storage folder)
        run = mlflow.tracking.MlflowClient(result["mlflow_ui"]).get_run(result["mlflow_run_id"])
        assert run.data.tags["ray.num_nodes"] == "2", run.data.tags.get("ray.worker_nodes")
        assert "val_loss" in run.data.metrics
    finally:
        os.killpg(result["mlflow_pid"], signal.SIGTERM)  # the script's own MLflow server, kept for this check
    # the cluster is down: its state file says so and `status` exits non-zero
    status = subprocess.run([str(REPO / "cluster" / "local.sh"), "status"], env=env, cwd=REPO,
                            capture_output=True, text=True, check=False)
    assert status.returncode != 0
