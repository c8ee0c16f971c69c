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
from pcm.launch import Preempted  # raised here on SIGTERM; defined with the launcher, which needs no torch
from pcm.math import SolverGrid
from pcm.models.card import ModelCard, card_of_run
from pcm.models.discriminator import Discriminator
from pcm.models.families import Teacher, load_teacher
from pcm.models.lora import adapters_off, attach_lora, export_lora, load_lora_state_dict, lora_state_dict
from pcm.train.checkpoint import CheckpointWarning, load_checkpoint, repair_checkpoints, resolve_resume, save_checkpoint
from pcm.train.loop import Optimization, optimization, target_net_for, train_step
from pcm.train.optim import adamw
from pcm.train.sink import JsonlSink, MultiSink, Sink
from pcm.train.step import Batch, Nets, SolverLoss, make_loss
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


class NonFiniteLoss(RuntimeError):
    """Too many consecutive steps with a non-finite loss."""


@dataclass
class Run:
    """What the loop works with, built once by setup()."""

    accelerator: Accelerator
    teacher: Teacher
    student_backbone: torch.nn.Module  # the UNet as prepared by accelerate (DDP-wrapped when distributed)
    opt: Optimization
    loss: SolverLoss  # bound to the run's solver grid, schedule, distill config and seed
    card: ModelCard  # what the exported LoRA is: the same grid's edges
    data: BatchSource
    micro_batch: int
    disc: torch.nn.Module | None = None  # the discriminator (heads trainable) as prepared by accelerate
    step: int = 0
    position: tuple[int, int] = (0, 0)  # the next batch (epoch, index) of this process's data
    nonfinite_total: int = 0


def _discriminator(cfg: Config, teacher: Teacher) -> tuple[Discriminator | None, torch.optim.Optimizer | None]:
    a = cfg.adversarial
    if a.weight == 0:
        return None, None
    disc = Discriminator(teacher.backbone, a.head_kernel).to(teacher.device)  # heads in fp32, like the LoRA
    return disc, adamw(disc.parameters(), lr=a.learning_rate, betas=(a.beta1, a.beta2), weight_decay=a.weight_decay)


def _resolve(cfg: Config, resume: str | None, accelerator: Accelerator) -> Path | None:
    """The checkpoint to resume from (None: start fresh); a broken newest one is skipped with one printed line."""
    with warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always", CheckpointWarning)
        checkpoint = resolve_resume(Path(cfg.train.output_dir) / "checkpoints", resume)
    for warning in skipped:
        accelerator.print(f"warning: {warning.message}")
    return checkpoint


def _load(checkpoint: Path, cfg: Config, teacher: Teacher, opt: Optimization, disc) -> tuple[int, tuple, int]:
    """The checkpoint into the LoRA, optimizers, schedule, EMA and heads; returns (step, data position, non-finite
    count)."""
    others = {"disc_optimizer": opt.disc_optimizer} if disc is not None else {}
    lora, state = load_checkpoint(checkpoint, opt.optimizer, others)
    shadow = [lora.pop(k) for k in state["ema_keys"]]  # EMA copies ride along in the same file
    heads = {k.removeprefix(DISC_PREFIX): lora.pop(k) for k in list(lora) if k.startswith(DISC_PREFIX)}
    if disc is not None:
        disc.load_state_dict(heads)  # the reference loses the heads on resume; we keep them
    load_lora_state_dict(teacher.backbone, lora)
    opt.scheduler.load_state_dict(state["scheduler"])
    if opt.ema is not None:
        opt.ema.load_state_dict({"decay": cfg.distill.ema_decay, "shadow": shadow})
    return state["step"], tuple(state["position"]), state["nonfinite_total"]


@dataclass(frozen=True)
class Precomputed:
    """What the batches carry from `pcm precompute` (pcm.stages reads it from the folder), so setup can leave the
    VAE and the text encoders unloaded unless validation grids need them (the decoder, the validation prompts)."""

    latents: bool = True  # `latent`: VAE posterior mean x scaling factor
    text: bool = False  # `text_hidden` (+ sdxl's `text_pooled`): Teacher.text_states of the captions
    # the encoded "" as Teacher.text_states gives it: states (1, L, D) and sd3's pooled (1, P) (sd15, animatediff:
    # None); sdxl's uncond is zeros
    empty_prompt: tuple[torch.Tensor, torch.Tensor | None] | None = None


def setup(cfg: Config, make_data: DataFactory, resume: str | None, precomputed: Precomputed | None = None) -> Run:
    """Accelerator, teacher + LoRA, optimizer, schedule, EMA, data; restored from a checkpoint when resuming.

    precomputed: what the batches carry from `pcm precompute` (None: images and captions)."""
    t = cfg.train
    if t.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA device; use bf16 or no on CPU")
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=t.mixed_precision)
    per_process = t.batch_size // t.gradient_accumulation_steps
    if per_process % accelerator.num_processes:
        raise ConfigError(f"train.batch_size={t.batch_size} / gradient_accumulation_steps does not split over "
                          f"{accelerator.num_processes} processes; use a multiple of {accelerator.num_processes}")
    stored = precomputed or Precomputed(latents=False)
    teacher = load_teacher(cfg.teacher, accelerator.device, with_vae=not stored.latents or t.validate_every > 0,
                           with_text=not stored.text or t.validate_every > 0, resolution=cfg.data.resolution)
    if stored.empty_prompt is not None:  # caption dropout's uncond, as stored beside the text (encoders or not)
        teacher.set_empty_prompt(*stored.empty_prompt)
    if len(teacher.schedule) % cfg.distill.num_solver_steps:
        raise ConfigError(f"distill.num_solver_steps={cfg.distill.num_solver_steps} must divide the teacher's "
                          f"{len(teacher.schedule)} training timesteps")
    grid = SolverGrid(len(teacher.schedule), cfg.distill.num_solver_steps, cfg.distill.num_phases)  # once per run
    torch.manual_seed(cfg.seed)  # the LoRA A init: the same on every rank and every run
    params = attach_lora(teacher.backbone, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules, cfg.lora.layers)
    if t.gradient_checkpointing:
        teacher.backbone.enable_gradient_checkpointing()
    if t.channels_last and not teacher.is_flow:  # the UNet's convolutions, LoRA's included, in NHWC layout
        teacher.backbone.to(memory_format=torch.channels_last)
    disc, disc_optimizer = _discriminator(cfg, teacher)
    opt = optimization(cfg, params, disc_optimizer)
    out = Path(t.output_dir)
    step, position, nonfinite = 0, (0, 0), 0
    checkpoint = _resolve(cfg, resume, accelerator)
    if checkpoint is not None:
        step, position, nonfinite = _load(checkpoint, cfg, teacher, opt, disc)
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    student_backbone, opt.optimizer = accelerator.prepare(teacher.backbone, opt.optimizer)
    if disc is not None:
        disc, opt.disc_optimizer = accelerator.prepare(disc, opt.disc_optimizer)
    accelerator.wait_for_everyone()  # every rank has read its checkpoint: the main process may now tidy the folder
    if accelerator.is_main_process:
        repair_checkpoints(out / "checkpoints")  # e.g. resumed from a finished temp folder a kill left unrenamed
    micro = per_process // accelerator.num_processes
    return Run(accelerator=accelerator, teacher=teacher, student_backbone=student_backbone, opt=opt,
               loss=make_loss(cfg.distill, grid, teacher.schedule, cfg.seed, cfg.adversarial.weight,
                              teacher.guidance_mode),
               card=card_of_run(cfg, grid, teacher.is_video, teacher.guidance_mode),
               data=make_data(micro, accelerator.process_index, accelerator.num_processes, position),
               micro_batch=micro, disc=disc, step=step, position=position, nonfinite_total=nonfinite)


def _checkpoint(run: Run, cfg: Config) -> Path | None:
    if not run.accelerator.is_main_process:
        return None
    lora = lora_state_dict(run.teacher.backbone)
    ema_keys = []
    if run.opt.ema is not None:
        names = [n for n, p in run.teacher.backbone.named_parameters() if "lora_" in n]
        ema_keys = [f"ema.{n}" for n in names]
        lora.update({k: v.detach().cpu().contiguous() for k, v in zip(ema_keys, run.opt.ema.shadow, strict=True)})
    others = {}
    if run.disc is not None:  # the heads ride along in the LoRA file, their optimizer in its own
        heads = run.accelerator.unwrap_model(run.disc).state_dict()
        lora.update({DISC_PREFIX + k: v.detach().cpu().contiguous() for k, v in heads.items()})
        others["disc_optimizer"] = run.opt.disc_optimizer
    extra = {"position": list(run.position), "scheduler": run.opt.scheduler.state_dict(), "ema_keys": ema_keys,
             "nonfinite_total": run.nonfinite_total, "config": config_to_dict(cfg)}
    return save_checkpoint(Path(cfg.train.output_dir) / "checkpoints", run.step, lora, run.opt.optimizer, extra,
                           cfg.train.keep_checkpoints, others)


def _turn(run: Run, cfg: Config) -> str:
    """What this step updates: 'joint' (student and heads), or in the alternate schedule 'g' then 'd' in turn."""
    if run.disc is None:
        return "g"
    if cfg.adversarial.schedule == "joint":
        return "joint"
    return "g" if run.step % 2 == 0 else "d"


def _encode(run: Run, cfg: Config, batch: dict, k: int) -> Batch:
    """Micro-batch k of this step as latents, conditions and global sample ids (the key of every random draw)."""
    teacher, acc = run.teacher, run.accelerator
    if "latent" in batch:  # precomputed: posterior mean x scaling factor, stored fp16
        x_0 = batch["latent"].to(acc.device).float()
    else:
        x_0 = teacher.encode_images(batch["pixels"], mean=True)  # images (B, 3, H, W) or clips (B, F, 3, H, W)
    if "text_hidden" in batch:  # precomputed: Teacher.text_states, stored fp16; time ids from the sizes as on the fly
        states = (batch["text_hidden"], batch.get("text_pooled"))
    else:
        states = teacher.text_states(batch["caption"])
    cond = teacher.condition(*states, batch["original_size"], batch["crop_top_left"], cfg.data.resolution)
    world, m = acc.num_processes, run.micro_batch
    first = (run.step * cfg.train.gradient_accumulation_steps + k) * world * m + acc.process_index * m
    return Batch(x_0, cond, teacher.uncond(len(x_0), like=cond), torch.arange(first, first + len(x_0)))


def _nets(run: Run, turn: str) -> Nets:
    """The UNet as student (adapters on, through DDP), as frozen teacher (adapters off) and as target net."""
    teacher, acc = run.teacher, run.accelerator

    def student(x_t, t, c):
        with torch.no_grad() if turn == "d" else contextlib.nullcontext():
            return teacher.eps_fn(x_t, t, c, backbone=run.student_backbone)

    def frozen_teacher(x_t, t, c):
        with adapters_off(teacher.backbone):
            return teacher.eps_fn(x_t, t, c)

    def disc(x_r, r, c, train_heads, fake=None):
        # gradients reach the heads only through the prepared (DDP) module; the G pass treats them as constants
        module = run.disc if train_heads else acc.unwrap_model(run.disc)
        return module(x_r, r, c, train_heads=train_heads, fake=fake)

    return Nets(student, frozen_teacher, target_net_for(student, run.opt.ema), disc if run.disc is not None else None)


def _micro_losses(run: Run, cfg: Config, batch: dict, k: int) -> dict[str, torch.Tensor]:
    """Losses of micro-batch k (docs/method.md §5); 'total' is what this turn back-propagates: the consistency loss
    (+ weight x the generator's hinge loss) for the student, + the discriminator's hinge loss for the heads; the two
    never share a gradient."""
    turn = _turn(run, cfg)
    with run.accelerator.autocast():
        return run.loss(_nets(run, turn), _encode(run, cfg, batch, k), run.step, turn)


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


def distill(cfg: Config, make_data: DataFactory, resume: str | None = None, sink: Sink | None = None,
            progress: bool = True, precomputed: Precomputed | None = None) -> dict:
    """Runs (or resumes) distillation to cfg.train.max_steps; exports the LoRA; returns a summary.

    precomputed: what the batches carry from `pcm precompute` (None: images and captions)."""
    run = setup(cfg, make_data, resume, precomputed)
    with _sigterm_flag() as flag:
        _train(run, cfg, flag, sink, progress)
    return _finish(run, cfg)


class _Averages:
    """Losses summed on the device over the steps since the last log line; read (one host sync) when logged."""

    def __init__(self):
        self.sums, self.steps, self.tick = {}, 0, time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        for key, value in losses.items():  # alternate schedule: g_loss and d_loss come on different steps
            total, count = self.sums.get(key, (0.0, 0))
            self.sums[key] = (total + value, count + 1)

    def record(self, run: Run, log_every: int) -> dict[str, float]:
        rate = log_every / (time.perf_counter() - self.tick)
        record = {**{k: float(v) / n for k, (v, n) in self.sums.items()}, "it_per_s": rate,
                  "lr": run.opt.scheduler.get_last_lr()[0], "nonfinite_steps": float(run.nonfinite_total)}
        self.__init__()
        return record


def _train(run: Run, cfg: Config, flag: dict, sink: Sink | None, progress: bool) -> None:
    """The loop: steps, logging, validation grids, checkpoints; raises Preempted / NonFiniteLoss."""
    acc, t, out = run.accelerator, cfg.train, Path(cfg.train.output_dir)
    main = acc.is_main_process
    # metrics.jsonl always; `sink` (the MLflow tracker, a test's probe) in addition
    sink = MultiSink(JsonlSink(out / "metrics.jsonl"), *([sink] if sink else [])) if main else None
    batches, averages, in_a_row = iter(run.data), _Averages(), 0
    bar = tqdm(total=t.max_steps, initial=run.step, desc=f"distill {run.card.method} M={run.card.num_phases}",
               disable=not (progress and main))

    def micro_losses(k: int) -> dict[str, torch.Tensor]:
        batch = next(batches)
        run.position = tuple(run.data.next_position(tuple(batch["position"])))
        return _micro_losses(run, cfg, batch, k)

    while run.step < t.max_steps:
        result = train_step(run.opt, micro_losses, t, _turn(run, cfg), acc, run.student_backbone, flag["stop"])
        run.step += 1
        bar.update()
        in_a_row = 0 if result.finite else in_a_row + 1
        if result.finite:
            averages.add(result.losses)
        else:
            run.nonfinite_total += 1
        if in_a_row >= MAX_NONFINITE_IN_A_ROW:
            raise NonFiniteLoss(f"the loss was not finite for {in_a_row} steps in a row, the last at step "
                                f"{run.step}; lower train.learning_rate or use train.mixed_precision=no")
        if run.step % t.log_every == 0 and sink is not None and averages.steps:
            record = averages.record(run, t.log_every)
            sink.log(run.step, record)
            bar.set_postfix(loss=f"{record['loss']:.4g}", it_s=f"{record['it_per_s']:.2f}")
        if t.validate_every and run.step % t.validate_every == 0 and main:
            write_validation_grid(run.teacher, run.card, cfg.validation, run.step, out)
        if result.stop or run.step % t.checkpoint_every == 0 or run.step == t.max_steps:
            _checkpoint(run, cfg)
            acc.wait_for_everyone()
        if result.stop:
            raise Preempted(f"SIGTERM at step {run.step}: checkpoint saved in {out / 'checkpoints'}; "
                            "rerun with --resume latest")
    bar.close()


def _finish(run: Run, cfg: Config) -> dict:
    """Exports the LoRA with its card and the final validation grid (main process); returns a summary."""
    acc, t, out = run.accelerator, cfg.train, Path(cfg.train.output_dir)
    summary = {"steps": run.step, "nonfinite_steps": run.nonfinite_total, "output_dir": str(out)}
    if acc.is_main_process:
        files = export_lora(run.teacher.backbone, out / "lora", run.card)
        if t.validate_every:
            grid = out / "samples" / f"step-{run.step:06d}.png"
            if not grid.exists():
                grid = write_validation_grid(run.teacher, run.card, cfg.validation, run.step, out)
            summary["validation_grid"] = str(grid)
        summary["lora"] = str(files["diffusers"])
    acc.wait_for_everyone()
    return summary
