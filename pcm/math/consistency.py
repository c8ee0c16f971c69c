"""DDIM jumps, the guided teacher solver step, phased consistency prediction/target, LCM scalings, re-noising.

Written once over (alpha, sigma): `jump_from` and `renoise_between` are the two formulas. The functions taking a
NoiseSchedule (`add_noise`, `jump`, `solver_step`, `consistency_target`, `renoise_to`, `lcm_origin`) apply them at
integer timesteps to a denoiser's raw output, whatever its parametrization. For rectified flow (alpha = 1 - sigma)
the DDIM jump is the flow's Euler step: x_s = x_t + (sigma_s - sigma_t) u. The abar functions (`ddim_jump`,
`renoise`, ...) are the variance-preserving forms for eps-predictions, arguments already gathered at their timesteps
and broadcast against x: shape (B, 1, ..., 1).
"""

import torch

from pcm.math.schedule import NoiseSchedule, append_dims, x0_eps, x0_from_eps


def jump_from(x0_hat: torch.Tensor, eps_hat: torch.Tensor, alpha_s: torch.Tensor,
              sigma_s: torch.Tensor) -> torch.Tensor:
    """x_s = alpha_s x0_hat + sigma_s eps_hat: the DDIM jump (and, with the true pair, the forward process)."""
    return alpha_s * x0_hat + sigma_s * eps_hat


def renoise_between(x_s: torch.Tensor, z: torch.Tensor, alpha_s: torch.Tensor, sigma_s: torch.Tensor,
                    alpha_r: torch.Tensor, sigma_r: torch.Tensor) -> torch.Tensor:
    """x_r = (alpha_r / alpha_s) x_s + sqrt(sigma_r^2 - (alpha_r / alpha_s)^2 sigma_s^2) z: forward from s to r >= s.

    VP: the ratio is sqrt(abar_r / abar_s) and the variance 1 - abar_r / abar_s. Clamped at 0 against rounding at r = s.
    """
    ratio = alpha_r / alpha_s
    return ratio * x_s + (sigma_r**2 - (ratio * sigma_s) ** 2).clamp(min=0).sqrt() * z


def guided_eps(eps_c: torch.Tensor, eps_u: torch.Tensor | None, w: torch.Tensor | float) -> torch.Tensor:
    """eps_tilde = eps_c + w (eps_c - eps_u) (LCM convention: CFG scale 1 + w); eps_u None means no guidance.

    Any parametrization affine in x_0 and eps at fixed x_t (eps, v, flow velocity, x_0) is guided by the same rule.
    """
    if eps_u is None:
        return eps_c
    return eps_c + w * (eps_c - eps_u)


# ---- on a NoiseSchedule at integer timesteps (B,) or one int, from a denoiser's raw output `out` -------------------

def add_noise(x_0: torch.Tensor, eps: torch.Tensor, schedule: NoiseSchedule, t: torch.Tensor | int) -> torch.Tensor:
    """x_t = alpha_t x_0 + sigma_t eps."""
    return jump_from(x_0, eps, *schedule.alpha_sigma(t, x_0))


def jump(x_t: torch.Tensor, out: torch.Tensor, schedule: NoiseSchedule, t: torch.Tensor | int,
         s: torch.Tensor | int) -> torch.Tensor:
    """x_s = alpha_s x0_hat + sigma_s eps_hat, (x0_hat, eps_hat) from the output `out` at t; (B, ...) -> (B, ...)."""
    x0_hat, eps_hat = x0_eps(x_t, out, *schedule.alpha_sigma(t, x_t), schedule.prediction)
    return jump_from(x0_hat, eps_hat, *schedule.alpha_sigma(s, x_t))


def solver_step(x_t: torch.Tensor, out_c: torch.Tensor, out_u: torch.Tensor | None, w: torch.Tensor | float,
                schedule: NoiseSchedule, t: torch.Tensor, t_prev: torch.Tensor) -> torch.Tensor:
    """x_{t'} = jump(x_t -> t') with the guided output out_c + w (out_c - out_u): the teacher's solver step."""
    return jump(x_t, guided_eps(out_c, out_u, w), schedule, t, t_prev)


def consistency_target(x_prev: torch.Tensor, out_prev: torch.Tensor, schedule: NoiseSchedule, t_prev: torch.Tensor,
                       s: torch.Tensor, at_edge: torch.Tensor) -> torch.Tensor:
    """y = x_{t'} where t' is the phase edge s, else jump(x_{t'} -> s) with the target net's output; (B, ...)."""
    jumped = jump(x_prev, out_prev, schedule, t_prev, s)
    return torch.where(append_dims(at_edge, x_prev.ndim), x_prev, jumped)


def renoise_to(x_s: torch.Tensor, z: torch.Tensor, schedule: NoiseSchedule, s: torch.Tensor | int,
               r: torch.Tensor | int) -> torch.Tensor:
    """x_r from x_s with fresh noise z: the forward process restricted to [s, r], r >= s."""
    return renoise_between(x_s, z, *schedule.alpha_sigma(s, x_s), *schedule.alpha_sigma(r, x_s))


def lcm_origin(x_t: torch.Tensor, out: torch.Tensor, schedule: NoiseSchedule, t: torch.Tensor | int,
               c_skip: torch.Tensor, c_out: torch.Tensor) -> torch.Tensor:
    """f = c_skip(t) x_t + c_out(t) x0_hat: LCM's boundary-parameterized consistency function; c_* broadcast."""
    x0_hat, _ = x0_eps(x_t, out, *schedule.alpha_sigma(t, x_t), schedule.prediction)
    return c_skip * x_t + c_out * x0_hat


# ---- variance preserving, eps-prediction, abar already gathered --------------------------------------------------

def ddim_jump(x_t: torch.Tensor, eps_hat: torch.Tensor, abar_t: torch.Tensor, abar_s: torch.Tensor) -> torch.Tensor:
    """x_s = alpha_s x0_hat + sigma_s eps_hat, with x0_hat = (x_t - sigma_t eps_hat) / alpha_t; (B, ...) -> (B, ...)."""
    return jump_from(x0_from_eps(x_t, eps_hat, abar_t), eps_hat, abar_s.sqrt(), (1 - abar_s).sqrt())


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
    return renoise_between(x_s, z, abar_s.sqrt(), (1 - abar_s).sqrt(), abar_r.sqrt(), (1 - abar_r).sqrt())
