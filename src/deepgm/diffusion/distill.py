"""Progressive distillation (Salimans & Ho 2022) and guidance distillation (Meng et al. 2023) as objectives.

A student is a DiffusionModel whose objective holds its frozen teacher: the teacher is loaded from its run
directory on first use, sits outside the student's parameters, state dict and EMA, and never gets a gradient.

- `ProgressiveDistillation`: Algorithm 2. From z_t at a time t = i/N of the student's N-step grid, two deterministic
  DDIM steps of the teacher (t -> t - 1/(2N) -> t - 1/N) give z''; the student's x-space target is the x~ whose one
  DDIM step from t lands on z''. Loss weight: SNR + 1 for a v-student, max(SNR, 1) for an x0-student (an eps-student
  diverges, the paper found, and is refused).
- `GuidanceDistillation`: stage one of Meng et al.: a student that reads the guidance weight w (the condition
  deepgm.conditioning.GuidanceWeight) learns the teacher's classifier-free-guided x0 at (z_t, t, w), w drawn
  uniformly from a range; progressive distillation of that student (w passed to teacher and student) is stage two.
"""

from __future__ import annotations

from pathlib import Path

import torch

from deepgm.diffusion.denoiser import Guided, Thresholded, expand_like
from deepgm.family import parse_threshold

STUDENT_PARAMETERIZATIONS = ("v", "x0")


def ddim_step(x0: torch.Tensor, z: torch.Tensor, alpha_t, sigma_t, alpha_s, sigma_s) -> torch.Tensor:
    """One deterministic DDIM step (Song et al. 2021a, eq. 12, eta = 0) written in x0:
    z_s = alpha_s x0 + (sigma_s / sigma_t)(z_t - alpha_t x0)."""
    return alpha_s * x0 + sigma_s / sigma_t * (z - alpha_t * x0)


def distillation_target(z: torch.Tensor, z2: torch.Tensor, alpha_t, sigma_t, alpha_2, sigma_2) -> torch.Tensor:
    """Salimans & Ho (2022), Algorithm 2: x~ = (z'' - (sigma''/sigma_t) z_t) / (alpha'' - (sigma''/sigma_t) alpha_t),
    the x0 whose single DDIM step from (z_t, t) lands exactly on the teacher's two-step z''."""
    ratio = sigma_2 / sigma_t
    return (z2 - ratio * z) / (alpha_2 - ratio * alpha_t)


def x_space_weight(parameterization: str, log_snr: torch.Tensor) -> torch.Tensor:
    """The loss weight on ||x~ - x_hat||^2 (Salimans & Ho 2022, sec. 4): 'SNR+1' for a v-student (the v-MSE
    written in x), 'truncated SNR' max(SNR, 1) for an x0-student."""
    snr = torch.exp(log_snr)
    if parameterization == "v":
        return snr + 1
    if parameterization == "x0":
        return snr.clamp(min=1.0)
    raise ValueError(f"a distilled student predicts x0 or v, not {parameterization!r}: Salimans & Ho (2022) found "
                     "eps-prediction unstable in distillation (model.parameterization: v)")


class Teacher:
    """A frozen teacher run (its EMA weights), loaded on first use; it answers x0 at (z_t, t, cond), with
    classifier-free guidance at per-example weights w when it does not read w itself, and thresholded as the
    teacher's sampler thresholds it (`threshold`: static clipping of images to [-1, 1] by default), so the student
    learns the teacher's sampler as it is used. (An eps-teacher's unclipped x0 near t = 1, where alpha -> 0, is
    (z - sigma eps)/alpha: hundreds of times the data's range on the cosine schedule.)"""

    def __init__(self, run_dir: str | Path, weights: str = "ema", threshold: str = "static"):
        parse_threshold(threshold)
        self.run_dir, self.weights, self.threshold = str(run_dir), weights, threshold
        self._model = None

    @classmethod
    def from_model(cls, model, threshold: str = "none") -> Teacher:
        """A teacher already in memory (a DiffusionModel: its denoiser and conditioning)."""
        teacher = cls("<in memory>", threshold=threshold)
        teacher._model = model.eval().requires_grad_(False)
        return teacher

    def __deepcopy__(self, memo):  # the EMA's copy of the student shares the one frozen teacher
        return self

    @property
    def model(self):
        if self._model is None:
            from deepgm.pipeline import load_run  # the run layer loads runs; it sits below the families

            model = load_run(self.run_dir, self.weights).model
            self._model = model.eval().requires_grad_(False)
        return self._model

    def reads_guidance(self) -> bool:
        return "w" in self.model.conditioning

    @torch.no_grad()
    def x0(self, z: torch.Tensor, t: torch.Tensor, cond: dict, w: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's x0 prediction (B, ...) at times t (B,); with w (B,), its guided prediction."""
        model = self.model.to(z.device)
        cond = dict(cond)
        cond.pop("w", None)
        denoiser = model.denoiser
        if w is not None and self.reads_guidance():
            cond["w"] = w
        elif w is not None:
            denoiser = Guided(denoiser, w, model.conditioning)
        kind, percentile = parse_threshold(self.threshold if model.is_image else "none")
        if kind != "none":
            denoiser = Thresholded(denoiser, percentile)
        return denoiser(z, t, **cond).x0


class _Distillation:
    """What both objectives share: the teacher, the student's parameterisation check and the guidance weights."""

    def __init__(self, teacher: Teacher, parameterization: str, guidance: tuple[float, float] | None = None):
        x_space_weight(parameterization, torch.zeros(1))  # refuse an eps-student now, not at the first step
        if guidance is not None:
            lo, hi = (float(v) for v in guidance)
            if not 0 <= lo <= hi:
                raise ValueError(f"distill.guidance must be [w_min, w_max] with 0 <= w_min <= w_max, got {guidance}")
            guidance = (lo, hi)
        self.teacher, self.parameterization, self.guidance = teacher, parameterization, guidance

    def _weights(self, n: int, generator: torch.Generator, device) -> torch.Tensor | None:
        """Per-example guidance weights w ~ U[w_min, w_max] (guided distillation), else None."""
        if self.guidance is None:
            return None
        lo, hi = self.guidance
        return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)

    def _loss(self, student, z, t, cond, w, target, log_snr):
        student_cond = {**cond, "w": w} if w is not None else cond
        x_hat = student(z, t, **student_cond).x0
        per_example = ((x_hat.float() - target.float()) ** 2).flatten(1).mean(1)  # (B,)
        weighted = x_space_weight(self.parameterization, log_snr).float() * per_example
        return weighted.mean(), {"distill_loss": weighted.mean().detach(), "x0_mse": per_example.mean().detach()}


class ProgressiveDistillation(_Distillation):
    """Salimans & Ho (2022), Algorithm 2: the student's N-step DDIM matches its teacher's 2N-step DDIM."""

    def __init__(self, teacher: Teacher, steps: int, parameterization: str = "v",
                 guidance: tuple[float, float] | None = None):
        super().__init__(teacher, parameterization, guidance)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"the student's step count must be a whole number >= 1, got {steps!r}")
        self.steps = steps

    def target(self, z: torch.Tensor, t: torch.Tensor, cond: dict, w: torch.Tensor | None, schedule) -> torch.Tensor:
        """x~ from two teacher DDIM steps t -> t - 1/(2N) -> t - 1/N, in float64 then z's dtype."""
        half = 0.5 / self.steps
        (a, s), (a1, s1), (a2, s2) = ((expand_like(v, z.double()) for v in schedule.alpha_sigma(time))
                                      for time in (t, t - half, t - 2 * half))
        z64 = z.double()
        x0 = self.teacher.x0(z, t, cond, w).double()
        z1 = ddim_step(x0, z64, a, s, a1, s1)
        x1 = self.teacher.x0(z1.to(z.dtype), t - half, cond, w).double()
        z2 = ddim_step(x1, z1, a1, s1, a2, s2)
        return distillation_target(z64, z2, a, s, a2, s2).to(z.dtype)

    def __call__(self, denoiser, x0: torch.Tensor, cond: dict, generator: torch.Generator):
        schedule, n = denoiser.schedule, x0.shape[0]
        i = torch.randint(1, self.steps + 1, (n,), generator=generator, device=x0.device)
        t = i.double() / self.steps  # (B,) on the student's grid
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        alpha, sigma = (expand_like(v, x0) for v in schedule.alpha_sigma(t))
        z = alpha * x0 + sigma * eps
        w = self._weights(n, generator, x0.device)
        target = self.target(z, t, cond, w, schedule)
        return self._loss(denoiser, z, t, cond, w, target, schedule.log_snr(t))


class GuidanceDistillation(_Distillation):
    """Meng et al. (2023), stage one: a w-reading student learns the guided teacher's x0 at the same (z_t, t)."""

    def __init__(self, teacher: Teacher, guidance: tuple[float, float], parameterization: str = "v"):
        if guidance is None:
            raise ValueError("guidance distillation needs a range of weights, distill.guidance: [w_min, w_max]")
        super().__init__(teacher, parameterization, guidance)

    def __call__(self, denoiser, x0: torch.Tensor, cond: dict, generator: torch.Generator):
        schedule, n = denoiser.schedule, x0.shape[0]
        t = schedule.sample_t(n, generator, x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        alpha, sigma = (expand_like(v, x0) for v in schedule.alpha_sigma(t))
        z = alpha * x0 + sigma * eps
        w = self._weights(n, generator, x0.device)
        return self._loss(denoiser, z, t, cond, w, self.teacher.x0(z, t, cond, w), schedule.log_snr(t))


def make_distillation(spec: dict, parameterization: str):
    """The objective a `model.distill` section names: {teacher: RUN, steps: N} is progressive distillation to an
    N-step student; with `guidance: [w_min, w_max]` the student reads w; `steps: null` with guidance is Meng et al.'s
    stage one (no halving); `teacher_threshold` is how the teacher's x0 is thresholded (default static, as it
    samples)."""
    valid = {"teacher", "steps", "guidance", "teacher_weights", "teacher_threshold"}
    if set(spec) - valid:
        raise ValueError(f"unknown key(s) {sorted(set(spec) - valid)} in model.distill; valid keys are {sorted(valid)}")
    if not spec.get("teacher"):
        raise ValueError("model.distill needs `teacher`: the run directory of the model to distil")
    teacher = Teacher(spec["teacher"], spec.get("teacher_weights", "ema"), spec.get("teacher_threshold", "static"))
    guidance = spec.get("guidance")
    if spec.get("steps") is None:
        return GuidanceDistillation(teacher, guidance, parameterization)
    return ProgressiveDistillation(teacher, int(spec["steps"]), parameterization, guidance)
