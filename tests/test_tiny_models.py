"""Tests of ``fdreamer.toy.tiny_models``: layouts, offline tokenizers, determinism, idempotence, CLI."""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from fdreamer.toy import tiny_models as tm
from fdreamer.toy import tiny_tokenizers as tt

from conftest import make_untrained_tiny_models as _make

CAPTION = "a red circle slides to the left"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_manifest(tiny_dir: Path) -> None:
    for rel in tm.EXPECTED_FILES:
        assert (tiny_dir / rel).is_file(), rel
    manifest = json.loads((tiny_dir / tm.MANIFEST_NAME).read_text())
    assert manifest["seed"] == 0 and manifest["vae_trained"] is False
    assert set(manifest["components"]) == {"vae", "unet", "text_encoder", "tokenizer", "t5", "clip"}
    params = manifest["parameters"]
    assert set(params) == {"vae", "unet", "text_encoder", "t5", "clip"}
    assert params["unet"] < 1_500_000 and params["vae"] < 1_500_000
    unet_cfg = json.loads((tiny_dir / "unet" / "config.json").read_text())
    assert unet_cfg["_class_name"] == "UNet2DConditionModel"
    assert unet_cfg["cross_attention_dim"] == tm.TINY_TEXT_ENCODER_CONFIG["hidden_size"]
    assert json.loads((tiny_dir / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    assert json.loads((tiny_dir / "clip" / "preprocessor_config.json").read_text())["crop_size"] == {
        "height": tm.TINY_CLIP_IMAGE_SIZE,
        "width": tm.TINY_CLIP_IMAGE_SIZE,
    }


def test_saved_weights_equal_in_memory_models(tiny_dir: Path, memory: tm.TinyModels) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel, T5EncoderModel

    loaders = {
        "vae": AutoencoderKL, "unet": UNet2DConditionModel, "text_encoder": CLIPTextModel,
        "t5": T5EncoderModel, "clip": CLIPModel,
    }
    for name, cls in loaders.items():
        loaded = cls.from_pretrained(tiny_dir / name, local_files_only=True).state_dict()
        expected = getattr(memory, name).state_dict()
        assert loaded.keys() == expected.keys(), name
        for key, value in expected.items():
            assert torch.equal(loaded[key], value), f"{name}.{key}"
    # The UNet accepts the tiny text encoder's hidden states as cross-attention context.
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet", local_files_only=True).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    ctx = torch.randn(2, 77, tm.TINY_TEXT_ENCODER_CONFIG["hidden_size"], generator=gen)
    with torch.no_grad():
        out = unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample
        ref = memory.unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx).sample
    assert out.shape == (2, 4, 16, 16)
    torch.testing.assert_close(out, ref)


def test_clip_tokenizer_round_trip(tiny_dir: Path, tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    before = tt.build_clip_tokenizer()(CAPTION)["input_ids"]
    for folder in ("tokenizer", "clip"):
        after = CLIPTokenizer.from_pretrained(tiny_dir / folder, local_files_only=True)
        assert after(CAPTION)["input_ids"] == before
    tokens = after.convert_ids_to_tokens(before)
    assert tokens == ["<|startoftext|>"] + [w + "</w>" for w in CAPTION.split()] + ["<|endoftext|>"]
    assert len(after("zebra", add_special_tokens=False)["input_ids"]) > 1  # unknown word -> pieces
    assert after.unk_token_id not in after("zebra quux!")["input_ids"][1:-1]
    # The SD-style vocab.json + merges.txt alone give the same tokenizer.
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tiny_dir / "tokenizer" / name, tmp_path / name)
    legacy = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert legacy(CAPTION + " zebra")["input_ids"] == after(CAPTION + " zebra")["input_ids"]


def test_every_word_is_one_token(tiny_dir: Path) -> None:
    from transformers import CLIPTokenizer, T5Tokenizer

    clip_tok = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer", local_files_only=True)
    t5_tok = T5Tokenizer.from_pretrained(tiny_dir / "t5", local_files_only=True)
    for word in tt.WORDS:
        assert len(clip_tok(word, add_special_tokens=False)["input_ids"]) == 1, word
        assert len(t5_tok(word, add_special_tokens=False)["input_ids"]) == 1, word


def test_t5_tokenizer_round_trip(tiny_dir: Path) -> None:
    from transformers import T5Tokenizer

    before = tt.build_t5_tokenizer()
    after = T5Tokenizer.from_pretrained(tiny_dir / "t5", local_files_only=True)
    texts = [CAPTION, "A Blue square spins, zebra 42!"]
    assert after(texts)["input_ids"] == before(texts)["input_ids"]
    assert (after.pad_token_id, after.eos_token_id, after.unk_token_id) == (0, 1, 2)
    ids = after(CAPTION)["input_ids"]
    assert after.convert_ids_to_tokens(ids) == ["\u2581" + w for w in CAPTION.split()] + ["</s>"]
    assert after.unk_token_id not in after(texts[1])["input_ids"]  # ASCII never hits <unk>


def test_clip_bpe_vocab_structure() -> None:
    vocab, merges = tt.build_clip_bpe()
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert vocab[tt.CLIP_EOS] == len(vocab) - 1 and vocab[tt.CLIP_BOS] == len(vocab) - 2
    assert len(set(merges)) == len(merges)
    assert all(a + b in vocab for a, b in merges)
    assert len(tt.bytes_to_unicode()) == 256 and len(set(tt.bytes_to_unicode().values())) == 256
    with pytest.raises(ValueError, match="lowercase"):
        tt.build_clip_bpe(("Red",))


def test_deterministic_and_rng_untouched(tiny_dir: Path, no_asset: Path, tmp_path: Path) -> None:
    state = torch.get_rng_state()
    _make(tmp_path / "again", seed=0, vae_asset_dir=no_asset)
    assert torch.equal(torch.get_rng_state(), state)
    assert _files(tmp_path / "again") == _files(tiny_dir)


def test_idempotent_seed_guard_and_force(tiny_dir: Path, no_asset: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    stamp = {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()}
    no_t2i = no_asset.parent / "tiny_t2i"
    manifest = tm.make_tiny_models(copy, seed=0, vae_asset_dir=no_asset, t2i_asset_dir=no_t2i)  # complete: no VAE needed
    assert manifest == json.loads((tiny_dir / tm.MANIFEST_NAME).read_text())
    assert {p: p.stat().st_mtime_ns for p in copy.rglob("*") if p.is_file()} == stamp
    with pytest.raises(FileExistsError, match="seed 0"):
        tm.make_tiny_models(copy, seed=1, vae_asset_dir=no_asset, t2i_asset_dir=no_t2i)
    _make(copy, seed=1, force=True, vae_asset_dir=no_asset)
    new, old = _files(copy), _files(tiny_dir)
    assert new["unet/diffusion_pytorch_model.safetensors"] != old["unet/diffusion_pytorch_model.safetensors"]
    assert new["tokenizer/tokenizer.json"] == old["tokenizer/tokenizer.json"]
    (copy / "t5" / "model.safetensors").unlink()  # incomplete folder -> rebuilt
    assert _make(copy, seed=1, vae_asset_dir=no_asset)["seed"] == 1
    assert (copy / "t5" / "model.safetensors").is_file()


def test_missing_vae_asset(no_asset: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train-tiny-vae"):
        tm.make_tiny_models(tmp_path / "out", vae_asset_dir=no_asset)
    assert not (tmp_path / "out" / tm.MANIFEST_NAME).exists()
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        tm.build_tiny_models(allow_untrained_vae=True, vae_asset_dir=no_asset)


def test_trained_vae_asset_is_copied(tiny_dir: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    from fdreamer.toy.vae_train import TINY_VAE_CONFIG

    asset = tmp_path / "tiny_vae"
    torch.manual_seed(123)
    AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(asset)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    manifest = tm.make_tiny_models(copy, seed=0, vae_asset_dir=asset)  # random VAE -> rebuilt
    assert manifest["vae_trained"] is True
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert (copy / "vae" / name).read_bytes() == (asset / name).read_bytes()
    assert _files(copy)["unet/config.json"] == _files(tiny_dir)["unet/config.json"]


def test_cli_subcommand(tiny_dir: Path, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="fdreamer")
    tm.register_cli(parser.add_subparsers(dest="command", required=True))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    args = parser.parse_args(["make-tiny-models", str(copy), "--seed", "0", "--allow-untrained-vae"])
    assert (args.seed, args.force, args.allow_untrained_vae) == (0, False, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert args.func(args) == 0
    assert (copy / tm.MANIFEST_NAME).is_file()
    assert parser.parse_args(["make-tiny-models", "x", "--force"]).force is True
