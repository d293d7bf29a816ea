"""The VideoCrafter2 recipe (Chen et al., CVPR 2024) on this platform.

Library level (no Ray, tiny model): the temporal bypass of the image path, fps conditioning, joint
image-video batches (losses, where gradients go), stage B's freezing. Through the real jobs: an image
manifest through ``pipelines/preprocess.py`` on the session's ``ray start`` head, then a tiny stage A
(joint batches) and stage B (from its checkpoint) through ``training/run.py`` (Ray Train).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers.datasets import preprocess_cmd
from helpers.ray_cluster import REPO, subprocess_env

from fdreamer.data.batching import JointBatch, TrainBatch
from fdreamer.models import FactorizedDreamerUNet, ModelConfig
from fdreamer.models.conditions import Conditions
from fdreamer.models.params import parameter_groups
from fdreamer.schedule import NoiseSchedule, ScheduleConfig
from fdreamer.train.step import joint_objective, make_optimizer, optimizer_step, step_generator

H = W = 16  # tiny latents


def _model(seed: int = 0, perturb: bool = True, **cfg) -> FactorizedDreamerUNet:
    """Tiny model; ``perturb`` moves every weight off its (often zero) init so every layer matters."""
    m = FactorizedDreamerUNet.from_preset("tiny", ModelConfig.tiny(**cfg), seed=seed)
    if perturb:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return m


def _video(m: FactorizedDreamerUNet, b: int = 2, t: int = 4, seed: int = 0, fps: float = 6.0) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    cond = Conditions(torch.randn(b, 77, m.cross_attention_dim, generator=g), torch.randn(b, 32, generator=g),
                      torch.randn(b, 4, H, W, generator=g), torch.randn(b, 5, 64, generator=g),
                      torch.ones(b, 5, dtype=torch.bool))
    return TrainBatch(torch.randn(b, 4, t, H, W, generator=g), cond, None, [f"v{i}" for i in range(b)],
                      torch.full((b,), fps))


def _images(m: FactorizedDreamerUNet, b: int = 2, seed: int = 1) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    cond = Conditions(torch.randn(b, 77, m.cross_attention_dim, generator=g))  # text only
    return TrainBatch(torch.randn(b, 4, 1, H, W, generator=g), cond, None, [f"i{i}" for i in range(b)],
                      torch.zeros(b), is_image=True)


def _schedule() -> NoiseSchedule:
    return NoiseSchedule(ScheduleConfig(num_frames=8, height=64, width=64, shift_scale=0.5))


def _groups(m: FactorizedDreamerUNet) -> dict[str, dict[str, torch.Tensor]]:
    return {g: {n: p.detach().clone() for n, p in ps} for g, ps in parameter_groups(m).items()}


def _loss(m, mb, image_weight: float = 1.0):
    gens = (step_generator(0, 0, 0, 0), step_generator(0, 0, 0, 0, stream=1))
    return joint_objective(m, _schedule(), mb, null=None, drop_probs=(0, 0, 0), gamma=1.0, generators=gens,
                           image_weight=image_weight)


def _grads(m: FactorizedDreamerUNet, mb, image_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, dict]]:
    m.zero_grad(set_to_none=True)
    out = _loss(m, mb, image_weight)
    out.loss.backward()
    return out, {g: {n: p.grad for n, p in ps} for g, ps in parameter_groups(m).items()}


def _nonzero(grads: dict) -> int:
    return sum(g is not None and bool(g.abs().sum() > 0) for g in grads.values())


# ---------------------------------------------------------------------------------- temporal bypass


def _plain_unet2d(m: FactorizedDreamerUNet) -> UNet2DConditionModel:
    """diffusers' own UNet2DConditionModel on the video model's spatial weights (default processors)."""
    unet = UNet2DConditionModel.from_config(m.unet.config)
    state = {k: v for k, v in m.unet.state_dict().items() if ".processor." not in k}
    unet.load_state_dict(state, strict=True)
    return unet.eval()


def test_temporal_bypass_equals_the_spatial_unet_per_image() -> None:
    m = _model(fps_conditioning=True, fps_default=6.0).eval()
    vb = _video(m, b=2, t=3)
    ts = torch.tensor([10, 700])
    with torch.no_grad():
        out = m(vb.latents, ts, vb.cond.text_tokens, temporal=False, fps=torch.tensor([6.0, 30.0])).sample
        plain = _plain_unet2d(m)
        ref = torch.stack([torch.stack([plain(vb.latents[i, :, f][None], ts[i], vb.cond.text_tokens[i][None]).sample[0]
                                        for f in range(3)], dim=1) for i in range(2)])  # [B, C, T, h, w]
        full = m(vb.latents, ts, **vb.cond.as_kwargs(), fps=6.0).sample  # temporal layers, adapter, PACA on
    assert out.shape == (2, 4, 3, H, W)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert (full - out).abs().max() > 1e-2  # the bypassed layers do change the output when they run
    with pytest.raises(ValueError, match="only the image path"):
        m(vb.latents, ts, vb.cond.text_tokens)  # the video path still needs the image condition


# ------------------------------------------------------------------------------------ fps conditioning


def test_fps_conditioning_off_unchanged_on_zero_init_then_learns() -> None:
    off = _model(seed=3, perturb=False)
    on = _model(seed=3, perturb=False, fps_conditioning=True)
    s_off, s_on = off.state_dict(), on.state_dict()
    assert not any("fps" in k for k in s_off)
    assert set(s_on) - set(s_off) == {f"fps_embedding.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    assert all(torch.equal(s_off[k], s_on[k]) for k in s_off)  # same init of everything else
    assert all(n.startswith("fps_embedding.") for n, _ in parameter_groups(on)["temporal"] if "fps" in n)
    assert {n for n, _ in parameter_groups(on)["temporal"]} >= {k for k in s_on if k.startswith("fps_embedding.")}

    vb = _video(on)
    ts = torch.tensor([200, 800])
    with torch.no_grad():
        ref = off(vb.latents, ts, **vb.cond.as_kwargs()).sample
        assert torch.equal(on(vb.latents, ts, **vb.cond.as_kwargs(), fps=6.0).sample, ref)
        assert torch.equal(on(vb.latents, ts, **vb.cond.as_kwargs(), fps=24.0).sample, ref)
    with pytest.raises(ValueError, match="fps-conditioned"):
        on(vb.latents, ts, **vb.cond.as_kwargs())  # no fps and no fps_default

    opt = make_optimizer(on, 1e-2, 0.0, (0.9, 0.999), 1e-8)
    optimizer_step(on, opt, _schedule(), [vb], null=None, drop_probs=(0, 0, 0), gamma=1.0, grad_clip=1.0,
                   seed=0, rank=0, step=0)
    assert on.fps_embedding.linear_2.weight.abs().sum() > 0
    with torch.no_grad():
        a = on(vb.latents, ts, **vb.cond.as_kwargs(), fps=6.0).sample
        b = on(vb.latents, ts, **vb.cond.as_kwargs(), fps=24.0).sample
    assert (a - b).abs().max() > 1e-6


def test_fps_conditioned_checkpoint_is_served_by_the_pipeline(tiny_dir: Path, tmp_path: Path) -> None:
    """The pipeline passes no fps yet: an fps-conditioned checkpoint samples with ``model.fps_default``."""
    from helpers.checkpoints import tiny_checkpoint

    from fdreamer.inference.pipeline import VideoPipeline, VideoRequest

    ckpt = tiny_checkpoint(tmp_path / "ckpt", tiny_dir, model=_model(fps_conditioning=True, fps_default=6.0),
                           schedule=_schedule().cfg)
    pipe = VideoPipeline.from_checkpoint(ckpt)
    assert pipe.model.cfg.fps_conditioning and pipe.model.fps_embedding is not None
    out = pipe(VideoRequest(prompt="a red circle slides to the left", num_frames=3, height=32, width=32,
                            num_inference_steps=2, seed=0))  # text-to-video: T2I step, then I2V
    assert out.frames.shape == (3, 32, 32, 3)


# --------------------------------------------------------------------------------- joint batches


def test_joint_batches_loss_weighting_and_where_gradients_go() -> None:
    m = _model()
    vb, ib = _video(m), _images(m, b=3)
    out, g_joint = _grads(m, JointBatch(vb, ib), image_weight=2.0)
    assert torch.isfinite(out.loss)
    n_v, n_i = 2, 2.0 * 3
    expect = (n_v * out.l_df_video + n_i * out.l_df_image) / (n_v + n_i)
    torch.testing.assert_close(out.loss, expect)
    temporal = g_joint["temporal"]
    assert _nonzero(g_joint["spatial"]) == len(g_joint["spatial"])
    assert _nonzero(temporal) == len(temporal) > 0  # the video part reaches every temporal parameter

    _, g_img = _grads(m, JointBatch(None, ib))  # image-only batch
    assert all(g is None for g in g_img["temporal"].values())  # bypassed: not even in the graph
    assert all(g is None for g in g_img["paca"].values())
    assert all(g is None or not g.any() for g in g_img["adapter"].values())  # zero image tokens: exactly 0
    assert _nonzero(g_img["spatial"]) > 0.9 * len(g_img["spatial"])

    # In the joint batch the temporal gradient is the video part's alone, scaled by its weight.
    _, g_vid = _grads(m, JointBatch(vb, None))
    for name, g in temporal.items():
        torch.testing.assert_close(g, g_vid["temporal"][name] * n_v / (n_v + n_i), atol=1e-7, rtol=1e-4)


def test_video_only_batches_are_unchanged_by_the_joint_code() -> None:
    m = _model()
    vb = _video(m)
    a, b = _loss(m, vb), _loss(m, JointBatch(vb, None))
    assert torch.equal(a.loss, b.loss) and a.l_df_image is None


# -------------------------------------------------------------------------------------- stage B


@pytest.mark.parametrize("freeze", [["temporal", "adapter", "paca"], []])
def test_stage_b_freezing_keeps_temporal_bitwise_and_moves_spatial(freeze: list[str]) -> None:
    m = _model(fps_conditioning=True, freeze=freeze)
    before = _groups(m)
    opt = make_optimizer(m, 1e-3, 1e-2, (0.9, 0.999), 1e-8)
    for step in range(3):  # joint batches: the video part WOULD reach the temporal layers if they trained
        micro = [JointBatch(_video(m, seed=10 * step), _images(m, seed=10 * step + 1))]
        res = optimizer_step(m, opt, _schedule(), micro, null=None, drop_probs=(0, 0, 0), gamma=1.0,
                             grad_clip=1.0, seed=0, rank=0, step=step)
        assert res.l_df_video is not None and res.l_df_image is not None
    after = _groups(m)
    for group in ("temporal", "adapter", "paca"):
        same = [torch.equal(before[group][n], after[group][n]) for n in before[group]]
        assert all(same) if group in freeze else not any(same), group
    moved = [not torch.equal(before["spatial"][n], after["spatial"][n]) for n in before["spatial"]]
    assert all(moved)


# ----------------------------------------------------------------- configs, manifests, data streams


def test_config_checks_of_joint_batches() -> None:
    from fdreamer.config import ConfigError, load_config
    from training.config import TrainConfig

    cfg = REPO / "training" / "configs" / "tiny_vc2_stageA.yaml"
    a = load_config(TrainConfig, cfg)
    assert (a.video_micro_batch, a.image_micro_batch, a.model.fps_conditioning) == (2, 2, True)
    b = load_config(TrainConfig, REPO / "training" / "configs" / "tiny_vc2_stageB.yaml")
    assert (b.video_micro_batch, b.image_micro_batch) == (0, 4)
    assert set(b.model.freeze) == {"temporal", "adapter", "paca"}
    with pytest.raises((ConfigError, ValueError), match="not a whole number"):
        load_config(TrainConfig, cfg, ["--data.image_ratio=0.3"])
    with pytest.raises((ConfigError, ValueError), match=r"add \['adapter', 'paca'\] to model.freeze"):
        load_config(TrainConfig, cfg, ["--data.image_ratio=1", "--model.freeze=[temporal]"])
    with pytest.raises(ValueError, match="needs images"):
        load_config(TrainConfig, cfg, ["--data.image_path=null", "--data.path=/x"]).check_ready()


def test_manifest_kind_by_extension_or_column(tmp_path: Path) -> None:
    from fdreamer.data.manifests import ManifestError, read_manifest

    rows = [{"path": "a/x.PNG", "caption": "c"}, {"path": "s3://b/y.jpg?v=1", "caption": "c"},
            {"path": "z.mp4", "caption": "c"}, {"path": "blob", "caption": "c", "kind": "image"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_manifest(str(tmp_path / "m.jsonl"))
    assert [r["kind"] for r in got] == ["image", "image", "video", "image"]
    assert [r["source"] for r in got] == ["image", "image", "generic", "image"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"path": "x.png", "caption": "c", "kind": "photo"}) + "\n")
    with pytest.raises(ManifestError, match="row 0: kind must be one of"):
        read_manifest(str(tmp_path / "bad.jsonl"))


# ------------------------------------------------------------------ through the real jobs (Ray)


@pytest.fixture(scope="module")
def images(preprocessed_sample: dict, ray_head: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """12 clean first frames of the sample clips (``write_sample_images``) + one truncated PNG, by
    extension only (no ``kind`` column), through ``pipelines/preprocess.py`` with the sample's models."""
    from fdreamer.toy.sample_images import write_sample_images

    root = tmp_path_factory.mktemp("vc2-images")
    write_sample_images(root, 12)
    rows = [json.loads(line) for line in (root / "images.jsonl").read_text().splitlines()]
    bad = root / "truncated.png"
    data = Path(rows[0]["path"]).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    lines = [{"path": r["path"], "caption": r["caption"], "split": r["split"]} for r in rows]
    lines.append({"path": str(bad), "caption": "a broken picture", "split": "train"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = root / "pre"
    proc = subprocess.run(preprocess_cmd(ray_head["address"], [root / "manifest.jsonl"], preprocessed_sample["models"],
                                         out), check=False, env=subprocess_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"output": out, "bad": bad, "rows": rows}


def test_image_manifest_preprocesses_to_one_frame_rows(images: dict) -> None:
    out = images["output"]
    table = pd.concat([pd.read_parquet(f) for f in sorted((out / "shards").glob("part-*.parquet"))])
    assert len(table) == 12 and set(table["num_frames"]) == {1}
    assert all(list(s) == [4, 1, 16, 16] for s in table["latents_shape"])
    assert table["flow"].isna().all() and table["motion_score"].isna().all() and (table["fps"] == 0).all()
    assert table["clip_id"].str.contains("-0-1-").all() and set(table["source"]) == {"image"}
    assert sorted(table["split"]) == sorted(r["split"] for r in images["rows"])
    q = pd.read_parquet(out / "quarantine.parquet")
    assert list(q["uri"]) == [str(images["bad"])] and list(q["reason"]) == ["corrupt"]
    summary = json.loads((out / "_SUCCESS").read_text())
    assert summary["written"] == 12 and summary["quarantined_by_reason"] == {"corrupt": 1}


def _run(cfg: str, data: dict, images: dict, storage: Path, address: str, *extra: str) -> dict:
    config = REPO / "training" / "configs" / f"{cfg}.yaml"
    cmd = [sys.executable, str(REPO / "training" / "run.py"), "--config", str(config),
           f"--data.path={data['output']}", f"--data.image_path={images['output']}", f"--models_dir={data['models']}",
           f"--storage_path={storage}", f"--ray_address={address}", "--tracking.sample_every=-1", *extra]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{") and '"checkpoint"' in ln][-1]
    return json.loads(line)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_stage_a_joint_then_stage_b_spatial_only(preprocessed_sample: dict, images: dict, ray_head: dict,
                                                      tmp_path: Path) -> None:
    import mlflow
    from safetensors.torch import load_file

    a = _run("tiny_vc2_stageA", preprocessed_sample, images, tmp_path, ray_head["address"], "--steps=2",
             "--tracking.validate_every=100", "--tracking.log_every=1")
    b = _run("tiny_vc2_stageB", preprocessed_sample, images, tmp_path, ray_head["address"], "--steps=2",
             f"--init_from={a['checkpoint']}", "--tracking.validate_every=100", "--tracking.log_every=1")
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_a, run_b = client.get_run(a["mlflow_run_id"]), client.get_run(b["mlflow_run_id"])
    for key in ("loss", "l_df_video", "l_df_image", "val_loss", "val_image_loss"):
        assert key in run_a.data.metrics, key
    assert "l_df_image" in run_b.data.metrics and "val_loss" in run_b.data.metrics
    assert run_b.data.metrics.get("l_df_video") is None
    wa, wb = (load_file(str(Path(r["checkpoint"]) / "model.safetensors")) for r in (a, b))
    groups = {n: g for g, ps in parameter_groups(_model(perturb=False, fps_conditioning=True)).items() for n, _ in ps}
    frozen = [k for k in wa if groups[k] != "spatial"]
    assert any(k.startswith("fps_embedding.") for k in frozen)
    assert all(torch.equal(wa[k], wb[k]) for k in frozen)  # temporal, fps, adapter, PACA: bitwise stage A's
    assert sum(not torch.equal(wa[k], wb[k]) for k in wa if groups[k] == "spatial") > 0.9 * (len(wa) - len(frozen))
