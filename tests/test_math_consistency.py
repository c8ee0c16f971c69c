import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pcm.math import (
    consistency_distance,
    ddim_jump,
    guided_eps,
    hinge_d_loss,
    hinge_g_loss,
    l2,
    lcm_boundary_scalings,
    lcm_prediction,
    phased_target,
    pseudo_huber,
    renoise,
    teacher_solver_step,
    x0_from_eps,
)

abars = st.floats(1e-3, 0.999)
seeds = st.integers(0, 2**31 - 1)


def _vectors(seed, *shape):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(3)]


def _t(v):
    return torch.tensor(v, dtype=torch.float64)


@given(seeds, abars, abars)
def test_ddim_jump_with_true_eps_lands_on_the_forward_process(seed, abar_t, abar_s):
    x_0, eps, _ = _vectors(seed, 4, 3)
    x_t = _t(abar_t).sqrt() * x_0 + (1 - _t(abar_t)).sqrt() * eps
    expected = _t(abar_s).sqrt() * x_0 + (1 - _t(abar_s)).sqrt() * eps
    torch.testing.assert_close(ddim_jump(x_t, eps, _t(abar_t), _t(abar_s)), expected, rtol=0, atol=1e-9)


@given(seeds, abars)
def test_phased_map_is_identity_at_its_edge(seed, abar_s):
    x, eps, _ = _vectors(seed, 4, 3)
    torch.testing.assert_close(ddim_jump(x, eps, _t(abar_s), _t(abar_s)), x, rtol=0, atol=1e-9)


@given(seeds, abars, abars)
def test_phased_target_is_x_prev_at_the_edge_else_a_jump(seed, abar_prev, abar_s):
    x_prev, eps, _ = _vectors(seed, 2, 3)
    at_edge = torch.tensor([True, False])
    y = phased_target(x_prev, eps, _t(abar_prev), _t(abar_s), at_edge)
    assert torch.equal(y[0], x_prev[0])
    torch.testing.assert_close(y[1], ddim_jump(x_prev[1], eps[1], _t(abar_prev), _t(abar_s)))


@given(seeds, st.floats(0, 8), abars, abars)
def test_guided_solver_step_equals_guidance_on_x0(seed, w, abar_t, abar_prev):
    x_t, eps_c, eps_u = _vectors(seed, 4, 3)
    abar_t, abar_prev = _t(abar_t), _t(abar_prev)
    x0_c, x0_u = x0_from_eps(x_t, eps_c, abar_t), x0_from_eps(x_t, eps_u, abar_t)
    eps_tilde = eps_c + w * (eps_c - eps_u)
    x0_tilde = x0_c + w * (x0_c - x0_u)
    expected = abar_prev.sqrt() * x0_tilde + (1 - abar_prev).sqrt() * eps_tilde
    torch.testing.assert_close(teacher_solver_step(x_t, eps_c, eps_u, w, abar_t, abar_prev), expected,
                               rtol=1e-9, atol=1e-7)


def test_guidance_conventions():
    eps_c, eps_u = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    assert torch.equal(guided_eps(eps_c, eps_u, 0.0), eps_c)
    assert torch.equal(guided_eps(eps_c, None, 5.0), eps_c)
    # w in the LCM convention is CFG scale 1 + w: eps_u + 3 (eps_c - eps_u) for w = 2
    assert torch.equal(guided_eps(eps_c, eps_u, 2.0), eps_u + 3 * (eps_c - eps_u))


def test_lcm_boundary_scalings_match_diffusers_and_boundary_condition():
    from diffusers import LCMScheduler

    sched = LCMScheduler()
    for t in [0, 1, 19, 259, 999]:
        c_skip, c_out = lcm_boundary_scalings(torch.tensor(float(t)))
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(t)
        assert float(c_skip) == pytest.approx(ref_skip, rel=1e-6) and float(c_out) == pytest.approx(ref_out, rel=1e-6)
    x, eps, _ = _vectors(0, 4, 3)
    c_skip, c_out = lcm_boundary_scalings(torch.tensor(0.0, dtype=torch.float64))
    assert torch.equal(lcm_prediction(x, eps, _t(0.9991), c_skip, c_out), x)


@given(seeds, abars, st.floats(0.0, 1.0))
def test_renoise_gives_the_forward_marginal_at_r(seed, abar_s, frac):
    abar_r = abar_s * (1e-3 + (1 - 1e-3) * frac)  # r >= s means abar_r <= abar_s
    x_0, eps, z = _vectors(seed, 1, 3)
    x_s = _t(abar_s).sqrt() * x_0 + (1 - _t(abar_s)).sqrt() * eps
    x_r = renoise(x_s, z, _t(abar_s), _t(abar_r))
    ratio = abar_r / abar_s
    # x_r = sqrt(abar_r) x_0 + (independent Gaussian noise of variance 1 - abar_r)
    noise_coefficients = torch.tensor([(ratio * (1 - abar_s)) ** 0.5, (1 - ratio) ** 0.5], dtype=torch.float64)
    assert float(noise_coefficients.pow(2).sum()) == pytest.approx(1 - abar_r, abs=1e-12)
    expected = abar_r**0.5 * x_0 + noise_coefficients[0] * eps + noise_coefficients[1] * z
    torch.testing.assert_close(x_r, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(renoise(x_s, z, _t(abar_s), _t(abar_s)), x_s, rtol=0, atol=1e-12)


@given(st.floats(-10, 10), st.floats(1e-4, 1.0))
def test_pseudo_huber_exact_values(d, c):
    pred, target = torch.tensor([d], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    assert float(pseudo_huber(pred, target, c)) == pytest.approx((d * d + c * c) ** 0.5 - c, abs=1e-6)
    assert float(pseudo_huber(target, target, c)) == 0.0


def test_distances_and_hinge_losses_on_known_values():
    pred, target = torch.tensor([1.0, -1.0, 3.0]), torch.tensor([0.0, 1.0, 3.0])
    assert float(l2(pred, target)) == pytest.approx(5 / 3)
    assert float(consistency_distance(pred, target, "l2", 0.001)) == pytest.approx(5 / 3)
    with pytest.raises(ValueError, match="huber, l2"):
        consistency_distance(pred, target, "l1", 0.001)
    d_real, d_fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert float(hinge_d_loss(d_real, d_fake)) == pytest.approx((0 + 0.5) / 2 + (0 + 1.5) / 2)
    assert float(hinge_g_loss(d_fake)) == pytest.approx((3 + 0.5) / 2)
