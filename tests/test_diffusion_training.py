"""A DDPM learns: the loss falls on toy data, and the learned denoiser approaches the exact one."""

import torch

from deepgm.data import load_dataset, make_mixture
from deepgm.diffusion import DiffusionModel, DiscreteVP
from deepgm.nets.mlp import MLP
from deepgm.train import TrainConfig, Trainer


def test_training_loss_falls_and_denoiser_approaches_the_exact_one(tmp_path):
    torch.manual_seed(0)
    data = load_dataset("toy", "train", mixture="ring", n=4000)
    schedule = DiscreteVP.cosine(T=200)
    model = DiffusionModel(MLP(dim=2, width=64, depth=2), schedule)
    config = TrainConfig(steps=400, batch_size=256, lr=2e-3, warmup_steps=20, log_every=20, ema_decay=0.0,
                         checkpoint_every=400)
    trainer = Trainer(model, data, config, tmp_path, progress=False)
    trainer.fit()
    import json

    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:2]) / 2

    # at moderate noise the learned x0 is close to the exact posterior mean, much closer than x_t is
    gmm = make_mixture("ring")
    t = torch.full((2000,), 0.3, dtype=torch.float64)
    alpha, sigma = (float(v[0]) for v in schedule.alpha_sigma(t))
    x0 = gmm.sample(2000, generator=torch.Generator().manual_seed(5))
    x_t = alpha * x0 + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    exact = gmm.posterior_mean(x_t, alpha, sigma).float()
    with torch.no_grad():
        learned = model.denoiser(x_t, t).x0
    assert (learned - exact).pow(2).sum(1).mean() < 0.25 * (x_t / alpha - exact).pow(2).sum(1).mean()
