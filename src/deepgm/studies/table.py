"""`comparison_table` puts trained runs of any family on one scale: test NLL in bits/dim over the data's levels
(nats / (D ln 2)), one row per bound each family offers (IWAE_k for the VAEs; the discrete VLB, the continuous
ELBO and the probability-flow ODE for diffusion runs), with ELBO, KL and active units where a family has them,
and FID.
"""

from __future__ import annotations

import math
from pathlib import Path

from deepgm.files import write_json, write_text
from deepgm.pipeline import draw, load_data, load_run, plan_for, sample_metrics


def comparison_table(run_dirs: list[str | Path], out: str | Path, k: int = 1000, n_samples: int = 1000,
                     seed: int = 0, n: int | None = None, progress: bool = True, ode: bool = True) -> dict:
    """Evaluate each run on its test split and write out.md / out.json: one row per bound (k: IWAE samples;
    ode=False skips the slow probability-flow ODE NLL). Nothing is written into the runs' directories."""
    rows = []
    for run_dir in map(Path, run_dirs):
        run = load_run(run_dir, weights="ema")
        test = load_data(run.config, "test")
        name = run.config.get("name") or run_dir.name
        model = run.model
        if progress:
            print(f"[table] evaluating {name} ({type(model).__name__}) ...", flush=True)
        bounds = tuple(b for b in model.available_bounds if ode or b != "ode")
        likelihoods = model.likelihoods(test, bounds, n, seed, options={"k": k})
        result = draw(run, n_samples, seed, plan_for(run, "eval"))
        fid = sample_metrics(run, result, test, seed).get("fid")
        for r in likelihoods.values():
            rows.append({"run": name, "model": type(model).__name__, "conditional": bool(model.conditioning),
                         "bound": r["bound"], "nll_bpd": r["bpd"], "nll_bpd_ci95": r["bpd_ci95"],
                         "nll_nats": r["bpd"] * math.prod(test.shape) * math.log(2), "elbo_bpd": r.get("elbo_bpd"),
                         "kl_nats": r.get("kl_nats"), "active_units": r.get("active_units"), "fid": fid})
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
                     f"{f(r.get('elbo_bpd'), '.4f')} | {f(r.get('kl_nats'), '.2f')} | {r.get('active_units') or '—'} | "
                     f"{f(r.get('fid'), '.2f')} |")
    lines.append("")
    lines.append(summary["note"] + ".")
    return "\n".join(lines) + "\n"
