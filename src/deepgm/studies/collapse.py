"""The posterior-collapse study (docs/vae.md).

`run_collapse` trains on 8x8 digits, with one encoder and one gated-PixelCNN decoder (configs/pixelcnn-vae-digits):
  (a) plainly, (b) with KL warm-up, (c) with free bits, (d) with aggressive encoder updates (He et al. 2019),
plus (e) the same VAE with an MLP decoder as reference. It probes KL, active units and I_q(x; z) on the test split
at every checkpoint and writes collapse.md / collapse.json (ELBO, IWAE NLL, KL, active units, MI) and collapse.png
(KL and active units over training). A study sits above the run layer: it trains and loads runs through it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deepgm.config import load_config
from deepgm.data import Dataset
from deepgm.files import write_json, write_text
from deepgm.pipeline import load_data, load_run, train_run
from deepgm.train import load_weights
from deepgm.vae.diagnostics import diagnose, elbo_stats, posterior_means
from deepgm.viz.plots import save_figure

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
def checkpoint_probes(run_dir: Path, model, test: Dataset, n: int | None = None) -> list[dict]:
    """Test KL, active units and ELBO at every checkpoint of a run (raw weights)."""
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
    return save_figure(fig, path, dpi=110)
