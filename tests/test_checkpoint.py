"""Checkpoint files: optimizer state of any nesting survives save -> load exactly, through safetensors + JSON."""

import json

import torch
from safetensors.torch import load_file

from pcm.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint


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
