"""The typed, strict config tree, mirroring params.yaml one to one.

Load with `load_config(path, overrides)`. Unknown keys, wrong types and broken invariants raise
`ConfigError` with the dotted key and how to fix it. Every field carries its unit or meaning. The sections of the
data, demo world and evaluation live in `pcm.config.world`; all are importable from here.
"""

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from pcm.config.errors import ConfigError, parse_yaml, require
from pcm.config.mlops import DistillRun, PipelineConfig, RegisterConfig, TrackingConfig
from pcm.config.world import DataConfig, DemoConfig, DemoTeacherConfig, EvalConfig


@dataclass(frozen=True)
class ScheduleConfig:
    """Teacher noise schedule (diffusers scheduler config keys). SD teachers read theirs from the model dir."""

    num_train_timesteps: int = 1000  # T: number of discrete training timesteps
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = 0.00085  # beta at t = 0
    beta_end: float = 0.012  # beta at t = T - 1
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"  # what the teacher network outputs

    def __post_init__(self):
        require(self.num_train_timesteps >= 2, "schedule.num_train_timesteps must be >= 2 (SD uses 1000)")
        require(0 < self.beta_start < self.beta_end < 1,
                 f"schedule.beta_start={self.beta_start}, schedule.beta_end={self.beta_end}: need "
                 "0 < beta_start < beta_end < 1 (SD: 0.00085 and 0.012)")


@dataclass(frozen=True)
class AdversarialConfig:
    """The adversarial consistency loss (docs/method.md §6): a discriminator on the teacher's encoder features."""

    weight: float = 0.0  # lambda of the generator's hinge loss; 0 = off (the reference runs use 0.1)
    schedule: Literal["joint", "alternate"] = "joint"  # joint: D and G updated every step (no teacher pass is
    #   spent without a student update); alternate: the reference's D-only and G-only steps in turn
    head_kernel: Literal[1, 3] = 1  # conv kernel of the heads: 1 as the SDXL reference, 3 as the SD1.5 reference
    learning_rate: float = 1e-5  # AdamW of the heads
    beta1: float = 0.0
    beta2: float = 0.999
    weight_decay: float = 1e-3

    def __post_init__(self):
        require(self.weight >= 0, f"adversarial.weight={self.weight}: must be >= 0 (0 turns the loss off)")
        require(self.learning_rate > 0, f"adversarial.learning_rate={self.learning_rate}: must be > 0")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
                 f"adversarial.beta1={self.beta1}, beta2={self.beta2}: each must be in [0, 1)")


@dataclass(frozen=True)
class DistillConfig:
    """The consistency distillation method (docs/method.md §5)."""

    method: Literal["pcm", "lcm"] = "pcm"  # phased consistency (PCM) or the LCM baseline
    num_solver_steps: int = 50  # N: teacher ODE solver steps over [0, T); must divide T
    num_phases: int = 4  # M: sub-trajectories, 1 <= M <= N; the native number of sampling steps
    guidance: Literal["small_cfg", "normal_cfg"] = "small_cfg"  # CFG inside the solver, or classic CFG kept
    w_min: float = 4.0  # solver guidance w ~ U[w_min, w_max] (LCM convention: CFG scale 1 + w)
    w_max: float = 5.0
    caption_dropout: float = 0.0  # fraction of conditions replaced by the empty one (normal_cfg needs > 0)
    loss: Literal["huber", "l2"] = "huber"  # consistency distance d(f, y)
    huber_c: float = 0.001  # pseudo-Huber c
    target_net: Literal["student", "ema"] = "student"  # student under no_grad (reference) or an EMA of it
    ema_decay: float = 0.95  # EMA decay per step when target_net = ema
    lcm_sigma_data: float = 0.5  # LCM boundary scalings: sigma_data
    lcm_timestep_scaling: float = 10.0  # LCM boundary scalings: timestep multiplier

    def __post_init__(self):
        N, M = self.num_solver_steps, self.num_phases
        require(N >= 1, f"distill.num_solver_steps={N}: must be >= 1 (reference: 50 for SD1.5, 40 for SDXL)")
        require(1 <= M <= N, f"distill.num_phases={M}: must satisfy 1 <= M <= N = distill.num_solver_steps={N}")
        require(self.method != "lcm" or M == 1,
                 f"distill.num_phases={M} with distill.method=lcm: LCM has one phase; set distill.num_phases=1")
        require(0 <= self.w_min <= self.w_max,
                 f"distill.w_min={self.w_min}, distill.w_max={self.w_max}: need 0 <= w_min <= w_max")
        require(0 <= self.caption_dropout < 1, f"distill.caption_dropout={self.caption_dropout}: must be in [0, 1)")
        require(self.guidance != "normal_cfg" or self.caption_dropout > 0,
                 "distill.guidance=normal_cfg needs distill.caption_dropout > 0 (e.g. 0.1) so the student "
                 "keeps an unconditional prediction for classic CFG")
        require(self.huber_c > 0, f"distill.huber_c={self.huber_c}: must be > 0 (reference: 0.001)")
        require(0 <= self.ema_decay < 1, f"distill.ema_decay={self.ema_decay}: must be in [0, 1)")
        require(self.lcm_sigma_data > 0, f"distill.lcm_sigma_data={self.lcm_sigma_data}: must be > 0")


@dataclass(frozen=True)
class TrainConfig:
    """Optimization of the student (LoRA) parameters."""

    batch_size: int = 256  # samples per optimizer step, summed over processes
    learning_rate: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    max_steps: int = 2000  # optimizer steps
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warmup: constant, or cosine decay to 0
    lr_warmup_steps: int = 0  # linear warmup from 0 over this many steps
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step on each process
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # autocast of the UNet passes; LoRA weights stay fp32
    gradient_checkpointing: bool = False  # recompute UNet activations in backward (memory for compute)
    channels_last: bool = True  # UNet weights in NHWC layout, which oneDNN's and cuDNN's convolutions prefer (8-10 %
    #   off a CPU step here); the transformer families (sd3, flux) keep theirs
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"  # adamw8bit needs bitsandbytes (CUDA)
    max_grad_norm: float = 1.0  # gradient clipping (0 disables)
    output_dir: str = "models/pcm"  # checkpoints/, lora/, samples/ and metrics.jsonl of `pcm distill`
    checkpoint_every: int = 100  # steps between checkpoints (also written at the end and on SIGTERM)
    keep_checkpoints: int = 3  # newest checkpoints kept
    validate_every: int = 100  # steps between validation grids (0 disables)
    log_every: int = 10  # steps between metric records
    num_workers: int = 0  # DataLoader worker processes per training process
    shuffle_buffer: int = 1000  # samples mixed by the loader's shuffle buffer
    data_split: Literal["shards", "samples"] = "shards"  # ranks read disjoint shards, or slices of each global
    #   batch (every rank reads all data; results then do not depend on the number of processes)

    def __post_init__(self):
        require(self.batch_size >= 1, f"train.batch_size={self.batch_size}: must be >= 1")
        require(self.learning_rate > 0, f"train.learning_rate={self.learning_rate}: must be > 0")
        require(self.weight_decay >= 0, f"train.weight_decay={self.weight_decay}: must be >= 0")
        require(self.max_steps >= 1, f"train.max_steps={self.max_steps}: must be >= 1")
        require(self.gradient_accumulation_steps >= 1,
                 f"train.gradient_accumulation_steps={self.gradient_accumulation_steps}: must be >= 1")
        require(self.max_grad_norm >= 0, f"train.max_grad_norm={self.max_grad_norm}: must be >= 0")
        require(self.checkpoint_every >= 1 and self.keep_checkpoints >= 1,
                 "train.checkpoint_every and train.keep_checkpoints must be >= 1")
        require(self.validate_every >= 0 and self.log_every >= 1,
                 "train.validate_every must be >= 0 and train.log_every >= 1")
        require(0 <= self.lr_warmup_steps < self.max_steps,
                 f"train.lr_warmup_steps={self.lr_warmup_steps}: must be in [0, train.max_steps={self.max_steps})")


@dataclass(frozen=True)
class SampleConfig:
    """Defaults of sampling with the distilled model (`pcm sample`, and the registered version's inputs). Which value
    runs: the flag (or the input column) when given, else this section's when set, else the model's own: the LoRA
    card's recommended steps and CFG and gamma 0 (a registered version: the sample.* it was registered with first)."""

    num_steps: int | None = None  # K: sampling steps; null = the LoRA's recommended, its M (K = M visits exactly the
    #   trained edges)
    gamma: float | None = None  # stochasticity (TCD's rule): 0 deterministic, 1 fully re-noised; null = 0
    guidance_scale: float | None = None  # inference CFG, 1 disables it (small_cfg models: 1-2; normal_cfg: 2-9);
    #   null = the LoRA's recommended

    def __post_init__(self):
        require(self.num_steps is None or self.num_steps >= 1, f"sample.num_steps={self.num_steps}: must be >= 1")
        require(self.gamma is None or 0 <= self.gamma <= 1, f"sample.gamma={self.gamma}: must be in [0, 1]")
        require(self.guidance_scale is None or self.guidance_scale >= 0,
                f"sample.guidance_scale={self.guidance_scale}: must be >= 0")


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
# flux's when lora.target_modules is left at LORA_TARGETS: diffusers' train_dreambooth_lora_flux.py default targets
FLUX_LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2")


@dataclass(frozen=True)
class LoraConfig:
    """The student: a LoRA on the teacher UNet (docs/method.md §10: SDXL reference targets, explicit alpha)."""

    rank: int = 64  # LoRA rank r
    alpha: float = 64.0  # lora_alpha: the update is scaled by alpha / r (explicit; PEFT's default is 8)
    target_modules: tuple[str, ...] = LORA_TARGETS  # module name suffixes that get adapters (flux: FLUX_LORA_TARGETS)
    # where: all = every matching module; spatial = the image layers only; motion = the AnimateDiff motion modules only
    layers: Literal["all", "spatial", "motion"] = "all"

    def __post_init__(self):
        require(self.rank >= 1, f"lora.rank={self.rank}: must be >= 1")
        require(self.alpha > 0, f"lora.alpha={self.alpha}: must be > 0")
        require(len(self.target_modules) > 0, "lora.target_modules must list at least one module name")


@dataclass(frozen=True)
class ValidationConfig:
    """Validation grids written during `pcm distill` (fixed prompts and seeds, the trained number of steps)."""

    prompts: tuple[str, ...] = ("a red circle in the center on a gray background",
                                "a blue square at the top left on a white background",
                                "a green triangle on the left on a black background")
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    guidance_scale: float = 1.0  # inference CFG of the grids (small_cfg students: 1; normal_cfg: 2-9)


FLOW_FAMILIES = ("sd3", "flux")  # rectified-flow teachers: a transformer backbone predicting the flow velocity


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher to distill: a diffusers pipeline directory or hub id (docs/method.md §9: conditioning per family)."""

    family: Literal["sd15", "sdxl", "animatediff", "sd3", "flux"] = "sd15"  # how prompts are encoded, backbone called
    model: str = "models/demo-teacher"  # local diffusers pipeline directory, or a hub id
    # animatediff: a MotionAdapter directory or hub id put into teacher.model's SD1.5 UNet; empty = teacher.model is
    # an AnimateDiff pipeline whose unet/ is already a UNetMotionModel
    motion_adapter: str = ""
    revision: str = ""  # hub revision (branch, tag or commit); empty = default
    variant: str = ""  # weight variant, e.g. fp16; empty = the default files
    vae: str = ""  # optional separate VAE directory or hub id (e.g. the fp16-fix SDXL VAE); empty = the pipeline's
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # dtype of the frozen weights
    t5: bool = True  # sd3: load the T5 encoder when the pipeline has one (false: its states are zeros, as in diffusers)
    max_sequence_length: int = 256  # sd3, flux: T5 tokens per prompt (diffusers' defaults: 256 for SD3, 512 for FLUX)

    def __post_init__(self):
        require(self.max_sequence_length >= 1,
                f"teacher.max_sequence_length={self.max_sequence_length} must be >= 1 (diffusers uses 256 for SD3)")
        require(self.t5 or self.family != "flux", "teacher.t5=false with teacher.family=flux: FLUX reads the prompt's "
                "tokens only through T5 (CLIP gives its pooled vector); set teacher.t5=true")
        require(not self.motion_adapter or self.family == "animatediff",
                f"teacher.motion_adapter={self.motion_adapter} is only read by teacher.family=animatediff "
                f"(family is {self.family}); remove it or set the family")


@dataclass(frozen=True)
class Config:
    """The whole params.yaml."""

    seed: int = 0  # randomness is a function of (seed, step, sample id)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    demo_teacher: DemoTeacherConfig = field(default_factory=DemoTeacherConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self):
        family, transformer = self.teacher.family, "UNet encoder features, not a transformer's"
        unreadable = {"animatediff": "2-D UNet features, not video", "sd3": transformer, "flux": transformer}
        require(self.adversarial.weight == 0 or family not in unreadable,
                f"adversarial.weight={self.adversarial.weight}: the discriminator reads {unreadable.get(family)}; "
                f"set adversarial.weight=0 for teacher.family={family}")
        require(family != "flux" or self.data.resolution % 16 == 0, f"data.resolution={self.data.resolution}: "
                "teacher.family=flux packs 2x2 patches of 8x VAE latents; use a multiple of 16")
        if family == "flux" and self.lora.target_modules == LORA_TARGETS:  # the UNet list = not set
            object.__setattr__(self, "lora", dataclasses.replace(self.lora, target_modules=FLUX_LORA_TARGETS))
        require(self.lora.layers == "all" or self.teacher.family == "animatediff",
                f"lora.layers={self.lora.layers} needs teacher.family=animatediff (only its UNet has motion "
                "modules); use lora.layers=all")
        require(self.adversarial.weight == 0 or self.distill.method == "pcm",
                 f"adversarial.weight={self.adversarial.weight} needs distill.method=pcm (the LCM baseline has no "
                 "phase edges to re-noise from); set adversarial.weight=0")
        T, N = self.schedule.num_train_timesteps, self.distill.num_solver_steps
        require(T % N == 0, f"distill.num_solver_steps={N} must divide schedule.num_train_timesteps={T}; "
                             f"choose one of {_divisors(T)}")
        accumulation = self.train.gradient_accumulation_steps
        require(self.train.batch_size % accumulation == 0,
                 f"train.batch_size={self.train.batch_size} must be a multiple of train.gradient_accumulation_steps="
                 f"{accumulation} (the global batch is split into micro-batches)")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _convert(value, tp, key: str):
    """value checked (int and numeric strings -> float) against the annotation tp; errors name the key."""
    if isinstance(tp, types.UnionType) and type(None) in typing.get_args(tp):  # `X | None`: null means "not set"
        (inner,) = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        return None if value is None else _convert(value, inner, key)
    if dataclasses.is_dataclass(tp):
        require(isinstance(value, dict), f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".")
    if typing.get_origin(tp) is Literal:
        allowed = typing.get_args(tp)
        require(value in allowed, f"{key}={value!r}: allowed values: {', '.join(map(str, allowed))}")
        return value
    if typing.get_origin(tp) is tuple:
        value = [value] if isinstance(value, str) else value  # one string stands for a one-element list
        require(isinstance(value, list | tuple), f"{key}: expected a list, got {value!r}")
        return tuple(_convert(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value))
    if typing.get_origin(tp) is dict:
        require(isinstance(value, dict), f"{key}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {_convert(k, key_tp, key): _convert(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float and not isinstance(value, bool) and isinstance(value, int | str):
        return _as_float(value, key)
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    require(ok, f"{key}={value!r}: expected {tp.__name__}, got {type(value).__name__}")
    return value


def _as_float(value: int | str, key: str) -> float:
    """A float field takes numbers as users type them: 5 and '5e-6' (YAML 1.1 reads 5e-6, no decimal point, as a
    string). Booleans and non-numbers stay errors; so do 'nan' and 'inf' as strings (no invariant would catch them)."""
    try:
        number = float(value)
    except (ValueError, OverflowError):
        number = math.nan
    require(math.isfinite(number), f"{key}={value!r}: expected float, got {type(value).__name__}")
    return number


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; allowed keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _apply_override(data: dict, override: str) -> None:
    key, sep, raw = override.partition("=")
    require(bool(sep) and bool(key), f"override {override!r}: expected key=value, e.g. distill.num_phases=2")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        require(isinstance(node, dict), f"override {override!r}: {part} is not a section")
    try:
        node[leaf] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({err.problem}); quote it, "
                          f"e.g. {key}='[\"a\", \"b\"]'") from err


def config_from_dict(data: dict, overrides: typing.Sequence[str] = ()) -> Config:
    """Config from a params mapping plus 'dotted.key=value' overrides (values parsed as YAML)."""
    data = _deep_copy(data or {})
    for override in overrides:
        _apply_override(data, override)
    try:
        return _build(Config, data)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err


def config_from_yaml(text: str, overrides: typing.Sequence[str] = (), tracking_uri: str = "") -> Config:
    """Config from the text of a params file (YAML, or JSON as the pipelines pass it) plus overrides (what pipeline
    components receive); a non-empty tracking_uri sets tracking.uri."""
    if text.lstrip().startswith("{"):  # JSON first: PyYAML reads JSON's 2e-06 (no decimal point) as a string
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ConfigError(f"the params text is not valid JSON: {err}") from err
    else:
        data = parse_yaml(text, "the params text") or {}
    require(isinstance(data, dict), "the params text: the top level must be a mapping")
    return config_from_dict(data, [*overrides, *([f"tracking.uri={tracking_uri}"] if tracking_uri else [])])


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Config from a params.yaml file (None: the defaults) plus overrides."""
    return config_from_dict({} if path is None else read_params(path), overrides)


def read_params(path: str | Path) -> dict:
    """The mapping of a params file, parsed strictly (duplicate keys are errors); ConfigError names the file."""
    path = Path(path)
    where = "" if path.is_absolute() else f" in {Path.cwd()}"  # a relative path: pcm may run from the wrong folder
    require(path.is_file(), f"params file {path} not found{where}; pcm commands run from the repository root, or "
                            "pass --params path/to/params.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"params file {path} is unreadable ({type(err).__name__}: {err})") from err
    data = parse_yaml(text, str(path)) or {}
    require(isinstance(data, dict), f"params file {path}: the top level must be a mapping")
    return data


def config_to_dict(config: Config) -> dict:
    """The resolved config as plain data (for YAML, checkpoints and MLflow params); tuples become lists."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return [plain(x) for x in v] if isinstance(v, list | tuple) else v

    return plain(dataclasses.asdict(config))


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def _deep_copy(data):
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    return data


__all__ = ["AdversarialConfig", "Config", "ConfigError", "DataConfig", "DemoConfig", "DemoTeacherConfig",
           "DistillConfig", "DistillRun", "EvalConfig", "FLUX_LORA_TARGETS", "LORA_TARGETS", "LoraConfig",
           "PipelineConfig", "RegisterConfig", "SampleConfig", "ScheduleConfig", "TeacherConfig", "TrackingConfig",
           "TrainConfig", "ValidationConfig", "config_from_dict", "config_from_yaml", "config_to_dict",
           "config_to_yaml", "load_config", "parse_yaml", "read_params"]
