"""Our samplers against diffusers' schedulers on the same denoiser (the analytic teacher)."""

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler

from pcm.math import alphas_cumprod, ddim_jump
from pcm.models.gmm import AnalyticTeacher, toy_mixture
from pcm.sampling import ddim_timesteps, lcm_timesteps, sample_lcm, sample_pcm

SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.fixture(scope="module")
def teacher():
    return AnalyticTeacher(toy_mixture(), alphas_cumprod(**{k: SD15[k] for k in SD15}, T=1000))


def _start(n=16):
    gen = torch.Generator().manual_seed(7)
    return torch.randn(n, 2, generator=gen), torch.randint(0, 3, (n,), generator=gen)


@pytest.mark.parametrize("K", [1, 2, 4, 5, 10, 50])
def test_ddim_jumps_equal_ddim_scheduler_step_by_step(teacher, K):
    sched = DDIMScheduler(**SD15, timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False)
    sched.set_timesteps(K)
    path = ddim_timesteps(1000, K)
    assert path[:-1] == sched.timesteps.tolist()
    x_ours, labels = _start()
    x_ref = x_ours.clone()
    for t, s in zip(path[:-1], path[1:], strict=True):
        t_batch = torch.full((len(x_ours),), t)
        eps_ref = teacher(x_ref, t_batch, labels)
        x_ref = sched.step(eps_ref, t, x_ref, eta=0.0).prev_sample
        eps = teacher(x_ours, t_batch, labels)
        x_ours = ddim_jump(x_ours, eps, teacher.abar[t], teacher.abar[s])
        torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-6)
    x_T, _ = _start()
    torch.testing.assert_close(sample_pcm(teacher, x_T, labels, teacher.abar, path), x_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("K", [1, 2, 4, 8])
def test_lcm_sampler_equals_lcm_scheduler(teacher, K):
    sched = LCMScheduler(**SD15, original_inference_steps=50)
    sched.set_timesteps(K)
    timesteps = lcm_timesteps(1000, 50, K)
    assert timesteps == sched.timesteps.tolist()
    x_T, labels = _start()
    gen = torch.Generator().manual_seed(3)
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(teacher(x, torch.full((len(x),), int(t)), labels), t, x, generator=gen).prev_sample
    ours = sample_lcm(teacher, x_T, labels, teacher.abar, timesteps, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-6)
