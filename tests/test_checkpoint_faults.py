"""Kills at random points inside checkpoint saving: every trial resumes and ends where an uninterrupted run ends.

A tiny deterministic trainer (LoRA-like tensors under AdamW and a LambdaLR, a head under SGD with momentum, fresh
noise from the torch RNG every step) checkpoints every step through the real save_checkpoint / resolve_resume /
load_checkpoint. It runs in a forked child (milliseconds, no interpreter start) that counts every file operation a
save makes: safetensors' save_file, Path.write_text, os.fsync, os.replace, shutil.rmtree and the os.unlink calls
inside it. Before operation k the child SIGKILLs itself; the parent resumes with --resume latest to the end and
compares with the uninterrupted run. Last, the same for a kill inside `pcm.train.distill.distill`'s checkpoint save
and one inside its LoRA export.
"""

import json
import os
import random
import re
import shutil
import signal
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from worlds import tiny_world

from pcm.config import config_from_dict
from pcm.data.loader import loader_factory
from pcm.train import checkpoint
from pcm.train.checkpoint import CheckpointWarning, load_checkpoint, resolve_resume, save_checkpoint, verify_checkpoint
from pcm.train.distill import distill

STEPS, KEEP = 5, 2
TRIALS = 36  # at least: each distinct point of a save is hit once (65 of them), random ones fill up to TRIALS
TWICE = 8  # trials whose resumed run is killed again (repairing the first kill's leftovers or saving)
SEED = 15
PUBLISH = "replace .tmp-step -> step"  # the rename that makes a checkpoint visible under its own name


def train(folder: Path, resume: str | None = "latest", steps: int = STEPS) -> tuple[dict[str, torch.Tensor], int]:
    """(final tensors, step it resumed from) of a run to `steps` that checkpoints every step into folder."""
    torch.manual_seed(0)
    params = {name: torch.nn.Parameter(torch.randn(*shape)) for name, shape in (("a", (4, 3)), ("b", (3, 2)),
                                                                              ("head", (2,)))}
    optimizer = torch.optim.AdamW([params["a"], params["b"]], lr=0.05)
    head_optimizer = torch.optim.SGD([params["head"]], lr=0.1, momentum=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
    start, path = 0, resolve_resume(folder, resume)
    if path is not None:
        tensors, state = load_checkpoint(path, optimizer, {"head_optimizer": head_optimizer})
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])
        schedule.load_state_dict(state["schedule"])
        start = state["step"]
    for step in range(start + 1, steps + 1):
        x = torch.randn(8, 4)  # drawn from the global RNG: a resume must restore it exactly
        loss = ((x @ params["a"] @ params["b"]).tanh() * params["head"] - x[:, :2]).pow(2).mean()
        optimizer.zero_grad()
        head_optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        head_optimizer.step()
        schedule.step()
        save_checkpoint(folder, step, {k: p.detach().clone() for k, p in params.items()}, optimizer,
                        {"schedule": schedule.state_dict()}, KEEP, {"head_optimizer": head_optimizer})
    return {k: p.detach().clone() for k, p in params.items()}, start


def _kind(path) -> str:
    """'.tmp-step-000003-ab12cd34' -> '.tmp-step', '.old-lora-0123abcd' -> '.old-lora': where in the protocol an
    operation acts, not on which step or attempt."""
    return re.sub(r"(-\d{6,})?(-[0-9a-f]{8})?$", "", Path(path).name)


LABELS = (  # (owner, attribute, the label of one call)
    (checkpoint, "save_file", lambda tensors, path, *a, **k: f"save_file {Path(path).name}"),
    (Path, "write_text", lambda self, *a, **k: f"write_text {self.name}"),
    (os, "fsync", lambda fd: f"fsync {_kind(os.readlink(f'/proc/self/fd/{fd}'))}"),
    (os, "replace", lambda src, dst, **k: f"replace {_kind(src)} -> {_kind(dst)}"),
    (shutil, "rmtree", lambda path, *a, **k: f"rmtree {_kind(path)}"),
    (os, "unlink", lambda *a, **k: "unlink"),  # shutil.rmtree's, file by file: a kill halfway through a deletion
)


def count_file_operations(log: list[str], kill_if: Callable[[list[str]], bool] = lambda log: False,
                          patch: Callable = setattr) -> None:
    """From now on each file operation appends its label to log first; when kill_if(log) holds, the process
    SIGKILLs itself instead of making it (a kill between that operation and the one before)."""
    def counting(real: Callable, label: Callable) -> Callable:
        def counted(*args, **kwargs):
            log.append(label(*args, **kwargs))
            if kill_if(log):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return counted

    for owner, name, label in LABELS:
        patch(owner, name, counting(getattr(owner, name), label))


def in_child(work: Callable[[], object]) -> int:
    """Runs work in a forked child; its exit status, or -N when signal N ended it."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            torch.set_num_threads(1)  # keep out of the OpenMP pool the parent may have started
            work()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def killed_at(k: int) -> Callable[[list[str]], bool]:
    return lambda log: len(log) == k


def resumed(folder: Path) -> tuple[dict[str, torch.Tensor], int, list[str]]:
    """train(folder, 'latest') in this process: (final tensors, step resumed from, the warnings it gave)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        final, start = train(folder)
    assert all(w.category is CheckpointWarning for w in caught), [str(w.message) for w in caught]
    return final, start, [str(w.message) for w in caught]


# scenario -> (resume, the step it resumes from, the newest complete step before it runs)
SCENARIOS = {"fresh": ("latest", 0, 0),  # an empty folder
             "broken newest": ("latest", 2, 2),  # steps 2 and 3, step 3's optimizer file truncated
             "rerun": ("step-000004", 4, 5)}  # a finished run's steps 4 and 5, rerun from 4: step 5 is saved again


def start_folder(root: Path, source: Path | None) -> Path:
    folder = root / "checkpoints"
    shutil.copytree(source, folder) if source else folder.mkdir(parents=True)
    return folder


def resume_arg(folder: Path, resume: str) -> str:
    return resume if resume == "latest" else str(folder / resume)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted result; where a killed run starts (SCENARIOS, the folders filled in); the labelled file
    operations of an uninterrupted run from each start."""
    root = tmp_path_factory.mktemp("faults")
    reference, _ = train(root / "reference" / "checkpoints", None)
    broken = root / "broken" / "checkpoints"
    train(broken, None, steps=3)
    (broken / "step-000003" / "optimizer.safetensors").write_bytes(b"\0" * 100)  # a full disk cut it short
    sources = {"fresh": None, "broken newest": broken, "rerun": root / "reference" / "checkpoints"}
    starts = {name: (sources[name], *SCENARIOS[name]) for name in SCENARIOS}
    logs = {}
    for name, (source, resume, resumed_at, _) in starts.items():
        folder = start_folder(root / name, source)
        logs[name] = []
        with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True):
            count_file_operations(logs[name], patch=mp.setattr)
            assert train(folder, resume_arg(folder, resume))[1] == resumed_at
    return reference, starts, logs


def between(log: list[str], k: int) -> tuple[str, str]:
    """The point a kill before operation k falls at: between operations k - 1 and k."""
    return log[k - 2] if k > 1 else "(start)", log[k - 1]


def plan(logs: dict[str, list[str]]) -> tuple[list[tuple[str, int]], set[tuple[str, str, str]]]:
    """(scenario, k) of each trial, and every point there is: (scenario, the operations a kill falls between). Each
    point is hit once, at a random one of its places; random places fill up to TRIALS."""
    rng = random.Random(SEED)
    places: dict[tuple[str, str, str], list[tuple[str, int]]] = {}
    for scenario, log in logs.items():
        for k in range(1, len(log) + 1):
            places.setdefault((scenario, *between(log, k)), []).append((scenario, k))
    trials = {rng.choice(where) for where in places.values()}
    everywhere = [place for where in places.values() for place in where]
    while len(trials) < TRIALS:
        trials.add(rng.choice(everywhere))
    return rng.sample(sorted(trials), len(trials)), set(places)


def test_the_trials_cover_every_point_of_a_save(runs):
    _, _, logs = runs
    trials, points = plan(logs)
    covered = {(scenario, *between(logs[scenario], k)) for scenario, k in trials}
    assert len(trials) >= 30 and covered == points
    ops = {op for _, _, op in covered}
    assert {"save_file lora.safetensors", "save_file optimizer.safetensors", "save_file rng.safetensors",
            "write_text state.json", "write_text COMPLETE", "fsync .tmp-step", PUBLISH, "replace step -> .old-step",
            "replace .old-step -> .del-step", "replace step -> .del-step", "rmtree .del-step", "unlink"} <= ops
    # the old version moved aside, the new one not yet in: a complete step 5 is only beside its name
    assert ("rerun", "replace step -> .old-step", PUBLISH) in covered
    print(f"{len(trials)} trials over {len(points)} points:", *sorted(points), sep="\n  ")


def test_files_and_folder_are_fsynced_before_the_rename_and_nothing_is_deleted_before_it(runs):
    _, _, logs = runs
    for name, log in logs.items():
        ends = [k for k, op in enumerate(log) if op == PUBLISH]
        assert len(ends) == STEPS - SCENARIOS[name][1]
        for previous, end in zip([-1, *ends], ends, strict=False):
            begin = log.index("save_file lora.safetensors", previous + 1)  # after the last save's pruning
            save = log[begin:end]  # this save's operations up to the rename that publishes it
            written = [op.split()[1] for op in save if op.startswith(("save_file", "write_text"))]
            assert written[-1] == "COMPLETE"
            synced = [op.split()[1] for op in save if op.startswith("fsync")]
            assert sorted(synced[:-1]) == sorted(written) and synced[-1] == ".tmp-step"
            assert log[end + 1] == "fsync checkpoints"
            # a step saved again is moved aside, not deleted, until its new version has its name
            assert [op for op in save if op.startswith(("rmtree", "unlink")) or "-> .del" in op] == []
        assert ("replace step -> .old-step" in log) == (name != "fresh")


@pytest.mark.slow
def test_a_kill_anywhere_in_a_save_resumes_to_the_uninterrupted_result(runs, tmp_path):
    reference, starts, logs = runs
    trials, _ = plan(logs)
    rng, again, starts_at = random.Random(SEED), [], []
    for i, (scenario, k) in enumerate(trials):
        source, resume, resumed_at, saved = starts[scenario]
        folder = start_folder(tmp_path / f"trial-{i:02d}", source)
        resume = resume_arg(folder, resume)
        # what the kill must not lose: the newest checkpoint that was complete before it
        floor = max(saved, resumed_at + logs[scenario][:k - 1].count(PUBLISH))
        status = in_child(lambda k=k, f=folder, r=resume: (count_file_operations([], killed_at(k)), train(f, r)))
        assert status == -signal.SIGKILL, f"trial {i} ({scenario}, k={k}) was not killed: status {status}"
        if floor <= STEPS - 2 and len(again) < TWICE:  # so the resumed run must save; it dies too, early: while it
            k2 = rng.randint(1, 12)                      # repairs the leftovers or inside its first save
            again.append(in_child(lambda k2=k2, f=folder: (count_file_operations([], killed_at(k2)), train(f))))
        final, start, _ = resumed(folder)
        starts_at.append(start)
        assert start >= floor, f"trial {i} ({scenario}, k={k}): resumed from step {start}, step {floor} was saved"
        for name, want in reference.items():
            torch.testing.assert_close(final[name], want, rtol=0, atol=1e-6, msg=f"trial {i} ({scenario}, k={k})")
        if start < STEPS:  # it saved again, so the leftovers are cleared and old checkpoints pruned
            assert sorted(p.name for p in folder.iterdir()) == ["step-000004", "step-000005"], f"trial {i}"
            assert all(verify_checkpoint(folder / f"step-00000{s}") is None for s in (4, 5)), f"trial {i}"
        else:  # the kill came after step 5 was whole: it is found, perhaps in a temp folder the next save renames
            assert json.loads((resolve_resume(folder, "latest") / "state.json").read_text())["step"] == STEPS
    assert again == [-signal.SIGKILL] * TWICE
    print(f"{len(trials)} trials; resumed from steps {sorted(starts_at)}; second kills: {again}")


def test_a_truncated_newest_optimizer_file_falls_back_to_the_previous_checkpoint(runs, tmp_path):
    reference, starts, _ = runs
    folder = start_folder(tmp_path, starts["broken newest"][0])
    final, start, said = resumed(folder)
    assert start == 2 and len(said) == 1
    assert f"skipping checkpoint {folder / 'step-000003'}: optimizer.safetensors holds 100 bytes" in said[0]
    for name, want in reference.items():
        torch.testing.assert_close(final[name], want, rtol=0, atol=1e-6)
    assert sorted(p.name for p in folder.iterdir()) == ["step-000004", "step-000005"]


def _distill_cfg(base: dict, out: Path):
    train_cfg = {**base["train"], "max_steps": 3, "checkpoint_every": 1, "keep_checkpoints": 1, "output_dir": str(out)}
    return config_from_dict({**base, "train": train_cfg})


@pytest.fixture
def one_thread():
    """The forked child computes on one thread (see in_child); so do the runs it is compared with, or a different
    summation order alone moves the LoRA by ~1e-6."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate_state", "one_thread")
def test_distill_killed_inside_a_save_resumes_to_the_uninterrupted_lora(tmp_path, capsys):
    base = tiny_world(tmp_path, methods=())
    straight = _distill_cfg(base, tmp_path / "straight")
    distill(straight, loader_factory(straight), progress=False)
    cfg = _distill_cfg(base, tmp_path / "killed")

    def killed_run():  # dies in step 3's save, its LoRA and optimizer files written, the RNG file not yet
        AcceleratorState._reset_state(reset_partial_state=True)
        count_file_operations([], lambda log: log[-1] == "save_file rng.safetensors" and log.count(log[-1]) == 3)
        distill(cfg, loader_factory(cfg), progress=False)

    assert in_child(killed_run) == -signal.SIGKILL
    folder = tmp_path / "killed" / "checkpoints"
    assert [p.name[:len(".tmp-step-000003")] for p in sorted(folder.iterdir())] == [".tmp-step-000003",
                                                                                   "step-000002"]
    assert not (tmp_path / "killed" / "lora").exists()
    AcceleratorState._reset_state(reset_partial_state=True)
    capsys.readouterr()
    assert distill(cfg, loader_factory(cfg), resume="latest", progress=False)["steps"] == 3
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]  # one line each
    assert len(said) == 1 and ".tmp-step-000003-" in said[0] and "no COMPLETE marker" in said[0]
    assert sorted(p.name for p in folder.iterdir()) == ["step-000003"]
    _assert_same_lora(tmp_path / "straight" / "lora", tmp_path / "killed" / "lora")

    def killed_export():  # a rerun re-exports; it dies with the old export moved aside and the new not yet in
        AcceleratorState._reset_state(reset_partial_state=True)
        count_file_operations([], lambda log: log[-1] == "replace .tmp-lora -> lora")
        distill(cfg, loader_factory(cfg), resume="latest", progress=False)

    assert in_child(killed_export) == -signal.SIGKILL
    out = tmp_path / "killed"
    assert not (out / "lora").exists() and [_kind(p) for p in sorted(out.glob(".*-lora-*"))] == [".old-lora",
                                                                                               ".tmp-lora"]
    _assert_same_lora(tmp_path / "straight" / "lora", next(out.glob(".old-lora-*")))  # the old export is whole
    AcceleratorState._reset_state(reset_partial_state=True)
    distill(cfg, loader_factory(cfg), resume="latest", progress=False)
    assert list(out.glob(".*-lora-*")) == []
    _assert_same_lora(tmp_path / "straight" / "lora", out / "lora")


def _assert_same_lora(want_dir: Path, got_dir: Path) -> None:
    assert sorted(p.name for p in got_dir.iterdir()) == sorted(p.name for p in want_dir.iterdir())
    assert (got_dir / "pcm_config.json").read_text() == (want_dir / "pcm_config.json").read_text()
    for name in ("pytorch_lora_weights.safetensors", "pcm_lora_kohya.safetensors"):
        want, got = load_file(want_dir / name), load_file(got_dir / name)
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=f"{got_dir / name}: {key}")
