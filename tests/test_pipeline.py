"""The inference pipeline (fdreamer/inference/pipeline.py, sampling.py, request.py) and ``fdreamer generate``, on a
tiny checkpoint with random weights (small sizes and 2 steps: the numbers are not meant to look good)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.checkpoints import tiny_checkpoint, tiny_schedule
from helpers.ffprobe import mp4_info
from PIL import Image

from fdreamer.cli.main import main as cli_main
from fdreamer.encoders import EncoderConfig, FrozenEncoders
from fdreamer.models import (
    Conditions,
    FactorizedDreamerUNet,
    ModelConfig,
)
from fdreamer.models.adapter import AdapterAttnProcessor
from fdreamer.inference.pipeline import (
    GenerationCancelled,
    VideoPipeline,
    VideoRequest,
    VideoResult,
    save_video,
)
from fdreamer.inference.sampling import combine_guidance, guided_prediction, rescale_noise_cfg

PROMPT = "a red ball bounces left"
SCHEDULE = tiny_schedule()
META = {"num_frames": 8, "size": 64, "fps": 6, "preset": "tiny"}


@pytest.fixture(scope="module")
def checkpoint(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # non-zero init of the adapter tokens and PACA (presets start them at 0): the image conditions matter
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", tiny_dir, conditioned=True)


@pytest.fixture(scope="module")
def pipe(checkpoint: Path) -> VideoPipeline:
    return VideoPipeline.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.zeros((50, 70, 3), np.uint8)
    img[10:30, 20:45] = (220, 40, 30)
    return np.clip(img.astype(int) + rng.integers(0, 30, img.shape), 0, 255).astype(np.uint8)


def small(**kw) -> VideoRequest:
    return VideoRequest(**{"prompt": PROMPT, "num_frames": 3, "height": 32, "width": 40,
                           "num_inference_steps": 2, "seed": 0, **kw})


# ---------------------------------------------------------------------------------- I2V / T2V


def test_defaults_and_limits_come_from_the_checkpoint(pipe: VideoPipeline) -> None:
    assert pipe.defaults == {"num_frames": 8, "height": 64, "width": 64, "fps": 6.0}
    lim = pipe.limits
    assert lim["size_multiple_i2v"] == 4 and lim["size_multiple_t2v"] == 8  # tiny VAE /4; SD pipeline /8
    assert lim["max_num_inference_steps"] == 1000 and lim["supports_image"]


def test_image_to_video_shape_and_seeds(pipe: VideoPipeline, image: np.ndarray) -> None:
    # checkpoint defaults (8 x 64 x 64, 6 fps); one step with a single branch keeps it cheap
    full = pipe(VideoRequest(PROMPT, image=image, num_inference_steps=1, guidance_scale=1.0,
                             image_guidance_scale=1.0, seed=7))
    assert full.frames.dtype == np.uint8 and full.frames.shape == (8, 64, 64, 3)
    assert full.first_frame.shape == (64, 64, 3) and full.seed == 7 and full.fps == 6.0
    assert set(full.timings) == {"t2i", "i2v", "decode", "total"} and full.timings["t2i"] == 0.0
    req = small(image=image, seed=7, fps=12.5)
    a, b = pipe(req), pipe(req)
    assert a.frames.shape == (3, 32, 40, 3) and a.first_frame.shape == (32, 40, 3) and a.fps == 12.5
    np.testing.assert_array_equal(a.frames, b.frames)  # same seed: bitwise the same
    assert not np.array_equal(a.frames, pipe(replace(req, seed=8)).frames)
    assert not np.array_equal(a.frames, pipe(replace(req, image=255 - image)).frames)  # the image matters
    r = pipe(replace(req, seed=None, num_inference_steps=1))  # a random seed, reported back and reproducible
    np.testing.assert_array_equal(r.frames, pipe(replace(req, seed=r.seed, num_inference_steps=1)).frames)


def test_text_to_video_runs_t2i_then_i2v(pipe: VideoPipeline) -> None:
    calls: list[tuple[int, int, str]] = []
    res = pipe(small(), callback=lambda *a: calls.append(a))
    assert res.frames.shape == (3, 32, 40, 3) and res.frames.dtype == np.uint8
    assert calls == [(1, 2, "t2i"), (2, 2, "t2i"), (1, 2, "i2v"), (2, 2, "i2v")]
    assert res.timings["t2i"] > 0 and res.timings["total"] >= res.timings["i2v"]
    # the first frame is the T2I output; the video model's spatial layers keep their adapter processors
    t2i = pipe.text_to_image(PROMPT, height=32, width=40, num_inference_steps=2, guidance_scale=7.5, seed=0)
    np.testing.assert_array_equal(res.first_frame, t2i)
    assert any(isinstance(m.processor, AdapterAttnProcessor) for m in pipe.model.unet.modules() if hasattr(m, "processor"))
    np.testing.assert_array_equal(res.frames, pipe(small()).frames)
    assert not np.array_equal(res.frames, pipe(small(seed=1)).frames)


def test_text_to_image_from_a_local_stable_diffusion_folder(checkpoint: Path, tiny_dir: Path, tmp_path: Path) -> None:
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    sd = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(tiny_dir / "vae"), unet=UNet2DConditionModel.from_pretrained(tiny_dir / "unet"),
        text_encoder=CLIPTextModel.from_pretrained(tiny_dir / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer"), scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.save_pretrained(tmp_path / "sd")
    p = VideoPipeline.from_checkpoint(checkpoint, t2i_path=str(tmp_path / "sd"))
    calls: list[str] = []
    res = p(small(sampler="euler"), callback=lambda s, n, ph: calls.append(ph))
    assert res.frames.shape == (3, 32, 40, 3) and calls == ["t2i", "t2i", "i2v", "i2v"]
    assert isinstance(p.t2i.scheduler, DDIMScheduler)  # the per-call Euler scheduler went to a copy


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_prediction_types_and_samplers(pipe: VideoPipeline, image: np.ndarray, prediction_type: str, sampler: str) -> None:
    p = VideoPipeline(pipe.model, replace(SCHEDULE, prediction_type=prediction_type), pipe.encoders,
                      defaults=pipe.defaults)
    assert p._scheduler(sampler).config.prediction_type == prediction_type
    first = p.prepare_image(image, 32, 32)
    lat = p.video_latents(first, PROMPT, num_frames=2, height=32, width=32, num_inference_steps=2,
                          guidance_scale=5.0, guidance_rescale=0.7, sampler=sampler, seed=0)
    assert lat.shape == (1, 4, 2, 8, 8) and torch.isfinite(lat).all()


def test_direct_text_to_video_model(tiny_dir: Path) -> None:
    cfg = ModelConfig.tiny(factorized=False, temporal_text_encoder="clip")
    model = FactorizedDreamerUNet.from_preset("tiny", cfg, seed=0).eval()
    p = VideoPipeline(model, SCHEDULE, FrozenEncoders(EncoderConfig.tiny(tiny_dir)))
    calls: list[str] = []
    res = p(small(height=36, width=44), callback=lambda s, n, ph: calls.append(ph))  # no T2I: multiples of 4 suffice
    assert res.frames.shape == (3, 36, 44, 3) and calls == ["i2v", "i2v"] and res.timings["t2i"] == 0.0
    with pytest.raises(ValueError, match="`image`"):
        p(small(image=np.zeros((32, 40, 3), np.uint8)))


# ---------------------------------------------------------------------------------- guidance


class StubModel(torch.nn.Module):
    """Output = base + A·[image given] + B·[text given]; text/image are "null" when all zeros."""

    A, B = 2.0, 5.0

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, sample, timestep, text_tokens, image_embed=None, first_frame=None, t5_tokens=None, t5_mask=None):
        self.batches.append(sample.shape[0])
        txt = (text_tokens.abs().sum((1, 2)) > 0).float()
        assert torch.equal(txt, (t5_tokens.abs().sum((1, 2)) > 0).float())  # T5 follows the text switch
        img = (image_embed.abs().sum(1) > 0).float()
        assert torch.equal(img, (first_frame.abs().sum((1, 2, 3)) > 0).float())  # latent follows the image
        base = torch.linspace(-1, 1, sample[0].numel()).view(sample.shape[1:])
        out = base + self.A * img.view(-1, 1, 1, 1, 1) + self.B * txt.view(-1, 1, 1, 1, 1) * (1 + base)
        return type("Out", (), {"sample": out})()


def _stub_conditions() -> tuple[Conditions, Conditions]:
    cond = Conditions(torch.ones(1, 5, 4), torch.ones(1, 3), torch.ones(1, 4, 2, 2), torch.ones(1, 6, 8),
                      torch.ones(1, 6, dtype=torch.bool))
    null = Conditions(torch.zeros(1, 5, 4), torch.zeros(1, 3), torch.zeros(1, 4, 2, 2), torch.zeros(1, 6, 8),
                      torch.ones(1, 6, dtype=torch.bool))
    return cond, null


def test_guidance_formula_with_a_stub_model() -> None:
    model, (cond, null) = StubModel(), _stub_conditions()
    x = torch.zeros(1, 4, 3, 2, 2)
    base = torch.linspace(-1, 1, x[0].numel()).view(1, *x.shape[1:])
    e00, e10, e11 = base, base + model.A, base + model.A + model.B * (1 + base)
    for s_txt, s_img in [(7.5, 1.5), (3.0, 2.0), (0.0, 0.0), (2.0, 1.0), (1.0, 3.0)]:
        got = guided_prediction(model, x, 10, cond, null, guidance_scale=s_txt, image_guidance_scale=s_img)
        want = e00 + s_img * (e10 - e00) + s_txt * (e11 - e10)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(got, base + s_img * model.A + s_txt * model.B * (1 + base), rtol=0, atol=1e-5)
    assert model.batches[:2] == [3, 3]  # the three branches in one batched forward
    model.batches.clear()
    got = guided_prediction(model, x, 10, cond, null, guidance_scale=1.0, image_guidance_scale=1.0)
    torch.testing.assert_close(got, e11, rtol=0, atol=0)  # the plain conditional prediction
    assert model.batches == [1]
    got = guided_prediction(model, x, 10, cond, null, guidance_scale=4.0, image_guidance_scale=1.5, guidance_rescale=0.6)
    plain = e00 + 1.5 * (e10 - e00) + 4.0 * (e11 - e10)
    torch.testing.assert_close(got, rescale_noise_cfg(plain, e11, guidance_rescale=0.6), rtol=1e-6, atol=1e-6)
    std = lambda t: t.std(dim=list(range(1, t.ndim)))
    torch.testing.assert_close(std(combine_guidance(e00, e10, e11, guidance_scale=4.0, image_guidance_scale=1.5,
                                                    guidance_rescale=1.0)), std(e11))


def test_motion_prompt_reaches_t5_only(pipe: VideoPipeline, image: np.ndarray) -> None:
    """``motion_prompt`` is what the temporal layers' T5 reads; CLIP (spatial layers, T2I) keeps ``prompt``."""
    first = pipe.prepare_image(image, 32, 32)
    full, _ = pipe.encode_conditions(first, PROMPT)
    split, null = pipe.encode_conditions(first, PROMPT, motion_prompt="slides to the left")
    motion, _ = pipe.encode_conditions(first, "slides to the left")
    torch.testing.assert_close(split.text_tokens, full.text_tokens, rtol=0, atol=0)
    torch.testing.assert_close(split.t5_tokens, motion.t5_tokens, rtol=0, atol=0)
    assert not torch.equal(split.t5_mask, full.t5_mask) or not torch.equal(split.t5_tokens, full.t5_tokens)
    other = pipe.encode_conditions(first, PROMPT)[1]  # the negative prompt's T5 tokens are unchanged
    torch.testing.assert_close(null.t5_tokens[null.t5_mask], other.t5_tokens[other.t5_mask], rtol=0, atol=0)


def test_guidance_on_the_real_model(pipe: VideoPipeline, image: np.ndarray) -> None:
    first = pipe.prepare_image(image, 32, 32)
    cond, null = pipe.encode_conditions(first, PROMPT, "blurry")
    x = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        run = lambda c: pipe.model(x, 500, **c.as_kwargs()).sample
        e00 = run(null)
        e10 = run(Conditions(null.text_tokens, cond.image_embed, cond.first_frame, null.t5_tokens, null.t5_mask))
        e11 = run(cond)
        plain = guided_prediction(pipe.model, x, 500, cond, null, guidance_scale=1.0, image_guidance_scale=1.0)
        got = guided_prediction(pipe.model, x, 500, cond, null, guidance_scale=6.0, image_guidance_scale=2.0)
    torch.testing.assert_close(plain, e11)
    torch.testing.assert_close(got, e00 + 2.0 * (e10 - e00) + 6.0 * (e11 - e10), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(e10, e00) and not torch.allclose(e11, e10)  # both conditions matter
    assert not null.image_embed.any() and not null.first_frame.any()  # null image = zeros


# ---------------------------------------------------------------------------------- cancellation


def test_cancel_from_the_callback(pipe: VideoPipeline, image: np.ndarray) -> None:
    calls: list[tuple[int, int, str]] = []

    def stop_at_2(step: int, total: int, phase: str) -> bool:
        calls.append((step, total, phase))
        return step < 2

    with pytest.raises(GenerationCancelled) as err:
        pipe(small(image=image, num_inference_steps=4), callback=stop_at_2)
    assert calls == [(1, 4, "i2v"), (2, 4, "i2v")] and (err.value.step, err.value.phase) == (2, "i2v")

    def raise_in_t2i(step: int, total: int, phase: str) -> None:
        calls.append((step, total, phase))
        raise GenerationCancelled("client went away")

    calls.clear()
    with pytest.raises(GenerationCancelled, match="client went away"):
        pipe(small(num_inference_steps=3), callback=raise_in_t2i)
    assert calls == [(1, 3, "t2i")]


# ---------------------------------------------------------------------------------- validation

INVALID_REQUESTS = [
    ({"motion_prompt": ""}, "motion_prompt"),
    ({"motion_prompt": 3}, "motion_prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"negative_prompt": 3}, "negative_prompt"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 2.5}, "num_inference_steps"),
    ({"num_frames": 0}, "num_frames"),
    ({"num_frames": -3}, "num_frames"),
    ({"height": 0}, "height"),
    ({"width": True}, "width"),
    ({"fps": 0}, "fps"),
    ({"fps": float("nan")}, "fps"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"image_guidance_scale": float("inf")}, "image_guidance_scale"),
    ({"guidance_rescale": 1.5}, "guidance_rescale"),
    ({"sampler": "dpm"}, "sampler"),
    ({"seed": -1}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"image": np.zeros((32, 32, 3), np.float32)}, "image"),
    ({"image": np.zeros((32, 32), np.uint8)}, "image"),
    ({"image": np.zeros((32, 32, 4), np.uint8)}, "image"),
    ({"image": np.zeros((0, 32, 3), np.uint8)}, "image"),
    ({"image": [[0, 0, 0]]}, "image"),
]
PIPELINE_LIMITS = [
    ({"num_frames": 33}, "num_frames"),  # > 4 x the checkpoint's 8
    ({"num_inference_steps": 1001}, "num_inference_steps"),
    ({"height": 36}, "height"),  # T2V: multiple of 8
    ({"width": 44}, "width"),
    ({"height": 30, "image": np.zeros((32, 32, 3), np.uint8)}, "height"),  # I2V: multiple of 4
    ({"height": 256}, "height"),  # > 2 x 64
]


@pytest.mark.parametrize(("kwargs", "name"), INVALID_REQUESTS, ids=[f"{n}-{i}" for i, (_, n) in enumerate(INVALID_REQUESTS)])
def test_invalid_requests_name_the_field(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}`"):
        VideoRequest(**{"prompt": PROMPT, **kwargs})


@pytest.mark.parametrize(("kwargs", "name"), PIPELINE_LIMITS, ids=[n for _, n in PIPELINE_LIMITS])
def test_pipeline_limits_name_the_field(pipe: VideoPipeline, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}`"):
        pipe(VideoRequest(**{"prompt": PROMPT, **kwargs}))


def test_i2v_accepts_multiples_of_the_vae_factor(pipe: VideoPipeline) -> None:
    plan = pipe.check_request(VideoRequest(PROMPT, image=np.zeros((9, 13, 3), np.uint8), height=36, width=44))
    assert (plan.height, plan.width, plan.num_frames, plan.fps) == (36, 44, 8, 6.0)


# ---------------------------------------------------------------------------------- output and CLI


def test_save_video_formats(tmp_path: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 255, (5, 24, 32, 3)).astype(np.uint8)
    res = VideoResult(frames=frames, first_frame=frames[0], seed=0, fps=5.0, timings={})
    for fmt in ("gif", "webp"):
        path = save_video(res, tmp_path / f"v.{fmt}")
        with Image.open(path) as im:
            assert im.n_frames == 5 and im.size == (32, 24)
    st = mp4_info(save_video(res, tmp_path / "v.mp4"))
    assert (st["codec"], st["frames"], st["width"], st["height"]) == ("h264", 5, 32, 24)
    with pytest.raises(ValueError, match="`format`"):
        save_video(res, tmp_path / "v.avi")


def test_cli_generate_writes_an_mp4(checkpoint: Path, image: np.ndarray, tmp_path: Path, capsys) -> None:
    png = tmp_path / "first.png"
    Image.fromarray(image).save(png)
    out = tmp_path / "out" / "v.mp4"
    rc = cli_main(["generate", "--checkpoint", str(checkpoint), "--prompt", PROMPT, "--image", str(png),
                   "--num-frames", "5", "--height", "32", "--width", "48", "--steps", "2", "--seed", "3",
                   "--sampler", "euler", "--out", str(out)])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["path"] == str(out) and line["seed"] == 3 and set(line["timings"]) == {"t2i", "i2v", "decode", "total"}
    st = mp4_info(out)
    assert (st["frames"], st["width"], st["height"]) == (5, 48, 32)
    rc = cli_main(["generate", "--checkpoint", str(checkpoint), "--prompt", "", "--out", str(tmp_path / "x.mp4")])
    assert rc == 2 and "`prompt`" in capsys.readouterr().err
