"""The model card: what a distilled LoRA is and how it samples, one typed object from export to every reader.

Written once at export (pcm.train.distill) into the LoRA's safetensors headers (JSON under 'pcm') and, readable,
into pcm_config.json; read back by evaluation, the registry, `pcm sample`, the registered model and the Kubeflow
components as a ModelCard, never as a dict. `card_version` says which layout a file has: files written before it
existed (version 0) and before embedded_guidance_scale and the T5 settings (version 1) still load; a file from a
newer pcm is refused with what to do.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from pcm.config import Config
from pcm.math import SolverGrid

CARD_VERSION = 2  # 2: embedded_guidance_scale, t5, max_sequence_length
CONFIG_FILE = "pcm_config.json"
METHODS = ("pcm", "lcm")
LCM_STEPS = 4  # LCM's usual few-step count (its one "phase" says nothing about how many steps to take)


class LoraFileError(ValueError):
    """An exported LoRA file that is missing or unreadable: one line naming the path and what to do."""


REEXPORT = "re-export the LoRA with `pcm distill` (train.output_dir/lora) or restore the folder from its MLflow run"


@dataclass(frozen=True)
class ModelCard:
    """A distilled LoRA: its teacher, the phased ODE it was trained on, and how to sample it (docs/method.md §2, §8)."""

    method: str  # pcm | lcm
    family: str  # the teacher's family: sd15 | sdxl | animatediff | sd3 | flux (gmm: the analytic teacher)
    base_model: str  # teacher.model at distillation: a hub id or a local directory
    num_train_timesteps: int  # T
    num_solver_steps: int  # N, the teacher's solver grid
    num_phases: int  # M
    edges: tuple[int, ...]  # the trained phase edges s_0 = 0 < s_1 < ... < s_{M-1}, as timesteps
    guidance: str  # small_cfg (w inside the solver) | normal_cfg (CFG at inference)
    w_min: float  # the solver guidance range w in [w_min, w_max] the student was trained over
    w_max: float
    resolution: int  # pixels per side of the training images
    recommended_steps: int  # K that visits exactly the trained edges (PCM: M; LCM: 4)
    recommended_guidance_scale: float  # inference CFG: 1 for small_cfg (guidance is baked in), else 5; on FLUX.1-dev
    #                                    true CFG (FluxPipeline's true_cfg_scale), on top of the embedded guidance
    recommended_gamma: float = 0.0  # TCD's stochastic step; 0 = deterministic PCM
    lcm_sigma_data: float = 0.5  # LCM's boundary scalings
    lcm_timestep_scaling: float = 10.0
    frames: int = 1  # clip length of a video LoRA (1: images)
    fps: float = 8.0  # frames per second of a clip's GIF
    motion_adapter: str = ""  # AnimateDiff's motion adapter (a video LoRA on an SD1.5 base)
    lora_rank: int = 0
    lora_alpha: float = 0.0  # the update's scale is alpha / rank
    lora_layers: str = "all"  # all | spatial | motion
    # the guidance scale the student read as an input (FLUX.1-dev's `guidance`: FluxPipeline's guidance_scale, not
    # CFG); None: the base has no such input, or a card written before the field
    embedded_guidance_scale: float | None = None
    # sd3 / flux: the T5 states the student read (whether T5 was loaded, its tokens per prompt), so every sampler
    # encodes prompts as in distillation; None: a UNet family, or a card written before the fields
    t5: bool | None = None
    max_sequence_length: int | None = None
    card_version: int = CARD_VERSION

    @property
    def sampling_timesteps(self) -> list[int]:
        """The trained path T-1 -> s_{M-1} -> ... -> s_0 (M jumps, M + 1 points)."""
        return [self.num_train_timesteps - 1, *reversed(self.edges)]

    @property
    def label(self) -> str:
        """The row name in a step table: 'pcm-M<phases>' or 'lcm'."""
        return "lcm" if self.method == "lcm" else f"pcm-M{self.num_phases}"

    @property
    def is_flow(self) -> bool:
        """A rectified-flow base (sd3, flux): diffusers samples it with its pipeline's flow scheduler."""
        from pcm.models.families import FLOW_FAMILIES

        return self.family in FLOW_FAMILIES

    @property
    def flow_sigmas(self) -> list[float]:
        """The trained path's unshifted sigmas (t + 1) / T without the final 0: what a flow pipeline (`sigmas=`) shifts
        exactly as the teacher's table is shifted (FLUX: by the image size, so at `resolution`), then ends at 0."""
        return [(t + 1) / self.num_train_timesteps for t in self.sampling_timesteps[:-1]]

    @property
    def recommended_scheduler(self) -> str:
        """How diffusers samples the LoRA as trained: TCDScheduler over sampling_timesteps (or LCMScheduler) on a VP
        base; the pipeline's own flow scheduler over flow_sigmas on a flow base."""
        if self.is_flow:
            if self.method == "lcm":
                return ("no diffusers flow scheduler re-noises like LCM: sample it with `pcm sample` or the registered "
                        "model")
            return f"the pipeline's FlowMatchEulerDiscreteScheduler with `sigmas={self.flow_sigmas}`"
        if self.method == "lcm":
            return "LCMScheduler"
        return "TCDScheduler with these sampling_timesteps (gamma 0 = deterministic PCM)"

    def diffusers_kwargs(self, t5_tokens: int) -> dict:
        """What a flow pipeline's call (StableDiffusion3Pipeline, FluxPipeline) takes to sample the trained PCM path:
        flow_sigmas, T5's tokens per prompt, the training side (FLUX shifts the sigmas by it) and the guidance. SD3's
        guidance_scale is CFG; FLUX.1-dev's is the embedded guidance the student read (a card without it: left to the
        pipeline's default, 3.5, what it read), its CFG is true_cfg_scale over the encoded "" (1: off)."""
        guidance = {"guidance_scale": self.recommended_guidance_scale}
        if self.family == "flux":
            guidance = {} if self.embedded_guidance_scale is None else {"guidance_scale": self.embedded_guidance_scale}
            if self.recommended_guidance_scale != 1:
                guidance |= {"true_cfg_scale": self.recommended_guidance_scale, "negative_prompt": ""}
        return {"sigmas": self.flow_sigmas, **guidance, "max_sequence_length": t5_tokens, "height": self.resolution,
                "width": self.resolution}

    @property
    def is_video(self) -> bool:
        return self.frames > 1 or bool(self.motion_adapter)

    def to_json(self) -> dict:
        """The card as written: every field, plus the derived sampling_timesteps and scheduler for a human reader."""
        return {**dataclasses.asdict(self), "edges": list(self.edges), "sampling_timesteps": self.sampling_timesteps,
                "recommended_scheduler": self.recommended_scheduler}


def card_of_run(cfg: Config, grid: SolverGrid, video: bool = False, guidance_mode: str | None = None) -> ModelCard:
    """The card of a run's LoRA: its config's teacher, method and grid, and the sampling it was trained for.

    guidance_mode: the teacher's (Teacher.guidance_mode); a flux teacher reading embedded guidance records the scale
    its student read (FLUX_GUIDANCE_SCALE). None: from the family alone, flux taken as FLUX.1-dev (the family's
    guidance-distilled default; FLUX.1-schnell, guidance_mode 'none', has no guidance input)."""
    from pcm.models.families import FLOW_FAMILIES, FLUX_GUIDANCE_SCALE

    d, lora, flow = cfg.distill, cfg.lora, cfg.teacher.family in FLOW_FAMILIES
    embedded = cfg.teacher.family == "flux" and guidance_mode in (None, "embedded")
    return ModelCard(
        method=d.method, family=cfg.teacher.family, base_model=cfg.teacher.model, num_train_timesteps=grid.T,
        num_solver_steps=grid.N, num_phases=grid.M, edges=tuple(int(s) for s in grid.edges), guidance=d.guidance,
        w_min=d.w_min, w_max=d.w_max, resolution=cfg.data.resolution,
        recommended_steps=min(LCM_STEPS, grid.N) if d.method == "lcm" else grid.M,
        recommended_guidance_scale=1.0 if d.guidance == "small_cfg" else 5.0, lcm_sigma_data=d.lcm_sigma_data,
        lcm_timestep_scaling=d.lcm_timestep_scaling, frames=cfg.data.frames if video else 1,
        motion_adapter=cfg.teacher.motion_adapter if video else "", lora_rank=lora.rank, lora_alpha=lora.alpha,
        lora_layers=lora.layers, embedded_guidance_scale=FLUX_GUIDANCE_SCALE if embedded else None,
        t5=cfg.teacher.t5 if flow else None, max_sequence_length=cfg.teacher.max_sequence_length if flow else None)


def text_settings(card: ModelCard) -> dict:
    """The TeacherConfig fields a flow card fixes (t5, max_sequence_length): what to lay over a teacher config so it
    encodes prompts as the LoRA was distilled; empty for a UNet family or an older card."""
    return {k: v for k, v in (("t5", card.t5), ("max_sequence_length", card.max_sequence_length)) if v is not None}


REQUIRED = ("method", "family", "base_model", "num_solver_steps", "num_phases", "edges", "guidance", "w_min", "w_max",
            "resolution", "recommended_steps", "recommended_guidance_scale")
DERIVED = ("sampling_timesteps", "recommended_scheduler")


def card_from_json(data, where: str) -> ModelCard:
    """A card from its JSON object; LoraFileError naming `where` when it is not a card this pcm reads."""
    if not isinstance(data, dict):
        raise LoraFileError(f"{where} holds {type(data).__name__}, not a JSON object; {REEXPORT}")
    version = data.get("card_version", 0)
    if not isinstance(version, int) or version > CARD_VERSION:
        raise LoraFileError(f"{where} has card_version {version!r}, newer than this pcm reads ({CARD_VERSION}); "
                            "upgrade pcm-pipelines (pip install -U) or re-export the LoRA with this version")
    missing = [k for k in REQUIRED if k not in data]
    if "num_train_timesteps" not in data:
        if version == 0 and "sampling_timesteps" in data:  # version 0 recorded T as the path's first point only
            data = {**data, "num_train_timesteps": data["sampling_timesteps"][0] + 1}
        else:
            missing.append("num_train_timesteps")
    if missing:
        raise LoraFileError(f"{where} lacks {', '.join(missing)}; {REEXPORT}")
    fields = {f.name for f in dataclasses.fields(ModelCard)}
    unknown = sorted(set(data) - fields - set(DERIVED))
    if unknown and version == CARD_VERSION:
        raise LoraFileError(f"{where} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}")
    values = {k: v for k, v in data.items() if k in fields}
    card = ModelCard(**{**values, "edges": tuple(values["edges"]), "card_version": CARD_VERSION})
    if card.method not in METHODS:
        raise LoraFileError(f"{where}: method {card.method!r}; allowed: {', '.join(METHODS)}; {REEXPORT}")
    return card


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def read_card(folder: str | Path, key: str = "lora") -> ModelCard:
    """The card of an exported LoRA folder (its pcm_config.json); LoraFileError naming key, the path and the fix
    when it is missing, truncated, not a card or from a newer pcm."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise LoraFileError(f"{key}={folder}: no {CONFIG_FILE} there; point {key} at a LoRA folder written by "
                            "`pcm distill` (train.output_dir/lora)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise LoraFileError(f"{key}: {path} is unreadable ({_first_line(err)}); {REEXPORT}") from err
    return card_from_json(data, f"{key}: {path}")


def write_card(card: ModelCard, folder: Path) -> Path:
    path = folder / CONFIG_FILE
    path.write_text(json.dumps(card.to_json(), indent=2) + "\n", encoding="utf-8")
    return path
