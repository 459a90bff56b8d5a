"""Command line: deepgm train | sample | generate | eval | distill | collapse | table | data fetch | demo."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from deepgm.diffusion.grids import CALIBRATED, available_grids
from deepgm.diffusion.sampling import available_samplers
from deepgm.diffusion.schedule_registry import SCHEDULES


def positive_int(text: str) -> int:
    """argparse type for counts (steps, samples, examples, k): 0 or less is a usage error, never "the default"."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _train(args) -> None:
    from deepgm.config import load_config
    from deepgm.pipeline import train_run
    from deepgm.train import distributed

    config = load_config(args.config, args.overrides)
    run_dir = Path(args.out or Path("runs") / config["name"])
    metrics = train_run(config, run_dir, resume=args.resume, progress=not args.quiet)
    if distributed.is_main():  # under torchrun, one line rather than one per process
        print(f"trained {config['name']} to step {metrics.get('step')}: run in {run_dir}")


def _data_fetch(args) -> None:
    from deepgm.data.fetch import DownloadError, fetch

    try:
        folder = fetch(args.name, args.root, mirrors=args.mirror, progress=not args.quiet)
    except DownloadError as err:  # reported like the other user-facing errors (exit status 2)
        raise ValueError(str(err)) from None
    print(f"{args.name}: verified files in {folder}; train with data: {{name: {args.name}, root: {args.root}}}")


def _plan_overrides(args) -> dict:
    """The sampling-plan fields given on the command line (None: the config's)."""
    options = {"eta": args.eta} if getattr(args, "eta", None) is not None else None
    return {"sampler": args.sampler, "steps": args.steps, "grid": args.grid, "guidance": args.guidance,
            "threshold": args.threshold, "options": options, "augmentation": args.augmentation,
            "start": getattr(args, "start", None)}


def _sample(args) -> None:
    from deepgm.pipeline import sample_run
    from deepgm.shards import SHARD_SIZE, parse_shard, sample_shards

    if args.shard or args.shard_size or args.n > SHARD_SIZE:  # a large job: streamed to disk in shards
        shard = parse_shard(args.shard) if args.shard else (1, 1)
        job = sample_shards(args.run, args.n, args.seed, args.out, shard, args.shard_size or SHARD_SIZE,
                            args.weights, progress=not args.quiet, **_plan_overrides(args))
        print(f"{job.out}: {len(job.made)} shard(s) made now, {job.already} already there, of {job.shards}"
              + (f"; NFE per sample: {job.nfe}" if job.nfe is not None else ""))
        print(f"merged into {job.merged}" if job.merged else "waiting for the other --shard processes; the last "
              "to finish merges")
        return
    path, result = sample_run(args.run, args.n, args.seed, args.out, args.weights, progress=not args.quiet,
                              **_plan_overrides(args))
    if result.calibration is not None:
        c = result.calibration
        print(f"calibrated: {c.chosen} (pilot: {c.pilot_nfe} evaluations of {c.pilot} samples)")
    if len(result.times) and float(result.times[0]) < 1:  # a VAE has no time grid
        print(f"started at t = {float(result.times[0]):.4g}, not 1 (docs/samplers.md, 'Where sampling starts')")
    print(f"NFE per sample: {result.nfe}" + (" (guidance: 2 network evaluations per step)" if args.guidance not in
                                             (None, 0, 1) else ""))
    print(f"wrote {path} and {path.with_suffix('.npz')}")


def _is_cascade(path: str) -> bool:
    """A cascade is a file naming its stage runs; a run is a directory."""
    return Path(path).is_file()


def _refuse_run_options(args) -> None:
    """Plan overrides a cascade does not take (its file holds each stage's plan): one clear error."""
    given = [f"--{k.replace('_', '-')}" for k in ("sampler", "steps", "grid", "threshold", "eta", "sweep", "start")
             if getattr(args, k, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} apply to a run; a cascade file sets each stage's plan under "
                         f"`sample:` (it takes --guidance for the base stage and --augmentation for the SR stages)")


def _generate(args) -> None:
    from deepgm.pipeline import generate_run

    if any(not c.strip() for c in args.captions):
        raise ValueError("a caption is empty; give some words, e.g. \"a red circle on the left\"")
    if _is_cascade(args.run):
        from deepgm.cascade import generate_cascade

        _refuse_run_options(args)
        path, output = generate_cascade(args.run, args.captions, args.n, args.seed, args.out, args.guidance,
                                        args.augmentation)
        print("NFE per sample by stage: " + ", ".join(f"{x.shape[-1]}x{x.shape[-1]}: {nfe}"
                                                       for x, nfe in zip(output.images, output.nfe, strict=True)))
        print(f"wrote {path} and {path.with_suffix('.npz')}")
        return
    overrides = {"sampler": args.sampler, "steps": args.steps, "guidance": args.guidance, "threshold": args.threshold,
                 "augmentation": args.augmentation, "start": args.start}
    path, result = generate_run(args.run, args.captions, args.n, args.seed, args.out, args.weights,
                                sweep=args.sweep_weights if args.sweep else None, **overrides)
    print(f"NFE per sample: {result.nfe}")
    print(f"wrote {path} and {path.with_suffix('.npz')}")


def _eval(args) -> None:
    from deepgm.pipeline import evaluate_run, likelihood_run

    if args.nll:
        m = likelihood_run(args.run, args.nll_examples, seed=args.seed, k=args.k, divergence=args.divergence,
                           probes=args.probes)
        unit = f"bits/dim, {m['levels']} levels" if m["levels"] else "bits/dim of the density"
        for key, name in (("ode", "probability-flow ODE NLL"), ("elbo", "continuous ELBO (bound)"),
                          ("iwae", f"-IWAE_{args.k} (bound)")):
            if key not in m:
                continue
            r = m[key]
            print(f"{name:26s} {r['bpd']:.4f} ± {r['bpd_ci95']:.4f} {unit} (95% CI, {r['n']} test examples, "
                  f"NFE {r['nfe']}) — {r['note']}")
        print(f"written to {Path(args.run) / 'nll.json'}")
        return
    if _is_cascade(args.run):
        from deepgm.cascade import evaluate_cascade

        _refuse_run_options(args)
        if args.guidance is not None or args.augmentation is not None:
            raise ValueError("deepgm eval CASCADE evaluates the plans its file names; change them there")
        print(json.dumps(evaluate_cascade(args.run, args.n_samples, args.seed, args.out), indent=2))
        return
    metrics = evaluate_run(args.run, args.n_samples, args.seed, vlb_examples=args.vlb_examples,
                           **_plan_overrides(args))
    print(json.dumps(metrics, indent=2))


def _collapse(args) -> None:
    from deepgm.studies.collapse import run_collapse

    summary = run_collapse(args.out, args.steps, args.k, args.overrides, progress=not args.quiet)
    print((Path(args.out) / "collapse.md").read_text())
    print(f"table, curves and runs in {args.out}/ (collapse.md, collapse.json, collapse.png); "
          f"{len(summary['runs'])} runs")


def _table(args) -> None:
    from deepgm.studies.table import comparison_table

    comparison_table(args.runs, args.out, args.k, args.n_samples, args.seed, args.examples, progress=not args.quiet,
                     ode=not args.no_ode)
    print(Path(args.out).with_suffix(".md").read_text())


def _distill(args) -> None:
    from deepgm.studies.distill import distill, summary_text

    summary = distill(args.run, args.out, args.rounds, args.steps_per_round, args.teacher_steps,
                      tuple(args.guidance_range) if args.guidance_range else None, args.guidance_steps,
                      {"lr": args.lr} if args.lr else None, progress=not args.quiet)
    print(summary_text(summary))
    last = summary["rounds"][-1]
    print(f"sample the {last['student_steps']}-step student with: deepgm sample {last['run']}")


def _threads_for_free_cores() -> int:
    """torch's thread count lowered to the cores no other process is busy on (deepgm.cpu: threads that share a core
    with another process make small models several times slower), unless OMP_NUM_THREADS sets it."""
    import torch

    from deepgm.cpu import free_cores

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(torch.get_num_threads(), free_cores()))
    return torch.get_num_threads()


def _demo(args) -> None:
    from deepgm.config import load_config
    from deepgm.pipeline import evaluate_run, sample_run, train_run

    overrides = ["train.steps=300", "eval.n_samples=200", "eval.vlb_examples=32"] if args.quick else []
    config = load_config("demo-digits", overrides)
    run_dir = Path(args.out)
    start = time.time()
    if (run_dir / "config.yaml").exists():
        import shutil

        shutil.rmtree(run_dir)  # the demo always starts fresh
    threads = _threads_for_free_cores()
    print(f"[1/3] training a U-Net DDPM on scikit-learn digits ({config['train']['steps']} steps, {threads} "
          f"thread{'s' * (threads > 1)}) ...")
    train_run(config, run_dir)
    print(f"[2/3] sampling 64 digits with {config['sample']['sampler']} ({config['sample']['steps']} steps) ...")
    grid, _ = sample_run(run_dir, progress=False)
    print(f"[3/3] evaluating: FID of {config['eval']['n_samples']} samples ({config['eval']['sampler']}, "
          f"{config['eval']['steps']} steps), precision/recall, test bits/dim ...")
    m = evaluate_run(run_dir, progress=False)
    print(f"\ndone in {time.time() - start:.0f} s. Results in {run_dir}/:")
    print(f"  samples          {grid}")
    print(f"  FID              {m['fid']:.2f}   (data's own floor, test vs train: {m['fid_floor']:.2f})")
    print(f"  precision/recall {m['precision']:.3f} / {m['recall']:.3f}")
    print(f"  classifier acc.  {m['feature_net_test_accuracy']:.3f} on real test digits")
    if "test_bpd" in m:
        print(f"  test bits/dim    {m['test_bpd']:.3f} ± {m['test_bpd_ci95']:.3f} (discrete VLB, 17 levels)")
    print("  pictures         forward_process.png, reverse_process.png, loss_curve.png, eval_samples.png")
    print(f"  metrics          {run_dir}/eval.json, {run_dir}/metrics.jsonl")
    print(f"  TensorBoard      tensorboard --logdir {run_dir}/tb")


def _non_negative(meaning: str):
    """An argparse type: a finite number >= 0, the error saying what its ends mean (`meaning`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < 0:  # NaN or inf would fill every sample with NaN
            raise argparse.ArgumentTypeError(f"must be a finite number >= 0 ({meaning}), got {text}")
        return value

    return parse


guidance_weight = _non_negative("1: the conditional model, 0: the unconditional one")  # classifier-free guidance w
noise_level = _non_negative("0: deterministic, 1: ancestral")  # a sampler's eta


def _guidance_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guidance", type=guidance_weight, metavar="W",
                   help="classifier-free guidance weight w: x0 = x0_uncond + w (x0_cond - x0_uncond); 1 is the "
                        "conditional model, 0 the unconditional one (default: the config's, 1)")
    p.add_argument("--threshold", metavar="static|dynamic[:P]|none",
                   help="x0 thresholding of images: static clipping to [-1, 1], Imagen's dynamic thresholding at "
                        "percentile P (default 0.995), or none (default: the config's, static)")
    p.add_argument("--start", type=float, metavar="S",
                   help="begin sampling where sigma/alpha = S instead of at t = 1 (e.g. 20 for an eps-predicting "
                        "network on the cosine schedule; docs/samplers.md, 'Where sampling starts')")
    p.add_argument("--augmentation", type=augmentation_level, metavar="S",
                   help="a super-resolution model's noise-conditioning augmentation: its low-resolution input is "
                        "noised to diffusion time S in [0, 1] (default: the config's; for a cascade, every SR stage)")


def augmentation_level(text: str) -> float:
    """argparse type for a noise-conditioning augmentation level: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1] (0: the low-resolution image as it is), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepgm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="path to a YAML config, or the name of a shipped one (e.g. ddpm-digits)")
    p.add_argument("overrides", nargs="*", help="key.subkey=value overrides, e.g. train.steps=200")
    p.add_argument("--out", help="run directory (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    grids = [*available_grids(), CALIBRATED]
    p = sub.add_parser("sample", help="sample a trained run: writes a PNG grid and an .npz",
                       epilog=f"samplers: {', '.join(available_samplers())}; grids: {', '.join(grids)}; "
                              f"schedules: {', '.join(sorted(SCHEDULES))}")
    p.add_argument("run", help="run directory")
    p.add_argument("--sampler", choices=available_samplers(), help="default: the config's sample.sampler")
    p.add_argument("--steps", type=positive_int, help="number of sampler steps (default: the config's)")
    p.add_argument("--grid", choices=grids,
                   help="time grid (default: uniform for ddpm/ddim, calibrated for trig-abm and auto, else trig); see "
                        "deepgm.diffusion.grids and deepgm.diffusion.calibration")
    p.add_argument("--n", type=positive_int, default=64, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eta", type=noise_level, help="the fresh noise of ddim, euler-ancestral, dpmpp-2m-sde and "
                   "dpmpp-3m-sde (0 deterministic, 1 ancestral)")
    _guidance_arguments(p)
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="which weights to sample with")
    p.add_argument("--out", help="output path stem (default RUN/samples/<sampler>-<steps>steps-seed<seed>); for a "
                                 "sharded job, its folder (default RUN/samples/<plan>-seed<seed>-n<n>)")
    p.add_argument("--shard", metavar="k/K", help="make shard k of K of the job (k = 1..K; run K processes, on one "
                                                  "machine or several sharing the folder); implies streaming")
    p.add_argument("--shard-size", type=positive_int, metavar="S",
                   help="samples per shard file (a multiple of 64; default 1024). Any n above 1024 streams to "
                        "shards: memory stays that of one shard, and a killed job resumes without redoing any")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_sample)

    p = sub.add_parser("generate", help="samples of a text-conditioned run (or cascade) for given captions")
    p.add_argument("run", help="run directory of a text-conditioned model (e.g. trained from t2i-shapes-base), or a "
                               "cascade file naming a base run and super-resolution runs (deepgm.cascade)")
    p.add_argument("captions", nargs="+", help='one or more captions, e.g. "a small red circle in the top left"')
    p.add_argument("--n", type=positive_int, default=8, help="samples per caption")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=available_samplers())
    p.add_argument("--steps", type=positive_int)
    _guidance_arguments(p)
    p.add_argument("--sweep", choices=["guidance"], help="the first caption across guidance weights, a row each")
    p.add_argument("--sweep-weights", type=guidance_weight, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 8.0, 12.0],
                   metavar="W", help="the weights of --sweep guidance (default 1 2 3 5 8 12)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="which weights to sample with")
    p.add_argument("--out", help="output path stem (default RUN/samples/generate-...)")
    p.set_defaults(func=_generate)

    p = sub.add_parser("eval", help="FID / precision / recall and test bits/dim of a trained run (or a cascade)")
    p.add_argument("run", help="run directory, or a cascade file (alignment and FID at its last stage's size)")
    p.add_argument("--out", help="a cascade's output folder (default: beside the file, <name>-eval)")
    p.add_argument("--n-samples", type=positive_int, help="samples for FID (default: the config's eval.n_samples)")
    p.add_argument("--sampler", choices=available_samplers())
    p.add_argument("--steps", type=positive_int)
    p.add_argument("--grid", choices=grids, help="time grid of the sampler (default: the sampler's)")
    _guidance_arguments(p)
    p.add_argument("--vlb-examples", type=positive_int, help="test examples for the bits/dim bound")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nll", action="store_true",
                   help="instead: test NLL by the probability-flow ODE and the continuous ELBO, bits/dim with 95%% CI")
    p.add_argument("--nll-examples", type=positive_int, help="test examples for --nll (default: all)")
    p.add_argument("--divergence", choices=["exact", "hutchinson"], default="hutchinson",
                   help="ODE divergence for --nll: exact (D backward passes) or Hutchinson's estimator")
    p.add_argument("--probes", type=positive_int, default=1, help="Hutchinson probes (Rademacher) for --nll")
    p.add_argument("--k", type=positive_int, default=1000, help="IWAE importance samples for a VAE's --nll")
    p.set_defaults(func=_eval)

    p = sub.add_parser("collapse", help="the posterior-collapse study: PixelCNN-decoder VAEs with and without remedies")
    p.add_argument("overrides", nargs="*", help="overrides for every run, e.g. train.batch_size=32")
    p.add_argument("--out", default="runs/collapse", help="directory for the five runs, the table and the plot")
    p.add_argument("--steps", type=positive_int, help="training steps per run (default: the config's)")
    p.add_argument("--k", type=positive_int, default=200, help="importance samples of the IWAE bound")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_collapse)

    p = sub.add_parser("table", help="test NLL (bits/dim), ELBO, KL, active units and FID of trained runs, one table")
    p.add_argument("runs", nargs="+", help="run directories (VAEs, HVAEs, diffusion models)")
    p.add_argument("--out", default="runs/table", help="output stem: writes OUT.md and OUT.json")
    p.add_argument("--k", type=positive_int, default=1000, help="importance samples of the IWAE bound")
    p.add_argument("--n-samples", type=positive_int, default=1000, help="samples for FID")
    p.add_argument("--examples", type=positive_int, help="test examples (default: all)")
    p.add_argument("--no-ode", action="store_true", help="skip the (slow) probability-flow ODE NLL of diffusion runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_table)

    p = sub.add_parser("distill", help="progressive distillation of a trained diffusion run (Salimans & Ho 2022), "
                                       "optionally with guidance distilled into the student (Meng et al. 2023)")
    p.add_argument("run", help="the teacher's run directory")
    p.add_argument("--out", required=True, help="directory for the rounds (round-1, round-2, ...); re-run to resume")
    p.add_argument("--rounds", type=positive_int, required=True, help="halvings of the step count")
    p.add_argument("--steps-per-round", type=positive_int, default=500, help="training steps of each round")
    p.add_argument("--teacher-steps", type=positive_int, default=64,
                   help="the DDIM steps of the first teacher (N_0; students get N_0/2, ..., N_0/2^rounds)")
    p.add_argument("--guidance-range", type=guidance_weight, nargs=2, metavar=("W_MIN", "W_MAX"),
                   help="first distil classifier-free guidance for w in [W_MIN, W_MAX] into a student that reads w")
    p.add_argument("--guidance-steps", type=positive_int, help="training steps of the guidance round (default: "
                                                               "--steps-per-round)")
    p.add_argument("--lr", type=float, help="learning rate of every round (default 2e-4, cosine-annealed)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_distill)

    p = sub.add_parser("data", help="dataset files: `deepgm data fetch mnist|fashion-mnist|cifar10 --root DIR`")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("fetch", help="download a dataset into ROOT/NAME, verify its checksums (resumes)")
    p.add_argument("name", choices=["mnist", "fashion-mnist", "cifar10"])
    p.add_argument("--root", default="data", help="folder for dataset files (default ./data)")
    p.add_argument("--mirror", action="append", help="base URL to fetch from instead of the built-in mirrors "
                                                      "(repeatable; tried in order)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_data_fetch)

    p = sub.add_parser("demo", help="train, sample and evaluate a DDPM on digits in a few minutes")
    p.add_argument("--out", default="runs/demo", help="run directory (replaced)")
    p.add_argument("--quick", action="store_true", help="a much shorter run, for smoke tests")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"deepgm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # at run time: an unwritable folder, a full disk; checkpoints are written atomically
        print(f"deepgm {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
