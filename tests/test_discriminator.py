"""The adversarial loss (docs/method.md §6): the discriminator on the shared UNet, its hinge losses, and r.

The student pass (adapters on) and the discriminator pass (adapters off) share one UNet with gradient
checkpointing on: a recompute under the wrong adapter state would change the generator's gradient. The hinge acts
per position and per head before averaging, as the reference's discriminator_sdxl.py; the features are those of the
real UNet forward; r covers [s, min(s + T/M, T) - 1].
"""

import copy
import unittest.mock

import pytest
import torch
from builders import CAPTIONS, save_tiny

from pcm.config import TeacherConfig, config_from_dict
from pcm.math import SolverGrid
from pcm.math.losses import hinge_d_loss, hinge_g_loss
from pcm.models.discriminator import Discriminator, Head, encoder_features, head_channels
from pcm.models.families import load_teacher
from pcm.models.lora import attach_lora
from pcm.models.tiny import TinySizes, build_tokenizer, tiny_sd15_components, tiny_sdxl_components
from pcm.rng import keyed_draws
from pcm.train.step import make_loss

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
SIZES = TinySizes(unet_channels=(32, 64), attention_head_dim=4, cross_attention_dim=32, text_hidden=32)


def _setup(family: str, kernel_size: int):
    torch.manual_seed(0)
    factory = tiny_sd15_components if family == "sd15" else tiny_sdxl_components
    unet = factory(build_tokenizer(["a red circle"]), SIZES)["unet"]
    reference = copy.deepcopy(unet).requires_grad_(False)  # the teacher as a second, frozen copy
    lora = attach_lora(unet, rank=4, alpha=4, target_modules=TARGETS)
    with torch.no_grad():
        for p in lora:  # B = 0 at init would make adapters on and off identical; make the student differ
            p.normal_(std=0.05)
    unet.enable_gradient_checkpointing()
    unet.train()
    disc = Discriminator(unet, kernel_size)
    return unet, reference, lora, disc


def _cond(family: str, batch: int) -> dict:
    g = torch.Generator().manual_seed(1)
    hidden = SIZES.text_hidden  # sdxl: encoder 1 of this width, encoder 2 (pooled) of twice it
    cond = {"encoder_hidden_states": torch.randn(batch, 7, hidden if family == "sd15" else 3 * hidden, generator=g)}
    if family == "sdxl":
        cond |= {"text_embeds": torch.randn(batch, 2 * hidden, generator=g),
                 "time_ids": torch.rand(batch, 6, generator=g) * 64}
    return cond


def _generator_grads(unet, disc, lora, features_fn, family):
    """Student forward (adapters on, checkpointed) -> re-noised fake -> G hinge loss; grads of LoRA and heads."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = _cond(family, 2)
    t, r = torch.tensor([500, 700]), torch.tensor([600, 800])
    added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond} or None
    fake = unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added).sample
    logits = features_fn(fake, r, cond)
    loss = hinge_g_loss(logits)
    params = [*lora, *disc.heads.parameters()]
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize(("family", "kernel_size"), [("sd15", 3), ("sdxl", 1)])
def test_generator_gradient_equals_a_separate_frozen_copy(family, kernel_size):
    unet, reference, lora, disc = _setup(family, kernel_size)

    def reference_d(x_r, r, cond):
        feats = encoder_features(reference, x_r, r, cond)
        return [h(f).float().flatten(1) for h, f in zip(disc.heads, feats, strict=True)]

    loss, grads = _generator_grads(unet, disc, lora, disc, family)
    ref_loss, ref_grads = _generator_grads(unet, disc, lora, reference_d, family)
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    worst = max((a - b).abs().max().item() for a, b in zip(grads, ref_grads, strict=True))
    assert worst < 1e-5, f"generator gradient differs from the separate-copy reference by {worst:.2e}"
    assert any(a.abs().max() > 0 for a in grads[: len(lora)]), "the LoRA must receive gradient through D"
    assert unet.down_blocks[0].gradient_checkpointing, "the discriminator must restore the checkpointing flags"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_joint_turn_shares_the_fake_s_backbone_pass_and_equals_a_d_turn_plus_a_g_turn(family):
    """One backbone pass over the fake serves D (detached) and G (live): the same losses and the same gradients of
    the student's LoRA and of the heads as the separate D call over [real; fake.detach()] and G call on the fake."""
    unet, _, lora, disc = _setup(family, 1)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=g)
    real = torch.randn(2, 4, 8, 8, generator=g)
    cond, t, r = _cond(family, 2), torch.tensor([500, 700]), torch.tensor([600, 800])
    added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond} or None
    params = [*lora, *disc.heads.parameters()]
    calls = []
    original = Discriminator._features

    def counted(self, x_r, r_, c):
        calls.append(len(x_r))
        return original(self, x_r, r_, c)

    def losses(joint: bool):
        fake = unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added).sample
        if joint:
            d_real, d_fake, g_fake = disc(real, r, cond, train_heads=True, fake=fake)
        else:
            logits = disc(torch.cat([real, fake.detach()]), torch.cat([r, r]), {k: torch.cat([v, v])
                                                                                   for k, v in cond.items()})
            d_real, d_fake = zip(*(head.chunk(2) for head in logits), strict=True)
            g_fake = disc(fake, r, cond, train_heads=False)
        d_loss, g_loss = hinge_d_loss(d_real, d_fake), hinge_g_loss(g_fake)
        d_grads = torch.autograd.grad(d_loss, params, retain_graph=True, allow_unused=True)
        g_grads = torch.autograd.grad(g_loss, params, allow_unused=True)
        return d_loss.detach(), g_loss.detach(), d_grads, g_grads

    with unittest.mock.patch.object(Discriminator, "_features", counted):
        joint = losses(True)
        assert calls == [2, 2]  # real once, fake once (the separate calls take 4 + 2 samples)
        calls.clear()
        separate = losses(False)
        assert calls == [4, 2]
    torch.testing.assert_close(joint[0], separate[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(joint[1], separate[1], rtol=0, atol=1e-6)
    for a_grads, b_grads in ((joint[2], separate[2]), (joint[3], separate[3])):
        for a, b in zip(a_grads, b_grads, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    n = len(lora)
    assert all(gr is None or gr.abs().max() == 0 for gr in joint[2][:n]), "D's loss must not reach the student"
    assert all(gr is None or gr.abs().max() == 0 for gr in joint[3][n:]), "G's loss must not train the heads"
    assert any(gr is not None and gr.abs().max() > 0 for gr in joint[3][:n]), "G's loss must reach the student"


def test_discriminator_holds_only_the_heads_and_the_d_loss_trains_them():
    unet, _, lora, disc = _setup("sd15", 3)
    names = [n for n, _ in disc.named_parameters()]
    assert names and all(n.startswith("heads.") for n in names), "the UNet must not be registered in D"
    assert [h.out.in_channels for h in disc.heads] == head_channels(unet) == [32, 64, 64]
    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g) * 2
    r, cond = torch.tensor([300, 900]), _cond("sd15", 2)
    loss = hinge_d_loss(disc(real, r, cond), disc(fake.requires_grad_(), r, cond))
    loss.backward()
    assert all(p.grad is not None for p in disc.heads.parameters())
    assert all(p.grad is None for p in lora), "the D loss must not reach the student's LoRA"


def test_head_rejects_other_kernel_sizes():
    with pytest.raises(ValueError, match="kernel_size=5"):
        Head(32, 5)


# ---- the hinge losses: per position and per head, then averaged (docs/method.md §6) ---------------------------------

def _loop_hinge(heads: list[list[list[float]]], sign: float, weight: list[float]) -> float:
    """(1/H) sum_h mean_{b,p} w_b max(0, 1 + sign l), with plain Python floats (no torch reduction)."""
    total = 0.0
    for head in heads:
        terms = [w * max(0.0, 1.0 + sign * v) for row, w in zip(head, weight, strict=True) for v in row]
        total += sum(terms) / len(terms)
    return total / len(heads)


# three heads with 4, 1 and 6 positions, batch 2. Sample 0's mean logit on head 0 is 1.5 (> 1) while two of its
# positions are below 1; head 2 is inside the margin on average for the discriminator but not at every position.
HEADS = [
    [[3.0, 2.5, 0.25, 0.25], [-0.5, 0.0, 2.0, -3.0]],
    [[0.5], [-2.0]],
    [[1.5, -1.5, 0.9, -0.9, 2.5, 0.0], [0.2, -0.2, 1.2, -1.2, 0.0, 3.0]],
]


def _tensors(heads, requires_grad=False):
    return [torch.tensor(h, dtype=torch.float64, requires_grad=requires_grad) for h in heads]


@pytest.mark.parametrize("weight", [None, [0.25, 2.0]])
def test_hinge_losses_equal_an_independent_per_position_per_head_computation(weight):
    real, fake = HEADS, [[[-v for v in row] for row in h] for h in HEADS[::-1]]  # fake: other shapes, other values
    w_list = weight or [1.0, 1.0]
    w = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    d = hinge_d_loss(_tensors(real), _tensors(fake), weight=w)
    g = hinge_g_loss(_tensors(fake), weight=w)
    assert d.dtype == torch.float64
    assert float(d) == pytest.approx(_loop_hinge(real, -1, w_list) + _loop_hinge(fake, 1, w_list), rel=1e-12)
    assert float(g) == pytest.approx(_loop_hinge(fake, -1, w_list), rel=1e-12)
    # the old reduction (mean logit per sample over positions, then heads; hinge on that) gives another number
    mean_first = [sum(sum(h[b]) / len(h[b]) for h in real) / len(real) for b in range(2)]
    old_g = sum(wb * max(0.0, 1 - m) for wb, m in zip(w_list, mean_first, strict=True)) / 2
    assert abs(float(hinge_g_loss(_tensors(real), weight=w)) - old_g) > 0.05


def test_generator_gradient_stays_alive_where_the_mean_logit_passed_the_margin():
    head = torch.tensor([[3.0, 2.5, 0.25, 0.25]], dtype=torch.float64, requires_grad=True)  # mean 1.5 > 1
    (grad,) = torch.autograd.grad(hinge_g_loss([head]), head)
    # d/dl mean_p relu(1 - l) = -1/P where l < 1, else 0
    assert grad.tolist() == [[0.0, 0.0, -0.25, -0.25]]
    (old,) = torch.autograd.grad(torch.relu(1 - head.mean(dim=1)).mean(), head)  # the mean-first form
    assert not old.any(), "the mean-first form must be the one whose gradient vanishes here"
    # over several heads each head's positions get 1/(H P_h B) of the gradient
    heads = _tensors(HEADS, requires_grad=True)
    grads = torch.autograd.grad(hinge_g_loss(heads), heads)
    for h, gr in zip(heads, grads, strict=True):
        expected = (h.detach() < 1).double() * (-1.0 / (len(HEADS) * h.numel()))
        torch.testing.assert_close(gr, expected, rtol=0, atol=1e-15)


def test_hinge_losses_take_a_single_tensor_as_one_head_and_refuse_no_heads():
    d = torch.tensor([[2.0, 0.5], [-2.0, 0.5]])
    assert float(hinge_g_loss(d)) == pytest.approx((0 + 0.5 + 3 + 0.5) / 4)
    assert float(hinge_g_loss(d)) == float(hinge_g_loss([d]))
    with pytest.raises(ValueError, match="at least one"):
        hinge_g_loss([])


# ---- the features are the real UNet forward's; r covers its range -------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_encoder_features_are_the_down_and_mid_block_outputs_of_the_real_unet_forward(family, tmp_path):
    teacher = load_teacher(TeacherConfig(family=family, model=str(save_tiny(tmp_path / family, family))))
    unet = teacher.backbone
    captured = {}

    def keep(name):
        def hook(module, args, output):  # a down block returns (hidden_states, residuals); the mid block a tensor
            captured[name] = output[0] if isinstance(output, tuple) else output
        return hook

    blocks = {f"down{i}": b for i, b in enumerate(unet.down_blocks)} | {"mid": unet.mid_block}
    handles = [block.register_forward_hook(keep(name)) for name, block in blocks.items()]
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 37])
    cond = teacher.encode_prompts(CAPTIONS)
    with torch.no_grad():
        teacher.eps_fn(x, t, cond)  # UNet2DConditionModel.forward, as the teacher calls it
        for handle in handles:
            handle.remove()
        ours = encoder_features(unet, x, t, cond)
    assert len(ours) == len(blocks) == len(head_channels(unet))
    for feature, name in zip(ours, blocks, strict=True):
        torch.testing.assert_close(feature, captured[name], rtol=0, atol=1e-6, msg=f"{family} {name}")
    # the discriminator on the student's UNet (adapters attached and nonzero) sees the teacher's features, and
    # returns its heads' logit maps unreduced: one logit per position of each feature map
    with torch.no_grad():
        for p in attach_lora(unet, rank=4, alpha=4, target_modules=TARGETS):
            p.normal_(std=0.05)
        disc = Discriminator(unet, 1)
        logits = disc(x, t, cond, train_heads=False)
        expected = [head(captured[name]).flatten(1) for head, name in zip(disc.heads, blocks, strict=True)]
    assert [tuple(h.shape) for h in logits] == [(2, f.shape[2] * f.shape[3]) for f in ours]
    for got, want in zip(logits, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_renoise_timestep_covers_its_range_uniformly_for_every_edge():
    """r ~ U{s, ..., min(s + T/M, T) - 1}, drawn by PCMLoss.adversarial itself from the keyed draws."""
    cfg = config_from_dict({"distill": {"num_solver_steps": 20, "num_phases": 4}})
    T, M, per_edge = 1000, 4, 2000
    grid = SolverGrid(T, 20, M)
    loss = make_loss(cfg.distill, grid, torch.linspace(0.9999, 0.01, T, dtype=torch.float64), seed=7)
    starts = [*grid.edges.tolist(), T - 5]  # the phase edges; T - 5 exercises the clamp at T
    seen = []

    def recording_disc(x_r, r, cond, train_heads):
        seen.append(r.clone())
        return [x_r.flatten(1)]

    for k, start in enumerate(starts):
        ids = torch.arange(k * per_edge, (k + 1) * per_edge)
        draws = keyed_draws(7, 3, ids, (2,), with_z=True)
        f = torch.zeros(per_edge, 2, dtype=torch.float64)
        s = torch.full((per_edge,), start)
        seen.clear()
        loss.adversarial(recording_disc, f, f, s, f, draws, "g")
        r = seen[0]
        lo, hi = start, min(start + T // M, T) - 1
        assert int(r.min()) == lo and int(r.max()) == hi, f"s={start}: r in [{int(r.min())}, {int(r.max())}]"
        counts = torch.bincount(r - lo, minlength=hi - lo + 1).double()
        if hi - lo + 1 >= 100:  # roughly uniform: each tenth of the range within 5 sigma of its expectation
            tenths = torch.stack([c.sum() for c in counts.tensor_split(10)])
            expected = per_edge * torch.tensor([len(c) for c in counts.tensor_split(10)]) / len(counts)
            assert ((tenths - expected).abs() < 5 * expected.sqrt()).all(), tenths.tolist()
        else:
            assert (counts > 0).all(), counts.tolist()
    assert grid.edges.tolist() == [0, 249, 499, 749]
