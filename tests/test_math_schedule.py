import pytest
import torch
from diffusers import DDIMScheduler
from hypothesis import given
from hypothesis import strategies as st

from pcm.math import (
    alphas_cumprod,
    eps_from_v,
    eps_from_x0,
    schedule_from_scheduler_config,
    to_eps,
    v_from_eps_x0,
    x0_from_eps,
)

SCHEDULES = [("linear", 0.0001, 0.02), ("scaled_linear", 0.00085, 0.012), ("squaredcos_cap_v2", 0.0001, 0.02)]


@pytest.mark.parametrize("beta_schedule,beta_start,beta_end", SCHEDULES)
def test_alphas_cumprod_matches_diffusers_bit_for_bit(beta_schedule, beta_start, beta_end):
    ref = DDIMScheduler(beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end).alphas_cumprod
    ours = alphas_cumprod(beta_schedule, beta_start, beta_end, 1000)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("beta_schedule,beta_start,beta_end", SCHEDULES)
def test_float64_schedule_agrees_and_is_decreasing_in_0_1(beta_schedule, beta_start, beta_end):
    abar64 = alphas_cumprod(beta_schedule, beta_start, beta_end, 1000, torch.float64)
    abar32 = alphas_cumprod(beta_schedule, beta_start, beta_end, 1000)
    assert abar64.dtype == torch.float64
    torch.testing.assert_close(abar64.float(), abar32, rtol=1e-5, atol=1e-7)
    assert bool((abar64[1:] < abar64[:-1]).all()) and 0 < abar64[-1] < abar64[0] < 1


def test_unknown_beta_schedule_lists_allowed():
    with pytest.raises(ValueError, match="linear, scaled_linear, squaredcos_cap_v2"):
        alphas_cumprod("cosine", 0.1, 0.2, 10)


def test_schedule_from_scheduler_config_reads_diffusers_config():
    config = dict(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type="v_prediction").config)
    abar, prediction_type = schedule_from_scheduler_config(config)
    assert prediction_type == "v_prediction"
    assert torch.equal(abar, alphas_cumprod("scaled_linear", 0.00085, 0.012, 1000))


@pytest.mark.parametrize("bad,match", [({"trained_betas": [0.1]}, "trained_betas"),
                                       ({"rescale_betas_zero_snr": True}, "zero-terminal"),
                                       ({"prediction_type": "sample"}, "epsilon, v_prediction")])
def test_schedule_from_scheduler_config_rejects_unsupported(bad, match):
    with pytest.raises(ValueError, match=match):
        schedule_from_scheduler_config(bad)


finite = st.floats(-5, 5, allow_nan=False)
abars = st.floats(1e-4, 0.9999)


@given(st.lists(finite, min_size=3, max_size=3), st.lists(finite, min_size=3, max_size=3), abars)
def test_eps_x0_v_conversions_round_trip(x0, eps, abar_t):
    x0, eps = torch.tensor(x0, dtype=torch.float64), torch.tensor(eps, dtype=torch.float64)
    abar_t = torch.tensor(abar_t, dtype=torch.float64)
    x_t = abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * eps
    torch.testing.assert_close(x0_from_eps(x_t, eps, abar_t), x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(eps_from_x0(x_t, x0, abar_t), eps, rtol=0, atol=1e-6)
    v = v_from_eps_x0(eps, x0, abar_t)
    torch.testing.assert_close(eps_from_v(x_t, v, abar_t), eps, rtol=0, atol=1e-9)
    torch.testing.assert_close(to_eps(v, x_t, abar_t, "v_prediction"), eps, rtol=0, atol=1e-9)
    assert to_eps(eps, x_t, abar_t, "epsilon") is eps
