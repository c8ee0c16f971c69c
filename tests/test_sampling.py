import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pcm.math import SolverGrid, alphas_cumprod
from pcm.models.gmm import UNCOND, AnalyticTeacher, toy_mixture
from pcm.sampling import (
    DEFAULT_K_ABOVE_M,
    K_ABOVE_M_RULES,
    Sampling,
    ddim_timesteps,
    guided_eval,
    lcm_timesteps,
    pcm_timesteps,
    sample,
    sample_pcm,
)


@st.composite
def grid_and_k(draw):
    N = draw(st.sampled_from([4, 10, 20, 40, 50, 100]))
    return SolverGrid(1000, N, draw(st.integers(1, min(N, 8)))), draw(st.integers(1, 32))


@given(grid_and_k())
def test_pcm_schedules_are_decreasing_paths_through_the_trained_edges(gk):
    grid, K = gk
    path = pcm_timesteps(grid.sampling_timesteps(), K)
    assert len(path) == K + 1 and path[0] == 999 and path[-1] == 0
    assert all(a > b for a, b in zip(path, path[1:], strict=False))
    edges = set(grid.sampling_timesteps())
    if K == grid.M:
        assert path == grid.sampling_timesteps()
    elif K < grid.M:
        assert set(path) <= edges  # skips edges, never lands between them
    else:
        assert edges <= set(path)  # every trained edge is still visited


def test_reference_case_n50_m4_visits_the_trained_edges_unlike_stock_ddim():
    points = SolverGrid(1000, 50, 4).sampling_timesteps()
    assert pcm_timesteps(points, 4) == [999, 739, 499, 239, 0]
    assert ddim_timesteps(1000, 4) == [999, 749, 499, 249, 0]
    assert pcm_timesteps(points, 2) == [999, 499, 0]
    assert pcm_timesteps(points, 8) == [999, 869, 739, 619, 499, 369, 239, 119, 0]


def test_lcm_timesteps_reject_more_steps_than_the_grid():
    with pytest.raises(ValueError, match="1..N=50"):
        lcm_timesteps(1000, 50, 51)


@pytest.fixture(scope="module")
def world():
    abar = alphas_cumprod("scaled_linear", 0.00085, 0.012, 1000)
    gen = torch.Generator().manual_seed(0)
    return AnalyticTeacher(toy_mixture(), abar), torch.randn(32, 2, generator=gen), torch.randint(0, 3, (32,))


def test_inference_guidance_combines_cond_and_negative_in_one_call(world):
    teacher, x, labels = world
    calls = []

    def counting(x_t, t, cond):
        calls.append(len(x_t))
        return teacher(x_t, t, cond)

    neg = torch.full_like(labels, UNCOND)
    eps = guided_eval(counting, x, 500, labels, neg, 3.0)
    t = torch.full((32,), 500)
    expected = teacher(x, t, neg) + 3.0 * (teacher(x, t, labels) - teacher(x, t, neg))
    torch.testing.assert_close(eps, expected)
    assert calls == [64]
    guided_eval(counting, x, 500, labels, neg, 1.0)
    assert calls == [64, 32]  # scale 1: no negative pass


def test_stochastic_sampler(world):
    teacher, x_T, labels = world
    path = pcm_timesteps(SolverGrid(1000, 50, 4).sampling_timesteps(), 4)
    deterministic = sample_pcm(teacher, x_T, labels, teacher.abar, path)
    assert torch.equal(sample_pcm(teacher, x_T, labels, teacher.abar, path, gamma=0.0,
                                  generator=torch.Generator().manual_seed(1)), deterministic)
    a = sample_pcm(teacher, x_T, labels, teacher.abar, path, gamma=0.5, generator=torch.Generator().manual_seed(1))
    b = sample_pcm(teacher, x_T, labels, teacher.abar, path, gamma=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, deterministic)
    with pytest.raises(ValueError, match="gamma"):
        sample_pcm(teacher, x_T, labels, teacher.abar, path, gamma=1.5)


def test_stochastic_step_follows_tcd_rule(world):
    # one step 999 -> 499 -> 0 with gamma: jump to s' = floor((1 - gamma) 499), re-noise to 499, then to 0
    teacher, x_T, labels = world
    from pcm.math import abar_at, ddim_jump, renoise

    gamma, path = 0.3, [999, 499, 0]
    gen = torch.Generator().manual_seed(5)
    ours = sample_pcm(teacher, x_T, labels, teacher.abar, path, gamma=gamma, generator=gen)
    gen = torch.Generator().manual_seed(5)

    def ab(t):
        return abar_at(teacher.abar, torch.tensor([t]), x_T)

    s_prime = int(0.7 * 499)
    x = ddim_jump(x_T, teacher(x_T, torch.full((32,), 999), labels), ab(999), ab(s_prime))
    x = renoise(x, torch.randn(x.shape, generator=gen), ab(s_prime), ab(499))
    x = ddim_jump(x, teacher(x, torch.full((32,), 499), labels), ab(499), ab(0))
    torch.testing.assert_close(ours, x)


def _card(M):
    from pcm.eval.toy_gmm import toy_card, toy_config

    return toy_card(toy_config("pcm", M, guided=True, steps=1))


@pytest.mark.parametrize("rule", K_ABOVE_M_RULES)
def test_k_above_m_rules_leave_k_up_to_m_unchanged(world, rule):
    teacher, x_T, labels = world
    card = _card(4)
    for K in (1, 2, 3, 4):
        ours = sample(teacher, x_T, labels, None, teacher.abar, Sampling(card, K, k_above_m=rule, gamma=0.3),
                      torch.Generator().manual_seed(2))
        plain = sample_pcm(teacher, x_T, labels, teacher.abar, pcm_timesteps(card.sampling_timesteps, K), gamma=0.3,
                           generator=torch.Generator().manual_seed(2))
        assert torch.equal(ours, plain)


def test_the_default_k_above_m_rule_is_sub_steps_and_edges_only_stops_at_m(world):
    teacher, x_T, labels = world
    card = _card(2)

    def run(K, rule=None):
        how = Sampling(card, K) if rule is None else Sampling(card, K, k_above_m=rule)
        return sample(teacher, x_T, labels, None, teacher.abar, how)

    assert DEFAULT_K_ABOVE_M == "substeps"  # benchmarks/claims.py (e): the lowest endpoint error of the rules
    assert torch.equal(run(8), sample_pcm(teacher, x_T, labels, teacher.abar, pcm_timesteps([999, 499, 0], 8)))
    assert torch.equal(run(8, "edges_only"), run(2))
    with pytest.raises(ValueError, match="allowed: substeps, edge_renoise, edges_only"):
        Sampling(card, 8, k_above_m="restart")


def test_edge_renoise_jumps_to_the_phase_edge_then_renoises_with_fresh_noise(world):
    # M = 2, K = 4: 999 -> [499, renoise 749] -> 499 -> [0, renoise 249] -> 0, recomputed from the primitives
    teacher, x_T, labels = world
    from pcm.math import abar_at, ddim_jump, renoise

    card = _card(2)
    how = Sampling(card, 4, k_above_m="edge_renoise")
    assert how.timesteps(1000) == [999, 749, 499, 249, 0] and how.jump_edges() == [999, 499, 0]
    ours = sample(teacher, x_T, labels, None, teacher.abar, how, torch.Generator().manual_seed(3))

    def ab(t):
        return abar_at(teacher.abar, torch.tensor([t]), x_T)

    def eps(x, t):
        return teacher(x, torch.full((len(x),), t), labels)

    gen, x = torch.Generator().manual_seed(3), x_T
    for t, edge, s in ((999, 499, 749), (749, 499, 499), (499, 0, 249), (249, 0, 0)):
        x = ddim_jump(x, eps(x, t), ab(t), ab(edge))
        if edge != s:
            x = renoise(x, torch.randn(x.shape, generator=gen), ab(edge), ab(s))
    torch.testing.assert_close(ours, x)
