"""The command line end to end on tiny runs, and clear errors for bad input."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from deepgm.cli import main
from deepgm.config import load_config
from deepgm.diffusion.denoiser import Thresholded
from deepgm.diffusion.grids import make_grid
from deepgm.diffusion.samplers import SAMPLERS
from deepgm.pipeline import draw_samples, load_run

TINY_IMAGES = ["train.steps=12", "train.batch_size=16", "train.warmup_steps=2", "train.log_every=4",
               "train.checkpoint_every=6", "train.sample_every=6", "model.net.channels=16",
               "model.schedule.T=40", "sample.steps=4", "eval.n_samples=40", "eval.steps=4",
               "eval.vlb_examples=8"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["train", "demo-digits", *TINY_IMAGES, "--out", str(run), "--quiet"]) == 0
    return run


def test_train_writes_a_complete_run(digits_run):
    assert (digits_run / "config.yaml").is_file()
    assert yaml.safe_load((digits_run / "config.yaml").read_text())["train"]["steps"] == 12
    assert (digits_run / "checkpoints" / "latest").read_text().strip() == "step-00000012"
    lines = [json.loads(line) for line in (digits_run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [4, 8, 12]
    assert list((digits_run / "tb").glob("events.out.tfevents.*"))
    assert (digits_run / "samples" / "step-00000006.png").is_file()
    assert (digits_run / "loss_curve.png").is_file()


def test_sample_writes_grid_and_npz(digits_run, tmp_path):
    out = tmp_path / "s"
    assert main(["sample", str(digits_run), "--sampler", "ddpm", "--steps", "5", "--n", "10", "--out", str(out)]) == 0
    arrays = np.load(out.with_suffix(".npz"))
    assert arrays["x"].shape == (10, 1, 8, 8) and int(arrays["nfe"]) == 5
    assert list(arrays["y"]) == list(range(10))  # class-conditional: one of each digit
    assert Image.open(out.with_suffix(".png")).size[0] >= 64


def test_sample_with_the_default_sampler_calibrates_its_choice(digits_run, tmp_path, capsys):
    out = tmp_path / "c"
    args = ["sample", str(digits_run), "--sampler", "auto", "--steps", "4", "--n", "10", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert any(f"calibrated: {name}/" in printed for name in ("trig-abm", "deis", "dpmpp-2m")), printed
    arrays = np.load(out.with_suffix(".npz"))
    times = arrays["times"]
    assert int(arrays["nfe"]) == 4 and times.shape == (5,) and times[0] == 1.0 and times[-1] == 0.0
    assert np.isfinite(arrays["x"]).all()


def test_sample_with_deis_on_a_calibrated_grid(digits_run, tmp_path, capsys):
    out = tmp_path / "d"
    args = ["sample", str(digits_run), "--sampler", "deis", "--grid", "calibrated", "--steps", "4", "--n", "10",
            "--out", str(out)]
    assert main(args) == 0
    assert "calibrated: " in capsys.readouterr().out
    arrays = np.load(out.with_suffix(".npz"))
    assert int(arrays["nfe"]) == 4 and arrays["times"].shape == (5,) and np.isfinite(arrays["x"]).all()


def test_image_samples_stay_in_the_data_range_whatever_the_sampler(digits_run):
    """Clipping x0 to [-1, 1] (the pipeline's default for images) must hold for the samples returned too: trig-abm's
    last step corrects the clipped prediction and would leave the range without the final clamp in deepgm.sample."""
    run = load_run(digits_run)
    labels = {"y": torch.arange(32) % run.model.num_classes}  # the digits that draw_samples cycles through
    denoiser = Thresholded(run.model.denoiser)
    schedule = denoiser.schedule
    x_T = schedule.prior_std() * torch.randn((32, *run.data.shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the bare sampler, without deepgm.sample's final clamp
        raw = SAMPLERS["trig-abm"](denoiser, make_grid("trig", schedule, 3), x_T, cond=labels)
    assert float(raw.abs().max()) > 1  # what the clamp is for, on this tiny model
    for sampler in ("trig-abm", "deis", "ddpm"):
        x = draw_samples(run.model, run.data, 32, sampler, 3, seed=0, grid="trig")[0].x
        assert float(x.abs().max()) <= 1 and bool(torch.isfinite(x).all())
    x = draw_samples(run.model, run.data, 32, "trig-abm", 3, seed=0, grid="trig")[0].x
    torch.testing.assert_close(x, raw.clamp(-1, 1))  # the same draw, clamped: nothing else changed


def test_a_calibrated_grid_for_a_stochastic_sampler_is_refused_and_writes_nothing(digits_run, tmp_path, capsys):
    out = tmp_path / "bad"
    args = ["sample", str(digits_run), "--sampler", "ddpm", "--grid", "calibrated", "--steps", "4", "--out", str(out)]
    assert main(args) == 2
    assert "ODE samplers" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_eval_reports_fid_with_floor_and_bits_per_dim(digits_run, capsys):
    assert main(["eval", str(digits_run)]) == 0
    metrics = json.loads((digits_run / "eval.json").read_text())
    for key in ("fid", "fid_floor", "precision", "recall", "class_accuracy", "feature_net_test_accuracy", "test_bpd"):
        assert np.isfinite(metrics[key]), key
    assert metrics["fid_floor"] < metrics["fid"]  # 12 training steps are far from the data
    assert metrics["test_bpd"] > 0 and metrics["bpd_levels"] == 17
    for picture in ("forward_process.png", "reverse_process.png", "eval_samples.png"):
        assert (digits_run / picture).is_file()


def test_toy_run_trains_and_evaluates(tmp_path):
    run = tmp_path / "toy"
    args = ["train", "ddpm-toy", "train.steps=8", "train.log_every=4", "train.checkpoint_every=4",
            "model.schedule.T=100", "sample.steps=10", "eval.n_samples=100", "eval.steps=10",
            "eval.vlb_examples=16", "--out", str(run), "--quiet"]
    assert main(args) == 0
    assert main(["eval", str(run)]) == 0
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics["sliced_wasserstein"] > metrics["sliced_wasserstein_floor"]


def test_existing_run_needs_resume(digits_run, capsys):
    assert main(["train", "demo-digits", "--out", str(digits_run), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["train", "no-such-config"], "not found"),
    (["train", "demo-digits", "train.stepz=3"], "stepz"),
    (["train", "demo-digits", "model.net.chanels=3"], "chanels"),
    (["train", "demo-digits", "model.schedule.name=quadratic"], "unknown schedule"),
    (["train", "demo-digits", "data.name=imagenet"], "unknown dataset"),
    (["train", "demo-digits", "model.parameterization=score"], "parameterization"),
    (["train", "demo-digits", "oops"], "key.subkey=value"),
    (["sample", "/nonexistent/run"], "not a run directory"),
    (["eval", "/nonexistent/run"], "not a run directory"),
])
def test_bad_input_gives_a_clear_error(args, message, capsys, tmp_path):
    if args[0] == "train":
        args = [*args, "--out", str(tmp_path / "r"), "--quiet"]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # a refused run leaves no directory behind


@pytest.mark.parametrize("args", [["sample", "run", "--steps", "0"], ["eval", "run", "--nll", "--k", "-3"],
                                  ["collapse", "--steps", "0"], ["table", "run", "--n-samples", "x"]])
def test_counts_must_be_positive_whole_numbers(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "must be at least 1" in err or "expected a whole number" in err


def test_bad_yaml_file_is_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("trainer: {steps: 3}\n")
    with pytest.raises(ValueError, match="unknown config section"):
        load_config(bad)
