"""LoRA on the teacher's backbone, a UNet or SD3's / FLUX's transformer (peft through diffusers): attach, toggle, export
with metadata, load back.

One backbone serves as student (adapters on) and as teacher / discriminator backbone (adapters off), so no second
copy of the weights is held. Only the LoRA parameters require gradients.
"""

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pcm.atomic import staged_dir
from pcm.models.card import CONFIG_FILE, REEXPORT, LoraFileError, ModelCard, card_from_json, write_card

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pcm_lora_kohya.safetensors"


# the pipeline whose save_lora_weights / lora_state_dict / load_lora_weights read the family's LoRA, and the key
# prefix of the backbone there; sd3 and flux have no kohya export (their LoRAs circulate in the diffusers format)
PIPELINES = {"sd15": StableDiffusionPipeline, "animatediff": StableDiffusionPipeline,
             "sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
PREFIX = {"sd3": "transformer", "flux": "transformer"}  # else "unet"
KOHYA_FAMILIES = ("sd15", "animatediff", "sdxl")


def _pipeline(family: str):
    if family not in PIPELINES:
        raise ValueError(f"no LoRA export for family {family!r}; supported: {', '.join(PIPELINES)}")
    return PIPELINES[family]


MOTION = "motion_modules"  # AnimateDiff's temporal layers live under <block>.motion_modules.<i>
# diffusers calls a motion module's proj_in / proj_out as proj(input=...), a keyword peft's LoRA layers reject,
# so these two stay without adapters (their attention and feed-forward layers get them)
_KEYWORD_CALLED = rf"(?!.*\.{MOTION}\.\d+\.proj_(?:in|out)$)"


def lora_targets(target_modules: tuple[str, ...], layers: str = "all", video: bool = False) -> list[str] | str:
    """peft's target_modules: the name suffixes themselves for an image UNet, else a full-name pattern over the
    suffixes that keeps all layers, only the image layers (spatial) or only AnimateDiff's motion modules (motion)."""
    if layers not in ("all", "spatial", "motion"):
        raise ValueError(f"unknown lora.layers {layers!r}; allowed: all, spatial, motion")
    if not video and layers == "all":
        return list(target_modules)
    suffix = "|".join(re.escape(name) for name in target_modules)
    where = {"all": "", "spatial": rf"(?!.*\.{MOTION}\.)", "motion": rf"(?=.*\.{MOTION}\.)"}[layers]
    return rf"{_KEYWORD_CALLED}{where}(?:.*\.)?(?:{suffix})"


def attach_lora(unet: torch.nn.Module, rank: int, alpha: float, target_modules: tuple[str, ...],
                layers: str = "all") -> list:
    """Adds a LoRA adapter (B = 0 at init: the student starts as the teacher); returns its parameters (fp32)."""
    unet.requires_grad_(False)
    video = any(f".{MOTION}." in name for name, _ in unet.named_modules())
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=lora_targets(target_modules, layers, video),
                        init_lora_weights="gaussian")
    unet.add_adapter(config)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError(f"lora.target_modules={list(target_modules)} with lora.layers={layers} matched no module "
                         f"of the {type(unet).__name__}")
    for p in params:
        p.data = p.data.float()  # LoRA weights stay fp32 under mixed precision
        p.requires_grad_(True)
    return params


def wrapped_layers(backbone: torch.nn.Module) -> list[tuple[torch.nn.Module, str, BaseTunerLayer]]:
    """(parent, attribute, LoRA layer) of every adapter-wrapped layer; found once per set of adapters (walking the
    module tree costs more than a tiny teacher's forward) and kept on the backbone."""
    adapters = tuple(sorted(getattr(backbone, "peft_config", {}) or {}))
    cached = backbone.__dict__.get("_pcmwrapped_layers")
    if cached is None or cached[0] != adapters:
        layers = []
        for name, module in backbone.named_modules():
            if isinstance(module, BaseTunerLayer):
                parent, _, attribute = name.rpartition(".")
                layers.append((backbone.get_submodule(parent), attribute, module))
        cached = (adapters, layers)
        backbone.__dict__["_pcmwrapped_layers"] = cached
    return cached[1]


@contextmanager
def adapters_off(backbone: torch.nn.Module) -> Iterator[None]:
    """Within the block the backbone is the frozen teacher; its adapters are back afterwards, even on error.

    Each LoRA-wrapped layer is swapped for the plain layer it wraps, so the teacher's forward is the base model's,
    without peft's per-layer dispatch, and entering costs a few hundred attribute writes where peft's
    disable_adapters walks the whole module tree. Merged adapters (weights folded into the base layer) fall back to
    disable_adapters, which unmerges them.
    """
    layers = wrapped_layers(backbone)
    if any(layer.merged for _, _, layer in layers):
        backbone.disable_adapters()
        try:
            yield
        finally:
            backbone.enable_adapters()
        return
    for parent, attribute, layer in layers:
        setattr(parent, attribute, layer.get_base_layer())
    try:
        yield
    finally:
        for parent, attribute, layer in layers:
            setattr(parent, attribute, layer)


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in peft naming (for checkpoints)."""
    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def load_lora_state_dict(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(unet, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"checkpoint has LoRA keys this UNet lacks, e.g. {unexpected[:3]}")


def export_lora(unet: torch.nn.Module, out_dir: str | Path, card: ModelCard) -> dict[str, Path]:
    """Writes pytorch_lora_weights.safetensors (diffusers, adapter metadata), a kohya file (UNet families) and
    pcm_config.json.

    The card (phase edges, N, M, guidance variant, recommended sampling) is stored in both safetensors headers as a
    JSON string under 'pcm' and, readable, in pcm_config.json. The three are written into a temp folder that then
    replaces out_dir (pcm.atomic), so a kill leaves the previous export or the new one, never a mix.
    """
    out = Path(out_dir)
    with staged_dir(out) as tmp:
        _write_export(unet, tmp, card)
    files = {"diffusers": out / DIFFUSERS_FILE, "kohya": out / KOHYA_FILE, "config": out / CONFIG_FILE}
    return {k: v for k, v in files.items() if k != "kohya" or card.family in KOHYA_FAMILIES}


def _write_export(unet: torch.nn.Module, out: Path, card: ModelCard) -> None:
    peft_state = lora_state_dict(unet)  # contiguous copies (the UNet's weights may be channels-last)
    adapter_config = unet.peft_config["default"].to_dict()
    prefix = PREFIX.get(card.family, "unet")
    _pipeline(card.family).save_lora_weights(out, **{f"{prefix}_lora_layers": peft_state,
                                                     f"{prefix}_lora_adapter_metadata": adapter_config},
                                             safe_serialization=True)
    header = json.dumps(card.to_json(), sort_keys=True)
    _add_metadata(out / DIFFUSERS_FILE, {"pcm": header})
    write_card(card, out)
    if card.family not in KOHYA_FAMILIES:
        return
    kohya = {k: v.detach().float().cpu().contiguous() for k, v in convert_state_dict_to_kohya(
        convert_state_dict_to_diffusers(peft_state)).items()}
    save_file(kohya, out / KOHYA_FILE, metadata={"pcm": header, "ss_network_module": "networks.lora",
                                                 "ss_network_dim": str(adapter_config["r"]),
                                                 "ss_network_alpha": str(adapter_config["lora_alpha"])})


def _add_metadata(path: Path, extra: dict[str, str]) -> None:
    with safe_open(path, framework="pt") as f:
        metadata = dict(f.metadata() or {})
    save_file(load_file(path), path, metadata={**metadata, **extra})


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def read_metadata(path: str | Path) -> ModelCard:
    """The card in an exported LoRA file's header; LoraFileError naming the file when it is truncated, damaged or
    carries no card."""
    try:
        with safe_open(path, framework="pt") as f:
            header = (f.metadata() or {}).get("pcm")
        data = json.loads(header) if header is not None else None
    except FileNotFoundError as err:
        raise LoraFileError(f"{path}: no such file; {REEXPORT}") from err
    except Exception as err:  # safetensors' SafetensorError (truncated header), OSError, a broken JSON value
        raise LoraFileError(f"{path} is unreadable, truncated or damaged ({_first_line(err)}); {REEXPORT}") from err
    if data is None:
        raise LoraFileError(f"{path} carries no pcm card in its header (not exported by `pcm distill`); {REEXPORT}")
    return card_from_json(data, str(path))


def load_lora(backbone: torch.nn.Module, folder: str | Path, adapter_name: str) -> None:
    """Loads an exported LoRA folder onto the backbone as adapter `adapter_name`, at the alpha stored in its metadata
    (the same path as `pipe.load_lora_weights`); the adapter becomes active."""
    path = Path(folder) / DIFFUSERS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a LoRA folder exported by `pcm distill`")
    family = read_metadata(path).family
    try:
        loaded = _pipeline(family).lora_state_dict(Path(folder), return_lora_metadata=True)
    except Exception as err:  # safetensors' own error for a truncated file, OSError, a broken metadata JSON
        raise LoraFileError(f"{path} is unreadable, truncated or damaged ({_first_line(err)}); {REEXPORT}") from err
    state, adapter_metadata = loaded[0], loaded[-1]
    alphas = loaded[1] if len(loaded) == 3 else None  # SD3's and FLUX's readers return no separate network alphas
    backbone.load_lora_adapter(state, prefix=PREFIX.get(family, "unet"), network_alphas=alphas,
                               adapter_name=adapter_name, metadata=adapter_metadata)
