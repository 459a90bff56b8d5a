"""VAEs on digits end to end: a short run reaches a stated test NLL floor, the conditional VAE draws the class it
is asked for, and the command line trains, samples, evaluates (IWAE), runs the collapse study and the table."""

import json
import math

import numpy as np
import pytest
import torch

from deepgm.cli import main
from deepgm.data import load_dataset
from deepgm.models import build_model
from deepgm.studies.collapse import run_collapse
from deepgm.studies.table import comparison_table
from deepgm.train import TrainConfig, Trainer
from deepgm.vae.diagnostics import iwae_nll

# A 1,500-step MLP VAE (16 latents, discretised logistic over 17 levels) measured 1.89 bits/dim here.
FLOOR_BPD = 1.95
TINY = ["train.steps=12", "train.log_every=6", "train.checkpoint_every=6", "train.sample_every=6",
        "train.batch_size=32", "eval.n_samples=40", "eval.iwae_k=4"]


def _fit(spec: dict, steps: int, run_dir, seed: int = 0):
    data = load_dataset("digits", "train")
    torch.manual_seed(seed)
    model = build_model(spec, data)
    config = TrainConfig(steps=steps, batch_size=64, lr=1e-3, warmup_steps=100, lr_schedule="cosine", ema_decay=0.99,
                         log_every=steps, checkpoint_every=0, device="cpu", seed=seed)
    trainer = Trainer(model, data, config, run_dir, progress=False)
    trainer.fit()
    return trainer.ema_model.eval()


def test_a_short_digits_run_reaches_the_stated_nll_floor(tmp_path):
    model = _fit({"kind": "vae", "latent_dim": 16}, 1500, tmp_path)
    test = load_dataset("digits", "test")
    result = iwae_nll(model, test, k=100, seed=0)
    assert result["examples"] == 359
    assert result["nll_bpd"] < FLOOR_BPD, result
    assert result["nll_nats"] == pytest.approx(result["nll_bpd"] * 64 * math.log(2))


def test_conditional_vae_draws_the_requested_class(tmp_path):
    """Decoded means for each label are closest to that label's mean training digit (nearest-centroid)."""
    model = _fit({"kind": "vae", "latent_dim": 8, "class_conditional": True}, 400, tmp_path)
    train = load_dataset("digits", "train")
    centroids = torch.stack([train.x[train.y == c].mean(0) for c in range(10)]).reshape(10, -1)  # (10, 64)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 10
    x = model.draw(200, g, {"y": y}, mean=True).reshape(200, -1)
    predicted = torch.cdist(x, centroids).argmin(1)
    assert (predicted == y).double().mean() > 0.8


@pytest.fixture(scope="module")
def cvae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "cvae"
    assert main(["train", "cvae-digits", *TINY, "--out", str(run), "--quiet"]) == 0
    return run


def test_cli_samples_each_class_and_evaluates_with_iwae(cvae_run, tmp_path):
    out = tmp_path / "s"
    assert main(["sample", str(cvae_run), "--n", "20", "--out", str(out)]) == 0
    arrays = np.load(out.with_suffix(".npz"))
    assert arrays["x"].shape == (20, 1, 8, 8) and list(arrays["y"]) == list(range(10)) * 2
    assert main(["eval", str(cvae_run)]) == 0
    metrics = json.loads((cvae_run / "eval.json").read_text())
    for key in ("fid", "test_bpd", "elbo_bpd", "kl_nats", "mutual_information"):
        assert np.isfinite(metrics[key]), key
    assert metrics["iwae_k"] == 4 and metrics["bpd_levels"] == 17 and metrics["test_bpd"] <= metrics["elbo_bpd"]
    for picture in ("reconstructions.png", "prior_samples.png", "latent_scatter.png", "interpolations.png"):
        assert (cvae_run / picture).is_file(), picture
    assert main(["eval", str(cvae_run), "--nll", "--k", "3", "--nll-examples", "20"]) == 0
    nll = json.loads((cvae_run / "nll.json").read_text())
    assert nll["iwae"]["n"] == 20 and nll["iwae"]["nfe"] == 3 and nll["conditional"]


def test_cli_hvae_run_writes_fixed_top_group_pictures(tmp_path):
    run = tmp_path / "hvae"
    args = ["train", "hvae-digits", *TINY, "model.hidden=32", "model.group_dims=[4,4,4]", "--out", str(run), "--quiet"]
    assert main(args) == 0
    assert main(["eval", str(run)]) == 0
    metrics = json.loads((run / "eval.json").read_text())
    assert len(metrics["kl_per_group"]) == 3 and metrics["latent_dim"] == 12
    assert (run / "fixed_top1_of_3.png").is_file() and (run / "fixed_top2_of_3.png").is_file()


def test_collapse_study_writes_its_table_and_curves(tmp_path):
    tiny = ["train.batch_size=16", "model.decoder.channels=8", "model.decoder.layers=2", "model.decoder.kernel=3"]
    summary = run_collapse(tmp_path, steps=10, k=3, overrides=tiny, only=["pixelcnn-plain", "pixelcnn-aggressive"],
                           progress=False, n_test=24)
    assert set(summary["runs"]) == {"pixelcnn-plain", "pixelcnn-aggressive"}
    for r in summary["runs"].values():
        assert [p["step"] for p in r["probes"]] == list(range(1, 11))
        assert 0 <= r["active_units"] <= 16 and r["nll_bpd"] > 0
    table = (tmp_path / "collapse.md").read_text()
    assert "(a) PixelCNN decoder, plain" in table and "IWAE_3" in table
    assert (tmp_path / "collapse.png").is_file()
    # aggressive inner steps moved the encoder: its run differs from the plain one
    assert summary["runs"]["pixelcnn-aggressive"]["kl_nats"] != summary["runs"]["pixelcnn-plain"]["kl_nats"]


def test_comparison_table_has_a_row_per_bound(cvae_run, tmp_path):
    summary = comparison_table([cvae_run], tmp_path / "table", k=3, n_samples=40, n=16, progress=False)
    (row,) = summary["rows"]
    assert row["bound"] == "IWAE_3" and row["conditional"] and np.isfinite(row["fid"])
    assert row["nll_nats"] == pytest.approx(row["nll_bpd"] * 64 * math.log(2))
    assert "p(x|y)" in (tmp_path / "table.md").read_text()
