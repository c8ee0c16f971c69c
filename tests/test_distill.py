"""`pcm distill` on a tiny SD1.5-shaped teacher: methods, resume after SIGTERM, 2 processes, bad configs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from worlds import world_cfg

from pcm.cli import main
from pcm.data.loader import loader_factory
from pcm.models.lora import read_metadata
from pcm.train.distill import Preempted, _micro_losses, distill, setup

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _lora(out) -> dict[str, torch.Tensor]:
    return load_file(Path(out) / "lora" / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("distill_cfg,train_cfg", [
    ({"method": "pcm", "guidance": "small_cfg"}, {}),
    ({"method": "pcm", "guidance": "normal_cfg", "caption_dropout": 0.5, "target_net": "ema"}, {}),
    ({"method": "lcm", "num_phases": 1}, {}),
    ({"method": "pcm"}, {"mixed_precision": "bf16", "gradient_accumulation_steps": 2, "gradient_checkpointing": True}),
], ids=["pcm-small-cfg", "pcm-normal-cfg-ema", "lcm", "pcm-bf16-accumulate-checkpointing"])
def test_each_method_and_variant_trains_exports_and_writes_grids(shapes_world, tmp_path, distill_cfg, train_cfg):
    root, base = shapes_world
    cfg = world_cfg(base, tmp_path / "run", distill=distill_cfg, train={"validate_every": 2, **train_cfg})
    summary = distill(cfg, loader_factory(cfg), progress=False)
    assert summary["steps"] == 2 and summary["nonfinite_steps"] == 0 and Path(summary["validation_grid"]).is_file()
    card = read_metadata(summary["lora"])
    assert card.method == distill_cfg["method"] and card.num_phases == cfg.distill.num_phases
    if distill_cfg["method"] == "pcm":
        assert card.edges == (0, 499) and card.sampling_timesteps == [999, 499, 0]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] > 0 for r in records)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000002"]


@pytest.mark.slow
def test_loss_falls_over_50_steps_on_a_fixed_batch(shapes_world, tmp_path):
    # the same images and the same draws (step key 0) every time: the student must fit this one problem
    root, base = shapes_world
    cfg = world_cfg(base, tmp_path / "run", distill={"loss": "l2"}, train={"batch_size": 8, "learning_rate": 3e-3})
    run = setup(cfg, loader_factory(cfg), None)
    batch = next(iter(run.data))
    losses = []
    for _ in range(50):
        loss = _micro_losses(run, cfg, batch, 0)["total"]
        run.accelerator.backward(loss)
        run.opt.optimizer.step()
        run.opt.optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses


class SigtermAt:
    """A metrics sink that delivers SIGTERM to this process at one step, like a Kubernetes preemption."""

    def __init__(self, step):
        self.step = step

    def log(self, step, metrics):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_checkpoint_and_resume_match_an_uninterrupted_run(shapes_world, tmp_path):
    root, base = shapes_world
    train = {"max_steps": 6, "checkpoint_every": 100}
    straight = world_cfg(base, tmp_path / "straight", train=train, distill={"target_net": "ema"})
    distill(straight, loader_factory(straight), progress=False)
    interrupted = world_cfg(base, tmp_path / "resumed", train=train, distill={"target_net": "ema"})
    with pytest.raises(Preempted, match="--resume latest"):
        distill(interrupted, loader_factory(interrupted), sink=SigtermAt(3), progress=False)
    # The signal lands while step 3 is logged, after that step's one host sync has read the flag: step 4 sees it
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step-000004"]
    assert distill(interrupted, loader_factory(interrupted), resume="latest", progress=False)["steps"] == 6
    a, b = _lora(tmp_path / "straight"), _lora(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


ADVERSARIAL = {"weight": 0.1, "learning_rate": 1e-3, "head_kernel": 3}


def _checkpoint(out, step):
    return load_file(Path(out) / "checkpoints" / f"step-{step:06d}" / "lora.safetensors")


@pytest.mark.parametrize("schedule", ["joint", "alternate"])
def test_adversarial_schedules_train_the_heads_and_checkpoint_them(shapes_world, tmp_path, schedule):
    root, base = shapes_world
    cfg = world_cfg(base, tmp_path / "run", adversarial={**ADVERSARIAL, "schedule": schedule},
               train={"checkpoint_every": 1})
    assert distill(cfg, loader_factory(cfg), progress=False)["steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    if schedule == "joint":
        assert all(r["g_loss"] > 0 and r["d_loss"] > 0 for r in records), records
    else:  # a G step computes no D loss, a D step no G loss
        assert "d_loss" not in records[0] and records[0]["g_loss"] > 0, records
        assert "g_loss" not in records[1] and records[1]["d_loss"] > 0, records
    lora_1, lora_2 = _checkpoint(tmp_path / "run", 1), _checkpoint(tmp_path / "run", 2)
    heads = [k for k in lora_1 if k.startswith("disc.heads.")]
    student = [k for k in lora_1 if not k.startswith("disc.")]
    assert heads and student
    step_2_moved_heads = any(not torch.equal(lora_1[k], lora_2[k]) for k in heads)
    step_2_moved_student = any(not torch.equal(lora_1[k], lora_2[k]) for k in student)
    # joint: both every step; alternate: step 1 is a G step, step 2 a D-only step
    assert step_2_moved_heads
    assert step_2_moved_student == (schedule == "joint")
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000002" / "state.json").read_text())
    assert "disc_optimizer" in state and (tmp_path / "run" / "checkpoints" / "step-000002" /
                                          "disc_optimizer.safetensors").is_file()


def test_adversarial_resume_restores_the_heads_and_their_optimizer(shapes_world, tmp_path):
    root, base = shapes_world
    train = {"max_steps": 4, "checkpoint_every": 100}
    straight = world_cfg(base, tmp_path / "straight", train=train, adversarial=ADVERSARIAL)
    distill(straight, loader_factory(straight), progress=False)
    interrupted = world_cfg(base, tmp_path / "resumed", train=train, adversarial=ADVERSARIAL)
    with pytest.raises(Preempted):
        distill(interrupted, loader_factory(interrupted), sink=SigtermAt(2), progress=False)
    distill(interrupted, loader_factory(interrupted), resume="latest", progress=False)
    a, b = _checkpoint(tmp_path / "straight", 4), _checkpoint(tmp_path / "resumed", 4)
    assert any(k.startswith("disc.") for k in a) and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def _cli_args(base, out, max_steps=3):
    cfg = world_cfg(base, out, train={"max_steps": max_steps})
    d = cfg.data
    return ["distill", "--params", "params.yaml", f"teacher.model={cfg.teacher.model}",
            f"data.output_dir={d.output_dir}", f"data.resolution={d.resolution}", f"train.output_dir={out}",
            "lora.rank=4", "lora.alpha=4", "distill.num_solver_steps=20", "distill.num_phases=2",
            "train.batch_size=4", f"train.max_steps={max_steps}", "train.validate_every=0", "train.log_every=1",
            "train.data_split=samples", "train.shuffle_buffer=8", "train.learning_rate=0.00001",
            "train.lr_warmup_steps=0", "train.checkpoint_every=1000"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _pcm(*args):
    return subprocess.run([sys.executable, "-m", "pcm.cli", *args], env=_env(), capture_output=True, text=True,
                          timeout=300)


def _sigterm_the_parent_after_its_first_step(args: list[str], out: Path) -> tuple[int, str]:
    """Starts `pcm distill --processes 2`, sends SIGTERM to that parent process once a step is logged."""
    parent = subprocess.Popen([sys.executable, "-m", "pcm.cli", *args, "--processes", "2"], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
        assert parent.poll() is None and time.monotonic() < deadline, parent.communicate()[1][-3000:]
        time.sleep(0.05)
    parent.send_signal(signal.SIGTERM)
    _, err = parent.communicate(timeout=240)
    return parent.returncode, err


@pytest.mark.slow
def test_two_processes_match_one_and_a_sigterm_to_their_parent_checkpoints_and_resumes(shapes_world, tmp_path):
    # Same global batch, same samples (data_split=samples), same keyed draws: one and two processes differ only by
    # float rounding of batch-2 vs batch-4 kernels and the DDP all-reduce, which Adam's g / sqrt(v) normalisation
    # turns into weight differences up to the learning rate where a gradient is near zero (LoRA A's first
    # gradients are, with B = 0 at init): measured 8.5e-5 at lr 1e-4, hence lr 1e-5 here.
    root, base = shapes_world
    code, err = _sigterm_the_parent_after_its_first_step(_cli_args(base, tmp_path / "two", 500), tmp_path / "two")
    assert code == 143, err[-3000:]
    assert "--resume latest" in err.strip().splitlines()[-1]
    (checkpoint,) = (tmp_path / "two" / "checkpoints").iterdir()  # written by the ranks after the signal
    stopped = int(checkpoint.name.removeprefix("step-"))
    assert 1 <= stopped < 500 and (checkpoint / "state.json").is_file()
    total = stopped + 2
    resumed = _pcm(*_cli_args(base, tmp_path / "two", total), "--processes", "2", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = _pcm(*_cli_args(base, tmp_path / "straight", total), "--processes", "2")
    assert straight.returncode == 0, straight.stderr[-3000:]
    one = _pcm(*_cli_args(base, tmp_path / "one", total))
    assert one.returncode == 0, one.stderr[-3000:]
    a, b, c = _lora(tmp_path / "straight"), _lora(tmp_path / "two"), _lora(tmp_path / "one")
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)  # preempted + resumed == uninterrupted
        torch.testing.assert_close(c[key], a[key], rtol=0, atol=1e-5)  # one process == two
    assert max(a[key].abs().max() for key in a if "lora_B" in key) > 1e-5  # trained past the tolerance


@pytest.mark.parametrize("override,message", [
    ("teacher.family=kandinsky", "teacher.family='kandinsky'"),
    ("teacher.model=./no/such/dir", "teacher.model=./no/such/dir: no such directory"),
    ("data.resolution=20", "data.resolution=20: must be a positive multiple of 8"),
    ("distill.num_phases=60", "distill.num_phases=60: must satisfy 1 <= M <= N"),
])
def test_bad_config_fails_before_any_model_loads_naming_the_key(override, message, capsys, tmp_path):
    code = main(["distill", "--params", "params.yaml", f"train.output_dir={tmp_path}", override])
    assert code in (1, 2) and message in capsys.readouterr().err


@pytest.mark.slow
def test_non_finite_losses_are_skipped_counted_and_stop_the_run_after_ten(shapes_world, tmp_path, monkeypatch):
    import pcm.train.distill as module

    root, base = shapes_world
    real = module._micro_losses
    calls = {"n": 0}

    def flaky(run, cfg, batch, k):  # steps 2 and 3 give NaN, then from step 6 on every step does
        calls["n"] += 1
        out = real(run, cfg, batch, k)
        if calls["n"] in (2, 3) or calls["n"] >= 6:
            out["total"] = out["total"] * float("nan")
        return out

    monkeypatch.setattr(module, "_micro_losses", flaky)
    cfg = world_cfg(base, tmp_path / "run", train={"max_steps": 30, "checkpoint_every": 100})
    with pytest.raises(module.NonFiniteLoss, match="10 steps in a row, the last at step 15"):
        distill(cfg, loader_factory(cfg), progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 4, 5]  # skipped steps log nothing
    assert records[-1]["nonfinite_steps"] == 2.0


def test_adamw_is_fused_on_cpu_and_makes_the_per_tensor_update():
    """The training optimizer is torch's fused AdamW where the device has the kernel; its steps equal the per-tensor
    loop's (the reference layout's optimizer) to float rounding."""
    from pcm.train.optim import adamw

    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 8, generator=gen), torch.randn(8, 3, 3, 3, generator=gen)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(5)]
    results = []
    for make in (lambda ps: adamw(ps, lr=1e-2, weight_decay=1e-2),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2, foreach=False)):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = make(params)
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            opt.step()
        results.append((opt.defaults.get("fused"), [p.detach() for p in params]))
    (fused, ours), (_, loop) = results
    assert fused is True
    for a, b in zip(ours, loop, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
