"""``fdreamer make-tiny-models DIR``: small random models in the standard Hugging Face folder layouts.

The tiny models stand in for SD1.5 (VAE, UNet, CLIP text encoder + tokenizer), T5-XXL and
CLIP ViT-L/14 in tests, CI and CPU demos. They are written in exactly the layouts the real models
use, so :class:`fdreamer.encoders.FrozenEncoders` (and the UNet loaders) load both with the same
code. Everything is built offline: the tokenizers are constructed in memory from a fixed English
word list (:data:`fdreamer.toy.tiny_tokenizers.WORDS`), and all weights come from ``torch.manual_seed``-seeded initialisation,
so the same seed always gives the same bytes.

Layout written under ``DIR``::

    vae/           diffusers AutoencoderKL (trained weights from fdreamer/toy/assets/tiny_vae/)
    unet/          diffusers UNet2DConditionModel (SD layout; the trained tiny T2I from
                   fdreamer/toy/assets/tiny_t2i/ when committed, else random init)
    scheduler/     DDIMScheduler the tiny T2I was trained with (only with the trained T2I)
    model_index.json  only with the trained T2I: DIR is then a StableDiffusionPipeline folder (the T2I
                   step of text-to-video: VideoPipeline's ``t2i_path``)
    text_encoder/  transformers CLIPTextModel (SD's text encoder slot)
    tokenizer/     CLIPTokenizer (tokenizer.json + vocab.json + merges.txt)
    i2v/           the trained tiny image-to-video checkpoint (fdreamer/toy/assets/tiny_i2v/, when committed
                   and the VAE is the trained one), its encoders.yaml pointing at this folder: what
                   ``fdreamer generate``, evaluation, serving and a fine-tune's ``init_from`` load
    t5/            transformers T5EncoderModel + T5Tokenizer in the same folder
    clip/          transformers CLIPModel + CLIPTokenizer + CLIPImageProcessor
    tiny_models.json  what each folder is, seeds, parameter counts (written last = complete)
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fdreamer.toy.tiny_tokenizers import WORDS, build_clip_bpe, build_clip_tokenizer, build_t5_tokenizer, write_bpe_files

MANIFEST_NAME = "tiny_models.json"
MANIFEST_FORMAT = 1
TINY_VAE_ASSET_DIR = Path(__file__).resolve().parent / "assets" / "tiny_vae"
# The trained tiny text-to-image model (training/configs/tiny_t2i.yaml, then fdreamer export-image-model):
# unet/ + scheduler/ + training.json.
TINY_T2I_ASSET_DIR = Path(__file__).resolve().parent / "assets" / "tiny_t2i"
# The trained tiny image-to-video model (training/configs/tiny_i2v.yaml from the T2I, then fdreamer
# export-video-model): an inference checkpoint folder + training.json.
TINY_I2V_ASSET_DIR = Path(__file__).resolve().parent / "assets" / "tiny_i2v"
# model_index.json of an SD1.x folder (no safety checker): what makes DIR a StableDiffusionPipeline.
SD_MODEL_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDIMScheduler"],
    "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
    "requires_safety_checker": False,
}

# Tiny UNet in the SD1.5 layout: cross-attention only at the lower (8x8) resolution.
TINY_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=16, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
    cross_attention_dim=32,  # == TINY_TEXT_ENCODER_CONFIG["hidden_size"]
)

# SD's text-encoder slot (CLIPTextModel); vocab size and special-token ids come from the tokenizer.
TINY_TEXT_ENCODER_CONFIG: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, projection_dim=32,
)

# T5 v1.1-style encoder (gated-GELU, untied embeddings); vocab size comes from the tokenizer.
TINY_T5_CONFIG: dict[str, Any] = dict(
    d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)

TINY_CLIP_IMAGE_SIZE = 32
# Full CLIPModel (ViT-L/14 stand-in): dims differ from the SD text encoder's and T5's on purpose,
# so a mixed-up embedding fails loudly by shape.
TINY_CLIP_TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77,
)
TINY_CLIP_VISION_CONFIG: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    image_size=TINY_CLIP_IMAGE_SIZE, patch_size=8, num_channels=3,
)
TINY_CLIP_PROJECTION_DIM = 32

_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_SEED_OFFSETS = {"vae": 0, "unet": 1, "text_encoder": 2, "t5": 3, "clip": 4}
EXPECTED_FILES = (
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json", "tokenizer/merges.txt",
    "t5/config.json", "t5/model.safetensors", "t5/tokenizer.json", "t5/tokenizer_config.json",
    "clip/config.json", "clip/model.safetensors", "clip/tokenizer.json",
    "clip/tokenizer_config.json", "clip/preprocessor_config.json",
)


@dataclass
class TinyModels:
    """The in-memory tiny models, exactly as :func:`make_tiny_models` saves them."""

    vae: Any  # diffusers AutoencoderKL
    unet: Any  # diffusers UNet2DConditionModel
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # CLIPTokenizer (also saved into clip/)
    t5: Any  # transformers T5EncoderModel
    t5_tokenizer: Any  # T5Tokenizer
    clip: Any  # transformers CLIPModel
    clip_image_processor: Any  # CLIPImageProcessor (PIL backend)
    seeds: dict[str, int]
    vae_asset_dir: Path | None  # where the trained VAE came from; None = random init
    t2i_asset_dir: Path | None = None  # where the trained T2I UNet (+ scheduler) came from; None = random init

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per model folder."""
        names = ("vae", "unet", "text_encoder", "t5", "clip")
        return {n: int(sum(p.numel() for p in getattr(self, n).parameters())) for n in names}


def _seeded_build(seed: int, build: Callable[[], Any]) -> Any:
    """Run ``build()`` with the torch RNG seeded, without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _tiny_vae(seed: int, allow_untrained_vae: bool, asset_dir: Path) -> tuple[Any, Path | None]:
    """The trained tiny VAE from ``asset_dir`` or (if allowed) a seeded random one."""
    from diffusers import AutoencoderKL

    from fdreamer.toy.vae_train import TINY_VAE_CONFIG

    if (asset_dir / "config.json").is_file():
        if not (asset_dir / _DIFFUSERS_WEIGHTS).is_file():
            raise FileNotFoundError(f"tiny VAE asset {asset_dir} has config.json but no {_DIFFUSERS_WEIGHTS}")
        return AutoencoderKL.from_pretrained(asset_dir, local_files_only=True), asset_dir
    if not allow_untrained_vae:
        raise FileNotFoundError(
            f"trained tiny VAE weights not found at {asset_dir} (config.json + {_DIFFUSERS_WEIGHTS}); "
            "run `fdreamer train-tiny-vae` first, or pass --allow-untrained-vae "
            "(allow_untrained_vae=True) to write a randomly initialised VAE"
        )
    warnings.warn(
        f"{asset_dir} missing: using a RANDOMLY INITIALISED tiny VAE (it decodes to noise)", stacklevel=3
    )
    return _seeded_build(seed, lambda: AutoencoderKL(**TINY_VAE_CONFIG)), None


def build_tiny_models(
    *, seed: int = 0, allow_untrained_vae: bool = False, vae_asset_dir: str | Path | None = None,
    t2i_asset_dir: str | Path | None = None,
) -> TinyModels:
    """Build every tiny model in memory, each component seeded with ``seed`` + a fixed offset.

    The VAE is the trained one from ``vae_asset_dir`` (default ``fdreamer/toy/assets/tiny_vae``); if
    that is missing, :class:`FileNotFoundError` unless ``allow_untrained_vae`` (then a warning and
    a random VAE with ``TINY_VAE_CONFIG``).
    """
    from diffusers import UNet2DConditionModel
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPTextConfig,
        CLIPTextModel,
        T5Config,
        T5EncoderModel,
    )

    asset_dir = Path(vae_asset_dir) if vae_asset_dir is not None else TINY_VAE_ASSET_DIR
    seeds = {name: seed + offset for name, offset in _SEED_OFFSETS.items()}
    vae, vae_source = _tiny_vae(seeds["vae"], allow_untrained_vae, asset_dir)
    t2i = trained_t2i(Path(t2i_asset_dir) if t2i_asset_dir is not None else TINY_T2I_ASSET_DIR)
    if t2i is not None:
        unet = UNet2DConditionModel.from_pretrained(t2i / "unet", local_files_only=True)
    else:
        unet = _seeded_build(seeds["unet"], lambda: UNet2DConditionModel(**TINY_UNET_CONFIG))

    clip_tok = build_clip_tokenizer()
    ids = dict(bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id)
    text_cfg = CLIPTextConfig(vocab_size=len(clip_tok), **TINY_TEXT_ENCODER_CONFIG, **ids)
    text_encoder = _seeded_build(seeds["text_encoder"], lambda: CLIPTextModel(text_cfg))

    t5_tok = build_t5_tokenizer()
    t5_cfg = T5Config(vocab_size=len(t5_tok), **TINY_T5_CONFIG)
    t5 = _seeded_build(seeds["t5"], lambda: T5EncoderModel(t5_cfg))

    clip_cfg = CLIPConfig(
        text_config=dict(vocab_size=len(clip_tok), **TINY_CLIP_TEXT_CONFIG, **ids),
        vision_config=dict(TINY_CLIP_VISION_CONFIG),
        projection_dim=TINY_CLIP_PROJECTION_DIM,
    )
    clip = _seeded_build(seeds["clip"], lambda: CLIPModel(clip_cfg))
    size = TINY_CLIP_IMAGE_SIZE
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    models = (vae, unet, text_encoder, t5, clip)
    for model in models:
        model.eval()
    return TinyModels(vae, unet, text_encoder, clip_tok, t5, t5_tok, clip, processor, seeds, vae_source, t2i)


def trained_t2i(asset_dir: Path) -> Path | None:
    """``asset_dir`` when it holds a trained tiny T2I (``unet/`` weights + ``scheduler/``), else None."""
    need = ("unet/config.json", f"unet/{_DIFFUSERS_WEIGHTS}", "scheduler/scheduler_config.json")
    return asset_dir if all((asset_dir / f).is_file() for f in need) else None


def trained_i2v(asset_dir: Path) -> Path | None:
    """``asset_dir`` when it holds a trained tiny I2V checkpoint (weights, configs, meta), else None."""
    need = ("model.safetensors", "model.yaml", "unet_config.json", "schedule.yaml", "fdreamer_checkpoint.json")
    return asset_dir if all((asset_dir / f).is_file() for f in need) else None


def _install_i2v(asset_dir: Path, root: Path) -> None:
    """Copy the I2V checkpoint to ``root/i2v`` with an encoders.yaml naming ``root``'s encoder folders."""
    from fdreamer.config import dump_yaml
    from fdreamer.encoders import EncoderConfig

    target = root / "i2v"
    shutil.copytree(asset_dir, target, ignore=shutil.ignore_patterns("training.json", "encoders.yaml"))
    (target / "encoders.yaml").write_text(dump_yaml(EncoderConfig.tiny(root.resolve())), encoding="utf-8")


def _manifest_complete(root: Path) -> dict[str, Any] | None:
    """The manifest of a complete tiny-model folder, or None if anything is missing."""
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file() or any(not (root / f).is_file() for f in EXPECTED_FILES):
        return None
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    return manifest if manifest.get("format") == MANIFEST_FORMAT else None


def make_tiny_models(
    out_dir: str | Path,
    *,
    seed: int = 0,
    allow_untrained_vae: bool = False,
    force: bool = False,
    vae_asset_dir: str | Path | None = None,
    t2i_asset_dir: str | Path | None = None,
    i2v_asset_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Write all tiny models under ``out_dir`` and return the manifest (also in tiny_models.json).

    Idempotent: a complete folder made with the same seed is returned as is unless ``force``; one
    made with another seed raises :class:`FileExistsError` (pass ``force`` to overwrite). A folder
    holding a random VAE is rebuilt once trained VAE weights exist. See :func:`build_tiny_models`
    for ``allow_untrained_vae``, ``vae_asset_dir`` and ``t2i_asset_dir`` (a folder is also rebuilt once
    trained T2I weights exist). The trained I2V checkpoint (``i2v_asset_dir``, default
    ``fdreamer/toy/assets/tiny_i2v``) is installed as ``i2v/`` when it exists and the VAE is the trained one
    (its latents are that VAE's).
    """
    root = Path(out_dir)
    asset_dir = Path(vae_asset_dir) if vae_asset_dir is not None else TINY_VAE_ASSET_DIR
    i2v = trained_i2v(Path(i2v_asset_dir) if i2v_asset_dir is not None else TINY_I2V_ASSET_DIR)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"tiny model output path {root} exists and is not a directory")
    existing = _manifest_complete(root)
    if existing is not None and not force:
        if existing.get("seed") != seed:
            raise FileExistsError(
                f"{root} already holds tiny models made with seed {existing.get('seed')}, not {seed}; "
                "pass force=True (--force) to overwrite"
            )
        t2i_dir = Path(t2i_asset_dir) if t2i_asset_dir is not None else TINY_T2I_ASSET_DIR
        vae_done = existing.get("vae_trained") or not (asset_dir / "config.json").is_file()
        i2v_done = existing.get("i2v_trained") or i2v is None or not existing.get("vae_trained")
        if vae_done and i2v_done and (existing.get("unet_trained") or trained_t2i(t2i_dir) is None):
            return existing

    models = build_tiny_models(seed=seed, allow_untrained_vae=allow_untrained_vae, vae_asset_dir=asset_dir,
                               t2i_asset_dir=t2i_asset_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST_NAME).unlink(missing_ok=True)  # incomplete until rewritten at the end
    for name in ("vae", "unet", "scheduler", "text_encoder", "tokenizer", "t5", "clip", "i2v"):
        if (root / name).exists():
            shutil.rmtree(root / name)

    if models.vae_asset_dir is not None:  # byte-identical copy of the trained weights
        (root / "vae").mkdir()
        for name in ("config.json", _DIFFUSERS_WEIGHTS):
            shutil.copyfile(models.vae_asset_dir / name, root / "vae" / name)
    else:
        models.vae.save_pretrained(root / "vae")
    (root / "model_index.json").unlink(missing_ok=True)
    if models.t2i_asset_dir is not None:  # byte-identical copy of the trained T2I and its scheduler
        for name in ("unet", "scheduler"):
            shutil.copytree(models.t2i_asset_dir / name, root / name)
        # with a trained UNet the folder is a Stable Diffusion pipeline (StableDiffusionPipeline.from_pretrained)
        (root / "model_index.json").write_text(json.dumps(SD_MODEL_INDEX, indent=2) + "\n", encoding="utf-8")
    else:
        models.unet.save_pretrained(root / "unet")
    models.text_encoder.save_pretrained(root / "text_encoder")
    models.t5.save_pretrained(root / "t5")
    models.t5_tokenizer.save_pretrained(root / "t5")
    models.clip.save_pretrained(root / "clip")
    models.clip_image_processor.save_pretrained(root / "clip")
    vocab, merges = build_clip_bpe()
    for folder in ("tokenizer", "clip"):
        models.tokenizer.save_pretrained(root / folder)
        write_bpe_files(root / folder, vocab, merges)
    if i2v is not None and models.vae_asset_dir is None:
        i2v = None  # trained on the trained VAE's latents: meaningless with a random one
    if i2v is not None:
        _install_i2v(i2v, root)

    vae_source = "random init (untrained)" if models.vae_asset_dir is None else "trained (fdreamer train-tiny-vae)"
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "description": "Tiny randomly initialised stand-ins for SD1.5 / T5-XXL / CLIP ViT-L/14 "
        "(fdreamer make-tiny-models); same seed -> identical weights.",
        "seed": seed,
        "seeds": models.seeds,
        "vae_trained": models.vae_asset_dir is not None,
        "unet_trained": models.t2i_asset_dir is not None,
        "i2v_trained": i2v is not None,
        "components": {
            "vae": f"diffusers AutoencoderKL, downsample x4, 4 latent channels; {vae_source}",
            "unet": "diffusers UNet2DConditionModel, SD layout, cross-attention at 8x8 only; "
            + ("trained text-to-image (training/configs/tiny_t2i.yaml)" if models.t2i_asset_dir else "random init"),
            "text_encoder": "transformers CLIPTextModel (SD text encoder slot), hidden 32",
            **({"i2v": "trained image-to-video checkpoint (training/configs/tiny_i2v.yaml), EMA weights"}
               if i2v is not None else {}),
            "tokenizer": f"CLIPTokenizer, byte-level BPE, {len(WORDS)} single-token words",
            "t5": "transformers T5EncoderModel (v1.1 style, d_model 64) + Unigram T5Tokenizer",
            "clip": f"transformers CLIPModel (text 48 / vision 64, projection {TINY_CLIP_PROJECTION_DIM}, "
            f"image {TINY_CLIP_IMAGE_SIZE}px, patch 8) + CLIPTokenizer + CLIPImageProcessor",
        },
        "parameters": models.parameter_counts(),
        "vocab_sizes": {"clip": len(models.tokenizer), "t5": len(models.t5_tokenizer)},
    }
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def _cmd_make_tiny_models(args: argparse.Namespace) -> int:
    manifest = make_tiny_models(
        args.dir, seed=args.seed, allow_untrained_vae=args.allow_untrained_vae, force=args.force
    )
    for name, count in manifest["parameters"].items():
        print(f"{name:>13}: {count:,} parameters -> {Path(args.dir) / name}")
    print(f"manifest: {Path(args.dir) / MANIFEST_NAME}")
    return 0


def register_cli(sub: Any) -> None:
    """Add ``make-tiny-models DIR [--seed N] [--force] [--allow-untrained-vae]``."""
    p = sub.add_parser(
        "make-tiny-models",
        help="write tiny random SD/T5/CLIP models in the standard folder layouts",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("dir", metavar="DIR", help="output folder (vae/, unet/, text_encoder/, tokenizer/, t5/, clip/)")
    p.add_argument("--seed", type=int, default=0, help="torch seed of the random initialisation (default 0)")
    p.add_argument("--force", action="store_true", help="rewrite even if DIR already holds complete tiny models")
    p.add_argument(
        "--allow-untrained-vae",
        action="store_true",
        help="write a random VAE if fdreamer/toy/assets/tiny_vae/ is missing instead of failing",
    )
    p.set_defaults(func=_cmd_make_tiny_models)
