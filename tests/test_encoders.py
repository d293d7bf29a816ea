"""Tests of ``fdreamer.encoders`` against the tiny models of ``fdreamer make-tiny-models``."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fdreamer.toy import tiny_models as tm
from fdreamer.encoders import COMPONENTS, EncoderConfig, FrozenEncoders

SHORT, LONG = "a red circle", "a small blue square slides slowly to the left over a textured background"
SCALE = 0.18215


@pytest.fixture(scope="module")
def enc(tiny_dir: Path) -> FrozenEncoders:
    return FrozenEncoders.load(EncoderConfig.tiny(tiny_dir))


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(2, 2, 32, 32, 3), dtype=np.uint8)


def _pixels(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).float().div(127.5).sub(1.0).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------ config
def test_config_paths_and_help(tmp_path: Path) -> None:
    cfg = EncoderConfig.tiny(tmp_path)
    assert (cfg.vae, cfg.text_encoder, cfg.tokenizer) == tuple(
        str(tmp_path / n) for n in ("vae", "text_encoder", "tokenizer")
    )
    assert (cfg.t5, cfg.clip, cfg.dtype, cfg.device) == (str(tmp_path / "t5"), str(tmp_path / "clip"), "float32", "cpu")
    assert (cfg.vae_scaling_factor, cfg.t5_max_length, cfg.clip_max_length) == (None, 120, 77)
    sd = EncoderConfig.sd15("/m/sd15", "/m/t5-v1_1-xxl", "/m/clip-vit-large-patch14", dtype="float16")
    assert (sd.vae, sd.text_encoder, sd.tokenizer) == ("/m/sd15/vae", "/m/sd15/text_encoder", "/m/sd15/tokenizer")
    assert (sd.t5, sd.clip, sd.torch_dtype) == ("/m/t5-v1_1-xxl", "/m/clip-vit-large-patch14", torch.float16)
    assert all(f.metadata.get("help") for f in dataclasses.fields(EncoderConfig))
    with pytest.raises(ValueError, match="dtype"):
        EncoderConfig(dtype="float64")
    with pytest.raises(ValueError, match="t5_max_length"):
        EncoderConfig(t5_max_length=0)
    with pytest.raises(ValueError, match="device"):
        EncoderConfig(device="not-a-device")


def test_everything_frozen(enc: FrozenEncoders) -> None:
    assert enc.loaded_components == frozenset(COMPONENTS)
    for model in (enc.vae, enc.text_encoder, enc.t5, enc.clip):
        assert not model.training
        assert all(not m.training for m in model.modules())
        assert all(not p.requires_grad for p in model.parameters())
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_loaded_weights_equal_in_memory(enc: FrozenEncoders, memory: tm.TinyModels) -> None:
    for name, loaded in (("vae", enc.vae), ("text_encoder", enc.text_encoder), ("t5", enc.t5), ("clip", enc.clip)):
        expected = getattr(memory, name).state_dict()
        got = loaded.state_dict()
        assert got.keys() == expected.keys(), name
        assert all(torch.equal(got[k], v) for k, v in expected.items()), name


# --------------------------------------------------------------------------------------------- VAE
def test_encode_video_matches_manual_scaled_encode(
    enc: FrozenEncoders, memory: tm.TinyModels, frames: np.ndarray
) -> None:
    latents = enc.encode_video(frames, chunk_size=4)
    assert latents.shape == (2, 4, 2, 8, 8) and latents.dtype == torch.float32
    with torch.no_grad():
        manual = memory.vae.encode(_pixels(frames[1])).latent_dist.mean * SCALE  # clip 1, its 2 frames
    torch.testing.assert_close(latents[1].permute(1, 0, 2, 3), manual, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(enc.encode_video(torch.from_numpy(frames), chunk_size=1), latents, rtol=1e-4, atol=1e-5)
    assert enc.vae_scaling_factor == SCALE  # read from the VAE's config.json when not configured
    unscaled = FrozenEncoders(dataclasses.replace(enc.cfg, vae_scaling_factor=1.0))
    torch.testing.assert_close(unscaled.encode_video(frames) * SCALE, latents, rtol=1e-4, atol=1e-6)


def test_encode_video_sampling(enc: FrozenEncoders, frames: np.ndarray) -> None:
    a = enc.encode_video(frames, sample=True, generator=torch.Generator().manual_seed(1))
    b = enc.encode_video(frames, sample=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, enc.encode_video(frames))


def test_decode_latents(enc: FrozenEncoders, memory: tm.TinyModels, frames: np.ndarray) -> None:
    latents = enc.encode_video(frames)
    video = enc.decode_latents(latents, chunk_size=2)
    assert video.shape == frames.shape and video.dtype == torch.uint8 and video.device.type == "cpu"
    with torch.no_grad():
        x = memory.vae.decode(latents[0].permute(1, 0, 2, 3) / SCALE).sample.clamp(-1, 1)
    manual = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert (video[0].int() - manual.int()).abs().max() <= 1


def test_video_input_validation(enc: FrozenEncoders, frames: np.ndarray) -> None:
    with pytest.raises(TypeError, match="uint8"):
        enc.encode_video(frames.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[B,T,H,W,3\]"):
        enc.encode_video(frames[0])
    with pytest.raises(ValueError, match="divisible"):
        enc.encode_video(frames[:, :, :30, :30])
    with pytest.raises(ValueError, match="channels"):
        enc.decode_latents(torch.zeros(1, 3, 2, 8, 8))


# ---------------------------------------------------------------------------------------------- T5
def test_encode_t5_padded(enc: FrozenEncoders, memory: tm.TinyModels) -> None:
    hidden, mask = enc.encode_t5([SHORT, LONG])
    assert hidden.shape == (2, 120, 64) and hidden.dtype == torch.float32
    assert mask.shape == (2, 120) and mask.dtype == torch.bool
    counts = [len(ids) for ids in enc.t5_tokenizer([SHORT, LONG])["input_ids"]]
    assert mask.sum(1).tolist() == counts
    batch = memory.t5_tokenizer([SHORT, LONG], padding="max_length", max_length=120, return_tensors="pt")
    with torch.no_grad():
        ref = memory.t5(**batch).last_hidden_state
    torch.testing.assert_close(hidden[mask], ref[mask], rtol=1e-4, atol=1e-5)
    longest, _ = enc.encode_t5([SHORT, LONG], pad_to_max_length=False)
    assert longest.shape == (2, max(counts), 64)


def test_encode_t5_unpadded(enc: FrozenEncoders) -> None:
    out = enc.encode_t5_unpadded([SHORT, LONG, ""])
    counts = [len(ids) for ids in enc.t5_tokenizer([SHORT, LONG, ""])["input_ids"]]
    assert [t.shape for t in out] == [(n, 64) for n in counts]
    assert counts[0] == len(SHORT.split()) + 1 and counts[0] < counts[1] and counts[2] == 1  # + EOS
    padded, _ = enc.encode_t5([SHORT, LONG])
    for i in range(2):
        torch.testing.assert_close(out[i], padded[i, : counts[i]], rtol=1e-4, atol=1e-5)
    alone = enc.encode_t5_unpadded([SHORT])[0]  # independent of what else is in the batch
    torch.testing.assert_close(alone, out[0], rtol=1e-4, atol=1e-5)
    truncated = enc.encode_t5_unpadded([" ".join(["red"] * 300)])[0]
    assert truncated.shape[0] == 120


def test_text_validation(enc: FrozenEncoders) -> None:
    with pytest.raises(TypeError, match="single str"):
        enc.encode_t5(SHORT)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        enc.encode_clip_text_tokens([])


# -------------------------------------------------------------------------------------------- CLIP
def test_clip_text_tokens(enc: FrozenEncoders, memory: tm.TinyModels) -> None:
    tokens = enc.encode_clip_text_tokens([SHORT, LONG, "zebra"])
    assert tokens.shape == (3, 77, 32) and tokens.dtype == torch.float32
    ids = memory.tokenizer([SHORT, LONG, "zebra"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        ref = memory.text_encoder(input_ids=ids["input_ids"]).last_hidden_state
    torch.testing.assert_close(tokens, ref, rtol=1e-4, atol=1e-5)


def test_clip_text_embeds(enc: FrozenEncoders, memory: tm.TinyModels) -> None:
    emb = enc.encode_clip_text_embeds([SHORT, LONG])
    assert emb.shape == (2, tm.TINY_CLIP_PROJECTION_DIM) and emb.dtype == torch.float32
    batch = memory.tokenizer([SHORT, LONG], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        pooled = memory.clip.text_model(**batch).pooler_output
        ref = memory.clip.text_projection(pooled)
    torch.testing.assert_close(emb, ref, rtol=1e-4, atol=1e-5)
    unit = enc.encode_clip_text_embeds([SHORT, LONG], normalize=True)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(2))


def test_clip_image(enc: FrozenEncoders, memory: tm.TinyModels, frames: np.ndarray) -> None:
    images = frames[:, 0]
    emb, hidden = enc.encode_clip_image_with_hidden(images)
    n_patches = (tm.TINY_CLIP_IMAGE_SIZE // tm.TINY_CLIP_VISION_CONFIG["patch_size"]) ** 2
    assert emb.shape == (2, tm.TINY_CLIP_PROJECTION_DIM) and emb.dtype == torch.float32
    assert hidden.shape == (2, n_patches + 1, tm.TINY_CLIP_VISION_CONFIG["hidden_size"])
    pixels = memory.clip_image_processor(images=list(images), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, tm.TINY_CLIP_IMAGE_SIZE, tm.TINY_CLIP_IMAGE_SIZE)
    with torch.no_grad():
        ref = memory.clip.visual_projection(memory.clip.vision_model(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(emb, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(enc.encode_clip_image(torch.from_numpy(images)), emb)
    odd = np.random.default_rng(1).integers(0, 256, size=(3, 40, 56, 3), dtype=np.uint8)
    assert enc.encode_clip_image(odd).shape == (3, tm.TINY_CLIP_PROJECTION_DIM)


# --------------------------------------------------------------------------------- loading options
def test_missing_component_dir(tiny_dir: Path, tmp_path: Path) -> None:
    cfg = EncoderConfig.tiny(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"t5: folder .*nowhere/t5"):
        FrozenEncoders.load(cfg, components=["t5"])
    lazy = FrozenEncoders(cfg)
    with pytest.raises(FileNotFoundError, match=r"vae: folder .*nowhere/vae"):
        lazy.encode_video(np.zeros((1, 1, 32, 32, 3), np.uint8))
    shutil.copytree(tiny_dir / "t5", tmp_path / "t5")
    (tmp_path / "t5" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"t5: .*t5.* has no config\.json"):
        FrozenEncoders.load(EncoderConfig(t5=str(tmp_path / "t5")), components=["t5"])
    with pytest.raises(ValueError, match=r"EncoderConfig\.clip is not set"):
        FrozenEncoders.load(EncoderConfig(), components=["clip"])
    with pytest.raises(ValueError, match="unknown encoder component"):
        FrozenEncoders.load(EncoderConfig(), components=["unet"])


def test_lazy_loading_only_t5(tiny_dir: Path, tmp_path: Path) -> None:
    cfg = EncoderConfig.tiny(tiny_dir, vae=str(tmp_path / "no-vae-here"))
    lazy = FrozenEncoders(cfg)
    assert lazy.loaded_components == frozenset()
    assert len(lazy.encode_t5_unpadded([SHORT])) == 1
    assert lazy.loaded_components == {"t5"}
    assert FrozenEncoders.load(cfg, components=("t5",)).loaded_components == {"t5"}
    only_t5 = FrozenEncoders.load(EncoderConfig(t5=cfg.t5))  # default: every configured component
    assert only_t5.loaded_components == {"t5"}
    only_t5.unload("t5")
    assert only_t5.loaded_components == frozenset()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision(tiny_dir: Path, frames: np.ndarray, dtype: str) -> None:
    enc = FrozenEncoders.load(EncoderConfig.tiny(tiny_dir, dtype=dtype))
    want = getattr(torch, dtype)
    assert enc.vae.dtype == want and enc.text_encoder.dtype == want and enc.clip.dtype == want
    latents = enc.encode_video(frames[:1, :2])
    assert latents.dtype == want and latents.shape == (1, 4, 2, 8, 8)
    assert enc.decode_latents(latents).dtype == torch.uint8
    assert enc.encode_t5([SHORT])[0].dtype == want
    assert all(t.dtype == want for t in enc.encode_t5_unpadded([SHORT, LONG]))
    assert enc.encode_clip_text_tokens([SHORT]).dtype == want
    assert enc.encode_clip_text_embeds([SHORT]).dtype == want
    assert enc.encode_clip_image(frames[:, 0]).dtype == want
