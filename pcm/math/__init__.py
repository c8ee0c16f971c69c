"""Pure tensor math of Phased Consistency Models. Imports only torch.

Notation (docs/method.md §1); one spelling each, everywhere in the project:

    T            num_train_timesteps (1000 for SD); integer timesteps t in [0, T)
    alpha_t, sigma_t   a NoiseSchedule: x_t = alpha_t x_0 + sigma_t eps, for any Gaussian path
    abar[t]      VP: alphas_cumprod; alpha_t = sqrt(abar[t]), sigma_t = sqrt(1 - abar[t])
    sigma_t      rectified flow: alpha_t = 1 - sigma_t, sigma_t = shift((t + 1) / T), sigma_0 = 0 (the clean end)
    x_0, x_t     clean latents and x_t = alpha_t x_0 + sigma_t eps
    eps_hat      an eps-prediction;  x0_hat = (x_t - sigma_t eps_hat) / alpha_t
    u            the flow velocity eps - x_0;  x0_hat = x_t - sigma_t u, eps_hat = x_t + alpha_t u
    prediction   what a denoiser returns (epsilon, v_prediction, flow, sample); x0_eps turns it into (x0_hat, eps_hat)
    N, tau       solver grid: tau_n = (n + 1) T/N - 1, n = 0..N-1, tau_{-1} = 0
    n vs t       grid index vs timestep (t = tau_n, t' = tau_{n-1}); never both called "timesteps"
    M, e_m, s_m  num_phases, edge indices e_m = floor(m N / M), edge timesteps s_m = tau_{e_m - 1}
    m(n)         phase of grid index n: max{m : e_m <= n}
    jump         DDIM jump x_t -> x_s = alpha_s x0_hat + sigma_s eps_hat (for a flow: its Euler step)
    w            solver guidance (LCM convention): eps_tilde = eps_c + w (eps_c - eps_u)
    guidance_scale  inference CFG: eps = eps_u + guidance_scale (eps_c - eps_u)  (= solver w + 1)
    f, y         student prediction jump(x_t -> s) and target (x_{t'} at an edge, else jump(x_{t'} -> s))
    r            re-noising timestep of the adversarial loss, s <= r < min(s + T/M, T)
"""

from pcm.math.consistency import (
    add_noise,
    consistency_target,
    ddim_jump,
    guided_eps,
    jump,
    jump_from,
    lcm_boundary_scalings,
    lcm_origin,
    lcm_prediction,
    phased_target,
    renoise,
    renoise_between,
    renoise_to,
    solver_step,
    teacher_solver_step,
)
from pcm.math.grid import SolverGrid, phase_edge_index, phase_of, prev_timestep, solver_grid
from pcm.math.losses import LOSS_TYPES, consistency_distance, hinge_d_loss, hinge_g_loss, l2, pseudo_huber
from pcm.math.schedule import (
    BETA_SCHEDULES,
    PARAMETRIZATIONS,
    PREDICTION_TYPES,
    SCHEDULE_KINDS,
    NoiseSchedule,
    abar_at,
    alphas_cumprod,
    append_dims,
    as_schedule,
    eps_from_v,
    eps_from_x0,
    flow_schedule,
    flow_sigmas,
    flux_shift,
    noise_schedule_from_scheduler_config,
    prediction_of,
    schedule_from_scheduler_config,
    shift_sigmas,
    to_eps,
    v_from_eps_x0,
    vp_schedule,
    x0_eps,
    x0_from_eps,
)

__all__ = [
    "BETA_SCHEDULES", "LOSS_TYPES", "PARAMETRIZATIONS", "PREDICTION_TYPES", "SCHEDULE_KINDS", "NoiseSchedule",
    "SolverGrid", "abar_at", "add_noise", "alphas_cumprod", "append_dims", "as_schedule", "consistency_distance",
    "consistency_target",
    "ddim_jump", "eps_from_v", "eps_from_x0", "flow_schedule", "flow_sigmas", "flux_shift", "guided_eps",
    "hinge_d_loss", "hinge_g_loss", "jump", "jump_from", "l2", "lcm_boundary_scalings", "lcm_origin",
    "lcm_prediction", "noise_schedule_from_scheduler_config", "phase_edge_index", "phase_of", "phased_target",
    "prediction_of", "prev_timestep", "pseudo_huber", "renoise", "renoise_between", "renoise_to",
    "schedule_from_scheduler_config", "shift_sigmas", "solver_grid", "solver_step", "teacher_solver_step",
    "to_eps", "v_from_eps_x0", "vp_schedule", "x0_eps", "x0_from_eps",
]
