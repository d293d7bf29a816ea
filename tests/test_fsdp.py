"""FSDP (``scaling.parallel: fsdp``) on 2 Ray Train CPU workers (gloo): FSDP2 ``fully_shard``, sharded DCP
checkpoints written asynchronously, a worker killed mid-run and the run resumed, bit for bit.

Two Ray Train runs of ``training/configs/tiny_fsdp.yaml`` (the sd15 block structure at a small width, on
the preprocessed sample clips, on the session's ``ray start --head`` cluster):

- ``straight``: 3 uninterrupted steps, sharded checkpoints at step 2 (written asynchronously) and 3 (final:
  also the gathered ``model.safetensors``);
- ``resumed``: the step-2 checkpoint copied into a new run folder and continued with ``--resume`` to step
  3; once rank 1 has trained step 2 (the last: the final save follows), its process is SIGKILLed, so Ray Train
  restarts the worker group,
  which restores the sharded checkpoint again.

The test overrides ``global_batch=2`` (no gradient accumulation) to halve the step time; activation
checkpointing stays on as ``tiny_fsdp.yaml`` has it.

The final weights of both must be bitwise equal. Also without Ray: FSDP2's fp16 / bf16 gradient
reduce-scatter on gloo, and the config checks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers.ray_cluster import REPO, free_port, subprocess_env
from helpers.worker_kill import run_killing_worker
from safetensors.torch import load_file

pytestmark = pytest.mark.timeout(1200)
RUN = [sys.executable, str(REPO / "training" / "run.py")]
STEPS = 3


def _args(data: dict, storage: Path, address: str, *extra: str) -> list[str]:
    return [*RUN, "--config", str(REPO / "training" / "configs" / "tiny_fsdp.yaml"), f"--data.path={data['output']}",
            f"--models_dir={data['models']}", f"--storage_path={storage}", f"--ray_address={address}",
            f"--steps={STEPS}", "--global_batch=2", "--tracking.sample_every=-1", "--tracking.validate_every=0", "--data.log_order=true",
            *extra]


def _summary(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{") and '"checkpoint"' in ln]
    assert lines, stdout[-3000:]
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fsdp-runs")


@pytest.fixture(scope="module")
def straight(preprocessed_sample: dict, storage: Path, ray_head: dict) -> dict:
    started = time.monotonic()
    proc = subprocess.run(_args(preprocessed_sample, storage, ray_head["address"], "--checkpoint.every=2",
                                "--checkpoint.keep=3"),
                          env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    print(f"straight run: {time.monotonic() - started:.1f} s")
    return {"summary": _summary(proc.stdout), "run_dir": storage / "tiny_fsdp"}


@pytest.fixture(scope="module")
def resumed(straight: dict, preprocessed_sample: dict, storage: Path, ray_head: dict) -> dict:
    """The step-2 checkpoint continued with ``--resume``; rank 1 killed once it has trained step 2."""
    run_dir = storage / "fsdp_resume"
    source = straight["run_dir"] / "checkpoint_step_00000002"
    shutil.copytree(source, run_dir / source.name)
    state_file = run_dir / source.name / "trainer_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "mlflow_run_id": None}))
    cmd = _args(preprocessed_sample, storage, ray_head["address"], "--name=fsdp_resume", "--resume",
                "--checkpoint.every=2", "--checkpoint.max_failures=1")
    started = time.monotonic()
    text, killed = run_killing_worker(cmd, run_dir / "data_order" / "rank1.jsonl", 2)
    print(f"resumed run (with a restart): {time.monotonic() - started:.1f} s")
    assert killed is not None, "the resumed run finished before rank 1 trained step 2:\n" + text[-3000:]
    return {"stdout": text, "killed": killed, "run_dir": run_dir, "summary": _summary(text)}


def test_sharded_checkpoints_one_file_per_rank(straight: dict) -> None:
    """Every checkpoint holds DCP shards of both ranks; only the final one also the gathered full weights;
    the save of the intermediate ones ran asynchronously. Prints the checkpoint bytes and save times."""
    run_dir = straight["run_dir"]
    assert sorted(p.name for p in run_dir.glob("checkpoint_step_*")) == [
        "checkpoint_step_00000002", f"checkpoint_step_{STEPS:08d}"]
    figures = {}
    for step in (2, STEPS):
        ckpt = run_dir / f"checkpoint_step_{step:08d}"
        assert {p.name for p in (ckpt / "dcp").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}, step
        assert (ckpt / "model.safetensors").is_file() == (step == STEPS), step
        for name in ("trainer_state.json", "rng.pt", "train_config.yaml", "unet_config.json", "model.yaml",
                     "fdreamer_checkpoint.json"):
            assert (ckpt / name).is_file(), (step, name)
        assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step
        stats = [json.loads((ckpt / f"save_stats_rank{r}.json").read_text()) for r in (0, 1)]
        assert [s["mode"] for s in stats] == (["sync"] * 2 if step == STEPS else ["async"] * 2), stats
        assert all(s["bytes"] > 0 for s in stats)
        figures[step] = stats
    final = run_dir / f"checkpoint_step_{STEPS:08d}"
    shard_bytes = sum(f.stat().st_size for f in (final / "dcp").iterdir())
    full_bytes = (final / "model.safetensors").stat().st_size
    print("FSDP checkpoint figures:", json.dumps({
        "dcp_bytes_total": shard_bytes, "dcp_bytes_per_rank": [s["bytes"] for s in figures[STEPS]],
        "model_safetensors_bytes": full_bytes,
        "async_blocking_s": [s["blocking_s"] for s in figures[2]],
        "async_written_s": [s["written_s"] for s in figures[2]],
        "async_reported_s": [s["total_s"] for s in figures[2]],
        "sync_final_total_s": [s["total_s"] for s in figures[STEPS]]}))


def test_resume_through_a_killed_worker_is_bitwise_exact(straight: dict, resumed: dict) -> None:
    assert "resuming from" in resumed["stdout"] and "checkpoint_step_00000002" in resumed["stdout"]
    a = load_file(str(Path(straight["summary"]["checkpoint"]) / "model.safetensors"))
    b = load_file(str(Path(resumed["summary"]["checkpoint"]) / "model.safetensors"))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]
    run_dir = resumed["run_dir"]
    pids = {json.loads(x)["pid"] for x in (run_dir / "data_order" / "rank1.jsonl").read_text().splitlines()}
    assert resumed["killed"] in pids and len(pids) >= 2  # rank 1 ran again in a new process
    steps = [json.loads(x)["step"] for x in (run_dir / "data_order" / "rank1.jsonl").read_text().splitlines()]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart] == 2, steps  # redone from the sharded step-2 checkpoint (no later one was written)
    assert steps[restart:] == list(range(steps[restart], STEPS)), steps


def test_sharded_checkpoint_loads_without_a_process_group(straight: dict, tmp_path: Path) -> None:
    """``consolidate`` / ``load_sharded_model`` read every rank's shards in one process: the final checkpoint
    without its ``model.safetensors`` gives back exactly the gathered weights; ``init_from`` and the
    consumers of ``fdreamer.checkpoint`` then read it."""
    from fdreamer.checkpoint import load_model
    from training import checkpointing

    final = Path(straight["summary"]["checkpoint"])
    copy = tmp_path / final.name
    shutil.copytree(final, copy)
    (copy / "model.safetensors").unlink()
    checkpointing.consolidate(copy)
    gathered, rebuilt = load_file(str(final / "model.safetensors")), load_file(str(copy / "model.safetensors"))
    assert gathered.keys() == rebuilt.keys() and all(torch.equal(gathered[k], rebuilt[k]) for k in gathered)
    loaded = load_model(copy)
    assert list(loaded.model.unet.config.block_out_channels) == [32, 64, 64, 64]  # a list in the saved config


# ------------------------------------------------------------------ without Ray


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))


def _input(rank: int) -> torch.Tensor:
    return torch.randn(16, 32, generator=torch.Generator().manual_seed(rank + 1)) * 3.3


def _fsdp_worker(rank: int, port: int, dtypes: list[str], out: dict) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from training import parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for dtype in dtypes:
            model = _model()
            fully_shard(model, mp_policy=parallel.fsdp_mp_policy(dtype))
            model(_input(rank)).pow(2).mean().backward()
            out[(dtype, rank)] = [p.grad.full_tensor().clone() for p in model.parameters()]
    finally:
        dist.destroy_process_group()


def test_fsdp2_reduces_gradients_in_fp16_and_bf16_on_gloo() -> None:
    """``scaling.grad_reduce_dtype`` with FSDP2: ``MixedPrecisionPolicy(reduce_dtype)`` reduce-scatters in
    that dtype on gloo too (unlike DDP's bf16 hook, which needs NCCL)."""
    dtypes = ["fp32", "fp16", "bf16"]
    with mp.get_context("spawn").Manager() as manager:
        out = manager.dict()
        mp.start_processes(_fsdp_worker, args=(free_port(), dtypes, out), nprocs=2, join=True, start_method="spawn")
        grads = dict(out)
    exact = []
    for rank in (0, 1):
        model = _model()
        model(_input(rank)).pow(2).mean().backward()
        exact.append([p.grad for p in model.parameters()])
    mean = [(a + b) / 2 for a, b in zip(*exact, strict=True)]
    for dtype, tolerance in (("fp32", 1e-6), ("fp16", 2e-3), ("bf16", 2e-2)):
        assert all(torch.equal(a, b) for a, b in zip(grads[(dtype, 0)], grads[(dtype, 1)], strict=True))
        diffs = [float((g - e).abs().max() / e.abs().max()) for g, e in zip(grads[(dtype, 0)], mean, strict=True)]
        assert max(diffs) < tolerance, (dtype, diffs)
        if dtype != "fp32":
            assert max(diffs) > 1e-6, f"{dtype}: the gradients are fp32-exact, the reduce dtype was not applied"


def test_fsdp_config_checks() -> None:
    from fdreamer.config import load_config
    from training.config import ScalingSection, TrainConfig

    cfg = load_config(TrainConfig, REPO / "training" / "configs" / "tiny_fsdp.yaml")
    assert cfg.scaling.parallel == "fsdp" and not cfg.scaling.use_gpu  # FSDP on CPU workers is allowed now
    assert cfg.unet_kwargs()["down_block_types"] == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert cfg.model.gradient_checkpointing
    with pytest.raises(ValueError, match="EMA of the sharded parameters"):
        load_config(TrainConfig, REPO / "training" / "configs" / "tiny_fsdp.yaml", overrides=["--optim.ema_decay=0.9"])
    assert ScalingSection(parallel="fsdp", grad_reduce_dtype="bf16").grad_reduce_dtype == "bf16"
    with pytest.raises(ValueError, match="bf16 needs GPU workers"):
        ScalingSection(parallel="ddp", grad_reduce_dtype="bf16")
    with pytest.raises(ValueError, match="no UNet2DConditionModel arguments"):
        load_config(TrainConfig, REPO / "training" / "configs" / "tiny_fsdp.yaml",
                    overrides=["--unet_overrides={block_width: 3}"]).unet_kwargs()
