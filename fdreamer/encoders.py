"""The frozen encoders of Factorized-Dreamer: SD VAE, SD CLIP text encoder, T5, full CLIP.

Every model loads from a local folder in its standard Hugging Face layout (``local_files_only``;
nothing is ever downloaded), in eval mode with gradients off, and only when first used, so a
pipeline stage that needs T5 alone never loads the VAE. Outputs are computed under
``torch.no_grad`` (not ``inference_mode``: the results may feed a trainable model).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Component name -> the EncoderConfig fields it needs.
COMPONENTS: dict[str, tuple[str, ...]] = {
    "vae": ("vae",),
    "clip_text": ("text_encoder", "tokenizer"),
    "t5": ("t5",),
    "clip": ("clip",),
}
# Per config field: groups of files a folder must hold (any one file of a group will do).
_REQUIRED_FILES: dict[str, tuple[tuple[str, ...], ...]] = {
    "vae": (("config.json",),),
    "text_encoder": (("config.json",),),
    "tokenizer": (("tokenizer.json", "vocab.json"),),
    "t5": (("config.json",), ("tokenizer.json", "spiece.model")),
    "clip": (("config.json",), ("preprocessor_config.json",), ("tokenizer.json", "vocab.json")),
}
ImageArray = np.ndarray | torch.Tensor


@dataclass
class EncoderConfig:
    """Where the frozen encoders live locally, and how to run them."""

    vae: str | None = field(default=None, metadata={"help": "folder of a diffusers AutoencoderKL (SD `vae/`)"})
    text_encoder: str | None = field(
        default=None, metadata={"help": "folder of SD's transformers CLIPTextModel (SD `text_encoder/`)"}
    )
    tokenizer: str | None = field(default=None, metadata={"help": "folder of SD's CLIPTokenizer (SD `tokenizer/`)"})
    t5: str | None = field(
        default=None, metadata={"help": "folder of a transformers T5EncoderModel with its tokenizer files"}
    )
    clip: str | None = field(
        default=None,
        metadata={"help": "folder of a full transformers CLIPModel + CLIPTokenizer + CLIPImageProcessor"},
    )
    dtype: str = field(default="float32", metadata={"help": "weights/compute dtype: float32, float16 or bfloat16"})
    device: str = field(default="cpu", metadata={"help": "torch device for all encoders, e.g. cpu, cuda, cuda:1"})
    vae_scaling_factor: float | None = field(
        default=None,
        metadata={"help": "latent scale applied after encoding; null reads the VAE config's scaling_factor "
                  "(0.18215 for SD1.x VAEs, 1/std of the training latents for the tiny one)"},
    )
    t5_max_length: int = field(default=120, metadata={"help": "T5 captions are truncated to this many tokens"})
    clip_max_length: int = field(default=77, metadata={"help": "CLIP token sequence length (SD pads to 77)"})

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"EncoderConfig.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        try:
            torch.device(self.device)
        except RuntimeError as err:
            raise ValueError(f"EncoderConfig.device {self.device!r} is not a torch device: {err}") from err
        if self.vae_scaling_factor is not None and not self.vae_scaling_factor > 0:
            raise ValueError(f"EncoderConfig.vae_scaling_factor must be > 0, got {self.vae_scaling_factor}")
        for name in ("t5_max_length", "clip_max_length"):
            if getattr(self, name) < 2:
                raise ValueError(f"EncoderConfig.{name} must be >= 2, got {getattr(self, name)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a torch dtype."""
        return DTYPES[self.dtype]

    @classmethod
    def tiny(cls, root: str | Path, **overrides: Any) -> EncoderConfig:
        """The folders written by ``fdreamer make-tiny-models ROOT``."""
        r = Path(root)
        paths = {name: str(r / name) for name in ("vae", "text_encoder", "tokenizer", "t5", "clip")}
        return cls(**{**paths, **overrides})

    @classmethod
    def sd15(
        cls, sd_root: str | Path, t5_root: str | Path, clip_root: str | Path, **overrides: Any
    ) -> EncoderConfig:
        """The real models, from local copies (this never downloads anything).

        - ``sd_root``: a diffusers Stable Diffusion 1.5 folder (e.g. a local snapshot of
          ``stable-diffusion-v1-5/stable-diffusion-v1-5``) holding ``vae/``, ``text_encoder/`` and
          ``tokenizer/``.
        - ``t5_root``: a local snapshot of ``google/t5-v1_1-xxl`` (``config.json``, weights and
          ``spiece.model``/``tokenizer.json`` in one folder).
        - ``clip_root``: a local snapshot of ``openai/clip-vit-large-patch14`` (``config.json``,
          weights, tokenizer files and ``preprocessor_config.json``).
        """
        sd = Path(sd_root)
        return cls(
            **{
                "vae": str(sd / "vae"),
                "text_encoder": str(sd / "text_encoder"),
                "tokenizer": str(sd / "tokenizer"),
                "t5": str(Path(t5_root)),
                "clip": str(Path(clip_root)),
                "vae_scaling_factor": 0.18215,
                **overrides,
            }
        )


def _check_folder(component: str, field_name: str, value: str | None) -> Path:
    """The folder of ``EncoderConfig.<field_name>``, checked to exist and hold its config files."""
    if value is None:
        raise ValueError(f"EncoderConfig.{field_name} is not set; component {component!r} needs it")
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"{component}: folder {path} (EncoderConfig.{field_name}) does not exist")
    for group in _REQUIRED_FILES[field_name]:
        if not any((path / name).is_file() for name in group):
            raise FileNotFoundError(
                f"{component}: {path} (EncoderConfig.{field_name}) has no {' or '.join(group)}"
            )
    return path


def _as_uint8(data: ImageArray, ndim: int, what: str, layout: str) -> torch.Tensor:
    """``data`` as a CPU uint8 tensor of rank ``ndim`` with 3 channels last."""
    if isinstance(data, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(data))
    elif isinstance(data, torch.Tensor):
        tensor = data.detach().cpu()
    else:
        raise TypeError(f"{what} must be a numpy array or torch tensor, got {type(data).__name__}")
    if tensor.dtype != torch.uint8:
        raise TypeError(f"{what} must be uint8 {layout}, got dtype {tensor.dtype}")
    if tensor.ndim != ndim or tensor.shape[-1] != 3:
        raise ValueError(f"{what} must have shape {layout}, got {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        raise ValueError(f"{what} is empty: shape {tuple(tensor.shape)}")
    return tensor


def _text_list(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single str (wrap it in a list)")
    out = list(texts)
    if not out:
        raise ValueError("texts is empty")
    bad = [type(t).__name__ for t in out if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must all be str, found {bad[0]}")
    return out


def _pooled(output: Any, what: str) -> torch.Tensor:
    """The projected embedding from ``get_*_features``: a tensor (transformers 4) or ``pooler_output`` (5)."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if not isinstance(pooled, torch.Tensor):
        raise TypeError(f"{what} returned {type(output).__name__} without a pooler_output tensor")
    return pooled


def _freeze(model: Any, device: torch.device) -> Any:
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def vae_downsample_factor(vae_dir: str | Path) -> int:
    """Pixels per latent along each side of the VAE saved in ``vae_dir`` (8 for SD's, 4 for the tiny one),
    read from its ``config.json`` alone: no diffusers import, no weights. FileNotFoundError without it."""
    import json

    config = json.loads((Path(vae_dir) / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)


def load_vae(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Any:
    """A frozen diffusers AutoencoderKL from a local folder (``config.json`` + weights), never downloading."""
    from diffusers import AutoencoderKL

    folder = _check_folder("vae", "vae", str(path))
    vae = AutoencoderKL.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return _freeze(vae, torch.device(device))


class FrozenEncoders:
    """Lazily loaded frozen VAE / CLIP text / T5 / CLIP encoders, configured by :class:`EncoderConfig`.

    Components (see :data:`COMPONENTS`): ``vae``, ``clip_text`` (SD text encoder + tokenizer),
    ``t5`` (encoder + tokenizer) and ``clip`` (model + tokenizer + image processor). Each loads on
    first access of one of its attributes, or eagerly through :meth:`load`.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dtype = cfg.torch_dtype
        self._parts: dict[str, Any] = {}
        self._loaded: set[str] = set()

    @classmethod
    def load(cls, cfg: EncoderConfig, components: Iterable[str] | None = None) -> FrozenEncoders:
        """Load ``components`` now (default: every component whose folders are set in ``cfg``).

        All requested folders are checked before any model loads; a missing folder or config file
        raises :class:`FileNotFoundError` naming the component and the path.
        """
        enc = cls(cfg)
        if components is None:
            names = [c for c, fields in COMPONENTS.items() if all(getattr(cfg, f) is not None for f in fields)]
        else:
            names = list(components)
            unknown = [c for c in names if c not in COMPONENTS]
            if unknown:
                raise ValueError(f"unknown encoder component(s) {unknown}; choose from {list(COMPONENTS)}")
        for name in names:
            for field_name in COMPONENTS[name]:
                _check_folder(name, field_name, getattr(cfg, field_name))
        for name in names:
            enc._ensure(name)
        return enc

    @property
    def loaded_components(self) -> frozenset[str]:
        """Names of the components loaded so far."""
        return frozenset(self._loaded)

    def unload(self, *components: str) -> None:
        """Drop loaded components (all if none named) so their memory can be freed."""
        for name in components or tuple(self._loaded):
            if name not in COMPONENTS:
                raise ValueError(f"unknown encoder component {name!r}; choose from {list(COMPONENTS)}")
            self._loaded.discard(name)
            for key in [k for k in self._parts if k.split(".")[0] == name]:
                del self._parts[key]

    def _ensure(self, name: str) -> None:
        if name in self._loaded:
            return
        folders = {f: _check_folder(name, f, getattr(self.cfg, f)) for f in COMPONENTS[name]}
        kw: dict[str, Any] = {"local_files_only": True}
        if name == "vae":
            self._parts["vae.model"] = load_vae(folders["vae"], dtype=self.dtype, device=self.device)
        elif name == "clip_text":
            from transformers import CLIPTextModel, CLIPTokenizer

            model = CLIPTextModel.from_pretrained(folders["text_encoder"], dtype=self.dtype, **kw)
            self._parts["clip_text.model"] = _freeze(model, self.device)
            self._parts["clip_text.tokenizer"] = CLIPTokenizer.from_pretrained(folders["tokenizer"], **kw)
        elif name == "t5":
            from transformers import T5EncoderModel, T5Tokenizer

            model = T5EncoderModel.from_pretrained(folders["t5"], dtype=self.dtype, **kw)
            self._parts["t5.model"] = _freeze(model, self.device)
            self._parts["t5.tokenizer"] = T5Tokenizer.from_pretrained(folders["t5"], **kw)
        else:
            from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

            model = CLIPModel.from_pretrained(folders["clip"], dtype=self.dtype, **kw)
            self._parts["clip.model"] = _freeze(model, self.device)
            self._parts["clip.tokenizer"] = CLIPTokenizer.from_pretrained(folders["clip"], **kw)
            self._parts["clip.image_processor"] = AutoImageProcessor.from_pretrained(folders["clip"], **kw)
        self._loaded.add(name)

    def _get(self, key: str) -> Any:
        self._ensure(key.split(".")[0])
        return self._parts[key]

    # Lazily loaded models and preprocessors.
    vae = property(lambda self: self._get("vae.model"), doc="diffusers AutoencoderKL")
    text_encoder = property(lambda self: self._get("clip_text.model"), doc="SD's CLIPTextModel")
    tokenizer = property(lambda self: self._get("clip_text.tokenizer"), doc="SD's CLIPTokenizer")
    t5 = property(lambda self: self._get("t5.model"), doc="T5EncoderModel")
    t5_tokenizer = property(lambda self: self._get("t5.tokenizer"), doc="T5 tokenizer")
    clip = property(lambda self: self._get("clip.model"), doc="full CLIPModel")
    clip_tokenizer = property(lambda self: self._get("clip.tokenizer"), doc="full CLIP's tokenizer")
    clip_image_processor = property(lambda self: self._get("clip.image_processor"), doc="CLIP image processor")

    @property
    def vae_scaling_factor(self) -> float:
        """The configured latent scale, else the VAE config's ``scaling_factor``."""
        if self.cfg.vae_scaling_factor is not None:
            return self.cfg.vae_scaling_factor
        return float(self.vae.config.scaling_factor)

    @property
    def vae_downsample_factor(self) -> int:
        """Pixels per latent along each side (8 for SD's VAE, 4 for the tiny one)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ----------------------------------------------------------------------------------------- VAE
    @torch.no_grad()
    def encode_video(
        self,
        frames: ImageArray,
        *,
        chunk_size: int = 16,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """uint8 frames ``[B,T,H,W,3]`` -> scaled latents ``[B,C,T,H/f,W/f]`` (cfg dtype, cfg device).

        Frames go through the VAE ``chunk_size`` at a time. The latent is the posterior mean, or a
        sample of the posterior (``sample=True``, drawn with ``generator``), times the scaling factor.
        """
        video = _as_uint8(frames, 5, "frames", "[B,T,H,W,3]")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        b, t, h, w, _ = video.shape
        f = self.vae_downsample_factor
        if h % f or w % f:
            raise ValueError(f"frame size {h}x{w} is not divisible by the VAE downsample factor {f}")
        flat = rearrange(video, "b t h w c -> (b t) c h w")
        latents = []
        for chunk in flat.split(chunk_size):
            x = chunk.to(device=self.device, dtype=self.dtype) / 127.5 - 1.0
            dist = self.vae.encode(x).latent_dist
            z = dist.sample(generator=generator) if sample else dist.mean
            latents.append(z * self.vae_scaling_factor)
        return rearrange(torch.cat(latents), "(b t) c h w -> b c t h w", b=b, t=t)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, *, chunk_size: int = 16) -> torch.Tensor:
        """Scaled latents ``[B,C,T,h,w]`` -> uint8 frames ``[B,T,h*f,w*f,3]`` on the CPU."""
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
            raise ValueError(f"latents must be a [B,C,T,h,w] tensor, got {getattr(latents, 'shape', type(latents))}")
        channels = self.vae.config.latent_channels
        if latents.shape[1] != channels:
            raise ValueError(f"latents have {latents.shape[1]} channels, the VAE expects {channels} ([B,C,T,h,w])")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        b, t = latents.shape[0], latents.shape[2]
        flat = rearrange(latents, "b c t h w -> (b t) c h w")
        frames = []
        for chunk in flat.split(chunk_size):
            z = chunk.to(device=self.device, dtype=self.dtype) / self.vae_scaling_factor
            x = self.vae.decode(z).sample.float().clamp(-1.0, 1.0)
            frames.append(((x + 1.0) * 127.5).round().to(torch.uint8).cpu())
        return rearrange(torch.cat(frames), "(b t) c h w -> b t h w c", b=b, t=t)

    # ------------------------------------------------------------------------------------------ T5
    @torch.no_grad()
    def encode_t5(self, texts: Sequence[str], *, pad_to_max_length: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (hidden ``[B,L,D]``, mask ``[B,L]`` bool), truncated to ``cfg.t5_max_length``.

        ``L`` is ``cfg.t5_max_length`` when ``pad_to_max_length`` else the longest caption's length.
        Hidden states at padded positions are whatever T5 computes there; use the mask.
        """
        batch = self.t5_tokenizer(
            _text_list(texts),
            padding="max_length" if pad_to_max_length else "longest",
            max_length=self.cfg.t5_max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        hidden = self.t5(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden, mask.bool()

    def encode_t5_unpadded(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Captions -> one ``[L_i, D]`` tensor each: the real tokens only (EOS included, no padding)."""
        hidden, mask = self.encode_t5(texts, pad_to_max_length=False)
        return [hidden[i][mask[i]].clone() for i in range(hidden.shape[0])]

    # ---------------------------------------------------------------------------------------- CLIP
    @torch.no_grad()
    def encode_clip_text_tokens(self, texts: Sequence[str]) -> torch.Tensor:
        """SD conditioning: last hidden state ``[B, clip_max_length, D]`` of SD's text encoder."""
        length = self.cfg.clip_max_length
        limit = self.text_encoder.config.max_position_embeddings
        if length > limit:
            raise ValueError(f"EncoderConfig.clip_max_length {length} exceeds the text encoder's {limit} positions")
        ids = self.tokenizer(
            _text_list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )["input_ids"]
        return self.text_encoder(input_ids=ids.to(self.device)).last_hidden_state

    @torch.no_grad()
    def encode_clip_text_embeds(self, texts: Sequence[str], *, normalize: bool = False) -> torch.Tensor:
        """Projected text embeddings ``[B,P]`` of the full CLIP model (optionally L2-normalised)."""
        length = min(self.cfg.clip_max_length, self.clip.config.text_config.max_position_embeddings)
        batch = self.clip_tokenizer(
            _text_list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )
        out = self.clip.get_text_features(
            input_ids=batch["input_ids"].to(self.device), attention_mask=batch["attention_mask"].to(self.device)
        )
        emb = _pooled(out, "CLIPModel.get_text_features")
        return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb

    @torch.no_grad()
    def encode_clip_image_with_hidden(self, images: ImageArray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images ``[B,H,W,3]`` -> (projected embeddings ``[B,P]``, vision hidden ``[B,N+1,Dv]``)."""
        batch = _as_uint8(images, 4, "images", "[B,H,W,3]").numpy()
        pixels = self.clip_image_processor(
            images=list(batch), input_data_format="channels_last", return_tensors="pt"
        )["pixel_values"]
        out = self.clip.get_image_features(pixel_values=pixels.to(device=self.device, dtype=self.dtype))
        return _pooled(out, "CLIPModel.get_image_features"), out.last_hidden_state

    def encode_clip_image(self, images: ImageArray, *, normalize: bool = False) -> torch.Tensor:
        """uint8 images ``[B,H,W,3]`` -> projected CLIP image embeddings ``[B,P]``."""
        emb, _ = self.encode_clip_image_with_hidden(images)
        return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb
