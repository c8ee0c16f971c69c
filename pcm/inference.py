"""`pcm sample`: images (a video LoRA: GIF clips) from a registered model or directly from a LoRA folder, through
the same generator; and what every loader of an exported LoRA shares: its identity (the sha256 of its diffusers
file, recorded by evaluation and the registry) and a load that refuses a file that does not fit its base model."""

import hashlib
import logging
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from pcm.config import Config
from pcm.models.lora import DIFFUSERS_FILE, load_lora


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
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def load_checked(unet, folder: str | Path, adapter: str, key: str) -> None:
    """Loads a LoRA folder onto unet (as pcm.models.lora.load_lora) and checks that every tensor of the file sits,
    unchanged, on a LoRA layer of this UNet and that no layer was made without one: diffusers only warns when keys
    do not match, which would leave a LoRA for another base half-loaded. LoRAError (one line, naming key and the
    file) otherwise."""
    path = Path(folder) / DIFFUSERS_FILE
    advice = (f"re-export it with `pcm distill`, or set {key} to a LoRA trained on this base model "
              "(base_model in its pcm_config.json)")
    try:
        state = load_file(path)
        # diffusers logs the whole mismatch list (hundreds of keys for SDXL) and only warns about keys that match
        # no layer; both are checked and reported below
        with _quiet("diffusers.loaders.peft", "diffusers.utils.peft_utils"):
            load_lora(unet, folder, adapter)
    except FileNotFoundError as err:
        raise LoRAError(f"{key}={path}: no such file; point {key} at a LoRA folder written by `pcm distill`") from err
    except Exception as err:  # safetensors' own error type, OSError, peft's ValueError, torch's RuntimeError
        raise LoRAError(f"{key}={path} does not load onto its base model ({one_line(err)}): a truncated or "
                        f"damaged file, or a LoRA of another base; {advice}") from err
    loaded = {name: p for name, p in unet.named_parameters() if f".{adapter}." in name}
    # file keys: unet.<module>.lora_A.weight; the layer's parameter: <module>.lora_A.<adapter>.weight
    expected = {".".join([*k.removeprefix("unet.").split(".")[:-1], adapter, k.split(".")[-1]]): v
                for k, v in state.items()}
    wrong = sorted(set(expected) ^ set(loaded)) + sorted(
        n for n in expected.keys() & loaded.keys()
        if not torch.allclose(loaded[n].detach().float().cpu(), expected[n].float(), rtol=1e-2, atol=1e-6))
    if wrong:
        raise LoRAError(f"{key}={path}: {len(wrong)} of its {len(expected)} tensors do not fit the base model's "
                        f"layers (e.g. {wrong[0]}): a LoRA of another base; {advice}")


def _direct(cfg: Config, lora: str, rows: list[dict]) -> list[bytes]:
    """PNG bytes from the teacher in cfg.teacher with the LoRA folder, sampled as the registered model does."""
    from pcm.eval.generate import generate_pngs, read_lora_config
    from pcm.models.families import load_teacher

    teacher = load_teacher(cfg.teacher, cfg.register.device if cfg.register.device != "auto" else "cpu")
    load_checked(teacher.unet, lora, "pcm", "--lora")
    return generate_pngs(teacher, read_lora_config(lora), "pcm", rows)


def sample_pngs(cfg: Config, prompts: list[str], out: str, model: str, lora: str, negative_prompt: str,
                steps: int | None, guidance_scale: float | None, seed: int) -> dict:
    if bool(model) == bool(lora):
        raise ValueError("give exactly one of --model (a registered model, e.g. models:/NAME@champion) and --lora "
                         "(an exported LoRA folder)")
    if not prompts:
        raise ValueError("give at least one --prompt")
    rows = [{"prompt": p, "negative_prompt": negative_prompt, "seed": seed, "steps": steps,
             "guidance_scale": guidance_scale} for p in prompts]  # None: the LoRA's recommended value
    if model:
        from pcm.registry import load_registered

        frame = pd.DataFrame([{k: v for k, v in row.items() if v is not None} for row in rows])  # optional columns
        images = list(load_registered(cfg, model).predict(frame)["image"])
    else:
        images = _direct(cfg, lora, rows)
    target = Path(out)
    suffix = ".gif" if images[0][:4] == b"GIF8" else ".png"  # a video LoRA's clips are animated GIFs
    if target.suffix.lower() in (".png", ".gif"):
        target = target.with_suffix(suffix)
    paths = [target] if len(images) == 1 else [target.with_name(f"{target.stem}-{i}{suffix}")
                                               for i in range(len(images))]
    for path, image in zip(paths, images, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image)
    return {"images": [str(p) for p in paths], "source": model or lora}
