"""The PCM (and LCM) loss of one training step, for any denoisers: eps_fn(x_t, t, cond) -> eps_hat.

A loss is an object built once with the run's constants (solver grid, noise schedule, distill config, seed) and
called per step with the step's networks, batch and step index, so an SD UNet with adapters on/off and an analytic
teacher with an MLP student are driven by the same code. Numbered comments follow docs/method.md §5.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from pcm.config import DistillConfig
from pcm.math import (
    NoiseSchedule,
    SolverGrid,
    add_noise,
    append_dims,
    as_schedule,
    consistency_distance,
    hinge_d_loss,
    hinge_g_loss,
    jump,
    lcm_boundary_scalings,
    lcm_origin,
    renoise_to,
    solver_step,
)
from pcm.math import consistency_target as phased_target  # step 5's target, under the name the method uses
from pcm.models.denoiser import Cond, EpsFn, cat_cond, where_cond
from pcm.rng import U_DROP, U_GRID, U_R, U_W, Draws, keyed_draws


class Discriminate(Protocol):
    """D(x_r, r, cond) -> per head its (B, P_h) logits, one per position (the hinge acts on each before averaging);
    train_heads=False runs the heads as constants (the generator's pass). With fake (the joint turn, x_r real):
    (D's logits on real, D's on the detached fake, G's on the fake) from one backbone pass over the fake."""

    def __call__(self, x_r: torch.Tensor, r: torch.Tensor, cond: Cond, train_heads: bool,
                 fake: torch.Tensor | None = None) -> list[torch.Tensor] | tuple[list, list, list]: ...


@dataclass(frozen=True)
class Batch:
    x_0: torch.Tensor  # (B, ...) clean latents (VAE latents x scaling factor)
    cond: Cond  # per-sample condition, batch-first (a tensor or a dict of tensors)
    uncond: Cond  # the empty condition, same structure and batch size
    ids: torch.Tensor  # (B,) int64 global sample ids: the key of every random draw


@dataclass(frozen=True)
class Nets:
    """The denoisers of one step: student (trainable), frozen teacher, target net, and the discriminator."""

    student: EpsFn
    teacher: EpsFn
    target_net: EpsFn  # the student itself, or its EMA weights (called without gradient)
    disc: Discriminate | None = None


TURNS = ("joint", "g", "d")  # what a step updates: student and heads, the student (generator) or the heads
# how the solver step guides the teacher (pcm.models.families.Teacher.guidance_mode): classic CFG over cond and uncond,
# the guidance scale embedded in a guidance-distilled teacher's condition (FLUX.1-dev), or none (FLUX.1-schnell)
TEACHER_GUIDANCE = ("cfg", "embedded", "none")


@dataclass(frozen=True)
class SolverOutcome:
    """What both methods share: the sampled grid point, x_t, and the teacher's guided step to x_{t'}."""

    t: torch.Tensor  # (B,) timesteps tau_n
    t_prev: torch.Tensor  # (B,) tau_{n-1}
    n: torch.Tensor  # (B,) grid indices
    cond: Cond  # the condition after caption dropout
    x_t: torch.Tensor
    x_prev: torch.Tensor  # the teacher's solver step, no gradient


@dataclass(frozen=True)
class SolverLoss:
    """What both methods share: the run's constants, and steps 1, 2 and 4 of docs/method.md §5."""

    grid: SolverGrid
    schedule: NoiseSchedule  # the teacher's x_t = alpha_t x_0 + sigma_t eps (an abar tensor: VP, eps-prediction)
    cfg: DistillConfig
    seed: int
    adversarial_weight: float = 0.0  # lambda of the generator's hinge loss in 'total'
    teacher_guidance: str = "cfg"  # TEACHER_GUIDANCE: how step 4 guides the teacher with w

    def __post_init__(self):
        object.__setattr__(self, "schedule", as_schedule(self.schedule))
        if self.teacher_guidance not in TEACHER_GUIDANCE:
            raise ValueError(f"unknown teacher guidance {self.teacher_guidance!r}; allowed: "
                             f"{', '.join(TEACHER_GUIDANCE)}")
        if self.teacher_guidance == "none" and self.cfg.guidance == "small_cfg" and self.cfg.w_max > 0:
            raise ValueError(f"distill.w_min={self.cfg.w_min}, distill.w_max={self.cfg.w_max}: this teacher takes no "
                             "guidance (FLUX.1-schnell: no guidance embedding, sampled without CFG), so its solver "
                             "step is one plain call; set distill.w_min=0 and distill.w_max=0")

    def solve(self, teacher: EpsFn, batch: Batch, step: int, with_z: bool = False) -> tuple[SolverOutcome, Draws]:
        """Steps 1, 2 and 4 (plus caption dropout), with keyed randomness (z: re-noising noise)."""
        x_0, grid, sched, cfg = batch.x_0, self.grid, self.schedule, self.cfg
        draws = keyed_draws(self.seed, step, batch.ids, tuple(x_0.shape[1:]), with_z=with_z)
        u = draws.u.to(x_0.device)
        # 1. n ~ U{0..N-1}; t = tau_n, t' = tau_{n-1}
        n = (u[:, U_GRID] * grid.N).long().clamp(max=grid.N - 1).cpu()
        t, t_prev = grid.t(n).to(x_0.device), grid.t_prev(n).to(x_0.device)
        drop = u[:, U_DROP] < cfg.caption_dropout
        cond = where_cond(drop, batch.uncond, batch.cond) if cfg.caption_dropout > 0 else batch.cond
        # 2. x_t = alpha_t x_0 + sigma_t eps
        eps = draws.eps.to(device=x_0.device, dtype=x_0.dtype)
        x_t = add_noise(x_0, eps, sched, t)
        # 4. teacher ODE step t -> t', cond and uncond in one batched forward (no uncond pass for normal CFG); a
        #    guidance-distilled teacher reads guidance 1 + w in its condition: one pass, no uncond
        w = (cfg.w_min + (cfg.w_max - cfg.w_min) * u[:, U_W]).to(x_0.dtype)
        with torch.no_grad():
            if cfg.guidance == "normal_cfg" or self.teacher_guidance == "none":
                x_prev = solver_step(x_t, teacher(x_t, t, cond), None, 0.0, sched, t, t_prev)
            elif self.teacher_guidance == "embedded":
                x_prev = solver_step(x_t, teacher(x_t, t, embedded_guidance(cond, 1 + w)), None, 0.0, sched, t, t_prev)
            else:
                eps_c, eps_u = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                       cat_cond(cond, batch.uncond)).chunk(2)
                x_prev = solver_step(x_t, eps_c, eps_u, append_dims(w, x_0.ndim), sched, t, t_prev)
        return SolverOutcome(t, t_prev, n, cond, x_t, x_prev), draws


def embedded_guidance(cond: Cond, guidance_scale: torch.Tensor) -> Cond:
    """cond with its embedded guidance (B,) replaced: what a guidance-distilled teacher (FLUX.1-dev) reads."""
    if not isinstance(cond, Mapping) or "guidance" not in cond:
        raise ValueError("an embedded-guidance teacher (FLUX.1-dev) needs a condition dict carrying 'guidance' (B,), "
                         "as Teacher.condition builds it for a transformer with guidance_embeds")
    return {**cond, "guidance": guidance_scale.to(cond["guidance"])}


@dataclass(frozen=True)
class PCMLoss(SolverLoss):
    """The phased consistency loss d(f, y) of a batch, with the adversarial terms when nets.disc is given."""

    def __call__(self, nets: Nets, batch: Batch, step: int, turn: str = "joint") -> dict[str, torch.Tensor]:
        """'loss' (consistency, student's gradient); with a discriminator 'g_loss' (student's gradient) and 'd_loss'
        (the heads' only), just one of them on a 'g' or 'd' turn; 'total': what this turn back-propagates."""
        if turn not in TURNS:
            raise ValueError(f"unknown turn {turn!r}; allowed: {', '.join(TURNS)}")
        o, draws = self.solve(nets.teacher, batch, step, with_z=nets.disc is not None)
        like, sched = batch.x_0, self.schedule
        s = self.grid.s(o.n).to(like.device)
        # 5. target without gradient: x_{t'} at the edge, else jump(x_{t'} -> s) with the target net. Computed
        #    before the student pass: an EMA target swaps weights in place, which must not touch a live graph.
        with torch.no_grad():
            eps_prev = nets.target_net(o.x_prev, o.t_prev, o.cond)
            y = phased_target(o.x_prev, eps_prev, sched, o.t_prev, s, self.grid.at_edge(o.n).to(like.device))
        # 3. student: f = jump(x_t -> s) with its eps_hat
        f = jump(o.x_t, nets.student(o.x_t, o.t, o.cond), sched, o.t, s)
        # 6. consistency loss
        out = {"loss": consistency_distance(f, y, self.cfg.loss, self.cfg.huber_c), "t_mean": o.t.float().mean()}
        if nets.disc is not None:
            out |= self.adversarial(nets.disc, f, y, s, o.cond, draws, turn)
        g_term = self.adversarial_weight * out["g_loss"] if "g_loss" in out else 0.0
        d_term = out.get("d_loss", 0.0)  # a 'g' turn computes no D loss, a 'd' turn no G loss
        out["total"] = {"g": out["loss"] + g_term, "d": d_term, "joint": out["loss"] + g_term + d_term}[turn]
        return out

    def adversarial(self, disc: Discriminate, f: torch.Tensor, y: torch.Tensor, s: torch.Tensor, cond: Cond,
                    draws: Draws, turn: str) -> dict[str, torch.Tensor]:
        """Step 7: r ~ U{s, ..., min(s + T/M, T) - 1}; fake f and real y re-noised from s to r with the same z;
        hinge losses. A 'd' turn scores real and detached fake in one batched call, a 'g' turn the live fake; the
        joint turn takes the backbone once over real and once over the fake, whose features both losses share."""
        T = len(self.schedule)
        hi = (s + T // self.grid.M).clamp(max=T)
        u = draws.u[:, U_R].to(s.device)
        r = torch.minimum(s + (u * (hi - s)).long(), hi - 1)
        z = draws.z.to(device=f.device, dtype=f.dtype)
        x_fake, x_real = renoise_to(f, z, self.schedule, s, r), renoise_to(y, z, self.schedule, s, r)
        if turn == "joint":
            d_real, d_fake, g_fake = disc(x_real, r, cond, train_heads=True, fake=x_fake)
            return {"d_loss": hinge_d_loss(d_real, d_fake), "g_loss": hinge_g_loss(g_fake)}
        if turn == "d":
            logits = disc(torch.cat([x_real, x_fake.detach()]), torch.cat([r, r]), cat_cond(cond, cond),
                          train_heads=True)
            d_real, d_fake = zip(*(head.chunk(2) for head in logits), strict=True)
            return {"d_loss": hinge_d_loss(d_real, d_fake)}
        return {"g_loss": hinge_g_loss(disc(x_fake, r, cond, train_heads=False))}


@dataclass(frozen=True)
class LCMLoss(SolverLoss):
    """The LCM baseline: one phase, boundary parameterization f = c_skip x_t + c_out x0_hat, same solver."""

    def __call__(self, nets: Nets, batch: Batch, step: int, turn: str = "g") -> dict[str, torch.Tensor]:
        if nets.disc is not None or turn != "g":
            raise ValueError("the LCM baseline has no adversarial terms (no phase edges to re-noise from)")
        o, _ = self.solve(nets.teacher, batch, step)
        like, cfg, sched = batch.x_0, self.cfg, self.schedule

        def scalings(t):
            c_skip, c_out = lcm_boundary_scalings(t.to(like.dtype), cfg.lcm_sigma_data, cfg.lcm_timestep_scaling)
            return append_dims(c_skip, like.ndim), append_dims(c_out, like.ndim)

        # 5. target at t' (equals x_{t'} at t' = 0 through the boundary scalings); before the student pass, as in PCM
        with torch.no_grad():
            y = lcm_origin(o.x_prev, nets.target_net(o.x_prev, o.t_prev, o.cond), sched, o.t_prev, *scalings(o.t_prev))
        # 3. student prediction of the trajectory's origin
        f = lcm_origin(o.x_t, nets.student(o.x_t, o.t, o.cond), sched, o.t, *scalings(o.t))
        # 6. consistency loss
        loss = consistency_distance(f, y, cfg.loss, cfg.huber_c)
        return {"loss": loss, "t_mean": o.t.float().mean(), "total": loss}


LOSSES = {"pcm": PCMLoss, "lcm": LCMLoss}


def make_loss(cfg: DistillConfig, grid: SolverGrid, schedule: NoiseSchedule | torch.Tensor, seed: int,
              adversarial_weight: float = 0.0, teacher_guidance: str = "cfg") -> SolverLoss:
    """The loss object of cfg.method ('pcm' or 'lcm') over the run's grid and schedule (an abar tensor: VP, eps);
    teacher_guidance: how the solver guides the teacher (TEACHER_GUIDANCE; Teacher.guidance_mode)."""
    if cfg.method not in LOSSES:
        raise ValueError(f"unknown distill.method {cfg.method!r}; allowed: {', '.join(LOSSES)}")
    return LOSSES[cfg.method](grid, schedule, cfg, seed, adversarial_weight, teacher_guidance)
