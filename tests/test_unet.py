"""Tests of the DDPM-style U-Net."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepgm.conditioning import ClassLabel, Conditioning, ImageCondition
from deepgm.nets.unet import UNet, attention


def _randomise(net: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Re-initialise every parameter with small normals so zero-initialised layers stop hiding the input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net


@pytest.mark.parametrize("size,mult,attn", [
    (8, (1, 2), ()),
    (8, (1, 2), (4,)),
    (16, (1, 2, 2), ()),
    (16, (1, 2, 2), (16, 4)),
])
def test_output_shape(size, mult, attn):
    torch.manual_seed(0)
    net = UNet(in_channels=3, channels=16, channel_mult=mult, num_res_blocks=1,
               attention_resolutions=attn, image_size=size)
    x = torch.randn(2, 3, size, size)
    assert net(x, torch.rand(2)).shape == x.shape
    assert net(x, torch.tensor(0.5)).shape == x.shape  # 0-dim t broadcasts


def test_out_channels():
    net = UNet(in_channels=1, out_channels=2, channels=16, num_res_blocks=1)
    assert net(torch.randn(3, 1, 8, 8), torch.rand(3)).shape == (3, 2, 8, 8)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="divisible"):
        UNet(channels=16, channel_mult=(1, 2, 2, 2), image_size=12)
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNet(channels=16, attention_resolutions=(2,), image_size=8)


def test_zero_init_output():
    net = UNet(channels=16, num_res_blocks=1)
    assert torch.all(net(torch.randn(2, 1, 8, 8), torch.rand(2)) == 0)


def test_depends_on_t_and_y():
    torch.manual_seed(0)
    classes = Conditioning([ClassLabel(3)])
    net = _randomise(UNet(channels=16, num_res_blocks=1, attention_resolutions=(4,), conditioning=classes)).eval()
    x = torch.randn(2, 1, 8, 8)
    t = torch.full((2,), 0.3)
    y = torch.tensor([0, 1])
    out = net(x, t, y=y)
    assert out.abs().max() > 0
    assert not torch.allclose(out, net(x, torch.full((2,), 0.7), y=y))
    assert not torch.allclose(out, net(x, t, y=torch.tensor([2, 2])))
    torch.testing.assert_close(net(x, t), net(x, t, y=torch.tensor([3, 3])))  # None == "no label" token
    with pytest.raises(ValueError, match="labels"):
        net(x, t, y=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="unconditional"):
        UNet(channels=16, num_res_blocks=1)(x, t, y=y)


def test_overfits_fixed_batch():
    torch.manual_seed(0)
    net = UNet(channels=16, num_res_blocks=1, attention_resolutions=(4,))
    x = torch.randn(4, 1, 8, 8)
    target = torch.randn(4, 1, 8, 8)
    t = torch.full((4,), 0.5)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        loss = torch.nn.functional.mse_loss(net(x, t), target)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10


def test_gradient_reaches_same_pixel():
    net = _randomise(UNet(channels=16, num_res_blocks=1, attention_resolutions=(4,)))
    x = torch.randn(1, 1, 8, 8, requires_grad=True)
    net(x, torch.tensor([0.5]))[0, 0, 3, 5].backward()
    assert x.grad[0, 0, 3, 5].abs() > 0


def test_channels_last_and_bf16_autocast():
    torch.manual_seed(0)
    net = _randomise(UNet(in_channels=3, channels=16, num_res_blocks=1, attention_resolutions=(4,))).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    ref = net(x, t)
    torch.testing.assert_close(net(x.to(memory_format=torch.channels_last), t), ref, atol=1e-5, rtol=1e-4)
    net_cl = net.to(memory_format=torch.channels_last)
    torch.testing.assert_close(net_cl(x.to(memory_format=torch.channels_last), t), ref, atol=1e-5, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_bf16_attention_under_autograd_runs_in_float32_on_cpu():
    """Under autograd a bf16 attention is float32's result rounded to bf16 (its bf16 kernel differs on about a
    third of the entries), gradients keep their dtype, and without autograd the bf16 kernel runs as it is."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    mask = torch.rand(2, 1, 1, 64, generator=g) > 0.3
    in_float32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).bfloat16()
    bf16_kernel = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (bf16_kernel != in_float32).float().mean() > 0.1  # so the next line can tell the two apart
    out = attention(q, k, v, mask)
    assert out.dtype == torch.bfloat16 and torch.equal(out, in_float32)
    out.float().square().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_cond_image():
    net = _randomise(UNet(in_channels=1, channels=16, num_res_blocks=1, conditioning=Conditioning([ImageCondition(2)])))
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    cond = torch.randn(2, 2, 8, 8)
    out = net(x, t, cond_image=cond)
    assert out.shape == x.shape
    assert not torch.allclose(out, net(x, t, cond_image=torch.zeros_like(cond)))
    with pytest.raises(ValueError, match="cond_image"):
        net(x, t)
    with pytest.raises(ValueError, match="cond_image"):
        net(x, t, cond_image=torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="unconditional"):
        UNet(channels=16, num_res_blocks=1)(x, t, cond_image=cond)
