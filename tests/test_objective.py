"""§3.4 objective: Eq. 7 (+ γ·L_flow of Eq. 4) under the §3.3 schedule, with numbers; timestep sampling."""

import pytest
import torch

from fdreamer.data.batching import TrainBatch
from fdreamer.models import Conditions, FactorizedDreamerUNet, ModelConfig, null_conditions
from fdreamer.schedule import NoiseSchedule, ScheduleConfig
from fdreamer.train.objective import diffusion_objective, sample_timesteps
from fdreamer.train.step import make_optimizer, optimizer_step

B, T, HW = 2, 4, 8


def _cond(g: torch.Generator) -> Conditions:
    return Conditions(
        text_tokens=torch.randn(B, 77, 32, generator=g), image_embed=torch.randn(B, 32, generator=g),
        first_frame=torch.randn(B, 4, HW, HW, generator=g), t5_tokens=torch.randn(B, 5, 64, generator=g),
        t5_mask=torch.ones(B, 5, dtype=torch.bool),
    )


class Recorder(torch.nn.Module):
    """Returns a fixed prediction and records its input, to check x_t and the target exactly."""

    def __init__(self, pred: torch.Tensor, flow: torch.Tensor | None = None) -> None:
        super().__init__()
        self.pred, self.flow, self.seen = pred, flow, {}

    def forward(self, x_t, t, return_flow=False, **cond):
        self.seen = {"x_t": x_t, "t": t, **cond}
        out = type("Out", (), {})()
        out.sample, out.flow = self.pred, (self.flow if return_flow else None)
        return out


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_eq7_loss_equals_manual_numbers(prediction_type):
    g = torch.Generator().manual_seed(0)
    sched = NoiseSchedule(ScheduleConfig(prediction_type=prediction_type))
    x0, eps, pred = (torch.randn(B, 4, T, HW, HW, generator=g) for _ in range(3))
    t = torch.tensor([0, 999])
    model = Recorder(pred)
    out = diffusion_objective(model, sched, x0, _cond(g), timesteps=t, noise=eps)
    ab = sched.alphas_cumprod[t].float().view(B, 1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    assert torch.allclose(model.seen["x_t"], x_t, atol=1e-6)
    assert torch.allclose(model.seen["x_t"][1], eps[1])  # zero terminal SNR: t = N sees pure noise
    target = eps if prediction_type == "epsilon" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
    assert out.l_df.item() == pytest.approx(((pred - target) ** 2).mean().item(), rel=1e-6)
    assert out.loss is out.l_df and out.l_flow is None


def test_flow_term_adds_gamma_times_mse():
    g = torch.Generator().manual_seed(1)
    sched = NoiseSchedule()
    x0, pred = torch.randn(B, 4, T, HW, HW, generator=g), torch.randn(B, 4, T, HW, HW, generator=g)
    flow_pred, flow = torch.randn(B, 2, T - 1, HW, HW, generator=g), torch.randn(B, 2, T - 1, HW, HW, generator=g)
    model = Recorder(pred, flow_pred)
    out = diffusion_objective(model, sched, x0, _cond(g), flow=flow, gamma=1.0, generator=g)
    l_flow = ((flow_pred - flow) ** 2).mean()
    assert out.l_flow.item() == pytest.approx(l_flow.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(out.l_df.item() + l_flow.item(), rel=1e-6)
    out2 = diffusion_objective(model, sched, x0, _cond(g), flow=flow, gamma=0.5, generator=g)
    assert out2.loss.item() == pytest.approx(out2.l_df.item() + 0.5 * l_flow.item(), rel=1e-6)


def test_cfg_dropout_replaces_conditions_with_nulls():
    g = torch.Generator().manual_seed(2)
    cond = _cond(g)
    null = null_conditions(cond, torch.zeros(1, 77, 32), torch.zeros(1, 2, 64))
    model = Recorder(torch.zeros(B, 4, T, HW, HW))
    x0 = torch.randn(B, 4, T, HW, HW, generator=g)
    diffusion_objective(model, NoiseSchedule(), x0, cond, null=null, drop_probs=(0.0, 0.0, 1.0), generator=g)
    assert torch.equal(model.seen["text_tokens"], null.text_tokens)
    assert torch.equal(model.seen["image_embed"], torch.zeros_like(cond.image_embed))
    assert torch.equal(model.seen["first_frame"], torch.zeros_like(cond.first_frame))
    diffusion_objective(model, NoiseSchedule(), x0, cond, null=null, drop_probs=(0.0, 0.0, 0.0), generator=g)
    assert torch.equal(model.seen["text_tokens"], cond.text_tokens)


def test_timesteps_uniform_over_all_indices():
    t = sample_timesteps(20000, 1000, torch.Generator().manual_seed(0))
    assert int(t.min()) == 0 and int(t.max()) == 999
    counts = torch.bincount(t // 100, minlength=10).float()
    assert (counts / counts.mean() - 1).abs().max().item() < 0.1


def test_logit_normal_timesteps_follow_their_cdf():
    """t = floor(N sigmoid(u)), u ~ N(0, 1)  =>  P(t < k) = Φ(logit(k / N)) for k = 1..N-1."""
    n, big_n = 100_000, 1000
    t = sample_timesteps(n, big_n, torch.Generator().manual_seed(0), "logit_normal")
    assert t.dtype == torch.long and t.shape == (n,)
    assert 0 <= int(t.min()) and int(t.max()) <= big_n - 1
    k = torch.arange(1, big_n, dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 1.0).cdf(torch.logit(k / big_n))
    empirical = torch.searchsorted(t.sort().values, k.long(), right=False).double() / n  # P(t < k)
    assert (empirical - expected).abs().max().item() < 0.01  # KS distance (99.9 % bound at n = 1e5: 0.0062)
    middle = ((t >= 250) & (t < 750)).double().mean().item()
    assert middle == pytest.approx(0.728, abs=0.01)  # 2 Φ(logit 0.75) - 1; uniform gives 0.5
    again = sample_timesteps(n, big_n, torch.Generator().manual_seed(0), "logit_normal")
    assert torch.equal(t, again)  # a seeded generator gives the same draws (exact resume)
    with pytest.raises(ValueError, match="uniform.*logit_normal.*'cosine'"):
        sample_timesteps(4, big_n, None, "cosine")


class TimestepProbe(torch.nn.Module):
    """A one-parameter model that records the timesteps it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, x_t, t, return_flow=False, **cond):
        self.seen.append(t.clone())
        out = type("Out", (), {})()
        out.sample, out.flow = self.weight * x_t, None
        return out


@pytest.mark.parametrize(("sampling", "middle"), [("uniform", 0.5), ("logit_normal", 0.728)])
def test_optimizer_step_draws_timesteps_per_option(sampling: str, middle: float) -> None:
    """``optimizer_step(timestep_sampling=...)`` (what ``objective.timestep_sampling`` sets in the Ray Train
    loop) reaches the draw; the same (seed, rank, step) draws the same timesteps, as a resumed run does."""
    b = 4096
    g = torch.Generator().manual_seed(5)
    cond = Conditions(text_tokens=torch.randn(b, 1, 2, generator=g))
    batch = TrainBatch(torch.randn(b, 1, 1, 1, 1, generator=g), cond, None, [f"c{i}" for i in range(b)])
    model = TimestepProbe()
    optimizer = make_optimizer(model, 1e-3, 0.0, (0.9, 0.999), 1e-8)
    for step in (0, 1, 0):
        optimizer_step(model, optimizer, NoiseSchedule(), [batch], null=None, drop_probs=(0.0, 0.0, 0.0), gamma=1.0,
                       grad_clip=0.0, seed=0, rank=0, step=step, timestep_sampling=sampling)
    first, second, repeated = model.seen
    assert torch.equal(first, repeated) and not torch.equal(first, second)
    fraction = ((first >= 250) & (first < 750)).double().mean().item()
    assert fraction == pytest.approx(middle, abs=0.03)  # 4 sd at b = 4096


def test_tiny_model_trains_one_step_and_loss_is_finite():
    model = FactorizedDreamerUNet.from_preset("tiny", ModelConfig.tiny(predictnet=True), seed=0).train()
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(B, 4, T, HW, HW, generator=g)
    flow = torch.randn(B, 2, T - 1, HW, HW, generator=g)
    out = diffusion_objective(model, NoiseSchedule(), x0, _cond(g), flow=flow, generator=g)
    assert torch.isfinite(out.loss) and out.l_flow is not None
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    with pytest.raises(ValueError, match="no PredictNet"):
        plain = FactorizedDreamerUNet.from_preset("tiny", ModelConfig.tiny(), seed=0)
        diffusion_objective(plain, NoiseSchedule(), x0, _cond(g), flow=flow, generator=g)
