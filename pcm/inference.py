"""`pcm sample`: images (a video LoRA: GIF clips) from a registered model or directly from a LoRA folder, through
the same generator."""

from pathlib import Path

import pandas as pd

from pcm.config import Config


def _direct(cfg: Config, lora: str, rows: list[dict]) -> list[bytes]:
    """PNG bytes from the teacher in cfg.teacher with the LoRA folder, sampled as the registered model does."""
    from pcm.eval.generate import generate_pngs, read_lora_config
    from pcm.models.families import load_teacher
    from pcm.models.lora import load_lora

    teacher = load_teacher(cfg.teacher, cfg.register.device if cfg.register.device != "auto" else "cpu")
    load_lora(teacher.unet, lora, "pcm")
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
