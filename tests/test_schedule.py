"""Paper §3.3 noise schedule: Eq. 5 (shift), Eq. 6 (zero-terminal-SNR rescale), Eq. 7 targets."""

import math

import pytest
import torch
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from fdreamer.schedule import (
    NoiseSchedule,
    ScheduleConfig,
    figure5_curves,
    plot_figure5,
    sd_scaled_linear_betas,
    shift_factor,
)


def test_sd_betas_endpoints_and_alpha_bar():
    betas = sd_scaled_linear_betas()
    assert betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    # SD1.x's well-known terminal alpha-bar (~0.0047) with no shift/rescale
    ab = NoiseSchedule(ScheduleConfig(shift=False, rescale=False)).alphas_cumprod
    assert ab[-1].item() == pytest.approx(0.004660, abs=2e-5)
    assert torch.allclose(ab, torch.cumprod(1 - betas, 0))


@pytest.mark.parametrize(
    "t,h,w,expected",
    [(16, 512, 512, 0.125), (32, 256, 256, math.sqrt(1 / 32)), (1, 256, 256, 1.0)],
)
def test_eq5_shift_factor_values(t, h, w, expected):
    """Eq. 5: s = sqrt(D*D / (T*H*W)), D = 256."""
    assert shift_factor(t, h, w) == pytest.approx(expected, rel=1e-12)
    assert ScheduleConfig(num_frames=t, height=h, width=w).s == pytest.approx(expected, rel=1e-12)


def test_shift_scale_override_and_off():
    assert ScheduleConfig(shift_scale=0.3).s == 0.3
    assert ScheduleConfig(shift=False, shift_scale=0.3).s == 1.0


@pytest.mark.parametrize("s", [0.125, math.sqrt(1 / 32), 0.5])
def test_eq5_log_snr_moves_by_exactly_two_ln_s(s):
    base = NoiseSchedule(ScheduleConfig(shift=False, rescale=False)).log_snr
    shifted = NoiseSchedule(ScheduleConfig(shift_scale=s, rescale=False)).log_snr
    assert torch.allclose(shifted - base, torch.full_like(base, 2 * math.log(s)), atol=1e-9)
    # SNR' = s^2 SNR in linear terms too
    snr = NoiseSchedule(ScheduleConfig(shift=False, rescale=False)).snr
    snr2 = NoiseSchedule(ScheduleConfig(shift_scale=s, rescale=False)).snr
    assert torch.allclose(snr2, s * s * snr, rtol=1e-9)


@pytest.mark.parametrize("shift", [False, True])
def test_eq6_zero_terminal_and_strictly_decreasing(shift):
    sched = NoiseSchedule(ScheduleConfig(shift=shift, rescale=True))
    ab = sched.alphas_cumprod
    assert ab[-1].item() == 0.0
    assert ab[-2].item() > 0.0  # sqrt(alpha'_{N-1}) != 0, as the paper notes
    assert bool((ab[1:] < ab[:-1]).all()), "alpha-bar must be strictly decreasing"
    assert sched.log_snr[-1].item() == -math.inf
    assert sched.betas[-1].item() == pytest.approx(1.0)


def test_eq6_keeps_first_value_lin_algorithm1_not_printed_formula():
    """Lin et al. Alg. 1 keeps ᾱ'_1 = ᾱ_1; the paper's printed Eq. 6 would give ᾱ'_1 = 1."""
    for shift in (False, True):
        before = NoiseSchedule(ScheduleConfig(shift=shift, rescale=False)).alphas_cumprod
        after = NoiseSchedule(ScheduleConfig(shift=shift, rescale=True)).alphas_cumprod
        assert after[0].item() == pytest.approx(before[0].item(), rel=1e-12)
        assert after[0].item() < 1.0
    # and the rescale is linear in sqrt(ᾱ): sqrt(ᾱ') = a*sqrt(ᾱ) + b
    sa = before.sqrt()
    sb = after.sqrt()
    a = (sb[0] - sb[-1]) / (sa[0] - sa[-1])
    assert torch.allclose(sb, a * (sa - sa[-1]), atol=1e-12)


def test_eq6_without_shift_matches_diffusers_within_1e6():
    ours = NoiseSchedule(ScheduleConfig(shift=False, rescale=True)).alphas_cumprod
    ref_betas = diffusers_rescale(sd_scaled_linear_betas().float())
    ref = torch.cumprod(1 - ref_betas.double(), 0)
    assert (ours - ref).abs().max().item() < 1e-6


def test_table4_switches_are_independent():
    a = NoiseSchedule(ScheduleConfig(shift=False, rescale=False)).alphas_cumprod
    a_star = NoiseSchedule(ScheduleConfig(shift=True, rescale=False)).alphas_cumprod
    e = NoiseSchedule(ScheduleConfig(shift=True, rescale=True)).alphas_cumprod
    rescale_only = NoiseSchedule(ScheduleConfig(shift=False, rescale=True)).alphas_cumprod
    assert len({tuple(x.tolist()) for x in (a, a_star, e, rescale_only)}) == 4
    assert a[-1] > 0 and a_star[-1] > 0 and e[-1] == 0 and rescale_only[-1] == 0
    # shifting leaves far less terminal signal (why row a* barely differs from e)
    assert a_star[-1] < a[-1] / 50


def test_fig5_ordering_shifted_below_original_everywhere():
    curves = list(figure5_curves(0.125).values())
    original, shifted, rescaled = curves
    assert bool((shifted < original).all())
    assert bool((rescaled[:-1] <= shifted[:-1] + 1e-9).all())
    assert rescaled[-1] == -math.inf


def test_fig5_plot_writes_png(tmp_path):
    out = plot_figure5(tmp_path / "fig5.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5000


def test_forward_process_and_targets_numbers():
    sched = NoiseSchedule(ScheduleConfig(prediction_type="v_prediction"))
    x0 = torch.randn(3, 4, 2, 5, 5)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 500, 999])
    xt = sched.add_noise(x0, eps, t)
    ab = sched.alphas_cumprod[t].float()
    manual = ab.sqrt().view(3, 1, 1, 1, 1) * x0 + (1 - ab).sqrt().view(3, 1, 1, 1, 1) * eps
    assert torch.allclose(xt, manual, atol=1e-6)
    assert torch.allclose(xt[2], eps[2])  # t = N is pure noise under zero terminal SNR
    v = sched.training_target(x0, eps, t)
    assert torch.allclose(sched.predict_x0(xt, v, t), x0, atol=1e-5)
    eps_sched = NoiseSchedule(ScheduleConfig(prediction_type="epsilon"))
    assert torch.equal(eps_sched.training_target(x0, eps, t), eps)  # Eq. 7 target
    assert torch.allclose(eps_sched.predict_x0(xt[:2], eps[:2], t[:2]), x0[:2], atol=1e-4)
    with pytest.raises(ValueError, match="timesteps must be in"):
        sched.add_noise(x0, eps, torch.tensor([0, 1, 1000]))


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusers_scheduler_uses_our_schedule_and_stays_finite(sampler, prediction_type):
    sched = NoiseSchedule(ScheduleConfig(prediction_type=prediction_type))
    scheduler = sched.make_scheduler(sampler)
    assert scheduler.config.prediction_type == prediction_type
    assert scheduler.config.timestep_spacing == "trailing"
    ours = sched.alphas_cumprod
    theirs = scheduler.alphas_cumprod.double()
    assert (theirs[:-1] - ours[:-1]).abs().max().item() < 1e-6
    clamped = sampler == "euler" or prediction_type == "epsilon"
    assert theirs[-1].item() == pytest.approx(2**-24 if clamped else 0.0, abs=1e-9)

    scheduler.set_timesteps(10)
    assert int(scheduler.timesteps[0]) == 999  # trailing spacing starts at t = N
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 2, 8, 8, generator=gen) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        # an oracle for data x0 = 0: then x_t = sigma*eps, so eps = x_t/sigma and v = a*eps
        a, sigma = sched._coefs(torch.tensor([int(t)]), inp)
        eps = inp / torch.clamp(sigma, min=1e-6)
        out = eps if prediction_type == "epsilon" else a * eps
        x = scheduler.step(out, t, x).prev_sample
        assert torch.isfinite(x).all(), f"non-finite sample at t={int(t)}"
    assert x.abs().max().item() < 1.0  # it converged towards x0 = 0


def test_config_validation_messages():
    with pytest.raises(ValueError, match="beta_start < beta_end"):
        ScheduleConfig(beta_start=0.02, beta_end=0.01)
    with pytest.raises(ValueError, match="shift_scale"):
        ScheduleConfig(shift_scale=0.0)
    with pytest.raises(ValueError, match="unknown sampler"):
        NoiseSchedule().make_scheduler("heun")
