"""Checks that could catch the mistakes that matter (issue 17): the phased target away from the phase edge, the
samplers against diffusers' TCDScheduler and DDIMScheduler over the steps we train and evaluate, and the
reference-run configs. Everything is float64 on the analytic teacher (no UNet); the file runs in a few seconds."""

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, TCDScheduler

import pcm.train.step as step_module
from pcm.config import EvalConfig, config_from_dict, load_config
from pcm.math import SolverGrid, alphas_cumprod, ddim_jump
from pcm.models.gmm import UNCOND, AnalyticTeacher, GaussianMixture, toy_mixture
from pcm.sampling import Sampling, ddim_timesteps, sample, sample_pcm
from pcm.train.step import Batch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
T = 1000
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # SD1.5's and SDXL's schedule
LORA_GRIDS = {"sd15": (50, 4), "sdxl": (40, 4)}  # the reference runs' (N, M)


def _abar() -> torch.Tensor:
    return alphas_cumprod(**SD, T=T, dtype=torch.float64)


def _on_our_schedule(sched):
    """diffusers' scheduler computing on our float64 abar (after checking it is the same schedule), so that the
    samplers can be compared to 1e-12 and an off-by-one timestep anywhere shows."""
    abar = _abar()
    torch.testing.assert_close(abar.float(), sched.alphas_cumprod, rtol=1e-6, atol=1e-7)
    sched.alphas_cumprod = abar
    sched.final_alpha_cumprod = abar[0]  # set_alpha_to_one=False: the last jump lands on abar[0], as ours
    return abar


def _start(n=16):
    gen = torch.Generator().manual_seed(7)
    return torch.randn(n, 2, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


# ---------------------------------------------------------------------------------------------------------------
# The phased target away from the edge (docs/method.md §5, steps 3 and 5)

POINT = GaussianMixture(means=torch.tensor([[0.8, -1.2, 0.4]], dtype=torch.float64),
                        stds=torch.zeros(1, dtype=torch.float64), weights=torch.ones(1, dtype=torch.float64),
                        classes=torch.zeros(1, dtype=torch.int64))  # x_0 is one point: DDIM jumps are exact ODE steps


def _pcm_loss(student, teacher, target_net, batch, grid, abar, distill) -> dict:
    """pcm's own consistency loss of one batch at step 0 (the loss object; the function in older checkouts)."""
    if hasattr(step_module, "PCMLoss"):
        return step_module.PCMLoss(grid, abar, distill, 0)(step_module.Nets(student, teacher, target_net), batch, 0)
    return step_module.pcm_loss(student, teacher, target_net, batch, grid, abar, distill, 0, 0)


def _solver_step_student(exact, grid: SolverGrid, abar: torch.Tensor):
    """The mistake: a student that learned the one solver step (t -> t') instead of the phase (t -> s). Its eps_hat
    is chosen so that the loss's jump x_t -> s lands on the exact x_{t'}."""
    def eps_fn(x_t, t, cond):
        n = (t + 1) // (grid.T // grid.N) - 1
        a_t, a_prev, a_s = (abar[v][:, None] for v in (t, grid.t_prev(n), grid.s(n)))
        x_prev = ddim_jump(x_t, exact(x_t, t, cond), a_t, a_prev)
        ratio = (a_s / a_t).sqrt()  # jump(x_t, e -> s) = ratio x_t + (sigma_s - ratio sigma_t) e, solved for e
        return (x_prev - ratio * x_t) / ((1 - a_s).sqrt() - ratio * (1 - a_t).sqrt())
    return eps_fn


def _per_sample_losses(student, target_net, grid, num_samples=48):
    """(n, at_edge, loss) of one-sample batches with ids 0..num_samples-1; the exact teacher solves."""
    abar = _abar()
    exact = AnalyticTeacher(POINT, abar)
    distill = config_from_dict({"distill": {"num_solver_steps": grid.N, "num_phases": grid.M, "loss": "l2",
                                            "w_min": 4.0, "w_max": 5.0}}).distill  # small CFG: one class, w is inert
    rows = []
    for i in range(num_samples):
        batch = Batch(POINT.means.clone(), torch.tensor([0]), torch.tensor([UNCOND]), torch.tensor([i]))
        out = _pcm_loss(student(exact, grid, abar), exact, target_net(exact, grid, abar), batch, grid, abar, distill)
        n = (out["t_mean"].long() + 1) // (grid.T // grid.N) - 1
        rows.append((int(n), bool(grid.at_edge(n.view(1))), float(out["loss"])))
    return rows


def _exact(exact, grid, abar):
    return exact


@pytest.mark.parametrize("N,M", [LORA_GRIDS["sd15"], LORA_GRIDS["sdxl"], (10, 3)])
def test_the_exact_student_has_zero_loss_and_a_solver_step_student_does_not(N, M):
    grid = SolverGrid(T, N, M)
    exact = _per_sample_losses(_exact, _exact, grid)
    away = [row for row in exact if not row[1]]
    assert len(away) >= 10 and len(away) < len(exact), exact  # both kinds of draws, mostly away from the edge
    assert max(loss for *_, loss in exact) < 1e-26  # f = x_s = y to float64 precision, wherever n is
    wrong = _per_sample_losses(_solver_step_student, _exact, grid)
    assert [row[:2] for row in wrong] == [row[:2] for row in exact]  # the same draws
    assert min(loss for _, at_edge, loss in wrong if not at_edge) > 1e-5  # away from the edge: caught
    # at the edge t' = s, so the mistake is invisible there, and with M = N everywhere: why this test needs M < N
    assert max(loss for _, at_edge, loss in wrong if at_edge) < 1e-26


def test_a_target_that_forgets_the_jump_to_the_edge_is_caught(monkeypatch):
    """The other half of the mistake: y = x_{t'} instead of jump(x_{t'} -> s) away from the edge."""
    grid = SolverGrid(T, *LORA_GRIDS["sd15"])
    monkeypatch.setattr(step_module, "phased_target", lambda x_prev, *_: x_prev)
    rows = _per_sample_losses(_exact, _exact, grid)
    assert min(loss for _, at_edge, loss in rows if not at_edge) > 1e-5
    assert max(loss for _, at_edge, loss in rows if at_edge) < 1e-26


# ---------------------------------------------------------------------------------------------------------------
# The PCM sampler against diffusers' TCDScheduler over a LoRA's trained edges

@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_pcm_sampler_equals_tcd_scheduler_over_the_trained_edges(family, gamma):
    timesteps = SolverGrid(T, *LORA_GRIDS[family]).sampling_timesteps()
    assert timesteps[0] == T - 1 and timesteps[-1] == 0 and len(timesteps) == 5
    sched = TCDScheduler(**SD, num_train_timesteps=T)
    sched.set_timesteps(timesteps=timesteps[:-1])  # TCD's last jump goes to 0 on its own
    assert sched.timesteps.tolist() == timesteps[:-1]
    abar = _on_our_schedule(sched)
    teacher = AnalyticTeacher(toy_mixture(), abar)
    x_T, labels = _start()
    # the same noise: TCD draws randn(shape, generator, dtype=float64) once per non-final step, as sample_pcm does
    gen, x = torch.Generator().manual_seed(11), x_T.clone()
    for t in sched.timesteps:
        x = sched.step(teacher(x, torch.full((len(x),), int(t)), labels), t, x, eta=gamma, generator=gen).prev_sample
    ours = sample_pcm(teacher, x_T, labels, abar, timesteps, gamma=gamma, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-12)
    if gamma > 0:  # the noise matters: other noise gives another sample
        other = sample_pcm(teacher, x_T, labels, abar, timesteps, gamma=gamma,
                           generator=torch.Generator().manual_seed(12))
        assert (other - x).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Teacher DDIM against diffusers' DDIMScheduler at every step count the evaluation uses

EVAL_STEPS = sorted({*EvalConfig().steps, *(K for path in [ROOT / "params.yaml", *CONFIGS]
                                               for K in load_config(path).eval.steps)})


def test_the_ddim_check_covers_every_evaluated_step_count_and_one_that_does_not_divide_T():
    assert {1, 2, 4, 8, 16} <= set(EVAL_STEPS) and any(T % K for K in EVAL_STEPS)


@pytest.mark.parametrize("K", sorted({*EVAL_STEPS, 3, 7}))
def test_teacher_ddim_equals_ddim_scheduler_at_the_evaluated_step_counts(K):
    """Where K does not divide T (16: T/K = 62.5) diffusers jumps by T // K, not always to its next timestep
    (937 -> 875, then the model at 874); the teacher row follows it, so it is what diffusers users get."""
    sched = DDIMScheduler(**SD, num_train_timesteps=T, timestep_spacing="trailing", set_alpha_to_one=False,
                          clip_sample=False)
    sched.set_timesteps(K)
    path = ddim_timesteps(T, K)
    assert path[:-1] == sched.timesteps.tolist() and path[-1] == 0
    abar = _on_our_schedule(sched)
    teacher = AnalyticTeacher(toy_mixture(), abar)
    x_T, labels = _start()
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(teacher(x, torch.full((len(x),), int(t)), labels), t, x, eta=0.0).prev_sample
    ours = sample(teacher, x_T, labels, None, abar, Sampling(None, K))
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-12)
    if T % K:  # jumping to the path's next point instead is measurably another sampler
        assert (sample_pcm(teacher, x_T, labels, abar, path) - x).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# The configs

@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    load_config(path)


@pytest.mark.parametrize("name,family", [("sd15-cc3m.yaml", "sd15"), ("sdxl-cc3m.yaml", "sdxl")])
def test_the_reference_configs_have_the_reference_grid_and_lora_scale(name, family):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.teacher.family == family
    assert (cfg.distill.num_solver_steps, cfg.distill.num_phases) == LORA_GRIDS[family]
    assert cfg.lora.rank == 64 and cfg.lora.alpha / cfg.lora.rank == 8 / 64  # PEFT's default alpha 8 at rank 64
    assert cfg.distill.target_net == "student" and cfg.train.optimizer == "adamw8bit"
    assert cfg.train.mixed_precision == "fp16" and cfg.train.lr_warmup_steps == 0
