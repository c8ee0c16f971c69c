"""Samplers over any denoiser eps_fn(x_t, t, cond): PCM (deterministic and stochastic), teacher DDIM, LCM.

A path is a decreasing list of timesteps from T - 1 down to 0; each consecutive pair is one model call and one
jump. Every sampler runs on a NoiseSchedule (an abar tensor stands for the VP schedule of an eps-predictor) and reads
the model's output in the schedule's parametrization: the same code is DDIM on a VP teacher and Euler on a flow one.
The final point 0 is abar[0] on VP (diffusers' set_alpha_to_one=False) and sigma = 0 on a flow. `sample` is the one
way from a model card, a step count and gamma to a sampler call: validation grids, evaluation, `pcm sample`, the
registered model and the toy benchmark all take it.
"""

from dataclasses import dataclass

import torch

from pcm.math import (
    NoiseSchedule,
    add_noise,
    as_schedule,
    guided_eps,
    jump,
    lcm_boundary_scalings,
    lcm_origin,
    renoise_to,
)
from pcm.models.card import ModelCard
from pcm.models.denoiser import Cond, EpsFn, cat_cond


def pcm_timesteps(points: list[int], K: int) -> list[int]:
    """K-step schedule for a PCM student over its trained path points = [T-1, s_{M-1}, ..., s_0]: exactly the
    trained edges for K = M.

    K < M skips edges (evenly by index); K > M splits phases (the first K mod M phases get one more step)
    into evenly spaced sub-steps; every trained edge stays on the path.
    """
    if K < 1:
        raise ValueError(f"number of sampling steps K={K} must be >= 1")
    M = len(points) - 1
    if K <= M:
        return [points[round(i * M / K)] for i in range(K + 1)]
    path = []
    for m, (hi, lo) in enumerate(zip(points[:-1], points[1:], strict=True)):
        steps = K // M + (1 if m < K % M else 0)
        path += [hi - round(j * (hi - lo) / steps) for j in range(steps)]
    return path + [0]


def ddim_timesteps(T: int, K: int) -> list[int]:
    """The teacher's K-step DDIM path, "trailing" spacing: T-1, T-1-T/K, ..., then 0."""
    if not 1 <= K <= T:
        raise ValueError(f"number of sampling steps K={K} must be in 1..{T}")
    return sorted({round(T - i * T / K) - 1 for i in range(K)}, reverse=True) + [0]


def lcm_timesteps(T: int, N: int, K: int) -> list[int]:
    """diffusers' LCMScheduler schedule: K of the N-point training grid, evenly by index (no final 0)."""
    if not 1 <= K <= N:
        raise ValueError(f"LCM sampling steps K={K} must be in 1..N={N} (the distillation grid)")
    grid = [(i + 1) * (T // N) - 1 for i in reversed(range(N))]
    return [grid[int(i * N / K)] for i in range(K)]


# What a PCM student does with K > M steps (docs/method.md §8; benchmarks/claims.py measures them):
#   substeps      DDIM jumps between evenly spaced points inside a phase (the student's eps reused off its edges)
#   edge_renoise  from each point jump to the phase's edge, then re-noise with fresh noise up to the next point
#   edges_only    the M trained edges only: steps beyond M are not taken
K_ABOVE_M_RULES = ("substeps", "edge_renoise", "edges_only")
DEFAULT_K_ABOVE_M = "substeps"


@dataclass(frozen=True)
class Sampling:
    """How to sample a model: its card (None: the teacher's own DDIM), K steps, inference CFG scale and gamma."""

    card: ModelCard | None
    steps: int
    guidance_scale: float = 1.0
    gamma: float = 0.0  # PCM/DDIM stochasticity (TCD's rule); LCM's multistep rule re-noises fully already
    k_above_m: str = DEFAULT_K_ABOVE_M  # a PCM card's rule for steps > M (K_ABOVE_M_RULES); unused for K <= M

    def __post_init__(self):
        if self.k_above_m not in K_ABOVE_M_RULES:
            raise ValueError(f"k_above_m={self.k_above_m!r}; allowed: {', '.join(K_ABOVE_M_RULES)}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma={self.gamma:g}: must be in [0, 1] (0 = deterministic PCM, 1 = fully re-noised)")
        if self.gamma != 0 and self.card is None:
            raise ValueError(f"gamma={self.gamma:g} with the teacher: its DDIM (Euler on a flow) is deterministic; "
                             "gamma is the stochastic step of a distilled PCM LoRA")
        if self.gamma != 0 and self.card is not None and self.card.method == "lcm":
            raise ValueError(f"gamma={self.gamma:g} with an LCM LoRA: its multistep sampler already re-noises with "
                             "fresh noise at every step; use gamma 0 (or a PCM LoRA)")

    def timesteps(self, T: int) -> list[int]:
        """The K-step path: DDIM's trailing spacing, a PCM card's trained edges, or LCMScheduler's rule."""
        card, K = self.card, self.steps
        if card is None:
            return ddim_timesteps(T, K)
        if card.num_train_timesteps != T:
            raise ValueError(f"the LoRA was trained on {card.num_train_timesteps} timesteps, the teacher has {T}")
        if card.method == "pcm":
            if self.k_above_m == "edges_only":
                K = min(K, card.num_phases)
            return pcm_timesteps(card.sampling_timesteps, K)
        return lcm_timesteps(T, card.num_solver_steps, K)

    def jump_edges(self) -> list[int] | None:
        """The points sample_pcm jumps to before re-noising (edge_renoise with K > M), else None (plain jumps)."""
        card = self.card
        if card is None or card.method != "pcm" or self.k_above_m != "edge_renoise" or self.steps <= card.num_phases:
            return None
        return card.sampling_timesteps


@torch.no_grad()
def sample(eps_fn: EpsFn, x_T: torch.Tensor, cond: Cond, neg_cond: Cond | None,
           schedule: NoiseSchedule | torch.Tensor, how: Sampling, generator: torch.Generator | None = None
           ) -> torch.Tensor:
    """x_0 after how.steps steps of the sampler a model card asks for (PCM's DDIM jumps or LCM's multistep rule)."""
    path = how.timesteps(len(schedule))
    if how.card is None:
        return sample_ddim(eps_fn, x_T, cond, schedule, path, guidance_scale=how.guidance_scale, neg_cond=neg_cond)
    if how.card.method == "lcm":
        return sample_lcm(eps_fn, x_T, cond, schedule, path, sigma_data=how.card.lcm_sigma_data,
                          timestep_scaling=how.card.lcm_timestep_scaling, guidance_scale=how.guidance_scale,
                          neg_cond=neg_cond, generator=generator)
    return sample_pcm(eps_fn, x_T, cond, schedule, path, guidance_scale=how.guidance_scale, neg_cond=neg_cond,
                      gamma=how.gamma, generator=generator, edges=how.jump_edges())


def guided_eval(
    eps_fn: EpsFn, x: torch.Tensor, t: int, cond: Cond, neg_cond: Cond | None, guidance_scale: float
) -> torch.Tensor:
    """eps = eps_neg + guidance_scale (eps_c - eps_neg) in one batched call; a single call when scale is 1."""
    t_batch = torch.full((len(x),), t, dtype=torch.int64, device=x.device)
    if guidance_scale == 1.0 or neg_cond is None:
        return eps_fn(x, t_batch, cond)
    eps_c, eps_neg = eps_fn(torch.cat([x, x]), torch.cat([t_batch, t_batch]), cat_cond(cond, neg_cond)).chunk(2)
    return guided_eps(eps_c, eps_neg, guidance_scale - 1.0)


@torch.no_grad()
def sample_pcm(
    eps_fn: EpsFn, x_T: torch.Tensor, cond: Cond, schedule: NoiseSchedule | torch.Tensor, timesteps: list[int], *,
    guidance_scale: float = 1.0, neg_cond: Cond | None = None, gamma: float = 0.0,
    generator: torch.Generator | None = None, edges: list[int] | None = None,
) -> torch.Tensor:
    """DDIM jumps along timesteps with the model's eps; gamma > 0 adds TCD's stochastic step.

    Stochastic rule: from t, jump to s' = floor((1 - gamma) e), then re-noise from s' back up to s, where e = s,
    or with edges (the trained path points, 0 included) the highest edge <= s: a consistency model's multistep
    inside a phase. With gamma = 0, no edges and the teacher as eps_fn this is the teacher's deterministic DDIM.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma={gamma} must be in [0, 1]")
    x, schedule = x_T, as_schedule(schedule)
    for t, s in zip(timesteps[:-1], timesteps[1:], strict=True):
        out = guided_eval(eps_fn, x, t, cond, neg_cond, guidance_scale)
        # the student was trained to land on edges only, so edge_renoise jumps there and re-noises up to s
        e = s if edges is None else max(p for p in edges if p <= s)
        s_jump = int((1.0 - gamma) * e)  # the last s is 0: no noise after the final jump
        x = jump(x, out, schedule, t, s_jump)
        if s_jump != s:
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = renoise_to(x, z, schedule, s_jump, s)
    return x


@torch.no_grad()
def sample_ddim(
    eps_fn: EpsFn, x_T: torch.Tensor, cond: Cond, schedule: NoiseSchedule | torch.Tensor, timesteps: list[int], *,
    guidance_scale: float = 1.0, neg_cond: Cond | None = None,
) -> torch.Tensor:
    """The teacher's DDIM exactly as diffusers' DDIMScheduler (eta 0) runs it: the model at each timestep of the
    path, then a jump by T // K to t - T // K (abar[0] below 0). Where K does not divide T that is not always the
    path's next point (K = 16: 937 -> 875, then the model at 874); the teacher row is what diffusers users get.
    On a flow schedule the same jumps are Euler steps in sigma, ending at sigma = 0."""
    schedule = as_schedule(schedule)
    x, stride = x_T, len(schedule) // (len(timesteps) - 1)
    for t in timesteps[:-1]:
        out = guided_eval(eps_fn, x, t, cond, neg_cond, guidance_scale)
        x = jump(x, out, schedule, t, max(t - stride, 0))
    return x


@torch.no_grad()
def sample_lcm(
    eps_fn: EpsFn, x_T: torch.Tensor, cond: Cond, schedule: NoiseSchedule | torch.Tensor, timesteps: list[int], *,
    sigma_data: float = 0.5, timestep_scaling: float = 10.0, guidance_scale: float = 1.0, neg_cond: Cond | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """LCM multistep sampling (diffusers' LCMScheduler): predict the origin, re-noise with fresh noise."""
    x, schedule = x_T, as_schedule(schedule)
    for i, t in enumerate(timesteps):
        out = guided_eval(eps_fn, x, t, cond, neg_cond, guidance_scale)
        c_skip, c_out = lcm_boundary_scalings(torch.tensor(t), sigma_data, timestep_scaling)
        denoised = lcm_origin(x, out, schedule, t, c_skip, c_out)
        if i == len(timesteps) - 1:
            return denoised
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = add_noise(denoised, noise, schedule, timesteps[i + 1])
    return x
