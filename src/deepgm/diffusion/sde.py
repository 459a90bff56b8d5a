"""Continuous-time schedules: VP, sub-VP and VE SDEs (Song et al. 2021), EDM's sigma (Karras et al. 2022),
a truncated cosine, and a learned monotone log-SNR schedule (Kingma et al. 2021, VDM).

Each is one `Schedule`: alpha_t and sigma_t of q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) for t in (0, 1],
with closed-form log-SNR, SDE coefficients and inverse `t_from_log_snr` where they exist. The reverse SDE
and the probability-flow ODE follow from `sde()` and a denoiser's score (see `drift`).

One time axis: t = 0 is the data exactly (alpha = 1, sigma = 0), also for schedules whose smallest noise
level sigma_min is positive; such a schedule jumps from sigma_min at t_min to 0 at t = 0. Training times,
sampler grids and likelihood integrals use the positive range [t_min, 1].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deepgm.diffusion.schedules import Schedule


def _f64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


class ContinuousSchedule(Schedule):
    """A schedule defined for every t in (0, 1]; subclasses give `_alpha_sigma` there, t = 0 maps to the data."""

    T = None
    t_min: float = 1e-5

    def _alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = _f64(t)
        at_data = t == 0
        # the formula is evaluated away from 0 so that no inf/NaN reaches autograd through torch.where
        alpha, sigma = self._alpha_sigma(torch.where(at_data, torch.full_like(t, self.t_min), t))
        return torch.where(at_data, torch.ones_like(alpha), alpha), torch.where(at_data, torch.zeros_like(sigma), sigma)

    def sample_t(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Training times uniform on [t_min, 1]."""
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return 1.0 - u * (1.0 - self.t_min)

    def time_grid(self, steps: int) -> torch.Tensor:
        """`steps` times uniform on [t_min, 1], decreasing, then exactly 0 (the final denoising jump)."""
        from deepgm.diffusion.grids import uniform

        return uniform(self, steps)

    def log_snr_slope(self, t: torch.Tensor) -> torch.Tensor:
        """d lambda / dt, by autograd unless a subclass has the closed form."""
        t = _f64(t).detach().requires_grad_(True)
        with torch.enable_grad():
            lam = self.log_snr(t)
            return torch.autograd.grad(lam.sum(), t)[0]


class VPSDE(ContinuousSchedule):
    """Variance-preserving SDE dx = -beta(t)/2 x dt + sqrt(beta(t)) dW, beta linear (Song et al. 2021, eq. 11).

    alpha_t = exp(-B(t)/2) with B(t) = int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2,
    sigma_t^2 = 1 - alpha_t^2.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-5):
        if not 0 < beta_min <= beta_max:
            raise ValueError(f"need 0 < beta_min <= beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max, self.t_min = float(beta_min), float(beta_max), float(t_min)

    def _integral(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2  # B(t)

    def _beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + (self.beta_max - self.beta_min) * t

    def _alpha_sigma(self, t):
        b = self._integral(t)
        return torch.exp(-0.5 * b), torch.sqrt(-torch.expm1(-b))

    def log_snr(self, t):
        b = self._integral(_f64(t))
        return -b - torch.log(-torch.expm1(-b))  # log(alpha^2 / (1 - alpha^2))

    def log_snr_slope(self, t):
        t = _f64(t)
        b = self._integral(t)
        return -self._beta(t) / -torch.expm1(-b)  # d/dt [-log(e^B - 1)] = -beta e^B / (e^B - 1)

    def sde(self, t):
        beta = self._beta(_f64(t))
        return -0.5 * beta, beta

    def _t_from_integral(self, b: torch.Tensor) -> torch.Tensor:
        """Invert B(t) = b for t (the positive root of a quadratic; linear when beta is constant)."""
        d = self.beta_max - self.beta_min
        if d == 0:
            return b / self.beta_min
        return 2 * b / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * b))  # stable root

    def t_from_log_snr(self, lam):
        # alpha^2 = sigmoid(lam) = exp(-B)  =>  B = softplus(-lam)
        return self._t_from_integral(torch.nn.functional.softplus(-_f64(lam)))

    def __repr__(self):
        return f"VPSDE(beta_min={self.beta_min}, beta_max={self.beta_max}, t_min={self.t_min})"


class SubVPSDE(VPSDE):
    """Sub-VP SDE dx = -beta/2 x dt + sqrt(beta (1 - e^{-2B(t)})) dW (Song et al. 2021, eq. 29).

    Same mean as VP, alpha_t = exp(-B/2), but sigma_t = 1 - exp(-B): the std, not the variance, is 1 - alpha^2.
    """

    def _alpha_sigma(self, t):
        b = self._integral(t)
        return torch.exp(-0.5 * b), -torch.expm1(-b)

    def log_snr(self, t):
        b = self._integral(_f64(t))
        return -b - 2 * torch.log(-torch.expm1(-b))

    def log_snr_slope(self, t):
        t = _f64(t)
        b = self._integral(t)
        return -self._beta(t) * (1 + 2 * torch.exp(-b) / -torch.expm1(-b))

    def sde(self, t):
        t = _f64(t)
        beta = self._beta(t)
        return -0.5 * beta, beta * -torch.expm1(-2 * self._integral(t))

    def t_from_log_snr(self, lam):
        # with v = exp(-B/2): v / (1 - v^2) = s := exp(lam/2), so s v^2 + v - s = 0,
        # v = 2s / (1 + sqrt(1 + 4 s^2)) = 1 / (1 + w), w = (1 + 1/(sqrt(1 + 4s^2) + 2s)) / (2s)
        s = torch.exp(0.5 * _f64(lam))
        w = (1 + 1 / (torch.sqrt(1 + 4 * s**2) + 2 * s)) / (2 * s)
        return self._t_from_integral(2 * torch.log1p(w))

    def __repr__(self):
        return f"SubVPSDE(beta_min={self.beta_min}, beta_max={self.beta_max}, t_min={self.t_min})"


class VESDE(ContinuousSchedule):
    """Variance-exploding SDE dx = sqrt(d sigma^2/dt) dW, sigma_t = sigma_min (sigma_max/sigma_min)^t
    (Song et al. 2021, eq. 9 and 30); alpha = 1. At t = 0 exactly sigma jumps to 0 (the data)."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max, self.t_min = float(sigma_min), float(sigma_max), float(t_min)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def _alpha_sigma(self, t):
        return torch.ones_like(t), self.sigma_min * torch.exp(t * self._log_ratio)

    def log_snr(self, t):
        t = _f64(t)
        lam = -2 * (math.log(self.sigma_min) + t * self._log_ratio)
        return torch.where(t == 0, torch.full_like(lam, math.inf), lam)

    def log_snr_slope(self, t):
        return torch.full_like(_f64(t), -2 * self._log_ratio)

    def sde(self, t):
        _, sigma = self._alpha_sigma(_f64(t))
        return torch.zeros_like(sigma), 2 * self._log_ratio * sigma**2

    def t_from_log_snr(self, lam):
        return (-0.5 * _f64(lam) - math.log(self.sigma_min)) / self._log_ratio

    def __repr__(self):
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, t_min={self.t_min})"


class EDMSchedule(ContinuousSchedule):
    """EDM's sigma on one time axis (Karras et al. 2022, eq. 5 and Table 1): alpha = 1 and
    sigma(t) = (sigma_max^(1/rho) + (1 - u)(sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, u = (t - t_min)/(1 - t_min),
    so sigma(t_min) = sigma_min, sigma(1) = sigma_max and a uniform grid on [t_min, 1] is Karras' grid."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, t_min: float = 1e-5):
        if not 0 < sigma_min < sigma_max or rho <= 0:
            raise ValueError(f"need 0 < sigma_min < sigma_max and rho > 0, got {sigma_min}, {sigma_max}, {rho}")
        self.sigma_min, self.sigma_max, self.rho, self.t_min = float(sigma_min), float(sigma_max), float(rho), t_min
        self._a, self._b = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)

    def _root(self, t):
        u = (t - self.t_min) / (1 - self.t_min)
        return self._a + u * (self._b - self._a)  # sigma^(1/rho), linear in t

    def _alpha_sigma(self, t):
        return torch.ones_like(t), self._root(t) ** self.rho

    def log_snr(self, t):
        t = _f64(t)
        lam = -2 * self.rho * torch.log(self._root(torch.where(t == 0, torch.full_like(t, self.t_min), t)))
        return torch.where(t == 0, torch.full_like(lam, math.inf), lam)

    def log_snr_slope(self, t):
        t = _f64(t)
        return -2 * self.rho * (self._b - self._a) / (1 - self.t_min) / self._root(t)

    def sde(self, t):
        t = _f64(t)
        sigma = self._root(t) ** self.rho
        dsigma = self.rho * self._root(t) ** (self.rho - 1) * (self._b - self._a) / (1 - self.t_min)
        return torch.zeros_like(t), 2 * sigma * dsigma  # g^2 = d sigma^2 / dt (Karras et al. eq. 4 with s = 1)

    def t_from_log_snr(self, lam):
        root = torch.exp(-0.5 * _f64(lam) / self.rho)
        return self.t_min + (1 - self.t_min) * (root - self._a) / (self._b - self._a)

    def __repr__(self):
        return f"EDMSchedule(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, rho={self.rho})"


class CosineVP(ContinuousSchedule):
    """The cosine schedule in continuous time, alpha = cos(theta t), sigma = sin(theta t) (Nichol & Dhariwal 2021
    with s = 0), i.e. lambda(t) = -2 log tan(theta t), with theta = arctan(exp(-logsnr_min / 2)) so that
    lambda(1) = logsnr_min is finite."""

    def __init__(self, logsnr_min: float = -10.0, t_min: float = 1e-3):
        self.logsnr_min, self.t_min = float(logsnr_min), float(t_min)
        self.theta = math.atan(math.exp(-0.5 * self.logsnr_min))

    def _alpha_sigma(self, t):
        return torch.cos(self.theta * t), torch.sin(self.theta * t)

    def log_snr(self, t):
        return -2 * torch.log(torch.tan(self.theta * _f64(t)))

    def log_snr_slope(self, t):
        return -2 * self.theta / (torch.sin(self.theta * _f64(t)) * torch.cos(self.theta * _f64(t)))

    def sde(self, t):
        t = _f64(t)
        f = -self.theta * torch.tan(self.theta * t)  # d log cos(theta t) / dt
        return f, 2 * self.theta * torch.tan(self.theta * t)  # d sin^2/dt - 2 f sin^2 = 2 theta tan

    def t_from_log_snr(self, lam):
        return torch.atan(torch.exp(-0.5 * _f64(lam))) / self.theta

    def __repr__(self):
        return f"CosineVP(logsnr_min={self.logsnr_min}, t_min={self.t_min})"


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `box.scale`, filled in after the forward pass."""

    @staticmethod
    def forward(ctx, x, box):
        ctx.box = box
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        scale = ctx.box.scale
        if scale is None:
            raise RuntimeError("variance gradient: the per-example loss was never set on the box")
        return grad * scale.to(grad), None


class VarianceGradient:
    """Per-example scales 2 L_i that turn d sum_i L_i / d eta into d sum_i L_i^2 / d eta (VDM appendix I.2)."""

    def __init__(self, n: int):
        self.n = n
        self.scale: torch.Tensor | None = None

    def set_loss(self, per_example: torch.Tensor) -> None:
        self.scale = 2 * per_example.detach().double()


class LearnedSchedule(nn.Module, ContinuousSchedule):
    """A learned variance-preserving schedule (Kingma et al. 2021, sec. 3.4 and appendix H):
    lambda(t) = lambda_max - (lambda_max - lambda_min) s(u), u = (t - t_min)/(1 - t_min), with learned endpoints
    and a monotone shape s(u) = (h(u) - h(0)) / (h(1) - h(0)), h a monotone network with positive weights.

    alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda). The network is conditioned on the normalised
    log-SNR (`net_time`), as in VDM, so the continuous ELBO depends on the shape only through its variance:
    with `variance_gradient` the shape's parameters follow the gradient of the loss' second moment and the
    endpoints the ELBO's.
    """

    def __init__(self, logsnr_min: float = -10.0, logsnr_max: float = 13.0, t_min: float = 1e-5,
                 features: int = 1024, minimize_variance: bool = True, endpoint_scale: float = 1.0):
        nn.Module.__init__(self)
        if not logsnr_min < logsnr_max:
            raise ValueError(f"need logsnr_min < logsnr_max, got {logsnr_min}, {logsnr_max}")
        self.t_min = float(t_min)
        self.minimize_variance = minimize_variance  # the ELBO loss then gives the shape the variance gradient
        # the endpoints are stored divided by endpoint_scale, so an optimiser step moves them endpoint_scale times
        # further (Adam's steps are ~lr in parameter units): a learning-rate multiplier for two scalars
        self.endpoint_scale = float(endpoint_scale)
        self.lam_min = nn.Parameter(torch.tensor(float(logsnr_min) / self.endpoint_scale))
        self.lam_max = nn.Parameter(torch.tensor(float(logsnr_max) / self.endpoint_scale))
        self.ref = (float(logsnr_min), float(logsnr_max))  # fixed: the range net_time normalises by
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.tensor(1.0))  # linear part of h
        self.w2 = nn.Parameter(torch.randn(features, generator=g))
        self.b2 = nn.Parameter(torch.randn(features, generator=g))
        self.w3 = nn.Parameter(0.05 * torch.randn(features, generator=g))  # near-linear in lambda at init, as VDM
        self.features = features
        self._box: VarianceGradient | None = None

    def _h(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h(u) and h'(u), float64, for u of any shape:
        h = |w1| u + mean_k |w3_k| (2 sigmoid(|w2_k| (2u - 1) + b2_k) - 1), VDM's monotone network."""
        w1, w2, b2, w3 = (p.double() for p in (self.w1, self.w2, self.b2, self.w3))
        z = torch.sigmoid(w2.abs() * (2 * u[..., None] - 1) + b2)  # (..., features)
        h = w1.abs() * u + ((2 * z - 1) * w3.abs()).mean(-1)
        dh = w1.abs() + (4 * z * (1 - z) * w2.abs() * w3.abs()).mean(-1)
        return h, dh

    def shape(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """s(t) in [0, 1] on [t_min, 1] (0 at t_min, 1 at t = 1) and ds/dt."""
        t = _f64(t).to(self.w1.device)
        u = (t - self.t_min) / (1 - self.t_min)
        h, dh = self._h(u)
        ends, _ = self._h(torch.tensor([0.0, 1.0], dtype=torch.float64, device=t.device))
        span = ends[1] - ends[0]
        s, ds = (h - ends[0]) / span, dh / span / (1 - self.t_min)
        box = self._box
        if box is not None and s.shape == (box.n,):
            s, ds = _ScaleGrad.apply(s, box), _ScaleGrad.apply(ds, box)
        return s, ds

    def endpoints(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lambda(1), lambda(t_min)), float64, differentiable."""
        return self.lam_min.double() * self.endpoint_scale, self.lam_max.double() * self.endpoint_scale

    def log_snr(self, t):
        t = _f64(t).to(self.w1.device)
        s, _ = self.shape(torch.where(t == 0, torch.full_like(t, self.t_min), t))
        lo, hi = self.endpoints()
        lam = hi - (hi - lo) * s
        return torch.where(t == 0, torch.full_like(lam, math.inf), lam)

    def log_snr_slope(self, t):
        _, ds = self.shape(t)
        lo, hi = self.endpoints()
        return -(hi - lo) * ds

    def _alpha_sigma(self, t):
        lam = self.log_snr(t)
        return torch.sqrt(torch.sigmoid(lam)), torch.sqrt(torch.sigmoid(-lam))

    def prior_std(self) -> float:
        """1: the schedule is variance-preserving."""
        return 1.0

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """VDM's conditioning: (lambda_ref_max - lambda(t)) / (lambda_ref_max - lambda_ref_min), near [0, 1]."""
        lo, hi = self.ref
        return (hi - self.log_snr(t)) / (hi - lo)

    def variance_gradient(self, n: int) -> VarianceGradient:
        """Start a step in which the shape gets the variance gradient; call `box.set_loss` before backward."""
        self._box = VarianceGradient(n)
        return self._box

    def end_variance_gradient(self) -> None:
        self._box = None

    def __repr__(self):
        lo, hi = (v.item() for v in self.endpoints())
        return (f"LearnedSchedule(lambda in [{lo:.3g}, {hi:.3g}], "
                f"t_min={self.t_min})")


def drift(schedule: Schedule, denoiser, x: torch.Tensor, t: torch.Tensor, probability_flow: bool, cond=None):
    """Reverse-time drift of the SDE or the probability-flow ODE at (x, t) (Song et al. 2021, eq. 6 and 13):
    f x - g^2 score (reverse SDE) or f x - g^2 score / 2 (ODE), with score = -eps_hat / sigma. Returns (drift, g^2)."""
    f, g2 = schedule.sde(t)
    _, sigma = schedule.alpha_sigma(t)
    eps = denoiser(x, t, **(cond or {})).eps
    shape = (-1, *([1] * (x.dim() - 1))) if torch.as_tensor(t).dim() else ()
    f, g2, sigma = (torch.as_tensor(v).to(x).reshape(shape) for v in (f, g2, sigma))
    coef = 0.5 if probability_flow else 1.0
    return f * x + coef * g2 * eps / sigma, g2
