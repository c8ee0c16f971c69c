"""Pure tensor math of Phased Consistency Models. Imports only torch.

Notation (docs/method.md §1); one spelling each, everywhere in the project:

    T            num_train_timesteps (1000 for SD); integer timesteps t in [0, T)
    abar[t]      alphas_cumprod; alpha_t = sqrt(abar[t]), sigma_t = sqrt(1 - abar[t])
    x_0, x_t     clean latents and x_t = alpha_t x_0 + sigma_t eps
    eps_hat      an eps-prediction;  x0_hat = (x_t - sigma_t eps_hat) / alpha_t
    N, tau       solver grid: tau_n = (n + 1) T/N - 1, n = 0..N-1, tau_{-1} = 0
    n vs t       grid index vs timestep (t = tau_n, t' = tau_{n-1}); never both called "timesteps"
    M, e_m, s_m  num_phases, edge indices e_m = floor(m N / M), edge timesteps s_m = tau_{e_m - 1}
    m(n)         phase of grid index n: max{m : e_m <= n}
    jump         DDIM jump x_t -> x_s = alpha_s x0_hat + sigma_s eps_hat
    w            solver guidance (LCM convention): eps_tilde = eps_c + w (eps_c - eps_u)
    guidance_scale  inference CFG: eps = eps_u + guidance_scale (eps_c - eps_u)  (= solver w + 1)
    f, y         student prediction jump(x_t -> s) and target (x_{t'} at an edge, else jump(x_{t'} -> s))
    r            re-noising timestep of the adversarial loss, s <= r < min(s + T/M, T)
"""

from pcm.math.consistency import (
    ddim_jump,
    guided_eps,
    lcm_boundary_scalings,
    lcm_prediction,
    phased_target,
    renoise,
    teacher_solver_step,
)
from pcm.math.grid import SolverGrid, phase_edge_index, phase_of, prev_timestep, solver_grid
from pcm.math.losses import LOSS_TYPES, consistency_distance, hinge_d_loss, hinge_g_loss, l2, pseudo_huber
from pcm.math.schedule import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    abar_at,
    alphas_cumprod,
    append_dims,
    eps_from_v,
    eps_from_x0,
    schedule_from_scheduler_config,
    to_eps,
    v_from_eps_x0,
    x0_from_eps,
)

__all__ = [
    "BETA_SCHEDULES", "LOSS_TYPES", "PREDICTION_TYPES", "SolverGrid", "abar_at", "alphas_cumprod", "append_dims",
    "consistency_distance", "ddim_jump", "eps_from_v", "eps_from_x0", "guided_eps", "hinge_d_loss", "hinge_g_loss",
    "l2", "lcm_boundary_scalings", "lcm_prediction", "phase_edge_index", "phase_of", "phased_target",
    "prev_timestep", "pseudo_huber", "renoise", "schedule_from_scheduler_config", "solver_grid",
    "teacher_solver_step", "to_eps", "v_from_eps_x0", "x0_from_eps",
]
