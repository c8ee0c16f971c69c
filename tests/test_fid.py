"""Fréchet distance against closed forms and other implementations; streamed statistics; the FID Inception."""

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from pcm.eval.fid import FeatureStats, fid, frechet_distance, load_stats, trace_sqrt_product
from pcm.eval.inception import FIDInception, convert_weights, load_inception, preprocess


def _random_cov(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d)


@given(st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_diagonal_gaussians_match_the_closed_form(d, seed):
    """Commuting covariances: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.01, 3, size=d), rng.uniform(0.01, 3, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9, abs=1e-10)


@given(st.integers(2, 10), st.integers(0, 2**31 - 1))
def test_general_covariances_match_scipy_sqrtm(d, seed):
    """Non-commuting covariances, against the textbook formula with scipy.linalg.sqrtm of the product."""
    rng = np.random.default_rng(seed)
    s1, s2 = _random_cov(rng, d) + 0.1 * np.eye(d), _random_cov(rng, d) + 0.1 * np.eye(d)
    expected = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-7)


def test_one_dimensional_gaussians_equal_the_wasserstein_formula():
    # N(1, 4) vs N(-2, 1): (1 + 2)^2 + (2 - 1)^2 = 10
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[1.0]])) == \
        pytest.approx(10.0, abs=1e-12)


def test_singular_covariances_are_fine():
    """Fewer samples than dimensions (rank-deficient covariances): finite, and 0 against itself."""
    rng = np.random.default_rng(0)
    s = _random_cov(rng, 64, rank=5)
    mu = rng.normal(size=64)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-8)
    assert np.isfinite(frechet_distance(mu, s, mu + 1, _random_cov(rng, 64, rank=3)))


def test_streamed_statistics_equal_numpy_and_fid_of_a_set_with_itself_is_zero(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    stats = FeatureStats()
    for part in np.array_split(x, 7):
        stats.update(torch.from_numpy(part).float() if len(part) % 2 else part)
    mu, cov = stats.mean_cov()
    np.testing.assert_allclose(mu, x.mean(0), atol=1e-5)  # some parts went through float32
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-5, atol=1e-5)
    assert fid(stats, stats) == pytest.approx(0.0, abs=1e-6)
    stats.save(tmp_path / "s.safetensors")
    mu2, cov2, count = load_stats(tmp_path / "s.safetensors")
    assert count == 300 and np.array_equal(mu, mu2) and np.array_equal(cov, cov2)


def test_fid_grows_with_added_noise():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2000, 8))
    base = FeatureStats()
    base.update(x)
    values = []
    for scale in (0.0, 0.25, 0.5, 1.0, 2.0):
        noisy = FeatureStats()
        noisy.update(x + scale * rng.normal(size=x.shape))
        values.append(fid(base, noisy))
    assert values[0] == pytest.approx(0.0, abs=1e-9)
    assert all(a < b for a, b in zip(values, values[1:], strict=False)), values


class TinyFeatures(torch.nn.Module):
    """A random feature net for images (B, 3, H, W): average-pooled random convolution features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 5, stride=4)

    def forward(self, x):
        return torch.tanh(self.conv(x.float() / 255)).mean(dim=(2, 3)).double()


def test_matches_torchmetrics_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = TinyFeatures().eval()
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    fake = (real.float() * 0.7 + 40 * torch.rand(real.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    metric = FrechetInceptionDistance(feature=net, input_img_size=(3, 32, 32))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    a, b = FeatureStats(), FeatureStats()
    with torch.no_grad():
        a.update(net(real))
        b.update(net(fake))
    assert fid(a, b) == pytest.approx(float(metric.compute()), rel=1e-4)


def test_fid_inception_layout_features_and_safetensors_only(tmp_path):
    net = FIDInception()
    assert sum(p.numel() for p in net.parameters()) == 23_850_960  # torchvision's Inception-v3, 1008 classes, no aux
    torch.manual_seed(0)
    for m in net.modules():  # random but non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "pt_inception.pth")
    target = convert_weights(tmp_path / "pt_inception.pth", tmp_path / "inception.safetensors")
    loaded = load_inception(target)
    x = preprocess(np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8))
    assert x.shape == (2, 3, 299, 299) and x.min() >= -1 and x.max() <= 1
    with torch.no_grad():
        features = loaded(x)
        expected = net.eval()(x)
    assert features.shape == (2, 2048)
    torch.testing.assert_close(features, expected)
    with pytest.raises(ValueError, match="safetensors only.*pcm convert-inception"):
        load_inception(tmp_path / "pt_inception.pth")
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        load_inception(tmp_path / "missing.safetensors")
    save_file({"fc.weight": torch.zeros(1008, 2048)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not pytorch-fid's FID Inception"):
        load_inception(tmp_path / "other.safetensors")


def test_preprocess_is_a_float_bicubic_resize_per_channel():
    """A constant image stays constant (bicubic weights sum to 1); values map 0 -> -1 and 255 -> 1."""
    flat = np.full((1, 20, 30, 3), 255, dtype=np.uint8)
    flat[..., 1] = 0
    x = preprocess(flat)
    torch.testing.assert_close(x[0, 0], torch.ones(299, 299))
    torch.testing.assert_close(x[0, 1], -torch.ones(299, 299))
