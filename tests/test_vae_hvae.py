"""The hierarchical VAE: its analytic per-group KLs agree with the densities its importance weights use, the
posterior is the prior plus a residual, the report has a KL per group, and top groups can be held fixed."""

import math

import pytest
import torch

from deepgm.data import load_dataset
from deepgm.models import build_model
from deepgm.vae.heads import make_head
from deepgm.vae.hvae import HVAE
from deepgm.vae.vae import gaussian_log_density

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module", params=["vector", "spatial"])
def hvae(request):
    torch.manual_seed(0)
    head = make_head("discretized_logistic", 17)
    if request.param == "vector":
        model = HVAE(head, SHAPE, [3, 4, 5], hidden=32)
    else:  # 4 maps at 1x1, 2 at 4x4, 1 at 8x8
        model = HVAE(head, SHAPE, [4, 2, 1], hidden=8, resolutions=[1, 4, 8])
    model = model.double()
    with torch.no_grad():  # move the priors of the lower groups away from N(0, I)
        for group in model.groups[1:]:
            for p in group.prior_net.parameters():
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def batch():
    x = load_dataset("digits", "test").x[:6].double()
    return {"x": x}


def test_analytic_kls_agree_with_the_importance_weights(hvae, batch):
    """E_q[log w] = E_q[log p(x|z)] - sum_l E_q[KL_l]: the single-sample ELBO with analytic KLs and the mean
    log-weight are two unbiased estimates of the same number."""
    g = torch.Generator().manual_seed(0)
    n = 1000
    log_w = hvae.log_weights(batch, n, g)  # (6, n)
    big = {"x": batch["x"].repeat(n, 1, 1, 1)}
    terms = hvae.elbo_terms(big, g)
    elbo = (terms["log_px_z"] - terms["kl"].sum(1)).reshape(n, 6)
    diff = log_w.mean(1) - elbo.mean(0)
    se = torch.sqrt(log_w.var(1) / n + elbo.var(0) / n)
    assert (diff.abs() < 4 * se).all()
    assert (terms["kl"] >= 0).all() and terms["kl"].shape == (6 * n, sum(hvae.group_dims))


def test_posterior_log_prob_is_the_density_of_the_top_down_samples(hvae, batch):
    g = torch.Generator().manual_seed(1)
    feats = hvae.bottom_up(batch["x"])
    out = hvae.top_down(feats, 6, g)
    direct = sum(gaussian_log_density(z, mu, lv) for z, (mu, lv, _, _) in zip(out["z"], out["stats"], strict=True))
    assert torch.allclose(hvae.posterior_log_prob(out["z"], feats), direct, atol=1e-10)
    # the top group's prior is N(0, I); the posterior is the prior shifted and rescaled
    mu_p, lv_p = out["stats"][0][2:]
    assert torch.count_nonzero(mu_p) == 0 and torch.count_nonzero(lv_p) == 0


def test_iwae_improves_on_the_elbo(hvae, batch):
    k1 = hvae.iwae(batch, 1, torch.Generator().manual_seed(0)).mean()
    k200 = hvae.iwae(batch, 200, torch.Generator().manual_seed(0), chunk=600).mean()
    assert k200 > k1


def test_fixed_top_groups_are_kept_and_lower_groups_resampled(hvae):
    top = hvae.prior_latents(4, torch.Generator().manual_seed(0))
    a = hvae.draw(4, torch.Generator().manual_seed(1), fixed=top[:1], mean=True)
    b = hvae.draw(4, torch.Generator().manual_seed(2), fixed=top[:1], mean=True)
    c = hvae.draw(4, torch.Generator().manual_seed(3), fixed=top, mean=True)
    d = hvae.draw(4, torch.Generator().manual_seed(4), fixed=top, mean=True)
    assert torch.equal(c, d)  # every group fixed: the decoder mean is determined
    assert not torch.allclose(a, b)  # lower groups resampled
    out = hvae.top_down(None, 4, torch.Generator().manual_seed(5), fixed=top[:2])
    assert torch.equal(out["z"][0], top[0]) and torch.equal(out["z"][1], top[1])
    assert not torch.equal(out["z"][2], top[2])


def test_spatial_groups_have_the_sizes_of_their_maps():
    data = load_dataset("digits", "train")
    model = build_model({"kind": "hvae", "group_dims": [8, 4, 2], "resolutions": [1, 4, 8], "hidden": 8}, data)
    assert model.group_dims == [8, 4 * 16, 2 * 64]
    x = model.draw(3, torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="resolutions"):
        build_model({"kind": "hvae", "group_dims": [8, 4], "resolutions": [4, 3]}, data)


def test_training_report_has_a_kl_per_group_and_the_builder_checks_keys():
    data = load_dataset("digits", "train")
    model = build_model({"kind": "hvae", "group_dims": [4, 4, 4], "hidden": 32, "warmup_steps": 10,
                         "free_bits": 0.1}, data)
    loss, terms = model.loss(data.batch(torch.arange(16)), torch.Generator().manual_seed(0))
    assert {"kl_group0", "kl_group1", "kl_group2", "elbo_bpd", "kl_nats"} <= set(terms)
    total = sum(terms[f"kl_group{g}"] for g in range(3))
    assert total.item() == pytest.approx(terms["kl_nats"].item(), rel=1e-5)
    assert math.isfinite(loss.item()) and model.objective.free_bits_mode == "group"
    with pytest.raises(ValueError, match="unknown key"):
        build_model({"kind": "hvae", "groups": 3}, data)
    with pytest.raises(ValueError, match="unknown HVAE encoder"):
        build_model({"kind": "hvae", "encoder": "transformer"}, data)


def test_mutual_information_of_a_hierarchy_matches_a_direct_loop(hvae, batch):
    """The batched L[i, m] = log q(z_i | x_m) of `model_mutual_information` against one pass per pair."""
    from deepgm.data import Dataset
    from deepgm.vae.diagnostics import model_mutual_information, mutual_information

    data = Dataset(name="d", x=batch["x"], levels=17)
    mi = model_mutual_information(hvae, data, n=6, seed=3)
    g = torch.Generator().manual_seed(3)
    x = hvae.head.observe(batch["x"], g)
    feats = hvae.bottom_up(x)
    zs = hvae.top_down(feats, 6, g)["z"]
    L = torch.tensor([[hvae.posterior_log_prob([z[i:i + 1] for z in zs], [f[m:m + 1] for f in feats]).item()
                       for m in range(6)] for i in range(6)], dtype=torch.float64)
    assert mi == pytest.approx(mutual_information(L), rel=1e-9)
    assert mi <= math.log(6) + 1e-9  # capped at log N (it can dip below 0 on a few examples)
