"""Checkpoint files: optimizer state of any nesting survives save -> load exactly, through safetensors + JSON; the
COMPLETE marker comes last; damaged, half-written and moved-aside checkpoints are recognised and recovered from.
(Kills at random points inside a save: test_checkpoint_faults.py.)"""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pcm.train import checkpoint
from pcm.train.checkpoint import (
    MARKER,
    CheckpointWarning,
    CorruptCheckpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
)


class NestedStateSGD(torch.optim.SGD):
    """SGD that keeps bitsandbytes-style state: a nested dict of tensors and scalars beside a plain int, and one
    quantization map shared by every parameter."""

    qmap = torch.linspace(-1, 1, 256)

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                state["quant"] = {"state1": (p * 100).round().to(torch.uint8), "absmax": p.abs().amax(dim=-1),
                                  "qmap": self.qmap, "blocks": {"n": p.shape[0], "scale": p.sum()}}


def _optimizer(seed: int) -> tuple[torch.nn.Parameter, NestedStateSGD]:
    g = torch.Generator().manual_seed(seed)
    p, q = (torch.nn.Parameter(torch.randn(3, 4, generator=g)) for _ in range(2))
    return p, NestedStateSGD([p, q], lr=0.1)


def test_nested_optimizer_state_round_trip(tmp_path):
    p, opt = _optimizer(0)
    for param in opt.param_groups[0]["params"]:
        param.grad = torch.ones_like(param)
    opt.step()
    opt.step()
    path = save_checkpoint(tmp_path, 2, {"w": p.detach().clone()}, opt, {"data": {"epoch": 1}}, keep=2)
    json.loads((path / "state.json").read_text())  # plain JSON, nothing pickled
    assert load_file(path / "optimizer.safetensors")["state.0.quant/state1"].dtype == torch.uint8

    _, fresh = _optimizer(1)
    lora, state = load_checkpoint(path, fresh)
    want, got = opt.state_dict()["state"][0], fresh.state_dict()["state"][0]
    assert got["step"] == want["step"] == 2
    assert torch.equal(got["quant"]["state1"], want["quant"]["state1"])
    assert torch.equal(got["quant"]["absmax"], want["quant"]["absmax"])
    assert torch.equal(got["quant"]["qmap"], NestedStateSGD.qmap)
    assert torch.equal(fresh.state_dict()["state"][1]["quant"]["qmap"], NestedStateSGD.qmap)
    assert got["quant"]["blocks"]["n"] == 3
    assert torch.equal(got["quant"]["blocks"]["scale"], want["quant"]["blocks"]["scale"])
    assert torch.equal(lora["w"], p.detach())
    assert state["data"] == {"epoch": 1}


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    p, opt = _optimizer(0)
    p.grad = torch.ones_like(p)
    opt.step()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"w": p.detach()}, opt, {}, keep=2)
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]


def _saved(folder, steps, keep=5):
    """Checkpoints of a one-parameter SGD run at the given steps; the LoRA tensor holds the step number."""
    p, opt = _optimizer(0)
    for step in steps:
        p.grad = torch.ones_like(p)
        opt.step()
        save_checkpoint(folder, step, {"w": torch.full((2,), float(step))}, opt, {}, keep=keep)
    return opt


def test_the_marker_is_written_last_and_lists_every_file(tmp_path, monkeypatch):
    written = []
    save, write = checkpoint.save_file, Path.write_text
    monkeypatch.setattr(checkpoint, "save_file", lambda t, f, **kw: (written.append(Path(f).name), save(t, f, **kw)))
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **kw: (written.append(self.name), write(self, *a, **kw)))
    _, opt = _optimizer(0)
    path = save_checkpoint(tmp_path, 7, {"w": torch.ones(2)}, opt, {}, keep=1, others={"disc_optimizer": opt})
    assert written[-1] == MARKER and written.count(MARKER) == 1
    files = json.loads((path / MARKER).read_text())["files"]
    others = sorted(p.name for p in path.iterdir() if p.name != MARKER)
    assert sorted(files) == sorted(set(written) - {MARKER}) == others
    assert all(files[name]["bytes"] == (path / name).stat().st_size for name in files)
    assert verify_checkpoint(path) is None


def _latest(folder) -> tuple[Path | None, list[str]]:
    """resolve_resume(folder, 'latest') and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = resolve_resume(folder, "latest")
    assert all(w.category is CheckpointWarning for w in caught)
    return path, [str(w.message) for w in caught]


def test_a_corrupt_newest_checkpoint_is_skipped_with_a_warning_naming_it(tmp_path):
    _saved(tmp_path, (1, 2, 3))
    newest = tmp_path / "step-000003"
    data = bytearray((newest / "lora.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed: only the hash can tell
    (newest / "lora.safetensors").write_bytes(bytes(data))
    assert "lora.safetensors differs" in verify_checkpoint(newest)
    assert verify_checkpoint(newest, thorough=False) is None
    path, said = _latest(tmp_path)
    assert path == tmp_path / "step-000002" and len(said) == 1
    assert f"skipping checkpoint {newest}: lora.safetensors differs" in said[0]
    with pytest.raises(FileNotFoundError, match="sha256 mismatch"):
        resolve_resume(tmp_path, str(newest))

    (tmp_path / "step-000002" / "optimizer.safetensors").write_bytes(b"")  # truncated by a full disk
    path, said = _latest(tmp_path)
    assert path == tmp_path / "step-000001" and len(said) == 2
    assert "step-000002: optimizer.safetensors holds 0 bytes where" in said[1]
    (tmp_path / "step-000001" / MARKER).unlink()
    path, said = _latest(tmp_path)
    assert path is None and f"step-000001: no {MARKER} marker" in said[2] and "no complete checkpoint" in said[3]


def test_load_fails_cleanly_on_a_damaged_file_and_restores_nothing(tmp_path):
    opt = _saved(tmp_path, (1,))
    path = tmp_path / "step-000001"
    size = (path / "optimizer.safetensors").stat().st_size
    (path / "optimizer.safetensors").write_bytes(b"\xff" * size)  # same size: past the quick check, not parseable
    _, fresh = _optimizer(1)
    before = str(fresh.state_dict())
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    with pytest.raises(CorruptCheckpoint, match=r"step-000001: optimizer\.safetensors is unreadable"):
        load_checkpoint(path, fresh)
    assert str(fresh.state_dict()) == before and torch.equal(torch.get_rng_state(), rng)
    (path / MARKER).unlink()
    with pytest.raises(CorruptCheckpoint, match=f"no {MARKER} marker"):
        load_checkpoint(path, opt)


def test_a_step_moved_aside_by_a_kill_is_resumed_and_restored(tmp_path):
    _saved(tmp_path, (1, 2, 3))
    aside = tmp_path / ".old-step-000003-0123abcd"  # killed between publish_dir's two renames
    (tmp_path / "step-000003").rename(aside)
    half = tmp_path / ".tmp-step-000003-89abcdef"  # ... while the new version was still being written
    shutil.copytree(aside, half)
    (half / MARKER).unlink()
    assert list_checkpoints(tmp_path)[-1] == aside
    path, said = _latest(tmp_path)
    assert path == aside and len(said) == 1 and f"{half}: no {MARKER} marker" in said[0]
    lora, state = load_checkpoint(aside, _optimizer(0)[1])
    assert state["step"] == 3 and torch.equal(lora["w"], torch.full((2,), 3.0))

    _saved(tmp_path, (4,), keep=3)  # the next save puts step 3 back and clears the leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000003", "step-000004"]
    assert verify_checkpoint(tmp_path / "step-000003") is None


def test_a_finished_temp_folder_wins_over_the_version_moved_aside(tmp_path):
    _saved(tmp_path, (1, 2))
    (tmp_path / "step-000002").rename(tmp_path / ".old-step-000002-0123abcd")
    new = tmp_path / ".tmp-step-000002-89abcdef"
    shutil.copytree(tmp_path / ".old-step-000002-0123abcd", new)
    assert _latest(tmp_path) == (new, [])
    _saved(tmp_path, (3,), keep=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001", "step-000002", "step-000003"]


def test_pruning_keeps_the_new_checkpoint_and_later_ones_and_drops_broken_older_ones(tmp_path):
    _saved(tmp_path, (1, 2, 3, 4))
    (tmp_path / "step-000002" / "rng.safetensors").unlink()
    # a rerun from step 1 re-saves step 3 with keep=1: the new step 3 stays, and so does step 4 (the rerun will
    # replace it), while step 1 (beyond keep) and the broken step 2 go
    _saved(tmp_path, (3,), keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003", "step-000004"]
    assert all(verify_checkpoint(p) is None for p in tmp_path.iterdir())
