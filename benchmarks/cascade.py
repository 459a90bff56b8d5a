"""The text-to-image cascade on captioned shapes (Saharia et al. 2022; Ho et al. 2021): 16x16 base -> 32x32 SR ->
64x64 SR, against the base model upsampled bilinearly, and the sweep that shows why noise-conditioning
augmentation exists.

For --n test captions (and --n held-out colour-shape combinations), the same seed everywhere:
1. the cascade vs the base's own images upsampled bilinearly to 64x64: FID at 64x64 in the features of the
   attribute classifier retrained at 64x64, beside the floor at the same n (training vs test scenes), and alignment
   (every attribute the caption names read as named), beside the alignment of the captions' real 64x64 images;
2. the augmentation-level sweep (test captions): the 16 -> 32 stage sampled at levels {0, 0.1, 0.2, 0.3, 0.5}
   from the same base images, once for the SR model trained with augmentation and once for the one trained
   without; FID and alignment at 32x32 (the stage itself) and, for levels 0 and --level, through the 64x64 stage
   at its own level, at 64x64;
3. time per 64x64 image on this machine, per stage, with each stage's NFE.

Run:  python benchmarks/cascade.py --base runs/cas-base --sr32 runs/cas-sr32 --sr32-noaug runs/cas-sr32-noaug \\
          --sr64 runs/cas-sr64 [--n 300] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from deepgm.cascade import Cascade, Stage
from deepgm.eval import get_feature_net
from deepgm.eval.metrics import fid
from deepgm.files import write_json, write_text
from deepgm.pipeline import caption_metrics, load_data, load_run, plan_for
from deepgm.viz import save_strip

LEVELS = (0.0, 0.1, 0.2, 0.3, 0.5)
SPLITS = ("test", "test-combos")


def stage(run_dir: str, **plan) -> Stage:
    run = load_run(run_dir)
    return Stage(Path(run_dir).name, run.model, plan_for(run, **plan), run.config)


def up(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)


def floor_at_n(config: dict, train, test, n: int) -> float:
    """FID of n training scenes against n test scenes: the floor at the n every row uses."""
    net = get_feature_net(config["data"]["name"], {k: v for k, v in config["data"].items() if k != "name"})
    return fid(net.features(train.x[:n]), net.features(test.x[:n]))


def measure(x: torch.Tensor, config: dict, train, data, rows: torch.Tensor) -> dict:
    """FID against the split's real scenes and alignment with the captions data.captions[rows] (the real scenes'
    features are computed once: the feature net remembers them)."""
    out = caption_metrics(x, config, train, data, rows)
    return {k: out[k] for k in ("fid", "alignment", "alignment_ci95", "alignment_of_real_images")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--sr32", required=True, help="the 16 -> 32 stage trained with augmentation")
    parser.add_argument("--sr32-noaug", required=True, help="the same stage trained without (max_augmentation 0)")
    parser.add_argument("--sr64", required=True)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--level", type=float, default=0.2, help="the SR stages' level outside the sweep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    Path(args.out).mkdir(parents=True, exist_ok=True)
    base = stage(args.base)
    sr32 = {"aug": stage(args.sr32, augmentation=args.level), "noaug": stage(args.sr32_noaug, augmentation=args.level)}
    sr64 = stage(args.sr64, augmentation=args.level)
    cascade = Cascade([base, sr32["aug"], sr64])
    Cascade([base, sr32["noaug"], sr64])  # checks that the ablation chains too
    c32, c64 = sr32["aug"].config, sr64.config
    s1, s2 = sr32["aug"].size, sr64.size  # 32 and 64 in the shipped configs
    train32, train64 = load_data(c32, "train"), load_data(c64, "train")
    results: dict = {"n": args.n, "seed": args.seed, "level": args.level,
                     "plans": {s.name: s.plan.describe() for s in (base, sr32["aug"], sr32["noaug"], sr64)},
                     "runs": {"base": args.base, "sr32": args.sr32, "sr32_noaug": args.sr32_noaug,
                              "sr64": args.sr64}, "splits": {}}
    lines = ["# The cascade on captioned shapes", "",
             f"`python benchmarks/cascade.py --base {args.base} --sr32 {args.sr32} --sr32-noaug {args.sr32_noaug} "
             f"--sr64 {args.sr64} --n {args.n}`", "",
             "Plans: " + ", ".join(f"{k}: {v}" for k, v in results["plans"].items()) + ".", ""]
    pictures = {}
    for split in SPLITS:
        data32, data64 = load_data(c32, split), load_data(c64, split)
        rows = torch.arange(args.n) % len(data64)
        captions = [data64.captions[i] for i in rows]
        start = time.perf_counter()
        x16, nfe16 = cascade.run_stage(0, captions, None, args.seed)
        seconds = {"base": time.perf_counter() - start}
        out: dict = {"floor64": floor_at_n(c64, train64, data64, args.n),
                     "floor32": floor_at_n(c32, train32, data32, args.n),
                     "bilinear64": measure(up(x16, s2), c64, train64, data64, rows),
                     "bilinear32": measure(up(x16, s1), c32, train32, data32, rows), "sweep": []}
        for variant, sr in sr32.items():
            for level in LEVELS if split == "test" else (args.level,):  # held-out captions: the cascade only
                if split != "test" and variant != "aug":
                    continue
                s32 = Cascade([base, dataclasses.replace(sr, plan=sr.plan.replace(augmentation=level)), sr64])
                start = time.perf_counter()
                x32, nfe32 = s32.run_stage(1, captions, x16, args.seed)
                t32 = time.perf_counter() - start
                row = {"variant": variant, "level": level,
                       "at32": measure(x32, c32, train32, data32, rows)}
                if level in (0.0, args.level):  # through the 64x64 stage too (the costly part: only two levels)
                    start = time.perf_counter()
                    x64, nfe64 = s32.run_stage(2, captions, x32, args.seed)
                    t64 = time.perf_counter() - start
                    row["at64"] = measure(x64, c64, train64, data64, rows)
                out["sweep"].append(row)
                print(split, variant, level, row, flush=True)
                if variant == "aug" and level == args.level:
                    out["cascade64"] = row["at64"]
                    seconds.update(sr32=t32, sr64=t64)
                    out["nfe"] = {"base": nfe16, "sr32": nfe32, "sr64": nfe64}
                    out["seconds_per_image"] = {k: v / args.n for k, v in seconds.items()}
                    if split == "test":
                        pictures["cascade"] = (x16[:8], x32[:8], x64[:8], captions[:8])
                if split == "test" and level in (0.0, 0.3):
                    pictures[(variant, level)] = x32[:8]
        results["splits"][split] = out
    write_json(Path(args.out) / "cascade.json", results)

    test = results["splits"]["test"]
    lines += ["## The cascade against the base model upsampled bilinearly (64x64)", "",
              "| images | split | FID at 64x64 | alignment |", "|---|---|---:|---:|"]
    for split in SPLITS:
        r = results["splits"][split]
        for name, m in (("base 16x16, bilinear to 64x64", r["bilinear64"]),
                        (f"cascade 16 -> 32 -> 64 (SR levels {args.level:g})", r["cascade64"])):
            lines.append(f"| {name} | {split} | {m['fid']:.1f} | {m['alignment']:.3f} ± {m['alignment_ci95']:.3f} |")
        lines.append(f"| real 64x64 scenes (the classifier's ceiling; FID floor at n={args.n}) | {split} | "
                     f"{r['floor64']:.1f} | {r['bilinear64']['alignment_of_real_images']:.3f} |")
    lines += ["", "## Noise-conditioning augmentation: the 16 -> 32 stage's level at sampling", "",
              f"Test captions. The 64x64 stage (trained with augmentation) runs at level {args.level:g}. Bilinear "
              f"16 -> 32: FID {test['bilinear32']['fid']:.1f}, alignment {test['bilinear32']['alignment']:.3f}; "
              f"floor at 32x32 {test['floor32']:.1f}, at 64x64 {test['floor64']:.1f}.", "",
              "| trained | level | FID 32x32 | alignment 32x32 | FID 64x64 | alignment 64x64 |",
              "|---|---:|---:|---:|---:|---:|"]
    for row in test["sweep"]:
        trained = "with augmentation (U[0, 0.5])" if row["variant"] == "aug" else "without"
        a, b = row["at32"], row.get("at64")
        at64 = f"{b['fid']:.1f} | {b['alignment']:.3f} ± {b['alignment_ci95']:.3f}" if b else "— | —"
        lines.append(f"| {trained} | {row['level']:g} | {a['fid']:.1f} | {a['alignment']:.3f} ± "
                     f"{a['alignment_ci95']:.3f} | {at64} |")
    lines += ["", "## Time per 64x64 image (this machine, 2 CPU cores, batches of 64)", "",
              "| stage | NFE per image | seconds per image |", "|---|---:|---:|"]
    for k in ("base", "sr32", "sr64"):
        lines.append(f"| {k} | {test['nfe'][k]} | {test['seconds_per_image'][k]:.3f} |")
    lines.append(f"| whole cascade | {sum(test['nfe'].values())} | {sum(test['seconds_per_image'].values()):.3f} |")
    write_text(Path(args.out) / "cascade.md", "\n".join(lines) + "\n")
    print("\n".join(lines))

    x16, x32, x64, captions = pictures["cascade"]
    strip = [torch.stack([up(a[None], s2)[0], F.interpolate(a[None], size=(s2, s2), mode="nearest")[0],
                          F.interpolate(b[None], size=(s2, s2), mode="nearest")[0], c])
             for a, b, c in zip(x16, x32, x64, strict=True)]
    save_strip(strip, Path(args.out) / "cascade_samples.png", labels=captions)
    sweep = [pictures[(v, lvl)] for v in ("aug", "noaug") for lvl in (0.0, 0.3)]
    save_strip(sweep, Path(args.out) / "cascade_augmentation.png",
               labels=[f"{'aug' if v == 'aug' else 'no aug'} in training, level {lvl:g}"
                       for v in ("aug", "noaug") for lvl in (0.0, 0.3)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
