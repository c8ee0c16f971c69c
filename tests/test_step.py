"""The model-agnostic PCM / LCM training steps on the analytic teacher and a small MLP student."""

import dataclasses

import pytest
import torch

from pcm.config import config_from_dict
from pcm.eval.toy_gmm import batch_source, make_world
from pcm.math import SolverGrid, as_schedule, solver_step
from pcm.models.toy import ResidualMLPStudent
from pcm.rng import U_W, keyed_draws
from pcm.train.ema import EMA
from pcm.train.loop import target_net_for
from pcm.train.step import TEACHER_GUIDANCE, Batch, LCMLoss, Nets, PCMLoss, make_loss


def _setup(**distill):
    cfg = config_from_dict({"distill": {"num_solver_steps": 20, "num_phases": 4, "w_min": 1.0, "w_max": 2.0,
                                        **distill}})
    world = make_world(cfg)
    torch.manual_seed(0)
    student = ResidualMLPStudent(world.teacher, 2, 3, 1000)
    for p in student.net[-1].parameters():  # a student that differs from the teacher
        torch.nn.init.normal_(p, std=0.05)
    grid = SolverGrid(1000, cfg.distill.num_solver_steps, cfg.distill.num_phases)
    batch = batch_source(world, 16, seed=0)(3)
    return cfg, world, student, make_loss(cfg.distill, grid, world.abar, cfg.seed), batch


def _split(batch: Batch, idx: slice) -> Batch:
    return Batch(batch.x_0[idx], batch.cond[idx], batch.uncond[idx], batch.ids[idx])


@pytest.mark.parametrize("method", ["pcm", "lcm"])
def test_loss_and_gradient_do_not_depend_on_how_the_batch_is_split(method):
    distill = {} if method == "pcm" else {"method": "lcm", "num_phases": 1}
    cfg, world, student, loss_fn, batch = _setup(loss="l2", **distill)
    assert isinstance(loss_fn, PCMLoss if method == "pcm" else LCMLoss)
    nets = Nets(student, world.teacher, student)

    def loss_and_grad(b):
        student.zero_grad()
        loss = loss_fn(nets, b, 5, "g")["loss"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in student.net.parameters()]

    whole, g_whole = loss_and_grad(batch)
    halves = [loss_and_grad(_split(batch, s)) for s in (slice(0, 8), slice(8, 16))]
    # equal halves: the mean over the batch is the mean of the two processes' means (what DDP averages)
    torch.testing.assert_close(whole, (halves[0][0] + halves[1][0]) / 2, rtol=1e-5, atol=1e-9)
    for g, a, b in zip(g_whole, halves[0][1], halves[1][1], strict=True):
        torch.testing.assert_close(g, (a + b) / 2, rtol=1e-4, atol=1e-8)
    # a restart recomputes the same step exactly
    assert torch.equal(loss_and_grad(batch)[0], whole)


def test_keyed_draws_depend_only_on_seed_step_and_id():
    ids = torch.tensor([4, 9, 2])
    a = keyed_draws(0, 7, ids, (2,))
    b = keyed_draws(0, 7, ids.flip(0), (2,))
    assert torch.equal(a.eps, b.eps.flip(0)) and torch.equal(a.u, b.u.flip(0))
    assert not torch.equal(keyed_draws(0, 8, ids, (2,)).eps, a.eps)
    assert not torch.equal(keyed_draws(1, 7, ids, (2,)).eps, a.eps)
    with_z = keyed_draws(0, 7, ids, (2,), with_z=True)
    assert torch.equal(with_z.eps, a.eps) and with_z.z is not None  # adding z never changes eps


def test_loss_vanishes_when_student_is_the_teachers_own_solver_step():
    # M = N: every phase is one solver step, the target is the teacher's step itself, and an unguided
    # student equal to the teacher predicts exactly that step.
    cfg, world, _, loss_fn, batch = _setup(num_solver_steps=10, num_phases=10, guidance="normal_cfg",
                                           caption_dropout=0.5, loss="l2")
    exact = Nets(world.teacher, world.teacher, world.teacher)
    loss = loss_fn(exact, batch, 0)
    assert float(loss["loss"]) < 1e-12
    # guidance in the solver makes the target differ from the unguided student
    _, _, _, guided, _ = _setup(num_solver_steps=10, num_phases=10, loss="l2")
    loss_g = guided(exact, batch, 0)
    assert float(loss_g["loss"]) > 1e-6


class CountingTeacher:
    def __init__(self, teacher):
        self.teacher, self.batch_sizes = teacher, []

    def __call__(self, x_t, t, cond):
        self.batch_sizes.append(len(x_t))
        return self.teacher(x_t, t, cond)


@pytest.mark.parametrize("guidance,extra,expected", [("small_cfg", {}, [32]),
                                                     ("normal_cfg", {"caption_dropout": 0.1}, [16])])
def test_teacher_runs_one_batched_pass_and_none_for_uncond_in_normal_cfg(guidance, extra, expected):
    cfg, world, student, loss_fn, batch = _setup(guidance=guidance, **extra)
    teacher = CountingTeacher(world.teacher)
    loss_fn(Nets(student, teacher, student), batch, 0)
    assert teacher.batch_sizes == expected


class EmbeddedGuidance:
    """A denoiser behind a FLUX.1-dev-like condition {'label', 'guidance'}: records each call's batch size and
    embedded guidance, and scales its output by the guidance so that how the solver uses it shows in x_{t'}."""

    def __init__(self, net):
        self.net, self.calls = net, []

    def __call__(self, x_t, t, cond):
        self.calls.append((len(x_t), cond["guidance"].clone()))
        return self.net(x_t, t, cond["label"]) * cond["guidance"][:, None].to(x_t.dtype)


def test_an_embedded_guidance_teacher_is_called_once_per_solver_step_with_the_drawn_guidance():
    cfg, world, student, cfg_loss, batch = _setup()
    fixed = torch.full((16,), 3.5)  # what the student is trained and sampled at (FluxPipeline's default)
    flux = Batch(batch.x_0, {"label": batch.cond, "guidance": fixed}, {"label": batch.uncond, "guidance": fixed},
                 batch.ids)
    loss_fn = make_loss(cfg.distill, cfg_loss.grid, world.abar, cfg.seed, teacher_guidance="embedded")
    teacher, learner = EmbeddedGuidance(world.teacher), EmbeddedGuidance(student)
    o, _ = loss_fn.solve(teacher, flux, 3)
    u = keyed_draws(cfg.seed, 3, batch.ids, tuple(batch.x_0.shape[1:])).u[:, U_W]
    drawn = 1 + cfg.distill.w_min + (cfg.distill.w_max - cfg.distill.w_min) * u  # guidance scale 1 + w, w ~ U[1, 2]
    assert [size for size, _ in teacher.calls] == [16]  # one pass: no uncond half
    torch.testing.assert_close(teacher.calls[0][1], drawn.float())
    assert not torch.equal(teacher.calls[0][1], fixed)
    # x_{t'} is the teacher's own step at the drawn guidance, not a CFG mix with an unconditional prediction
    out = world.teacher(o.x_t, o.t, batch.cond) * drawn[:, None].float().to(o.x_t.dtype)
    torch.testing.assert_close(o.x_prev, solver_step(o.x_t, out, None, 0.0, as_schedule(world.abar), o.t, o.t_prev))
    # a whole step: still one teacher pass; student and target net read the fixed guidance the condition carries
    teacher.calls.clear()
    loss_fn(Nets(learner, teacher, learner), flux, 3)
    assert len(teacher.calls) == 1 and len(learner.calls) == 2
    assert all(torch.equal(guidance, fixed) for _, guidance in learner.calls)


def test_teacher_guidance_modes_refuse_what_they_cannot_run():
    cfg, world, _, loss_fn, batch = _setup()
    with pytest.raises(ValueError, match=", ".join(TEACHER_GUIDANCE)):
        make_loss(cfg.distill, loss_fn.grid, world.abar, 0, teacher_guidance="twice")
    with pytest.raises(ValueError, match="'guidance'"):  # a condition without its embedded guidance
        make_loss(cfg.distill, loss_fn.grid, world.abar, 0, teacher_guidance="embedded").solve(world.teacher, batch, 0)
    with pytest.raises(ValueError, match="distill.w_max=0"):  # a guidance-free teacher and a w range to draw from
        make_loss(cfg.distill, loss_fn.grid, world.abar, 0, teacher_guidance="none")
    counting = CountingTeacher(world.teacher)
    plain = dataclasses.replace(cfg.distill, w_min=0.0, w_max=0.0)
    make_loss(plain, loss_fn.grid, world.abar, 0, teacher_guidance="none").solve(counting, batch, 0)
    assert counting.batch_sizes == [16]


def test_only_student_parameters_receive_gradients():
    cfg, world, student, loss_fn, batch = _setup()
    loss = loss_fn(Nets(student, world.teacher, student), batch, 0)["loss"]
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.net[-1].parameters())
    assert not any(t.requires_grad for t in (world.abar, world.mixture.means))


def test_ema_target_net_swaps_weights_in_and_restores_them():
    _, world, student, _, batch = _setup()
    params = list(student.net.parameters())
    ema = EMA(params, decay=0.9)
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    ema.update()
    for s, b in zip(ema.shadow, before, strict=True):
        torch.testing.assert_close(s, b + 0.1)  # 0.9 b + 0.1 (b + 1)
    target = target_net_for(student, ema)
    t = torch.full((16,), 500)
    x = batch.x_0
    with ema.swapped_in():
        expected = student(x, t, batch.cond)
    torch.testing.assert_close(target(x, t, batch.cond), expected)
    for p, b in zip(params, before, strict=True):
        torch.testing.assert_close(p.detach(), b + 1.0)  # live weights restored
    assert target_net_for(student, None) is student


def test_unknown_method_lists_allowed():
    cfg, world, _, loss_fn, _ = _setup()
    with pytest.raises(ValueError, match="pcm, lcm"):
        make_loss(dataclasses.replace(cfg.distill, method="cm"), loss_fn.grid, world.abar, 0)


def test_lr_factor_warmup_then_cosine_to_zero():
    from pcm.config import TrainConfig
    from pcm.train.loop import lr_factor

    cfg = TrainConfig(max_steps=110, lr_warmup_steps=10, lr_schedule="cosine")
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(60, cfg) == pytest.approx(0.5)
    assert lr_factor(110, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(50, TrainConfig(max_steps=110)) == 1.0
