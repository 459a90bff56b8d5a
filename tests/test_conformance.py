"""Every shipped config builds a model that speaks the family protocol (deepgm.family): generate gives samples of
the data's shape and range, the same for the same seed; likelihoods are finite bits/dim; pictures are written.
Untrained and shrunk (narrow nets), so the protocol, not the quality, is what is checked."""

import math

import pytest
import torch

from deepgm.config import PACKAGED, load_config
from deepgm.diffusion.model import DENSITY_PICTURE
from deepgm.family import ModelFamily, SamplingPlan, generate_chunked
from deepgm.models import build_model
from deepgm.pipeline import load_data

CONFIGS = sorted(p.stem for p in PACKAGED.glob("*.yaml"))
SMALL = {"channels": 8, "width": 16, "hidden": 16, "layers": 2, "num_res_blocks": 1, "T": 40}
CHEAP = {"k": 4, "elbo_points": 4, "probes": 1, "rtol": 1e-2, "atol": 1e-2}


def shrunk(spec):
    """The model spec with every width made small (nested dicts too)."""
    if isinstance(spec, dict):
        return {k: SMALL.get(k, shrunk(v)) if k in SMALL else shrunk(v) for k, v in spec.items()}
    return spec


def test_every_config_is_covered():
    assert len(CONFIGS) >= 10 and {"demo-digits", "vae-digits", "hvae-digits", "sde-vp-toy"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_a_shipped_config_speaks_the_family_protocol(name, tmp_path, monkeypatch):
    monkeypatch.setitem(DENSITY_PICTURE, "density_points", 6)  # a coarse ODE density picture: fast
    monkeypatch.setattr("deepgm.diffusion.model.REVERSE_PICTURE_STEPS", 20)
    config = load_config(name)
    test = load_data(config, "test").subset(torch.arange(16))
    torch.manual_seed(0)
    model = build_model(shrunk(config["model"]), test.spec).eval()
    assert isinstance(model, ModelFamily)
    model.conditioning.prepare(test)
    cond = model.conditioning.examples(test, 5)  # the conditions without a default (captions), from the data

    plan = SamplingPlan(sampler="ddim", steps=3, grid="trig")
    with torch.no_grad():
        a, b = (generate_chunked(model, 5, seed=1, plan=plan, cond=cond) for _ in range(2))
        c = generate_chunked(model, 5, seed=2, plan=plan, cond=cond)
    assert a.x.shape == (5, *test.x.shape[1:]) and bool(torch.isfinite(a.x).all()) and a.nfe >= 1
    if test.x.dim() == 4:
        assert float(a.x.abs().max()) <= 1
    torch.testing.assert_close(a.x, b.x)
    assert not torch.allclose(a.x, c.x)
    if model.conditioning:
        assert set(a.cond) == set(model.conditioning.keys) and all(len(v) == 5 for v in a.cond.values())

    bounds = model.likelihoods(test, n=4, options=CHEAP)
    assert bounds and set(bounds) <= set(model.BOUNDS)
    for bound, summary in bounds.items():
        assert math.isfinite(summary["bpd"]) and summary["bpd"] > 0, (bound, summary)

    pictures = model.pictures(test, tmp_path)
    assert pictures and all(p.is_file() and p.stat().st_size > 0 for p in pictures)
