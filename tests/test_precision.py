"""Precision and speed switches: bf16 autocast, channels-last memory format and torch.compile each train; the
U-Net computes the same function in either memory format and its attention is plain softmax attention."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepgm.conditioning import ClassLabel, Conditioning
from deepgm.data.base import Dataset
from deepgm.diffusion.model import DiffusionModel
from deepgm.diffusion.schedule_registry import make_schedule
from deepgm.nets.unet import AttentionBlock, GroupNorm, UNet
from deepgm.train import TrainConfig, Trainer, load_weights
from deepgm.train.trainer import resolve_amp
from tiny_models import NoisyMLP

CL = torch.channels_last


def unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(in_channels=3, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
               image_size=8, conditioning=Conditioning([ClassLabel(3)]))
    for p in net.parameters():  # no zero-initialised branches: every layer shows in the output
        nn.init.normal_(p, std=0.1)
    return net


def images(n: int = 32) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    return Dataset("images", x, torch.randint(0, 3, (n,), generator=g), levels=256, num_classes=3)


def ddpm(seed: int = 0) -> DiffusionModel:
    return DiffusionModel(unet(seed), make_schedule("cosine", T=100), "eps", "simple", levels=256, cond_dropout=0.1,
                          data_shape=(3, 8, 8))


def config(**overrides) -> TrainConfig:
    options = dict(steps=4, batch_size=8, lr=1e-3, warmup_steps=1, log_every=2, checkpoint_every=0, device="cpu")
    return TrainConfig(**{**options, **overrides})


def test_unet_is_the_same_function_in_channels_last():
    net, x = unet(), torch.randn(4, 3, 8, 8)
    t, y = torch.rand(4), torch.tensor([0, 1, 2, 3])
    ref = net(x, t, y=y)
    ref.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    net_cl = net.to(memory_format=CL)
    out = net_cl(x.contiguous(memory_format=CL), t, y=y)
    assert torch.allclose(out, ref, atol=1e-5)
    out.square().sum().backward()
    for name, p in net_cl.named_parameters():
        assert torch.allclose(p.grad, grads[name], atol=1e-4, rtol=1e-4), name


def test_groupnorm_keeps_channels_last_and_matches():
    norm = GroupNorm(4, 16)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 16, 5, 5)
    out = norm(x.contiguous(memory_format=CL))
    assert out.is_contiguous(memory_format=CL) and not out.is_contiguous()
    assert torch.allclose(out, F.group_norm(x, 4, norm.weight, norm.bias), atol=1e-6)


def test_attention_block_is_multi_head_softmax_attention():
    block = AttentionBlock(8, num_heads=2)
    nn.init.normal_(block.proj.weight)
    x = torch.randn(3, 8, 4, 4)
    qkv = block.qkv(block.norm(x)).reshape(3, 3, 2, 4, 16)  # (B, q/k/v, heads, C/heads, H*W)
    q, k, v = qkv.unbind(1)
    weights = torch.softmax(q.transpose(-1, -2) @ k / math.sqrt(4), dim=-1)  # (B, heads, H*W, H*W)
    out = (v @ weights.transpose(-1, -2)).reshape(3, 8, 4, 4)  # (B, C, H, W)
    assert torch.allclose(block(x), x + block.proj(out), atol=1e-5)


@pytest.mark.parametrize("amp,channels_last", [("none", True), ("bf16", False), ("bf16", True)])
def test_unet_ddpm_trains_with_precision_switches(tmp_path, amp, channels_last):
    trainer = Trainer(ddpm(), images(), config(amp=amp, channels_last=channels_last), tmp_path, progress=False)
    metrics = trainer.fit()
    assert math.isfinite(metrics["loss"]) and trainer.skipped_steps == 0 and metrics["step"] == 4
    conv = trainer.model.denoiser.net.inp.weight
    assert conv.is_contiguous(memory_format=CL) == channels_last and conv.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in trainer.ema_model.parameters())
    # the checkpoint is layout-free: it loads into a plain model that then computes the same
    fresh = ddpm(seed=1)
    fresh.load_state_dict(load_weights(tmp_path, "raw"))
    x, t = images().x[:4], torch.full((4,), 0.3)
    with torch.no_grad():
        ours = trainer.model.denoiser.net(x.contiguous(memory_format=CL) if channels_last else x, t)
        assert torch.allclose(fresh.denoiser.net(x, t), ours, atol=1e-5)


def test_compile_trains_and_matches_eager(tmp_path):
    data = Dataset("vectors", torch.randn(64, 4, generator=torch.Generator().manual_seed(0)))
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        trainer = Trainer(NoisyMLP(), data, config(compile=compiled), tmp_path / str(compiled), progress=False)
        runs.append((trainer, trainer.fit()))
    (eager, m_eager), (comp, m_comp) = runs
    assert m_comp["loss"] == pytest.approx(m_eager["loss"], rel=1e-4)
    for a, b in zip(eager.model.parameters(), comp.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert set(load_weights(tmp_path / "True", "raw")) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}


def test_amp_auto_runs_the_mode_it_resolves_to(tmp_path):
    """'auto' resolves to none or bf16 on a CPU, and the trainer's autocast really computes in that dtype."""
    data = Dataset("vectors", torch.randn(64, 4, generator=torch.Generator().manual_seed(0)))
    trainer = Trainer(NoisyMLP(), data, config(amp="auto"), tmp_path, progress=False)
    assert trainer.amp in ("none", "bf16")
    with trainer._autocast():
        out = nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == (torch.bfloat16 if trainer.amp == "bf16" else torch.float32)
    assert math.isfinite(trainer.fit()["loss"])
    cpu = torch.device("cpu")
    assert [resolve_amp(a, cpu) for a in ("none", "bf16", "fp16")] == ["none", "bf16", "fp16"]


def test_switches_are_checked():
    for bad in ({"channels_last": "yes"}, {"compile": 1}, {"amp": "fp8"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig.from_dict(bad)
    assert TrainConfig.from_dict({"channels_last": True, "compile": False}).channels_last


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_unet_trains_with_every_switch(tmp_path, amp):
    trainer = Trainer(ddpm(), images(), config(device="cuda", amp=amp, channels_last=True, compile=True), tmp_path,
                      progress=False)
    metrics = trainer.fit()
    assert math.isfinite(metrics["loss"]) and trainer.skipped_steps == 0
