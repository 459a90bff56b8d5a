"""The diffusion model family: a denoiser plus the objective it is trained with (deepgm.family's protocol)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from deepgm.conditioning import Conditioning
from deepgm.diffusion.denoiser import Denoiser, Guided, Thresholded
from deepgm.diffusion.likelihood import elbo_nll, ode_nll
from deepgm.diffusion.losses import noise_data, vlb
from deepgm.diffusion.objectives import make_objective
from deepgm.diffusion.sampling import sample
from deepgm.diffusion.schedules import Schedule
from deepgm.diffusion.weighting import Weighting
from deepgm.family import SampleOutput, SamplingPlan, parse_threshold
from deepgm.likelihood import bits_per_dim

# the ODE density picture of 2-D runs: one adaptive solve with the exact divergence over a grid of points, seconds
DENSITY_PICTURE = {"density_points": 40, "density_tol": 1e-4}
REVERSE_PICTURE_STEPS = 1000  # ancestral steps of the reverse-process strip of a continuous-time model


class DiffusionModel(nn.Module):
    """Holds the denoiser and an objective (deepgm.diffusion.objectives): a weighting over log-SNR, the discrete VLB
    ("vlb") or the continuous ELBO ("elbo", with its prior and decoder terms, in nats/dim).

    The network reads the conditions of `net.conditioning`; each droppable one is replaced by its null value with
    probability `cond_dropout` in training, so the same network also learns the unconditional model that
    classifier-free guidance needs.
    """

    BOUNDS = {"vlb": "discrete VLB", "elbo": "continuous ELBO", "ode": "ODE NLL (dequantised)"}
    NLL_BOUNDS = ("ode", "elbo")  # what `deepgm eval --nll` reports

    def __init__(self, net: nn.Module, schedule: Schedule, parameterization: str = "eps",
                 weighting: str | dict | Weighting = "simple", levels: int | None = None, cond_dropout: float = 0.0,
                 sigma_data: float = 0.5, data_shape: tuple[int, ...] | None = None):
        super().__init__()
        if not 0 <= cond_dropout < 1:
            raise ValueError(f"condition dropout must lie in [0, 1), got {cond_dropout}")
        self.objective = make_objective(weighting, schedule, levels)
        self.denoiser = Denoiser(net, schedule, parameterization, sigma_data)
        self.conditioning: Conditioning = getattr(net, "conditioning", None) or Conditioning()
        self.levels = levels
        self.cond_dropout = cond_dropout
        self.data_shape = tuple(data_shape) if data_shape is not None else None
        self.distilled: dict | None = None  # a distilled student: {steps: N or None, guidance: [lo, hi] or None}
        self._sampling_denoisers: dict = {}

    @property
    def schedule(self) -> Schedule:
        return self.denoiser.schedule

    @property
    def is_image(self) -> bool:
        return self.data_shape is not None and len(self.data_shape) == 3

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator):
        """Mean training loss over the batch and its named terms."""
        cond = self.conditioning.from_batch(batch)
        if "aug" in self.conditioning:  # a super-resolution stage: its low-res input noised at a random level
            x = batch["x"]
            level = torch.rand(len(x), generator=generator, device=x.device) * self.conditioning["aug"].max_level
            cond = self.augment(cond, level, generator)
        cond = self.conditioning.drop(cond, self.cond_dropout, generator)
        return self.objective(self.denoiser, batch["x"], cond, generator)

    def augment(self, cond: dict, level: torch.Tensor, generator: torch.Generator | None) -> dict:
        """Noise-conditioning augmentation: cond['low_res'] drawn from the forward kernel q(z_s | low_res) of this
        model's schedule at time s = level (B,), and cond['aug'] = level. Level 0 leaves the image exactly as is."""
        low = cond["low_res"]
        noised, _ = noise_data(self.schedule, low, level.to(low.device, torch.float64), generator)
        clean = (level == 0).reshape(-1, *([1] * (low.dim() - 1))).to(low.device)
        return {**cond, "low_res": torch.where(clean, low, noised.to(low.dtype)), "aug": level.to(low.dtype)}

    # ---------------------------------------------------------------------------------------------- sampling

    def sampling_denoiser(self, plan: SamplingPlan) -> nn.Module:
        """The denoiser a plan samples with: guided (weight != 1), then thresholded (images), built once per
        (guidance, threshold) so that a calibrated grid, cached on it, is made once."""
        kind, percentile = parse_threshold(plan.threshold if self.is_image else "none")
        key = (float(plan.guidance), kind, percentile)
        if key not in self._sampling_denoisers:
            denoiser = self.denoiser
            if plan.guidance != 1 and "w" not in self.conditioning:  # a guidance-distilled net reads w instead
                denoiser = Guided(denoiser, plan.guidance, self.conditioning)
            if kind != "none":
                denoiser = Thresholded(denoiser, percentile)
            self._sampling_denoisers[key] = denoiser
        return self._sampling_denoisers[key]

    def generate(self, n: int, cond: dict, generator: torch.Generator | None, plan: SamplingPlan) -> SampleOutput:
        """n samples by plan.sampler over plan.steps steps (classifier-free guidance with weight plan.guidance)."""
        if self.data_shape is None:
            raise ValueError("this DiffusionModel was built without data_shape; give it to sample from the model")
        if plan.guidance != 1 and not self.conditioning.guidable:
            raise ValueError(f"--guidance {plan.guidance:g} needs a conditional model; this run is unconditional "
                             "(train with model.class_conditional: true or model.text, and model.cond_dropout > 0)")
        reads_w = "w" in self.conditioning
        if plan.guidance != 1 and self.cond_dropout == 0 and not reads_w:
            import warnings

            warnings.warn("this model was trained without condition dropout, so its unconditional prediction "
                          "(and with it guidance) is untrained; train with model.cond_dropout > 0", stacklevel=2)
        if self.distilled:
            self._check_student_plan(plan)
        if plan.augmentation and "aug" not in self.conditioning:
            raise ValueError(f"--augmentation {plan.augmentation:g} is the noise level of a super-resolution stage's "
                             "low-resolution input; this model has none (model.super_resolution)")
        device = next(self.parameters()).device
        cond = self.conditioning.check(cond, n)
        if "aug" in self.conditioning:  # noise-conditioning augmentation at the plan's level
            if "low_res" not in cond:
                raise ValueError("a super-resolution model samples from a low-resolution image: pass cond['low_res'] "
                                 "(upsampled with LowResImage.upsample), or sample a cascade")
            level = torch.full((n,), float(plan.augmentation), device=device)
            cond = self.augment(cond, level, generator)
        if reads_w:  # the guidance weight is an input of the network: one evaluation per step
            cond = {**cond, "w": torch.full((n,), float(plan.guidance), device=device)}
        result = sample(self.sampling_denoiser(plan), None, (n, *self.data_shape), sampler=plan.sampler,
                        steps=plan.steps, grid=plan.grid, generator=generator, cond=cond, progress=plan.progress,
                        device=device, return_trajectory=plan.return_trajectory, start=plan.start,
                        **dict(plan.options))
        result.cond = cond
        return result

    def _check_student_plan(self, plan: SamplingPlan) -> None:
        """A distilled student learned one thing: deterministic DDIM over its own N-step grid (and, if guided, the
        weights it was distilled on). Anything else is allowed but said."""
        import warnings

        steps, guidance = self.distilled.get("steps"), self.distilled.get("guidance")
        if steps is not None and (plan.sampler != "ddim" or plan.steps != steps or plan.grid != "student"
                                  or dict(plan.options).get("eta", 0) != 0):
            warnings.warn(f"this student was distilled for {steps} deterministic DDIM steps on the 'student' grid "
                          f"(t = i/{steps}); sampling it with {plan.sampler}, {plan.steps} steps, grid {plan.grid} "
                          "is outside what it learned (deepgm sample RUN uses its own plan when given no "
                          "--sampler/--steps/--grid)", stacklevel=3)
        if guidance is not None and not guidance[0] <= plan.guidance <= guidance[1]:
            warnings.warn(f"this student was distilled for guidance weights in [{guidance[0]:g}, {guidance[1]:g}]; "
                          f"w = {plan.guidance:g} lies outside them", stacklevel=3)

    # ------------------------------------------------------------------------------------------ likelihoods

    def _test_cond(self, test, n: int) -> dict:
        return self.conditioning.from_batch(test.batch(torch.arange(n))) if self.conditioning else {}

    @property
    def available_bounds(self) -> tuple[str, ...]:
        return tuple(b for b in self.BOUNDS if b != "vlb" or self.schedule.T)

    def likelihoods(self, test, bounds: tuple[str, ...] | None = None, n: int | None = None, seed: int = 0,
                    progress: bool = False, options: dict | None = None) -> dict[str, dict]:
        """Test-set bounds on -log p(x) in bits/dim with 95% intervals: 'vlb' (discrete bound, discrete
        schedules), 'elbo' (continuous ELBO) and 'ode' (probability-flow ODE NLL, uniformly dequantised).
        options: divergence ('hutchinson' or 'exact'), probes, rtol and atol (the ODE solver's), elbo_points
        (settings of other families ignored)."""
        options = options or {}
        bounds = bounds or self.NLL_BOUNDS
        unknown = sorted(set(bounds) - set(self.BOUNDS))
        if unknown:
            raise ValueError(f"unknown bound(s) {unknown} for a diffusion model; choose from {sorted(self.BOUNDS)}")
        n = min(n or len(test), len(test))
        x0, cond = test.x[:n], self._test_cond(test, n)
        out = {}
        for bound in bounds:
            if bound == "vlb":
                out[bound] = self._discrete_vlb(x0, cond, test.levels, seed, progress)
            elif bound == "elbo":
                out[bound] = elbo_nll(self.denoiser, x0, test.levels, int(options.get("elbo_points", 64)),
                                      torch.Generator().manual_seed(seed + 1), cond or None).summary()
            else:
                out[bound] = ode_nll(self.denoiser, x0, test.levels, cond or None,
                                     options.get("divergence", "hutchinson"), int(options.get("probes", 1)),
                                     rtol=float(options.get("rtol", 1e-5)), atol=float(options.get("atol", 1e-5)),
                                     generator=torch.Generator().manual_seed(seed)).summary()
            out[bound]["bound"] = self.BOUNDS[bound]
        return out

    def _discrete_vlb(self, x0: torch.Tensor, cond: dict, levels: int | None, seed: int, progress: bool) -> dict:
        """The full discrete bound (every term summed exactly), bits/dim with a 95% interval."""
        if not self.schedule.T:
            raise ValueError("the discrete VLB needs a discrete schedule (T steps); use the 'elbo' bound")
        g = torch.Generator().manual_seed(seed)
        totals = []
        for start in range(0, len(x0), 256):
            part = {k: v[start:start + 256] for k, v in cond.items()} or None
            totals.append(vlb(self.denoiser, x0[start:start + 256], levels, g, part, progress=progress)["total"])
        bpd = bits_per_dim(torch.cat(totals), x0[0].numel())
        return {"bpd": float(bpd.mean()), "bpd_ci95": float(1.96 * bpd.std() / math.sqrt(len(bpd))), "n": len(x0),
                "nfe": self.schedule.T, "levels": levels,
                "note": "discrete VLB over the data's levels, no dequantisation (bins of width 2/(levels-1))"}

    def evaluate(self, test, spec: dict, seed: int = 0, progress: bool = False) -> dict:
        """eval.json's diffusion entries: test bits/dim from the discrete VLB (discrete schedules, eval.vlb)."""
        if not (spec.get("vlb", True) and self.schedule.T):
            return {}
        r = self.likelihoods(test, ("vlb",), spec.get("vlb_examples"), seed, progress)["vlb"]
        return {"test_bpd": r["bpd"], "test_bpd_ci95": r["bpd_ci95"], "bpd_examples": r["n"],
                "bpd_levels": r["levels"], "bpd_note": r["note"]}

    # --------------------------------------------------------------------------------------------- pictures

    def pictures(self, test, out_dir: str | Path, seed: int = 0) -> list[Path]:
        """The forward process on real images (x0 -> x_T) and a reverse trajectory, as PNG strips; on 2-D points the
        score field, reverse-SDE vs probability-flow-ODE paths and the ODE density next to the data (and the exact
        density where the dataset knows it)."""
        from deepgm.viz import save_strip
        from deepgm.viz.score_plots import score_pictures

        out_dir = Path(out_dir)
        if not self.is_image:
            if self.data_shape != (2,):
                return []
            lim = float(test.x.abs().max()) + 0.3
            return score_pictures(self.denoiser, out_dir, test.x, test.log_prob, lim=lim, seed=seed,
                                  **DENSITY_PICTURE)
        g = torch.Generator().manual_seed(seed)
        x0 = test.x[:6]
        times = torch.linspace(0, 1, 9, dtype=torch.float64)
        forward = [noise_data(self.schedule, x0, t.expand(len(x0)), g)[0] for t in times]
        rows = [torch.stack([f[i] for f in forward]) for i in range(len(x0))]  # (9, C, H, W) per image
        paths = [save_strip(rows, out_dir / "forward_process.png", labels=[f"t={t:.2f}" for t in times.tolist()])]
        plan = SamplingPlan("ddpm", self.schedule.T or REVERSE_PICTURE_STEPS, return_trajectory=True)
        cond = {**self.conditioning.for_samples(0, 6, next(self.parameters()).device),
                **self.conditioning.examples(test, 6)}
        result = self.generate(6, cond, torch.Generator().manual_seed(seed), plan)
        keep = torch.linspace(0, len(result.trajectory) - 1, 9).round().long()
        rows = [torch.stack([result.trajectory[k][i].clamp(-1, 1) for k in keep]) for i in range(6)]
        paths.append(save_strip(rows, out_dir / "reverse_process.png"))
        return paths
