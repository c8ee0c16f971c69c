"""The analytic teacher against autograd and its own ODE solution."""

import torch

from pcm.math import alphas_cumprod
from pcm.models.gmm import UNCOND, AnalyticTeacher, exact_ode_endpoint, toy_mixture
from pcm.sampling import ddim_timesteps, sample_pcm


def _log_density(mixture, x, alpha, sigma, label):
    """log p_t(x) of the noised mixture, written independently of GaussianMixture.eps."""
    total = torch.zeros(len(x), dtype=torch.float64)
    terms = []
    for k in range(len(mixture.weights)):
        var = alpha**2 * mixture.stds[k].double() ** 2 + sigma**2
        d = x - alpha * mixture.means[k].double()
        member = (label == UNCOND) | (label == mixture.classes[k])
        logw = torch.where(member, mixture.weights[k].double().log(), torch.tensor(-torch.inf, dtype=torch.float64))
        terms.append(logw - d.pow(2).sum(1) / (2 * var) - x.shape[1] / 2 * torch.log(2 * torch.pi * var))
    total = torch.logsumexp(torch.stack(terms), dim=0)
    return total


def test_closed_form_eps_is_minus_sigma_times_the_score():
    mixture = toy_mixture()
    gen = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(64, 2, generator=gen, dtype=torch.float64)).requires_grad_()
    label = torch.randint(-1, 3, (64,), generator=gen)
    for abar in [0.999, 0.7, 0.2, 0.005]:
        alpha, sigma = abar**0.5, (1 - abar) ** 0.5
        (score,) = torch.autograd.grad(_log_density(mixture, x, alpha, sigma, label).sum(), x)
        ones = torch.ones(64, 1, dtype=torch.float64)
        eps = mixture.eps(x.detach(), alpha * ones, sigma * ones, label)
        torch.testing.assert_close(eps, -sigma * score, rtol=1e-9, atol=1e-10)


def test_exact_endpoint_is_converged_and_many_step_ddim_approaches_it():
    mixture = toy_mixture()
    abar = alphas_cumprod("scaled_linear", 0.00085, 0.012, 1000)
    gen = torch.Generator().manual_seed(1)
    x_T, label = torch.randn(128, 2, generator=gen), torch.randint(0, 3, (128,), generator=gen)
    lo, hi = float(abar[-1]), float(abar[0])
    exact = exact_ode_endpoint(mixture, x_T, label, 1.0, lo, hi, num_steps=400)
    finer = exact_ode_endpoint(mixture, x_T, label, 1.0, lo, hi, num_steps=800)
    assert float((exact - finer).abs().max()) < 1e-7
    teacher = AnalyticTeacher(mixture, abar.double())
    uncond = torch.full_like(label, UNCOND)
    errors = [float((sample_pcm(teacher, x_T.double(), label, abar.double(), ddim_timesteps(1000, K),
                                guidance_scale=2.0, neg_cond=uncond) - exact).norm(dim=1).mean())
              for K in (10, 100, 1000)]
    # DDIM is first order: the error shrinks about tenfold per tenfold steps
    assert errors[0] > errors[1] > errors[2] and errors[2] < 2e-3 and errors[1] / errors[2] > 5


def test_samples_follow_the_label():
    mixture = toy_mixture()
    label = torch.full((4000,), 1)
    x = mixture.sample(label, torch.Generator().manual_seed(0))
    # class 1 = components 2 and 3 with weights 0.2 and 0.15: the sample mean is their weighted mean
    expected = (0.2 * mixture.means[2] + 0.15 * mixture.means[3]).double() / 0.35
    torch.testing.assert_close(x.mean(0), expected, rtol=0, atol=0.05)
