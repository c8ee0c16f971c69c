"""The method's math over any Gaussian path: variance preserving and rectified flow (issue 19, section 1)."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from pcm.math import (
    NoiseSchedule,
    SolverGrid,
    add_noise,
    alphas_cumprod,
    consistency_target,
    ddim_jump,
    flow_schedule,
    flow_sigmas,
    flux_shift,
    jump,
    noise_schedule_from_scheduler_config,
    prediction_of,
    renoise,
    renoise_to,
    shift_sigmas,
    solver_step,
    vp_schedule,
    x0_eps,
)

T = 1000
SCHEDULES = {
    "vp": vp_schedule(alphas_cumprod("scaled_linear", 0.00085, 0.012, T, torch.float64)),
    "flow": flow_schedule(T, 1.0, dtype=torch.float64),
    "flow_shift3": flow_schedule(T, 3.0, dtype=torch.float64),
}
PAIRS = [(kind, p) for kind in ("vp", "flow") for p in {"vp": ("epsilon", "v_prediction", "sample"),
                                                        "flow": ("flow", "sample")}[kind]]
seeds = st.integers(0, 2**31 - 1)
timesteps = st.integers(1, T - 1)  # where a denoiser is evaluated (t = 0 is only ever landed on)


def _pair(seed, n=4, d=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(n, d, generator=gen, dtype=torch.float64)


def _with(name, prediction):
    sched = SCHEDULES[name]
    return NoiseSchedule(sched.kind, sched.table, prediction)


def _true_output(sched, x_0, eps, t):
    return prediction_of(x_0, eps, *sched.alpha_sigma(t, x_0), sched.prediction)


# ---- the flow schedule is diffusers' and the reference's -----------------------------------------------------------

@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sigmas_are_flow_match_euler_training_sigmas_bit_for_bit_and_end_at_zero(shift):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift).sigmas.flip(0)  # ascending in t
    ours = flow_sigmas(T, shift)
    assert ours.dtype == torch.float32 and torch.equal(ours[1:], ref[1:])
    assert ours[0] == 0 and ref[0] > 0  # t = 0 is the clean end, where diffusers' flow sampler also ends
    assert bool((ours[1:] > ours[:-1]).all()) and ours[-1] == 1.0


def test_flux_dynamic_shift_is_sd3_shift_with_exp_mu_and_the_pipeline_mu():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for seq_len in (256, 1024, 4096, 6000):
        mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
        assert math.log(flux_shift(seq_len)) == pytest.approx(mu, rel=1e-12)
        sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        base = np.linspace(1.0, 1 / 8, 8)
        sched.set_timesteps(sigmas=base, mu=mu)
        ours = shift_sigmas(torch.tensor(base, dtype=torch.float32), flux_shift(seq_len))
        torch.testing.assert_close(ours, sched.sigmas[:-1], rtol=1e-6, atol=1e-7)


def test_schedules_from_diffusers_configs():
    sd3 = noise_schedule_from_scheduler_config(dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config))
    assert sd3.kind == "flow" and sd3.prediction == "flow" and torch.equal(sd3.table, flow_sigmas(T, 3.0))
    flux_config = dict(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    flux = noise_schedule_from_scheduler_config(flux_config, image_seq_len=4096)
    torch.testing.assert_close(flux.table, flow_sigmas(T, math.exp(1.15)))
    with pytest.raises(ValueError, match="image_seq_len"):
        noise_schedule_from_scheduler_config(flux_config)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        noise_schedule_from_scheduler_config(dict(FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True).config))
    vp = noise_schedule_from_scheduler_config(dict(DDIMScheduler(prediction_type="v_prediction").config))
    assert vp.kind == "vp" and vp.prediction == "v_prediction" and len(vp) == T


def test_a_schedule_names_its_allowed_kinds_and_parametrizations():
    with pytest.raises(ValueError, match="allowed: vp, flow"):
        NoiseSchedule("edm", torch.ones(3))
    with pytest.raises(ValueError, match="allowed: flow, sample"):
        NoiseSchedule("flow", torch.ones(3), "epsilon")  # eps says nothing about x_0 at sigma = 1
    with pytest.raises(ValueError, match="allowed: epsilon, v_prediction, sample"):
        NoiseSchedule("vp", torch.ones(3), "flow")
    with pytest.raises(ValueError, match="shift"):
        flow_sigmas(T, 0.0)


# ---- conversions and jumps, both schedules -------------------------------------------------------------------------

@pytest.mark.parametrize("kind,prediction", PAIRS)
@settings(max_examples=30, deadline=None)
@given(seed=seeds, t=timesteps)
def test_every_parametrization_round_trips_through_x0_and_eps(kind, prediction, seed, t):
    sched = _with(kind, prediction)
    x_0, eps = _pair(seed)
    x_t = add_noise(x_0, eps, sched, t)
    alpha, sigma = sched.alpha_sigma(t, x_t)
    x0_hat, eps_hat = x0_eps(x_t, prediction_of(x_0, eps, alpha, sigma, prediction), alpha, sigma, prediction)
    torch.testing.assert_close(x0_hat, x_0, rtol=0, atol=1e-9 / float(min(alpha, sigma)))
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-9 / float(min(alpha, sigma)))


def test_flow_velocity_is_exact_at_pure_noise_where_eps_cannot_be():
    sched = SCHEDULES["flow"]
    x_0, eps = _pair(3)
    x_T = add_noise(x_0, eps, sched, T - 1)
    assert sched.alpha_sigma(T - 1, x_T)[0].item() == 0 and torch.equal(x_T, eps)
    x0_hat, eps_hat = x0_eps(x_T, eps - x_0, *sched.alpha_sigma(T - 1, x_T), "flow")
    torch.testing.assert_close(x0_hat, x_0, rtol=0, atol=1e-15)
    assert torch.equal(eps_hat, eps)  # eps_hat = x_t + 0 u


@pytest.mark.parametrize("name", list(SCHEDULES))
@settings(max_examples=30, deadline=None)
@given(seed=seeds, t=timesteps, s=st.integers(0, T - 1))
def test_jump_with_the_true_output_lands_on_the_forward_process(name, seed, t, s):
    sched = SCHEDULES[name]
    x_0, eps = _pair(seed)
    x_t = add_noise(x_0, eps, sched, t)
    out = _true_output(sched, x_0, eps, t)
    torch.testing.assert_close(jump(x_t, out, sched, t, s), add_noise(x_0, eps, sched, s), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", list(SCHEDULES))
@settings(max_examples=20, deadline=None)
@given(seed=seeds, s=timesteps)
def test_the_phased_map_is_the_identity_at_its_edge(name, seed, s):
    sched = SCHEDULES[name]
    x, out = _pair(seed)
    torch.testing.assert_close(jump(x, out, sched, s, s), x, rtol=0, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, t=timesteps, s=st.integers(0, T - 1))
def test_on_a_flow_the_ddim_jump_is_the_euler_step_of_the_velocity(seed, t, s):
    sched = SCHEDULES["flow_shift3"]
    x_t, u = _pair(seed)
    (_, sigma_t), (_, sigma_s) = sched.alpha_sigma(t, x_t), sched.alpha_sigma(s, x_t)
    torch.testing.assert_close(jump(x_t, u, sched, t, s), x_t + (sigma_s - sigma_t) * u, rtol=0, atol=1e-12)


def test_the_flow_jump_equals_flow_match_euler_scheduler_step_by_step():
    sched = flow_schedule(T, 3.0)
    path = [999, 749, 499, 249, 0]
    ref = FlowMatchEulerDiscreteScheduler(shift=1.0)  # our sigmas are shifted already
    ref.set_timesteps(sigmas=[float(sched.table[t]) for t in path[:-1]])
    assert torch.equal(ref.sigmas, sched.table[path])  # its appended terminal 0 is our timestep 0
    gen = torch.Generator().manual_seed(0)
    x_ref = x = torch.randn(8, 4, generator=gen)
    for t, s, timestep in zip(path[:-1], path[1:], ref.timesteps, strict=True):
        u = torch.randn(8, 4, generator=gen)
        x_ref = ref.step(u, timestep, x_ref).prev_sample
        x = jump(x, u, sched, t, s)
        torch.testing.assert_close(x, x_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(SCHEDULES))
@settings(max_examples=20, deadline=None)
@given(seed=seeds, s=st.integers(0, T - 2), gap=st.integers(0, T))
def test_renoising_is_the_forward_process_restricted_to_s_r(name, seed, s, gap):
    # x_s = alpha_s x_0 + sigma_s e -> x_r must carry alpha_r x_0 and noise of variance sigma_r^2 in total
    sched = SCHEDULES[name]
    r = min(s + gap, T - 1)
    x_0, z = _pair(seed)
    (alpha_s, sigma_s), (alpha_r, sigma_r) = sched.alpha_sigma(s, x_0), sched.alpha_sigma(r, x_0)
    torch.testing.assert_close(renoise_to(alpha_s * x_0, torch.zeros_like(z), sched, s, r), alpha_r * x_0,
                               rtol=0, atol=1e-12)
    kept = renoise_to(sigma_s * torch.ones_like(z), torch.zeros_like(z), sched, s, r)  # old noise, carried over
    fresh = renoise_to(torch.zeros_like(z), torch.ones_like(z), sched, s, r)  # new noise
    torch.testing.assert_close(kept**2 + fresh**2, sigma_r**2 * torch.ones_like(z), rtol=0, atol=1e-12)
    if r == s:
        torch.testing.assert_close(renoise_to(x_0, z, sched, s, r), x_0, rtol=0, atol=1e-12)


def test_renoising_a_flow_to_pure_noise_forgets_x_s():
    sched = SCHEDULES["flow"]
    x_s, z = _pair(5)
    torch.testing.assert_close(renoise_to(x_s, z, sched, 100, T - 1), z, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind,prediction", PAIRS)
@settings(max_examples=20, deadline=None)
@given(seed=seeds, w=st.floats(0, 8), t=st.integers(2, T - 1))
def test_guiding_any_parametrization_is_guiding_x0_and_eps(kind, prediction, seed, w, t):
    sched = _with(kind, prediction)
    x_t, x0_c = _pair(seed)
    _, x0_u = _pair(seed + 1)
    alpha, sigma = sched.alpha_sigma(t, x_t)
    eps_c, eps_u = (x_t - alpha * x0_c) / sigma, (x_t - alpha * x0_u) / sigma
    out_c, out_u = (prediction_of(a, b, alpha, sigma, prediction) for a, b in ((x0_c, eps_c), (x0_u, eps_u)))
    t_prev = torch.tensor([t - 1])
    x0_g, eps_g = x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)
    expected = add_noise(x0_g, eps_g, sched, t_prev)
    stepped = solver_step(x_t, out_c, out_u, w, sched, torch.tensor([t]), t_prev)
    torch.testing.assert_close(stepped, expected, rtol=0, atol=1e-8 / float(min(alpha, sigma)))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_the_target_is_x_prev_at_the_edge_else_a_jump(name):
    sched = SCHEDULES[name]
    x_prev, out = _pair(9, n=2)
    t_prev, s = torch.tensor([300, 300]), torch.tensor([300, 100])
    y = consistency_target(x_prev, out, sched, t_prev, s, torch.tensor([True, False]))
    assert torch.equal(y[0], x_prev[0])
    torch.testing.assert_close(y[1:], jump(x_prev[1:], out[1:], sched, t_prev[1:], s[1:]))


def test_the_vp_schedule_reproduces_the_abar_functions_bit_for_bit():
    abar = alphas_cumprod("scaled_linear", 0.00085, 0.012, T)  # float32, as the SD teachers run
    sched = vp_schedule(abar)
    x, eps = (v.float() for v in _pair(11, n=5))
    t, s = torch.tensor([999, 700, 321, 20, 1]), torch.tensor([0, 499, 100, 0, 0])

    def ab(v):
        return abar[v][:, None]

    assert torch.equal(jump(x, eps, sched, t, s), ddim_jump(x, eps, ab(t), ab(s)))
    assert torch.equal(add_noise(x, eps, sched, t), ab(t).sqrt() * x + (1 - ab(t)).sqrt() * eps)
    assert torch.equal(renoise_to(x, eps, sched, s, t), renoise(x, eps, ab(s), ab(t)))


# ---- the solver grid and phase edges on a flow are the reference's --------------------------------------------------

def _reference_flow_grid(sigmas_ascending: np.ndarray, N: int, M: int):
    """The reference SD3 script's EulerSolver and euler_style_multiphase_pred, index for index (float64 numpy)."""
    euler_timesteps = np.arange(1, N + 1) * (T // N) - 1
    sigmas = sigmas_ascending[euler_timesteps]
    sigmas_prev = np.asarray([sigmas_ascending[0]] + sigmas_ascending[euler_timesteps[:-1]].tolist())
    inference_indices = np.floor(np.linspace(0, N, num=M, endpoint=False)).astype(np.int64)
    end = np.array([inference_indices[inference_indices <= n].max() for n in range(N)])
    return sigmas, sigmas_prev, sigmas_prev[end], end


@pytest.mark.parametrize("N,M", [(50, 8), (50, 4), (40, 4), (20, 3)])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_grid_and_phase_edges_are_the_reference_s_except_the_clean_end(N, M, shift):
    sched, grid = flow_schedule(T, shift, dtype=torch.float64), SolverGrid(T, N, M)
    ascending = FlowMatchEulerDiscreteScheduler(shift=shift).sigmas.flip(0).double().numpy()
    sigmas, sigmas_prev, edge_sigmas, end = _reference_flow_grid(ascending, N, M)
    n = torch.arange(N)
    np.testing.assert_allclose(sched.table[grid.t(n)].numpy(), sigmas, rtol=1e-6)
    assert torch.equal(grid.edge_index[grid.phase(n)], torch.from_numpy(end))  # the same phase for every n
    in_phase_0 = grid.phase(n) == 0
    np.testing.assert_allclose(sched.table[grid.t_prev(n)][n > 0].numpy(), sigmas_prev[1:], rtol=1e-6)
    np.testing.assert_allclose(sched.table[grid.s(n)][~in_phase_0].numpy(), edge_sigmas[~in_phase_0.numpy()],
                               rtol=1e-6)
    # phase 0: the reference lands on its lowest training sigma shift(1/T), we on the clean end sigma = 0
    assert bool((sched.table[grid.s(n)][in_phase_0] == 0).all())
    assert edge_sigmas[0] == pytest.approx(float(shift_sigmas(torch.tensor(1 / T), shift)), rel=1e-6)
