"""FID, precision/recall and sliced Wasserstein against closed forms; the digit feature network and its cache."""

import math

import numpy as np
import pytest
import torch

from deepgm.data import load_dataset
from deepgm.eval import (
    AttributeClassifier,
    DigitClassifier,
    evaluate_samples,
    fid,
    fid_of_samples,
    frechet_distance,
    get_feature_net,
    precision_recall,
    sliced_wasserstein,
)


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_commuting_full_covariances():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # shared eigenvectors: the covariances commute
    e1, e2 = rng.uniform(0.2, 2, size=6), rng.uniform(0.2, 2, size=6)
    cov1, cov2 = q @ np.diag(e1) @ q.T, q @ np.diag(e2) @ q.T
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(e1 + e2 - 2 * np.sqrt(e1 * e2))
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, cov1, mu1, cov1) == pytest.approx(0, abs=1e-9)


def test_fid_of_samples_equals_fid_in_low_and_high_dimension():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(12, 12, generator=g, dtype=torch.float64)
    a = torch.randn(300, 12, generator=g, dtype=torch.float64) @ mix
    b = 0.5 * torch.randn(300, 12, generator=g, dtype=torch.float64) + 0.3
    assert fid_of_samples(a, b) == pytest.approx(fid(a, b), rel=1e-9)
    wide_a, wide_b = torch.randn(40, 60, generator=g), torch.randn(40, 60, generator=g) * 2  # D > N: singular C
    assert fid_of_samples(wide_a, wide_b) == pytest.approx(fid(wide_a, wide_b), rel=1e-4)
    assert fid_of_samples(a, a) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="one shape"):
        fid_of_samples(a, b[:10])


def test_fid_of_gaussian_samples_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    n, d = 40_000, 4
    mu2, s2 = torch.tensor([1.0, -0.5, 0.0, 2.0]), torch.tensor([0.5, 1.0, 2.0, 1.5])
    a = torch.randn(n, d, generator=g)
    b = mu2 + s2.sqrt() * torch.randn(n, d, generator=g)
    expected = float((mu2**2).sum() + (1 + s2 - 2 * s2.sqrt()).sum())
    assert fid(a, b) == pytest.approx(expected, rel=0.03, abs=0.01)
    assert fid(a, a) == pytest.approx(0, abs=1e-8)


def test_fid_of_degenerate_features_is_finite():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    x[:, :4] = 0  # dead features make the covariances singular
    assert fid(x, x) == pytest.approx(0, abs=1e-6)
    assert math.isfinite(fid(x, torch.randn(300, 16)))


def _modes(n_per_mode: int, centres: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.cat([c + 0.1 * torch.randn(n_per_mode, centres.shape[1], generator=g) for c in centres])


def test_precision_recall_identical_far_and_half_modes():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    real = _modes(500, centres, g)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    far = real + 1000.0
    assert precision_recall(real, far) == (0.0, 0.0)
    half = _modes(1000, centres[:2], g)  # covers two of the four modes
    precision, recall = precision_recall(real, half, k=3)
    assert precision > 0.97
    assert recall == pytest.approx(0.5, abs=0.03)


def test_precision_recall_rejects_too_large_k():
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(torch.randn(3, 2), torch.randn(10, 2), k=3)


def test_sliced_wasserstein_of_shifted_gaussians():
    g = torch.Generator().manual_seed(0)
    d, n = 4, 5000
    m = torch.tensor([2.0, -2.0, 2.0, 2.0])
    a = torch.randn(n, d, generator=g)
    b = m + torch.randn(n + 1000, d, generator=g)  # unequal sizes: the larger is subsampled
    expected = float(m.norm()) / math.sqrt(d)  # sqrt(E_theta (theta . m)^2) for theta uniform on the sphere
    value = sliced_wasserstein(a, b, n_projections=1024, generator=g)
    assert value == pytest.approx(expected, rel=0.05)
    assert sliced_wasserstein(a, a, generator=g) == pytest.approx(0, abs=1e-12)


def test_digit_classifier_shapes_any_size():
    net = DigitClassifier()
    for size in (8, 16, 32):
        x = torch.rand(3, 1, size, size) * 2 - 1
        assert net(x).shape == (3, 10)
        assert net.features(x).shape[0] == 3 and 64 <= net.features(x).shape[1] <= 128


@pytest.fixture(scope="module")
def digits_net(tmp_path_factory):
    cache = tmp_path_factory.mktemp("featnet-cache")
    threads = torch.get_num_threads()
    net = get_feature_net("digits", {"size": 8}, cache_dir=cache)
    assert torch.get_num_threads() == threads  # thread count restored
    return net, cache


def test_feature_net_accuracy_and_cache(digits_net):
    net, cache = digits_net
    assert not net.from_cache
    assert net.test_accuracy > 0.95
    assert net.path is not None and net.path.parent == cache and net.path.is_file()
    assert net.path.with_suffix(".json").is_file()
    assert not list(cache.glob("*.tmp"))  # atomic writes leave no temp files
    again = get_feature_net("digits", {"size": 8}, cache_dir=cache)
    assert again.from_cache and again.test_accuracy == net.test_accuracy
    x = load_dataset("digits", "test").x[:50]
    assert torch.equal(again.features(x), net.features(x))


def test_a_loaded_feature_net_is_shared_and_remembers_real_images(digits_net):
    """Evaluations read the same real images again: the net is loaded once per process, and its outputs for an
    input it has seen come back without running the classifier, equal to computing them afresh."""
    _, cache = digits_net
    net = get_feature_net("digits", {"size": 8}, cache_dir=cache)
    assert get_feature_net("digits", {"size": 8}, cache_dir=cache) is net
    x = load_dataset("digits", "test").x[:40]
    calls = []
    hook = net.classifier.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        first = net.predict(x)
        assert calls and torch.equal(net.predict(x.clone()), first)  # same content, another tensor
        seen = len(calls)
        assert torch.equal(net.predict(x), first) and len(calls) == seen
        other = x.flip(-1)
        assert not torch.equal(net.predict(other), first) and len(calls) > seen  # new content runs the net
    finally:
        hook.remove()
    fresh = net.classifier.features(x)  # not through the memo
    assert torch.allclose(net.features(x), fresh) and torch.equal(net.features(x), net.features(x))


def test_feature_net_cache_dir_from_env(tmp_path, monkeypatch, digits_net):
    net, cache = digits_net
    monkeypatch.setenv("DEEPGM_CACHE", str(cache))
    assert get_feature_net("digits", {"size": 8}).from_cache


def test_the_attribute_net_comes_back_from_its_cache_as_the_same_network(tmp_path):
    """Captioned scenes get the attribute reader (batch norm, so running statistics must survive the cache), and a
    cached net must load as that class: a failed load would silently train again."""
    net = get_feature_net("shapes", {"size": 16, "n": 400}, cache_dir=tmp_path)
    assert isinstance(net.classifier, AttributeClassifier) and not net.from_cache
    assert net.attribute_accuracy["position0"] > 0.5  # 9 cells: chance is 0.11
    again = get_feature_net("shapes", {"size": 16, "n": 400}, cache_dir=tmp_path)
    assert again.from_cache and isinstance(again.classifier, AttributeClassifier)
    x = load_dataset("shapes", "test", size=16, n=64).x
    assert torch.equal(again.predict(x), net.predict(x)) and torch.equal(again.features(x), net.features(x))


def test_feature_net_needs_labels(tmp_path):
    with pytest.raises(ValueError, match="needs a labelled dataset"):
        get_feature_net("toy", cache_dir=tmp_path)


def test_evaluate_samples_on_real_images(digits_net):
    net, _ = digits_net
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    m = evaluate_samples(test.x, net, train.x, test.x, labels=test.y)
    assert m["fid"] == pytest.approx(0, abs=1e-6)
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["class_accuracy"] == pytest.approx(net.test_accuracy)
    assert m["feature_net_test_accuracy"] == net.test_accuracy
    held_out = evaluate_samples(train.x[: len(test)], net, train.x, test.x, labels=train.y[: len(test)])
    assert 0 < held_out["fid"] < 3 * m["fid_floor"]  # real images from another split sit near the data's floor
    noise = evaluate_samples(torch.rand_like(test.x) * 2 - 1, net, train.x, test.x)
    assert noise["fid"] > 10 * m["fid_floor"] and "class_accuracy" not in noise
