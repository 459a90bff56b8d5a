"""Progressive distillation (Salimans & Ho 2022, Algorithm 2) and guidance distillation (Meng et al. 2023),
checked against DDIM steps taken by deepgm's own sampler on exact Gaussian denoisers, and end to end through
`deepgm distill`."""

import hashlib
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from deepgm.cli import main
from deepgm.conditioning import ClassLabel, Conditioning, GuidanceWeight
from deepgm.diffusion.denoiser import Denoiser, Guided, _FunctionNet
from deepgm.diffusion.distill import (
    GuidanceDistillation,
    ProgressiveDistillation,
    Teacher,
    x_space_weight,
)
from deepgm.diffusion.grids import make_grid
from deepgm.diffusion.model import DiffusionModel
from deepgm.diffusion.samplers import ddim
from deepgm.diffusion.sampling import sample
from deepgm.diffusion.schedule_registry import make_schedule
from deepgm.nets.mlp import MLP
from deepgm.pipeline import load_run
from deepgm.studies.distill import distill, round_plan
from deepgm.train import CheckpointError, init_from

MEANS, VAR = (-0.6, 0.9), 0.3  # class 0, class 1; the null label reads the average of the two
SCHEDULES = {"cosine-1000": ("cosine", {"T": 1000}), "cosine-vp": ("cosine-vp", {})}


def gaussian_teacher(schedule) -> DiffusionModel:
    """A class-conditional model whose x0 is the exact posterior mean of N(m_y, VAR I) (the null label:
    N(m_avg, VAR I)), with the class label owned by a real ClassLabel condition, so guidance drops it as it would a
    network's."""

    def x0(x, t, y):
        alpha, sigma = (v.to(x.dtype)[:, None] for v in schedule.alpha_sigma(t.double()))
        m = torch.tensor([*MEANS, sum(MEANS) / 2], dtype=x.dtype)[y.long()][:, None]  # (B, 1)
        return m + alpha * VAR / (alpha**2 * VAR + sigma**2) * (x - alpha * m)

    net = _FunctionNet(x0)
    net.conditioning = Conditioning([ClassLabel(2)])
    return DiffusionModel(net, schedule, "x0", data_shape=(3,))


@pytest.fixture(params=sorted(SCHEDULES))
def schedule(request):
    name, options = SCHEDULES[request.param]
    return make_schedule(name, **options)


def test_the_target_makes_one_student_ddim_step_land_on_two_teacher_ddim_steps(schedule):
    teacher = gaussian_teacher(schedule)
    objective = ProgressiveDistillation(Teacher.from_model(teacher), steps=8)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([8, 1, 5, 3, 8, 2], dtype=torch.float64) / 8  # student grid times, t = 1 and t = 1/N included
    y = torch.tensor([0, 1, 2, 0, 1, 1])
    target = objective.target(z, t, {"y": y}, None, schedule)
    for b in range(6):  # the teacher's two steps, by deepgm's DDIM sampler (eps form), one example at a time
        times = torch.tensor([t[b], t[b] - 1 / 16, t[b] - 1 / 8], dtype=torch.float64)
        z2 = ddim(teacher.denoiser, times, z[b:b + 1], cond={"y": y[b:b + 1]})
        (a, s), (a2, s2) = schedule.alpha_sigma(times[0]), schedule.alpha_sigma(times[2])
        one_step = a2 * target[b] + s2 / s * (z[b] - a * target[b])  # Algorithm 2's DDIM step with x0 = x~
        torch.testing.assert_close(one_step, z2[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_a_student_that_reproduces_its_target_samples_what_the_teacher_samples_in_twice_the_steps(schedule, n):
    teacher = gaussian_teacher(schedule)
    objective = ProgressiveDistillation(Teacher.from_model(teacher), steps=n)
    student = Denoiser.from_fn(lambda x, t, y: objective.target(x, t.double(), {"y": y}, None, schedule),
                               schedule, "x0")
    x_T = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cond = {"y": torch.tensor([0, 1, 2, 1, 0])}
    one = sample(student, sampler="ddim", grid="student", steps=n, x_T=x_T, cond=cond)
    two = sample(teacher.denoiser, sampler="ddim", grid="student", steps=2 * n, x_T=x_T, cond=cond)
    assert one.nfe == n and two.nfe == 2 * n
    torch.testing.assert_close(one.x, two.x, rtol=0, atol=1e-9)


def test_the_student_grid_is_exactly_i_over_n_then_zero():
    schedule = make_schedule("cosine", T=1000)
    grid = make_grid("student", schedule, 16)  # 1/16 is not a timestep of T = 1000: not rounded
    assert grid.tolist() == [i / 16 for i in range(16, 0, -1)] + [0.0]
    assert make_grid("student", schedule, 1).tolist() == [1.0, 0.0]


def test_round_bookkeeping_halves_to_one_step():
    assert round_plan(64, 6) == [32, 16, 8, 4, 2, 1]
    assert round_plan(8, 2) == [4, 2]
    with pytest.raises(ValueError, match="divisible by 2\\^5"):
        round_plan(48, 5)


def test_loss_weights_are_the_papers_and_an_eps_student_is_refused():
    lam = torch.tensor([-4.0, 0.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(x_space_weight("v", lam), torch.exp(lam) + 1)
    torch.testing.assert_close(x_space_weight("x0", lam), torch.exp(lam).clamp(min=1))
    with pytest.raises(ValueError, match="eps-prediction unstable"):
        ProgressiveDistillation(Teacher("unused"), steps=4, parameterization="eps")


def test_guidance_with_a_weight_per_example_is_each_examples_own_guidance():
    schedule = make_schedule("cosine-vp")
    teacher = gaussian_teacher(schedule)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t, y, w = torch.tensor(0.7), torch.tensor([0, 1, 1, 0]), torch.tensor([0.0, 1.0, 2.5, 4.0])
    together = Guided(teacher.denoiser, w, teacher.conditioning)(x, t, y=y)
    for b in range(4):
        alone = Guided(teacher.denoiser, float(w[b]), teacher.conditioning)(x[b:b + 1], t, y=y[b:b + 1])
        torch.testing.assert_close(together.x0[b:b + 1], alone.x0)
        torch.testing.assert_close(together.eps[b:b + 1], alone.eps)


def test_the_guidance_target_is_the_guided_teacher_and_a_student_equal_to_it_has_zero_loss():
    schedule = make_schedule("cosine-vp")
    teacher = gaussian_teacher(schedule)
    objective = GuidanceDistillation(Teacher.from_model(teacher), guidance=(1.0, 4.0))

    def guided(x, t, y, w):  # written out: x0_uncond + w (x0_cond - x0_uncond)
        cond, null = teacher.denoiser(x, t, y=y).x0, teacher.denoiser(x, t, y=torch.full_like(y, 2)).x0
        return null + w.to(x.dtype)[:, None] * (cond - null)

    student = Denoiser.from_fn(guided, schedule, "x0")
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(3))
    loss, terms = objective(student, x0, {"y": torch.arange(64) % 2}, torch.Generator().manual_seed(4))
    assert float(loss) < 1e-10 and float(terms["x0_mse"]) < 1e-10
    wrong = Denoiser.from_fn(lambda x, t, y, w: teacher.denoiser(x, t, y=y).x0, schedule, "x0")  # w ignored
    assert float(objective(wrong, x0, {"y": torch.arange(64) % 2}, torch.Generator().manual_seed(4))[0]) > 1e-3


def test_a_student_that_reads_w_learns_the_guided_teacher():
    """Meng et al.'s stage one on a toy problem: a small network trained only on the objective's targets gives the
    teacher's guided prediction at weights it never saw exactly, far closer than the unguided teacher does."""
    torch.manual_seed(0)
    schedule = make_schedule("cosine-vp")
    teacher = gaussian_teacher(schedule)
    objective = GuidanceDistillation(Teacher.from_model(teacher), guidance=(1.0, 4.0))
    net = MLP(3, width=64, depth=2, conditioning=Conditioning([ClassLabel(2), GuidanceWeight()]))
    student = DiffusionModel(net, schedule, "v", data_shape=(3,))
    student.objective = objective
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(5)
    for _ in range(600):
        y = torch.randint(0, 2, (256,), generator=g)
        x = torch.tensor(MEANS)[y][:, None] + VAR**0.5 * torch.randn(256, 3, generator=g)
        loss, _ = student.loss({"x": x, "y": y}, g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    z = torch.randn(512, 3, generator=g)
    t = torch.rand(512, generator=g, dtype=torch.float64) * 0.9 + 0.05
    y, w = torch.randint(0, 2, (512,), generator=g), 1 + 3 * torch.rand(512, generator=g)
    with torch.no_grad():
        want = Guided(teacher.denoiser, w, teacher.conditioning)(z, t, y=y).x0
        got = student.denoiser(z, t, y=y, w=w).x0
        unguided = teacher.denoiser(z, t, y=y).x0
    error, baseline = float((got - want).pow(2).mean()), float((unguided - want).pow(2).mean())
    assert error < 0.02 * baseline, (error, baseline)


def test_init_from_copies_shared_weights_and_names_the_new_ones(tmp_path):
    torch.manual_seed(0)
    plain = MLP(2, width=8, depth=1, conditioning=Conditioning([ClassLabel(3)]))
    reads_w = MLP(2, width=8, depth=1, conditioning=Conditioning([ClassLabel(3), GuidanceWeight()]))
    from deepgm.train import save_checkpoint

    optimizer = torch.optim.AdamW(plain.parameters())
    save_checkpoint(tmp_path / "teacher", 1, plain, plain, optimizer, {}, {"step": 1})
    new = init_from(reads_w, tmp_path / "teacher")
    assert new and all(k.startswith("context.readers.w.") for k in new)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(reads_w.state_dict()[k], v)
    x, t = torch.randn(4, 2), torch.rand(4)
    y, w = torch.tensor([0, 1, 2, 0]), torch.tensor([1.0, 2.0, 5.0, 0.0])
    torch.testing.assert_close(reads_w(x, t, y=y, w=w), plain(x, t, y=y))  # the new input starts at zero
    with pytest.raises(CheckpointError, match="init_from"):
        init_from(MLP(2, width=16, depth=1), tmp_path / "teacher")


TINY = ["train.steps=12", "train.batch_size=16", "train.warmup_steps=2", "train.log_every=4",
        "train.checkpoint_every=6", "train.sample_every=0", "model.net.channels=8", "model.schedule.T=40",
        "sample.steps=4", "eval.n_samples=40", "eval.steps=4", "eval.vlb_examples=8"]


def _digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("distill") / "teacher"
    assert main(["train", "demo-digits", *TINY, "--out", str(run), "--quiet"]) == 0
    return run


def test_deepgm_distill_trains_rounds_that_sample_with_their_own_plan(teacher_run, tmp_path, capsys):
    before = _digest(teacher_run)
    out = tmp_path / "pd"
    assert main(["distill", str(teacher_run), "--out", str(out), "--rounds", "2", "--teacher-steps", "8",
                 "--steps-per-round", "4", "--quiet"]) == 0
    assert _digest(teacher_run) == before  # the teacher is read, never trained or rewritten
    teacher_keys = set(load_file(next(teacher_run.rglob("ema.safetensors"))))
    for r, n, parent in ((1, 4, teacher_run), (2, 2, out / "round-1")):
        config = yaml.safe_load((out / f"round-{r}" / "config.yaml").read_text())
        assert config["model"]["distill"]["teacher"] == str(parent.resolve())
        assert config["model"]["distill"]["steps"] == n and config["model"]["parameterization"] == "v"
        assert config["sample"]["steps"] == n and config["sample"]["grid"] == "student"
        # the student's checkpoint holds the student alone: the same tensors as the teacher's network, no more
        assert set(load_file(next((out / f"round-{r}").rglob("ema.safetensors")))) == teacher_keys
    capsys.readouterr()
    assert main(["sample", str(out / "round-2"), "--n", "8", "--out", str(tmp_path / "s")]) == 0
    assert "NFE per sample: 2" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="distilled for 2 deterministic DDIM steps"):
        main(["sample", str(out / "round-2"), "--n", "8", "--steps", "5", "--out", str(tmp_path / "s5")])


def test_a_distillation_killed_mid_round_resumes_exactly(teacher_run, tmp_path):
    train = {"checkpoint_every": 3, "keep_checkpoints": 0}
    straight = tmp_path / "straight"
    distill(teacher_run, straight, rounds=1, steps_per_round=6, teacher_steps=4, train=train, progress=False)
    killed = tmp_path / "killed"
    shutil.copytree(straight, killed)
    checkpoints = killed / "round-1" / "checkpoints"
    shutil.rmtree(checkpoints / "step-00000006")  # the kill came between the checkpoints at steps 3 and 6
    (checkpoints / "latest").write_text("step-00000003")
    distill(teacher_run, killed, rounds=1, steps_per_round=6, teacher_steps=4, train=train, progress=False)
    for name in ("model", "ema", "trainer"):  # weights, EMA, optimizer state and generators, bit for bit
        a, b = (load_file(run / "round-1" / "checkpoints" / "step-00000006" / f"{name}.safetensors")
                for run in (straight, killed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_guided_distillation_gives_a_student_that_reads_w_at_one_evaluation_per_step(teacher_run, tmp_path, capsys):
    out = tmp_path / "guided"
    assert main(["distill", str(teacher_run), "--out", str(out), "--rounds", "1", "--teacher-steps", "4",
                 "--steps-per-round", "3", "--guidance-range", "1", "3", "--guidance-steps", "3", "--quiet"]) == 0
    stage_one = yaml.safe_load((out / "round-0-guidance" / "config.yaml").read_text())
    assert stage_one["model"]["distill"]["steps"] is None and stage_one["model"]["guidance_input"] is True
    round_one = yaml.safe_load((out / "round-1" / "config.yaml").read_text())
    assert round_one["model"]["distill"]["teacher"] == str((out / "round-0-guidance").resolve())
    student = load_run(out / "round-1").model
    assert "w" in student.conditioning
    capsys.readouterr()
    assert main(["sample", str(out / "round-1"), "--guidance", "3", "--n", "4", "--out", str(tmp_path / "g")]) == 0
    assert "NFE per sample: 2" in capsys.readouterr().out  # 2 steps, one evaluation each: no unconditional pass
    with pytest.warns(UserWarning, match="lies outside them"):
        main(["sample", str(out / "round-1"), "--guidance", "6", "--n", "4", "--out", str(tmp_path / "g6")])


def test_bad_distillation_input_gives_a_clear_error(teacher_run, tmp_path, capsys):
    assert main(["distill", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--rounds", "1"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["distill", str(teacher_run), "--out", str(tmp_path / "o"), "--rounds", "3",
                 "--teacher-steps", "12"]) == 2
    assert "divisible by 2^3" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
