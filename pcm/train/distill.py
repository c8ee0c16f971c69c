"""`pcm distill`: an SD1.5 / SDXL teacher distilled into a PCM (or LCM) LoRA with accelerate.

One UNet: the student is the UNet with adapters on (through the DDP wrapper when distributed), the teacher the
same UNet with adapters off. Randomness is keyed by (seed, step, global sample id) and the VAE posterior mean
is used as x_0, so with train.data_split=samples the result does not depend on the number of processes.
A SIGTERM saves a checkpoint and raises Preempted (the CLI exits 143 so an orchestrator's retry resumes).
"""

import contextlib
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from tqdm import tqdm

from pcm.config import Config, ConfigError, config_to_dict
from pcm.math import SolverGrid
from pcm.models.discriminator import Discriminator
from pcm.models.families import Teacher, load_teacher
from pcm.models.lora import adapters_off, attach_lora, export_lora, load_lora_state_dict, lora_state_dict
from pcm.sampling import pcm_timesteps
from pcm.train.checkpoint import CheckpointWarning, load_checkpoint, repair_checkpoints, resolve_resume, save_checkpoint
from pcm.train.ema import EMA
from pcm.train.loop import lr_factor, target_net_for
from pcm.train.sink import JsonlSink, MultiSink, Sink
from pcm.train.step import Batch, method_loss
from pcm.train.validation import write_validation_grid

MAX_NONFINITE_IN_A_ROW = 10
DISC_PREFIX = "disc."  # discriminator heads in a checkpoint's lora.safetensors


class BatchSource(Protocol):
    """Endless training batches of one process (pcm.data.loader.Loader): dicts with pixels, caption,
    original_size, crop_top_left and position; next_position(position) names the batch after it."""

    def __iter__(self): ...

    def next_position(self, position: tuple[int, int]) -> tuple[int, int]: ...


# (micro batch size, rank, world size, start position) -> the batches of that process
DataFactory = Callable[[int, int, int, tuple[int, int]], BatchSource]


class Preempted(RuntimeError):
    """SIGTERM arrived; a checkpoint was saved. Rerun with --resume latest."""


class NonFiniteLoss(RuntimeError):
    """Too many consecutive steps with a non-finite loss."""


@dataclass
class Run:
    """What the loop works with, built by setup()."""

    accelerator: Accelerator
    teacher: Teacher
    student_unet: torch.nn.Module  # the UNet as prepared by accelerate (DDP-wrapped when distributed)
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: EMA | None
    data: BatchSource
    micro_batch: int
    disc: torch.nn.Module | None = None  # the discriminator (heads trainable) as prepared by accelerate
    disc_optimizer: torch.optim.Optimizer | None = None
    step: int = 0
    position: tuple[int, int] = (0, 0)  # the next batch (epoch, index) of this process's data
    nonfinite_total: int = 0


def _optimizer(cfg: Config, params: list) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ConfigError("train.optimizer=adamw8bit needs the bitsandbytes package (CUDA); "
                              "install it or use train.optimizer=adamw") from err
        return bnb.optim.AdamW8bit(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)


def _discriminator(cfg: Config, teacher: Teacher) -> tuple[Discriminator | None, torch.optim.Optimizer | None]:
    a = cfg.adversarial
    if a.weight == 0:
        return None, None
    disc = Discriminator(teacher.unet, a.head_kernel).to(teacher.device)  # heads in fp32, like the LoRA
    return disc, torch.optim.AdamW(disc.parameters(), lr=a.learning_rate, betas=(a.beta1, a.beta2),
                                   weight_decay=a.weight_decay)


def _resolve(cfg: Config, resume: str | None, accelerator: Accelerator) -> Path | None:
    """The checkpoint to resume from (None: start fresh); a broken newest one is skipped with one printed line."""
    with warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always", CheckpointWarning)
        checkpoint = resolve_resume(Path(cfg.train.output_dir) / "checkpoints", resume)
    for warning in skipped:
        accelerator.print(f"warning: {warning.message}")
    return checkpoint


def _load(checkpoint: Path, cfg: Config, teacher: Teacher, optimizer: torch.optim.Optimizer, others: dict,
          scheduler, ema: EMA | None, disc) -> tuple[int, tuple, int]:
    """The checkpoint into the LoRA, optimizers, schedule, EMA and heads; returns (step, data position, non-finite
    count)."""
    lora, state = load_checkpoint(checkpoint, optimizer, others)
    shadow = [lora.pop(k) for k in state["ema_keys"]]  # EMA copies ride along in the same file
    heads = {k.removeprefix(DISC_PREFIX): lora.pop(k) for k in list(lora) if k.startswith(DISC_PREFIX)}
    if disc is not None:
        disc.load_state_dict(heads)  # the reference loses the heads on resume; we keep them
    load_lora_state_dict(teacher.unet, lora)
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        ema.load_state_dict({"decay": cfg.distill.ema_decay, "shadow": shadow})
    return state["step"], tuple(state["position"]), state["nonfinite_total"]


def setup(cfg: Config, make_data: DataFactory, resume: str | None, latents: bool = False) -> Run:
    """Accelerator, teacher + LoRA, optimizer, schedule, EMA, data; restored from a checkpoint when resuming.

    latents: the batches carry precomputed VAE latents (`pcm precompute`), so no VAE is loaded unless validation
    grids need its decoder."""
    t = cfg.train
    if t.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA device; use bf16 or no on CPU")
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=t.mixed_precision)
    per_process = t.batch_size // t.gradient_accumulation_steps
    if per_process % accelerator.num_processes:
        raise ConfigError(f"train.batch_size={t.batch_size} / gradient_accumulation_steps does not split over "
                          f"{accelerator.num_processes} processes; use a multiple of {accelerator.num_processes}")
    teacher = load_teacher(cfg.teacher, accelerator.device, with_vae=not latents or t.validate_every > 0)
    if len(teacher.abar) % cfg.distill.num_solver_steps:
        raise ConfigError(f"distill.num_solver_steps={cfg.distill.num_solver_steps} must divide the teacher's "
                          f"{len(teacher.abar)} training timesteps")
    torch.manual_seed(cfg.seed)  # the LoRA A init: the same on every rank and every run
    params = attach_lora(teacher.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules, cfg.lora.layers)
    if t.gradient_checkpointing:
        teacher.unet.enable_gradient_checkpointing()
    optimizer = _optimizer(cfg, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, t))
    ema = EMA(params, cfg.distill.ema_decay) if cfg.distill.target_net == "ema" else None
    disc, disc_optimizer = _discriminator(cfg, teacher)
    others = {"disc_optimizer": disc_optimizer} if disc is not None else {}
    out = Path(t.output_dir)
    step, position, nonfinite = 0, (0, 0), 0
    checkpoint = _resolve(cfg, resume, accelerator)
    if checkpoint is not None:
        step, position, nonfinite = _load(checkpoint, cfg, teacher, optimizer, others, scheduler, ema, disc)
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    student_unet, optimizer = accelerator.prepare(teacher.unet, optimizer)
    if disc is not None:
        disc, disc_optimizer = accelerator.prepare(disc, disc_optimizer)
    accelerator.wait_for_everyone()  # every rank has read its checkpoint: the main process may now tidy the folder
    if accelerator.is_main_process:
        repair_checkpoints(out / "checkpoints")  # e.g. resumed from a finished temp folder a kill left unrenamed
    micro = per_process // accelerator.num_processes
    data = make_data(micro, accelerator.process_index, accelerator.num_processes, position)
    return Run(accelerator, teacher, student_unet, params, optimizer, scheduler, ema, data, micro, disc,
               disc_optimizer, step, position, nonfinite)


def _checkpoint(run: Run, cfg: Config) -> Path | None:
    if not run.accelerator.is_main_process:
        return None
    lora = lora_state_dict(run.teacher.unet)
    ema_keys = []
    if run.ema is not None:
        names = [n for n, p in run.teacher.unet.named_parameters() if "lora_" in n]
        ema_keys = [f"ema.{n}" for n in names]
        lora.update({k: v.detach().cpu().contiguous() for k, v in zip(ema_keys, run.ema.shadow, strict=True)})
    others = {}
    if run.disc is not None:  # the heads ride along in the LoRA file, their optimizer in its own
        heads = run.accelerator.unwrap_model(run.disc).state_dict()
        lora.update({DISC_PREFIX + k: v.detach().cpu().contiguous() for k, v in heads.items()})
        others["disc_optimizer"] = run.disc_optimizer
    extra = {"position": list(run.position), "scheduler": run.scheduler.state_dict(), "ema_keys": ema_keys,
             "nonfinite_total": run.nonfinite_total, "config": config_to_dict(cfg)}
    return save_checkpoint(Path(cfg.train.output_dir) / "checkpoints", run.step, lora, run.optimizer, extra,
                           cfg.train.keep_checkpoints, others)


def _phase(run: Run, cfg: Config) -> str:
    """What this step updates: 'joint' (student and heads), or in the alternate schedule 'g' then 'd' in turn."""
    if run.disc is None:
        return "g"
    if cfg.adversarial.schedule == "joint":
        return "joint"
    return "g" if run.step % 2 == 0 else "d"


def _micro_losses(run: Run, cfg: Config, batch: dict, k: int) -> dict[str, torch.Tensor]:
    """Losses of one micro-batch: encode images and prompts, then the method's step (docs/method.md §5).

    'total' is what this step back-propagates: the consistency loss (+ weight x the generator's hinge loss)
    for the student, + the discriminator's hinge loss for the heads; the two never share a gradient."""
    teacher, acc = run.teacher, run.accelerator
    if "latent" in batch:  # precomputed: posterior mean x scaling factor, stored fp16
        x_0 = batch["latent"].to(acc.device).float()
    else:
        x_0 = teacher.encode_images(batch["pixels"], mean=True)  # images (B, 3, H, W) or clips (B, F, 3, H, W)
    cond = teacher.encode_prompts(batch["caption"], batch["original_size"], batch["crop_top_left"],
                                  cfg.data.resolution)
    uncond = teacher.uncond(len(x_0), like=cond)
    world, m = acc.num_processes, run.micro_batch
    first = (run.step * cfg.train.gradient_accumulation_steps + k) * world * m + acc.process_index * m
    ids = torch.arange(first, first + len(x_0))  # global sample ids: the key of every random draw

    phase = _phase(run, cfg)

    def student(x_t, t, c):
        with torch.no_grad() if phase == "d" else contextlib.nullcontext():
            return teacher.eps_fn(x_t, t, c, unet=run.student_unet)

    def disc(x_r, r, c, train_heads):
        # gradients reach the heads only through the prepared (DDP) module; the G pass treats them as constants
        module = run.disc if train_heads else acc.unwrap_model(run.disc)
        return module(x_r, r, c, train_heads=train_heads)

    def frozen_teacher(x_t, t, c):
        with adapters_off(teacher.unet):
            return teacher.eps_fn(x_t, t, c)

    grid = SolverGrid(len(teacher.abar), cfg.distill.num_solver_steps, cfg.distill.num_phases)
    with acc.autocast():
        kwargs = {"disc": disc, "disc_terms": phase} if run.disc is not None else {}
        out = method_loss(cfg.distill.method)(student, frozen_teacher, target_net_for(student, run.ema),
                                              Batch(x_0, cond, uncond, ids), grid, teacher.abar, cfg.distill,
                                              cfg.seed, run.step, **kwargs)
    g_term = cfg.adversarial.weight * out["g_loss"] if "g_loss" in out else 0.0
    d_term = out.get("d_loss", 0.0)  # the alternate schedule's G steps compute no D loss, D steps no G loss
    out["total"] = {"g": out["loss"] + g_term, "d": d_term, "joint": out["loss"] + g_term + d_term}[phase]
    return out


@contextlib.contextmanager
def _sigterm_flag():
    """A flag set by SIGTERM while the block runs (the previous handler is restored afterwards)."""
    flag = {"stop": False}

    def handler(signum, frame):
        flag["stop"] = True  # finish the step, checkpoint, then stop

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _step(run: Run, cfg: Config, batches, stop_requested: bool) -> tuple[dict[str, torch.Tensor], bool, bool]:
    """One optimizer step over gradient_accumulation_steps micro-batches: (mean losses, finite on every rank, stop
    requested on any rank). One host sync per step: every rank must agree whether to apply the update (or DDP's
    next all-reduce would wait forever) and whether to stop, so both flags travel in one gather after backward."""
    acc, A, phase = run.accelerator, cfg.train.gradient_accumulation_steps, _phase(run, cfg)
    losses, nonfinite = [], torch.zeros((), device=acc.device)
    for k in range(A):
        batch = next(batches)
        run.position = tuple(run.data.next_position(tuple(batch["position"])))
        sync = contextlib.nullcontext() if k == A - 1 else acc.no_sync(run.student_unet)
        with sync:
            out = _micro_losses(run, cfg, batch, k)
            acc.backward(out["total"] / A)  # also when not finite: the gradients are then dropped, not applied
        nonfinite = nonfinite + (~torch.isfinite(out["total"].detach())).float()
        losses.append({key: out[key].detach().float() for key in ("loss", "g_loss", "d_loss") if key in out})
    flags = torch.stack([nonfinite, torch.tensor(float(stop_requested), device=acc.device)])
    any_nonfinite, stop = (bool(v > 0) for v in acc.gather(flags.reshape(1, 2)).amax(dim=0).tolist())
    finite = not any_nonfinite
    if finite and phase != "d":
        if cfg.train.max_grad_norm > 0:
            acc.clip_grad_norm_(run.params, cfg.train.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        if run.ema is not None:
            run.ema.update()
    if finite and phase != "g":
        run.disc_optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.disc_optimizer is not None:
        run.disc_optimizer.zero_grad(set_to_none=True)
    return {key: torch.stack([m[key] for m in losses]).mean() for key in losses[0]}, finite, stop


def metadata(cfg: Config, teacher: Teacher) -> dict:
    """What a user needs to sample the exported LoRA as trained (also stored in the safetensors header)."""
    d = cfg.distill
    grid = SolverGrid(len(teacher.abar), d.num_solver_steps, d.num_phases)
    return {
        "method": d.method, "family": cfg.teacher.family, "base_model": cfg.teacher.model,
        "num_solver_steps": d.num_solver_steps, "num_phases": d.num_phases, "edges": grid.edges.tolist(),
        "sampling_timesteps": pcm_timesteps(grid, d.num_phases), "guidance": d.guidance,
        "w_min": d.w_min, "w_max": d.w_max, "recommended_steps": d.num_phases,
        "recommended_guidance_scale": 1.0 if d.guidance == "small_cfg" else 5.0,
        "recommended_scheduler": "TCDScheduler with these sampling_timesteps (gamma 0 = deterministic PCM)"
        if d.method == "pcm" else "LCMScheduler", "resolution": cfg.data.resolution,
        "lcm_sigma_data": d.lcm_sigma_data, "lcm_timestep_scaling": d.lcm_timestep_scaling,
        **({"motion_adapter": cfg.teacher.motion_adapter, "frames": cfg.data.frames, "lora_layers": cfg.lora.layers}
           if teacher.is_video else {}),
    }


def distill(cfg: Config, make_data: DataFactory, resume: str | None = None, sink: Sink | None = None,
            progress: bool = True, latents: bool = False) -> dict:
    """Runs (or resumes) distillation to cfg.train.max_steps; exports the LoRA; returns a summary."""
    run = setup(cfg, make_data, resume, latents)
    with _sigterm_flag() as flag:
        _train(run, cfg, flag, sink, progress)
    return _finish(run, cfg)


def _train(run: Run, cfg: Config, flag: dict, sink: Sink | None, progress: bool) -> None:
    """The loop: steps, logging, validation grids, checkpoints; raises Preempted / NonFiniteLoss."""
    acc, t, out = run.accelerator, cfg.train, Path(cfg.train.output_dir)
    # metrics.jsonl always; `sink` (the MLflow tracker, a test's probe) in addition
    sink = MultiSink(JsonlSink(out / "metrics.jsonl"), *([sink] if sink else [])) if acc.is_main_process else None
    batches = iter(run.data)
    in_a_row, sums, logged, tick = 0, {}, 0, time.perf_counter()
    bar = tqdm(total=t.max_steps, initial=run.step, desc=f"distill {cfg.distill.method} M={cfg.distill.num_phases}",
               disable=not (progress and acc.is_main_process))
    while run.step < t.max_steps:
        losses, finite, stop = _step(run, cfg, batches, flag["stop"])
        run.step += 1
        bar.update()
        if not finite:
            run.nonfinite_total += 1
            in_a_row += 1
            if in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise NonFiniteLoss(f"the loss was not finite for {in_a_row} steps in a row, the last at step "
                                    f"{run.step}; lower train.learning_rate or use train.mixed_precision=no")
        else:
            in_a_row, logged = 0, logged + 1
            for key, value in losses.items():  # summed on the device; read (a host sync) every log_every steps
                total, count = sums.get(key, (0.0, 0))
                sums[key] = (total + value, count + 1)  # alternate: g_loss and d_loss come on different steps
        if run.step % t.log_every == 0 and sink is not None and logged:
            rate = t.log_every / (time.perf_counter() - tick)
            record = {**{k: float(v) / n for k, (v, n) in sums.items()}, "lr": run.scheduler.get_last_lr()[0],
                      "it_per_s": rate, "nonfinite_steps": float(run.nonfinite_total)}
            sink.log(run.step, record)
            bar.set_postfix(loss=f"{record['loss']:.4g}", it_s=f"{rate:.2f}")
            sums, logged, tick = {}, 0, time.perf_counter()
        if t.validate_every and run.step % t.validate_every == 0 and acc.is_main_process:
            write_validation_grid(run.teacher, cfg, run.step, out)
        if stop or run.step % t.checkpoint_every == 0 or run.step == t.max_steps:
            _checkpoint(run, cfg)
            acc.wait_for_everyone()
        if stop:
            raise Preempted(f"SIGTERM at step {run.step}: checkpoint saved in {out / 'checkpoints'}; "
                            "rerun with --resume latest")
    bar.close()


def _finish(run: Run, cfg: Config) -> dict:
    """Exports the LoRA with its metadata and the final validation grid (main process); returns a summary."""
    acc, t, out = run.accelerator, cfg.train, Path(cfg.train.output_dir)
    summary = {"steps": run.step, "nonfinite_steps": run.nonfinite_total, "output_dir": str(out)}
    if acc.is_main_process:
        files = export_lora(run.teacher.unet, cfg.teacher.family, out / "lora", metadata(cfg, run.teacher))
        if t.validate_every:
            grid = out / "samples" / f"step-{run.step:06d}.png"
            summary["validation_grid"] = str(grid if grid.exists() else write_validation_grid(run.teacher, cfg,
                                                                                                run.step, out))
        summary["lora"] = str(files["diffusers"])
    acc.wait_for_everyone()
    return summary
