"""The command line end to end on tiny runs, and clear errors for bad input."""

import dataclasses
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
from deepgm.family import CHUNK, SamplingPlan, chunk_generator
from deepgm.pipeline import draw, load_run, plan_for

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


def test_a_run_records_its_versions_and_a_hash_of_its_training_data(digits_run):
    import platform

    import deepgm
    from deepgm.pipeline import data_fingerprint, load_data

    config = yaml.safe_load((digits_run / "config.yaml").read_text())
    resolved = config["resolved"]
    assert resolved["versions"] == {"deepgm": deepgm.__version__, "torch": torch.__version__,
                                    "python": platform.python_version()}
    train = load_data(config, "train")
    assert resolved["data_sha256"] == data_fingerprint(train)
    changed = dataclasses.replace(train, x=train.x.clone())
    changed.x[0, 0, 0, 0] += 0.5
    assert data_fingerprint(changed) != resolved["data_sha256"]


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
    assert any(f"calibrated: {name}/" in printed for name in ("trig-abm", "deis", "dpmpp-2m", "unipc")), printed
    arrays = np.load(out.with_suffix(".npz"))
    times = arrays["times"]
    assert int(arrays["nfe"]) == 4 and times.shape == (5,) and times[-1] == 0.0
    assert times[0] < 1 and f"started at t = {times[0]:.4g}" in printed  # an eps network: auto starts at AUTO_START
    assert np.isfinite(arrays["x"]).all()


def test_sample_with_deis_on_a_calibrated_grid(digits_run, tmp_path, capsys):
    out = tmp_path / "d"
    args = ["sample", str(digits_run), "--sampler", "deis", "--grid", "calibrated", "--steps", "4", "--n", "10",
            "--out", str(out)]
    assert main(args) == 0
    assert "calibrated: " in capsys.readouterr().out
    arrays = np.load(out.with_suffix(".npz"))
    assert int(arrays["nfe"]) == 4 and arrays["times"].shape == (5,) and np.isfinite(arrays["x"]).all()


def test_sample_with_guidance_and_dynamic_thresholding(digits_run, tmp_path, capsys):
    """--guidance 3 evaluates the conditional and unconditional model each step (NFE 2 x steps), changes the samples
    from the same noise, and dynamic thresholding keeps them in [-1, 1]; --guidance 1 is the plain conditional model."""
    base = ["sample", str(digits_run), "--sampler", "ddim", "--steps", "4", "--n", "10", "--seed", "3"]
    assert main([*base, "--guidance", "3", "--threshold", "dynamic", "--out", str(tmp_path / "g3")]) == 0
    assert "NFE per sample: 8" in capsys.readouterr().out
    assert main([*base, "--guidance", "1", "--out", str(tmp_path / "g1")]) == 0
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    g3, g1, plain = (np.load(tmp_path / f"{name}.npz") for name in ("g3", "g1", "plain"))
    assert int(g3["nfe"]) == 8 and float(g3["guidance"]) == 3 and int(g1["nfe"]) == 4
    assert np.abs(g3["x"]).max() <= 1 and np.isfinite(g3["x"]).all()
    assert np.array_equal(g1["x"], plain["x"]) and not np.allclose(g3["x"], g1["x"], atol=1e-3)
    assert list(g3["y"]) == list(range(10))
    with pytest.raises(SystemExit):  # argparse: "must be a finite number >= 0"
        main([*base, "--guidance", "-2", "--out", str(tmp_path / "bad")])
    assert ">= 0" in capsys.readouterr().err
    assert main([*base, "--threshold", "dynamic:1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "percentile" in capsys.readouterr().err and not list(tmp_path.glob("bad*"))
    assert main([*base, "--start", "20", "--out", str(tmp_path / "late")]) == 0  # sampling begins at sigma/alpha 20
    late = np.load(tmp_path / "late.npz")
    assert int(late["nfe"]) == 4 and float(late["times"][0]) < 1 and not np.allclose(late["x"], plain["x"], atol=1e-3)
    assert main([*base, "--start", "1e9", "--out", str(tmp_path / "bad")]) == 2  # above the schedule's own
    assert "sigma/alpha" in capsys.readouterr().err and not list(tmp_path.glob("bad*"))


def test_image_samples_stay_in_the_data_range_whatever_the_sampler(digits_run):
    """Clipping x0 to [-1, 1] (the pipeline's default for images) must hold for the samples returned too: trig-abm's
    last step corrects the clipped prediction and would leave the range without the final clamp in deepgm.sample."""
    run = load_run(digits_run)
    labels = {"y": torch.arange(CHUNK) % 10}  # the digits that draw cycles through, over the first chunk
    denoiser = Thresholded(run.model.denoiser)
    schedule = denoiser.schedule
    x_T = schedule.prior_std() * torch.randn((CHUNK, *run.data.shape), generator=chunk_generator(0, 0))
    with torch.no_grad():  # the bare sampler, without deepgm.sample's final clamp
        raw = SAMPLERS["trig-abm"](denoiser, make_grid("trig", schedule, 3), x_T, cond=labels)
    assert float(raw.abs().max()) > 1  # what the clamp is for, on this tiny model
    for sampler in ("trig-abm", "deis", "ddpm"):
        x = draw(run, 32, 0, SamplingPlan(sampler, 3, grid="trig")).x
        assert float(x.abs().max()) <= 1 and bool(torch.isfinite(x).all())
    x = draw(run, 32, 0, SamplingPlan("trig-abm", 3, grid="trig")).x
    torch.testing.assert_close(x, raw[:32].clamp(-1, 1))  # the same draw, clamped: nothing else changed


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
    assert main(["eval", str(digits_run)]) == 0  # the same run and seed: the same numbers, to the last digit
    again = json.loads((digits_run / "eval.json").read_text())
    assert {k: v for k, v in again.items() if "seconds" not in k} == {k: v for k, v in metrics.items()
                                                                      if "seconds" not in k}


def test_toy_run_trains_samples_the_ring_and_evaluates(tmp_path, monkeypatch):
    """300 steps of the toy DDPM through the CLI, then `deepgm sample` (the config's 100-step ancestral sampler)
    draws the ring: mean radius ~1.97, >95% of points within 0.5 of it, every mode drawn, sliced W2 to the test
    split ~0.17 (floor at n=1000: ~0.12). A sampler returning its noise x_T (radius 1.26, sliced W2 0.57) or the
    untrained model (8 steps: radius ~150) fails each of these bounds."""
    import deepgm.viz.score_plots
    from deepgm.data import load_dataset, make_mixture
    from deepgm.eval.metrics import sliced_wasserstein

    run, stem = tmp_path / "toy", tmp_path / "samples"
    args = ["train", "ddpm-toy", "train.steps=300", "train.lr=3e-3", "train.warmup_steps=20", "train.ema_decay=0.9",
            "train.log_every=100", "train.checkpoint_every=300", "train.sample_every=0", "data.n=4000",
            "model.net.width=64", "model.net.depth=2", "model.schedule.T=100", "sample.steps=100",
            "eval.n_samples=1000", "eval.steps=100", "eval.vlb_examples=16", "--out", str(run), "--quiet"]
    assert main(args) == 0
    assert main(["sample", str(run), "--n", "1000", "--out", str(stem)]) == 0
    x = torch.from_numpy(np.load(stem.with_suffix(".npz"))["x"])
    ring = make_mixture("ring")  # the config's data: 8 modes of std 0.15 on the circle of radius 2
    radius = x.norm(dim=1)
    assert abs(float(radius.mean()) - 2) < 0.1 and float(((radius - 2).abs() < 0.5).float().mean()) > 0.9
    assert int(torch.bincount(ring.assign(x), minlength=8).min()) > 60  # each mode holds 12.5% of the data
    test = load_dataset("toy", "test", mixture="ring", n=1000).x
    assert sliced_wasserstein(x, test, generator=torch.Generator().manual_seed(0)) < 0.3
    # eval reports the same distance on its own draw; its 2-D pictures (tens of seconds here) are left out: the
    # test_likelihood_ode eval test draws them
    monkeypatch.setattr(deepgm.viz.score_plots, "score_pictures", lambda *args, **kwargs: [])
    assert main(["eval", str(run)]) == 0
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics["sliced_wasserstein"] < 0.3


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


def test_sampling_settings_in_a_config_are_checked_before_anything_runs():
    with pytest.raises(ValueError, match="unknown key.*'guidence'.*'sample'"):
        load_config("demo-digits", ["sample.guidence=3"])
    with pytest.raises(ValueError, match="percentile"):
        load_config("demo-digits", ["eval.threshold=dynamic:7"])
    with pytest.raises(ValueError, match="guidance weight"):
        load_config("demo-digits", ["sample.guidance=-1"])
    config = load_config("demo-digits", ["sample.guidance=3", "sample.threshold=dynamic"])
    for section in ("sample", "eval"):  # eval samples as `sample:` says unless it says otherwise
        plan = plan_for(config, section)
        assert (plan.guidance, plan.threshold) == (3.0, "dynamic")
    assert plan_for(config, "sample", guidance=0.0).guidance == 0.0  # the command line's --guidance wins


def test_resume_restarts_a_run_stopped_before_its_first_checkpoint(digits_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "stopped"
    shutil.copytree(digits_run, run)
    shutil.rmtree(run / "checkpoints")  # killed after writing config.yaml, before any checkpoint
    assert main(["train", "demo-digits", *TINY_IMAGES, "--out", str(run), "--quiet"]) == 2  # it holds a run
    assert main(["train", "demo-digits", *TINY_IMAGES, "--out", str(run), "--resume", "--quiet"]) == 0
    assert "no checkpoint yet" in capsys.readouterr().out
    assert (run / "checkpoints" / "latest").exists()
    assert main(["train", "demo-digits", "--out", str(tmp_path / "nothing"), "--resume", "--quiet"]) == 2
    assert "holds no run to resume" in capsys.readouterr().err
