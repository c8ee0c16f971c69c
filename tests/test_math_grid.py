import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pcm.math import SolverGrid, phase_edge_index, solver_grid


@st.composite
def grids(draw):
    N = draw(st.sampled_from([1, 2, 4, 5, 8, 10, 20, 25, 40, 50, 100, 500]))
    M = draw(st.integers(1, N))
    return SolverGrid(1000, N, M)


def test_solver_grid_is_trailing():
    tau = solver_grid(1000, 50)
    assert tau[0] == 19 and tau[-1] == 999 and bool((tau.diff() == 20).all())


@given(grids())
def test_edges_increase_start_at_zero_and_partition_the_grid(grid):
    e, s = grid.edge_index, grid.edges
    assert e[0] == 0 and s[0] == 0
    assert bool((e.diff() > 0).all()) and bool((s.diff() > 0).all())
    n = torch.arange(grid.N)
    m = grid.phase(n)
    # phases are contiguous, non-empty, in order, and cover every grid index exactly once
    assert m[0] == 0 and m[-1] == grid.M - 1 and bool((m.diff() >= 0).all()) and bool((m.diff() <= 1).all())
    assert torch.equal(torch.bincount(m, minlength=grid.M) > 0, torch.ones(grid.M, dtype=torch.bool))
    # every t = tau_n lies in (s_m, s_{m+1}] and is mapped to s_m <= t' = tau_{n-1}
    t, t_prev, s_n = grid.t(n), grid.t_prev(n), grid.s(n)
    upper = torch.cat([s[1:], torch.tensor([grid.T - 1])])[m]
    assert bool((s_n < t).all()) and bool((t <= upper).all()) and bool((s_n <= t_prev).all())
    # the step lands on the edge exactly at the phase's first grid index
    assert torch.equal(grid.at_edge(n), t_prev == s_n)


def test_reference_edges_n50_m4_are_not_multiples_of_250():
    grid = SolverGrid(1000, 50, 4)
    assert grid.edge_index.tolist() == [0, 12, 25, 37]
    assert grid.sampling_timesteps() == [999, 739, 499, 239, 0]
    assert SolverGrid(1000, 40, 4).sampling_timesteps() == [999, 749, 499, 249, 0]


@pytest.mark.parametrize("T,N,M,match", [(1000, 30, 1, "must divide"), (1000, 0, 1, "must divide"),
                                         (1000, 10, 11, "1 <= M <= N"), (1000, 10, 0, "1 <= M <= N")])
def test_bad_grids_are_rejected(T, N, M, match):
    with pytest.raises(ValueError, match=match):
        SolverGrid(T, N, M)


def test_phase_edge_index_floor_rule():
    assert phase_edge_index(10, 3).tolist() == [0, 3, 6]
