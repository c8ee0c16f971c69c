"""`pcm sample`: images (a video LoRA: GIF clips) from a registered model or directly from a LoRA folder, through
the same generator; and what every loader of an exported LoRA shares: its identity (the sha256 of its diffusers
file, recorded by evaluation and the registry) and a load that refuses a file that does not fit its base model."""

import dataclasses
import hashlib
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from pcm.config import Config, TeacherConfig
from pcm.models.card import CONFIG_FILE, ModelCard, read_card, text_settings
from pcm.models.lora import DIFFUSERS_FILE, PREFIX, load_lora

log = logging.getLogger(__name__)
BACKBONE_KEYS = tuple(f"{name}." for name in ("unet", *PREFIX.values()))  # a diffusers LoRA file's key prefixes


class LoRAError(ValueError):
    """A LoRA folder whose file is missing, damaged (truncated) or made for another base model."""


def lora_sha256(folder: str | Path) -> str:
    """Hex sha256 of a LoRA folder's diffusers file: the identity evaluation, registry and loading agree on (the
    same number `sha256sum pytorch_lora_weights.safetensors` prints)."""
    path = Path(folder) / DIFFUSERS_FILE
    if not path.is_file():
        raise LoRAError(f"{path}: no such file; point at a LoRA folder written by `pcm distill` "
                        "(train.output_dir/lora)")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def one_line(err: BaseException) -> str:
    """'Type: first line' of an error; a first line that only announces a list (ends with ':') gets its first item."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return f"{type(err).__name__}: {text}"


@contextmanager
def _quiet(*names: str):
    """Silences library loggers inside the block: what they would report is raised again as ours, in one line."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():  # peft names every module it could not match through warnings.warn
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def load_checked(unet, folder: str | Path, adapter: str, key: str, sides: str = "") -> None:
    """Loads a LoRA folder onto unet, the backbone (as pcm.models.lora.load_lora), and checks that every tensor of the
    file sits, unchanged, on a LoRA layer of it and that no layer was made without one: diffusers only warns when keys
    do not match, which would leave a LoRA for another base half-loaded. LoRAError (one line, naming key and the
    file, and sides: the LoRA's recorded base against the model it meets) otherwise."""
    path = Path(folder) / DIFFUSERS_FILE
    advice = (f"{sides + '; ' if sides else ''}re-export it with `pcm distill`, or set {key} to a LoRA trained on "
              "this base model (base_model in its pcm_config.json)")
    try:
        state = load_file(path)
        # diffusers logs the whole mismatch list (hundreds of keys for SDXL) and only warns about keys that match
        # no layer; both are checked and reported below
        with _quiet("diffusers.loaders.peft", "diffusers.utils.peft_utils", "peft"):
            load_lora(unet, folder, adapter)
    except FileNotFoundError as err:
        raise LoRAError(f"{key}={path}: no such file; point {key} at a LoRA folder written by `pcm distill`") from err
    except Exception as err:  # safetensors' own error type, OSError, peft's ValueError, torch's RuntimeError
        raise LoRAError(f"{key}={path} does not load onto its base model ({one_line(err)}): a truncated or "
                        f"damaged file, or a LoRA of another base; {advice}") from err
    loaded = {name: p for name, p in unet.named_parameters() if f".{adapter}." in name}
    # file keys: unet.<module>.lora_A.weight (sd3: transformer.<module>...); the layer's parameter:
    # <module>.lora_A.<adapter>.weight
    expected = {".".join([*_module_key(k).split(".")[:-1], adapter, k.split(".")[-1]]): v for k, v in state.items()}
    wrong = sorted(set(expected) ^ set(loaded)) + sorted(
        n for n in expected.keys() & loaded.keys()
        if not torch.allclose(loaded[n].detach().float().cpu(), expected[n].float(), rtol=1e-2, atol=1e-6))
    if wrong:
        raise LoRAError(f"{key}={path}: {len(wrong)} of its {len(expected)} tensors do not fit the base model's "
                        f"layers (e.g. {wrong[0]}): a LoRA of another base; {advice}")


def _module_key(key: str) -> str:
    """A LoRA file's key without its backbone prefix (unet., transformer.)."""
    return key.partition(".")[2] if key.startswith(BACKBONE_KEYS) else key


TEACHER_FROM = ("lora", "config")  # the base model a --lora samples on: its card's base_model, or teacher.*


def same_model(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve() if Path(a).is_dir() and Path(b).is_dir() else a == b


def recorded_base(card: ModelCard, folder: str | Path) -> str:
    """The base model a LoRA's card records; a relative path (as params.yaml gives teacher.model) is read against
    the working directory, else against the LoRA's project (pcm.tracking.project_root), where distill ran."""
    from pcm.tracking import project_root

    base = card.base_model
    beside = project_root(folder) / base
    return str(beside) if not Path(base).is_absolute() and not Path(base).exists() and beside.is_dir() else base


def check_family(card: ModelCard, teacher: TeacherConfig, key: str, fix: str) -> None:
    """A LoRA meets a teacher of its own family, or LoRAError in one line naming both sides and fix."""
    if card.family != teacher.family:
        raise LoRAError(f"{key} is a {card.family} LoRA (base_model {card.base_model} in its {CONFIG_FILE}) but the "
                        f"teacher is {teacher.family} (teacher.model={teacher.model}); {fix}")


def base_for(cfg: Config, lora: str, card: ModelCard, teacher_from: str) -> TeacherConfig:
    """The teacher a --lora samples on: the base model its card records (teacher_from='lora', the default) or
    cfg.teacher (teacher_from='config'), checked against the card: another family is refused, another base model
    of the same family is warned about (a fine-tune of the base is a fair thing to ask for)."""
    if teacher_from not in TEACHER_FROM:
        raise ValueError(f"teacher_from={teacher_from!r}; allowed: {', '.join(TEACHER_FROM)}")
    if teacher_from == "lora" and card.base_model:
        return dataclasses.replace(cfg.teacher, family=card.family, model=recorded_base(card, lora),
                                   motion_adapter=card.motion_adapter or cfg.teacher.motion_adapter,
                                   **text_settings(card))
    meet_teacher(card, lora, cfg.teacher, f"--lora={lora}", "drop --teacher-from config to sample on its own base, "
                 "or set teacher.family={family} teacher.model={base}")
    return cfg.teacher


def meet_teacher(card: ModelCard, lora: str, teacher: TeacherConfig, who: str, fix: str) -> None:
    """A LoRA (its card, folder lora) against the teacher it will run on: another family is refused in one line
    naming both and fix (a template over {family} and {base}); another base model of the family is warned about (a
    fine-tune of the base is a fair thing to ask for)."""
    base = recorded_base(card, lora) if card.base_model else teacher.model
    check_family(card, teacher, who, fix.format(family=card.family, base=base))
    if not same_model(base, teacher.model):
        log.warning("%s was distilled from %s but runs on teacher.model=%s: outputs and teacher-relative metrics are "
                    "those of another model", who, base, teacher.model)


def _direct(cfg: Config, lora: str, rows: list[dict], teacher_from: str = "lora") -> list[bytes]:
    """PNG bytes from the LoRA folder on its base (base_for), sampled as the registered model does."""
    from pcm.eval.generate import generate_pngs
    from pcm.models.families import load_teacher

    card = read_card(lora, "--lora")
    teacher_cfg = base_for(cfg, lora, card, teacher_from)
    sides = (f"the LoRA records a {card.family} base {card.base_model}, the teacher is {teacher_cfg.family} "
             f"{teacher_cfg.model}")
    try:
        teacher = load_teacher(teacher_cfg, cfg.register.device if cfg.register.device != "auto" else "cpu",
                               resolution=card.resolution)
    except (OSError, ValueError) as err:
        if teacher_from != "lora":
            raise
        raise LoRAError(f"--lora={lora}: its base model {teacher_cfg.model} (base_model in its {CONFIG_FILE}) does "
                        f"not load ({one_line(err)}); make it available there, or sample on teacher.model "
                        "with --teacher-from config") from err
    load_checked(teacher.backbone, lora, "pcm", "--lora", sides)
    return generate_pngs(teacher, card, "pcm", rows)


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """What `pcm sample` is asked for: prompts, where the images go, the model, and how to sample it (None: the
    params file's sample.* when set, else the model's own: the LoRA's recommended steps and CFG, gamma 0)."""

    prompts: tuple[str, ...]
    out: str = "sample.png"  # one prompt: this file; several: OUT-0.png, OUT-1.png, ...
    model: str = ""  # a registered model URI, models:/NAME@ALIAS or models:/NAME/VERSION
    lora: str = ""  # or an exported LoRA folder
    negative_prompt: str = ""
    steps: int | None = None
    guidance_scale: float | None = None
    gamma: float | None = None  # TCD's stochastic step, in [0, 1]; 0 = deterministic PCM
    seed: int = 0
    teacher_from: str = "lora"  # --lora: sample on the base its card records (lora) or on teacher.* (config)


def sample_pngs(cfg: Config, request: SampleRequest) -> dict:
    """The request's images as PNG (or GIF for clips) files; {'images': [paths], 'source': model or LoRA}."""
    r = request
    if bool(r.model) == bool(r.lora):
        raise ValueError("give exactly one of --model (a registered model, e.g. models:/NAME@champion) and --lora "
                         "(an exported LoRA folder)")
    if not r.prompts:
        raise ValueError("give at least one --prompt")
    given = {"steps": r.steps, "guidance_scale": r.guidance_scale, "gamma": r.gamma}
    fallback = {"steps": cfg.sample.num_steps, "guidance_scale": cfg.sample.guidance_scale, "gamma": cfg.sample.gamma}
    sampling = {k: fallback[k] if v is None else v for k, v in given.items()}  # None still: the model's own value
    rows = [{"prompt": p, "negative_prompt": r.negative_prompt, "seed": r.seed, **sampling} for p in r.prompts]
    if r.model:
        from pcm.registry import load_registered

        frame = pd.DataFrame([{k: v for k, v in row.items() if v is not None} for row in rows])  # optional columns
        images = list(load_registered(cfg, r.model).predict(frame)["image"])
    else:
        images = _direct(cfg, r.lora, rows, r.teacher_from)
    paths = write_outputs(images, Path(r.out))
    return {"images": [str(p) for p in paths], "source": r.model or r.lora}


def write_outputs(images: list[bytes], target: Path) -> list[Path]:
    """The model's PNG images or GIF clips at target (numbered when there are several); a .png / .gif target takes
    the suffix of what came back, and .mp4 writes a video LoRA's clips as H.264 (ValueError for images)."""
    suffix = ".gif" if images[0][:4] == b"GIF8" else ".png"  # a video LoRA's clips are animated GIFs
    if target.suffix.lower() == ".mp4":
        if suffix != ".gif":
            raise ValueError(f"--out {target}: .mp4 is for a video LoRA's clips; this model makes images (use .png)")
        suffix = ".mp4"
    if target.suffix.lower() in (".png", ".gif"):
        target = target.with_suffix(suffix)
    paths = [target] if len(images) == 1 else [target.with_name(f"{target.stem}-{i}{suffix}")
                                               for i in range(len(images))]
    for path, image in zip(paths, images, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".mp4":  # the clip's GIF frames as H.264 (its palette colours, every frame)
            from pcm.eval.video import gif_frames, write_mp4

            write_mp4(gif_frames(image), path)
        else:
            path.write_bytes(image)
    return paths
