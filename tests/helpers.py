"""Exact denoisers the tests share beyond `deepgm.data.toy.GaussianMixture.denoiser` (imported as `from helpers
import ...`: pytest puts this directory on sys.path, as for tiny_models)."""

from deepgm.diffusion.denoiser import Denoiser


def gaussian_denoiser(schedule, mean: float, var: float) -> Denoiser:
    """The exact E[x0 | x_t] of data N(mean, var I) under any schedule, in closed form with a time per example:
    mean + alpha var / (alpha^2 var + sigma^2) (x_t - alpha mean). GaussianMixture.denoiser takes one time per
    call (t[0]), as samplers and ODE solvers ask; losses and bounds (VLB, weighted losses) draw a time per example."""

    def posterior_mean(x, t):
        alpha, sigma = (v.to(x.dtype)[:, None] for v in schedule.alpha_sigma(t.double()))
        return mean + alpha * var / (alpha**2 * var + sigma**2) * (x - alpha * mean)

    return Denoiser.from_fn(posterior_mean, schedule, "x0")
