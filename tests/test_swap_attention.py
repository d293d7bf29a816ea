"""``temporal.block: swap`` — VideoFactory's swapped spatiotemporal cross-attention (fdreamer.models.swap):
query alternation, window locality and padding, zero-init equivalence, trainability and freezing,
config validation, and the default factorized path left unchanged."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from einops import rearrange, repeat

from fdreamer.config import load_config
from fdreamer.models import (
    FactorizedDreamerUNet,
    ModelConfig,
    TemporalConfig,
    group_of,
    parameter_groups,
)
from fdreamer.models.attention import layer_norm_fp32
from fdreamer.models.swap import (
    SwapTransformer,
    WindowCrossAttention,
    query_branch,
    window_position_encoding,
)
from fdreamer.models.temporal import TemporalTransformer
from fdreamer.toy.tiny_models import TINY_UNET_CONFIG

B, T, HW, L5 = 2, 3, 16, 5

# The temporal.* state_dict keys of the default tiny model, recorded before the swap block existed
# (168 keys). Update only for a deliberate change of the factorized temporal layers.
FACTORIZED_TEMPORAL_KEYS_SHA256 = "fc4e4fbdacc64f4258d97a14ec3148bf1637c7497259d09369ac107fd94b9d84"
FACTORIZED_TEMPORAL_KEYS = 168


def _cfg(block: str = "swap", window: int = 4, **changes: object) -> ModelConfig:
    return ModelConfig.tiny(temporal=TemporalConfig(block=block, window=window), **changes)


def _build(cfg: ModelConfig) -> FactorizedDreamerUNet:
    return FactorizedDreamerUNet.from_preset("tiny", cfg, seed=0)


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L5, dtype=torch.bool)
    mask[0, 3:] = False
    return {
        "sample": torch.randn(B, 4, T, HW, HW, generator=g), "timestep": torch.tensor([3, 700]),
        "text_tokens": torch.randn(B, 77, 32, generator=g), "image_embed": torch.randn(B, 32, generator=g),
        "first_frame": torch.randn(B, 4, HW, HW, generator=g), "t5_tokens": torch.randn(B, L5, 64, generator=g),
        "t5_mask": mask,
    }


def _swap_blocks(model: torch.nn.Module) -> list[tuple[str, SwapTransformer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SwapTransformer)]


@pytest.fixture(scope="module")
def swap_model() -> FactorizedDreamerUNet:
    return _build(_cfg()).eval()


# ------------------------------------------------------------------ 1. alternation of the query branch


def test_query_alternates_between_spatial_and_temporal_in_walk_order(swap_model: FactorizedDreamerUNet) -> None:
    blocks = [(n, m) for n, m in _swap_blocks(swap_model) if n.startswith("temporal.")]
    # tiny UNet: down[1] (1 transformer), mid (1), up[0] (2) -> 4 swap blocks, numbered in walk order
    assert [n for n, _ in blocks] == [
        "temporal.down.1.attn.0", "temporal.mid.attn.0", "temporal.up.0.attn.0", "temporal.up.0.attn.1"
    ]
    assert [m.index for _, m in blocks] == [0, 1, 2, 3]
    assert not any(isinstance(m, TemporalTransformer) for m in swap_model.modules())
    calls: list[int] = []
    seen: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for _, m in blocks:
        rec = seen.setdefault(m.index, {})

        def on_spatial(_mod, _inp, out, rec=rec):  # proj_in output = the spatial branch
            rec["spatial"] = out.detach().clone()

        def on_temporal(_mod, _inp, out, rec=rec):  # FrameSelfAttention output = the temporal branch
            rec["temporal"] = out.detach().clone()

        def on_swap(_mod, args, rec=rec, index=m.index):  # what actually fed the window cross-attention
            calls.append(index)
            rec["q"], rec["kv"] = args[0].detach().clone(), args[1].detach().clone()

        handles += [m.proj_in.register_forward_hook(on_spatial),
                    m.temporal_branch.register_forward_hook(on_temporal),
                    m.swap_attn.register_forward_pre_hook(on_swap)]
    try:
        with torch.no_grad():
            swap_model(**_inputs())
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1, 2, 3]  # each block ran once, in the order of its global index
    for k, rec in seen.items():
        assert not torch.allclose(rec["spatial"], rec["temporal"])  # the branches are distinguishable
        q_from, kv_from = ("spatial", "temporal") if k % 2 == 0 else ("temporal", "spatial")
        assert blocks[k][1].query_branch == q_from == query_branch(k)
        assert torch.equal(rec["q"], rec[q_from]), f"block {k}: query not from the {q_from} branch"
        assert torch.equal(rec["kv"], rec[kv_from]), f"block {k}: keys/values not from the {kv_from} branch"


def test_predictnet_copy_keeps_the_up_path_indices() -> None:
    model = _build(_cfg(predictnet=True))
    idx = {n: m.index for n, m in _swap_blocks(model)}
    assert idx["predictnet.temporal_up.0.attn.0"] == idx["temporal.up.0.attn.0"] == 2
    assert idx["predictnet.temporal_up.0.attn.1"] == idx["temporal.up.0.attn.1"] == 3


# ------------------------------------------------------------------ 2. windows


def _window_attention(window: int = 4) -> WindowCrossAttention:
    torch.manual_seed(1)
    return WindowCrossAttention(channels=16, heads=2, window=window).eval()


def test_window_attention_is_local_to_each_3d_window() -> None:
    attn = _window_attention(4)
    g = torch.Generator().manual_seed(0)
    q, kv = torch.randn(2, 3, 8, 12, 16, generator=g), torch.randn(2, 3, 8, 12, 16, generator=g)
    with torch.no_grad():
        ref = attn(q, kv)
        for which in ("q", "kv"):
            q2, kv2 = q.clone(), kv.clone()
            target = q2 if which == "q" else kv2
            target[1, :, 4:8, 8:12] += torch.randn(3, 4, 4, 16, generator=g)  # window (1, 2) of sample 1
            out = attn(q2, kv2)
            inside = torch.zeros_like(out, dtype=torch.bool)
            inside[1, :, 4:8, 8:12] = True
            diff = (out - ref).abs()
            assert diff[inside].amax() > 1e-3, which  # the window reacts (all its frames)
            assert diff[1, :, 4:8, 8:12].amax(dim=(1, 2, 3)).min() > 1e-4  # every frame of the window
            assert diff[~inside].amax() < 1e-6, f"{which}: attention leaked across windows"


def test_window_attention_mixes_frames_and_pixels_of_a_window() -> None:
    attn = _window_attention(4)
    g = torch.Generator().manual_seed(2)
    q, kv = torch.randn(1, 3, 4, 4, 16, generator=g), torch.randn(1, 3, 4, 4, 16, generator=g)
    kv2 = kv.clone()
    kv2[0, 2, 3, 3] += torch.randn(16, generator=g)  # one key: last frame, corner pixel (not a constant: LayerNorm)
    with torch.no_grad():
        diff = (attn(q, kv2) - attn(q, kv)).abs()
    assert (diff.amax(dim=-1) > 1e-5).all()  # every query of the window (other frames, other pixels) sees it


def _one_window_reference(attn: WindowCrossAttention, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """Attention among the tokens of one (possibly cropped) window ``[b, f, hw, ww, c]``, no padding."""
    b, f, hh, ww, c = q.shape
    pe = window_position_encoding(f, attn.window, c, q.device, q.dtype)[:, :hh, :ww]  # top-left of a window
    qs = rearrange(layer_norm_fp32(q, attn.norm_q) + pe, "b f h w c -> b (f h w) c")
    ks = rearrange(layer_norm_fp32(kv, attn.norm_kv) + pe, "b f h w c -> b (f h w) c")
    return rearrange(attn.attn(qs, ks), "b (f h w) c -> b f h w c", f=f, h=hh, w=ww)


def test_window_padding_equals_smaller_edge_windows() -> None:
    """h, w not multiples of the window: zero padding + masked padded keys = cropped edge windows."""
    attn = _window_attention(4)
    g = torch.Generator().manual_seed(3)
    q, kv = torch.randn(2, 2, 7, 10, 16, generator=g), torch.randn(2, 2, 7, 10, 16, generator=g)
    with torch.no_grad():
        out = attn(q, kv)
        assert out.shape == q.shape
        for rows, cols in ((slice(0, 4), slice(0, 4)), (slice(4, 7), slice(8, 10)), (slice(0, 4), slice(8, 10))):
            ref = _one_window_reference(attn, q[:, :, rows, cols], kv[:, :, rows, cols])
            assert torch.allclose(out[:, :, rows, cols], ref, atol=1e-5, rtol=0), (rows, cols)
        kv2 = kv.clone()
        kv2[:, :, 4:7, 8:10] += torch.randn(1, 2, 3, 2, 16, generator=g)  # the 3x2 corner window
        diff = (attn(q, kv2) - out).abs()
    assert diff[:, :, 4:7, 8:10].amax() > 1e-3
    diff[:, :, 4:7, 8:10] = 0
    assert diff.amax() < 1e-6


# ------------------------------------------------------------------ 3. zero init


def _image_unet() -> UNet2DConditionModel:
    with torch.random.fork_rng(devices=[]):  # the same construction as from_preset("tiny", seed=0)
        torch.manual_seed(0)
        return UNet2DConditionModel(**TINY_UNET_CONFIG).eval()


def _frame_by_frame(unet: UNet2DConditionModel, d: dict[str, torch.Tensor]) -> torch.Tensor:
    out = unet(
        rearrange(d["sample"], "b c f h w -> (b f) c h w"), repeat(d["timestep"], "b -> (b f)", f=T),
        repeat(d["text_tokens"], "b l d -> (b f) l d", f=T),
    ).sample
    return rearrange(out, "(b f) c h w -> b c f h w", f=T)


@pytest.mark.parametrize("window", [4, 3], ids=["window4", "window3-padded"])
def test_fresh_swap_model_equals_image_model_and_fresh_factorized(window: int) -> None:
    image, video = _image_unet(), _build(_cfg(window=window)).eval()
    factorized = _build(_cfg("factorized")).eval()
    spatial = {k.removeprefix("unet."): v for k, v in video.state_dict().items()
               if k.startswith("unet.") and ".processor." not in k}
    assert all(torch.equal(spatial[k], v) for k, v in image.state_dict().items())
    d = _inputs()
    with torch.no_grad():
        out, ref, fac = video(**d).sample, _frame_by_frame(image, d), factorized(**d).sample
    assert out.shape == (B, 4, T, HW, HW)
    assert (out - ref).abs().max().item() < 1e-5
    assert (out - fac).abs().max().item() < 1e-5


# ------------------------------------------------------------------ 4. trainable, frozen with [temporal]


def test_swap_block_trains_and_freezes_with_temporal_group() -> None:
    model = _build(_cfg()).train()
    d = _inputs()
    target = torch.randn(B, 4, T, HW, HW, generator=torch.Generator().manual_seed(9))
    swap_params = {f"{n}.{p}": w for n, m in _swap_blocks(model) for p, w in m.named_parameters()}
    assert swap_params and {group_of(n) for n in swap_params} == {"temporal"}
    temporal_ids = {id(p) for _, p in parameter_groups(model)["temporal"]}
    assert all(id(p) in temporal_ids for p in swap_params.values())
    with torch.no_grad():
        before = model(**d).sample
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(**d).sample, target).backward()
        grads = {n: p.grad for n, p in swap_params.items()}
        assert all(g is not None for g in grads.values()), step
        assert grads["temporal.mid.attn.0.proj_out.weight"].abs().max() > 0  # zero-init output learns first
        if step == 1:  # once proj_out is non-zero, the swapped window attention itself gets gradients
            assert grads["temporal.mid.attn.0.swap_attn.attn.to_q.weight"].abs().max() > 0
            assert grads["temporal.up.0.attn.1.temporal_branch.attn.to_v.weight"].abs().max() > 0
        opt.step()
    with torch.no_grad():
        after = model(**d).sample
    assert (after - before).abs().max() > 1e-5

    frozen = _build(_cfg(freeze=["temporal"]))
    blocks = _swap_blocks(frozen)
    assert blocks and not any(p.requires_grad for _, m in blocks for p in m.parameters())
    assert all(p.requires_grad for n, p in frozen.named_parameters() if n.startswith("unet."))


# ------------------------------------------------------------------ 5. config validation


def test_config_validation_and_loading() -> None:
    with pytest.raises(ValueError, match=r"temporal\.block must be 'factorized' or 'swap', got 'swapped'"):
        TemporalConfig(block="swapped")  # type: ignore[arg-type]
    for bad in (0, -2):
        with pytest.raises(ValueError, match=rf"temporal\.window must be an integer >= 1, got {bad}"):
            TemporalConfig(block="swap", window=bad)
    with pytest.raises(ValueError, match="window must be >= 1"):
        WindowCrossAttention(16, 2, window=0)
    cfg = load_config(ModelConfig, overrides=["--temporal.block=swap", "--temporal.window=2"])
    assert (cfg.temporal.block, cfg.temporal.window) == ("swap", 2)
    with pytest.raises(ValueError, match="block"):
        load_config(ModelConfig, overrides=["--temporal.block=joint"])
    assert TemporalConfig().block == "factorized" and TemporalConfig().window == 4


def test_shape_errors() -> None:
    attn = _window_attention(2)
    with pytest.raises(ValueError, match=r"query must be \[b, f, h, w, 16\], got \(1, 2, 4, 4, 8\)"):
        attn(torch.randn(1, 2, 4, 4, 8), torch.randn(1, 2, 4, 4, 8))
    with pytest.raises(ValueError, match=r"kv shape \(1, 3, 4, 4, 16\) != query shape \(1, 2, 4, 4, 16\)"):
        attn(torch.randn(1, 2, 4, 4, 16), torch.randn(1, 3, 4, 4, 16))
    block = SwapTransformer(16, 2, context_dim=8, groups=4, index=0, window=2)
    with pytest.raises(ValueError, match=r"expected \[\(b f\), c, h, w\] with f=4, got \(6, 16, 4, 4\)"):
        block(torch.randn(6, 16, 4, 4), 4, torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match=r"temporal context must be \[2, L, 8\], got \(2, 3, 4\)"):
        block(torch.randn(6, 16, 4, 4), 3, torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="index must be >= 0"):
        query_branch(-1)


# ------------------------------------------------------------------ 6. default path unchanged


def test_default_factorized_path_unchanged() -> None:
    default, explicit = _build(ModelConfig.tiny()).eval(), _build(_cfg("factorized", window=7)).eval()
    keys = list(default.state_dict())
    assert keys == list(explicit.state_dict())
    assert not any(s in k for k in keys for s in ("swap_attn", "temporal_branch"))
    assert not _swap_blocks(default)
    temporal = sorted(k for k in keys if k.startswith("temporal."))
    assert len(temporal) == FACTORIZED_TEMPORAL_KEYS
    assert hashlib.sha256("\n".join(temporal).encode()).hexdigest() == FACTORIZED_TEMPORAL_KEYS_SHA256
    assert all(torch.equal(v, explicit.state_dict()[k]) for k, v in default.state_dict().items())
    # the swap model differs only in the layers after the spatial transformers (temporal.*.attn.*)
    after_transformer = re.compile(r"^temporal\.(down\.\d+|mid|up\.\d+)\.attn\.")
    swap_keys = list(_build(_cfg()).state_dict())
    def shared(ks: list[str]) -> list[str]:
        return [k for k in ks if not after_transformer.match(k)]

    assert shared(keys) == shared(swap_keys)
    only_swap, only_factorized = set(swap_keys) - set(keys), set(keys) - set(swap_keys)
    assert only_swap and all(".swap_attn." in k or ".temporal_branch." in k for k in only_swap)
    assert only_factorized and all(".self_attn." in k or ".norm1." in k for k in only_factorized)
