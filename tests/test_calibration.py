"""The calibrated time grid: error equidistribution from a pilot solve, chosen against fixed grids on the pilot."""

import itertools
import math

import pytest
import torch

import deepgm
from deepgm.data import make_mixture
from deepgm.data.toy import GaussianMixture
from deepgm.diffusion.calibration import (
    AUTO_SAMPLERS,
    DYNAMIC_POWER,
    FINE_STEPS,
    PILOT,
    _dynamic,
    _equidistributed,
    calibrate,
    choose,
    fine_solve,
    pilot_size,
)
from deepgm.diffusion.denoiser import Denoiser
from deepgm.diffusion.grids import CALIBRATED, make_grid, scaled_noise, smallest_time, start_std, trig
from deepgm.diffusion.samplers import SAMPLERS
from deepgm.diffusion.schedules import DiscreteVP
from deepgm.eval.metrics import fid_of_samples


def theta_ends(schedule):
    return torch.atan(scaled_noise(schedule, [1.0, smallest_time(schedule)])).tolist()


def test_constant_curvature_gives_the_grid_uniform_in_theta():
    schedule = DiscreteVP.linear(T=1000)
    top, end = theta_ends(schedule)
    theta = torch.linspace(top, end, 50, dtype=torch.float64)[1:-1].tolist()
    for power in (0.5, 0.7):
        times = _equidistributed(schedule, [(th, 3.0) for th in theta], top, end, 9, power)
        torch.testing.assert_close(times, trig(schedule, 9), rtol=1e-9, atol=1e-12)


def test_steps_go_where_the_denoiser_output_bends():
    schedule = DiscreteVP.linear(T=1000)
    top, end = theta_ends(schedule)
    theta = torch.linspace(top, end, 200, dtype=torch.float64)[1:-1]
    bump = (theta > 0.5) & (theta < 0.7)  # all the curvature in 0.2 of the ~1.56 theta range
    times = _equidistributed(schedule, list(zip(theta.tolist(), bump.double().add(1e-6).tolist(), strict=True)),
                             top, end, 12, 0.5)
    s = scaled_noise(schedule, times[:-1])
    inside = ((torch.atan(s) > 0.5) & (torch.atan(s) < 0.7)).sum()
    assert int(inside) >= 8  # uniform in theta would put 1 or 2 of the 12 there


def test_the_fine_solve_is_far_closer_to_the_ode_than_any_candidate_on_sharp_modes():
    """The pilot judges every candidate by its distance to the fine solve, so that must be far closer to the ODE's
    solution than the best candidate. On a grid of very sharp modes (std 0.01) 100 steps uniform in theta, the old
    fine solve, were 7.6e-4 rms from it, level with DEIS at 20 steps (9e-4); 200 steps uniform in log-SNR: 3e-6."""
    schedule = DiscreteVP.linear(T=1000)
    denoiser = make_mixture("grid", std=0.01).denoiser(schedule)
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = deepgm.sample(denoiser, x_T=z, sampler="rk45", steps=2, rtol=1e-9, atol=1e-9, dtype=torch.float64).x
    rms = lambda x: float((x - exact).pow(2).mean().sqrt())
    fine, recorder = fine_solve(denoiser, z)
    assert recorder.nfe == FINE_STEPS and len(recorder.curvature) == FINE_STEPS - 2
    best = min(rms(deepgm.sample(denoiser, x_T=z, sampler=sampler, grid=grid, steps=20, dtype=torch.float64).x)
               for sampler in AUTO_SAMPLERS[1:] for grid in ("log-snr", "karras"))
    assert rms(fine) < 0.1 * best, (rms(fine), best)


def test_the_pilot_builds_no_autograd_graph_on_a_trainable_network():
    net = torch.nn.Linear(2, 2).double()  # a trainable x0-predictor: any graph would show in the outputs it records
    seen = []

    def x0(x, t):
        out = net(x)
        seen.append(out.requires_grad)
        return out

    denoiser = Denoiser.from_fn(x0, DiscreteVP.linear(T=1000), parameterization="x0")
    calibrate(denoiser, "deis", 4, (2,), pilot=8, fine_steps=8, dtype=torch.float64)
    assert seen and not any(seen)


def test_the_pilot_holds_more_samples_in_low_dimension():
    assert pilot_size((2,)) == 2048 and pilot_size((8,)) == 512 and pilot_size((16,)) == pilot_size((64,)) == PILOT
    assert pilot_size((1, 8, 8)) == pilot_size((3, 32, 32)) == PILOT
    denoiser = make_mixture("ring").denoiser(DiscreteVP.linear(T=1000))
    assert calibrate(denoiser, "deis", 4, (2,), fine_steps=8).pilot == 2048


def test_the_dynamic_grid_is_the_path_of_least_ddim_error_along_the_fine_solve():
    """Against every path by brute force: each step's cost is the rms^DYNAMIC_POWER by which one DDIM step (the
    sampler itself, on the denoiser itself) from the fine solve at its start misses the fine solve at its end."""
    schedule = DiscreteVP.linear(T=1000)
    denoiser = make_mixture("ring").denoiser(schedule)
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    solution, recorder = fine_solve(denoiser, z, steps=10)
    times = [t for t, _, _ in recorder.trajectory] + [0.0]
    states = [x.reshape(z.shape) for _, x, _ in recorder.trajectory] + [solution]
    assert len(times) == 11 and recorder.kept == 16

    def cost(i, j):
        step = SAMPLERS["ddim"](denoiser, torch.tensor([times[i], times[j]], dtype=torch.float64), states[i])
        return float((step - states[j]).pow(2).mean().sqrt()) ** DYNAMIC_POWER

    for steps in (2, 3, 4):
        paths = [(0, *inner, 10) for inner in itertools.combinations(range(1, 10), steps - 1)]
        best = min(paths, key=lambda path: sum(cost(i, j) for i, j in itertools.pairwise(path)))
        grid = _dynamic(schedule, recorder.trajectory, solution, steps)
        assert grid.tolist() == [times[i] for i in best], steps


def test_calibrated_grid_beats_the_fixed_trig_grid_on_the_ring():
    # the ring's modes sharpen at low noise: the calibration must find that from the pilot alone
    schedule = DiscreteVP.linear(T=1000)
    denoiser = make_mixture("ring").denoiser(schedule)
    cal = calibrate(denoiser, "trig-abm", 10, (2,), pilot=128, dtype=torch.float64)
    times = cal.times
    assert times.shape == (11,) and times[0] == 1.0 and times[-1] == 0.0 and bool((times[1:] < times[:-1]).all())
    # every grid but the dynamic one (which may stop its steps earlier) takes its last step from the smallest time
    assert times[-2] == pytest.approx(smallest_time(schedule), rel=1e-12) or "/dynamic" in cal.chosen
    # 6 grids (2 equidistributed, 3 trig, dynamic) x orders 1, 2 x sigma_data 0.5, 1 on the pilot, after the fine solve
    assert cal.pilot_nfe == FINE_STEPS + 24 * 10 and cal.chosen in cal.pilot_errors and len(cal.pilot_errors) == 24
    assert cal.chosen == choose(cal.pilot_errors, cal.pilot_distances)
    assert cal.options["order"] in (1, 2) and cal.options["sigma_data"] in (cal.data_scale / 2, cal.data_scale)
    gmm = make_mixture("ring")  # the data scale is the rms of the pilot's ODE solution: the data's, up to sampling
    exact_scale = math.sqrt(float((gmm.weights * (gmm.means.pow(2).sum(1) + gmm.covs.diagonal(dim1=1, dim2=2)
                                                  .sum(1))).sum()) / 2)
    assert cal.data_scale == pytest.approx(exact_scale, rel=0.05)

    x_T = torch.randn(1000, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)  # not the pilot's
    exact = deepgm.sample(denoiser, x_T=x_T, sampler="rk45", steps=2, rtol=1e-8, atol=1e-8, dtype=torch.float64).x

    def rms(grid_times, **options):
        x = deepgm.sample(denoiser, x_T=x_T, sampler="trig-abm", times=grid_times, dtype=torch.float64, **options).x
        return float((x - exact).pow(2).mean().sqrt())

    assert rms(times, **cal.options) < 0.6 * rms(make_grid("trig", schedule, 10))


def test_calibration_finds_the_data_scale_at_which_trig_abm_is_nearly_exact():
    """For data N(0, s^2 I) trig-abm with sigma_data = s is exact in any number of steps (its F vanishes). The
    pilot estimates s from its own ODE solution (to a few %, from 64 x 3 numbers) and must take sigma_data near it,
    far closer to the ODE than the old fixed sigma_data = 1; the user's own sigma_data must be kept."""
    schedule = DiscreteVP.linear(T=1000)
    for std in (0.5, 3.0):
        gaussian = GaussianMixture(torch.ones(1), torch.zeros(1, 3), std**2 * torch.eye(3)[None])
        denoiser = gaussian.denoiser(schedule)
        cal = calibrate(denoiser, "trig-abm", 5, (3,), pilot=64, dtype=torch.float64)
        assert cal.data_scale == pytest.approx(std, rel=0.15)
        assert cal.options["sigma_data"] == cal.data_scale, cal.pilot_errors
        fixed = calibrate(denoiser, "trig-abm", 5, (3,), pilot=64, dtype=torch.float64, sigma_data=1.0)
        assert "sigma_data" not in fixed.options and len(fixed.pilot_errors) == 12
        assert cal.pilot_errors[cal.chosen] < 0.1 * fixed.pilot_errors[fixed.chosen]


def test_the_exponential_integrators_are_calibrated_against_their_own_grids_too():
    schedule = DiscreteVP.linear(T=1000)
    denoiser = make_mixture("ring").denoiser(schedule)
    for sampler in ("deis", "dpmpp-2m"):
        cal = calibrate(denoiser, sampler, 6, (2,), pilot=32, dtype=torch.float64)
        assert {f"{sampler}/{grid}" for grid in ("log-snr", "karras", "trig(1)", "equidistributed(0.5)", "dynamic")
                } <= set(cal.pilot_errors)
        assert len(cal.pilot_errors) == 8 and cal.pilot_nfe == FINE_STEPS + 8 * 6 and cal.options == {}
        assert cal.chosen == choose(cal.pilot_errors, cal.pilot_distances)


def test_sample_calibrates_once_per_denoiser_and_settings_and_counts_the_pilot_apart():
    schedule = DiscreteVP.linear(T=1000)
    denoiser = make_mixture("ring").denoiser(schedule)
    first = deepgm.sample(denoiser, shape=(16, 2), steps=6, dtype=torch.float64)  # the default: auto, calibrated
    assert first.nfe == 6 and first.calibration is not None and first.calibration.pilot_nfe > 0
    again = deepgm.sample(denoiser, shape=(16, 2), steps=6, dtype=torch.float64)
    assert again.calibration.pilot_nfe == 0 and torch.equal(again.times, first.times)
    other = deepgm.sample(denoiser, shape=(16, 2), steps=6, sampler="dpmpp-2m", grid=CALIBRATED, dtype=torch.float64)
    assert other.calibration.pilot_nfe > 0  # a different sampler is calibrated for itself
    fixed = deepgm.sample(denoiser, shape=(16, 2), steps=6, sampler="trig-abm", grid="trig", dtype=torch.float64)
    assert fixed.calibration is None
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    by_hand = deepgm.sample(denoiser, x_T=x_T, sampler=first.calibration.sampler, times=first.times,
                            **first.calibration.options).x
    assert torch.equal(deepgm.sample(denoiser, x_T=x_T, steps=6).x, by_hand)  # the winning sampler and order
    many = deepgm.sample(denoiser, shape=(16, 2), steps=30, dtype=torch.float64)  # past MOST_STEPS: no pilot
    assert many.calibration.pilot_nfe == 0 and torch.equal(many.times, trig(schedule, 30))
    assert many.calibration.sampler == AUTO_SAMPLERS[0]


def test_auto_chooses_the_sampler_closest_to_the_ode_on_the_pilot():
    """sampler='auto' tries every AUTO_SAMPLERS entry on its own candidates after one fine solve and keeps the
    overall best: its pilot errors are exactly those of each sampler calibrated alone."""
    schedule = DiscreteVP.linear(T=1000)
    denoiser = make_mixture("ring").denoiser(schedule)
    auto = calibrate(denoiser, "auto", 6, (2,), pilot=32, dtype=torch.float64)
    alone, distances = {}, {}
    for sampler in AUTO_SAMPLERS:
        cal = calibrate(denoiser, sampler, 6, (2,), pilot=32, dtype=torch.float64)
        alone.update(cal.pilot_errors)
        distances.update(cal.pilot_distances)
    assert auto.pilot_errors == alone and auto.pilot_distances == distances
    assert auto.pilot_nfe == FINE_STEPS + (24 + 8 + 8 + 8) * 6
    assert auto.chosen == choose(alone, distances) and auto.chosen.startswith(auto.sampler + "/")


def test_the_pilot_judges_each_candidate_by_its_rms_and_its_distributions_distance_to_the_fine_solution():
    """Each candidate's Fréchet distance to the fine solution is that of its own samples, and the choice adds the two
    ratios to the best: a candidate close sample by sample but with the wrong spread loses to one that is slightly
    farther and right in distribution, which rms alone would not see."""
    schedule = DiscreteVP.linear(T=1000)
    denoiser = make_mixture("ring").denoiser(schedule)
    cal = calibrate(denoiser, "deis", 6, (2,), pilot=64, dtype=torch.float64)
    assert set(cal.pilot_distances) == set(cal.pilot_errors)
    generator = torch.Generator().manual_seed(0)
    z = start_std(schedule, 1.0) * torch.randn((64, 2), generator=generator, dtype=torch.float64)  # the pilot's
    solution, _ = fine_solve(denoiser, z)
    x = SAMPLERS["deis"](denoiser, make_grid("karras", schedule, 6), z, generator=generator)
    assert cal.pilot_distances["deis/karras"] == pytest.approx(fid_of_samples(x, solution), rel=1e-9)
    assert cal.pilot_errors["deis/karras"] == pytest.approx(float((x - solution).pow(2).mean().sqrt()), rel=1e-9)
    errors, distances = {"near": 1.0, "spread right": 1.2, "far": 3.0}, {"near": 10.0, "spread right": 1.0, "far": 1.0}
    assert choose(errors, distances) == "spread right"
    assert choose({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 1.0}) == "a"  # equal in distribution: the closer one
    assert choose({"a": 1.0, "b": 1.0}, {"a": 0.0, "b": 0.0}) == "a"  # both exact: the first tried


def test_auto_picks_trig_abm_where_it_is_exact_and_dpm_solver_for_narrow_offset_data():
    """For data N(0, 0.5^2 I), trig-abm with sigma_data near 0.5 is nearly exact, and auto must pick it. For narrow
    data away from 0, N(2, 0.05^2 I), the data prediction DPM-Solver++ integrates is nearly constant, while trig-abm's
    F (zero only for data centred at 0) and DEIS's eps are not: DPM-Solver++ is 3-20x closer to the ODE."""
    schedule = DiscreteVP.linear(T=1000)
    centred = GaussianMixture(torch.ones(1), torch.zeros(1, 3), 0.25 * torch.eye(3)[None])
    exact = calibrate(centred.denoiser(schedule), "auto", 5, (3,), pilot=32, dtype=torch.float64)
    assert exact.sampler == "trig-abm" and exact.options["sigma_data"] == exact.data_scale
    narrow = GaussianMixture(torch.ones(1), 2 * torch.ones(1, 3), 0.05**2 * torch.eye(3)[None])
    other = calibrate(narrow.denoiser(schedule), "auto", 8, (3,), pilot=32, dtype=torch.float64)
    assert other.sampler == "dpmpp-2m", other.pilot_errors


def test_a_model_trained_further_is_calibrated_afresh():
    schedule = DiscreteVP.linear(T=1000)
    net = torch.nn.Linear(3, 2).double()  # input: x and the time feature
    denoiser = Denoiser.from_fn(lambda x, t: net(torch.cat([x, t[:, None].to(x.dtype)], 1)), schedule, "x0")
    denoiser.add_module("trainable", net)  # so that denoiser.parameters() sees the weights
    kwargs = dict(shape=(8, 2), steps=4, dtype=torch.float64)
    assert deepgm.sample(denoiser, **kwargs).calibration.pilot_nfe > 0
    assert deepgm.sample(denoiser, **kwargs).calibration.pilot_nfe == 0
    with torch.no_grad():
        net.weight.mul_(0.5)  # what an optimiser step does: an in-place update
    assert deepgm.sample(denoiser, **kwargs).calibration.pilot_nfe > 0


def test_conditioning_is_cycled_over_the_pilot_batch():
    schedule = DiscreteVP.linear(T=1000)
    rings = [make_mixture("ring"), make_mixture("grid")]

    def posterior_mean(x, t, y):
        alpha, sigma = (float(v) for v in schedule.alpha_sigma(t[0]))
        means = [g.posterior_mean(x, alpha, sigma) for g in rings]
        return torch.where(y[:, None] == 0, means[0], means[1]).to(x.dtype)

    denoiser = Denoiser.from_fn(posterior_mean, schedule, parameterization="x0")
    y = torch.tensor([0, 1, 1])  # fewer labels than pilot samples
    cal = calibrate(denoiser, "trig-abm", 5, (2,), pilot=8, cond={"y": y}, dtype=torch.float64)
    assert cal.times.shape == (6,) and all(math.isfinite(e) for e in cal.pilot_errors.values())


def test_bad_calibration_requests_are_value_errors():
    schedule = DiscreteVP.linear(T=1000)
    denoiser = make_mixture("ring").denoiser(schedule)
    with pytest.raises(ValueError, match="made from the model"):
        make_grid(CALIBRATED, schedule, 10)
    with pytest.raises(ValueError, match="ODE samplers"):
        deepgm.sample(denoiser, shape=(4, 2), sampler="euler-maruyama", grid=CALIBRATED, steps=5)
    with pytest.raises(ValueError, match="pilot"):
        calibrate(denoiser, "trig-abm", 5, (2,), pilot=1)
    with pytest.raises(ValueError, match="fine_steps"):
        calibrate(denoiser, "trig-abm", 20, (2,), fine_steps=30)
    with pytest.raises(ValueError, match="name the sampler"):
        calibrate(denoiser, "auto", 5, (2,), order=2)
    broken = Denoiser.from_fn(lambda x, t: torch.full_like(x, math.nan), schedule, parameterization="x0")
    with pytest.raises(ValueError, match="degenerate"):
        calibrate(broken, "trig-abm", 5, (2,), pilot=4)
    for bad in ({"order": 2}, {"grid": "karras"}, {"times": trig(schedule, 5)}):
        with pytest.raises(ValueError, match="name the sampler"):
            deepgm.sample(denoiser, shape=(4, 2), sampler="auto", steps=5, **bad)
