"""DDIM jumps, the guided teacher solver step, phased consistency prediction/target, LCM scalings, re-noising.

All abar_* arguments are already gathered at their timesteps and broadcast against x: shape (B, 1, ..., 1).
"""

import torch

from pcm.math.schedule import append_dims, x0_from_eps


def ddim_jump(x_t: torch.Tensor, eps_hat: torch.Tensor, abar_t: torch.Tensor, abar_s: torch.Tensor) -> torch.Tensor:
    """x_s = alpha_s x0_hat + sigma_s eps_hat, with x0_hat = (x_t - sigma_t eps_hat) / alpha_t; (B, ...) -> (B, ...)."""
    x0_hat = x0_from_eps(x_t, eps_hat, abar_t)
    return abar_s.sqrt() * x0_hat + (1 - abar_s).sqrt() * eps_hat


def guided_eps(eps_c: torch.Tensor, eps_u: torch.Tensor | None, w: torch.Tensor | float) -> torch.Tensor:
    """eps_tilde = eps_c + w (eps_c - eps_u) (LCM convention: CFG scale 1 + w); eps_u None means no guidance."""
    if eps_u is None:
        return eps_c
    return eps_c + w * (eps_c - eps_u)


def teacher_solver_step(
    x_t: torch.Tensor,
    eps_c: torch.Tensor,
    eps_u: torch.Tensor | None,
    w: torch.Tensor | float,
    abar_t: torch.Tensor,
    abar_prev: torch.Tensor,
) -> torch.Tensor:
    """x_{t'} = alpha_{t'} x0_tilde + sigma_{t'} eps_tilde: one guided DDIM step of the teacher's PF-ODE.

    Guidance on eps and on x0 coincide because x0_hat is affine in eps_hat.
    """
    return ddim_jump(x_t, guided_eps(eps_c, eps_u, w), abar_t, abar_prev)


def phased_target(
    x_prev: torch.Tensor,
    eps_prev: torch.Tensor,
    abar_prev: torch.Tensor,
    abar_s: torch.Tensor,
    at_edge: torch.Tensor,
) -> torch.Tensor:
    """y = x_{t'} where t' is the phase edge s, else jump(x_{t'} -> s) with the target net's eps; (B, ...)."""
    jumped = ddim_jump(x_prev, eps_prev, abar_prev, abar_s)
    return torch.where(append_dims(at_edge, x_prev.ndim), x_prev, jumped)


def lcm_boundary_scalings(
    t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip = sd^2 / ((k t)^2 + sd^2), c_out = k t / sqrt((k t)^2 + sd^2); t (B,) -> two (B,).

    So that f(x, 0) = x exactly (the consistency boundary condition), as diffusers' LCMScheduler.
    """
    scaled = t * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def lcm_prediction(
    x_t: torch.Tensor, eps_hat: torch.Tensor, abar_t: torch.Tensor, c_skip: torch.Tensor, c_out: torch.Tensor
) -> torch.Tensor:
    """f = c_skip(t) x_t + c_out(t) x0_hat: LCM's boundary-parameterized consistency function; c_* broadcast."""
    return c_skip * x_t + c_out * x0_from_eps(x_t, eps_hat, abar_t)


def renoise(x_s: torch.Tensor, z: torch.Tensor, abar_s: torch.Tensor, abar_r: torch.Tensor) -> torch.Tensor:
    """x_r = sqrt(abar_r / abar_s) x_s + sqrt(1 - abar_r / abar_s) z: forward process from s to r >= s."""
    ratio = abar_r / abar_s
    return ratio.sqrt() * x_s + (1 - ratio).sqrt() * z
