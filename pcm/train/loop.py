"""The distillation loop over any student module and teacher eps_fn (single process).

Reads top to bottom: build grid, optimizer and target net; then for each step compute the method's loss,
update only the student's trainable parameters (docs/method.md §5 step 8), and move the EMA.
"""

import math
from collections.abc import Callable

import torch
from tqdm import tqdm

from pcm.config import Config, TrainConfig
from pcm.math import SolverGrid
from pcm.models.denoiser import EpsFn
from pcm.train.ema import EMA
from pcm.train.step import Batch, method_loss


def target_net_for(student: EpsFn, ema: EMA | None) -> EpsFn:
    """The target net: the student itself (called under no_grad by the loss) or its EMA weights swapped in."""
    if ema is None:
        return student

    def ema_eps_fn(x_t, t, cond):
        with ema.swapped_in():
            return student(x_t, t, cond)

    return ema_eps_fn


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the learning rate at a step: linear warmup, then constant or cosine decay to 0."""
    if step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.lr_warmup_steps) / max(1, cfg.max_steps - cfg.lr_warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown train.lr_schedule {cfg.lr_schedule!r}; allowed: constant, cosine")


def train(
    student: torch.nn.Module, teacher: EpsFn, next_batch: Callable[[int], Batch], abar: torch.Tensor,
    cfg: Config, progress: bool = True,
) -> list[float]:
    """Distill for cfg.train.max_steps steps; returns the loss of every step."""
    d = cfg.distill
    grid = SolverGrid(cfg.schedule.num_train_timesteps, d.num_solver_steps, d.num_phases)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg.train))
    ema = EMA(params, d.ema_decay) if d.target_net == "ema" else None
    target_net = target_net_for(student, ema)
    loss_fn = method_loss(d.method)
    losses = []
    bar = tqdm(range(cfg.train.max_steps), desc=f"distill {d.method} M={d.num_phases}", disable=not progress)
    for step in bar:
        out = loss_fn(student, teacher, target_net, next_batch(step), grid, abar, d, cfg.seed, step)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update()
        losses.append(out["loss"].item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3g}")
    return losses
