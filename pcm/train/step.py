"""One PCM (or LCM) training step for any denoisers: eps_fn(x_t, t, cond) -> eps_hat.

The student, teacher and target net are callables; an SD UNet with adapters on/off and an analytic teacher
with an MLP student are driven by the same code. Numbered comments follow docs/method.md §5.
"""

from dataclasses import dataclass
from typing import Protocol

import torch

from pcm.config import DistillConfig
from pcm.math import (
    SolverGrid,
    abar_at,
    append_dims,
    consistency_distance,
    ddim_jump,
    hinge_d_loss,
    hinge_g_loss,
    lcm_boundary_scalings,
    lcm_prediction,
    phased_target,
    renoise,
    teacher_solver_step,
)
from pcm.models.denoiser import Cond, EpsFn, cat_cond, where_cond
from pcm.rng import U_DROP, U_GRID, U_R, U_W, Draws, keyed_draws


class Discriminate(Protocol):
    """D(x_r, r, cond) -> (B,) logits; train_heads=False runs the heads as constants (the generator's pass)."""

    def __call__(self, x_r: torch.Tensor, r: torch.Tensor, cond: Cond, train_heads: bool) -> torch.Tensor: ...


@dataclass(frozen=True)
class Batch:
    x_0: torch.Tensor  # (B, ...) clean latents (VAE latents x scaling factor)
    cond: Cond  # per-sample condition, batch-first (a tensor or a dict of tensors)
    uncond: Cond  # the empty condition, same structure and batch size
    ids: torch.Tensor  # (B,) int64 global sample ids: the key of every random draw


@dataclass(frozen=True)
class SolverOutcome:
    """What both methods share: the sampled grid point, x_t, and the teacher's guided step to x_{t'}."""

    t: torch.Tensor  # (B,) timesteps tau_n
    t_prev: torch.Tensor  # (B,) tau_{n-1}
    n: torch.Tensor  # (B,) grid indices
    cond: Cond  # the condition after caption dropout
    x_t: torch.Tensor
    x_prev: torch.Tensor  # the teacher's solver step, no gradient


def draw_and_solve(
    teacher: EpsFn, batch: Batch, grid: SolverGrid, abar: torch.Tensor, cfg: DistillConfig, seed: int, step: int,
    with_z: bool = False,
) -> tuple[SolverOutcome, Draws]:
    """Steps 1, 2 and 4 of docs/method.md §5 (plus caption dropout), with keyed randomness (z: re-noising noise)."""
    x_0 = batch.x_0
    draws = keyed_draws(seed, step, batch.ids, tuple(x_0.shape[1:]), with_z=with_z)
    u = draws.u.to(x_0.device)
    # 1. n ~ U{0..N-1}; t = tau_n, t' = tau_{n-1}
    n = (u[:, U_GRID] * grid.N).long().clamp(max=grid.N - 1).cpu()
    t, t_prev = grid.t(n).to(x_0.device), grid.t_prev(n).to(x_0.device)
    drop = u[:, U_DROP] < cfg.caption_dropout
    cond = where_cond(drop, batch.uncond, batch.cond) if cfg.caption_dropout > 0 else batch.cond
    # 2. x_t = alpha_t x_0 + sigma_t eps
    abar_t, abar_prev = abar_at(abar, t, x_0), abar_at(abar, t_prev, x_0)
    eps = draws.eps.to(device=x_0.device, dtype=x_0.dtype)
    x_t = abar_t.sqrt() * x_0 + (1 - abar_t).sqrt() * eps
    # 4. teacher ODE step t -> t', cond and uncond in one batched forward (no uncond pass for normal CFG)
    with torch.no_grad():
        if cfg.guidance == "small_cfg":
            w = append_dims((cfg.w_min + (cfg.w_max - cfg.w_min) * u[:, U_W]).to(x_0.dtype), x_0.ndim)
            eps_c, eps_u = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_cond(cond, batch.uncond)).chunk(2)
            x_prev = teacher_solver_step(x_t, eps_c, eps_u, w, abar_t, abar_prev)
        else:
            x_prev = teacher_solver_step(x_t, teacher(x_t, t, cond), None, 0.0, abar_t, abar_prev)
    return SolverOutcome(t, t_prev, n, cond, x_t, x_prev), draws


def pcm_loss(
    student: EpsFn, teacher: EpsFn, target_net: EpsFn, batch: Batch, grid: SolverGrid, abar: torch.Tensor,
    cfg: DistillConfig, seed: int, step: int, disc: Discriminate | None = None, disc_terms: str = "joint",
) -> dict[str, torch.Tensor]:
    """The phased consistency loss d(f, y) of one batch; 'loss' carries the student's gradient.

    With a discriminator also the adversarial terms (step 7): 'g_loss' (student's gradient) and 'd_loss' (the
    heads' gradient only); disc_terms 'g' or 'd' computes just that one (the alternate schedule's steps)."""
    o, draws = draw_and_solve(teacher, batch, grid, abar, cfg, seed, step, with_z=disc is not None)
    like = batch.x_0
    s = grid.s(o.n).to(like.device)
    abar_t, abar_prev, abar_s = abar_at(abar, o.t, like), abar_at(abar, o.t_prev, like), abar_at(abar, s, like)
    # 5. target without gradient: x_{t'} at the edge, else jump(x_{t'} -> s) with the target net. Computed
    #    before the student pass: an EMA target swaps weights in place, which must not touch a live graph.
    with torch.no_grad():
        eps_prev = target_net(o.x_prev, o.t_prev, o.cond)
        y = phased_target(o.x_prev, eps_prev, abar_prev, abar_s, grid.at_edge(o.n).to(like.device))
    # 3. student: f = jump(x_t -> s) with its eps_hat
    f = ddim_jump(o.x_t, student(o.x_t, o.t, o.cond), abar_t, abar_s)
    # 6. consistency loss
    loss = consistency_distance(f, y, cfg.loss, cfg.huber_c)
    out = {"loss": loss, "t_mean": o.t.float().mean()}
    if disc is not None:
        out |= adversarial_losses(disc, f, y, s, o.cond, draws, grid, abar, disc_terms)
    return out


def adversarial_losses(disc: Discriminate, f: torch.Tensor, y: torch.Tensor, s: torch.Tensor, cond: Cond,
                       draws: Draws, grid: SolverGrid, abar: torch.Tensor, terms: str = "joint"
                       ) -> dict[str, torch.Tensor]:
    """Step 7: r ~ U{s, ..., min(s + T/M, T) - 1}; fake f and real y re-noised from s to r with the same z;
    hinge losses. The D pass over real and detached fake is one batched call; the G pass is a second one."""
    T = len(abar)
    hi = (s + T // grid.M).clamp(max=T)
    u = draws.u[:, U_R].to(s.device)
    r = torch.minimum(s + (u * (hi - s)).long(), hi - 1)
    abar_s, abar_r = abar_at(abar, s, f), abar_at(abar, r, f)
    z = draws.z.to(device=f.device, dtype=f.dtype)
    x_fake, x_real = renoise(f, z, abar_s, abar_r), renoise(y, z, abar_s, abar_r)
    if terms not in ("joint", "g", "d"):
        raise ValueError(f"unknown adversarial terms {terms!r}; allowed: joint, g, d")
    out = {}
    if terms != "g":
        d_real, d_fake = disc(torch.cat([x_real, x_fake.detach()]), torch.cat([r, r]), cat_cond(cond, cond),
                              train_heads=True).chunk(2)
        out["d_loss"] = hinge_d_loss(d_real, d_fake)
    if terms != "d":
        out["g_loss"] = hinge_g_loss(disc(x_fake, r, cond, train_heads=False))
    return out


def lcm_loss(
    student: EpsFn, teacher: EpsFn, target_net: EpsFn, batch: Batch, grid: SolverGrid, abar: torch.Tensor,
    cfg: DistillConfig, seed: int, step: int,
) -> dict[str, torch.Tensor]:
    """The LCM baseline: one phase, boundary parameterization f = c_skip x_t + c_out x0_hat, same solver."""
    o, _ = draw_and_solve(teacher, batch, grid, abar, cfg, seed, step)
    like = batch.x_0
    abar_t, abar_prev = abar_at(abar, o.t, like), abar_at(abar, o.t_prev, like)

    def scalings(t):
        c_skip, c_out = lcm_boundary_scalings(t.to(like.dtype), cfg.lcm_sigma_data, cfg.lcm_timestep_scaling)
        return append_dims(c_skip, like.ndim), append_dims(c_out, like.ndim)

    # 5. target at t' (equals x_{t'} at t' = 0 through the boundary scalings); before the student pass, as in PCM
    with torch.no_grad():
        y = lcm_prediction(o.x_prev, target_net(o.x_prev, o.t_prev, o.cond), abar_prev, *scalings(o.t_prev))
    # 3. student prediction of the trajectory's origin
    f = lcm_prediction(o.x_t, student(o.x_t, o.t, o.cond), abar_t, *scalings(o.t))
    # 6. consistency loss
    loss = consistency_distance(f, y, cfg.loss, cfg.huber_c)
    return {"loss": loss, "t_mean": o.t.float().mean()}


def method_loss(method: str):
    """The loss function of a distillation method ('pcm' or 'lcm')."""
    losses = {"pcm": pcm_loss, "lcm": lcm_loss}
    if method not in losses:
        raise ValueError(f"unknown distill.method {method!r}; allowed: {', '.join(losses)}")
    return losses[method]
