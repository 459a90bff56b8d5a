"""Imagen's second finding on captioned shapes: a larger frozen text encoder, better alignment and fidelity?

Trains the same base model (configs/t2i-shapes-base.yaml: same steps, same seed, same data order) once per text
encoder, from a bag of words (MiniLM's token embeddings, no transformer layers) through MiniLM truncated to 2
layers and paraphrase-MiniLM-L3 to all-MiniLM-L6, then measures each at one guidance weight: alignment on the
test captions, on held-out attribute combinations and on held-out phrasings (synonyms and templates never seen
in training, where a bag of words cannot generalise), and FID, with the encoder's parameter count.

Run:  python benchmarks/t2i_encoders.py [--steps 6000] [--n 250] [--guidance 3] [--runs runs/t2i-encoders]
      [--encoders NAME_OR_DIR ...] [--seed S] [--keep]
      (about 40 minutes of training per encoder on 2 CPU cores; existing runs are reused; a local encoder directory,
      such as all-mpnet-base-v2 (README), is named by its folder)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deepgm.config import load_config
from deepgm.family import SamplingPlan
from deepgm.files import write_json, write_text
from deepgm.pipeline import draw, load_data, load_prepared, load_run, sample_metrics, train_run
from deepgm.text import encoder_label

ENCODERS = ("bow", "minilm-l6:2", "minilm-l3", "minilm-l6")
SPLITS = ("test", "test-combos", "test-phrasings")


def bar_figure(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    from deepgm.viz.plots import save_figure  # sets the Agg backend

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = [f"{r['encoder']}\n{r['parameters'] / 1e6:.1f}M" for r in rows]
    for i, split in enumerate(SPLITS):
        key = "alignment" if split == "test" else f"{split}/alignment"
        left.bar([j + 0.27 * (i - 1) for j in range(len(rows))], [r[key] for r in rows], width=0.27,
                 yerr=[r[key + "_ci95"] for r in rows], label=split, capsize=2)
    left.set_xticks(range(len(rows)), names, fontsize=8)
    left.set(ylabel="alignment", title="text alignment by encoder")
    left.legend(fontsize=8)
    right.bar(range(len(rows)), [r["fid"] for r in rows])
    right.axhline(rows[0]["fid_floor"], ls="--", c="grey", label="floor")
    right.set_xticks(range(len(rows)), names, fontsize=8)
    right.set(ylabel="FID vs test scenes", title="fidelity by encoder (lower is better)")
    right.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def kept_rows(path: Path, args) -> list[dict]:
    """The saved rows, if they were measured as this run will measure (otherwise an error: rows that differ in steps
    or sampling are not comparable)."""
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    mine = {"steps": args.steps, "n": args.n, "guidance": args.guidance, "sample_steps": args.sample_steps,
            "seed": args.seed}
    theirs = {k: saved.get(k, {"sample_steps": 25, "seed": 0}.get(k)) for k in mine}  # defaults: before they were kept
    if theirs != mine:
        raise SystemExit(f"--keep: {path} was measured with {theirs}, this run would use {mine}; rerun every encoder")
    return saved["rows"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS))
    parser.add_argument("--steps", type=int, default=6000, help="training steps per encoder")
    parser.add_argument("--n", type=int, default=250, help="samples per split (one per caption)")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--runs", default="runs/t2i-encoders")
    parser.add_argument("--seed", type=int, default=0, help="the training seed (run folders of other seeds end -sN)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--keep", action="store_true",
                        help="keep the saved table's rows of other encoders (checked: the same steps, n, guidance, "
                             "sampler steps and seed; not checked: the same code, so only for rows measured with this "
                             "one): adds an encoder without training the others again")
    args = parser.parse_args(argv)
    out = Path(args.out)
    rows = []
    plan = SamplingPlan("ddim", args.sample_steps, guidance=args.guidance, threshold="static")
    for encoder in args.encoders:
        label = encoder_label(encoder)
        run_dir = Path(args.runs) / (label.replace(":", "-") + (f"-s{args.seed}" if args.seed else ""))
        if not (run_dir / "checkpoints" / "latest").is_file():
            config = load_config("t2i-shapes-base", [f"model.text.encoder={encoder}", f"train.steps={args.steps}",
                                                      f"seed={args.seed}"])
            train_run(config, run_dir, resume=(run_dir / "config.yaml").exists())
        run = load_run(run_dir)
        train = load_data(run.config, "train")
        text = run.model.conditioning["text"]
        row = {"encoder": label, "parameters": text.encoder.num_parameters, "step": run.step}
        for split in SPLITS:
            test = load_prepared(run, split)
            m = sample_metrics(run, draw(run, args.n, 0, plan, run.model.conditioning.examples(test, args.n)),
                               test, 0, train)
            prefix = "" if split == "test" else f"{split}/"
            row.update({prefix + k: m[k] for k in ("alignment", "alignment_ci95", "fid")})
            row["fid_floor"] = row.get("fid_floor", m["fid_floor"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.keep:  # read now, not at the start: another run may have added its rows meanwhile
        measured = {r["encoder"] for r in rows}
        rows += [r for r in kept_rows(out / "t2i_encoders.json", args) if r["encoder"] not in measured]
    rows.sort(key=lambda r: r["parameters"])
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "t2i_encoders.json", {"guidance": args.guidance, "n": args.n, "steps": args.steps,
                                           "sample_steps": args.sample_steps, "seed": args.seed, "rows": rows})
    lines = [f"Text encoders for the same base model ({args.steps} steps, seed {args.seed}), "
             f"guidance {args.guidance:g}, {args.n} samples per split, DDIM {args.sample_steps} steps; "
             f"FID floor {rows[0]['fid_floor']:.2f}.", "",
             "| encoder | parameters | alignment (test) | held-out combinations | held-out phrasings | FID |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [f"{r[k]:.3f} ± {r[k + '_ci95']:.3f}"
                 for k in ("alignment", "test-combos/alignment", "test-phrasings/alignment")]
        lines.append(f"| {r['encoder']} | {r['parameters'] / 1e6:.1f}M | " + " | ".join(cells) + f" | {r['fid']:.2f} |")
    write_text(out / "t2i_encoders.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    bar_figure(rows, out / "t2i_encoders.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
