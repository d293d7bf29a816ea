"""Resume without Ray (``TrainWorker.setup_model``): optimizer / EMA state on the parameters' device, exact
continuation, incomplete checkpoints refused; the validation loss in micro-batches; the small hot-path pieces
(EMA foreach, AdamW implementation, value checks once on an accelerator, the process-group timeout, the
entry point's error classes). CUDA versions: ``tests/test_gpu.py`` (``gpu`` marker)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from helpers import resume as R


@pytest.fixture(autouse=True)
def _keep_threads():
    """``setup_model`` sets torch's thread count (``scaling.torch_threads``): give the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cfg():
    return R.train_config("tiny", optim={"ema_decay": 0.9, "lr": 1e-3})


@pytest.fixture(scope="module")
def stepped(cfg, tmp_path_factory):
    """A worker after 2 steps (checkpoint saved after step 2), then its 3rd step; the three batches."""
    n = torch.get_num_threads()
    batches = [R.synthetic_batch(cfg, i) for i in range(3)]
    worker = R.new_worker(cfg, "cpu")
    R.step(worker, batches[0])
    R.step(worker, batches[1])
    path = R.save(worker, tmp_path_factory.mktemp("resume") / "checkpoint_step_2")
    R.step(worker, batches[2])
    torch.set_num_threads(n)
    return {"path": path, "batches": batches, "after3": R.snapshot(worker)}


@pytest.fixture(params=["swap", "new"])
def placement(request):
    """How ``module.to`` moves parameters to ``meta``: ``swap`` keeps each Parameter object and changes its
    device in place, as a CPU -> CUDA move does (``torch.__future__.set_swap_module_params_on_conversion``);
    ``new``: torch's default for CPU -> meta, new Parameter objects."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(request.param == "swap")
    yield request.param
    torch.__future__.set_swap_module_params_on_conversion(before)


def test_restore_puts_optimizer_and_ema_state_on_the_parameters_device(cfg, stepped, placement) -> None:
    """Restoring into a model placed on another device (``meta`` stands in for CUDA): every AdamW moment and
    every EMA tensor sits on its parameter's device. Before the fix the optimizer state was loaded while the
    model was on the CPU and only the parameters moved (``test_loading_before_placing_leaves_state_behind``)."""
    from fdreamer.train.step import state_device_problems

    worker = R.new_worker(cfg, "meta", source=stepped["path"])
    params = [p for p in worker.model.parameters() if p.requires_grad]
    assert params and all(p.device.type == "meta" for p in params)
    assert len(worker.optimizer.state) == len(params)  # the state was loaded, not left empty
    for p in params:
        st = worker.optimizer.state[p]
        assert st["exp_avg"].device == p.device and st["exp_avg_sq"].device == p.device
    assert worker.ema is not None and all(v.device.type == "meta" for v in worker.ema.shadow.values())
    assert state_device_problems(worker.model, worker.optimizer, worker.ema) == []
    assert worker.state.step == 2


def test_loading_before_placing_leaves_state_behind(cfg, stepped, placement) -> None:
    """The order ``restore`` had (optimizer state loaded into the CPU model's optimizer, then ``model.to``),
    which ``state_device_problems`` (checked by ``setup_model`` at start-up) reports: with an in-place move
    (CUDA's) the moments stay on the CPU beside the moved parameters; with new Parameter objects the optimizer
    updates tensors the model no longer uses."""
    from fdreamer.train.step import EMA, make_optimizer, state_device_problems
    from training import checkpointing
    from training.loop import build_model

    model = build_model(cfg, None)
    optimizer = make_optimizer(model, 1e-3, 0.0, (0.9, 0.999), 1e-8)
    checkpointing.restore_training_state(stepped["path"], optimizer, EMA(model, 0.9))
    model.to("meta")
    problems = state_device_problems(model, optimizer)
    if placement == "swap":
        assert problems and "exp_avg" in problems[0] and "on cpu, parameter on meta" in problems[0]
    else:
        assert problems and "not the model's" in problems[0]


def test_save_restore_step_equals_the_uninterrupted_run(cfg, stepped) -> None:
    """Checkpoint after step 2, restore in a new worker, step 3: weights, EMA and AdamW moments bitwise equal
    to the uninterrupted run's step 3; without the optimizer state (control) they are not."""
    resumed = R.new_worker(cfg, "cpu", source=stepped["path"])
    assert (resumed.state.step, resumed.state.consumed) == (2, 2)
    R.step(resumed, stepped["batches"][2])
    assert R.max_abs_diff(stepped["after3"], R.snapshot(resumed)) == {"model": 0.0, "ema": 0.0, "optim": 0.0}

    control = R.new_worker(cfg, "cpu", source=stepped["path"])
    control.optimizer.state.clear()  # a resume that lost the AdamW moments
    R.step(control, stepped["batches"][2])
    assert R.max_abs_diff(stepped["after3"], R.snapshot(control))["model"] > 1e-5


def test_the_resumed_optimizer_keeps_this_runs_implementation(cfg, stepped) -> None:
    """A checkpoint written by a foreach AdamW (CPU) restored into a fused one (what CUDA builds; torch also
    fuses on the CPU): the group stays fused, its ``step`` counters go where fused needs them, a step runs."""
    from fdreamer.train.step import EMA
    from training import checkpointing
    from training.loop import build_model

    model = build_model(cfg, None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    checkpointing.restore_training_state(stepped["path"], optimizer, EMA(model, 0.9))
    group = optimizer.param_groups[0]
    assert group["fused"] is True and not group["foreach"] and group["lr"] == 1e-3
    assert all(st["step"].device == p.device and float(st["step"]) == 2 for p, st in optimizer.state.items())
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()


@pytest.mark.parametrize("missing", ["ema.safetensors", "rng.pt", "optimizer.pt"])
def test_a_checkpoint_without_a_state_file_is_refused(cfg, stepped, tmp_path: Path, missing: str) -> None:
    """A resume needs every file of the state (a run with an EMA: ``ema.safetensors``); none is skipped."""
    from fdreamer.checkpoint import CheckpointError
    from training.checkpointing import CheckpointIncomplete

    broken = tmp_path / "checkpoint"
    shutil.copytree(stepped["path"], broken)
    (broken / missing).unlink()
    with pytest.raises(CheckpointIncomplete, match=missing.replace(".", r"\.")) as info:
        R.new_worker(cfg, "cpu", source=broken)
    assert isinstance(info.value, CheckpointError)  # caught by name by training/run.py (exit 2, one line)


def test_validation_in_micro_batches_equals_one_batch(cfg) -> None:
    """``validation_loss(micro_batch=2)`` on 5 clips (micro-batches of 2, 2, 1) = the one-forward value: the
    same noise per clip, the sample-weighted mean of the micro-batch means. Tolerance: 1e-6 relative (fp32
    sums in another order, per-batch-size kernels); measured here: at most 1.1e-7 relative."""
    from fdreamer.schedule import NoiseSchedule
    from fdreamer.train.step import validation_loss
    from training.loop import build_model

    model = build_model(cfg, None)
    batch = R.synthetic_batch(R.train_config("tiny", micro_batch=5), 7)
    schedule = NoiseSchedule(cfg.schedule)
    whole = validation_loss(model, schedule, batch, [99, 499, 899], seed=3)
    parts = validation_loss(model, schedule, batch, [99, 499, 899], seed=3, micro_batch=2)
    assert whole.keys() == parts.keys() == {"val_loss", "val_loss_t99", "val_loss_t499", "val_loss_t899"}
    for key in whole:
        assert parts[key] == pytest.approx(whole[key], rel=1e-6), key
    assert model.training  # validation restores the mode


def test_ema_foreach_update_is_bitwise_the_per_tensor_update(cfg) -> None:
    from fdreamer.train.step import EMA
    from training.loop import build_model

    model = build_model(cfg, None)
    ema = EMA(model, 0.9)
    expect = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    for step in (1, 2):
        ema.update(model, step)
        for n, p in model.named_parameters():
            expect[n].mul_(0.9).add_(p.detach().float(), alpha=1 - 0.9)
    assert all(torch.equal(ema.shadow[k], expect[k]) for k in expect)


def test_optimizer_is_foreach_on_cpu_and_value_checks_run_once_off_the_cpu(cfg) -> None:
    from fdreamer.train.step import make_optimizer
    from training.loop import build_model

    model = build_model(cfg, None)
    group = make_optimizer(model, 1e-3, 0.0, (0.9, 0.999), 1e-8).param_groups[0]
    assert group["foreach"] is True and not group["fused"]
    # value checks (a host sync on CUDA): always on the CPU, once per accelerator device
    assert model._value_checks_due(torch.device("cpu")) and model._value_checks_due(torch.device("cpu"))
    assert model._value_checks_due(torch.device("meta")) and not model._value_checks_due(torch.device("meta"))


def test_timesteps_are_still_checked_where_they_are_drawn() -> None:
    from fdreamer.models import Conditions
    from fdreamer.schedule import NoiseSchedule
    from fdreamer.train.objective import diffusion_objective

    x0 = torch.zeros(1, 4, 2, 4, 4)
    with pytest.raises(ValueError, match="timesteps must be in"):
        diffusion_objective(lambda *a, **k: None, NoiseSchedule(), x0, Conditions(torch.zeros(1, 77, 8)),
                            timesteps=torch.tensor([1000]))


def test_torch_threads_default_and_collective_timeout_reach_ray(monkeypatch, tmp_path: Path) -> None:
    """``scaling.torch_threads`` null = the worker's CPUs; ``scaling.collective_timeout_s`` is the process
    group's timeout (``TorchConfig.timeout_s``)."""
    import ray.train.torch

    from training.config import ScalingSection
    from training.launch import fit

    assert ScalingSection(cpus_per_worker=8).threads() == 8 and ScalingSection(cpus_per_worker=0.5).threads() == 1
    assert ScalingSection(cpus_per_worker=8, torch_threads=3).threads() == 3
    seen = {}

    class Stop(Exception):
        pass

    def fake_trainer(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", fake_trainer)
    cfg = R.train_config("tiny", storage_path=str(tmp_path), scaling={"collective_timeout_s": 321})
    with pytest.raises(Stop):
        fit(cfg, {"cfg": {}})
    assert seen["torch_config"].timeout_s == 321


def test_run_catches_domain_errors_by_name_and_lets_bugs_raise(monkeypatch, capsys) -> None:
    """``training/run.py``: a data error is one line and exit 2; any other exception (a bug, even a plain
    ValueError) keeps its traceback."""
    import training.launch
    from training import run

    repo = Path(__file__).resolve().parents[1]
    args = ["--config", str(repo / "training/configs/tiny_stage1.yaml"), "--data.path=/nonexistent/data"]
    assert run.main(args) == 2
    assert "does not exist" in capsys.readouterr().err

    def buggy(cfg):
        raise ValueError("a bug, not a user error")

    monkeypatch.setattr(training.launch, "prepare", buggy)
    with pytest.raises(ValueError, match="a bug"):
        run.main(args)
