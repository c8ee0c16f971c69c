"""Atomic, safetensors-only training checkpoints: LoRA, optimizer, LR schedule, RNG, step, data position.

checkpoints/step-000100/ holds
  lora.safetensors        adapter weights (peft naming)
  optimizer.safetensors   every tensor of the optimizer state, keyed 'state.<param index>.<name>'
  state.json              step, data position, optimizer param groups and scalar state, scheduler state,
                          the resolved config, non-finite counters
  rng.safetensors         torch CPU (and CUDA) generator states
Written to a temporary folder first and renamed, so a crash never leaves a half checkpoint; the newest K kept.
Nothing is unpickled on load (no torch.load).
"""

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PATTERN = re.compile(r"^step-(\d{6,})$")


def _flatten(values: dict, prefix: str = "") -> dict:
    """{'a': {'b': x}} -> {'a/b': x}: 8-bit optimizers (bitsandbytes) nest their quantization state in a dict."""
    flat = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}/"))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _nest(state: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for name in parents:
        state = state.setdefault(name, {})
    state[leaf] = value


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in _flatten(values).items():
            if isinstance(value, torch.Tensor):
                # copied: safetensors refuses tensors that share memory (bitsandbytes shares one qmap across params)
                tensors[f"state.{index}.{name}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        _nest(state.setdefault(int(index), {}), name, value)
    for index, values in rest["scalars"].items():
        for name, value in values.items():
            _nest(state.setdefault(int(index), {}), name, value)
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(folder: Path, step: int, lora: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    extra: dict, keep: int, others: dict[str, torch.optim.Optimizer] | None = None) -> Path:
    """Writes checkpoints/step-XXXXXX atomically and prunes all but the newest `keep`; returns its path.

    others: further optimizers by name (the discriminator's), each in NAME.safetensors + state.json[NAME]."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(lora, tmp / "lora.safetensors")
    tensors, rest = _split_optimizer(optimizer.state_dict())
    save_file(tensors, tmp / "optimizer.safetensors")
    extra = dict(extra)
    for name, other in (others or {}).items():
        other_tensors, extra[name] = _split_optimizer(other.state_dict())
        save_file(other_tensors, tmp / f"{name}.safetensors")
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(rng, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": rest, **extra}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if PATTERN.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def resolve_resume(folder: Path, resume: str | None) -> Path | None:
    """--resume latest|PATH -> a checkpoint folder (None: start fresh; 'latest' with none found also starts fresh)."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(folder)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no state.json); use 'latest' or a "
                                f"path like {folder}/step-000100")
    return path


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer,
                    others: dict[str, torch.optim.Optimizer] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(LoRA tensors, state.json) of a checkpoint; restores the optimizers and the torch RNG in place."""
    state = json.loads((path / "state.json").read_text())
    optimizer.load_state_dict(_join_optimizer(load_file(path / "optimizer.safetensors"), state["optimizer"]))
    for name, other in (others or {}).items():
        if name not in state:
            raise ValueError(f"{path} holds no {name} state: it was written by a run with other settings (e.g. "
                             "adversarial.weight=0); resume with those settings or start a new train.output_dir")
        other.load_state_dict(_join_optimizer(load_file(path / f"{name}.safetensors"), state[name]))
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return load_file(path / "lora.safetensors"), state
