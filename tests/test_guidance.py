"""Classifier-free guidance, x0 thresholding and reproducible chunked sampling, checked on closed-form Gaussians.

Data given class y is N(m_y, v I) and the model's "no label" prediction is that of N(m_null, v I). The exact
posterior mean of N(m, v I) is affine in m, so guidance with weight w is exactly the posterior mean of
N(m_null + w (m_y - m_null), v I): an ODE sampler on the guided denoiser must land on that Gaussian."""

import pytest
import torch

from deepgm import SamplingPlan
from deepgm.conditioning import ClassLabel, Conditioning
from deepgm.diffusion import Guided, Thresholded, sample
from deepgm.diffusion.denoiser import Denoiser
from deepgm.diffusion.model import DiffusionModel
from deepgm.diffusion.samplers import SAMPLERS
from deepgm.diffusion.schedule_registry import make_schedule
from deepgm.family import chunk_generator, generate_chunked, parse_threshold
from deepgm.nets.mlp import MLP
from deepgm.nets.unet import UNet

MEANS = torch.tensor([[2.0, -1.0], [-1.0, 1.5]])  # m_y for y = 0, 1
NULL_MEAN = torch.tensor([0.5, 0.25])  # what the "no label" token (y = 2) predicts
VAR = 0.3
LABELS = Conditioning([ClassLabel(2)])


class GaussianByLabel:
    """The exact x0 prediction of N(m_y, VAR I); counts its calls and the batch sizes it saw."""

    def __init__(self, schedule):
        self.schedule, self.batches = schedule, []

    def __call__(self, x, t, y):
        self.batches.append(len(x))
        alpha, sigma = (v.to(x.dtype)[:, None] for v in self.schedule.alpha_sigma(t.double()))
        mean = torch.cat([MEANS, NULL_MEAN[None]])[y]
        return mean + alpha * VAR / (alpha**2 * VAR + sigma**2) * (x - alpha * mean)


def gaussian_denoiser(schedule=None):
    schedule = schedule or make_schedule("cosine-vp")
    fn = GaussianByLabel(schedule)
    return Denoiser.from_fn(fn, schedule, "x0"), fn


def test_guidance_is_the_affine_combination_in_one_batched_call():
    denoiser, fn = gaussian_denoiser()
    x, t, y = torch.randn(6, 2, generator=torch.Generator().manual_seed(0)), torch.tensor(0.4), torch.arange(6) % 2
    cond, null = denoiser(x, t, y=y), denoiser(x, t, y=torch.full_like(y, 2))
    fn.batches.clear()
    guided = Guided(denoiser, 3.0, LABELS)
    pred = guided(x, t, y=y)
    assert fn.batches == [12] and guided.evaluations == 2  # conditional and unconditional in one network call
    torch.testing.assert_close(pred.x0, null.x0 + 3 * (cond.x0 - null.x0))
    torch.testing.assert_close(pred.eps, null.eps + 3 * (cond.eps - null.eps))
    for w, expected in ((1.0, cond), (0.0, null)):  # the conditional and the unconditional model, one evaluation
        fn.batches.clear()
        one = Guided(denoiser, w, LABELS)
        out = one(x, t, y=y)
        assert fn.batches == [6] and one.evaluations == 1
        assert torch.equal(out.x0, expected.x0) and torch.equal(out.eps, expected.eps)


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_guided_ode_samples_have_the_guided_gaussian_mean(w):
    """DDIM (eta=0, the probability-flow ODE) with the exact guided denoiser draws N(m_null + w (m_y - m_null), v)."""
    denoiser, _ = gaussian_denoiser()
    n = 4000
    y = torch.arange(n) % 2
    out = sample(Guided(denoiser, w, LABELS), shape=(n, 2), sampler="ddim", steps=100, grid="trig", cond={"y": y},
                 generator=torch.Generator().manual_seed(1))
    assert out.nfe == 100 * (2 if w not in (0.0, 1.0) else 1)
    for label in (0, 1):
        xs = out.x[y == label].double()
        target = NULL_MEAN + w * (MEANS[label] - NULL_MEAN)
        torch.testing.assert_close(xs.mean(0).float(), target, atol=0.05, rtol=0)
        torch.testing.assert_close(xs.var(0).float(), torch.full((2,), VAR), atol=0.04, rtol=0)


def test_guided_steps_count_two_evaluations_each():
    denoiser, fn = gaussian_denoiser(make_schedule("cosine", T=100))
    out = sample(Thresholded(Guided(denoiser, 3.0, LABELS)), shape=(5, 2), sampler="ddim", steps=5,
                 cond={"y": torch.arange(5) % 2}, generator=torch.Generator().manual_seed(0))
    assert out.nfe == 10 and fn.batches == [10] * 5


def test_dynamic_thresholding_is_imagens():
    """s = max(1, the P-quantile of |x0|); x0 <- clip(x0, -s, s) / s. Identity where |x0| <= 1."""
    schedule = make_schedule("cosine-vp")
    x0 = torch.cat([torch.linspace(-3, 3, 101)[None], 0.9 * torch.linspace(-1, 1, 101)[None]])  # (2, 101)
    denoiser = Denoiser.from_fn(lambda x, t: x0, schedule, "x0")
    x, t = torch.randn(2, 101), torch.tensor(0.5)
    dynamic = Thresholded(denoiser, 0.9)(x, t)
    s = torch.quantile(x0[0].abs(), 0.9)
    assert s > 1
    torch.testing.assert_close(dynamic.x0[0], x0[0].clamp(-s, s) / s)
    torch.testing.assert_close(dynamic.x0[1], x0[1])  # already inside [-1, 1]: unchanged
    assert dynamic.x0.abs().max() <= 1
    static = Thresholded(denoiser)(x, t)
    torch.testing.assert_close(static.x0, x0.clamp(-1, 1))
    alpha, sigma = schedule.alpha_sigma(t.double())
    torch.testing.assert_close(dynamic.eps, (x - alpha.float() * dynamic.x0) / sigma.float())  # eps re-derived


def test_bad_guidance_and_threshold_are_clear_errors():
    for bad in (-1, float("nan"), float("inf"), 1e30):  # 1e30: finite, but w (x0_c - x0_u) overflows
        with pytest.raises(ValueError, match="guidance weight"):
            SamplingPlan(guidance=bad)
    for bad in ("dynamic:2", "dynamic:x", "static:0.9", "soft"):
        with pytest.raises(ValueError, match="threshold"):
            SamplingPlan(threshold=bad)
    assert parse_threshold("dynamic") == ("dynamic", 0.995) and parse_threshold("dynamic:0.9") == ("dynamic", 0.9)
    denoiser, _ = gaussian_denoiser()
    with pytest.raises(ValueError, match="conditional model"):
        Guided(denoiser, 2.0, Conditioning())
    unconditional = tiny_model(Conditioning())
    with pytest.raises(ValueError, match="unconditional"):
        unconditional.generate(4, {}, None, SamplingPlan(sampler="ddim", steps=2, guidance=2.0))


def tiny_model(conditioning=LABELS) -> DiffusionModel:
    torch.manual_seed(0)
    return DiffusionModel(MLP(2, width=16, depth=1, time_dim=8, conditioning=conditioning),
                          make_schedule("cosine", T=50), "eps", "simple", cond_dropout=0.1, data_shape=(2,))


def test_sample_i_depends_only_on_seed_and_i():
    """Stochastic ancestral sampling with guidance: the first samples agree for any n, across chunk boundaries."""
    model = tiny_model().eval()
    plan = SamplingPlan(sampler="ddpm", steps=50, guidance=2.0)
    with torch.no_grad():
        few, some, many = (generate_chunked(model, n, seed=7, plan=plan, chunk=16).x for n in (5, 20, 40))
        other_seed = generate_chunked(model, 5, seed=8, plan=plan, chunk=16).x
    assert few.shape == (5, 2) and many.shape == (40, 2)
    torch.testing.assert_close(some[:5], few)
    torch.testing.assert_close(many[:20], some)  # 16..19 sit in the second chunk, cut in `some`, whole in `many`
    assert not torch.allclose(other_seed, few)
    # and the chunk generator really is a function of (seed, chunk)
    a, b = (torch.randn(3, generator=chunk_generator(7, c)) for c in (0, 1))
    assert torch.equal(a, torch.randn(3, generator=chunk_generator(7, 0))) and not torch.equal(a, b)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_samples_the_guided_gaussian(sampler):
    """Guidance is a denoiser, so every sampler takes it: twice the NFE of the unguided run, and samples near the
    guided Gaussian's mean (a loose check: few steps, and the stochastic samplers' noise)."""
    denoiser, _ = gaussian_denoiser(make_schedule("cosine", T=1000) if sampler == "ddpm" else None)
    n, w, steps = 2000, 2.0, 40
    y = torch.arange(n) % 2
    runs = [sample(d, shape=(n, 2), sampler=sampler, steps=steps, grid=None if sampler in ("ddpm", "ddim") else "trig",
                   cond={"y": y}, generator=torch.Generator().manual_seed(0))
            for d in (denoiser, Guided(denoiser, w, LABELS))]
    plain, guided = runs
    assert guided.nfe == 2 * plain.nfe and bool(torch.isfinite(guided.x).all())
    for label in (0, 1):
        target = NULL_MEAN + w * (MEANS[label] - NULL_MEAN)
        torch.testing.assert_close(guided.x[y == label].mean(0), target, atol=0.15, rtol=0)


def test_the_unets_guided_call_is_its_two_calls_combined():
    """One batched U-Net call on [x, x] with [y, null] gives what two separate calls give (no batch coupling)."""
    torch.manual_seed(0)
    net = UNet(in_channels=1, channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
               image_size=8, conditioning=Conditioning([ClassLabel(10)])).eval()
    for p in net.parameters():  # no zero-initialised output layer: the label must show in the output
        torch.nn.init.normal_(p, std=0.1)
    denoiser = Denoiser(net, make_schedule("cosine", T=1000), "eps")
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor(0.6), torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        cond, null = denoiser(x, t, y=y), denoiser(x, t, y=torch.full_like(y, 10))
        guided = Guided(denoiser, 4.0, Conditioning([ClassLabel(10)]))(x, t, y=y)
    assert not torch.allclose(cond.x0, null.x0, atol=1e-3)
    torch.testing.assert_close(guided.x0, null.x0 + 4 * (cond.x0 - null.x0), atol=1e-4, rtol=1e-4)
