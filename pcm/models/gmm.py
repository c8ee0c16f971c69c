"""An analytic teacher: class-conditional Gaussian-mixture data with a closed-form eps at every t.

x_0 ~ sum_k pi_k N(mu_k, s_k^2 I), each component k belonging to a class ("prompt") c_k. Then
x_t = alpha x_0 + sigma eps ~ sum_k pi_k N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I) and

    eps(x_t) = -sigma grad log p(x_t) = sigma sum_k r_k(x_t) (x_t - alpha mu_k) / (alpha^2 s_k^2 + sigma^2)

with r_k the posterior responsibilities, and the posterior mean

    x0(x_t) = sum_k r_k(x_t) (mu_k + alpha s_k^2 (x_t - alpha mu_k) / (alpha^2 s_k^2 + sigma^2)),

defined at alpha = 0 too (a rectified flow's pure-noise end), so the flow velocity u = eps - x0 is exact everywhere.
Label -1 is the unconditional (empty) prompt: all components. The exact VP PF-ODE endpoint is integrated with RK4
in y = x / alpha over log rho, rho = sigma / alpha, where the ODE reads dy/drho = eps (DDIM is Euler in these
variables); the flow's in x over sigma, dx/dsigma = u (its Euler steps are the same DDIM jumps).
"""

from dataclasses import dataclass

import torch

from pcm.math import NoiseSchedule, as_schedule, guided_eps, prediction_of

UNCOND = -1  # the label of the empty prompt


@dataclass(frozen=True)
class GaussianMixture:
    means: torch.Tensor  # (K, D) component means mu_k
    stds: torch.Tensor  # (K,) isotropic standard deviations s_k
    weights: torch.Tensor  # (K,) mixture weights pi_k, summing to 1
    classes: torch.Tensor  # (K,) int64 class label c_k of each component

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_classes(self) -> int:
        return int(self.classes.max()) + 1

    def _posterior(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor):
        """Responsibilities r (B, K), x_t - alpha mu_k (B, K, D), variances (B, K) and stds (K,) of each component."""
        dtype = x.dtype
        means, stds, weights = (v.to(x.device, dtype) for v in (self.means, self.stds, self.weights))
        var = alpha**2 * stds**2 + sigma**2  # (B, K)
        diff = x[:, None, :] - alpha[:, :, None] * means  # (B, K, D)
        member = (label[:, None] == UNCOND) | (label[:, None] == self.classes.to(x.device))
        log_prior = torch.where(member, weights.log(), torch.full_like(var, -torch.inf))
        log_p = log_prior - 0.5 * self.dim * var.log() - 0.5 * diff.pow(2).sum(-1) / var
        return torch.softmax(log_p, dim=1), diff, var, stds

    def eps(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Exact eps(x_t) for x (B, D), alpha and sigma (B, 1), label (B,) (UNCOND = all components); (B, D)."""
        r, diff, var, _ = self._posterior(x, alpha, sigma, label)
        return sigma * (r[:, :, None] * diff / var[:, :, None]).sum(1)

    def denoise(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact (x0(x_t), eps(x_t)), the posterior means, shapes as eps; alpha = 0 or sigma = 0 allowed (not both)."""
        r, diff, var, stds = self._posterior(x, alpha, sigma, label)
        scaled = r[:, :, None] * diff / var[:, :, None]  # (B, K, D)
        means = self.means.to(x.device, x.dtype)
        x0 = (r[:, :, None] * means).sum(1) + alpha * (stds[:, None] ** 2 * scaled).sum(1)
        return x0, sigma * scaled.sum(1)

    def sample(self, label: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_0 samples for labels (B,) (UNCOND draws from the whole mixture); (B, D), float64."""
        member = (label[:, None] == UNCOND) | (label[:, None] == self.classes)
        probs = torch.where(member, self.weights, torch.zeros_like(self.weights)).double()
        k = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        noise = torch.randn(len(label), self.dim, generator=generator, dtype=torch.float64)
        return self.means.double()[k] + self.stds.double()[k, None] * noise


def toy_mixture() -> GaussianMixture:
    """The benchmark's mixture: 2-D, 6 components in 3 classes, unequal weights and widths."""
    return GaussianMixture(
        means=torch.tensor([[-1.5, 1.0], [-0.4, 1.8], [1.5, 1.0], [1.0, -0.3], [0.0, -1.5], [-1.3, -0.9]]),
        stds=torch.tensor([0.15, 0.25, 0.2, 0.1, 0.3, 0.15]),
        weights=torch.tensor([0.25, 0.1, 0.2, 0.15, 0.2, 0.1]),
        classes=torch.tensor([0, 0, 1, 1, 2, 2]),
    )


class AnalyticTeacher:
    """denoiser(x_t, t, label) of a GaussianMixture on a noise schedule, returning the schedule's parametrization:
    eps on a VP schedule (a bare abar tensor), the flow velocity u = eps - x0 on a rectified-flow one."""

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule | torch.Tensor):
        self.mixture = mixture
        self.schedule = as_schedule(schedule)
        self.abar = self.schedule.table if self.schedule.kind == "vp" else None  # VP callers read it

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.schedule.alpha_sigma(t, x_t)
        if self.schedule.prediction == "epsilon":
            return self.mixture.eps(x_t, alpha, sigma, label)
        x0, eps = self.mixture.denoise(x_t, alpha, sigma, label)
        return prediction_of(x0, eps, alpha, sigma, self.schedule.prediction)


def exact_ode_endpoint(
    mixture: GaussianMixture, x_T: torch.Tensor, label: torch.Tensor, w: float,
    abar_from: float, abar_to: float, num_steps: int = 400,
) -> torch.Tensor:
    """The guided PF-ODE (eps_tilde = eps_c + w (eps_c - eps_u)) solved from abar_from to abar_to; float64.

    RK4 in u = log rho on y = x / alpha; 400 steps agree with 800 to ~1e-9 on the toy mixture.
    """
    def rho_of(abar: float) -> float:
        return ((1 - abar) / abar) ** 0.5

    u0, u1 = torch.tensor(rho_of(abar_from)).log().double(), torch.tensor(rho_of(abar_to)).log().double()
    uncond = torch.full_like(label, UNCOND)

    def dy_du(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        rho = u.exp()
        alpha = (1 + rho**2).rsqrt()
        a, s = alpha.expand(len(y), 1), (rho * alpha).expand(len(y), 1)
        eps_c = mixture.eps(alpha * y, a, s, label)
        eps_u = mixture.eps(alpha * y, a, s, uncond) if w != 0 else None
        return rho * guided_eps(eps_c, eps_u, w)

    h = (u1 - u0) / num_steps
    y = x_T.double() * (1 + rho_of(abar_from) ** 2) ** 0.5
    for i in range(num_steps):
        u = u0 + i * h
        k1 = dy_du(y, u)
        k2 = dy_du(y + 0.5 * h * k1, u + 0.5 * h)
        k3 = dy_du(y + 0.5 * h * k2, u + 0.5 * h)
        k4 = dy_du(y + h * k3, u + h)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y / (1 + rho_of(abar_to) ** 2) ** 0.5


def exact_flow_endpoint(
    mixture: GaussianMixture, x_T: torch.Tensor, label: torch.Tensor, w: float,
    sigma_from: float = 1.0, sigma_to: float = 0.0, num_steps: int = 400,
) -> torch.Tensor:
    """The guided rectified-flow ODE dx/dsigma = u_c + w (u_c - u_u), u = eps - x0, solved from sigma_from to sigma_to;
    float64.

    RK4 in x over sigma (u is smooth on [0, 1], the pure-noise end included); 400 steps agree with 800 to ~1e-8.
    """
    uncond = torch.full_like(label, UNCOND)

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.expand(len(x), 1)
        x0_c, eps_c = mixture.denoise(x, 1 - s, s, label)
        if w == 0:
            return eps_c - x0_c
        x0_u, eps_u = mixture.denoise(x, 1 - s, s, uncond)
        return guided_eps(eps_c - x0_c, eps_u - x0_u, w)

    start, end = torch.tensor(sigma_from, dtype=torch.float64), torch.tensor(sigma_to, dtype=torch.float64)
    h = (end - start) / num_steps
    x = x_T.double()
    for i in range(num_steps):
        sigma = start + i * h
        k1 = velocity(x, sigma)
        k2 = velocity(x + 0.5 * h * k1, sigma + 0.5 * h)
        k3 = velocity(x + 0.5 * h * k2, sigma + 0.5 * h)
        k4 = velocity(x + h * k3, sigma + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x
