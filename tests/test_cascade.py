"""The cascade: super-resolution stages that read the upsampled low-res image and its noise-augmentation level
(Ho et al. 2021; Saharia et al. 2022), chained behind a text-conditioned base run by a cascade file."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepgm.cascade import Cascade, Stage, load_cascade
from deepgm.cli import main
from deepgm.conditioning import Conditioning, LowResImage, NoiseAugmentation
from deepgm.config import load_config
from deepgm.data import load_dataset
from deepgm.diffusion.model import DiffusionModel
from deepgm.diffusion.schedule_registry import make_schedule
from deepgm.family import SamplingPlan
from deepgm.models import build_model

pytest.importorskip("transformers", reason="the text encoders need the text extra: pip install -e '.[text]'")

# 8x8 base, 8 -> 16 super-resolution; a bag-of-words encoder (the fastest real one)
BASE = ["data.size=8", "data.n=256", "model.net.channels=16", "model.net.channel_mult=[1,2]",
        "model.net.attention_resolutions=[4]", "model.schedule.T=50", "model.text.encoder=bow", "sample.steps=3",
        "eval.steps=3"]
SR = ["data.size=16", "data.n=256", "model.net.channels=16", "model.net.channel_mult=[1,2]",
      "model.net.attention_resolutions=[8]", "model.schedule.T=50", "model.text.encoder=bow",
      "model.super_resolution.low_res=8", "sample.steps=2", "eval.steps=2"]
TRAIN = ["train.steps=2", "train.batch_size=8", "train.log_every=1", "train.checkpoint_every=2", "train.sample_every=2"]


def _randomise(net: nn.Module, std: float = 0.05) -> nn.Module:
    """Small normal weights everywhere, so that zero-initialised layers stop hiding an input."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


def tiny_sr(overrides=()):
    config = load_config("t2i-shapes-sr32", [*SR, *overrides])
    data = load_dataset("shapes", "train", size=16, n=256)
    torch.manual_seed(0)
    model = build_model(config["model"], data.spec)
    return model, model.conditioning.prepare(data)


def test_the_sr_network_reads_the_low_res_image_and_the_augmentation_level():
    model, data = tiny_sr()
    net = _randomise(model.denoiser.net)
    batch = data.batch(torch.arange(4))
    cond = model.conditioning.from_batch(batch)
    low = model.conditioning["low_res"]
    assert torch.allclose(cond["low_res"], low.upsample(F.avg_pool2d(batch["x"], 2)))  # box down, bilinear up
    x, t = torch.randn(4, 3, 16, 16), torch.full((4,), 0.5)
    out = net(x, t, **cond)
    other = {**cond, "low_res": cond["low_res"].flip(0)}
    assert (net(x, t, **other) - out).abs().amax() > 1e-3
    for level in (0.1, 0.5):  # small weights, a small effect, but far above rounding (which the zero init gives)
        assert (net(x, t, **{**cond, "aug": torch.full((4,), level)}) - out).abs().amax() > 1e-5
    with pytest.raises(ValueError, match="low_res"):
        net(x, t, **{**cond, "low_res": torch.randn(4, 3, 8, 8)})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        net(x, t, **{**cond, "aug": torch.full((4,), 1.5)})


def test_training_noises_the_low_res_input_with_the_forward_kernel_at_a_uniform_level():
    """What the network reads in training: z = alpha_s low + sigma_s eps with s ~ U[0, max] and s told to it."""
    model, data = tiny_sr(["model.super_resolution.max_augmentation=0.6"])
    seen = []
    model.denoiser.net.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    batch = data.batch(torch.arange(256))
    model.loss(batch, torch.Generator().manual_seed(0))
    cond = seen[0]
    level, noised = cond["aug"].double(), cond["low_res"].double()
    clean = model.conditioning["low_res"].from_batch(batch).double()
    assert 0 <= level.min() and level.max() <= 0.6
    assert abs(level.mean() - 0.3) < 0.04 and abs(level.var() - 0.6**2 / 12) < 0.01  # U[0, 0.6]: mean 0.3, var 0.03
    alpha, sigma = model.schedule.alpha_sigma(level)
    keep = level > 0.02
    eps = (noised - alpha[:, None, None, None] * clean) / sigma[:, None, None, None]
    eps = eps[keep]
    assert abs(eps.mean()) < 0.01 and abs(eps.std() - 1) < 0.01  # a standard normal, ~190k values
    # without augmentation in training the input is the clean image and the level 0
    model, data = tiny_sr(["model.super_resolution.max_augmentation=0"])
    seen.clear()
    model.denoiser.net.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    batch = data.batch(torch.arange(16))
    model.loss(batch, torch.Generator().manual_seed(0))
    assert torch.equal(seen[0]["low_res"], model.conditioning["low_res"].from_batch(batch))
    assert torch.equal(seen[0]["aug"], torch.zeros(16))


class CopyLowRes(nn.Module):
    """An x0-network that returns its low-resolution input: the identity super-resolution model."""

    def __init__(self, size: int):
        super().__init__()
        self.conditioning = Conditioning([LowResImage(3, size // 2, size), NoiseAugmentation(0.5)])
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, t, **cond):
        return cond["low_res"] * self.scale


def test_a_cascade_of_identity_sr_stages_reproduces_the_upsampled_base_image():
    base_config = load_config("t2i-shapes-base", BASE)
    base = build_model(base_config["model"], load_dataset("shapes", "train", size=8, n=16).spec).eval()
    plan = SamplingPlan("ddim", 3)
    stages = [Stage("base", base, plan)]
    for size in (16, 32):
        identity = DiffusionModel(CopyLowRes(size), make_schedule("cosine", T=50), "x0", data_shape=(3, size, size))
        stages.append(Stage(f"copy{size}", identity, plan))
    cascade = Cascade(stages)
    out = cascade.generate(["a red circle", "a big blue square above a green triangle"], seed=0)
    assert [x.shape[-1] for x in out.images] == [8, 16, 32] and out.nfe == [3, 3, 3]
    up = lambda x, s: F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)  # noqa: E731
    assert torch.allclose(out.images[1], up(out.images[0], 16), atol=1e-6)
    assert torch.allclose(out.images[2], up(up(out.images[0], 16), 32), atol=1e-6)
    # at an augmentation level the identity stage returns the noised input: the level reaches the low-res image
    noisy = cascade.with_plans(sr={"augmentation": 0.3}).generate(out.captions, seed=0)
    assert torch.equal(noisy.images[0], out.images[0])
    diff = noisy.images[1] - up(out.images[0], 16)
    alpha, sigma = (float(v) for v in stages[1].model.schedule.alpha_sigma(torch.tensor([0.3], dtype=torch.float64)))
    assert 0.5 * sigma < (diff - (alpha - 1) * up(out.images[0], 16)).std() < 1.5 * sigma
    # the stages must chain: a 16 -> 32 stage cannot follow an 8x8 base
    with pytest.raises(ValueError, match=r"stage 1 \(copy32\) upsamples 3x16x16 images, but stage 0 \(base\) makes"):
        Cascade([stages[0], stages[2]])
    with pytest.raises(ValueError, match="the first stage is the base model"):
        Cascade(stages[1:])


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    assert main(["train", "t2i-shapes-base", *BASE, *TRAIN, "--out", str(root / "base"), "--quiet"]) == 0
    assert main(["train", "t2i-shapes-sr32", *SR, *TRAIN, "--out", str(root / "sr16"), "--quiet"]) == 0
    return root


def _write(path, stages):
    plans = ["{steps: 3}"] + ["{steps: 2, augmentation: 0.2}"] * (len(stages) - 1)
    lines = ["stages:"] + [f"  - run: {s}\n    sample: {p}" for s, p in zip(stages, plans, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_generate_and_eval_a_cascade_from_its_file(stage_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEEPGM_CACHE", str(tmp_path / "cache"))
    cascade = _write(stage_runs / "cascade.yaml", ["base", "sr16"])  # paths relative to the file
    out = tmp_path / "g-w2.5"  # a dot in the stem: the files are g-w2.5.npz and .png, not g-w2.npz
    assert main(["generate", str(cascade), "a small red circle in the top left", "a blue square", "--n", "2",
                 "--guidance", "2", "--out", str(out)]) == 0
    assert "8x8: 6, 16x16: 2" in capsys.readouterr().out  # the base guided (two evaluations per step)
    arrays = np.load(tmp_path / "g-w2.5.npz")
    assert arrays["x_8"].shape == (4, 3, 8, 8) and arrays["x_16"].shape == (4, 3, 16, 16)
    assert (tmp_path / "g-w2.5.png").is_file()
    assert main(["eval", str(cascade), "--n-samples", "8", "--out", str(tmp_path / "e")]) == 0
    metrics = json.loads((tmp_path / "e" / "cascade_eval.json").read_text())
    for prefix in ("", "test-combos/"):
        assert 0 <= metrics[prefix + "alignment"] <= 1 and np.isfinite(metrics[prefix + "fid"])
        assert np.isfinite(metrics[prefix + "base_upsampled/fid"])
    assert metrics["size"] == 16 and len(metrics["seconds_per_image"]) == 2
    assert metrics["nfe"] == [6, 2]  # the base guided (w = 3)
    assert (tmp_path / "e" / "cascade_stages.png").is_file()


def test_a_cascade_naming_a_missing_run_or_a_stage_of_the_wrong_resolution_gets_one_clear_error(stage_runs, capsys):
    missing = _write(stage_runs / "missing.yaml", ["base", "no-such-run"])
    assert main(["generate", str(missing), "a red circle"]) == 2
    err = capsys.readouterr().err
    assert "stage 1's run" in err and "no-such-run" in err and "Traceback" not in err and err.count("\n") == 1
    wrong = _write(stage_runs / "wrong.yaml", ["base", "sr16", "sr16"])
    assert main(["eval", str(wrong)]) == 2
    assert "stage 2 (sr16) upsamples 3x8x8 images, but stage 1 (sr16) makes 3x16x16" in capsys.readouterr().err
    with pytest.raises(ValueError, match="the first stage is the base model"):
        load_cascade(_write(stage_runs / "sr-first.yaml", ["sr16"]))
    (stage_runs / "bad.yaml").write_text("stages:\n  - run: base\n    sample: {steps: 2, speed: 3}\n")
    with pytest.raises(ValueError, match="speed"):
        load_cascade(stage_runs / "bad.yaml")
    ok = _write(stage_runs / "ok.yaml", ["base", "sr16"])
    assert main(["generate", str(ok), "a red circle", "--steps", "4"]) == 2
    assert "--steps apply to a run" in capsys.readouterr().err
