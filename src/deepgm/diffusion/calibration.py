"""A time grid calibrated to one model, from a pilot solve of its probability-flow ODE.

Where a few-step sampler should spend its steps depends on the data: a 2-D ring of tight modes needs them at
low noise, where the fine structure appears; a 64-D mixture needs them at high noise, where each sample settles
on a mode. No fixed grid serves both (benchmarks/sampler_accuracy.py), so `calibrate`:

1. solves the ODE finely for a pilot batch (trig-abm, order 3, `fine_steps` steps uniform in log-SNR), recording
   the network output in TrigFlow variables, F(theta) with theta = arctan(sigma/alpha), along the way;
2. builds grids that equidistribute the local error: step density proportional to rms|F''(theta)|^p for
   p = 0.5 and 0.7 (the second derivative by divided differences, its rms over the pilot batch; a density
   floor of 5% of the mean keeps quiet stretches from getting no step at all), and a dynamic grid: the path of
   `steps` steps through the fine solve's own times whose DDIM steps, each from the fine solution at its start,
   miss it least at their ends (least sum of rms^5, by dynamic programming: `_dynamic`);
3. runs the requested sampler on the pilot batch over those grids, over the trig grids of scale 0.5, 1 and 2,
   and, except for trig-abm, over the log-snr and Karras grids that DEIS and DPM-Solver were designed on
   (trig-abm instead with each of its option CANDIDATES), and keeps the one closest to the fine solution by
   `choose`: its rms (sample by sample) and its Fréchet distance (between the two sets of pilot samples, paired by
   their noise), each as a ratio to the least over the candidates, added. Given several samplers
   (`deepgm.sample`'s default, sampler="auto"), it does this for each after the one fine solve and keeps the
   overall best: which sampler is best depends on the model too (trig-abm on the benchmark's exact mixture
   denoisers, DEIS on trained digits networks).

Why both distances: at 6 steps on ill-conditioned full-covariance mixtures the candidate closest sample by sample
is not the one closest in distribution. On three synthetic such mixtures (development problems,
benchmarks/pilot_criterion.py) rms alone picked candidates with 1.4-2.1x the best candidate's FD to the data; FD
alone fixed that but gave up to 26% of sliced W2 where rms had picked the best; the sum is within 1.25x of the best
FD and 1.10x of the best SW2 in every case there, and picks what rms picked on the benchmark's ring and 64-D
mixture. The FD's D x D matrix root grows as D^3 (D = 3,072 for a 32x32 RGB image), so it is computed from the
N x N cross-Gram matrix instead (deepgm.eval.metrics.fid_of_samples).

Why the dynamic grid: the equidistributed grids place steps by the curvature of the network output, an asymptotic
rule; at 6 steps the error is no longer local. The dynamic grid measures each possible step's error on the pilot
directly, at no extra network evaluation (every step starts from a point of the fine solve, whose outputs are
kept). The idea and the dynamic programme are GITS's (Chen et al. 2024, "On the trajectory regularity of ODE-based
diffusion sampling"); GITS sums the steps' errors, which on the synthetic development mixtures left the low-noise
end to one long final jump; the sum of their 5th powers evens them out. There, at NFE 6, trig-abm on it came to
0.19-0.25x the FD of the candidate chosen before it existed (benchmarks/results/pilot_criterion.md; FD 0.011 against
0.058 at 32-D, 0.018 against 0.072 at 48-D), and the pilot keeps the old pick where it is not better (16-D).

The fine solve is the target every candidate is judged by, so it must be far closer to the ODE's solution than any
candidate. Until 2026-12-07 it took 100 steps uniform in theta: exact to 1e-5 on the benchmark's mixtures, but on a
trained 2-D MLP (the grid MLP of benchmarks/sampler_heldout.py) 0.076 rms from its converged ODE, worse than the
candidates at 10-20 steps, because a learned denoiser bends sharply at low noise, where that grid is sparse and
sent a few samples to another mode; the pilot then favoured the candidates that erred like it. Uniform in log-SNR,
200 steps: 1.8e-3 there, 9e-6 and 4e-6 on the 64-D mixture and the 2-D ring.
The pilot costs `fine_steps + 8 * steps` (trig-abm: `fine_steps + 24 * steps`; auto: `fine_steps + 48 * steps`)
batched network evaluations on `pilot` samples, once per model and settings (`deepgm.sample` caches the result
on the denoiser); above MOST_STEPS steps there is no pilot and the grid is trig. The powers were chosen on the
benchmark's mixtures: 1/3, the asymptotic optimum for a 2nd-order method, puts too few steps where the 2-D ring's
modes sharpen.
The order candidates come from a trained digits network (benchmarks/digits_grids.py), which at 6 steps is
twice as far from its ODE solution at order 2 as at order 1, unlike an exact denoiser. The pilot cannot see
rare events: in 64-D a few samples in a thousand sit near the boundary between two modes, and a coarse grid
sends them to the other mode; those dominate the rms there, so which grid is best at NFE >= 10 is partly
luck of the draw (benchmarks/results/sampler_accuracy.md).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

from deepgm.diffusion.denoiser import from_x0_eps
from deepgm.diffusion.grids import from_scaled_noise, make_grid, scaled_noise, smallest_time, start_std, trig
from deepgm.diffusion.samplers import SAMPLERS
from deepgm.eval.metrics import fid_of_samples

CANDIDATE_SCALES = (0.5, 1.0, 2.0)  # trig grids that the equidistributed grid must beat on the pilot batch
# The dynamic grid's cost per step is its local rms error to this power: as the power grows the path evens out the
# local errors rather than their sum. On the synthetic 32-D development mixture (benchmarks/pilot_criterion.py) at
# NFE 6 the sum (power 1, GITS's) left the low-noise end to one long final jump: FD 1.25-5.7x (by sampler) that of
# the candidate chosen before; powers 3, 5 and 8 gave nearly the same grids, 5 the best (FD 0.6x with UniPC).
# TRAJECTORY_NUMBERS caps what the fine solve keeps for it (its first samples' states and x0 predictions at every
# time): 2^23 numbers each, 64 MB each in float64.
DYNAMIC_POWER, TRAJECTORY_NUMBERS = 5.0, 2**23
DENSITY_POWERS, DENSITY_FLOOR = (0.5, 0.7), 0.05
# Per sampler, beyond those: the fixed grids tried, and the sampler options tried with each grid (those the caller
# does not fix). DEIS and DPM-Solver were designed on log-snr and Karras grids; trig-abm on trig grids (on log-snr
# it blows up at NFE 6). A learned denoiser is less smooth in t than an exact one, and at ~6 steps trig-abm's
# first-order method can win. trig-abm integrates exactly the part of the flow that data N(0, sigma_data^2 I)
# would have, so its sigma_data candidates are multiples of the data's scale (DATA_SCALED), which the pilot
# estimates as the rms of its fine solution, rather than fixed numbers that suit data of one scale only.
# On the 2-D ring (scale 1.42) sigma_data = 1, the old fixed value, pulled samples 2 % inside the ring (its Frechet
# distance twice the ODE's); the scale itself removes that. On the benchmark's 64-D mixture (modes of std
# 0.1-0.6 in a cloud of scale 1.06) half the scale wins: the pilot decides.
CANDIDATES = {"trig-abm": ((), {"order": (1, 2), "sigma_data": (0.5, 1.0)})}  # sigma_data: x the data scale
OTHER_CANDIDATES = (("log-snr", "karras"), {})
DATA_SCALED = ("sigma_data",)  # candidate values that are multiples of the pilot's data scale
# The pilot batch: at least PILOT samples and at least PILOT_NUMBERS numbers (2048 samples in 2-D). In low dimension
# the costly error is a sample sent to the wrong mode, a few in a thousand at a 2-D mixture's mode boundaries, which
# 256 samples do not see. On the trained grid MLP of benchmarks/sampler_heldout.py at NFE 6 the pilot's choice was
# 0.23 rms from the ODE solution with 256 samples, 0.162 with 2048 and 0.158 with 8192 (at four times the cost).
PILOT, PILOT_NUMBERS = 256, 4096
FINE_STEPS = 200  # the fine solve's steps, 10 x MOST_STEPS: see the module notes
MOST_STEPS = 20  # above this every grid is close to converged on the benchmarks, and the pilot would cost most
# sampler="auto": the calibration's pilot chooses among these, each on its own candidate grids and options. On
# the exact mixture denoisers of benchmarks/sampler_accuracy.py trig-abm is the most accurate at NFE 6-20; on
# trained digits networks (benchmarks/digits_grids.py) DEIS or DPM-Solver++ is, and no fixed choice serves both.
# UniPC is the peers' other common default. The first is used, on the trig grid, where no pilot runs (fewer than 3
# or more than MOST_STEPS steps). docs/samplers.md says what the choice costs and when to name a sampler instead.
AUTO, AUTO_SAMPLERS = "auto", ("trig-abm", "deis", "dpmpp-2m", "unipc")


@dataclass
class Calibration:
    """The chosen grid, which candidate it was, every candidate's pilot error, and the pilot's cost."""

    times: torch.Tensor
    chosen: str
    pilot_errors: dict[str, float] = field(default_factory=dict)
    pilot_nfe: int = 0
    pilot: int = 0
    options: dict = field(default_factory=dict)  # sampler options that won with the grid (trig-abm's order)
    sampler: str = ""  # the sampler it is for: the one asked for, or the winner of a choice between several
    data_scale: float = 1.0  # rms of the pilot's fine ODE solution: the data's scale as the model sees it (1: no pilot)
    pilot_distances: dict[str, float] = field(default_factory=dict)  # each candidate's Fréchet distance to it
    candidates: dict[str, tuple] = field(default_factory=dict)  # label: (sampler, times, options) of each one tried


class _Recorder(torch.nn.Module):
    """Passes calls through to the denoiser, keeping the rms second derivative of F over theta as it goes."""

    def __init__(self, denoiser):
        super().__init__()
        self.inner, self.schedule = denoiser, denoiser.schedule
        self.nfe, self.recording = 0, True
        self.points: list[tuple[float, torch.Tensor]] = []  # the last three (theta, F)
        self.curvature: list[tuple[float, float]] = []  # (theta, rms F'') at interior points
        self.trajectory: list[tuple[float, torch.Tensor, torch.Tensor]] = []  # (t, x, x0) of the first few samples
        self.kept = 0  # how many samples the trajectory keeps: set by fine_solve

    def forward(self, x, t, **cond):
        pred = self.inner(x, t, **cond)
        self.nfe += 1
        if not self.recording:
            return pred
        self.trajectory.append((float(t), x[: self.kept].flatten().clone(), pred.x0[: self.kept].flatten().clone()))
        alpha, sigma = self.schedule.alpha_sigma(torch.tensor(float(t), dtype=torch.float64))
        # F: the EDM-preconditioned output with sigma_data = 1, the variable trig-abm integrates by default
        f = from_x0_eps(pred.x0.double(), pred.eps.double(), alpha, sigma, "edm", sigma_data=1.0)
        self.points = (self.points + [(math.atan(float(sigma / alpha)), f)])[-3:]
        if len(self.points) == 3:
            (a, fa), (b, fb), (c, fc) = self.points
            second = 2 * ((fa - fb) / (a - b) - (fb - fc) / (b - c)) / (a - c)
            self.curvature.append((b, float(second.pow(2).mean().sqrt())))
        return pred


def _equidistributed(schedule, curvature: list[tuple[float, float]], theta_top: float, theta_end: float,
                     steps: int, power: float, t_max: float = 1.0) -> torch.Tensor:
    """`steps` times at equal quantiles of the density rms|F''|^p (plus a floor), from t_max to t_min, then 0."""
    theta = torch.tensor([th for th, _ in curvature], dtype=torch.float64)  # decreasing
    density = torch.tensor([g for _, g in curvature], dtype=torch.float64).pow(power)
    density = density + DENSITY_FLOOR * density.mean() + 1e-12
    edges = torch.cat([torch.tensor([theta_top], dtype=torch.float64), (theta[1:] + theta[:-1]) / 2,
                       torch.tensor([theta_end], dtype=torch.float64)])
    mass = torch.cat([density.new_zeros(1), (density * (edges[:-1] - edges[1:])).cumsum(0)])
    mass = mass / mass[-1]
    quantiles = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    cell = (torch.searchsorted(mass, quantiles, right=True) - 1).clamp(0, len(edges) - 2)
    frac = (quantiles - mass[cell]) / (mass[cell + 1] - mass[cell])
    grid_theta = edges[cell] + frac * (edges[cell + 1] - edges[cell])
    return from_scaled_noise(schedule, torch.tan(grid_theta), t_max=t_max)


def _dynamic(schedule, trajectory: list[tuple[float, torch.Tensor, torch.Tensor]], solution: torch.Tensor,
             steps: int, power: float = DYNAMIC_POWER) -> torch.Tensor:
    """The `steps`-step path through the fine solve's times (then 0) whose DDIM steps, each taken from the fine
    solution at its start, land closest to the fine solution at its end: least sum of rms^power over the steps,
    by dynamic programming (GITS, Chen et al. 2024, which sums plain norms; see DYNAMIC_POWER). `solution`: the
    fine solution of the samples the trajectory kept."""
    t = torch.tensor([time for time, _, _ in trajectory] + [0.0], dtype=torch.float64)
    x = torch.stack([v for _, v, _ in trajectory] + [solution.flatten()])
    x, x0 = x.double(), torch.stack([v for _, _, v in trajectory]).double()
    alpha, sigma = schedule.alpha_sigma(t)
    m = len(trajectory)
    # the DDIM step from node i to node j: (sigma_j / sigma_i) x_i + (alpha_j - alpha_i sigma_j / sigma_i) x0_i; its
    # squared error to x_j for every (i, j) at once, from inner products (m x m matrices, not m x m x numbers)
    ratio = sigma[None, :] / sigma[:m, None]
    gain = alpha[None, :] - alpha[:m, None] * ratio
    xx, x0x = x @ x.T, x0 @ x.T
    x0x0, xix0 = x0.pow(2).sum(1)[:, None], (x[:m] * x0).sum(1)[:, None]
    squared = (ratio**2 * xx.diagonal()[:m, None] + gain**2 * x0x0 + xx.diagonal()[None, :]
               + 2 * ratio * gain * xix0 - 2 * ratio * xx[:m] - 2 * gain * x0x)
    cost = (squared.clamp(min=0) / x.shape[1]).sqrt() ** power
    node = torch.arange(m + 1)
    cost = torch.where(node[None, :] > node[:m, None], cost, torch.full_like(cost, math.inf))  # forward steps only
    least = torch.full((m + 1,), math.inf, dtype=torch.float64)
    least[0] = 0.0  # every path starts at the first node (t_max)
    came_from = []
    for _ in range(steps):
        least, previous = (least[:m, None] + cost).min(0)
        came_from.append(previous)
    path = [m]
    for previous in reversed(came_from):
        path.append(int(previous[path[-1]]))
    return t[path[::-1]]


@torch.no_grad()
def fine_solve(denoiser, z: torch.Tensor, cond: dict | None = None, steps: int = FINE_STEPS, t_max: float = 1.0):
    """The pilot's target: the ODE from z (at t_max) by trig-abm, order 3, `steps` steps uniform in log-SNR (see the
    module notes); returns it and the recorder that kept rms F''(theta) along the way (its later calls pass through)."""
    recorder = _Recorder(denoiser)
    recorder.kept = max(1, min(len(z), TRAJECTORY_NUMBERS // (steps * math.prod(z.shape[1:]))))
    times = make_grid("log-snr", denoiser.schedule, steps, t_max=t_max).to(z.device)
    solution = SAMPLERS["trig-abm"](recorder, times, z, cond=cond, order=3)
    recorder.recording = False
    return solution, recorder


def pilot_size(shape: tuple[int, ...]) -> int:
    """The default pilot batch for samples of this shape (see PILOT_NUMBERS)."""
    return max(PILOT, math.ceil(PILOT_NUMBERS / max(1, math.prod(shape))))


def choose(errors: dict[str, float], distances: dict[str, float]) -> str:
    """The candidate with the least rms / (least rms) + FD / (least FD) to the fine solution (see the module notes);
    ties: the first tried."""
    least_error, least_distance = min(errors.values()), min(distances.values())
    score = lambda label: errors[label] / max(least_error, 1e-300) + distances[label] / max(least_distance, 1e-300)
    return min(errors, key=score)


@torch.no_grad()
def calibrate(denoiser, sampler: str, steps: int, shape: tuple[int, ...], pilot: int | None = None,
              fine_steps: int | None = None, seed: int = 0, cond: dict | None = None, device=None,
              dtype=torch.float32, t_max: float = 1.0, **options) -> Calibration:
    """A grid of `steps` steps for `sampler` on this denoiser (see the module notes); shape is one sample's.
    The options of CANDIDATES that the caller does not give are candidates too, and `options` of the result says
    which won. sampler="auto" tries each of AUTO_SAMPLERS on its candidates (after one shared fine solve) and the
    result's `sampler` says which won; it takes no options. `pilot` defaults to pilot_size(shape). Every grid
    starts at t_max (grids.start_time), the pilot from noise of that time's sigma."""
    samplers = AUTO_SAMPLERS if sampler == AUTO else (sampler,)
    if len(samplers) > 1 and options:
        raise ValueError(f"options {sorted(options)} cannot be given to a choice between samplers {list(samplers)}; "
                         "name the sampler to set its options")
    pilot = pilot_size(shape) if pilot is None else pilot
    if pilot < 2:
        raise ValueError(f"pilot must be at least 2 samples, got {pilot}")
    fine_steps = FINE_STEPS if fine_steps is None else fine_steps
    if fine_steps < max(8, 2 * steps):
        raise ValueError(f"fine_steps={fine_steps} is too coarse to calibrate {steps} steps; use >= {2 * steps}")
    schedule = denoiser.schedule
    if not 3 <= steps <= MOST_STEPS:  # nothing to place between the ends / every grid is accurate enough
        return Calibration(trig(schedule, steps, t_max=t_max), "trig", sampler=samplers[0])
    generator = torch.Generator(device=device).manual_seed(seed)
    z = start_std(schedule, t_max) * torch.randn((pilot, *shape), generator=generator, device=device, dtype=dtype)
    if cond:  # cycle the conditioning (e.g. class labels) over the pilot batch
        cond = {k: v[torch.arange(pilot, device=v.device) % len(v)] for k, v in cond.items()}
    solution, recorder = fine_solve(denoiser, z, cond, fine_steps, t_max)
    theta_top, theta_end = torch.atan(scaled_noise(schedule, [t_max, smallest_time(schedule)])).tolist()
    data_scale = float(solution.double().pow(2).mean().sqrt())
    if not data_scale > 0:  # NaN or all zeros: no scale to calibrate to
        raise ValueError(f"the pilot's ODE solution has rms {data_scale}; the denoiser's outputs are degenerate")
    grids = {f"equidistributed({power:g})": _equidistributed(schedule, recorder.curvature, theta_top, theta_end,
                                                             steps, power, t_max) for power in DENSITY_POWERS}
    grids.update({f"trig({scale:g})": trig(schedule, steps, scale=scale, t_max=t_max) for scale in CANDIDATE_SCALES})
    grids["dynamic"] = _dynamic(schedule, recorder.trajectory, solution[: recorder.kept], steps)
    errors, distances, choices = {}, {}, {}
    for name in samplers:
        fixed_grids, sampler_options = CANDIDATES.get(name, OTHER_CANDIDATES)
        tried = {key: tuple(v * data_scale for v in values) if key in DATA_SCALED else values
                 for key, values in sampler_options.items() if key not in options}
        variants = [dict(zip(tried, values, strict=True)) for values in itertools.product(*tried.values())]
        for grid, times in {**grids, **{g: make_grid(g, schedule, steps, t_max=t_max) for g in fixed_grids}}.items():
            for extra in variants:
                label = f"{name}/{grid}" + "".join(
                    f", {key.replace('_', ' ')} {v:.3g}" for key, v in extra.items())
                x = SAMPLERS[name](recorder, times.to(z.device), z, generator=generator, cond=cond, **options, **extra)
                errors[label] = float((x.double() - solution.double()).pow(2).mean().sqrt())
                distances[label] = fid_of_samples(x, solution) if bool(torch.isfinite(x).all()) else math.inf
                choices[label] = (name, times, extra)
    chosen = choose(errors, distances)
    name, times, extra = choices[chosen]
    return Calibration(times, chosen, errors, recorder.nfe, pilot, extra, name, data_scale, distances, choices)

