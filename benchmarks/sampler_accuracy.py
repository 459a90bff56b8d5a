"""Sampler accuracy on analytic Gaussian mixtures: deepgm's samplers and grids against diffusers and k-diffusion.

Every sampler, ours and the peers', queries the same oracle, the exact posterior mean E[x0 | x_t] of the
mixture (deepgm.data.toy), on the same DDPM linear-beta schedule (T = 1000, beta 1e-4 .. 0.02), from the
same starting noise. Errors at NFE 4, 6, 8, 10, 15, 20, 50 (NFE counted at the oracle, for everyone):

- rms: RMS distance to the converged probability-flow ODE solution from the same noise (deterministic
  samplers only). The reference is deepgm's rk45 at rtol = atol = 1e-10 from t = 1 to t = 1/T (the
  smallest noise level every sampler here reaches), then the final denoise jump.
- sw2: sliced Wasserstein-2 to fresh true samples (deepgm.eval.metrics, the same 256 projections for all);
- fd: Fréchet distance of Gaussian fits to the same true samples (deepgm.eval.metrics.fid on raw points);
  both with their two-sample noise floor (true samples against other true samples).

Peers. diffusers: DDIM, DPMSolverMultistep, UniPC, DEIS, LMS, Euler, Heun, over solver orders/types,
timestep spacings and sigma grids (default, Karras, exponential, Lu's lambdas); the model returns eps at
the (alpha, sigma) the scheduler assigns to the timestep it passes. k-diffusion: its sampling.py
functions with Karras (rho = 7) and exponential sigma grids from sigma(1) to sigma(1/T); the denoiser is
D(x, s) on the VP-scaled x / alpha with s = sigma / alpha. k-diffusion's package imports torchvision-only
image helpers, so sampling.py (and the utils.py it needs) are loaded from the installed files without the
package __init__, with empty placeholder modules for torchvision if it is absent.

Writes sampler_accuracy.md (summary tables, then every configuration), .json (every row) and .png (error vs
NFE, a row per metric and a column per mixture). The full run takes about 25 min on one CPU thread.

Set-up: pip install -e '.[bench]' && pip install --no-deps k-diffusion torchsde torchdiffeq trampoline
Run:    python benchmarks/sampler_accuracy.py [--quick] [--out benchmarks/results] [--render saved.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import pathlib
import sys
import time
import types
import warnings

import torch

import deepgm
from deepgm.data import make_mixture
from deepgm.diffusion.denoiser import Denoiser
from deepgm.diffusion.grids import available_grids, make_grid
from deepgm.diffusion.samplers import DEFAULT_GRID, DEFAULT_SAMPLER
from deepgm.diffusion.schedules import DiscreteVP
from deepgm.eval.metrics import fid as frechet
from deepgm.eval.metrics import sliced_wasserstein

NFES = (4, 6, 8, 10, 15, 20, 50)
GOAL_NFES = (6, 10, 20)
DEFAULT = (DEFAULT_SAMPLER, DEFAULT_GRID)  # what deepgm.sample uses when told nothing


# ------------------------------------------------------------------------------------------------ oracle
class Oracle:
    """The mixture's exact posterior mean, counting evaluations; answers in deepgm's, diffusers' and k's terms."""

    def __init__(self, gmm, schedule):
        self.gmm, self.schedule, self.nfe = gmm, schedule, 0

    def x0(self, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        self.nfe += 1
        return self.gmm.posterior_mean(x, alpha, sigma).to(x.dtype)

    def denoiser(self) -> Denoiser:
        def posterior_mean(x, t):
            alpha, sigma = self.schedule.alpha_sigma(t[0])
            return self.x0(x, float(alpha), float(sigma))

        return Denoiser.from_fn(posterior_mean, self.schedule, parameterization="x0")

    def k_denoiser(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """k-diffusion's D(x, s): x = x_t / alpha = x0 + s eps, so alpha = 1/sqrt(1 + s^2), sigma = s alpha."""
        s = float(s.reshape(-1)[0])
        alpha = 1 / math.sqrt(1 + s * s)
        return self.x0(alpha * x, alpha, s * alpha)


# -------------------------------------------------------------------------------------------------- deepgm
def deepgm_configs():
    """(label, sampler, grid, grid options, sampler options, deterministic, steps(nfe) -> steps)."""
    one = lambda nfe: nfe
    two = lambda nfe: (nfe + 1) // 2  # 2 NFE per step except the last: 2 steps - 1
    grids = [(name, {}) for name in available_grids()] + [("trig", {"scale": 0.5}), ("trig", {"scale": 2.0})]
    configs = []
    for grid, grid_options in grids:
        grid_label = grid + "".join(f"({v:g})" for v in grid_options.values())
        for sampler, steps, det in [("ddim", one, True), ("euler", one, True), ("heun", two, True),
                                    ("dpmpp-2m", one, True), ("dpmpp-3m", one, True), ("trig-abm", one, True),
                                    ("ddpm", one, False), ("euler-maruyama", one, False), ("pc", two, False)]:
            configs.append((f"{sampler}/{grid_label}", sampler, grid, grid_options, {}, det, steps))
    return configs


def run_deepgm(oracle: Oracle, z: torch.Tensor, sampler: str, grid: str, steps: int, seed: int,
               grid_options: dict | None = None, **options):
    oracle.nfe = 0
    times = make_grid(grid, oracle.schedule, steps, **(grid_options or {}))
    out = deepgm.sample(oracle.denoiser(), x_T=z, sampler=sampler, times=times, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(seed), **options)
    assert out.nfe == oracle.nfe
    return out.x, out.nfe


# ------------------------------------------------------------------------------------------------ diffusers
def diffusers_configs():
    """(label, scheduler class name, config kwargs, step kwargs)."""
    configs = []
    for spacing, offset in [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)]:
        configs.append((f"DDIM/{spacing}{'+1' if offset else ''}", "DDIMScheduler",
                        dict(timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=True), {}))
    sigma_kinds = {"default": {}, "karras": dict(use_karras_sigmas=True), "exp": dict(use_exponential_sigmas=True)}
    for spacing in ("linspace", "trailing"):
        for order in (2, 3):
            for kind, extra in [*sigma_kinds.items(), ("lu", dict(use_lu_lambdas=True))]:
                for solver_type in ("midpoint", "heun"):
                    label = f"DPMSolver++{order}M-{solver_type}/{kind}/{spacing}"
                    configs.append((label, "DPMSolverMultistepScheduler",
                                    dict(solver_order=order, algorithm_type="dpmsolver++", solver_type=solver_type,
                                         timestep_spacing=spacing, **extra), {}))
            for kind, extra in sigma_kinds.items():
                for solver_type in ("bh1", "bh2"):
                    configs.append((f"UniPC{order}-{solver_type}/{kind}/{spacing}", "UniPCMultistepScheduler",
                                    dict(solver_order=order, solver_type=solver_type, timestep_spacing=spacing,
                                         **extra), {}))
                configs.append((f"DEIS{order}/{kind}/{spacing}", "DEISMultistepScheduler",
                                dict(solver_order=order, timestep_spacing=spacing, **extra), {}))
        for kind, extra in sigma_kinds.items():
            configs.append((f"LMS/{kind}/{spacing}", "LMSDiscreteScheduler", dict(timestep_spacing=spacing, **extra),
                            {}))
            configs.append((f"Euler/{kind}/{spacing}", "EulerDiscreteScheduler",
                            dict(timestep_spacing=spacing, **extra), {}))
            configs.append((f"Heun/{kind}/{spacing}", "HeunDiscreteScheduler", dict(timestep_spacing=spacing, **extra),
                            {}))
    return configs


def run_diffusers(oracle: Oracle, z: torch.Tensor, cls_name: str, config: dict, nfe: int):
    import diffusers

    cls = getattr(diffusers, cls_name)
    scheduler = cls(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                    prediction_type="epsilon", **config)
    steps = (nfe + 1) // 2 if cls_name == "HeunDiscreteScheduler" else nfe
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    sigmas = getattr(scheduler, "sigmas", None)
    acp = scheduler.alphas_cumprod.double()
    if sigmas is not None:  # the scaled noise level s = sigma/alpha the scheduler uses at each of its timesteps
        table = {float(t): float(s) for t, s in zip(timesteps.tolist(), sigmas[: len(timesteps)].tolist(), strict=True)}
    else:
        table = {float(t): math.sqrt((1 - float(acp[int(t)])) / float(acp[int(t)])) for t in timesteps.tolist()}
    vp_input = cls_name in ("DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                            "DEISMultistepScheduler")
    s0 = table[float(timesteps[0])]
    x = z.clone() if vp_input else z * math.sqrt(1 + s0 * s0)  # the same VP-space noise x_T = z for everyone
    oracle.nfe = 0
    for t in timesteps:
        model_in = scheduler.scale_model_input(x, t)
        s = table[float(t)]
        alpha = 1 / math.sqrt(1 + s * s)
        sigma = s * alpha
        # model_in is the VP-space x_t at (alpha, sigma) for every scheduler here; the model answers eps
        eps = (model_in - alpha * oracle.x0(model_in, alpha, sigma)) / sigma
        x = scheduler.step(eps, t, x).prev_sample
    return x, oracle.nfe


# --------------------------------------------------------------------------------------------- k-diffusion
def load_k_diffusion_sampling():
    """k_diffusion/sampling.py (and the utils.py it imports), without the package __init__."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (pip install --no-deps k-diffusion torchsde torchdiffeq)")
    root = pathlib.Path(spec.submodule_search_locations[0])
    placeholders = []
    if importlib.util.find_spec("torchvision") is None:  # utils.py imports it for two image helpers only
        placeholders = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional"]
        sys.modules.update({name: types.ModuleType(name) for name in placeholders})
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(root)]
    sys.modules["k_diffusion"] = package
    try:
        for sub in ("utils", "sampling"):
            sub_spec = importlib.util.spec_from_file_location(f"k_diffusion.{sub}", root / f"{sub}.py")
            module = importlib.util.module_from_spec(sub_spec)
            sys.modules[f"k_diffusion.{sub}"] = module
            sub_spec.loader.exec_module(module)
            setattr(package, sub, module)
    finally:
        for name in placeholders:  # gone again, so that other libraries' torchvision checks see the truth
            del sys.modules[name]
    return package.sampling


K_SAMPLERS = {  # name: (NFE per step, deterministic options)
    "euler": (1, {}), "heun": (2, {}), "dpm_2": (2, {}), "lms": (1, {}), "dpmpp_2m": (1, {}),
    "dpmpp_2m_sde": (1, {"eta": 0.0}), "dpmpp_3m_sde": (1, {"eta": 0.0}), "dpmpp_2s_ancestral": (2, {"eta": 0.0}),
}


def run_k(K, oracle: Oracle, z: torch.Tensor, name: str, grid: str, nfe: int, s_min: float, s_max: float, a_max: float):
    x = z / a_max  # the VP-space noise z, scaled to k-diffusion's x / alpha
    oracle.nfe = 0
    if name == "dpm_fast":
        out = K.sample_dpm_fast(oracle.k_denoiser, x, s_min, s_max, nfe, disable=True)
        return out, oracle.nfe
    per_step, options = K_SAMPLERS[name]
    steps = (nfe + 1) // 2 if per_step == 2 else nfe
    make = K.get_sigmas_karras if grid == "karras" else K.get_sigmas_exponential
    sigmas = make(steps, s_min, s_max).double()
    out = getattr(K, f"sample_{name}")(oracle.k_denoiser, x, sigmas, disable=True, **options)
    return out, oracle.nfe


# ---------------------------------------------------------------------------------------------------- main
def benchmark(name: str, gmm, n: int, nfes, schedule, K, seed: int = 0, peers: bool = True) -> dict:
    oracle = Oracle(gmm, schedule)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, gmm.dim, generator=g, dtype=torch.float64)
    truth = gmm.sample(n, generator=torch.Generator().manual_seed(seed + 1)).double()
    other = gmm.sample(n, generator=torch.Generator().manual_seed(seed + 2)).double()

    def sliced_w2(a, b):  # the same 256 random directions for every sampler
        return sliced_wasserstein(a, b, n_projections=256, generator=torch.Generator().manual_seed(seed + 3))

    start = time.time()
    oracle.nfe = 0
    reference = deepgm.sample(oracle.denoiser(), x_T=z, sampler="rk45", grid="uniform", steps=2, rtol=1e-10,
                              atol=1e-10, dtype=torch.float64).x
    ref_nfe = oracle.nfe
    floor = {"sw2": sliced_w2(truth, other), "fd": frechet(truth, other)}
    print(f"[{name}] reference: rk45 rtol=atol=1e-10, {ref_nfe} NFE ({time.time() - start:.1f} s); "
          f"noise floor sw2 {floor['sw2']:.4f}, fd {floor['fd']:.4f}", flush=True)

    def score(x, det):
        x = x.double()
        if not bool(torch.isfinite(x).all()):  # a sampler that diverged scores infinity everywhere
            return {"rms": math.inf if det else None, "sw2": math.inf, "fd": math.inf}
        return {"rms": float((x - reference).pow(2).mean().sqrt()) if det else None,
                "sw2": sliced_w2(x, truth), "fd": frechet(x, truth)}

    rows = []  # dicts: library, label, target nfe, nfe, deterministic, metrics
    a1, s1 = schedule.alpha_sigma(torch.tensor(1.0, dtype=torch.float64))
    a0, s0 = schedule.alpha_sigma(torch.tensor(1.0 / schedule.T, dtype=torch.float64))
    s_max, s_min, a_max = float(s1 / a1), float(s0 / a0), float(a1)
    for nfe in nfes:
        for label, sampler, grid, grid_options, options, det, steps in deepgm_configs():
            x, used = run_deepgm(oracle, z, sampler, grid, steps(nfe), seed, grid_options, **options)
            rows.append(dict(library="deepgm", label=label, target=nfe, nfe=used, det=det, **score(x, det)))
        for label, cls_name, config, _ in diffusers_configs() if peers else []:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    x, used = run_diffusers(oracle, z, cls_name, config, nfe)
            except Exception as err:  # a configuration diffusers refuses: recorded, not hidden
                rows.append(dict(library="diffusers", label=label, target=nfe, nfe=None, det=True, error=str(err)[:120],
                                 rms=None, sw2=None, fd=None))
                continue
            rows.append(dict(library="diffusers", label=label, target=nfe, nfe=used, det=True, **score(x, True)))
        if K is not None and peers:
            for kname in [*K_SAMPLERS, "dpm_fast"]:
                for grid in (["karras", "exponential"] if kname != "dpm_fast" else ["log-snr"]):
                    x, used = run_k(K, oracle, z, kname, grid, nfe, s_min, s_max, a_max)
                    rows.append(dict(library="k-diffusion", label=f"{kname}/{grid}", target=nfe, nfe=used, det=True,
                                     **score(x, True)))
        print(f"[{name}] NFE {nfe} done ({time.time() - start:.0f} s)", flush=True)
    # rk45 at a ladder of tolerances: adaptive NFE, reported at what it used
    for tol in (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4):
        x, used = run_deepgm(oracle, z, "rk45", "uniform", 2, seed, rtol=tol, atol=tol)
        rows.append(dict(library="deepgm", label=f"rk45/tol={tol:g}", target=None, nfe=used, det=True,
                         **score(x, True)))
    return {"name": name, "n": n, "dim": gmm.dim, "floor": floor, "reference_nfe": ref_nfe, "rows": rows}


def best(rows, library, target, metric, det_only=False, label=None):
    pool = [r for r in rows if r["library"] == library and r["target"] == target and r.get(metric) is not None
            and r["nfe"] is not None and r["nfe"] <= target and (r["det"] or not det_only)
            and (label is None or r["label"] == label)]
    return min(pool, key=lambda r: r[metric]) if pool else None


def converged(result: dict) -> dict:
    """The tightest rk45 row: the distribution error every deterministic sampler tends to as NFE grows."""
    return min((r for r in result["rows"] if r["label"].startswith("rk45/")), key=lambda r: r["rms"])


def report(result: dict, nfes, libraries) -> str:
    rows, floor, ode = result["rows"], result["floor"], converged(result)
    lines = [f"### {result['name']} (D = {result['dim']}, n = {result['n']}); noise floor sw2 {floor['sw2']:.4f}, "
             f"fd {floor['fd']:.4f}; reference ODE solution: {result['reference_nfe']} NFE; the converged ODE "
             f"({ode['label']}, {ode['nfe']} NFE) has sw2 {ode['sw2']:.4f}, fd {ode['fd']:.4f}: deterministic "
             "samplers tend to these, below them is truncation error that happens to help; stochastic samplers "
             "draw fresh noise, so their sw2/fd scatter around the floor", ""]
    for metric in ("rms", "sw2", "fd"):
        note = " (deterministic samplers, to the converged ODE solution)" if metric == "rms" else ""
        lines += [f"**{metric}**" + note,
                  "", "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                  "|---|" + "---:|" * len(nfes)]
        entries = [("deepgm default " + "/".join(DEFAULT), "deepgm", "/".join(DEFAULT), False),
                   ("best deepgm", "deepgm", None, False)]
        if metric != "rms":  # every peer configuration here is deterministic: compare like with like too
            entries.append(("best deterministic deepgm", "deepgm", None, True))
        entries += [(f"best {lib}", lib, None, False) for lib in libraries if lib != "deepgm"]
        for title, lib, label, det in entries:
            cells = []
            for n in nfes:
                r = best(rows, lib, n, metric, det_only=det, label=label)
                cells.append(f"{r[metric]:.4f} ({r['label'] if label is None else r['nfe']})" if r else "—")
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
        lines.append("")
        ratio = []
        for n in GOAL_NFES:
            ours = best(rows, "deepgm", n, metric)
            ours_det = best(rows, "deepgm", n, metric, det_only=True)
            default = best(rows, "deepgm", n, metric, label="/".join(DEFAULT))
            peers = [b for b in (best(rows, lib, n, metric) for lib in libraries if lib != "deepgm") if b]
            if ours and peers and default:
                peer = min(peers, key=lambda r: r[metric])
                det = "" if metric == "rms" else f" (deterministic: {ours_det[metric] / peer[metric]:.3f})"
                ratio.append(f"NFE {n}: best deepgm / best peer = {ours[metric] / peer[metric]:.3f}{det} "
                             f"({ours['label']} vs {peer['library']} {peer['label']}); "
                             f"default / best deepgm = {default[metric] / ours[metric]:.3f}")
        lines += ["- " + r for r in ratio] + [""]
    return "\n".join(lines)


def full_table(result: dict, nfes) -> str:
    """Every configuration, every NFE: the error in `rms` (or sw2 for stochastic samplers)."""
    rows = result["rows"]
    labels = sorted({(r["library"], r["label"]) for r in rows if r["target"] is not None})
    lines = [f"#### {result['name']}: every configuration (rms for deterministic samplers, else sw2; NFE used)", "",
             "| library | sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|" + "---:|" * len(nfes)]
    for lib, label in labels:
        cells = []
        for n in nfes:
            r = next((r for r in rows if r["library"] == lib and r["label"] == label and r["target"] == n), None)
            if r is None or r["nfe"] is None:
                cells.append("error" if r is not None else "—")
            else:
                metric = "rms" if r["det"] else "sw2"
                value = r[metric]
                cells.append(f"{value:.4f}{'' if r['det'] else ' sw2'} ({r['nfe']})")
        lines.append(f"| {lib} | {label} | " + " | ".join(cells) + " |")
    rk = [r for r in rows if r["label"].startswith("rk45")]
    lines += ["", "rk45 (adaptive): " + "; ".join(f"{r['label']}: NFE {r['nfe']}, rms {r['rms']:.2e}" for r in rk), ""]
    return "\n".join(lines)


STYLE = {"deepgm default": ("C0", "-"), "best deepgm": ("C0", "--"), "best deepgm (deterministic)": ("C0", ":"),
         "best diffusers": ("C2", "-"), "best k-diffusion": ("C3", "-")}


def plot(results, nfes, libraries, out: pathlib.Path) -> pathlib.Path:
    """Error vs NFE (log-log) in one PNG: a row per metric, a column per mixture; deepgm's default, deepgm's best
    (and best deterministic, as the peers all are), each peer's best, and the two-sample floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("rms", "sw2", "fd")
    fig, axes = plt.subplots(len(metrics), len(results), figsize=(5.2 * len(results), 3.4 * len(metrics)),
                             squeeze=False)
    for col, result in enumerate(results):
        for row, metric in enumerate(metrics):
            ax = axes[row][col]
            curves = [("deepgm default", "deepgm", "/".join(DEFAULT), False), ("best deepgm", "deepgm", None, False)]
            if metric != "rms":  # rms is for deterministic samplers only already
                curves.append(("best deepgm (deterministic)", "deepgm", None, True))
            curves += [(f"best {lib}", lib, None, False) for lib in libraries if lib != "deepgm"]
            for title, lib, label, det in curves:  # x: the NFE budget (a 2-NFE-per-step sampler may use one less)
                points = [(n, r[metric]) for n in nfes
                          if (r := best(result["rows"], lib, n, metric, det_only=det, label=label))]
                colour, line = STYLE[title]
                ax.plot([p[0] for p in points], [p[1] for p in points], line, color=colour, marker="o", ms=3,
                        label=title)
            if metric != "rms":
                ax.axhline(result["floor"][metric], color="0.5", lw=1, ls="-.", label="two-sample floor")
                ax.axhline(converged(result)[metric], color="0.3", lw=1, ls=":", label="converged ODE (rk45)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(list(nfes), [str(n) for n in nfes])
            ax.minorticks_off()
            ax.set_xlabel("NFE")
            ax.set_ylabel(metric)
            ax.set_title(f"{result['name']}: {metric}", fontsize=10)
            ax.grid(alpha=0.3, which="both")
            if row == 0 and col == 0 or metric == "sw2" and col == 0:
                ax.legend(fontsize=7)
    fig.suptitle("Error vs NFE on the exact mixture denoiser (DDPM linear schedule, same noise for all)", fontsize=11)
    fig.tight_layout()
    path = out / "sampler_accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(results, nfes, libraries, out: pathlib.Path) -> str:
    """The markdown table, the JSON of every row and the PNG, into out."""
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(report(r, nfes, libraries) for r in results)
    (out / "sampler_accuracy.md").write_text(text + "\n\n" + "\n".join(full_table(r, nfes) for r in results))
    (out / "sampler_accuracy.json").write_text(json.dumps(results, indent=1))
    plot(results, nfes, libraries, out)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="NFE 6, 10, 20 only and fewer samples")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the markdown, JSON and PNG")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results do not depend on it)")
    parser.add_argument("--keep-peers", action="store_true",
                        help="rerun deepgm's samplers only and keep the peers' rows of OUT/sampler_accuracy.json "
                             "(same seeds, so the same noise, reference and true samples)")
    parser.add_argument("--render", metavar="JSON", help="only redraw the markdown and PNG from a saved JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    if args.render:
        results = json.loads(pathlib.Path(args.render).read_text())
        nfes = sorted({r["target"] for r in results[0]["rows"] if r["target"] is not None})
        libraries = list(dict.fromkeys(r["library"] for r in results[0]["rows"]))
        print(write_outputs(results, nfes, libraries, out))
        return 0
    nfes = GOAL_NFES if args.quick else NFES
    saved = json.loads((out / "sampler_accuracy.json").read_text()) if args.keep_peers else None
    try:
        K = None if saved else load_k_diffusion_sampling()
    except Exception as err:
        print(f"k-diffusion unavailable, left out: {err}")
        K = None
    if saved:
        peers = list(dict.fromkeys(r["library"] for r in saved[0]["rows"] if r["library"] != "deepgm"))
    else:
        peers = ["diffusers"] + (["k-diffusion"] if K is not None else [])
    libraries = ["deepgm", *peers]
    schedule = DiscreteVP.linear(T=1000)
    scale = 4 if args.quick else 1
    problems = [("ring 2-D", make_mixture("ring"), 4000 // scale),
                ("mixture 64-D", make_mixture("mixture", dim=64, n_modes=8, seed=0), 2000 // scale)]
    start = time.time()
    results = [benchmark(name, gmm, n, nfes, schedule, K, peers=saved is None) for name, gmm, n in problems]
    for result, old in zip(results, saved or [], strict=False):
        result["rows"] += [r for r in old["rows"] if r["library"] != "deepgm"]
    print("\n" + write_outputs(results, nfes, libraries, out))
    print(f"\nwrote {out}/sampler_accuracy.md, .json and .png in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
