"""The samplers on a held-out suite: problems that deepgm's default was never designed, chosen or calibrated on.

Every problem is scored against its data distribution (Fréchet distance and sliced W2 to fresh true samples, with
their two-sample noise floors), with the protocol of benchmarks/sampler_accuracy.py: every configuration of deepgm,
diffusers and k-diffusion on a selection draw, each library's finalists again on independent held-out draws, the
verdicts over those.

The rule that keeps these problems held out: everything about the default (`sampler="auto"`: the samplers it
chooses among, its grids and options, the pilot's size and criterion) is decided on the development problems
(benchmarks/sampler_accuracy.py's 2-D ring and random 64-D mixture on DDPM's linear schedule, the synthetic
ill-conditioned mixtures of benchmarks/pilot_criterion.py, and the trained digits networks of
benchmarks/digits_grids.py). This suite runs after those decisions and is reported apart; a change made
because of its results turns the problem it was made for into a development problem, and the README says so.

Problems (none of them in the development set when added):
- digits GMM 64-D: a 10-component full-covariance Gaussian mixture fitted by EM (scikit-learn) to the 1797 8x8
  digits scaled to [-1, 1], covariance floor 1e-3 (condition numbers ~1e2-1e4, printed); DDPM linear schedule.
  A development problem since 2026-12-07, on both its schedules: its misses at NFE 6 led to the pilot's
  criterion (which was then chosen on benchmarks/pilot_criterion.py's problems).
- digits PCA 24-D: the digits on their 24 leading principal components, scaled to unit overall variance;
  6 components (condition numbers ~40-950); the cosine schedule (diffusers: squaredcos_cap_v2).
- digits GMM 64-D, EDM: the first mixture under EDM's variance-exploding schedule (sigma 0.002 .. 80); diffusers'
  DDPM schedulers do not take it, so deepgm and k-diffusion only.
- cancer GMM 30-D: 5 full-covariance components fitted the same way to scikit-learn's breast-cancer features
  (569 x 30, z-scored then halved; condition numbers 6.5e2-3.6e3); DDPM linear schedule. Added 2026-12-07, before any
  sampler ran on it, to judge the pilot's criterion (paired Fréchet distance, chosen on synthetic development
  mixtures) after the digits 64-D mixture's miss at NFE 6 had motivated it. Its narrow miss at NFE 6 led to the
  pilot's dynamic grid (decided on the development mixtures), so it is a development problem since 2026-12-07
  (ninth session).
- diabetes GMM 10-D: 4 full-covariance components fitted the same way to scikit-learn's diabetes features
  (442 x 10, z-scored then halved; condition numbers 4.7e2-7.9e2); the cosine schedule. Added 2026-12-07 (ninth
  session), before any sampler ran on it, to judge the dynamic grid.
- trained networks as the denoiser (NETWORKS): MLP DDPMs of configs/ddpm-toy.yaml, 3000 steps, trained once into
  runs/heldout-*; their exact ODE solution from rk45 at rtol = atol = 1e-6; the distribution metrics are against the
  mixture each was trained on, so the converged ODE's own error is a floor. The grid MLP (4x4 grid mixture) is a
  development problem since 2026-12-07 (its results chose the pilot's size) and is reported for the record; the
  2-D and 8-D random-mixture networks replaced it as held-out problems that day, before any sampler ran on them.
  Their results showed that sampling from t = 1 is what fails on all three (benchmarks/start_time.py), so they are
  development problems for the start of sampling; the 16-D and 4-D (v-prediction) networks are fresh (FRESH).

The goal (issue "Samplers true to their papers"): at NFE 6, 10 and 20, on every problem, the default's FD and SW2 are
<= 0.8x those of the best peer configuration, or within the noise floor's interval: the default's score is a mean
over the held-out draws, so the bound is what such a mean of an exact sampler's scores stays under, the floor's
mean + 2 sd / sqrt(draws), from FLOOR_DRAWS independent pairs of true-sample sets. Writes sampler_heldout.md and
.json.

Run:  python benchmarks/sampler_heldout.py [--quick] [--threads 2]   (--quick: fewer, smaller draws)
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import sampler_accuracy as sa  # noqa: E402  (the shared protocol)

from deepgm.data.toy import GaussianMixture  # noqa: E402
from deepgm.diffusion.schedule_registry import make_schedule  # noqa: E402
from deepgm.diffusion.schedules import DiscreteVP  # noqa: E402
from deepgm.files import write_text  # noqa: E402

GOAL_RATIO = 0.8
METRICS = ("fd", "sw2")


def fitted_mixture(x, components: int, seed: int = 0, floor: float = 1e-3) -> GaussianMixture:
    from sklearn.mixture import GaussianMixture as EM

    em = EM(components, covariance_type="full", reg_covar=floor, random_state=seed, max_iter=200).fit(x)
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)
    return GaussianMixture(t(em.weights_), t(em.means_), t(em.covariances_))


def condition_numbers(gmm: GaussianMixture) -> tuple[float, float]:
    eig = torch.linalg.eigvalsh(gmm.covs)
    cond = eig[:, -1] / eig[:, 0]
    return float(cond.min()), float(cond.max())


def trained_mlp(run_dir: pathlib.Path, overrides: list[str]):
    """An MLP DDPM of configs/ddpm-toy.yaml with these overrides (trained here once, 3000 steps), in float64, as
    x0_fn(x, alpha, sigma), with its schedule and the mixture it was trained on."""
    from deepgm.config import load_config
    from deepgm.data.toy import make_mixture
    from deepgm.pipeline import load_run, train_run

    config = load_config("ddpm-toy", [*overrides, "train.steps=3000"])
    if not (run_dir / "checkpoints" / "latest").is_file():
        train_run(config, run_dir, resume=(run_dir / "config.yaml").exists())
    denoiser = load_run(run_dir).model.denoiser.double().eval()
    schedule = denoiser.schedule

    def x0_fn(x, alpha, sigma):
        t = schedule.t_from_log_snr(torch.tensor(2 * math.log(alpha / sigma), dtype=torch.float64))
        with torch.no_grad():
            return denoiser(x, t.expand(len(x))).x0

    x0_fn.parameterization = denoiser.parameterization  # the oracle passes it on: it decides where "auto" starts
    data = {k: v for k, v in config["data"].items() if k not in ("name", "mixture")}
    return x0_fn, schedule, make_mixture(config["data"]["mixture"], **data)


# The trained networks: name -> (run folder, overrides of configs/ddpm-toy.yaml, diffusers' beta schedule). The grid
# MLP became a development problem on 2026-12-07, when its results led to the pilot's size (PILOT_NUMBERS in
# deepgm.diffusion.calibration); the two random-mixture networks were added then, before any sampler ran on them, as
# its held-out replacements: a smooth 2-D density of 12 overlapping anisotropic components, and 8 separated modes in
# 8-D on the cosine schedule. Their first run (2026-12-07) found that all three networks' ODE is far from the data
# because sampling starts at t = 1 (benchmarks/start_time.py): any rule for the start is built on all three, and
# must be judged on fresh networks added here before it is run. The last two were added (and trained) for that on
# 2026-12-07, after that finding and before any sampler or start rule ran on them: keep them out of every
# experiment until a start rule is fixed on the development problems (benchmarks/start_time.py leaves them out).
NETWORKS = {
    "grid MLP 2-D, linear (development since 2026-12-07)": ("heldout-grid-mlp", ["data.mixture=grid"], "linear"),
    "mixture MLP 2-D, linear": ("heldout-mixture2-mlp", ["data.mixture=mixture", "data.dim=2", "data.n_modes=12",
                                                         "data.scale=2.0", "data.seed=4"], "linear"),
    "mixture MLP 8-D, cosine": ("heldout-mixture8-mlp", ["data.mixture=mixture", "data.dim=8", "data.n_modes=8",
                                                         "data.seed=3", "model.schedule.name=cosine"],
                                "squaredcos_cap_v2"),
    "mixture MLP 16-D, linear": ("heldout-mixture16-mlp", ["data.mixture=mixture", "data.dim=16", "data.n_modes=6",
                                                           "data.seed=11"], "linear"),
    "mixture MLP 4-D, cosine, v-prediction": ("heldout-mixture4v-mlp", [
        "data.mixture=mixture", "data.dim=4", "data.n_modes=10", "data.seed=12", "model.schedule.name=cosine",
        "model.parameterization=v"], "squaredcos_cap_v2"),
}
FRESH = ("mixture MLP 16-D", "mixture MLP 4-D")  # held out from every experiment so far (see above)


def problems(quick: bool, runs: pathlib.Path, only: list[str] | None = None):
    """The held-out problems whose names start with one of `only` (all by default); the network trains only if
    its problem is asked for."""
    from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
    from sklearn.decomposition import PCA

    digits = load_digits().data / 8.0 - 1.0
    gmm64 = fitted_mixture(digits, 10)
    pca = PCA(24, random_state=0).fit_transform(digits)
    gmm24 = fitted_mixture(pca / pca.std(), 6)  # one overall scale: the spectrum's decay stays in the covariances
    cancer = load_breast_cancer().data
    gmm30 = fitted_mixture((cancer - cancer.mean(0)) / cancer.std(0) / 2, 5)  # z-scores / 2: image-like scale
    diabetes = load_diabetes().data
    gmm10 = fitted_mixture((diabetes - diabetes.mean(0)) / diabetes.std(0) / 2, 4)
    wanted = lambda name: not only or any(name.startswith(o) for o in only)
    k = 4 if quick else 1
    linear, cosine, edm = DiscreteVP.linear(T=1000), DiscreteVP.cosine(T=1000), make_schedule("edm")
    # name, data, schedule, diffusers' beta schedule (None: no diffusers), x0_fn, n, n_eval, reference rk45 tolerance
    # (the network's ODE at 1e-10 takes ~10^4 evaluations a draw; at 1e-6 its rms is still far below any sampler's)
    networks = []
    for name, (folder, overrides, betas) in NETWORKS.items():
        if wanted(name):
            x0_fn, schedule, mixture = trained_mlp(runs / folder, overrides)
            networks.append((name, mixture, schedule, betas, x0_fn, 1000 // k, 4000 // k, 1e-6))
    return [p for p in [
        ("digits GMM 64-D, linear", gmm64, linear, "linear", None, 1000 // k, 4000 // k, 1e-10),
        ("digits PCA 24-D, cosine", gmm24, cosine, "squaredcos_cap_v2", None, 1000 // k, 4000 // k, 1e-10),
        ("digits GMM 64-D, EDM", gmm64, edm, None, None, 1000 // k, 4000 // k, 1e-10),
        ("cancer GMM 30-D, linear", gmm30, linear, "linear", None, 1000 // k, 4000 // k, 1e-10),
        ("diabetes GMM 10-D, cosine", gmm10, cosine, "squaredcos_cap_v2", None, 1000 // k, 4000 // k, 1e-10),
        *networks,
    ] if wanted(p[0])]


# deepgm here: the default, and the peers' usual choices by their deepgm names, for context (the goal is the default's)
DEEPGM = ("auto/calibrated", "dpmpp-2m/log-snr", "unipc/log-snr", "deis/karras", "dpmpp-3m-exact/log-snr")


FLOOR_DRAWS = 30  # independent pairs of true-sample sets behind each problem's noise floor interval


def floor_draws(gmm, schedule, n: int, count: int = FLOOR_DRAWS) -> dict[str, list[float]]:
    """Each metric of `count` independent pairs of true-sample sets of n points (Draw's floor, with its own
    directions for sw2): the distribution an exact sampler's score would be drawn from. Cheap: no sampler runs."""
    oracle = sa.Oracle(gmm, schedule)
    draws = [sa.Draw(oracle, n, 10_000 + 10 * k, reference=False).floor for k in range(count)]
    return {m: [d[m] for d in draws] for m in METRICS}


def floor_interval(result: dict, metric: str) -> tuple[float, float]:
    """The floor's mean and the upper end of its interval for a mean over the held-out draws, which is what the
    default's score is: mean + 2 sd / sqrt(draws), sd from the FLOOR_DRAWS pairs. (Until 2026-12-07 it was mean + 2 sd
    of the three held-out draws' own floors: an sd from three values, which on the diabetes mixture was a third of
    the sd that 20 pairs show.)"""
    values = result["floor_draws"][metric]
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, mean + 2 * sd / math.sqrt(len(result["held_out"]))


def goal_rows(result: dict) -> list[dict]:
    """Per goal NFE and metric: the default against the best peer configuration (means over the held-out draws)."""
    out = []
    for nfe in sa.GOAL_NFES:
        for metric in METRICS:
            _, default, peer = sa.contenders(result["rows"], nfe, metric)
            if not (default and peer):
                continue
            floor, bound = floor_interval(result, metric)
            ratio = default[metric] / peer[metric]
            met = ratio <= GOAL_RATIO or default[metric] <= bound
            out.append(dict(nfe=nfe, metric=metric, default=default[metric], peer=peer[metric],
                            peer_label=f"{peer['library']} {peer['label']}", ratio=ratio, floor=floor,
                            floor_bound=bound, verdict="met" if met else "missed"))
    return out


def report(results: list[dict]) -> str:
    lines = ["## Held-out suite (benchmarks/sampler_heldout.py)", "",
             f"The default's FD and SW2 against the best peer configuration (means over {sa.REPLICATES} held-out "
             f"draws); goal: ratio <= {GOAL_RATIO}, or the default within the noise floor's interval (the mean over "
             f"{FLOOR_DRAWS} pairs of true-sample sets, and its bound for a mean of {sa.REPLICATES} draws: mean + 2 sd "
             f"/ sqrt({sa.REPLICATES})).", "",
             "| problem | NFE | metric | default | best peer | ratio | floor (bound) | goal |",
             "|---|---:|---|---:|---|---:|---:|---|"]
    for result in results:
        for g in result["heldout_goal"]:
            lines.append(f"| {result['name']} | {g['nfe']} | {g['metric']} | {g['default']:.4f} | {g['peer']:.4f} "
                         f"({g['peer_label']}) | {g['ratio']:.3f} | {g['floor']:.4f} ({g['floor_bound']:.4f}) | "
                         f"{g['verdict']} |")
    lines += ["", "Covariance condition numbers (min, max over components): "
              + "; ".join(f"{r['name']}: {r['conditions'][0]:.3g} .. {r['conditions'][1]:.3g}" for r in results
                          if r.get("conditions")), ""]
    calibrated = []
    for result in results:
        for key, c in sorted(result["calibrations"].items()):
            if key.startswith(sa.DEFAULT_SAMPLER + "/"):
                calibrated.append(f"{result['name']} NFE {key.split('/')[-1]}: {c['chosen']} "
                                  f"(pilot {c['pilot_nfe']} x {c['pilot']})")
    lines += ["What the default chose: " + "; ".join(calibrated), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="draws 4x smaller")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", help="problem names starting with these words")
    parser.add_argument("--smoke", action="store_true", help="a few configurations on tiny draws: checks the script")
    parser.add_argument("--runs", default="runs", help="where the trained network's run goes")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--fresh", action="store_true",
                        help="also run the FRESH networks: this spends them, so only to judge a fixed start rule")
    parser.add_argument("--render", nargs="+", metavar="JSON",
                        help="only write the report of saved results (several runs' JSON files are joined)")
    args = parser.parse_args(argv)
    if args.render:
        write([r for path in args.render for r in json.loads(pathlib.Path(path).read_text())], pathlib.Path(args.out))
        return 0
    torch.set_num_threads(args.threads)
    K = sa.load_k_diffusion_sampling()
    start = time.time()
    results = []
    names = ["digits", "cancer", "diabetes", *(name for name in NETWORKS if args.fresh or not name.startswith(FRESH))]
    for name, gmm, schedule, betas, x0_fn, n, n_eval, tol in problems(args.quick, pathlib.Path(args.runs),
                                                                      args.only or names):
        configs = [c for c in sa.deepgm_configs() if c.label in DEEPGM]
        configs += sa.k_configs(K) + (sa.diffusers_configs(betas) if betas else [])
        if args.smoke:
            configs = [c for c in configs if c.label == DEEPGM[0]] + configs[-3:]
            n, n_eval, tol = 64, 128, max(tol, 1e-5)
        result = sa.benchmark(name, gmm, n, n_eval, 0, sa.GOAL_NFES, schedule, configs, x0_fn=x0_fn, large=False,
                              reference_tol=tol)
        result["floor_draws"] = floor_draws(gmm, schedule, n_eval)
        result["heldout_goal"] = goal_rows(result)
        result["conditions"] = condition_numbers(gmm) if x0_fn is None else None
        results.append(result)
        print(report([result]), flush=True)
    write(results, pathlib.Path(args.out))
    print(f"in {time.time() - start:.0f} s")
    return 0


def write(results: list[dict], out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = report(results)
    write_text(out / "sampler_heldout.md", text + "\n\n" + "\n".join(
        sa.report(r, sa.GOAL_NFES, ["deepgm", "diffusers", "k-diffusion"]) for r in results))
    # compact: indented, a whole run's JSON was 2.3 MB
    write_text(out / "sampler_heldout.json", json.dumps(results, separators=(",", ":")))
    print(text)
    print(f"wrote {out}/sampler_heldout.md and .json")


if __name__ == "__main__":
    raise SystemExit(main())
