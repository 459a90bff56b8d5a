"""`deepgm distill`: progressive distillation of a trained diffusion run, one run directory per round.

Round r trains a student with N_r = N_0 / 2^r steps on the targets of the previous round's model (the teacher run
in round 1), starting from that model's EMA weights (Salimans & Ho 2022, Algorithm 2). With a guidance range, a
round 0 first distils classifier-free guidance into a student that reads w (Meng et al. 2023, stage one), and every
later round passes w to teacher and student. Each round is an ordinary run (config.yaml naming its teacher,
checkpoints, metrics), so a killed distillation resumes mid-round where it stopped and `deepgm sample ROUND` samples
the student with its own N-step plan.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import yaml

from deepgm.files import write_json
from deepgm.pipeline import train_run
from deepgm.train import latest_checkpoint

# what every round trains with unless told: short rounds need a short EMA and an annealed learning rate
ROUND_TRAIN = {"lr": 2e-4, "warmup_steps": 20, "lr_schedule": "cosine", "ema_decay": 0.995, "sample_every": 0,
               "log_every": 50}


def round_plan(teacher_steps: int, rounds: int) -> list[int]:
    """The students' step counts N_0/2, N_0/4, ..., N_0/2^rounds (each a whole number >= 1)."""
    if teacher_steps < 2 or rounds < 1:
        raise ValueError(f"need teacher steps >= 2 and rounds >= 1, got {teacher_steps} and {rounds}")
    if teacher_steps % 2**rounds:
        raise ValueError(f"{rounds} rounds halve {teacher_steps} teacher steps to a fraction; use a teacher step count "
                         f"divisible by 2^{rounds} = {2**rounds} (e.g. --teacher-steps {2**rounds * 2})")
    return [teacher_steps // 2**r for r in range(1, rounds + 1)]


def _teacher_config(run_dir: Path) -> dict:
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml); train the teacher first")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    if config.get("model", {}).get("kind", "ddpm") != "ddpm":
        raise ValueError(f"{run_dir} is a {config['model']['kind']} run; distillation needs a diffusion model")
    if latest_checkpoint(run_dir) is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet; distil a trained run")
    return config


def _round_config(base: dict, name: str, teacher: Path, steps: int | None, sample_steps: int, train_steps: int,
                  guidance: list[float] | None, seed: int, train: dict) -> dict:
    config = copy.deepcopy(base)
    config["resolved"] = {}  # train_run resolves it afresh
    model = config["model"]
    model.pop("distill", None)
    model["parameterization"] = "v"  # Salimans & Ho: an eps-student diverges; v with SNR+1 weighting
    threshold = config.get("sample", {}).get("threshold") or ("static" if config.get("sample", {}).get("clip", True)
                                                              else "none")
    model["distill"] = {"teacher": str(teacher.resolve()), "steps": steps, "guidance": guidance,
                        "teacher_threshold": threshold}  # the student learns the teacher's sampler as it is used
    if guidance is not None:  # the student reads w; only the conditional model is distilled
        model["guidance_input"] = True
        model.pop("label_dropout", None)
        model["cond_dropout"] = 0.0
    plan = {"sampler": "ddim", "steps": sample_steps, "grid": "student"}
    sample = {k: v for k, v in config.get("sample", {}).items() if k in ("n", "threshold", "clip", "guidance")}
    evaluation = {k: v for k, v in config.get("eval", {}).items() if k in ("n_samples", "threshold", "clip",
                                                                          "guidance")}
    config["sample"] = {**sample, **plan}
    config["eval"] = {**evaluation, **plan, "vlb": False}  # the student is trained at N times only: no bound
    config["train"] = {**config.get("train", {}), **ROUND_TRAIN, "checkpoint_every": min(100, train_steps), **train,
                       "steps": train_steps, "init_from": str(teacher.resolve())}
    config["name"], config["seed"] = name, seed
    return config


def _train_round(config: dict, run_dir: Path, progress: bool) -> float:
    """Train (or finish, or skip) one round; minutes spent now."""
    start = time.time()
    if (run_dir / "config.yaml").exists() and latest_checkpoint(run_dir) is None:
        shutil.rmtree(run_dir)  # killed before its first checkpoint: nothing to keep
    train_run(config, run_dir, resume=latest_checkpoint(run_dir) is not None, progress=progress)
    return (time.time() - start) / 60


def distill(teacher_run: str | Path, out: str | Path, rounds: int, steps_per_round: int, teacher_steps: int = 64,
            guidance: tuple[float, float] | None = None, guidance_steps: int | None = None,
            train: dict | None = None, progress: bool = True) -> dict:
    """Distil `teacher_run` into students of teacher_steps/2, ..., teacher_steps/2^rounds steps under `out`
    (round-1, round-2, ...; round-0-guidance first when a guidance range is given). Re-running resumes."""
    teacher_run, out = Path(teacher_run), Path(out)
    base = _teacher_config(teacher_run)
    students = round_plan(teacher_steps, rounds)
    train = dict(train or {})
    summary: dict = {"teacher": str(teacher_run), "teacher_steps": teacher_steps, "guidance": guidance,
                     "steps_per_round": steps_per_round, "rounds": []}
    teacher, name = teacher_run, base.get("name") or teacher_run.name
    guidance_list = [float(guidance[0]), float(guidance[1])] if guidance is not None else None
    if guidance_list is not None:
        run_dir = out / "round-0-guidance"
        steps = guidance_steps or steps_per_round
        config = _round_config(base, f"{name}-guidance", teacher, None, teacher_steps, steps, guidance_list,
                               int(base.get("seed", 0)), train)
        print(f"round 0: guidance w in [{guidance_list[0]:g}, {guidance_list[1]:g}] into a student that reads w "
              f"({teacher_steps} steps, {steps} training steps)", flush=True)
        minutes = _train_round(config, run_dir, progress)
        summary["rounds"].append({"round": 0, "run": str(run_dir), "student_steps": teacher_steps,
                                  "training_steps": steps, "minutes": round(minutes, 2)})
        teacher = run_dir
    for r, n in enumerate(students, start=1):
        run_dir = out / f"round-{r}"
        config = _round_config(base, f"{name}-distilled-{n}", teacher, n, n, steps_per_round, guidance_list,
                               int(base.get("seed", 0)) + r, train)
        print(f"round {r}: {2 * n} teacher steps -> {n} student steps ({steps_per_round} training steps)", flush=True)
        minutes = _train_round(config, run_dir, progress)
        summary["rounds"].append({"round": r, "run": str(run_dir), "student_steps": n,
                                  "training_steps": steps_per_round, "minutes": round(minutes, 2)})
        teacher = run_dir
        write_json(out / "distill.json", summary)
    return summary


def summary_text(summary: dict) -> str:
    """The rounds as a small table."""
    lines = ["| round | student steps | training steps | minutes (this call) | run |", "|---:|---:|---:|---:|---|"]
    lines += [f"| {r['round']} | {r['student_steps']} | {r['training_steps']} | {r['minutes']:.1f} | {r['run']} |"
              for r in summary["rounds"]]
    return "\n".join(lines)
