"""Continuous-time samplers and time grids, against exact answers.

A single Gaussian has a closed-form probability-flow map, so each ODE sampler's error must fall at its
order; a Gaussian mixture has an exact denoiser, so every sampler must land on the mixture, and the
reverse SDE and the ODE must give the same marginals.
"""

import math

import pytest
import torch

import deepgm
from deepgm.data import make_mixture
from deepgm.data.toy import GaussianMixture
from deepgm.diffusion.denoiser import Denoiser
from deepgm.diffusion.grids import GRIDS, available_grids, make_grid, smallest_time
from deepgm.diffusion.samplers import SAMPLERS
from deepgm.diffusion.sampling import AUTO_SAMPLERS, DEFAULT_GRID, DEFAULT_SAMPLER, available_samplers
from deepgm.diffusion.schedule_registry import make_schedule
from deepgm.diffusion.schedules import DiscreteVP, Schedule
from deepgm.eval.metrics import sliced_wasserstein

# dpmpp-3m is the reference codes' 3M (DPM-Solver's, k-diffusion's): its factor 1 on D2 leaves it 2nd order here
ODE_ORDERS = {"euler": 1, "heun": 2, "heun-capped": 2, "lms": 3, "dpmpp-2m": 2, "dpmpp-3m": 2, "dpmpp-3m-exact": 3,
              "deis": 3, "unipc": 3, "trig-abm": 3}
SCHEDULES = {"linear": lambda: DiscreteVP.linear(T=1000), "cosine": lambda: DiscreteVP.cosine(T=1000),
             "vp": lambda: make_schedule("vp"), "ve": lambda: make_schedule("ve"), "edm": lambda: make_schedule("edm")}


def nfe_of(sampler: str, steps: int) -> int:
    """The documented steps -> NFE relation (pc with its default single corrector step)."""
    return {"heun": 2 * steps - 1, "heun-capped": 2 * steps - 1, "pc": 2 * steps - 1}.get(sampler, steps)


# ------------------------------------------------------------------------------------------------ grids
@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
@pytest.mark.parametrize("grid", available_grids())
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_every_grid_ends_at_zero_decreases_and_has_steps_plus_one_points(schedule_name, grid, steps):
    schedule = SCHEDULES[schedule_name]()
    times = make_grid(grid, schedule, steps)
    assert times.dtype == torch.float64 and times.shape == (steps + 1,)
    assert times[0] == 1.0 and times[-1] == 0.0
    assert bool((times[1:] < times[:-1]).all())
    if grid == "student":  # a distilled student's grid is its own: exactly t = i/steps, whatever the schedule
        assert times[:-1].tolist() == [i / steps for i in range(steps, 0, -1)]
    elif steps > 1:
        assert times[-2] == pytest.approx(smallest_time(schedule), rel=1e-12)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine", "vp", "ve"])
def test_grids_are_uniform_in_their_coordinate(schedule_name):
    schedule, steps = SCHEDULES[schedule_name](), 12
    positive = {name: make_grid(name, schedule, steps)[:-1] for name in available_grids()}
    lam = {name: schedule.log_snr(t) for name, t in positive.items()}
    s = {name: torch.exp(-v / 2) for name, v in lam.items()}  # sigma / alpha

    def assert_even(v):
        steps_ = v[1:] - v[:-1]
        torch.testing.assert_close(steps_, steps_.mean().expand_as(steps_), rtol=1e-6, atol=1e-9)

    if schedule.T is None:
        assert_even(positive["uniform"])
    assert_even(positive["student"])
    assert_even(lam["log-snr"])
    assert_even(s["karras"] ** (1 / 7))
    assert_even(torch.atan(s["trig"]))  # theta = arctan(s / scale), scale 1


def test_discrete_uniform_grid_keeps_integer_timesteps():
    schedule = DiscreteVP.linear(T=1000)
    for steps in (3, 10, 999, 1000):
        i = make_grid("uniform", schedule, steps) * 1000
        torch.testing.assert_close(i, i.round(), rtol=0, atol=1e-9)
    assert make_grid("uniform", schedule, 1000).tolist() == [i / 1000 for i in range(1000, -1, -1)]


def test_bad_grid_names_and_options_are_value_errors():
    schedule = DiscreteVP.linear(T=1000)
    with pytest.raises(ValueError, match="unknown grid"):
        make_grid("karas", schedule, 10)
    with pytest.raises(ValueError, match="bad options"):
        make_grid("karras", schedule, 10, rho_typo=3)
    with pytest.raises(ValueError, match="steps"):
        make_grid("log-snr", schedule, 0)
    with pytest.raises(ValueError, match="exceeds"):
        make_grid("uniform", schedule, 1001)
    with pytest.raises(ValueError, match="unknown grid"):
        deepgm.sample(make_mixture("ring").denoiser(schedule), shape=(4, 2), sampler="ddim", grid="cosine-typo")


# ------------------------------------------------------------------------------ schedule helpers we rely on
@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_discrete_t_from_log_snr_is_the_exact_inverse_and_agrees_with_bisection(schedule_name):
    schedule = SCHEDULES[schedule_name]()
    t = torch.cat([torch.linspace(1e-3, 1, 197, dtype=torch.float64), torch.tensor([0.5, 0.0005, 1.0])])
    lam = schedule.log_snr(t)
    torch.testing.assert_close(schedule.t_from_log_snr(lam), t, rtol=0, atol=1e-12)
    # generic bisection: alpha_sigma snaps times within 1e-4 timesteps of i/T onto it, so log_snr is flat there
    torch.testing.assert_close(Schedule.t_from_log_snr(schedule, lam), t, rtol=0, atol=1.01e-4 / schedule.T)
    assert float(schedule.t_from_log_snr(torch.tensor(math.inf))) == 0.0


def test_discrete_sde_is_the_derivative_at_grid_times_too():
    """f = d log alpha/dt and g^2 = d sigma^2/dt - 2 f sigma^2, including exactly at t = i/T."""
    schedule = DiscreteVP.linear(T=1000)
    t = torch.tensor([0.25, 0.5, 0.5003, 1.0], dtype=torch.float64)
    f, g2 = schedule.sde(t)
    h = torch.tensor([1e-4, 1e-4, 1e-4, -1e-4], dtype=torch.float64)  # a tenth of a step, into t's own segment
    log_alpha = lambda u: torch.log(schedule.alpha_sigma(u)[0])
    var = lambda u: schedule.alpha_sigma(u)[1] ** 2
    assert bool((f < 0).all() and (g2 > 0).all())
    torch.testing.assert_close(f, (log_alpha(t + h) - log_alpha(t)) / h, rtol=1e-9, atol=0)  # linear in a segment
    torch.testing.assert_close(g2, (var(t + h) - var(t)) / h - 2 * f * var(t), rtol=2e-3, atol=0)


# ------------------------------------------------------------------------- single Gaussian: orders of accuracy
def _gaussian_problem(schedule):
    std = torch.tensor([0.3, 0.7, 2.0], dtype=torch.float64)
    mu = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
    gaussian = GaussianMixture(torch.ones(1), mu[None], torch.diag(std**2)[None])
    x_T = schedule.prior_std() * torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(torch.tensor([1.0, smallest_time(schedule)], dtype=torch.float64))
    s = sigma / alpha
    # PF-ODE in y = x/alpha: y(s) - mu = (y_1 - mu) sqrt(std^2 + s^2)/sqrt(std^2 + s_1^2), then the denoise jump
    # at t_min: x0 = mu + std^2/(std^2 + s_min^2) (y(s_min) - mu)
    exact = mu + (x_T / alpha[0] - mu) * std**2 / (torch.sqrt(std**2 + s[1] ** 2) * torch.sqrt(std**2 + s[0] ** 2))
    return gaussian.denoiser(schedule), x_T, exact


@pytest.mark.parametrize("schedule_name", ["linear", "ve"])
@pytest.mark.parametrize("sampler", sorted(ODE_ORDERS))
def test_ode_samplers_converge_at_their_order_on_a_gaussian(schedule_name, sampler):
    denoiser, x_T, exact = _gaussian_problem(SCHEDULES[schedule_name]())
    errors = []
    for steps in (16, 32, 64):
        out = deepgm.sample(denoiser, x_T=x_T, sampler=sampler, steps=steps, grid="log-snr", dtype=torch.float64)
        assert out.nfe == nfe_of(sampler, steps)
        errors.append(float((out.x - exact).abs().max()))
    slopes = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    order = ODE_ORDERS[sampler]
    assert all(order - 0.25 < v < order + 2.5 for v in slopes), (errors, slopes)


@pytest.mark.parametrize("schedule_name", ["linear", "ve"])
def test_rk45_meets_its_tolerance(schedule_name):
    denoiser, x_T, exact = _gaussian_problem(SCHEDULES[schedule_name]())
    nfes = []
    for tol in (1e-4, 1e-6, 1e-8):
        out = deepgm.sample(denoiser, x_T=x_T, sampler="rk45", steps=4, rtol=tol, atol=tol, dtype=torch.float64)
        assert float((out.x - exact).abs().max()) < 20 * tol
        nfes.append(out.nfe)
    assert nfes[0] < nfes[1] < nfes[2]


def test_trig_abm_is_exact_for_data_at_its_scale():
    """With data N(0, sigma_data^2 I) the EDM-preconditioned output F is 0: one step is already exact."""
    schedule = DiscreteVP.linear(T=1000)
    gaussian = GaussianMixture(torch.ones(1), torch.zeros(1, 2), 0.25 * torch.eye(2)[None])
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = deepgm.sample(gaussian.denoiser(schedule), x_T=x_T, sampler="trig-abm", steps=3, sigma_data=0.5,
                      dtype=torch.float64).x
    b = deepgm.sample(gaussian.denoiser(schedule), x_T=x_T, sampler="rk45", steps=3, rtol=1e-10, atol=1e-10,
                      dtype=torch.float64).x
    torch.testing.assert_close(a, b, rtol=0, atol=1e-8)


def test_dpmpp_3m_exact_integrates_a_quadratic_data_prediction_exactly():
    """With x0_hat(l) = a + b l + c l^2 in the half log-SNR l (whatever x is), every 3rd-order step is exact:
    x_s = (sigma_s/sigma_t) x_t + sigma_s int e^l x0_hat(l) dl. The first two (warm-up, order 1 and 2) steps
    are made 1e-4 long so their errors vanish; with the factor 1 on D2 that public 3M codes use instead of 2,
    the big steps would be off by ~1e-3."""
    schedule = DiscreteVP.linear(T=1000)
    a, b, c = 0.3, 0.2, -0.05
    half = lambda t: schedule.log_snr(t) / 2
    lam = torch.tensor([-2.0, -2.0 + 1e-4, -2.0 + 2e-4, -1.0, 0.0, 1.5, 2.5], dtype=torch.float64)
    times = schedule.t_from_log_snr(2 * lam)
    lam = half(times)  # what the sampler sees

    def x0_hat(x, t):
        l = half(t[0].double())
        return (a + b * l + c * l**2).to(x.dtype).expand_as(x)

    denoiser = Denoiser.from_fn(x0_hat, schedule, parameterization="x0")
    x_T = torch.randn(4, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    antiderivative = lambda l: torch.exp(l) * (a + b * (l - 1) + c * (l**2 - 2 * l + 2))  # of e^l x0_hat(l)
    sigma = schedule.alpha_sigma(times)[1]
    x_end = sigma[-1] / sigma[0] * x_T + sigma[-1] * (antiderivative(lam[-1]) - antiderivative(lam[0]))
    def end(sampler):
        out = deepgm.sample(denoiser, x_T=x_T, times=times.tolist() + [0.0], sampler=sampler, lower_order_final=False,
                            dtype=torch.float64, return_trajectory=True)
        return out.trajectory[-2]

    torch.testing.assert_close(end("dpmpp-3m-exact"), x_end, rtol=0, atol=1e-7)
    assert float((end("dpmpp-3m") - x_end).abs().max()) > 1e-4  # the reference codes' 3M is not exact here


def test_deis_integrates_a_quadratic_noise_prediction_exactly_and_is_ddim_at_order_1():
    """With eps(u) = a + b u + c u^2 in u = log(sigma/alpha) (whatever x is), every 3rd-order DEIS step is exact:
    y_s = y_t + int e^u eps(u) du in y = x/alpha. The warm-up steps (order 1 and 2) are made 1e-4 long so their
    errors vanish. At order 1 DEIS is the DDIM step, eps held constant."""
    schedule = DiscreteVP.linear(T=1000)
    a, b, c = 0.3, -0.2, 0.05
    u = torch.tensor([3.0, 3.0 - 1e-4, 3.0 - 2e-4, 2.0, 0.5, -1.0, -3.5], dtype=torch.float64)  # log rho
    times = schedule.t_from_log_snr(-2 * u)
    alpha, sigma = schedule.alpha_sigma(times)
    u = torch.log(sigma / alpha)  # what the sampler sees

    def eps_hat(x, t):
        al, si = schedule.alpha_sigma(t[0].double())
        v = torch.log(si / al)
        return (a + b * v + c * v**2).to(x.dtype).expand_as(x)

    denoiser = Denoiser.from_fn(eps_hat, schedule, parameterization="eps")
    x_T = torch.randn(4, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    antiderivative = lambda v: torch.exp(v) * (a + b * (v - 1) + c * (v**2 - 2 * v + 2))  # of e^u eps(u)
    y_end = x_T / alpha[0] + antiderivative(u[-1]) - antiderivative(u[0])
    out = deepgm.sample(denoiser, x_T=x_T, times=times.tolist() + [0.0], sampler="deis", lower_order_final=False,
                        dtype=torch.float64, return_trajectory=True)
    torch.testing.assert_close(out.trajectory[-2], alpha[-1] * y_end, rtol=0, atol=1e-7)  # order 2: off by 0.6

    ring_denoiser = make_mixture("ring").denoiser(schedule)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    first = deepgm.sample(ring_denoiser, x_T=x_T, steps=7, grid="karras", sampler="deis", order=1, dtype=torch.float64)
    ddim = deepgm.sample(ring_denoiser, x_T=x_T, steps=7, grid="karras", sampler="ddim", dtype=torch.float64)
    torch.testing.assert_close(first.x, ddim.x, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- the mixture: every sampler lands
@pytest.fixture(scope="module")
def ring():
    return make_mixture("ring")


def _sw(a, b):
    return sliced_wasserstein(a.float(), b.float(), generator=torch.Generator().manual_seed(0))


def _floor(gmm, truth):
    """The two-sample noise floor: SW between `truth` and fresh true samples, averaged over 3 draws."""
    return sum(_sw(gmm.sample(len(truth), generator=torch.Generator().manual_seed(10 + k)), truth)
               for k in range(3)) / 3


CONVERGENCE = {  # sampler: (steps at low NFE, steps at high NFE, grid, options)
    "euler": (2, 100, "log-snr", {}), "heun": (2, 50, "log-snr", {}), "dpmpp-2m": (2, 100, "log-snr", {}),
    "dpmpp-3m": (2, 100, "log-snr", {}), "trig-abm": (2, 100, "trig", {}), "ddim": (2, 100, "uniform", {}),
    "deis": (2, 100, "karras", {}), "unipc": (2, 100, "log-snr", {}), "lms": (2, 100, "karras", {}),
    "heun-capped": (2, 50, "log-snr", {}), "dpmpp-3m-exact": (2, 100, "log-snr", {}),
    "euler-ancestral": (2, 200, "log-snr", {}), "dpmpp-2m-sde": (2, 100, "log-snr", {}),
    "dpmpp-3m-sde": (2, 100, "log-snr", {}),
    "rk45": (None, 2, "log-snr", {"rtol": 1e-3, "atol": 1e-3}),  # its accuracy is tested against its tolerance
    "euler-maruyama": (2, 200, "uniform", {}), "pc": (2, 100, "uniform", {}), "ddpm": (2, 200, "uniform", {}),
}


@pytest.mark.parametrize("sampler", sorted(CONVERGENCE))
def test_every_sampler_converges_to_the_mixture(ring, sampler):
    schedule = DiscreteVP.linear(T=1000)
    n = 2000
    truth = ring.sample(n, generator=torch.Generator().manual_seed(3))
    low, high, grid, options = CONVERGENCE[sampler]
    errors = []
    for steps in [low, high] if low else [high]:
        out = deepgm.sample(ring.denoiser(schedule), schedule, (n, 2), sampler=sampler, steps=steps, grid=grid,
                            generator=torch.Generator().manual_seed(1), dtype=torch.float64, **options)
        errors.append(_sw(out.x, truth))
    assert errors[-1] < 1.5 * _floor(ring, truth), errors
    assert low is None or errors[0] > 2 * errors[-1]


def test_reverse_sde_and_probability_flow_ode_give_the_same_marginals(ring):
    schedule = DiscreteVP.linear(T=1000)
    n = 2000
    denoiser = ring.denoiser(schedule)
    sde = deepgm.sample(denoiser, shape=(n, 2), sampler="euler-maruyama", steps=200, grid="uniform",
                        generator=torch.Generator().manual_seed(5), dtype=torch.float64).x
    ode = deepgm.sample(denoiser, shape=(n, 2), sampler="rk45", steps=2, rtol=1e-4, atol=1e-4,
                        generator=torch.Generator().manual_seed(6), dtype=torch.float64).x
    assert _sw(sde, ode) < 1.5 * _floor(ring, ode)
    truth = ring.sample(100_000, generator=torch.Generator().manual_seed(7)).double()
    for x in (sde, ode):  # first two moments within a few standard errors of the truth
        torch.testing.assert_close(x.mean(0), truth.mean(0), rtol=0, atol=4 * 1.42 / math.sqrt(n))
        torch.testing.assert_close(torch.cov(x.T), torch.cov(truth.T), rtol=0, atol=0.15)


def test_euler_is_ddim_at_eta_zero(ring):
    """Euler on the PF-ODE in (x/alpha, sigma/alpha) is algebraically DDIM's eta = 0 update."""
    schedule = DiscreteVP.cosine(T=1000)
    x_T = torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for grid in available_grids():
        a = deepgm.sample(ring.denoiser(schedule), x_T=x_T, sampler="euler", steps=10, grid=grid).x
        b = deepgm.sample(ring.denoiser(schedule), x_T=x_T, sampler="ddim", steps=10, grid=grid).x
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_heun_churn_adds_noise_and_still_lands_on_the_mixture(ring):
    schedule = DiscreteVP.linear(T=1000)
    n = 2000
    kw = dict(shape=(n, 2), sampler="heun", steps=40, grid="karras", s_churn=20.0, s_tmin=0.05, s_tmax=50.0,
              dtype=torch.float64)
    a = deepgm.sample(ring.denoiser(schedule), generator=torch.Generator().manual_seed(1), **kw)
    b = deepgm.sample(ring.denoiser(schedule), x_T=None, generator=torch.Generator().manual_seed(2), **kw)
    assert a.nfe == 79 and not torch.equal(a.x, b.x)
    truth = ring.sample(n, generator=torch.Generator().manual_seed(3))
    assert _sw(a.x, truth) < 1.5 * _floor(ring, truth)


# ------------------------------------------------------------------- every sampler x every grid x schedules
@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_each_sampler_runs_on_every_grid_and_schedule_with_honest_nfe(sampler, schedule_name):
    schedule = SCHEDULES[schedule_name]()
    gmm = make_mixture("mixture", dim=3, n_modes=3, seed=0)
    for grid in available_grids():
        options = {"rtol": 1e-3, "atol": 1e-3} if sampler == "rk45" else {}
        out = deepgm.sample(gmm.denoiser(schedule), shape=(32, 3), sampler=sampler, steps=5, grid=grid,
                            generator=torch.Generator().manual_seed(0), dtype=torch.float64, return_trajectory=True,
                            **options)
        assert bool(torch.isfinite(out.x).all()), (sampler, grid)
        assert len(out.trajectory) == 6 and torch.equal(out.trajectory[-1], out.x)  # one callback per step
        if sampler != "rk45":
            assert out.nfe == nfe_of(sampler, 5)


def test_bad_sampler_options_are_value_errors(ring):
    schedule = DiscreteVP.linear(T=1000)
    denoiser = ring.denoiser(schedule)
    cases = [("dpmpp-2m", {"eta": 1.0}, "unknown option"), ("heun", {"churn": 1.0}, "unknown option"),
             ("rk45", {"rtol": 0.0}, "rtol"), ("rk45", {}, "steps >= 2"), ("pc", {"predictor": "ode"}, "predictor"),
             ("pc", {"snr": -1.0}, "snr"), ("trig-abm", {"order": 4}, "order"),
             ("deis", {"order": 0}, "order"), ("heun", {"s_churn": -1.0}, "s_churn")]
    for sampler, options, message in cases:
        with pytest.raises(ValueError, match=message):
            deepgm.sample(denoiser, shape=(4, 2), sampler=sampler, steps=1, **options)


def test_defaults_and_names_are_listed():
    assert DEFAULT_SAMPLER == "auto" and set(AUTO_SAMPLERS) <= set(SAMPLERS) and DEFAULT_GRID in GRIDS
    assert "auto" in available_samplers()
    assert {"euler-maruyama", "pc", "euler", "heun", "rk45", "dpmpp-2m", "dpmpp-3m", "deis", "ddpm", "ddim",
            "trig-abm"} <= set(available_samplers())
    assert {"uniform", "log-snr", "karras", "trig"} <= set(available_grids())


def test_cli_sample_lists_every_sampler_and_grid_and_takes_grid(capsys):
    from deepgm.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["sample", "RUN", "--sampler", "dpmpp-2m", "--steps", "10", "--grid", "karras"])
    assert (args.sampler, args.steps, args.grid) == ("dpmpp-2m", 10, "karras")
    with pytest.raises(SystemExit):
        parser.parse_args(["sample", "RUN", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in available_samplers() + available_grids() + ["calibrated"])
    assert parser.parse_args(["sample", "RUN", "--grid", "calibrated"]).grid == "calibrated"
    with pytest.raises(SystemExit):
        parser.parse_args(["sample", "RUN", "--grid", "karas"])


def test_heun_capped_is_edms_algorithm_wherever_its_corrector_interpolates(ring):
    """On steps with s'/s >= 1/2 heun-capped must be EDM's Algorithm 2 (no churn) exactly: the trapezoidal rule
    on dy/ds = (y - D(y, s))/s with an Euler predictor, written here in EDM's own slope form."""
    schedule = DiscreteVP.linear(T=1000)
    denoiser = ring.denoiser(schedule)
    times = make_grid("log-snr", schedule, 40)  # geometric in s: every ratio s'/s is ~0.78
    alpha, sigma = schedule.alpha_sigma(times)
    s = sigma / alpha
    assert bool((s[1:-1] / s[:-2] >= 0.5).all())
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = x_T / alpha[0]
    for i in range(len(times) - 1):
        d = denoiser(alpha[i] * y, times[i]).x0
        slope = (y - d) / s[i]
        y_next = y + (s[i + 1] - s[i]) * slope
        if s[i + 1] > 0:
            slope_next = (y_next - denoiser(alpha[i + 1] * y_next, times[i + 1]).x0) / s[i + 1]
            y_next = y + (s[i + 1] - s[i]) * (slope + slope_next) / 2
        y = y_next
    for sampler in ("heun", "heun-capped"):
        ours = deepgm.sample(denoiser, x_T=x_T, sampler=sampler, times=times, dtype=torch.float64).x
        torch.testing.assert_close(ours, alpha[-1] * y, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("grid", ["log-snr", "trig"])
def test_heun_capped_does_not_blow_up_at_low_nfe_where_edms_heun_does(ring, grid):
    # EDM's slope-form corrector divides by the smallest noise level and lands at rms 40-55 here (heun-capped's
    # reason to exist); with its weight capped it must stay as accurate as a first-order sampler at the same NFE.
    # (On the Karras grid 3 steps leave rms ~1.6 either way: its first step from s = 157 is simply too long.)
    schedule = DiscreteVP.linear(T=1000)
    denoiser = ring.denoiser(schedule)
    x_T = torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = deepgm.sample(denoiser, x_T=x_T, sampler="rk45", steps=2, dtype=torch.float64, rtol=1e-7, atol=1e-7).x

    def rms(sampler, steps, grid):
        out = deepgm.sample(denoiser, x_T=x_T, sampler=sampler, steps=steps, grid=grid, dtype=torch.float64)
        return float((out.x - exact).pow(2).sum(1).mean().sqrt())

    assert rms("heun-capped", 3, grid) < 1.5 * rms("ddim", 5, "uniform")
    assert rms("heun", 3, grid) > 10
