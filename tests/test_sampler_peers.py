"""Every sampler a peer also ships is the peer's method: the same analytic denoiser, grid and noise in float64, and
the samples agree one for one to ~1e-8. The peers (k-diffusion, diffusers) come from the `bench` extra; without
it these tests skip and say so."""

import importlib.util

import pytest
import torch

from deepgm.data import make_mixture
from deepgm.diffusion.samplers import SAMPLERS
from deepgm.diffusion.schedules import DiscreteVP
from deepgm.peers import K_DIFFUSION_MISSING, load_k_diffusion_sampling

TOL = 1e-8
STEPS = 10  # below 15, where diffusers' multistep schedulers lower the order on their last steps as deepgm does


@pytest.fixture(scope="module")
def K():
    try:
        return load_k_diffusion_sampling()
    except ImportError:
        pytest.skip(K_DIFFUSION_MISSING)


@pytest.fixture(scope="module")
def diffusers():
    if importlib.util.find_spec("diffusers") is None:
        pytest.skip("diffusers is not installed; for the peer comparisons run pip install -e '.[bench]'")
    import diffusers

    return diffusers


@pytest.fixture(scope="module")
def problem():
    """DDPM's linear schedule and the exact denoiser of an anisotropic full-covariance mixture in 5-D."""
    schedule = DiscreteVP.linear(T=1000)
    gmm = make_mixture("mixture", dim=5, n_modes=3, seed=7)
    z = torch.randn(48, 5, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    return schedule, gmm.denoiser(schedule), z


def _times(schedule, scaled_sigmas: torch.Tensor) -> torch.Tensor:
    """deepgm times at a peer's noise levels sigma/alpha (0 stays 0)."""
    s = scaled_sigmas.double()
    t = schedule.t_from_log_snr(-2 * torch.log(s.clamp(min=1e-300)))
    return torch.where(s > 0, t, torch.zeros_like(t))


def _on_schedule(schedule, scaled_sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A peer's (float32) grid moved onto the schedule in float64: the times, and sigma/alpha there, which the peer
    then uses, so that both sides see the same noise levels to the last bit."""
    times = _times(schedule, scaled_sigmas)
    alpha, sigma = schedule.alpha_sigma(times)
    return times, sigma / alpha


def _noise_sampler(shape, seed):
    """k-diffusion's noise_sampler drawing what deepgm's samplers draw from a generator with this seed."""
    g = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(shape, generator=g, dtype=torch.float64)


def _run_k(K, problem, name, steps=STEPS, **options):
    schedule, denoiser, z = problem
    a1, s1 = schedule.alpha_sigma(torch.tensor(1.0, dtype=torch.float64))
    a0, s0 = schedule.alpha_sigma(torch.tensor(1.0 / schedule.T, dtype=torch.float64))
    times, sigmas = _on_schedule(schedule, K.get_sigmas_karras(steps, float(s0 / a0), float(s1 / a1)))

    def model(y, sigma):  # k-diffusion's D(x / alpha, sigma / alpha) from deepgm's denoiser
        t = _times(schedule, sigma[:1])[0]
        return denoiser(schedule.alpha_sigma(t)[0] * y, t).x0

    out = getattr(K, f"sample_{name}")(model, z / float(a1), sigmas, disable=True, **options)
    return out, times


def _run_diffusers(diffusers, problem, cls_name, steps=STEPS, **config):
    """A diffusers scheduler on DDPM's linear betas, its sigma table in float64, the model answering eps."""
    schedule, denoiser, z = problem
    scheduler = getattr(diffusers, cls_name)(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                             beta_schedule="linear", prediction_type="epsilon", **config)
    scheduler.set_timesteps(steps)
    times, scheduler.sigmas = _on_schedule(schedule, scheduler.sigmas)
    x = z.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        x = scheduler.step(denoiser(x, times[i]).eps, timestep, x).prev_sample
    return x, times


def _ours(problem, name, times, seed=None, **options):
    schedule, denoiser, z = problem
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return SAMPLERS[name](denoiser, times, z.clone(), generator=generator, **options)


def _assert_agree(ours, theirs):
    assert torch.isfinite(ours).all()
    error = float((ours - theirs).abs().max())
    assert error < TOL, f"max |deepgm - peer| = {error:.3g}"


K_CASES = [  # deepgm sampler, its options, k-diffusion's sampler, its options
    ("ddim", {}, "euler", {}),
    ("euler", {}, "euler", {}),
    ("heun", {}, "heun", {}),
    ("dpmpp-2m", {}, "dpmpp_2m", {}),
    ("dpmpp-3m", {"lower_order_final": False}, "dpmpp_3m_sde", {"eta": 0.0}),
    ("lms", {}, "lms", {}),
]
K_STOCHASTIC = [
    ("euler-ancestral", "euler_ancestral"), ("dpmpp-2m-sde", "dpmpp_2m_sde"), ("dpmpp-3m-sde", "dpmpp_3m_sde"),
]


@pytest.mark.parametrize("ours_name,ours_options,k_name,k_options", K_CASES, ids=[c[0] for c in K_CASES])
def test_deterministic_samplers_are_k_diffusions(K, problem, ours_name, ours_options, k_name, k_options):
    theirs, times = _run_k(K, problem, k_name, **k_options)
    _assert_agree(_ours(problem, ours_name, times, **ours_options), theirs)


@pytest.mark.parametrize("ours_name,k_name", K_STOCHASTIC, ids=[c[0] for c in K_STOCHASTIC])
def test_stochastic_samplers_are_k_diffusions_given_the_same_noise(K, problem, ours_name, k_name):
    z = problem[2]
    theirs, times = _run_k(K, problem, k_name, noise_sampler=_noise_sampler(z.shape, 5))
    ours = _ours(problem, ours_name, times, seed=5)
    _assert_agree(ours, theirs)
    # the noise matters: another seed moves the samples by far more than the tolerance
    assert float((_ours(problem, ours_name, times, seed=6) - ours).abs().max()) > 1e-2


# diffusers' DPMSolverMultistepScheduler casts the sample to float32 in every step (agreement ~2e-7 at best), so
# DPM-Solver++ is checked against k-diffusion above
DIFFUSERS_CASES = [  # deepgm sampler, its options, diffusers scheduler, its config
    ("deis", {"order": 2}, "DEISMultistepScheduler", {"solver_order": 2}),
    ("deis", {"order": 3}, "DEISMultistepScheduler", {"solver_order": 3}),
    ("unipc", {"order": 2}, "UniPCMultistepScheduler", {"solver_order": 2}),
    ("unipc", {"order": 3}, "UniPCMultistepScheduler", {"solver_order": 3}),
]


@pytest.mark.parametrize("ours_name,ours_options,cls_name,config", DIFFUSERS_CASES,
                         ids=[f"{c[0]}-{c[3]['solver_order']}" for c in DIFFUSERS_CASES])
def test_multistep_samplers_are_diffusers(diffusers, problem, ours_name, ours_options, cls_name, config):
    theirs, times = _run_diffusers(diffusers, problem, cls_name, **config)
    _assert_agree(_ours(problem, ours_name, times, **ours_options), theirs)


def test_the_variants_differ_from_the_peers_methods(K, problem):
    """dpmpp-3m-exact and heun-capped are not the peers' methods: on the Karras grid at 6 steps (where Heun's
    last corrector extrapolates) both move the samples by far more than the tolerance."""
    for ours_name, k_name in (("dpmpp-3m-exact", "dpmpp_3m_sde"), ("heun-capped", "heun")):
        options = {"eta": 0.0} if k_name == "dpmpp_3m_sde" else {}
        theirs, times = _run_k(K, problem, k_name, steps=6, **options)
        extra = {"lower_order_final": False} if ours_name == "dpmpp-3m-exact" else {}
        assert float((_ours(problem, ours_name, times, **extra) - theirs).abs().max()) > 1e-4


@pytest.mark.parametrize("variance,variance_type", [("beta_tilde", "fixed_small"), ("beta", "fixed_large")])
def test_ddpm_is_diffusers_ddpm_scheduler_given_the_same_noise(diffusers, problem, variance, variance_type):
    """Ancestral sampling over a 50-step sub-sequence ("leading" timesteps), diffusers' alpha-bar table replaced
    by the schedule's in float64; diffusers' timestep k is deepgm's time (k + 1)/T."""
    schedule, denoiser, z = problem
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                        beta_schedule="linear", prediction_type="epsilon", clip_sample=False,
                                        variance_type=variance_type)
    scheduler.alphas_cumprod = torch.exp(schedule.log_alpha_bar[1:])
    scheduler.set_timesteps(50)
    times = torch.cat([(scheduler.timesteps.double() + 1) / schedule.T, torch.zeros(1, dtype=torch.float64)])
    x, g = z.clone(), torch.Generator().manual_seed(3)
    for i, timestep in enumerate(scheduler.timesteps):
        x = scheduler.step(denoiser(x, times[i]).eps, timestep, x, generator=g).prev_sample
    _assert_agree(_ours(problem, "ddpm", times, seed=3, variance=variance), x)
