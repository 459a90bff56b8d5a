"""The gated PixelCNN is causal in raster order, has no blind spot, and as a VAE decoder defines a normalised
distribution that its pixel-by-pixel sampler draws from."""

import itertools
import math

import pytest
import torch

from deepgm.nets.pixelcnn import CausalConv2d, PixelCNN
from deepgm.vae.heads import BernoulliHead
from deepgm.vae.vae import VAE, MLPEncoder, PixelCNNDecoder


def _dependency(net: PixelCNN, size: int, channels: int = 1, cond=None) -> torch.Tensor:
    """D[p, q] = True when some output channel at pixel p has a non-zero gradient w.r.t. input pixel q."""
    x = torch.randn(1, channels, size, size, dtype=torch.float64, requires_grad=True)
    out = net(x, cond)
    dep = torch.zeros(size * size, size * size, dtype=torch.bool)
    for p in range(size * size):
        i, j = divmod(p, size)
        (grad,) = torch.autograd.grad(out[0, :, i, j].sum(), x, retain_graph=True)
        dep[p] = grad[0].abs().sum(0).reshape(-1) > 0
    return dep


@pytest.mark.parametrize("stack,include,expected", [
    ("vertical", False, [[1, 1, 1], [0, 0, 0], [0, 0, 0]]), ("vertical", True, [[1, 1, 1], [1, 1, 1], [0, 0, 0]]),
    ("horizontal", False, [[0, 0, 0], [1, 0, 0], [0, 0, 0]]), ("horizontal", True, [[0, 0, 0], [1, 1, 0], [0, 0, 0]])])
def test_causal_convolution_sees_exactly_the_masked_window(stack, include, expected):
    """The output at the centre of a 3x3 window depends on exactly the taps of the paper's mask."""
    conv = CausalConv2d(1, 1, 3, stack, include).double()
    torch.nn.init.constant_(conv.weight, 1.0)
    x = torch.zeros(1, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(conv(x)[0, 0, 2, 2], x)
    assert grad[0, 0, 1:4, 1:4].tolist() == expected and grad.sum() == sum(map(sum, expected))


@pytest.mark.parametrize("layers,kernel,channels", [(1, 3, 1), (3, 3, 2), (5, 5, 1)])
def test_output_never_depends_on_its_own_or_later_pixels(layers, kernel, channels):
    torch.manual_seed(0)
    net = PixelCNN(channels, 3, channels=8, layers=layers, kernel=kernel).double()
    dep = _dependency(net, 6, channels)
    assert not dep.triu().any()  # D[p, q] for q >= p in raster order, the pixel itself included
    assert dep.tril(-1).any(1)[1:].all()  # and every pixel after the first sees some earlier pixel


def test_no_blind_spot_with_enough_layers():
    """With the vertical/horizontal stacks every earlier pixel reaches the output once the receptive field
    covers the image (a plain masked-conv stack would miss the pixels up and to the right)."""
    torch.manual_seed(0)
    net = PixelCNN(1, 1, channels=8, layers=4, kernel=3).double()
    dep = _dependency(net, 4)
    assert torch.equal(dep, torch.ones(16, 16, dtype=torch.bool).tril(-1))


def test_conditioning_vector_changes_every_pixel():
    torch.manual_seed(0)
    net = PixelCNN(1, 2, channels=8, layers=2, cond_dim=3)
    x = torch.randn(1, 1, 5, 5)
    a, b = net(x, torch.zeros(1, 3)), net(x, torch.ones(1, 3))
    assert ((a - b).abs().sum(1) > 0).all()


def _tiny_binary_vae(size: int = 3) -> VAE:
    torch.manual_seed(0)
    shape = (1, size, size)
    head = BernoulliHead()
    decoder = PixelCNNDecoder(shape, 2, head.params_per_dim, channels=8, layers=3)
    # larger output weights give a distribution far from uniform, so the checks below have teeth
    with torch.no_grad():
        for p in decoder.parameters():
            p.mul_(3)
    return VAE(MLPEncoder(shape, 2, hidden=8), decoder, head, 2, shape).double().eval()


def test_pixelcnn_decoder_is_normalised_over_all_binary_images():
    vae = _tiny_binary_vae(3)
    images = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=9)), dtype=torch.float64).reshape(512, 1, 3, 3)
    z = torch.randn(1, 2, dtype=torch.float64).expand(512, -1)
    log_p = vae.head.log_prob(images, vae.decode(z, None, images))
    assert torch.logsumexp(log_p, 0).item() == pytest.approx(0.0, abs=1e-9)
    assert log_p.max() - log_p.min() > 5  # far from uniform


def test_pixel_by_pixel_sampler_draws_from_the_teacher_forced_likelihood():
    vae = _tiny_binary_vae(2)
    images = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=4)), dtype=torch.float64).reshape(16, 1, 2, 2)
    z = torch.randn(1, 2, dtype=torch.float64)
    probs = torch.exp(vae.head.log_prob(images, vae.decode(z.expand(16, -1), None, images)))
    n = 8000
    draws = vae.draw(n, torch.Generator().manual_seed(0), z=z.expand(n, -1))
    codes = ((draws.reshape(n, 4) > 0).long() * torch.tensor([8, 4, 2, 1])).sum(1)
    freq = torch.bincount(codes, minlength=16).double() / n
    assert torch.allclose(freq, probs, atol=4 * math.sqrt(0.25 / n))
