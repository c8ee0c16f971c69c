"""Crash-safe, safetensors-only training checkpoints: LoRA, optimizers, LR schedule, RNG, step, data position.

checkpoints/step-000100/ holds
  lora.safetensors        adapter weights (peft naming), plus EMA copies and discriminator heads when used
  optimizer.safetensors   every tensor of the optimizer state, keyed 'state.<param index>.<name>'
  NAME.safetensors        the same for each further optimizer (the discriminator's)
  rng.safetensors         torch CPU (and CUDA) generator states
  state.json              step, data position, optimizer param groups and scalar state, scheduler state,
                          the resolved config, non-finite counters
  COMPLETE                written last: the size and sha256 of every other file
A checkpoint is written into a hidden temp folder, fsynced and renamed into place (pcm.atomic), so a kill at any
instant leaves every earlier checkpoint intact. A folder without a valid COMPLETE, or whose files differ from it
(truncated, corrupt), is never resumed from: `--resume latest` warns, naming it, and takes the previous complete
one. The newest `keep` are kept. Nothing is unpickled on load (no torch.load).
"""

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pcm.atomic import fsync_path, leftovers, recover_dir, remove_dir, staged_dir

MARKER = "COMPLETE"
REQUIRED = ("lora.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
PATTERN = re.compile(r"^step-(\d{6,})$")
# a checkpoint folder or a hidden sibling pcm.atomic made of it (.tmp- being written, .old- moved aside, .del- going)
SIBLING = re.compile(r"^(?:\.(?:tmp|old|del)-)?step-(\d{6,})(?:-[0-9a-f]{8})?$")


class CorruptCheckpoint(RuntimeError):
    """A checkpoint folder is incomplete or one of its files is damaged; the message names the folder and why."""


class CheckpointWarning(UserWarning):
    """`--resume latest` skipped a checkpoint (named in the message) and fell back to an earlier one."""


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


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_files(tmp: Path, step: int, lora: dict[str, torch.Tensor], optimizers: dict[str, torch.optim.Optimizer],
                 extra: dict) -> None:
    save_file(lora, tmp / "lora.safetensors")
    state = {"step": step, **extra}
    for name, optimizer in optimizers.items():
        tensors, state[name] = _split_optimizer(optimizer.state_dict())
        save_file(tensors, tmp / f"{name}.safetensors")
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(rng, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    # last: its presence says every file above is whole; the sizes and hashes let a reader prove it without parsing
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
    (tmp / MARKER).write_text(json.dumps({"step": step, "files": files}, indent=2))


def save_checkpoint(folder: Path, step: int, lora: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    extra: dict, keep: int, others: dict[str, torch.optim.Optimizer] | None = None) -> Path:
    """Writes checkpoints/step-XXXXXX crash-safely and prunes older ones down to the newest `keep`; returns its path.

    Re-saving an existing step replaces it only once the new one is whole. others: further optimizers by name
    (the discriminator's), each in NAME.safetensors + state.json[NAME]. One writer per folder (the main process)."""
    folder.mkdir(parents=True, exist_ok=True)
    repair_checkpoints(folder)
    final = folder / f"step-{step:06d}"
    with staged_dir(final) as tmp:
        _write_files(tmp, step, lora, {"optimizer": optimizer, **(others or {})}, extra)
    _prune(folder, step, keep)
    return final


def verify_checkpoint(path: Path, thorough: bool = True) -> str | None:
    """Why path cannot be resumed from, or None when it is complete: its COMPLETE marker is there and every file
    it lists has its recorded size and (thorough) sha256. Reads bytes only; nothing is parsed but the marker."""
    if not path.is_dir():
        return "no such checkpoint folder"
    try:
        files = json.loads((path / MARKER).read_text())["files"]
        recorded = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except FileNotFoundError:
        return f"no {MARKER} marker (its save was interrupted, or a pcm without markers wrote it)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"its {MARKER} marker is unreadable ({type(err).__name__})"
    missing = [name for name in REQUIRED if name not in recorded]
    if missing:
        return f"its {MARKER} marker lists no {', '.join(missing)}"
    for name, (size, digest) in recorded.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if (path / name).stat().st_size != size:
            return f"{name} holds {(path / name).stat().st_size} bytes where {size} were written (truncated?)"
        if thorough and _sha256(path / name) != digest:
            return f"{name} differs from what was written (sha256 mismatch)"
    return None


def _candidates(folder: Path) -> dict[int, list[Path]]:
    """Step -> the folders that may hold it, preferred first: step-X, then its temp folders (a kill between
    publish_dir's two renames leaves the new version in one), then the version moved aside. Oldest step first."""
    if not folder.is_dir():
        return {}
    steps = sorted({int(m.group(1)) for p in folder.iterdir() if (m := SIBLING.match(p.name))})
    found = {}
    for step in steps:
        final = folder / f"step-{step:06d}"
        beside = leftovers(final)
        found[step] = [final] * final.is_dir() + beside["tmp"] + beside["old"]
    return found


def list_checkpoints(folder: Path) -> list[Path]:
    """One complete checkpoint per step (marker present, every file of its recorded size), oldest first. Hashes are
    left to resolve_resume, which reads only the one it picks."""
    found = []
    for paths in _candidates(folder).values():
        found += [p for p in paths if verify_checkpoint(p, thorough=False) is None][:1]
    return found


def resolve_resume(folder: Path, resume: str | None) -> Path | None:
    """--resume latest|PATH -> a complete checkpoint folder (None: start fresh).

    latest: the newest checkpoint whose files match its COMPLETE marker; each newer incomplete or damaged one is
    skipped with a CheckpointWarning naming it and why; none complete starts fresh. PATH: that checkpoint, which
    must be complete."""
    if not resume:
        return None
    if resume != "latest":
        problem = verify_checkpoint(Path(resume))
        if problem:
            raise FileNotFoundError(f"--resume {resume}: {problem}; use 'latest' (the newest complete checkpoint) "
                                    f"or a path like {folder}/step-000100")
        return Path(resume)
    skipped = False
    for paths in reversed(_candidates(folder).values()):
        for path in paths:
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            skipped = True
            warnings.warn(f"--resume latest: skipping checkpoint {path}: {problem}; falling back to the previous "
                          "one", CheckpointWarning, stacklevel=2)
    if skipped:
        warnings.warn(f"--resume latest: no complete checkpoint in {folder}; starting from step 0",
                      CheckpointWarning, stacklevel=2)
    return None


def repair_checkpoints(folder: Path) -> None:
    """Repairs what a kill during a save left (save_checkpoint does, first). A step whose folder is missing gets back
    its complete new version (a finished temp folder) or else the version moved aside; other leftovers are deleted.
    The folder's one writer only (the main process): other ranks may be reading what resolve_resume gave them."""
    for step, paths in _candidates(folder).items():
        final = folder / f"step-{step:06d}"
        if not final.exists():
            whole = [p for p in paths if p.name.startswith(".tmp-") and verify_checkpoint(p) is None]
            if whole:
                os.replace(whole[0], final)
                fsync_path(folder)
        recover_dir(final)


def _prune(folder: Path, newest: int, keep: int) -> None:
    """Deletes checkpoints older than `newest` beyond the newest `keep` complete ones (counting `newest`) and any
    older incomplete one. `newest` was just written whole, so a complete checkpoint always remains; folders of
    later steps (a rerun from an earlier checkpoint) stay until their own re-save replaces them."""
    older = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := PATTERN.match(p.name))
                   and int(m.group(1)) < newest)
    complete = [p for _, p in older if verify_checkpoint(p, thorough=False) is None]
    doomed = [p for _, p in older if p not in complete] + complete[:max(0, len(complete) - (keep - 1))]
    for path in doomed:
        remove_dir(path)


def _read(path: Path, name: str, reader: Callable):
    try:
        return reader(path / name)
    except Exception as err:  # whatever a damaged file raises: OSError, JSON's or safetensors' own errors
        raise CorruptCheckpoint(f"checkpoint {path}: {name} is unreadable ({type(err).__name__}: {err}); "
                                "--resume latest falls back to an earlier checkpoint") from err


def _match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Each per-parameter state tensor (AdamW's moments) in its parameter's memory layout. A checkpoint stores them
    contiguous; a channels-last parameter's fused AdamW reads its moments as if laid out like the parameter, so a
    contiguous moment there would be applied to the wrong elements."""
    for param, values in optimizer.state.items():
        for key, value in values.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                values[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer,
                    others: dict[str, torch.optim.Optimizer] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(LoRA tensors, state.json) of a checkpoint; restores the optimizers and the torch RNG in place.

    Every file is read before anything is restored: an incomplete or damaged checkpoint raises CorruptCheckpoint
    and leaves the optimizers and the RNG as they were."""
    problem = verify_checkpoint(path, thorough=False)
    if problem:
        raise CorruptCheckpoint(f"checkpoint {path}: {problem}")
    state = _read(path, "state.json", lambda p: json.loads(p.read_text()))
    optimizers = {"optimizer": optimizer, **(others or {})}
    for name in optimizers:
        if name not in state:
            raise ValueError(f"{path} holds no {name} state: it was written by a run with other settings (e.g. "
                             "adversarial.weight=0); resume with those settings or start a new train.output_dir")
    tensors = {name: _read(path, f"{name}.safetensors", load_file) for name in optimizers}
    rng = _read(path, "rng.safetensors", load_file)
    lora = _read(path, "lora.safetensors", load_file)
    for name, target in optimizers.items():
        target.load_state_dict(_join_optimizer(tensors[name], state[name]))
        _match_layouts(target)
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    return lora, state
