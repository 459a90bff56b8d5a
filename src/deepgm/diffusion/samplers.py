"""Samplers: plain functions (denoiser, times, x_T, generator) -> x_0 over a decreasing time grid.

`deepgm.diffusion.sampling.sample` runs them (grids, calibration, NFE counting); this module holds only the methods.

Every sampler speaks in alpha/sigma of the denoiser's schedule, so it runs on any schedule, and
takes any grid that ends exactly at t = 0 (where alpha = 1, sigma = 0 and x equals the x0 estimate).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy
import torch

from deepgm.diffusion.denoiser import expand_like
from deepgm.diffusion.schedules import Schedule, posterior, transition

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step index, t, x after the step)


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def ddpm(denoiser, times: torch.Tensor, x: torch.Tensor, generator=None, cond=None, callback: Callback | None = None,
         variance: str = "beta_tilde") -> torch.Tensor:
    """Ancestral sampling x_s ~ p(x_s | x_t) = q(x_s | x_t, x0_hat) (Ho et al. 2020, Algorithm 2).

    variance='beta_tilde' uses the posterior variance, 'beta' the forward-step variance sigma_{t|s}^2
    (the two choices of the DDPM paper, generalised to any sub-sequence of times).
    """
    if variance not in ("beta", "beta_tilde"):
        raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}")
    schedule = denoiser.schedule
    for i, (t, s) in enumerate(zip(times[:-1], times[1:], strict=True)):
        x0 = denoiser(x, t, **(cond or {})).x0
        c_x0, c_xt, var = posterior(schedule, t, s)
        if variance == "beta":
            var = transition(schedule, t, s)[1]
        x = expand_like(c_x0, x) * x0 + expand_like(c_xt, x) * x
        if s > 0:  # the last step returns the mean: no noise is added at the data end
            x = x + expand_like(var.sqrt(), x) * _noise(x, generator)
        if callback:
            callback(i, s, x)
    return x


def ddim(denoiser, times: torch.Tensor, x: torch.Tensor, generator=None, cond=None, callback: Callback | None = None,
         eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021a, eq. 12): deterministic at eta=0, ancestral DDPM (beta_tilde) at eta=1."""
    schedule = denoiser.schedule
    for i, (t, s) in enumerate(zip(times[:-1], times[1:], strict=True)):
        pred = denoiser(x, t, **(cond or {}))
        alpha_s, sigma_s = schedule.alpha_sigma(s)
        c = eta * posterior(schedule, t, s)[2].sqrt()  # std of the fresh noise
        x = expand_like(alpha_s, x) * pred.x0 + expand_like((sigma_s**2 - c**2).clamp(min=0).sqrt(), x) * pred.eps
        if eta > 0 and s > 0:
            x = x + expand_like(c, x) * _noise(x, generator)
        if callback:
            callback(i, s, x)
    return x


def _scaled(schedule: Schedule, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t and the scaled noise level sigma_t / alpha_t (EDM's sigma for the variable x / alpha)."""
    alpha, sigma = schedule.alpha_sigma(t)
    return alpha, sigma / alpha


def euler(denoiser, times: torch.Tensor, x: torch.Tensor, generator=None, cond=None,
          callback: Callback | None = None) -> torch.Tensor:
    """Probability-flow ODE by Euler steps in y = x/alpha over s = sigma/alpha, where dy/ds = eps
    (Karras et al. 2022, eq. 4 with sigma(t) = t, s(t) = 1). One NFE per step; algebraically the
    same update as DDIM at eta = 0 (Song et al. 2021a, eq. 13)."""
    schedule = denoiser.schedule
    for i, (t, s) in enumerate(zip(times[:-1], times[1:], strict=True)):
        (a_t, s_t), (a_s, s_s) = _scaled(schedule, t), _scaled(schedule, s)
        eps = denoiser(x, t, **(cond or {})).eps
        x = expand_like(a_s, x) * (x / expand_like(a_t, x) + expand_like(s_s - s_t, x) * eps)
        if callback:
            callback(i, s, x)
    return x


def heun(denoiser, times: torch.Tensor, x: torch.Tensor, generator=None, cond=None,
         callback: Callback | None = None, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
         s_noise: float = 1.0) -> torch.Tensor:
    """EDM's 2nd-order sampler (Karras et al. 2022, Algorithm 2; k-diffusion's sample_heun) in y = x/alpha over
    s = sigma/alpha: an Euler predictor and the trapezoidal corrector on the slope (y - D(y, s))/s.

    With churn, each step first raises s to s_hat = (1 + gamma) s, gamma = min(S_churn/N, sqrt(2) - 1)
    when S_tmin <= s <= S_tmax, adding fresh noise of std sqrt(s_hat^2 - s^2) S_noise. The step to
    t = 0 is a plain Euler (denoise) step: no corrector at sigma = 0. NFE = 2 N - 1 for N steps.
    """
    return _heun(denoiser, times, x, generator, cond, callback, s_churn, s_tmin, s_tmax, s_noise, capped=False)


def heun_capped(denoiser, times: torch.Tensor, x: torch.Tensor, generator=None, cond=None,
                callback: Callback | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = float("inf"), s_noise: float = 1.0) -> torch.Tensor:
    """EDM's Heun with its corrector's weight on the new point capped where it would extrapolate.

    Every step is y' = r y + (1 - r - w) D(y, s) + w D(y'_pred, s') with r = s'/s, and EDM's corrector is exactly
    w = (1 - r)/(2 r). For r < 1/2 that weight exceeds the step's whole data weight 1 - r, and as r -> 0 (the step
    onto the smallest positive s', ~1e-2) it multiplies the error of D at the predicted point by ~1/r: EDM's Heun
    lands at rms 40-55 on the ring at NFE 5 (tests/test_samplers_continuous.py). Here w = min((1 - r)/(2r), 1 - r):
    EDM's Heun wherever its corrector interpolates, bounded where it would not; still 2nd order.
    """
    return _heun(denoiser, times, x, generator, cond, callback, s_churn, s_tmin, s_tmax, s_noise, capped=True)


def _heun(denoiser, times, x, generator, cond, callback, s_churn, s_tmin, s_tmax, s_noise, capped: bool):
    if s_churn < 0 or s_noise < 0:
        raise ValueError(f"s_churn and s_noise must be >= 0, got {s_churn}, {s_noise}")
    schedule = denoiser.schedule
    n = len(times) - 1
    for i, (t, s) in enumerate(zip(times[:-1], times[1:], strict=True)):
        a_t, s_t = _scaled(schedule, t)
        y = x / expand_like(a_t, x)
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= float(s_t) <= s_tmax else 0.0
        if gamma > 0:  # raise the noise level: t_hat > t (capped at t = 1)
            t = schedule.t_from_log_snr(-2 * torch.log(s_t * (1 + gamma)))
            s_hat = _scaled(schedule, t)[1]
            y = y + expand_like((s_hat**2 - s_t**2).clamp(min=0).sqrt() * s_noise, y) * _noise(y, generator)
            a_t, s_t = _scaled(schedule, t)
        a_s, s_s = _scaled(schedule, s)
        r = expand_like(s_s / s_t, y)
        x0 = denoiser(expand_like(a_t, y) * y, t, **(cond or {})).x0  # D(y, s_t)
        y_next = r * y + (1 - r) * x0  # Euler predictor
        if s_s > 0:  # the trapezoidal corrector, as a weight w on the new point's D
            x0_next = denoiser(expand_like(a_s, y) * y_next, s, **(cond or {})).x0
            w = (1 - r) / (2 * r)
            if capped:
                w = torch.minimum(w, 1 - r)
            y_next = r * y + (1 - r - w) * x0 + w * x0_next
        x = expand_like(a_s, y) * y_next
        if callback:
            callback(i, s, x)
    return x


def _dopri5_interval(f, y: torch.Tensor, u0: float, u1: float, h: float | None, rtol: float, atol: float):
    """Integrate dy/du = f(u, y) from u0 to u1 by adaptive Dormand-Prince 5(4) (Dormand & Prince 1980),
    with error control in the RMS norm of err / (atol + rtol max(|y|, |y_new|)); returns (y, next h)."""
    def rms(v):
        return float(v.pow(2).mean().sqrt())

    direction = 1.0 if u1 > u0 else -1.0
    k1 = f(u0, y)
    if h is None:  # initial step (Hairer, Norsett & Wanner 1993, sec. II.4)
        scale = atol + rtol * y.abs()
        d0, d1 = rms(y / scale), rms(k1 / scale)
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        d2 = rms((f(u0 + direction * h0, y + direction * h0 * k1) - k1) / scale) / h0
        h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
        h = min(100 * h0, h1)
    u = u0
    while direction * (u1 - u) > 0:
        h = min(h, abs(u1 - u))
        dh = direction * h
        k2 = f(u + dh / 5, y + dh * (k1 / 5))
        k3 = f(u + dh * 3 / 10, y + dh * (3 / 40 * k1 + 9 / 40 * k2))
        k4 = f(u + dh * 4 / 5, y + dh * (44 / 45 * k1 - 56 / 15 * k2 + 32 / 9 * k3))
        k5 = f(u + dh * 8 / 9, y + dh * (19372 / 6561 * k1 - 25360 / 2187 * k2 + 64448 / 6561 * k3 - 212 / 729 * k4))
        k6 = f(u + dh, y + dh * (9017 / 3168 * k1 - 355 / 33 * k2 + 46732 / 5247 * k3 + 49 / 176 * k4
                                 - 5103 / 18656 * k5))
        y_new = y + dh * (35 / 384 * k1 + 500 / 1113 * k3 + 125 / 192 * k4 - 2187 / 6784 * k5 + 11 / 84 * k6)
        k7 = f(u + dh, y_new)  # first stage of the next step (FSAL)
        err = dh * (71 / 57600 * k1 - 71 / 16695 * k3 + 71 / 1920 * k4 - 17253 / 339200 * k5 + 22 / 525 * k6
                    - 1 / 40 * k7)
        norm = rms(err / (atol + rtol * torch.maximum(y.abs(), y_new.abs())))
        if not norm < float("inf") or h < 1e-12 * abs(u1 - u0):
            raise ValueError(f"rk45: step size underflow at u={u:.4g} (error norm {norm}); is the denoiser finite?")
        if norm <= 1:
            u = u1 if h == abs(u1 - u) else u + dh
            y, k1 = y_new, k7
        factor = 10.0 if norm == 0 else 0.9 * norm ** (-1 / 5)
        h *= min(10.0, max(0.2, factor)) if norm <= 1 else min(1.0, max(0.2, factor))
    return y, h


def rk45(denoiser, times: torch.Tensor, x: torch.Tensor, generator=None, cond=None,
         callback: Callback | None = None, rtol: float = 1e-5, atol: float = 1e-5) -> torch.Tensor:
    """Probability-flow ODE by adaptive Dormand-Prince 5(4) in float64, as dy/du = y - x0_hat with
    y = x/alpha and u = log(sigma/alpha), from t = times[0] through each grid time to the last positive
    one, then the denoise jump to t = 0. The grid only sets where x is reported; NFE is adaptive."""
    if rtol <= 0 or atol <= 0:
        raise ValueError(f"rtol and atol must be positive, got {rtol}, {atol}")
    if len(times) < 3:
        raise ValueError("rk45 integrates from times[0] to the grid's last positive time: give steps >= 2")
    schedule = denoiser.schedule

    def f(u: float, y: torch.Tensor) -> torch.Tensor:
        t = schedule.t_from_log_snr(torch.tensor(-2 * u, dtype=torch.float64))
        alpha = schedule.alpha_sigma(t)[0]
        x0 = denoiser((alpha * y).to(x.dtype), t, **(cond or {})).x0
        return y - x0.double()

    a_t, s_t = _scaled(schedule, times[0])
    y, h = x.double() / a_t, None
    for i, (t, s) in enumerate(zip(times[:-1], times[1:], strict=True)):
        a_s, s_s = _scaled(schedule, s)
        if s_s > 0:
            y, h = _dopri5_interval(f, y, float(torch.log(s_t)), float(torch.log(s_s)), h, rtol, atol)
            x = (a_s * y).to(x.dtype)
        else:  # the final jump onto the x0-prediction at the last positive time
            x = denoiser((a_t * y).to(x.dtype), t, **(cond or {})).x0
        a_t, s_t = a_s, s_s
        if callback:
            callback(i, s, x)
    return x


def _multistep_order(order: int, known: int, steps_left: int, lower_order_final: bool) -> int:
    """How many past predictions a multistep step uses: up to `order`, ramping up as they become known, and with
    lower_order_final no more than the steps left (Lu et al.'s choice for few steps, also diffusers')."""
    return min(order, known, steps_left) if lower_order_final else min(order, known)


def _dpmpp(denoiser, times: torch.Tensor, x: torch.Tensor, order: int, generator=None, cond=None,
           callback: Callback | None = None, lower_order_final: bool = True, eta: float = 0.0,
           d2_factor: float = 1.0) -> torch.Tensor:
    """Multistep DPM-Solver++ (Lu et al. 2022b) in the half log-SNR l = log(alpha/sigma), h = l_s - l_t, as the
    reference code (DPM-Solver's `multistep_dpm_solver_*_update`) and k-diffusion's sample_dpmpp_2m/_3m_sde do it.

    Data-prediction exponential integrator (their eq. 9), with eta > 0 the SDE form (their sec. 5, and the SDE
    variants k-diffusion ships): with H = (1 + eta) h,
        x_s = (sigma_s/sigma_t) e^{-eta h} x_t + alpha_s (1 - e^{-H}) D + sigma_s sqrt(1 - e^{-2 eta h}) z,
    order 2 (their Algorithm 2): D = m0 + (m0 - m1)/(2 r), r = h_prev/h;
    order 3: the Taylor form with divided differences D1 ~ h x0', D2 ~ h^2 x0''/2 from m0, m1, m2:
        alpha_s [(1 - e^{-H}) m0 + phi2 D1 - d2_factor phi3 D2], phi2 = 1 - (1 - e^{-H})/H, phi3 = phi2/H - 1/2,
    ramping up through the Taylor 2nd-order step. The reference codes use d2_factor 1; 2 integrates a quadratic
    x0_hat(l) exactly (dpmpp-3m-exact). With lower_order_final the last steps use k <= steps left (Lu et al.'s
    choice for few steps). The step to sigma = 0 (l = inf) is the denoise jump x = m0.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    schedule = denoiser.schedule
    alpha, sigma = schedule.alpha_sigma(times)
    lam = schedule.log_snr(times) / 2  # +inf at t = 0
    n = len(times) - 1
    m, hs = [], []  # newest first: data predictions and the l-steps between them
    for i in range(n):
        m.insert(0, denoiser(x, times[i], **(cond or {})).x0)
        if sigma[i + 1] == 0:
            x = m[0]
        else:
            h = lam[i + 1] - lam[i]
            big_h = (1 + eta) * h
            k = _multistep_order(order, len(m), n - i, lower_order_final)
            phi1 = -torch.expm1(-big_h)  # 1 - e^{-H}
            data = phi1 * m[0]
            if k >= 2:
                d1_0 = (m[0] - m[1]) / expand_like(hs[0] / h, x)
            if k == 2 and order == 2:  # Algorithm 2
                data = data + 0.5 * phi1 * d1_0
            elif k >= 2:
                phi2 = 1 - phi1 / big_h
                if k == 2:
                    data = data + phi2 * d1_0
                else:
                    r0, r1 = hs[0] / h, hs[1] / h
                    d1_1 = (m[1] - m[2]) / expand_like(r1, x)
                    d1 = d1_0 + expand_like(r0 / (r0 + r1), x) * (d1_0 - d1_1)
                    d2 = (d1_0 - d1_1) / expand_like(r0 + r1, x)
                    data = data + phi2 * d1 - d2_factor * (phi2 / big_h - 0.5) * d2
            x = expand_like(sigma[i + 1] / sigma[i] * torch.exp(-eta * h), x) * x + expand_like(alpha[i + 1], x) * data
            if eta > 0:
                x = x + expand_like(sigma[i + 1] * (-torch.expm1(-2 * eta * h)).sqrt(), x) * _noise(x, generator)
            hs.insert(0, h)
        del m[3:], hs[2:]
        if callback:
            callback(i, times[i + 1], x)
    return x


def dpmpp_2m(denoiser, times: torch.Tensor, x: torch.Tensor, generator=None, cond=None,
             callback: Callback | None = None, lower_order_final: bool = True) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2): multistep, data prediction, 2nd order, one NFE per step."""
    return _dpmpp(denoiser, times, x, 2, None, cond, callback, lower_order_final)


def dpmpp_3m(denoiser, times: torch.Tensor, x: torch.Tensor, generator=None, cond=None,
             callback: Callback | None = None, lower_order_final: bool = True) -> torch.Tensor:
    """DPM-Solver++(3M) as DPM-Solver's reference code and k-diffusion (sample_dpmpp_3m_sde at eta = 0) define it;
    one NFE per step."""
    return _dpmpp(denoiser, times, x, 3, None, cond, callback, lower_order_final)


def dpmpp_3m_exact(denoiser, times: torch.Tensor, x: torch.Tensor, generator=None, cond=None,
                   callback: Callback | None = None, lower_order_final: bool = True) -> torch.Tensor:
    """DPM-Solver++(3M) with the factor 2 on D2 that makes each 3rd-order step exact for a quadratic x0_hat(l)
    (the reference codes' factor 1 leaves a 2nd-order error there); one NFE per step."""
    return _dpmpp(denoiser, times, x, 3, None, cond, callback, lower_order_final, d2_factor=2.0)


def dpmpp_2m_sde(denoiser, times: torch.Tensor, x: torch.Tensor, generator=None, cond=None,
                 callback: Callback | None = None, eta: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022b sec. 5; k-diffusion's sample_dpmpp_2m_sde, midpoint form): fresh
    noise every step, eta = 0 is DPM-Solver++(2M). One NFE per step."""
    return _dpmpp(denoiser, times, x, 2, generator, cond, callback, lower_order_final=False, eta=eta)


def dpmpp_3m_sde(denoiser, times: torch.Tensor, x: torch.Tensor, generator=None, cond=None,
                 callback: Callback | None = None, eta: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion's sample_dpmpp_3m_sde): eta = 0 is dpmpp-3m without lowering the order at
    the end. One NFE per step."""
    return _dpmpp(denoiser, times, x, 3, generator, cond, callback, lower_order_final=False, eta=eta)


def _reverse_sde_step(schedule: Schedule, x: torch.Tensor, eps: torch.Tensor, t, s, generator) -> torch.Tensor:
    """One Euler-Maruyama step t -> s < t of the reverse SDE dx = [f x - g^2 score] dt + g dw
    (Song et al. 2021b, eq. 6), with f, g^2 from the schedule and score = -eps/sigma_t."""
    f, g2 = schedule.sde(t)
    sigma = schedule.alpha_sigma(t)[1]
    dt = t - s
    drift = expand_like(f, x) * x + expand_like(g2 / sigma, x) * eps
    return x - expand_like(dt, x) * drift + expand_like((g2 * dt).sqrt(), x) * _noise(x, generator)


def _reverse_diffusion_step(schedule: Schedule, x: torch.Tensor, eps: torch.Tensor, t, s, generator) -> torch.Tensor:
    """Song et al. 2021b's reverse-diffusion predictor (eq. 46) for any schedule: with the forward step
    x_t = a x_s + b z (a = alpha_t/alpha_s, b^2 = sigma_t^2 - a^2 sigma_s^2),
    x_s = (2 - a) x_t + b^2 score + b z."""
    a, b2 = transition(schedule, t, s)
    sigma = schedule.alpha_sigma(t)[1]
    return (expand_like(2 - a, x) * x - expand_like(b2 / sigma, x) * eps
            + expand_like(b2.clamp(min=0).sqrt(), x) * _noise(x, generator))


def euler_maruyama(denoiser, times: torch.Tensor, x: torch.Tensor, generator=None, cond=None,
                   callback: Callback | None = None) -> torch.Tensor:
    """Reverse-time SDE by Euler-Maruyama (Song et al. 2021b, eq. 6); the step to t = 0 returns the
    x0-prediction (the final denoise). One NFE per step."""
    schedule = denoiser.schedule
    for i, (t, s) in enumerate(zip(times[:-1], times[1:], strict=True)):
        pred = denoiser(x, t, **(cond or {}))
        x = pred.x0 if s == 0 else _reverse_sde_step(schedule, x, pred.eps, t, s, generator)
        if callback:
            callback(i, s, x)
    return x


_GAUSS_LEGENDRE = [torch.tensor(v, dtype=torch.float64) for v in numpy.polynomial.legendre.leggauss(12)]


def _interpolant_integrals(nodes: list[float], a: float, b: float, exponential: bool = False) -> list[float]:
    """int_a^b L_j(u) w(u) du for the Lagrange basis L_j on `nodes`, with w = 1 (the weights of Adams methods) or
    w = e^u (of exponential multistep methods such as DEIS). 12-point Gauss-Legendre in float64: exact for the
    polynomials (degree <= 2), and for e^u to ~1e-14 relative over an interval up to 10 long (2 steps over the
    whole of a DDPM schedule in log sigma/alpha)."""
    points, weights = _GAUSS_LEGENDRE
    u = (a + b) / 2 + (b - a) / 2 * points
    weights = weights * (b - a) / 2 * (torch.exp(u) if exponential else 1.0)
    result = []
    for j, node in enumerate(nodes):
        basis = torch.ones_like(u)
        for m, other in enumerate(nodes):
            if m != j:
                basis = basis * (u - other) / (node - other)
        result.append(float((basis * weights).sum()))
    return result


def deis(denoiser, times: torch.Tensor, x: torch.Tensor, generator=None, cond=None,
         callback: Callback | None = None, order: int = 3, lower_order_final: bool = True) -> torch.Tensor:
    """DEIS (Zhang & Chen 2023): the exponential multistep method on the noise prediction.

    In y = x/alpha and rho = sigma/alpha the probability-flow ODE is dy/drho = eps(x, t); a step integrates the
    polynomial through the last `order` predictions eps_j, interpolated in u = log rho, exactly:
        y_s = y_t + sum_j eps_j int_{rho_t}^{rho_s} L_j(log rho) drho = y_t + sum_j eps_j int L_j(u) e^u du,
    their rhoAB-DEIS with log rho as the interpolation variable (what diffusers' DEISMultistepScheduler does;
    benchmarks/sampler_accuracy.py agrees with it to ~1e-3 on the same grid). Order 1 is DDIM. The order ramps up
    over the first steps; with lower_order_final the last steps use at most as many as steps are left. The step to
    t = 0 is the denoise jump. One NFE per step.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    schedule = denoiser.schedule
    alpha, rho = _scaled(schedule, times)
    log_rho = torch.log(rho).tolist()  # -inf at t = 0
    n = len(times) - 1
    history: list[tuple[float, torch.Tensor]] = []  # (log rho, eps), newest first
    for i in range(n):
        pred = denoiser(x, times[i], **(cond or {}))
        if rho[i + 1] == 0:
            x = pred.x0
        else:
            history = [(log_rho[i], pred.eps)] + history[:2]
            past = history[: _multistep_order(order, len(history), n - i, lower_order_final)]
            weights = _interpolant_integrals([u for u, _ in past], log_rho[i], log_rho[i + 1], exponential=True)
            y = x / float(alpha[i]) + sum(c * eps for c, (_, eps) in zip(weights, past, strict=True))
            x = float(alpha[i + 1]) * y
        if callback:
            callback(i, times[i + 1], x)
    return x


def euler_ancestral(denoiser, times: torch.Tensor, x: torch.Tensor, generator=None, cond=None,
                    callback: Callback | None = None, eta: float = 1.0) -> torch.Tensor:
    """Ancestral sampling with Euler steps, as k-diffusion's sample_euler_ancestral: in y = x/alpha over
    s = sigma/alpha, an Euler step down to s_down = sqrt(s'^2 - s_up^2), then fresh noise of std
    s_up = min(s', eta s' sqrt(s^2 - s'^2)/s). eta = 0 is the Euler (DDIM) step. One NFE per step."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    schedule = denoiser.schedule
    for i, (t, s) in enumerate(zip(times[:-1], times[1:], strict=True)):
        (a_t, s_t), (a_s, s_s) = _scaled(schedule, t), _scaled(schedule, s)
        s_up = torch.minimum(s_s, eta * (s_s**2 * (s_t**2 - s_s**2) / s_t**2).clamp(min=0).sqrt())
        s_down = (s_s**2 - s_up**2).clamp(min=0).sqrt()
        eps = denoiser(x, t, **(cond or {})).eps
        y = x / expand_like(a_t, x) + expand_like(s_down - s_t, x) * eps
        if s_s > 0:
            y = y + expand_like(s_up, x) * _noise(x, generator)
        x = expand_like(a_s, x) * y
        if callback:
            callback(i, s, x)
    return x


def lms(denoiser, times: torch.Tensor, x: torch.Tensor, generator=None, cond=None,
        callback: Callback | None = None, order: int = 4) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth) on the probability-flow ODE dy/ds = eps in y = x/alpha, s = sigma/alpha,
    interpolating the last `order` eps in s itself, as k-diffusion's sample_lms (Karras et al. 2022 list it among
    their baselines). The order ramps up from 1; every step, the last onto s = 0 too, is an LMS step. One NFE per
    step."""
    if order < 1 or int(order) != order:
        raise ValueError(f"order must be a positive integer, got {order}")
    schedule = denoiser.schedule
    alpha, s = _scaled(schedule, times)
    s_list = s.tolist()
    history: list[tuple[float, torch.Tensor]] = []  # (s, eps), newest first
    for i in range(len(times) - 1):
        history = [(s_list[i], denoiser(x, times[i], **(cond or {})).eps)] + history[: int(order) - 1]
        weights = _interpolant_integrals([v for v, _ in history], s_list[i], s_list[i + 1])
        y = x / float(alpha[i]) + sum(c * eps for c, (_, eps) in zip(weights, history, strict=True))
        x = float(alpha[i + 1]) * y
        if callback:
            callback(i, times[i + 1], x)
    return x


def _unipc_coefficients(rks: list[torch.Tensor], h: torch.Tensor, order: int, corrector: bool) -> torch.Tensor:
    """The weights rho of UniPC's B(h) = e^h - 1 update (Zhao et al. 2023, Algorithm 2 with Theorem 3.1's linear
    system) on the data prediction, written for hh = -h: sum_k rho_k r_k^(j-1) = j! phi_{j+1}(hh) hh / B(h) for
    j = 1..p. The predictor solves it without the new point (r = 1); orders 1 (corrector) and 2 (predictor) use
    rho = 1/2, as the paper's code does."""
    if (corrector and order == 1) or (not corrector and order == 2):
        return torch.full((1,), 0.5, dtype=torch.float64)
    hh = -h
    b_h = torch.expm1(hh)
    r = torch.stack([*rks, torch.ones((), dtype=torch.float64)])
    h_phi = torch.expm1(hh) / hh - 1
    factorial, rows, rhs = 1, [], []
    for j in range(1, order + 1):
        rows.append(r ** (j - 1))
        rhs.append(h_phi * factorial / b_h)
        factorial *= j + 1
        h_phi = h_phi / hh - 1 / factorial
    matrix, rhs = torch.stack(rows), torch.stack(rhs)
    if not corrector:
        matrix, rhs = matrix[:-1, :-1], rhs[:-1]
    return torch.linalg.solve(matrix, rhs)


def unipc(denoiser, times: torch.Tensor, x: torch.Tensor, generator=None, cond=None,
          callback: Callback | None = None, order: int = 3, lower_order_final: bool = True) -> torch.Tensor:
    """UniPC (Zhao et al. 2023) with B(h) = e^h - 1 ("bh2") on the data prediction, in the half log-SNR l.

    Each step first corrects the point just reached (UniC, through the new prediction m_i and the last `order`
    older ones), then predicts the next point from the corrected one (UniP, order p ramping up 1, 2, 3; with
    lower_order_final at most the steps left). The prediction at the uncorrected point is kept, so one NFE per
    step, as in the paper and diffusers' UniPCMultistepScheduler. The step to sigma = 0 is the denoise jump.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    schedule = denoiser.schedule
    alpha, sigma = schedule.alpha_sigma(times)
    lam = schedule.log_snr(times) / 2
    n = len(times) - 1
    m: list[torch.Tensor] = []  # data predictions, newest first; m[k] was made at times[i - k]
    previous_order = 0
    x_prev = x
    for i in range(n):
        m.insert(0, denoiser(x, times[i], **(cond or {})).x0)
        if sigma[i + 1] == 0:
            x = m[0]
        else:
            if previous_order:  # UniC for the step times[i-1] -> times[i], through the new prediction m[0]
                h = lam[i] - lam[i - 1]
                rks = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, previous_order)]
                rho = _unipc_coefficients(rks, h, previous_order, corrector=True)
                update = sum(rho[k - 1] * (m[1 + k] - m[1]) / rks[k - 1] for k in range(1, previous_order))
                update = update + rho[-1] * (m[0] - m[1])
                x = (sigma[i] / sigma[i - 1]) * x_prev - alpha[i] * torch.expm1(-h) * m[1] \
                    - alpha[i] * torch.expm1(-h) * update
            p = _multistep_order(order, len(m), n - i, lower_order_final)
            h = lam[i + 1] - lam[i]
            x_prev = x
            x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * torch.expm1(-h) * m[0]
            if p >= 2:
                rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)]
                rho = _unipc_coefficients(rks, h, p, corrector=False)
                x = x - alpha[i + 1] * torch.expm1(-h) * sum(rho[k - 1] * (m[k] - m[0]) / rks[k - 1]
                                                             for k in range(1, p))
            previous_order = p
        del m[order + 1:]
        if callback:
            callback(i, times[i + 1], x)
    return x


def trig_abm(denoiser, times: torch.Tensor, x: torch.Tensor, generator=None, cond=None,
             callback: Callback | None = None, sigma_data: float = 1.0, order: int = 2) -> torch.Tensor:
    """Probability-flow ODE in EDM's preconditioned ("TrigFlow") variables, by Adams-Bashforth-Moulton.

    With y = x/alpha, s = sigma/alpha, nu = sqrt(s^2 + sd^2), the substitution w = y/nu, theta = arctan(s/sd)
    turns dy/ds = eps into dw/dtheta = -F, where F = (x0_hat - c_skip y)/c_out is the output of an EDM-
    preconditioned network (Karras et al. 2022, eq. 7; Lu & Song 2024's TrigFlow). F = 0 for data N(0, sd^2 I),
    so the linear part of the ODE is integrated exactly. Predictor: Adams-Bashforth of `order` on the past F
    (order ramps up from 1); corrector: Adams-Moulton through the new F and `order` past ones, with the new F
    kept as evaluated (as in UniPC, Zhao et al. 2023), so one NFE per step. The step to t = 0 is the denoise
    jump, x0 = c_skip y + c_out F, taken from the corrected y.
    """
    if sigma_data <= 0 or order not in (1, 2, 3):
        raise ValueError(f"sigma_data must be > 0 and order 1, 2 or 3, got {sigma_data}, {order}")
    schedule = denoiser.schedule
    alpha, sigma = schedule.alpha_sigma(times)
    s = (sigma / alpha).tolist()
    theta = [math.atan(v / sigma_data) for v in s]
    nu = [math.sqrt(v * v + sigma_data**2) for v in s]
    w = w_start = x / (float(alpha[0]) * nu[0])
    history: list[tuple[float, torch.Tensor]] = []  # (theta, F), newest first
    for i in range(len(times) - 1):
        y = w * nu[i]
        x0 = denoiser(float(alpha[i]) * y, times[i], **(cond or {})).x0
        c_skip, c_out = sigma_data**2 / nu[i] ** 2, s[i] * sigma_data / nu[i]
        f = (x0 - c_skip * y) / c_out
        if history:  # corrector for the step just taken: Adams-Moulton through (theta_i, f) and the past
            past = history[: min(order, len(history))]
            weights = _interpolant_integrals([theta[i]] + [th for th, _ in past], theta[i - 1], theta[i])
            w = w_start - sum(c * v for c, v in zip(weights, [f] + [v for _, v in past], strict=True))
        history = [(theta[i], f)] + history[:2]
        if s[i + 1] == 0:  # final denoise jump from the corrected state
            x = c_skip * (w * nu[i]) + c_out * f
        else:  # predictor: Adams-Bashforth through the last k values of F
            past = history[: min(order, len(history))]
            weights = _interpolant_integrals([th for th, _ in past], theta[i], theta[i + 1])
            w_start = w
            w = w - sum(c * v for c, v in zip(weights, [v for _, v in past], strict=True))
            x = float(alpha[i + 1]) * nu[i + 1] * w
        if callback:
            callback(i, times[i + 1], x)
    return x


PREDICTORS = {"reverse-diffusion": _reverse_diffusion_step, "euler-maruyama": _reverse_sde_step}


def pc(denoiser, times: torch.Tensor, x: torch.Tensor, generator=None, cond=None, callback: Callback | None = None,
       snr: float = 0.16, corrector_steps: int = 1, predictor: str = "reverse-diffusion") -> torch.Tensor:
    """Predictor-corrector sampling (Song et al. 2021b, Algorithms 1-2, any schedule).

    Predictor: one reverse-diffusion (or Euler-Maruyama) step t -> s. Corrector: `corrector_steps`
    Langevin steps at s, x += e score + sqrt(2 e) z with e = 2 (snr ||z|| / ||score||)^2, the norms
    averaged over the batch (their Algorithm 4/5 step size and score_sde's code; per-example norms blow
    up in low dimension where ||score|| can be ~0; the VP factor alpha_i ~ 1 is dropped). The step to t = 0 returns
    the x0-prediction. NFE = steps + corrector_steps (steps - 1).
    """
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; choose one of {sorted(PREDICTORS)}")
    if snr <= 0 or corrector_steps < 0 or int(corrector_steps) != corrector_steps:
        raise ValueError(f"snr must be > 0 and corrector_steps a non-negative integer, got {snr}, {corrector_steps}")
    schedule = denoiser.schedule
    step = PREDICTORS[predictor]
    for i, (t, s) in enumerate(zip(times[:-1], times[1:], strict=True)):
        pred = denoiser(x, t, **(cond or {}))
        if s == 0:
            x = pred.x0
        else:
            x = step(schedule, x, pred.eps, t, s, generator)
            sigma_s = schedule.alpha_sigma(s)[1]
            for _ in range(int(corrector_steps)):
                score = -denoiser(x, s, **(cond or {})).eps / expand_like(sigma_s, x)
                z = _noise(x, generator)
                norm = lambda v: v.reshape(v.shape[0], -1).norm(dim=1).mean()  # batch mean, as in score_sde
                e = 2 * (snr * norm(z) / norm(score)) ** 2
                x = x + e * score + (2 * e).sqrt() * z
        if callback:
            callback(i, s, x)
    return x


SAMPLERS: dict[str, Callable] = {
    "ddpm": ddpm, "ddim": ddim, "euler": euler, "euler-ancestral": euler_ancestral, "heun": heun,
    "heun-capped": heun_capped, "lms": lms, "rk45": rk45, "dpmpp-2m": dpmpp_2m, "dpmpp-3m": dpmpp_3m,
    "dpmpp-3m-exact": dpmpp_3m_exact, "dpmpp-2m-sde": dpmpp_2m_sde, "dpmpp-3m-sde": dpmpp_3m_sde, "unipc": unipc,
    "euler-maruyama": euler_maruyama, "pc": pc, "trig-abm": trig_abm, "deis": deis}
# the samplers a grid can be calibrated for
ODE_SAMPLERS = ("ddim", "euler", "heun", "heun-capped", "lms", "dpmpp-2m", "dpmpp-3m", "dpmpp-3m-exact", "deis",
                "unipc", "trig-abm")
STANDARD_ARGS = ("denoiser", "times", "x", "generator", "cond", "callback")
