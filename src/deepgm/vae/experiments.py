"""The posterior-collapse study, the model-comparison table and the VAE pictures.

`run_collapse` trains on 8x8 digits, with one encoder and one gated-PixelCNN decoder (configs/pixelcnn-vae-digits):
  (a) plainly, (b) with KL warm-up, (c) with free bits, (d) with aggressive encoder updates (He et al. 2019),
plus (e) the same VAE with an MLP decoder as reference. It probes KL, active units and I_q(x; z) on the test split
at every checkpoint and writes collapse.md / collapse.json (ELBO, IWAE NLL, KL, active units, MI) and collapse.png
(KL and active units over training).

`comparison_table` puts trained runs on one scale: test NLL in bits/dim over the data's 17 levels (nats / (D ln 2))
from IWAE_k for the VAEs and from the discrete VLB, the continuous ELBO and the probability-flow ODE for diffusion
runs, with ELBO, KL, active units and FID.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from deepgm.data import Dataset
from deepgm.files import write_json, write_text
from deepgm.vae.diagnostics import diagnose, elbo_stats, posterior_means
from deepgm.vae.vae import LatentVariableModel

# ------------------------------------------------------------------------------------------------ pictures


def _pca_2d(z: torch.Tensor) -> torch.Tensor:
    """Project (N, Dz) onto its two leading principal directions (the identity for Dz = 2)."""
    z = z.double()
    if z.shape[1] <= 2:
        return z
    centred = z - z.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:2].T  # (N, 2)


def latent_scatter(z: torch.Tensor, labels: torch.Tensor | None, path: Path, title: str = "") -> Path:
    """Posterior means in 2-D (PCA when Dz > 2), coloured by class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = _pca_2d(z).numpy()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    if labels is None:
        ax.scatter(p[:, 0], p[:, 1], s=6, alpha=0.7, lw=0)
    else:
        points = ax.scatter(p[:, 0], p[:, 1], c=labels.numpy(), cmap="tab10", s=8, alpha=0.8, lw=0, vmin=-0.5,
                            vmax=9.5)
        fig.colorbar(points, ax=ax, ticks=range(10), label="class")
    ax.set_xlabel("z1" if z.shape[1] <= 2 else "PC 1 of E_q[z|x]")
    ax.set_ylabel("z2" if z.shape[1] <= 2 else "PC 2 of E_q[z|x]")
    ax.set_title(title or "test posterior means")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


@torch.no_grad()
def vae_pictures(model: LatentVariableModel, test: Dataset, out_dir: str | Path, seed: int = 0) -> list[Path]:
    """Reconstructions next to inputs, prior samples (and their decoder means, same z), a latent scatter by class,
    latent interpolations and, for a hierarchy, samples with the top groups fixed and the lower ones resampled."""
    from deepgm.viz import save_image_grid, save_strip

    out_dir = Path(out_dir)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    if not test.is_image:
        return []
    paths = []
    batch = test.batch(torch.arange(min(12, len(test))))
    recon = model.reconstruct(batch, g)
    paths.append(save_strip([batch["x"], recon], out_dir / "reconstructions.png", labels=["input", "recon"]))
    cond = {"y": torch.arange(100) // 10 % model.num_classes} if model.num_classes else None
    n = 100 if model.num_classes else 64
    z_seed = int(torch.randint(0, 2**31, (1,), generator=g))
    for name, mean in (("prior_samples.png", False), ("prior_sample_means.png", True)):  # x ~ p(x|z) and E[x|z]
        x = model.generate(n, torch.Generator().manual_seed(z_seed), cond, mean=mean)
        paths.append(save_image_grid(x.clamp(-1, 1), out_dir / name, nrow=10 if model.num_classes else 8))
    means = posterior_means(model, test, seed=seed, samples=4)
    paths.append(latent_scatter(means, test.y, out_dir / "latent_scatter.png"))
    paths.append(_interpolations(model, test, out_dir / "interpolations.png", g))
    if len(model.group_dims) > 1:
        paths.extend(_fixed_top_groups(model, out_dir, g))
    return paths


def _interpolations(model, test: Dataset, path: Path, g: torch.Generator, steps: int = 9, pairs: int = 6) -> Path:
    """Decoded means along straight lines between the posterior latents of test pairs (each group's, for HVAEs)."""
    from deepgm.viz import save_strip

    a = test.batch(torch.arange(pairs))
    b = test.batch(torch.arange(pairs, 2 * pairs))
    weights = torch.linspace(0, 1, steps)
    rows = []
    if len(model.group_dims) == 1:
        za = model.encode(model.head.observe(a["x"], g), a.get("y") if model.num_classes else None)[0]
        zb = model.encode(model.head.observe(b["x"], g), a.get("y") if model.num_classes else None)[0]
        for i in range(pairs):
            z = torch.stack([(1 - w) * za[i] + w * zb[i] for w in weights])  # (steps, Dz)
            y = {"y": a["y"][i].expand(steps)} if model.num_classes else None
            rows.append(model.generate(steps, g, y, z=z, mean=True).clamp(-1, 1))
    else:
        za = model.top_down(model.bottom_up(model.head.observe(a["x"], g)), pairs, g)["z"]
        zb = model.top_down(model.bottom_up(model.head.observe(b["x"], g)), pairs, g)["z"]
        for i in range(pairs):
            fixed = [torch.stack([(1 - w) * p[i] + w * q[i] for w in weights]) for p, q in zip(za, zb, strict=True)]
            rows.append(model.generate(steps, g, fixed=fixed, mean=True).clamp(-1, 1))
    return save_strip(rows, path)


def _fixed_top_groups(model, out_dir: Path, g: torch.Generator, rows: int = 8, cols: int = 10) -> list[Path]:
    """One picture per depth m: each row keeps z_1..z_m of one prior draw and resamples the groups below."""
    from deepgm.viz import save_strip

    paths = []
    for m in range(1, len(model.group_dims)):
        top = model.prior_latents(rows, g)[:m]
        strips = [model.generate(cols, g, fixed=[z[r:r + 1].expand(cols, -1) for z in top]).clamp(-1, 1)
                  for r in range(rows)]
        paths.append(save_strip(strips, out_dir / f"fixed_top{m}_of_{len(model.group_dims)}.png"))
    return paths


# ---------------------------------------------------------------------------------------- collapse study

COLLAPSE_BASE = "pixelcnn-vae-digits"


def collapse_variants(steps: int) -> dict[str, list[str]]:
    """The five runs of the study as config overrides of configs/pixelcnn-vae-digits.yaml."""
    return {
        "pixelcnn-plain": [],
        "pixelcnn-warmup": [f"model.warmup_steps={steps // 2}"],
        "pixelcnn-freebits": ["model.free_bits=0.25", "model.free_bits_mode=dim"],
        "pixelcnn-aggressive": [f"model.aggressive={{inner_steps: 5, until: {steps // 4}, lr: 1.0e-3}}"],
        "mlp-reference": ["model.decoder=mlp"],
    }


COLLAPSE_LABELS = {
    "pixelcnn-plain": "(a) PixelCNN decoder, plain",
    "pixelcnn-warmup": "(b) PixelCNN + KL warm-up",
    "pixelcnn-freebits": "(c) PixelCNN + free bits 0.25/dim",
    "pixelcnn-aggressive": "(d) PixelCNN + aggressive encoder",
    "mlp-reference": "(e) MLP decoder (reference)",
}


@torch.no_grad()
def checkpoint_probes(run_dir: Path, model: LatentVariableModel, test: Dataset, n: int | None = None) -> list[dict]:
    """Test KL, active units and ELBO at every checkpoint of a run (raw weights)."""
    from deepgm.train import load_weights

    records = []
    for ckpt in sorted((run_dir / "checkpoints").glob("step-*")):
        if ckpt.name.endswith(".tmp") or not (ckpt / "trainer.json").is_file():
            continue
        model.load_state_dict(load_weights(ckpt, which="raw"))
        model.eval()
        stats = elbo_stats(model, test, n)
        activity = posterior_means(model, test, n, samples=4).double().var(0)
        records.append({"step": json.loads((ckpt / "trainer.json").read_text())["step"], "kl_nats": stats["kl_nats"],
                        "elbo_bpd": stats["elbo_bpd"], "active_units": int((activity > 0.01).sum())})
    return records


def run_collapse(out_dir: str | Path, steps: int | None = None, k: int = 200, overrides: list[str] | None = None,
                 only: list[str] | None = None, progress: bool = True, n_test: int | None = None) -> dict:
    """Train (or reuse, when already complete) the five runs under out_dir and write the table and the plot."""
    from deepgm.config import load_config
    from deepgm.pipeline import load_data, load_run, train_run

    if (steps is not None and steps < 1) or k < 1:
        raise ValueError(f"the collapse study needs steps >= 1 and k >= 1, got steps={steps}, k={k}")
    base = load_config(COLLAPSE_BASE, overrides)
    steps = base["train"]["steps"] if steps is None else steps
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, extra in collapse_variants(steps).items():
        if only and name not in only:
            continue
        config = load_config(COLLAPSE_BASE, [*(overrides or []), f"train.steps={steps}", "train.keep_checkpoints=0",
                                             f"train.checkpoint_every={max(1, steps // 10)}", *extra])
        config["name"] = name
        run_dir = out_dir / name
        done = (run_dir / "checkpoints" / "latest").is_file() and \
            json.loads((run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
                        / "trainer.json").read_text())["step"] >= steps
        if not done:
            if progress:
                print(f"[collapse] training {name} ({steps} steps) -> {run_dir}", flush=True)
            train_run(config, run_dir, resume=(run_dir / "config.yaml").exists(), progress=False)
        run = load_run(run_dir, weights="raw")
        test = load_data(run.config, "test")
        probes = checkpoint_probes(run_dir, run.model, test, n_test)
        run = load_run(run_dir, weights="raw")
        final = diagnose(run.model, test, n_test, seed=0, k=k, mi_examples=n_test or len(test))
        results[name] = {"label": COLLAPSE_LABELS[name], "overrides": extra, "probes": probes,
                         "strong_units": sum(a > 0.5 for a in final["activity"]), **final}
        if progress:
            print(f"[collapse] {name}: IWAE NLL {final['nll_bpd']:.4f} bits/dim, KL {final['kl_nats']:.2f} nats, "
                  f"AU {final['active_units']}/{final['latent_dim']}, MI {final['mutual_information']:.3f}", flush=True)
    summary = {"steps": steps, "iwae_k": k, "levels": base["data"].get("levels", 17), "runs": results,
               "note": "test split of 8x8 digits, 17 levels, raw (non-EMA) weights; NLL = -IWAE_k in bits/dim "
                       "= nats / (64 ln 2); AU: Cov_x E_q[z_u] > 0.01; MI: I_q(x; z) in nats"}
    write_json(out_dir / "collapse.json", summary)
    write_text(out_dir / "collapse.md", collapse_markdown(summary))
    plot_collapse(results, out_dir / "collapse.png")
    return summary


def collapse_markdown(summary: dict) -> str:
    """The collapse table as Markdown."""
    k = summary["iwae_k"]
    lines = [f"| run | test NLL, IWAE_{k} (bits/dim) | NLL (nats) | ELBO (bits/dim) | KL (nats) | active units "
             f"(A_u > 0.01) | A_u > 0.5 | max A_u | I_q(x;z) (nats) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["runs"].values():
        strong = r.get("strong_units", sum(a > 0.5 for a in r.get("activity", [])))
        lines.append(f"| {r['label']} | {r['nll_bpd']:.4f} ± {r['nll_bpd_ci95']:.4f} | {r['nll_nats']:.2f} | "
                     f"{r['elbo_bpd']:.4f} | {r['kl_nats']:.2f} | {r['active_units']}/{r['latent_dim']} | "
                     f"{strong} | {max(r.get('activity', [float('nan')])):.3f} | {r['mutual_information']:.3f} |")
    lines.append("")
    lines.append(f"{summary['steps']} training steps each; {summary['note']}.")
    return "\n".join(lines) + "\n"


def plot_collapse(results: dict, path: Path) -> Path:
    """KL (nats) and active units on the test split over training, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results.values():
        steps = [p["step"] for p in r["probes"]]
        axes[0].plot(steps, [p["kl_nats"] for p in r["probes"]], marker="o", ms=3, label=r["label"])
        axes[1].plot(steps, [p["active_units"] for p in r["probes"]], marker="o", ms=3, label=r["label"])
    axes[0].set_ylabel("KL(q(z|x) || p(z)), nats (test)")
    axes[1].set_ylabel("active units (test)")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------- comparison table


@torch.no_grad()
def evaluate_latent_run(run, test: Dataset, k: int, n_samples: int, seed: int = 0, n: int | None = None) -> dict:
    """IWAE_k NLL, ELBO, KL, active units, I_q(x; z) and FID of a trained VAE or HVAE."""
    from deepgm.eval import evaluate_samples, get_feature_net
    from deepgm.pipeline import draw_samples

    out = diagnose(run.model, test, n, seed, k=k, mi_examples=500)
    out.pop("activity", None)
    out.pop("kl_per_dim", None)
    if test.is_image and test.num_classes:
        result, labels = draw_samples(run.model, run.data, n_samples, "", 0, seed)
        spec = {key: v for key, v in run.config["data"].items() if key != "name"}
        features = get_feature_net(run.config["data"]["name"], spec)
        out.update(evaluate_samples(result.x.clamp(-1, 1).cpu(), features, run.data.x, test.x, labels=labels))
    return out


def _diffusion_row(run, test: Dataset, n: int | None, n_samples: int, seed: int, ode: bool) -> dict:
    """Discrete VLB (discrete schedules), continuous ELBO, ODE NLL and FID of a diffusion run, computed here
    (nothing is written into the run's directory)."""
    from deepgm.diffusion.likelihood import elbo_nll, ode_nll
    from deepgm.eval import evaluate_samples, get_feature_net
    from deepgm.pipeline import draw_samples, heldout_bits_per_dim

    x0 = test.x[:n] if n else test.x
    cond = {"y": test.y[: len(x0)]} if run.model.num_classes and test.y is not None else None
    row: dict = {}
    if run.model.schedule.T:
        vlb = heldout_bits_per_dim(run.model, test, n, seed, progress=False)
        row["vlb"] = {"bpd": vlb["test_bpd"], "bpd_ci95": vlb["test_bpd_ci95"]}
    row["elbo"] = elbo_nll(run.model.denoiser, x0, test.levels, 64, torch.Generator().manual_seed(seed + 1),
                           cond).summary()
    if ode:
        row["ode"] = ode_nll(run.model.denoiser, x0, test.levels, cond, "hutchinson", 1,
                             generator=torch.Generator().manual_seed(seed)).summary()
    spec = run.config["eval"]
    result, labels = draw_samples(run.model, run.data, n_samples, spec["sampler"], spec["steps"], seed)
    features = get_feature_net(run.config["data"]["name"], {k: v for k, v in run.config["data"].items()
                                                           if k != "name"})
    row["fid"] = evaluate_samples(result.x.clamp(-1, 1).cpu(), features, run.data.x, test.x, labels=labels)["fid"]
    return row


def comparison_table(run_dirs: list[str | Path], out: str | Path, k: int = 1000, n_samples: int = 1000,
                     seed: int = 0, n: int | None = None, progress: bool = True, ode: bool = True) -> dict:
    """Evaluate each run on its test split and write out.md / out.json: one row per bound."""
    from deepgm.pipeline import load_data, load_run

    rows = []
    for run_dir in map(Path, run_dirs):
        run = load_run(run_dir, weights="ema")
        test = load_data(run.config, "test")
        conditional = bool(getattr(run.model, "num_classes", None))
        name = run.config.get("name") or run_dir.name
        if progress:
            print(f"[table] evaluating {name} ({type(run.model).__name__}) ...", flush=True)
        if isinstance(run.model, LatentVariableModel):
            m = evaluate_latent_run(run, test, k, n_samples, seed, n)
            rows.append({"run": name, "model": type(run.model).__name__, "conditional": conditional,
                         "bound": f"IWAE_{k}", "nll_bpd": m["nll_bpd"], "nll_bpd_ci95": m["nll_bpd_ci95"],
                         "nll_nats": m["nll_nats"], "elbo_bpd": m["elbo_bpd"], "kl_nats": m["kl_nats"],
                         "active_units": f"{m['active_units']}/{m['latent_dim']}", "fid": m.get("fid"),
                         "fid_floor": m.get("fid_floor"), "head": run.model.head.describe()})
        else:
            d = _diffusion_row(run, test, n, n_samples, seed, ode)
            names = {"vlb": "discrete VLB", "elbo": "continuous ELBO", "ode": "ODE NLL (dequantised)"}
            for key, label in names.items():
                if key not in d:
                    continue
                r = d[key]
                rows.append({"run": name, "model": type(run.model).__name__, "conditional": conditional,
                             "bound": label, "nll_bpd": r["bpd"], "nll_bpd_ci95": r["bpd_ci95"],
                             "nll_nats": r["bpd"] * math.prod(test.shape) * math.log(2), "fid": d["fid"]})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"iwae_k": k, "rows": rows,
               "note": "test split; NLL in bits/dim = nats / (D ln 2) for a discrete distribution over the data's "
                       "levels (17 for digits); conditional rows bound -log p(x | y)"}
    write_json(out.with_suffix(".json"), summary)
    write_text(out.with_suffix(".md"), table_markdown(summary))
    return summary


def table_markdown(summary: dict) -> str:
    """The comparison table as Markdown."""
    def f(v, fmt):
        return "—" if v is None else format(v, fmt)

    lines = ["| run | model | bound | test NLL (bits/dim) | NLL (nats) | ELBO (bits/dim) | KL (nats) | active units "
             "| FID |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        cond = " (p(x|y))" if r["conditional"] else ""
        nll = f"{r['nll_bpd']:.4f} ± {r['nll_bpd_ci95']:.4f}" if r.get("nll_bpd_ci95") else f(r["nll_bpd"], ".4f")
        lines.append(f"| {r['run']} | {r['model']}{cond} | {r['bound']} | {nll} | {f(r['nll_nats'], '.2f')} | "
                     f"{f(r.get('elbo_bpd'), '.4f')} | {f(r.get('kl_nats'), '.2f')} | {r.get('active_units', '—')} | "
                     f"{f(r.get('fid'), '.2f')} |")
    lines.append("")
    lines.append(summary["note"] + ".")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ hooks for the pipeline


def iwae_summary(model: LatentVariableModel, test: Dataset, k: int, n: int | None = None, seed: int = 0) -> dict:
    """-IWAE_k per test example as the pipeline's NLL summary (bits/dim with a 95% interval, nats, n, nfe, note)."""
    from deepgm.diffusion.likelihood import NLL
    from deepgm.likelihood import bits_per_dim
    from deepgm.vae.diagnostics import iwae_per_example

    nats = -iwae_per_example(model, test, k, n, seed)
    note = (f"importance-weighted bound IWAE_{k} (Burda et al. 2016) of a {type(model).__name__}; "
            f"{model.head.describe()}")
    return NLL(nats=nats, bpd=bits_per_dim(nats, model.dims), nfe=k, note=note).summary()


def evaluate_latent(model: LatentVariableModel, test: Dataset, spec: dict, run_dir: str | Path,
                    seed: int = 0) -> dict:
    """What `deepgm eval` adds for a VAE: test NLL from IWAE_k (k = eval.iwae_k), ELBO terms, active units,
    I_q(x; z), and the pictures (reconstructions, prior samples, latent scatter, interpolations)."""
    k = int(spec.get("iwae_k", 100))
    d = diagnose(model, test, seed=seed, k=k, mi_examples=500)
    out = {"test_bpd": d["nll_bpd"], "test_bpd_ci95": d["nll_bpd_ci95"], "test_nll_nats": d["nll_nats"],
           "bpd_examples": d["examples"], "bpd_levels": test.levels, "iwae_k": k,
           "bpd_note": f"-IWAE_{k} on the test split; {model.head.describe()}",
           **{key: d[key] for key in ("elbo_nats", "elbo_bpd", "rec_nats", "kl_nats", "kl_per_group",
                                      "active_units", "active_units_per_group", "latent_dim",
                                      "mutual_information")}}
    vae_pictures(model, test, run_dir, seed)
    return out
