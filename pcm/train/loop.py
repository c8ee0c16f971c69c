"""The optimizer step both training loops take, and the loop of the analytic teacher's runs.

`train_step` is one optimizer step over the gradient-accumulation micro-batches (docs/method.md §5 step 8: only
the student's trainable parameters and the discriminator's heads move). `pcm distill` (pcm.train.distill) and the
analytic-teacher runs (`train` below) both take it; they differ only around it: distill adds checkpoints,
preemption, validation grids and several processes, which an MLP student of a closed-form teacher has no use for.
"""

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from pcm.config import Config, ConfigError, TrainConfig
from pcm.math import NoiseSchedule, SolverGrid
from pcm.models.denoiser import EpsFn
from pcm.train.ema import EMA
from pcm.train.optim import adamw
from pcm.train.step import Batch, Nets, make_loss


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


@dataclass
class Optimization:
    """What a step updates: the student's trainable parameters (optimizer, learning-rate schedule, EMA) and the
    discriminator's heads (their own optimizer)."""

    params: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: EMA | None = None
    disc_optimizer: torch.optim.Optimizer | None = None


def optimization(cfg: Config, params: list, disc_optimizer: torch.optim.Optimizer | None = None) -> Optimization:
    """AdamW (or bitsandbytes' 8-bit AdamW) over params, warmup + schedule, the EMA when it is the target net."""
    t = cfg.train
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ConfigError("train.optimizer=adamw8bit needs the bitsandbytes package (CUDA); "
                              "install it or use train.optimizer=adamw") from err
        optimizer = bnb.optim.AdamW8bit(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    else:
        optimizer = adamw(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, t))
    ema = EMA(params, cfg.distill.ema_decay) if cfg.distill.target_net == "ema" else None
    return Optimization(params, optimizer, scheduler, ema, disc_optimizer)


class OneProcess:
    """The part of accelerate's Accelerator a step uses, for one process without it: plain backward, nothing to
    synchronize, flags gathered from this process alone."""

    num_processes = 1

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self, module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def clip_grad_norm_(self, params, max_norm: float):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


@dataclass(frozen=True)
class StepResult:
    losses: dict[str, torch.Tensor]  # the micro-batches' mean of 'loss', 'g_loss', 'd_loss' (on the device)
    finite: bool  # every micro-batch of every process had a finite total; else nothing was applied
    stop: bool  # some process asked to stop after this step (SIGTERM)


def train_step(opt: Optimization, micro_losses: Callable[[int], dict], cfg: TrainConfig, turn: str,
               accelerator=None, module=None, stop_requested: bool = False) -> StepResult:
    """One optimizer step over cfg.gradient_accumulation_steps micro-batches; micro_losses(k) gives micro-batch k's
    loss dict (its 'total' is back-propagated). One host sync per step: every process must agree whether to apply
    the update (or DDP's next all-reduce would wait forever) and whether to stop, so both flags travel in one
    gather after backward. module: the DDP-wrapped student, whose all-reduce waits for the last micro-batch."""
    acc, A = accelerator or OneProcess(), cfg.gradient_accumulation_steps
    losses, nonfinite = [], None
    for k in range(A):
        with contextlib.nullcontext() if k == A - 1 or module is None else acc.no_sync(module):
            out = micro_losses(k)
            acc.backward(out["total"] / A)  # also when not finite: the gradients are then dropped, not applied
        bad = (~torch.isfinite(out["total"].detach())).float()
        nonfinite = bad if nonfinite is None else nonfinite + bad
        losses.append({key: out[key].detach().float() for key in ("loss", "g_loss", "d_loss") if key in out})
    flags = torch.stack([nonfinite, torch.tensor(float(stop_requested), device=nonfinite.device)])
    any_nonfinite, stop = (bool(v > 0) for v in acc.gather(flags.reshape(1, 2)).amax(dim=0).tolist())
    if not any_nonfinite and turn != "d":
        if cfg.max_grad_norm > 0:
            acc.clip_grad_norm_(opt.params, cfg.max_grad_norm)
        opt.optimizer.step()
        opt.scheduler.step()
        if opt.ema is not None:
            opt.ema.update()
    if not any_nonfinite and turn != "g":
        opt.disc_optimizer.step()
    opt.optimizer.zero_grad(set_to_none=True)
    if opt.disc_optimizer is not None:
        opt.disc_optimizer.zero_grad(set_to_none=True)
    mean = {key: torch.stack([m[key] for m in losses]).mean() for key in losses[0]}
    return StepResult(mean, not any_nonfinite, stop)


def train(
    student: torch.nn.Module, teacher: EpsFn, next_batch: Callable[[int], Batch],
    schedule: NoiseSchedule | torch.Tensor, cfg: Config, progress: bool = True,
) -> list[float]:
    """Distill an analytic teacher into student for cfg.train.max_steps steps (one process, one micro-batch per
    step: next_batch(step)) on the teacher's noise schedule (VP or flow; a bare abar tensor: VP, eps-prediction);
    returns the loss of every step."""
    d = cfg.distill
    grid = SolverGrid(cfg.schedule.num_train_timesteps, d.num_solver_steps, d.num_phases)
    loss = make_loss(d, grid, schedule, cfg.seed)
    opt = optimization(cfg, [p for p in student.parameters() if p.requires_grad])
    nets = Nets(student, teacher, target_net_for(student, opt.ema))
    losses = []
    bar = tqdm(range(cfg.train.max_steps), desc=f"distill {d.method} M={d.num_phases}", disable=not progress)
    for step in bar:
        batch = next_batch(step)
        result = train_step(opt, lambda k, batch=batch, step=step: loss(nets, batch, step, "g"), cfg.train, "g")
        losses.append(result.losses["loss"].item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3g}")
    return losses
